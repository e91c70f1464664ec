/*
 * The one definition of gmem-emu's shared-memory layout.
 *
 * Two POSIX shm segments per supervisor:
 *   core:  emu_header | emu_frame[nframes] | hwerr[nframes] | emu_task[ntasks]
 *          | emu_mm[nmms] | emu_inode[ninodes] | emu_vma[nvmas]
 *          | page-table pages[npt][512]
 *   phys:  frame contents, nframes * 4096 bytes ("physical memory")
 *
 * Only the supervisor (the emulated kernel) writes these tables.  Workers (the
 * emulated CPUs) read them lock-free and write: the accessed/dirty bits of leaf
 * page-table entries (cmpxchg), frame contents in phys, and in their own task
 * slot the rcu_epoch word and mailbox tail (atomics) and exit_sig (a plain
 * store, read by the supervisor only after the fact).
 * A worker maps everything else of the core segment read-only
 * (Core.protect_worker: header..hwerr, mms..vmas, other task slots);
 * every section starts on a page boundary so that this is possible.
 *
 * Everything is sized at supervisor start and never shrunk while mapped.
 */
#ifndef EMU_LAYOUT_H
#define EMU_LAYOUT_H
#include <stdint.h>

#define EMU_MAGIC        0x756d652d6d656d67ULL   /* "gmem-emu" */
#define EMU_VERSION      5
#define EMU_PAGE_SHIFT   12
#define EMU_PAGE_SIZE    4096
#define EMU_PTRS         512        /* entries per page-table page */
#define EMU_MB_RING      16         /* siginfo records per task mailbox */
#define EMU_COMM_LEN     16
#define EMU_PANIC_LEN    256        /* panic() reason kept in the header */

/* ---- page-table entries (x86-64 bit positions) ---- */
#define EMU_PTE_PRESENT  (1ULL << 0)
#define EMU_PTE_RW       (1ULL << 1)
#define EMU_PTE_USER     (1ULL << 2)
#define EMU_PTE_ACCESSED (1ULL << 5)
#define EMU_PTE_DIRTY    (1ULL << 6)
#define EMU_PTE_PSE      (1ULL << 7)    /* huge leaf at PMD (2M) or PUD (1G) level */
#define EMU_PTE_SPECIAL  (1ULL << 9)    /* _PAGE_SPECIAL (software bit): no struct page behind
                                         * it for the mm (vm_normal_page() is NULL), e.g. the
                                         * zero page; a CPU treats it as any leaf */
#define EMU_PTE_PFN_MASK 0x000ffffffffff000ULL
#define EMU_PTE_S2_PRIVATE (1ULL << 52) /* stage-2 only (software bit): maps private memory */
/* non-present entries: a hwpoison swap entry keeps the pfn in the pfn field */
#define EMU_PTE_HWPOISON (1ULL << 62)

/* ---- struct page / struct folio (the head frame carries the folio fields) ----
 * Tables grow with folios, not bytes: the tail frames of a HugeTLB folio (order 9
 * or 18, naturally aligned) may stay all zero; their head is then found from the
 * aligned head frame, which has EMU_PG_HEAD and the order. */
#define EMU_PG_HEAD      (1ULL << 5)
#define EMU_PG_DIRTY     (1ULL << 3)    /* a zapped dirty PTE moves its dirty bit here */
#define EMU_PG_HWPOISON  (1ULL << 12)   /* try_to_unmap(TTU_HWPOISON) leaves hwpoison entries */
typedef struct {
    uint64_t flags;      /* EMU_PG_* */
    int32_t  refcount;   /* _refcount */
    int32_t  mapcount;   /* number of PTE mappings (_mapcount + 1) */
    uint64_t head;       /* pfn of the folio head (== own pfn for a head) */
    uint32_t order;      /* folio order, valid on the head */
    uint32_t mapping;    /* owning inode number, 0 = anonymous / none */
    uint64_t index;      /* page offset in the mapping */
    uint64_t private_;   /* per-subsystem data (hugetlb raw poison count, ...) */
} emu_frame;

/* ---- one siginfo record, as the kernel would fill siginfo_t ---- */
typedef struct {
    int32_t  signo;
    int32_t  code;
    int32_t  errno_;
    int32_t  pid;
    uint64_t addr;
    int32_t  addr_lsb;
    int32_t  pad;
    uint64_t seq;
    uint64_t ts_ns;      /* CLOCK_MONOTONIC when the kernel generated it */
} emu_siginfo;

/* ---- one emulated thread ---- */
#define EMU_TASK_FREE    0
#define EMU_TASK_ALIVE   1
#define EMU_TASK_DEAD    2
typedef struct {
    int32_t  tid;             /* the worker's real pid */
    int32_t  tgid;            /* the main thread's pid */
    int32_t  state;
    int32_t  mm;              /* emu_mm slot */
    uint32_t mce_flags;       /* PF_MCE_PROCESS | PF_MCE_EARLY (mirror, for status) */
    int32_t  exit_sig;        /* set by the worker right before it dies of a signal */
    int32_t  group_exit_sig;  /* set by the supervisor before the group-exit doorbell */
    int32_t  pad;
    uint64_t rcu_epoch;       /* 0 = quiescent, else header.epoch seen at access start */
    uint32_t mb_head;         /* written by the supervisor */
    uint32_t mb_tail;         /* written by the worker's signal handler (dequeue) */
    char     comm[EMU_COMM_LEN];
    emu_siginfo mb[EMU_MB_RING];
} emu_task;

/* ---- one mm_struct ---- */
typedef struct {
    uint64_t pgd;             /* page-table page index of the top level, 0 = none */
    int32_t  users;
    int32_t  state;
    uint64_t pad;
} emu_mm;

/* ---- inodes and VMAs: the kernel's objects, mirrored for any reader ---- */
#define EMU_INODE_FREE   0
#define EMU_INODE_SHMEM  1
#define EMU_INODE_GMEM   2
#define EMU_INODE_HUGETLBFS 3
#define EMU_INODE_KVM    4
#define EMU_INODE_EXT2   5          /* a regular file of the disk file system (kernel/ext2.py) */
typedef struct {
    uint32_t ino;
    uint32_t kind;            /* EMU_INODE_* */
    uint64_t size;            /* i_size */
    uint64_t flags;           /* e.g. GUEST_MEMFD_FLAG_* */
    uint64_t nrpages;         /* pages in the page cache */
    int32_t  nlink;
    int32_t  i_mmap;          /* first VMA slot + 1 of i_mmap (vm_pgoff order), 0 = none */
    char     name[32];
} emu_inode;

typedef struct {
    int32_t  mm;              /* emu_mm slot, -1 = free */
    uint32_t prot;
    uint32_t shared;
    uint32_t ino;             /* 0 = anonymous */
    uint64_t start, end;
    uint64_t pgoff;
    int32_t  i_mmap_next;     /* next VMA slot + 1 in its file's i_mmap, 0 = last */
    int32_t  pad;
} emu_vma;

typedef struct {
    uint64_t magic, version;
    uint64_t core_size, phys_size;
    uint64_t nframes, ntasks, nmms, npt, ninodes, nvmas;
    uint64_t off_frames, off_hwerr, off_tasks, off_mms, off_pt, off_inodes, off_vmas;
    uint64_t epoch;           /* global epoch for deferred frame reuse (TLB shootdown) */
    int64_t  supervisor_pid;
    uint64_t shutdown;        /* set before an orderly supervisor exit */
    uint64_t panicked;        /* set when the kernel panicked (panic_msg is its reason) */
    uint64_t pad[2];
    char     panic_msg[EMU_PANIC_LEN];   /* NUL-terminated, read by the panic doorbell */
} emu_header;

#endif
