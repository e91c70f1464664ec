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

/* The frame a present leaf entry at `level` maps for va. */
static inline uint64_t emu_leaf_pfn(uint64_t e, uint64_t va, int level) {
    return ((e & EMU_PTE_PFN_MASK) >> EMU_PAGE_SHIFT)
           + ((va >> EMU_PAGE_SHIFT) & ((1ULL << (emu_level_shift(level) - EMU_PAGE_SHIFT)) - 1));
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
static inline __attribute__((always_inline))
size_t emu_access_locked(emu_ctx *c, emu_tlb *tlb, uint64_t pgd, uint64_t va, uint8_t *buf,
                         size_t n, int write, int priv, int *status, uint64_t *xva, uint64_t *xpfn)
{
    size_t done = 0;
    uint64_t want = EMU_PTE_ACCESSED | (write ? EMU_PTE_DIRTY : 0);
    while (done < n) {
        uint64_t cur = va + done, e, pfn, off, chunk;
        int level;
        uint64_t *slot = emu_walk_tlb(c, tlb, pgd, cur, &level);
    retry:
        e = slot ? __atomic_load_n(slot, __ATOMIC_ACQUIRE) : 0;
        if (!(e & EMU_PTE_PRESENT) || (write && !(e & EMU_PTE_RW))
            || (priv >= 0 && !!(e & EMU_PTE_S2_PRIVATE) != priv)) {
            *status = EMU_ACC_FAULT; *xva = cur; return done;
        }
        pfn = emu_leaf_pfn(e, cur, level);
        if (pfn >= c->nframes) { *status = EMU_ACC_BADPFN; *xva = cur; *xpfn = pfn; return done; }
        /* x86 signals an SRAR #MC for a load (or an instruction fetch) that consumes
         * poison; a store does not consume it: the store completes and the line
         * stays poisoned, so the next load still takes the machine check. */
        if (!write && c->hwerr[pfn]) { *status = EMU_ACC_MCE; *xva = cur; *xpfn = pfn; return done; }
        if ((e & want) != want) {
            /* hardware A/D update: a locked cmpxchg that rechecks the entry */
            if (!__atomic_compare_exchange_n(slot, &e, e | want, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                goto retry;
        }
        off = cur & (EMU_PAGE_SIZE - 1);
        chunk = EMU_PAGE_SIZE - off;
        if (chunk > n - done) chunk = n - done;
        if (write) memcpy(c->phys + (pfn << EMU_PAGE_SHIFT) + off, buf + done, chunk);
        else       memcpy(buf + done, c->phys + (pfn << EMU_PAGE_SHIFT) + off, chunk);
        done += chunk;
    }
    *status = EMU_ACC_OK;
    return done;
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
void emu_prefetch(const emu_ctx *c, emu_tlb *tlb, uint64_t pgd, uint64_t va, int write) {
    int level;
    uint64_t *slot = emu_walk_tlb(c, tlb, pgd, va, &level), e, pfn;
    if (!slot) return;
    e = __atomic_load_n(slot, __ATOMIC_RELAXED);
    if (!(e & EMU_PTE_PRESENT)) return;
    pfn = emu_leaf_pfn(e, va, level);
    if (pfn >= c->nframes) return;
    if (!write) __builtin_prefetch(c->hwerr + pfn, 0, 3);   /* only loads check it */
    if (write) __builtin_prefetch(c->phys + (pfn << EMU_PAGE_SHIFT) + (va & (EMU_PAGE_SIZE - 1)), 1, 3);
    else       __builtin_prefetch(c->phys + (pfn << EMU_PAGE_SHIFT) + (va & (EMU_PAGE_SIZE - 1)), 0, 3);
}

/*
 * Batched access: `size` bytes at each of addrs[start..m), packed in buf.
 * Returns the index of the first access that did not complete (m when all did);
 * *partial holds the bytes that one did.
 */
static size_t emu_access_batch(emu_ctx *c, emu_task *t, uint64_t pgd, const uint64_t *addrs,
                               size_t start, size_t m, size_t size, uint8_t *buf, int write, int priv,
                               int *status, uint64_t *xva, uint64_t *xpfn, size_t *partial)
{
    size_t i;
    emu_tlb tlb;
    *status = EMU_ACC_OK; *partial = 0;
    emu_tlb_init(&tlb);
    emu_rcu_enter(c, t);
    for (i = start; i < m && i < start + EMU_PREFETCH_AHEAD; i++)
        emu_prefetch(c, &tlb, pgd, addrs[i], write);
    for (i = start; i < m; i++) {
        size_t d;
        if (i + EMU_PREFETCH_AHEAD < m)
            emu_prefetch(c, &tlb, pgd, addrs[i + EMU_PREFETCH_AHEAD], write);
        d = emu_access_locked(c, &tlb, pgd, addrs[i], buf + i * size, size, write, priv,
                              status, xva, xpfn);
        if (*status != EMU_ACC_OK) { *partial = d; break; }
    }
    emu_rcu_exit(t);
    return i;
}

/* Baseline for benchmarks: the same 4-level lookup, look-ahead prefetch and
 * copy as a plain C loop, with none of the emulator's work (no epoch, TLB, A/D
 * or poison check). */
static inline uint8_t *emu_plain_translate(const emu_ctx *c, uint64_t pgd, uint64_t va) {
    uint64_t *tbl = c->pt + pgd * EMU_PTRS, e = 0;
    int shift;
    for (shift = 39; shift >= 12; shift -= 9) {
        e = tbl[(va >> shift) & 511];
        if (!(e & EMU_PTE_PRESENT)) return NULL;
        if (shift == 12 || (e & EMU_PTE_PSE)) break;
        tbl = c->pt + ((e & EMU_PTE_PFN_MASK) >> 12) * EMU_PTRS;
    }
    return c->phys + ((((e & EMU_PTE_PFN_MASK) >> 12) + ((va >> 12) & ((1ULL << (shift - 12)) - 1))) << 12)
           + (va & 4095);
}

static size_t emu_plain_c_loop(const emu_ctx *c, uint64_t pgd, const uint64_t *addrs, size_t m,
                               size_t size, uint8_t *buf)
{
    size_t i, ok = 0;
    for (i = 0; i < m && i < EMU_PREFETCH_AHEAD; i++) {
        uint8_t *p = emu_plain_translate(c, pgd, addrs[i]);
        if (p) __builtin_prefetch(p, 0, 3);
    }
    for (i = 0; i < m; i++) {
        uint8_t *p;
        if (i + EMU_PREFETCH_AHEAD < m && (p = emu_plain_translate(c, pgd, addrs[i + EMU_PREFETCH_AHEAD])))
            __builtin_prefetch(p, 0, 3);
        p = emu_plain_translate(c, pgd, addrs[i]);
        if (!p) continue;
        memcpy(buf + i * size, p, size);
        ok++;
    }
    return ok;
}
#endif
