/*
 * The emulated CPU and MMU: page-table walks, user-memory access, A/D bits,
 * consumption of latent hardware poison.  No policy lives here: a walk either
 * completes, or stops and tells the caller to enter the kernel (a fault or a
 * machine check), exactly as hardware would.
 */
#ifndef EMU_FASTPATH_H
#define EMU_FASTPATH_H
#include <string.h>
#include <time.h>
#include "layout.h"

enum { EMU_ACC_OK = 0, EMU_ACC_FAULT = 1, EMU_ACC_MCE = 2, EMU_ACC_BADPFN = 3 };

typedef struct {
    emu_header *hdr;
    emu_frame  *frames;
    uint8_t    *hwerr;
    emu_task   *tasks;
    emu_mm     *mms;
    uint64_t   *pt;
    uint8_t    *phys;
    uint64_t    nframes, npt, ntasks;
} emu_ctx;

static inline uint64_t *emu_pt_page(const emu_ctx *c, uint64_t idx) {
    return c->pt + idx * EMU_PTRS;
}

static inline uint64_t emu_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/*
 * Walk from the top-level table `pgd` to the entry that decides `va`: a present
 * leaf (4K PTE, or a PSE entry at PMD/PUD level), or the first non-present entry
 * on the way.  Returns NULL only when the tables themselves are malformed.
 */
static inline __attribute__((always_inline))
uint64_t *emu_walk(const emu_ctx *c, uint64_t pgd, uint64_t va, int *level) {
    uint64_t *tbl;
    int lvl, shift = 39;
    if (pgd == 0 || pgd >= c->npt) return NULL;
    tbl = emu_pt_page(c, pgd);
    for (lvl = 4; lvl >= 1; lvl--, shift -= 9) {
        uint64_t *slot = tbl + ((va >> shift) & (EMU_PTRS - 1));
        uint64_t e, idx;
        *level = lvl;
        if (lvl == 1) return slot;
        e = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
        if (!(e & EMU_PTE_PRESENT) || (e & EMU_PTE_PSE)) return slot;
        idx = (e & EMU_PTE_PFN_MASK) >> EMU_PAGE_SHIFT;
        if (idx == 0 || idx >= c->npt) return NULL;
        tbl = emu_pt_page(c, idx);
    }
    return NULL;
}

static inline int emu_level_shift(int level) {
    return level == 1 ? 12 : (level == 2 ? 21 : 30);
}

/* The frame a present leaf entry at `level` maps for va: the entry's frame plus
 * va's page offset inside the leaf (4K: none, 2M: 9 bits, 1G and above: 18
 * bits, as emu_level_shift says), from a table rather than a chain of tests;
 * emu_walk sets level to 1..4. */
static const uint64_t emu_leaf_mask[5] = {0, 0, (1ULL << 9) - 1, (1ULL << 18) - 1, (1ULL << 18) - 1};
static inline uint64_t emu_leaf_pfn(uint64_t e, uint64_t va, int level) {
    return ((e & EMU_PTE_PFN_MASK) >> EMU_PAGE_SHIFT)
           + ((va >> EMU_PAGE_SHIFT) & emu_leaf_mask[level]);
}

/* RCU-like read section: frames and tables a zap freed are reused only once
 * every task is quiescent or entered after the zap (emulated TLB shootdown). */
static inline void emu_rcu_enter(emu_ctx *c, emu_task *t) {
    __atomic_store_n(&t->rcu_epoch, __atomic_load_n(&c->hdr->epoch, __ATOMIC_SEQ_CST), __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
static inline void emu_rcu_exit(emu_task *t) {
    __atomic_store_n(&t->rcu_epoch, 0, __ATOMIC_RELEASE);
}

/*
 * A per-call "TLB" of leaf page-table pages, keyed by the 2 MiB region: a hit
 * skips the three upper levels.  It only lives for one fast-path call, inside
 * the rcu read section, so a table page it points at cannot be reused under it;
 * leaf entries are always re-read, so zaps are seen at once.
 */
#define EMU_TLB_SIZE 64
typedef struct { uint64_t tag[EMU_TLB_SIZE]; uint64_t *tbl[EMU_TLB_SIZE]; } emu_tlb;

static inline void emu_tlb_init(emu_tlb *t) { memset(t->tag, 0xff, sizeof t->tag); }

static inline __attribute__((always_inline))
uint64_t *emu_walk_tlb(const emu_ctx *c, emu_tlb *tlb, uint64_t pgd, uint64_t va, int *level) {
    uint64_t tag = va >> 21;
    unsigned h = (unsigned)(tag % EMU_TLB_SIZE);
    uint64_t *slot;
    if (tlb && tlb->tag[h] == tag) {
        *level = 1;
        return tlb->tbl[h] + ((va >> 12) & (EMU_PTRS - 1));
    }
    slot = emu_walk(c, pgd, va, level);
    if (tlb && slot && *level == 1) {
        tlb->tag[h] = tag;
        tlb->tbl[h] = slot - ((va >> 12) & (EMU_PTRS - 1));
    }
    return slot;
}

/*
 * Copy n bytes between `buf` and user memory at `va` through page table `pgd`.
 * Returns the bytes done; *status says why it stopped.  On FAULT, *xva is the
 * faulting byte; on MCE (a read only), also *xpfn, the frame whose latent error
 * was consumed.
 * Caller must be inside an rcu read section.
 */
/*
 * `priv` is the access's private/shared view (the guest's C-bit): -1 for host
 * accesses and guests whose attributes decide, else 0/1; a stage-2 entry that
 * maps the other kind of memory faults, as TDX's separate EPTs or SNP's RMP do.
 */
/*
 * Benchmark ablation only: each bit leaves one piece of work out, to measure
 * what it costs (benchmarks/bench_fastpath.py).  Production passes 0, a
 * constant, so the compiler drops every test of `skip`.
 */
enum { EMU_SKIP_POISON = 1, EMU_SKIP_AD = 2, EMU_SKIP_CHECKS = 4, EMU_SKIP_RCU = 8 };

static inline __attribute__((always_inline))
size_t emu_access_locked_s(emu_ctx *c, emu_tlb *tlb, uint64_t pgd, uint64_t va, uint8_t *buf,
                           size_t n, int write, int priv, int *status, uint64_t *xva, uint64_t *xpfn,
                           const unsigned skip)
{
    size_t done = 0;
    uint64_t want = EMU_PTE_ACCESSED | (write ? EMU_PTE_DIRTY : 0);
    while (done < n) {
        uint64_t cur = va + done, e, pfn, off, chunk;
        int level;
        uint64_t *slot = emu_walk_tlb(c, tlb, pgd, cur, &level);
    retry:
        e = slot ? __atomic_load_n(slot, __ATOMIC_ACQUIRE) : 0;
        if (!(skip & EMU_SKIP_CHECKS) && (!(e & EMU_PTE_PRESENT) || (write && !(e & EMU_PTE_RW))
            || (priv >= 0 && !!(e & EMU_PTE_S2_PRIVATE) != priv))) {
            *status = EMU_ACC_FAULT; *xva = cur; return done;
        }
        pfn = emu_leaf_pfn(e, cur, level);
        if (!(skip & EMU_SKIP_CHECKS) && pfn >= c->nframes) {
            *status = EMU_ACC_BADPFN; *xva = cur; *xpfn = pfn; return done;
        }
        /* x86 signals an SRAR #MC for a load (or an instruction fetch) that consumes
         * poison; a store does not consume it: the store completes and the line
         * stays poisoned, so the next load still takes the machine check. */
        if (!(skip & EMU_SKIP_POISON) && !write && c->hwerr[pfn]) { *status = EMU_ACC_MCE; *xva = cur; *xpfn = pfn; return done; }
        if (!(skip & EMU_SKIP_AD) && (e & want) != want) {
            /* hardware A/D update: a locked cmpxchg that rechecks the entry */
            if (!__atomic_compare_exchange_n(slot, &e, e | want, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                goto retry;
        }
        off = cur & (EMU_PAGE_SIZE - 1);
        if (done == 0 && off + n <= EMU_PAGE_SIZE) {
            /* the whole access in one page (the common case): one copy whose size
             * the compiler knows when the caller's is constant (the batch's 8) */
            if (write) memcpy(c->phys + (pfn << EMU_PAGE_SHIFT) + off, buf, n);
            else       memcpy(buf, c->phys + (pfn << EMU_PAGE_SHIFT) + off, n);
            done = n;
            break;
        }
        chunk = EMU_PAGE_SIZE - off;
        if (chunk > n - done) chunk = n - done;
        if (write) memcpy(c->phys + (pfn << EMU_PAGE_SHIFT) + off, buf + done, chunk);
        else       memcpy(buf + done, c->phys + (pfn << EMU_PAGE_SHIFT) + off, chunk);
        done += chunk;
    }
    *status = EMU_ACC_OK;
    return done;
}

static inline __attribute__((always_inline))
size_t emu_access_locked(emu_ctx *c, emu_tlb *tlb, uint64_t pgd, uint64_t va, uint8_t *buf,
                         size_t n, int write, int priv, int *status, uint64_t *xva, uint64_t *xpfn)
{
    return emu_access_locked_s(c, tlb, pgd, va, buf, n, write, priv, status, xva, xpfn, 0);
}

static size_t emu_access(emu_ctx *c, emu_task *t, uint64_t pgd, uint64_t va, uint8_t *buf,
                         size_t n, int write, int priv, int *status, uint64_t *xva, uint64_t *xpfn)
{
    size_t r;
    emu_rcu_enter(c, t);
    r = emu_access_locked(c, NULL, pgd, va, buf, n, write, priv, status, xva, xpfn);
    emu_rcu_exit(t);
    return r;
}

/*
 * A batch knows its addresses in advance, so it can do what an out-of-order
 * core does with independent loads: start the cache misses of access i+AHEAD
 * while access i copies.  This is only a hint: the entry is re-read, and every
 * check made, when the access itself runs.
 */
#define EMU_PREFETCH_AHEAD 16
static inline __attribute__((always_inline))
void emu_prefetch(const emu_ctx *c, emu_tlb *tlb, uint64_t pgd, uint64_t va, int write,
                  const unsigned skip) {
    int level;
    uint64_t *slot = emu_walk_tlb(c, tlb, pgd, va, &level), e, pfn;
    if (!slot) return;
    e = __atomic_load_n(slot, __ATOMIC_RELAXED);
    if (!(e & EMU_PTE_PRESENT)) return;
    pfn = emu_leaf_pfn(e, va, level);
    if (pfn >= c->nframes) return;
    if (!(skip & EMU_SKIP_POISON) && !write)
        __builtin_prefetch(c->hwerr + pfn, 0, 3);   /* only loads check it */
    if (write) __builtin_prefetch(c->phys + (pfn << EMU_PAGE_SHIFT) + (va & (EMU_PAGE_SIZE - 1)), 1, 3);
    else       __builtin_prefetch(c->phys + (pfn << EMU_PAGE_SHIFT) + (va & (EMU_PAGE_SIZE - 1)), 0, 3);
}

/*
 * Batched access: `size` bytes at each of addrs[start..m), packed in buf.
 * Returns the index of the first access that did not complete (m when all did);
 * *partial holds the bytes that one did.
 */
static inline __attribute__((always_inline))
size_t emu_access_batch_s(emu_ctx *c, emu_task *t, uint64_t pgd, const uint64_t *addrs,
                          size_t start, size_t m, size_t size, uint8_t *buf, int write, int priv,
                          int *status, uint64_t *xva, uint64_t *xpfn, size_t *partial,
                          const unsigned skip)
{
    size_t i, d = 0;
    emu_tlb tlb;
    /* Locals the copies into buf cannot alias, so the compiler keeps them in
     * registers: the context (its addresses are fixed once bound) and the
     * outcome, written back once at the end. */
    emu_ctx lc = *c;
    int st = EMU_ACC_OK;
    uint64_t xv = *xva, xp = *xpfn;
    emu_tlb_init(&tlb);
    if (!(skip & EMU_SKIP_RCU)) emu_rcu_enter(&lc, t);
    for (i = start; i < m && i < start + EMU_PREFETCH_AHEAD; i++)
        emu_prefetch(&lc, &tlb, pgd, addrs[i], write, skip);
    for (i = start; i < m; i++) {
        if (i + EMU_PREFETCH_AHEAD < m)
            emu_prefetch(&lc, &tlb, pgd, addrs[i + EMU_PREFETCH_AHEAD], write, skip);
        d = emu_access_locked_s(&lc, &tlb, pgd, addrs[i], buf + i * size, size, write, priv,
                                &st, &xv, &xp, skip);
        if (st != EMU_ACC_OK) break;
    }
    if (!(skip & EMU_SKIP_RCU)) emu_rcu_exit(t);
    *status = st; *partial = st == EMU_ACC_OK ? 0 : d;
    *xva = xv; *xpfn = xp;
    return i;
}

static size_t emu_access_batch(emu_ctx *c, emu_task *t, uint64_t pgd, const uint64_t *addrs,
                               size_t start, size_t m, size_t size, uint8_t *buf, int write, int priv,
                               int *status, uint64_t *xva, uint64_t *xpfn, size_t *partial)
{
    if (size == 8)      /* a word: the copies become single moves */
        return emu_access_batch_s(c, t, pgd, addrs, start, m, 8, buf, write, priv, status, xva,
                                  xpfn, partial, 0);
    return emu_access_batch_s(c, t, pgd, addrs, start, m, size, buf, write, priv, status, xva,
                              xpfn, partial, 0);
}

/* Benchmark ablation: the batch with the work named by `skip` left out (each
 * case a separate specialisation, as production's skip = 0 is). */
#define EMU_ABL(k) case k: return size == 8 ? \
    emu_access_batch_s(c, t, pgd, addrs, 0, m, 8, buf, write, priv, &st, &xva, &xpfn, &partial, k) : \
    emu_access_batch_s(c, t, pgd, addrs, 0, m, size, buf, write, priv, \
                                                     &st, &xva, &xpfn, &partial, k)
static size_t emu_access_batch_ablate(emu_ctx *c, emu_task *t, uint64_t pgd, const uint64_t *addrs,
                                      size_t m, size_t size, uint8_t *buf, int write, int priv,
                                      unsigned skip)
{
    int st; uint64_t xva, xpfn; size_t partial;
    switch (skip) {
    EMU_ABL(0); EMU_ABL(1); EMU_ABL(2); EMU_ABL(3); EMU_ABL(4); EMU_ABL(5); EMU_ABL(6); EMU_ABL(7);
    EMU_ABL(8); EMU_ABL(9); EMU_ABL(10); EMU_ABL(11); EMU_ABL(12); EMU_ABL(13); EMU_ABL(14);
    EMU_ABL(15);
    default: return 0;
    }
}
#undef EMU_ABL

/*
 * Benchmark baselines.
 *
 * Software walk: the fast path's own walk (4-level tables in shm, the same
 * per-call walk cache, the same look-ahead prefetch of the translated pointer)
 * and copy, with none of the emulator's checks: no rcu section, no
 * present/permission/bound check beyond what a walk needs, no A/D, no poison.
 */
static inline __attribute__((always_inline))
uint8_t *emu_soft_translate(const emu_ctx *c, emu_tlb *tlb, uint64_t pgd, uint64_t va) {
    int level;
    uint64_t *slot = emu_walk_tlb(c, tlb, pgd, va, &level), e;
    if (!slot) return NULL;
    e = *slot;
    if (!(e & EMU_PTE_PRESENT)) return NULL;
    return c->phys + (emu_leaf_pfn(e, va, level) << EMU_PAGE_SHIFT) + (va & (EMU_PAGE_SIZE - 1));
}

static inline __attribute__((always_inline))
size_t emu_soft_walk_loop_s(const emu_ctx *c, uint64_t pgd, const uint64_t *addrs, size_t m,
                            size_t size, uint8_t *buf)
{
    size_t i, ok = 0;
    emu_tlb tlb;
    emu_tlb_init(&tlb);
    for (i = 0; i < m && i < EMU_PREFETCH_AHEAD; i++) {
        uint8_t *p = emu_soft_translate(c, &tlb, pgd, addrs[i]);
        if (p) __builtin_prefetch(p, 0, 3);
    }
    for (i = 0; i < m; i++) {
        uint8_t *p;
        if (i + EMU_PREFETCH_AHEAD < m && (p = emu_soft_translate(c, &tlb, pgd, addrs[i + EMU_PREFETCH_AHEAD])))
            __builtin_prefetch(p, 0, 3);
        p = emu_soft_translate(c, &tlb, pgd, addrs[i]);
        if (!p) continue;
        memcpy(buf + i * size, p, size);
        ok++;
    }
    return ok;
}

static size_t emu_soft_walk_loop(const emu_ctx *c, uint64_t pgd, const uint64_t *addrs, size_t m,
                                 size_t size, uint8_t *buf)
{
    if (size == 8) return emu_soft_walk_loop_s(c, pgd, addrs, m, 8, buf);
    return emu_soft_walk_loop_s(c, pgd, addrs, m, size, buf);
}

/*
 * Hardware: the same addresses (rebased from `base` onto `mem`, a real mmap of
 * the same size, resident) read with plain loads: the CPU's MMU translates.
 * Same look-ahead prefetch and the same copy into buf; the loaded words are
 * also summed so that no load can be dropped.
 */
static inline __attribute__((always_inline))
uint64_t emu_hw_loop_s(const uint8_t *mem, uint64_t base, const uint64_t *addrs, size_t m,
                       size_t size, uint8_t *buf)
{
    size_t i;
    uint64_t sum = 0, w;
    for (i = 0; i < m && i < EMU_PREFETCH_AHEAD; i++)
        __builtin_prefetch(mem + (addrs[i] - base), 0, 3);
    for (i = 0; i < m; i++) {
        const uint8_t *p = mem + (addrs[i] - base);
        if (i + EMU_PREFETCH_AHEAD < m)
            __builtin_prefetch(mem + (addrs[i + EMU_PREFETCH_AHEAD] - base), 0, 3);
        memcpy(buf + i * size, p, size);
        memcpy(&w, p, sizeof w);
        sum += w;
    }
    return sum;
}

static uint64_t emu_hw_loop(const uint8_t *mem, uint64_t base, const uint64_t *addrs, size_t m,
                            size_t size, uint8_t *buf)
{
    if (size == 8) return emu_hw_loop_s(mem, base, addrs, m, 8, buf);
    return emu_hw_loop_s(mem, base, addrs, m, size, buf);
}
#endif
