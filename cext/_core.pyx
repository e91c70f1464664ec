# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""gmem-emu's core: typed views over the shared-memory tables and the fast path.

The layout is defined once, in layout.h.  The supervisor uses the write-side
accessors; workers use only the fast path (access/access_batch), their own
mailbox and signal plumbing.  No policy lives here.
"""
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memset, memcpy
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED

cdef extern from "<sys/mman.h>":
    int madvise(void *addr, size_t length, int advice) nogil
    int mprotect(void *addr, size_t length, int prot) nogil

cdef enum:
    MADV_POPULATE_WRITE = 23
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Malloc, PyMem_Free

cdef extern from "layout.h":
    uint64_t EMU_MAGIC
    int EMU_VERSION, EMU_PAGE_SHIFT, EMU_PAGE_SIZE, EMU_PTRS, EMU_MB_RING, EMU_COMM_LEN
    uint64_t EMU_PTE_PRESENT, EMU_PTE_RW, EMU_PTE_USER, EMU_PTE_ACCESSED, EMU_PTE_DIRTY
    uint64_t EMU_PTE_PSE, EMU_PTE_PFN_MASK, EMU_PTE_HWPOISON, EMU_PTE_S2_PRIVATE
    uint64_t EMU_PTE_SPECIAL
    int EMU_TASK_FREE, EMU_TASK_ALIVE, EMU_TASK_DEAD
    uint64_t EMU_PG_HEAD, EMU_PG_DIRTY, EMU_PG_HWPOISON
    int EMU_INODE_FREE, EMU_INODE_SHMEM, EMU_INODE_GMEM, EMU_INODE_HUGETLBFS, EMU_INODE_KVM
    int EMU_INODE_EXT2
    ctypedef struct emu_frame:
        uint64_t flags
        int32_t refcount
        int32_t mapcount
        uint64_t head
        uint32_t order
        uint32_t mapping
        uint64_t index
        uint64_t private_
    ctypedef struct emu_siginfo:
        int32_t signo, code, errno_, pid
        uint64_t addr
        int32_t addr_lsb
        uint64_t seq, ts_ns
    ctypedef struct emu_task:
        int32_t tid, tgid, state, mm
        uint32_t mce_flags
        int32_t exit_sig, group_exit_sig
        uint64_t rcu_epoch
        uint32_t mb_head, mb_tail
        char comm[16]
        emu_siginfo mb[16]
    ctypedef struct emu_mm:
        uint64_t pgd
        int32_t users, state
    ctypedef struct emu_inode:
        uint32_t ino, kind
        uint64_t size, flags, nrpages
        int32_t nlink, i_mmap
        char name[32]
    ctypedef struct emu_vma:
        int32_t mm
        uint32_t prot, shared, ino
        uint64_t start, end, pgoff
        int32_t i_mmap_next
    ctypedef struct emu_header:
        uint64_t magic, version, core_size, phys_size
        uint64_t nframes, ntasks, nmms, npt, ninodes, nvmas
        uint64_t off_frames, off_hwerr, off_tasks, off_mms, off_pt, off_inodes, off_vmas
        uint64_t epoch
        int64_t supervisor_pid
        uint64_t shutdown
        uint64_t panicked
        char panic_msg[256]

cdef extern from "fastpath.h":
    int EMU_ACC_OK, EMU_ACC_FAULT, EMU_ACC_MCE, EMU_ACC_BADPFN
    ctypedef struct emu_ctx:
        emu_header *hdr
        emu_frame *frames
        uint8_t *hwerr
        emu_task *tasks
        emu_mm *mms
        uint64_t *pt
        uint8_t *phys
        uint64_t nframes, npt, ntasks
    uint64_t *emu_walk(const emu_ctx *c, uint64_t pgd, uint64_t va, int *level) nogil
    uint64_t emu_now_ns() nogil
    size_t emu_access(emu_ctx *c, emu_task *t, uint64_t pgd, uint64_t va, uint8_t *buf,
                      size_t n, int write, int priv, int *status, uint64_t *xva, uint64_t *xpfn) nogil
    size_t emu_access_batch(emu_ctx *c, emu_task *t, uint64_t pgd, const uint64_t *addrs,
                            size_t start, size_t m, size_t size, uint8_t *buf, int write, int priv,
                            int *status, uint64_t *xva, uint64_t *xpfn, size_t *partial) nogil
    size_t emu_access_batch_ablate(emu_ctx *c, emu_task *t, uint64_t pgd, const uint64_t *addrs,
                                   size_t m, size_t size, uint8_t *buf, int write, int priv,
                                   unsigned skip) nogil
    size_t emu_soft_walk_loop(const emu_ctx *c, uint64_t pgd, const uint64_t *addrs, size_t m,
                              size_t size, uint8_t *buf) nogil
    uint64_t emu_hw_loop(const uint8_t *mem, uint64_t base, const uint64_t *addrs, size_t m,
                         size_t size, uint8_t *buf) nogil

cdef extern from "sigrec.h":
    emu_task *emu_self_task
    int emu_supervisor_pid
    int emu_lpop(emu_siginfo *out)
    int emu_mb_drain()
    int emu_install_sigbus()
    int emu_install_group_exit(int sig)
    int emu_raise_self(int signo, int code, uint64_t addr, int lsb)
    int emu_tgkill(int tgid, int tid, int sig)

# ---- small atomic helpers ----
cdef extern from *:
    """
    static inline uint64_t emu_ld64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void emu_st64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint64_t emu_xchg64(uint64_t *p, uint64_t v) { return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL); }
    static inline uint64_t emu_and64(uint64_t *p, uint64_t v) { return __atomic_fetch_and(p, v, __ATOMIC_ACQ_REL); }
    static inline uint32_t emu_ld32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void emu_st32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void emu_sti32(int32_t *p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void emu_st8(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline uint64_t emu_ld_epoch(emu_header *h) { return __atomic_load_n(&h->epoch, __ATOMIC_SEQ_CST); }
    static inline void emu_st_epoch(emu_header *h, uint64_t v) { __atomic_store_n(&h->epoch, v, __ATOMIC_SEQ_CST); }
    static inline uint64_t emu_ld_task_epoch(emu_task *t) { return __atomic_load_n(&t->rcu_epoch, __ATOMIC_SEQ_CST); }
    """
    uint64_t emu_ld64(uint64_t *p) nogil
    void emu_st64(uint64_t *p, uint64_t v) nogil
    uint64_t emu_xchg64(uint64_t *p, uint64_t v) nogil
    uint64_t emu_and64(uint64_t *p, uint64_t v) nogil
    uint32_t emu_ld32(uint32_t *p) nogil
    void emu_st32(uint32_t *p, uint32_t v) nogil
    void emu_sti32(int32_t *p, int32_t v) nogil
    void emu_st8(uint8_t *p, uint8_t v) nogil
    uint64_t emu_ld_epoch(emu_header *h) nogil
    void emu_st_epoch(emu_header *h, uint64_t v) nogil
    uint64_t emu_ld_task_epoch(emu_task *t) nogil


# ---- constants exported to Python (the layout's one definition is layout.h) ----
PAGE_SHIFT = EMU_PAGE_SHIFT
PAGE_SIZE = EMU_PAGE_SIZE
PTRS_PER_TABLE = EMU_PTRS
MB_RING = EMU_MB_RING
PTE_PRESENT = EMU_PTE_PRESENT
PTE_RW = EMU_PTE_RW
PTE_USER = EMU_PTE_USER
PTE_ACCESSED = EMU_PTE_ACCESSED
PTE_DIRTY = EMU_PTE_DIRTY
PTE_PSE = EMU_PTE_PSE
PTE_PFN_MASK = EMU_PTE_PFN_MASK
PTE_HWPOISON = EMU_PTE_HWPOISON
PTE_S2_PRIVATE = EMU_PTE_S2_PRIVATE
PTE_SPECIAL = EMU_PTE_SPECIAL
PG_HEAD = EMU_PG_HEAD
PG_DIRTY = EMU_PG_DIRTY
PG_HWPOISON = EMU_PG_HWPOISON
INODE_FREE = EMU_INODE_FREE
INODE_SHMEM = EMU_INODE_SHMEM
INODE_GMEM = EMU_INODE_GMEM
INODE_HUGETLBFS = EMU_INODE_HUGETLBFS
INODE_KVM = EMU_INODE_KVM
INODE_EXT2 = EMU_INODE_EXT2
cdef enum:                      # sig_send's outcomes
    C_SEND_POSTED = 0
    C_SEND_PENDING = 1
SEND_POSTED, SEND_PENDING = C_SEND_POSTED, C_SEND_PENDING
TASK_FREE = EMU_TASK_FREE
TASK_ALIVE = EMU_TASK_ALIVE
TASK_DEAD = EMU_TASK_DEAD
ACC_OK = EMU_ACC_OK
ACC_FAULT = EMU_ACC_FAULT
ACC_MCE = EMU_ACC_MCE
ACC_BADPFN = EMU_ACC_BADPFN

cdef inline uint64_t _align(uint64_t x, uint64_t a):
    return (x + a - 1) & ~(a - 1)


def layout(uint64_t nframes, uint64_t ntasks, uint64_t nmms, uint64_t npt,
           uint64_t ninodes=1024, uint64_t nvmas=4096):
    """Offsets and sizes of the core segment: the one computation of the layout."""
    cdef uint64_t off = _align(sizeof(emu_header), 4096)
    d = {"off_frames": off}
    off = _align(off + nframes * sizeof(emu_frame), 4096)
    d["off_hwerr"] = off
    off = _align(off + nframes, 4096)
    d["off_tasks"] = off
    off = _align(off + ntasks * sizeof(emu_task), 4096)
    d["off_mms"] = off
    off = _align(off + nmms * sizeof(emu_mm), 4096)
    d["off_inodes"] = off
    off = _align(off + ninodes * sizeof(emu_inode), 4096)
    d["off_vmas"] = off
    off = _align(off + nvmas * sizeof(emu_vma), 4096)
    d["off_pt"] = off
    off = _align(off + npt * EMU_PTRS * 8, 4096)
    d["core_size"] = off
    d["phys_size"] = nframes * EMU_PAGE_SIZE
    d["sizeof_frame"] = sizeof(emu_frame)
    d["sizeof_task"] = sizeof(emu_task)
    d["ninodes"], d["nvmas"] = ninodes, nvmas
    d["sizeof_siginfo"] = sizeof(emu_siginfo)
    d["off_task_rcu_epoch"] = <size_t>&(<emu_task *>0).rcu_epoch
    return d


cdef inline bint _mb_pending(emu_task *t):
    return emu_ld32(&t.mb_tail) != t.mb_head


cdef inline bint _legacy_queue(emu_task *t, bint pending_elsewhere):
    """legacy_queue(): a SIGBUS already pending makes a new one a no-op."""
    return pending_elsewhere or _mb_pending(t)


cdef class Core:
    """Both segments mapped MAP_SHARED into this process."""
    cdef emu_ctx c
    cdef uint8_t *core_base
    cdef uint8_t *phys_base
    cdef readonly size_t core_size, phys_size
    cdef readonly bint owner
    cdef readonly bint worker_ro   # protect_worker() ran: kernel tables read-only here
    cdef object _pt_free        # supervisor only: free page-table pages
    cdef emu_inode *inodes_p
    cdef emu_vma *vmas_p
    cdef uint64_t _pt_next

    def __cinit__(self, int core_fd, size_t core_size, int phys_fd, size_t phys_size):
        cdef void *p
        self.core_base = NULL
        self.phys_base = NULL
        p = mmap(NULL, core_size, PROT_READ | PROT_WRITE, MAP_SHARED, core_fd, 0)
        if p == MAP_FAILED:
            raise OSError("mmap of the core segment failed")
        self.core_base = <uint8_t *>p
        self.core_size = core_size
        p = mmap(NULL, phys_size, PROT_READ | PROT_WRITE, MAP_SHARED, phys_fd, 0)
        if p == MAP_FAILED:
            munmap(self.core_base, core_size)
            self.core_base = NULL
            raise OSError("mmap of the phys segment failed")
        self.phys_base = <uint8_t *>p
        self.phys_size = phys_size
        self._pt_free = []
        self._pt_next = 1

    def __dealloc__(self):
        if self.core_base != NULL:
            munmap(self.core_base, self.core_size)
        if self.phys_base != NULL:
            munmap(self.phys_base, self.phys_size)

    cdef void _bind(self):
        cdef emu_header *h = <emu_header *>self.core_base
        self.c.hdr = h
        self.c.frames = <emu_frame *>(self.core_base + h.off_frames)
        self.c.hwerr = self.core_base + h.off_hwerr
        self.c.tasks = <emu_task *>(self.core_base + h.off_tasks)
        self.c.mms = <emu_mm *>(self.core_base + h.off_mms)
        self.c.pt = <uint64_t *>(self.core_base + h.off_pt)
        self.inodes_p = <emu_inode *>(self.core_base + h.off_inodes)
        self.vmas_p = <emu_vma *>(self.core_base + h.off_vmas)
        self.c.phys = self.phys_base
        self.c.nframes = h.nframes
        self.c.npt = h.npt
        self.c.ntasks = h.ntasks

    def format(self, uint64_t nframes, uint64_t ntasks, uint64_t nmms, uint64_t npt,
               int64_t supervisor_pid, uint64_t ninodes=1024,
               uint64_t nvmas=4096):
        """Supervisor: write the header of a fresh core segment."""
        cdef emu_header *h = <emu_header *>self.core_base
        cdef uint64_t i
        d = layout(nframes, ntasks, nmms, npt, ninodes, nvmas)
        if d["core_size"] > self.core_size or d["phys_size"] > self.phys_size:
            raise ValueError("segments too small for the layout")
        memset(h, 0, sizeof(emu_header))
        h.version = EMU_VERSION
        h.core_size = d["core_size"]
        h.phys_size = d["phys_size"]
        h.nframes, h.ntasks, h.nmms, h.npt = nframes, ntasks, nmms, npt
        h.off_frames, h.off_hwerr, h.off_tasks = d["off_frames"], d["off_hwerr"], d["off_tasks"]
        h.off_mms, h.off_pt = d["off_mms"], d["off_pt"]
        h.ninodes, h.nvmas = ninodes, nvmas
        h.off_inodes, h.off_vmas = d["off_inodes"], d["off_vmas"]
        h.epoch = 1
        h.supervisor_pid = supervisor_pid
        h.magic = EMU_MAGIC
        self._bind()
        for i in range(nvmas):
            self.vmas_p[i].mm = -1
        # the page-table pool is the kernel's hot write path: populate it now, so a
        # split or a big fault does not pay first-touch faults (frames stay lazy)
        madvise(self.core_base + h.off_pt, min(npt, 4096) * EMU_PTRS * 8, MADV_POPULATE_WRITE)
        # so is the frame table when it is small; a big one (a TiB guest) stays sparse,
        # and a huge folio's tail frames are faulted in the first time it is split
        if nframes * sizeof(emu_frame) <= (256 << 20):
            madvise(self.core_base + h.off_frames, nframes * sizeof(emu_frame), MADV_POPULATE_WRITE)
        self.owner = True

    def attach(self):
        """Worker: bind to a segment the supervisor formatted."""
        cdef emu_header *h = <emu_header *>self.core_base
        if h.magic != EMU_MAGIC or h.version != EMU_VERSION:
            raise OSError("not a gmem-emu core segment")
        self._bind()

    cdef void _protect(self, size_t start, size_t end, int prot) except *:
        import errno as _errno
        if end > start and mprotect(self.core_base + start, end - start, prot) != 0:
            raise OSError(_errno.EACCES, "mprotect of the core segment failed")

    def protect_worker(self):
        """Worker: map read-only what an emulated CPU never writes, so a stray store
        faults (SIGSEGV) instead of corrupting the kernel's tables.  A CPU writes
        page-table entries (A/D bits), frame contents and its own task slot; the
        header, struct pages, hwerr, mms, inodes and VMAs are the
        kernel's.  All task slots start read-only; bind_self opens the caller's."""
        cdef emu_header *h = self.c.hdr
        self._protect(0, h.off_tasks, PROT_READ)
        self._protect(h.off_tasks, h.off_mms, PROT_READ)
        self._protect(h.off_mms, h.off_pt, PROT_READ)
        self.worker_ro = True

    # ------------------------------------------------------------ header
    @property
    def nframes(self):
        return self.c.nframes

    @property
    def ntasks(self):
        return self.c.ntasks

    @property
    def nmms(self):
        return self.c.hdr.nmms

    @property
    def npt(self):
        return self.c.npt

    @property
    def supervisor_pid(self):
        return self.c.hdr.supervisor_pid

    @property
    def epoch(self):
        return emu_ld_epoch(self.c.hdr)

    @property
    def shutdown(self):
        return self.c.hdr.shutdown

    def set_shutdown(self):
        """Supervisor: mark an orderly exit, so workers' watchdogs let their process live."""
        self.c.hdr.shutdown = 1

    @property
    def panic_reason(self):
        """The reason the kernel panicked with, or None while it runs."""
        if not emu_ld64(&self.c.hdr.panicked):
            return None
        return (<bytes>self.c.hdr.panic_msg).decode("utf-8", "replace")

    def set_panic(self, reason):
        """Supervisor: the kernel panicked; the reason first, then the flag, so a
        worker that sees the flag reads the whole reason."""
        cdef bytes b = reason.encode("utf-8", "replace")[:255]
        memcpy(self.c.hdr.panic_msg, <const char *>b, len(b))
        self.c.hdr.panic_msg[len(b)] = 0
        emu_st64(&self.c.hdr.panicked, 1)

    def epoch_bump(self):
        """Supervisor: close a grace period; returns the epoch that was current."""
        cdef uint64_t e = self.c.hdr.epoch
        emu_st_epoch(self.c.hdr, e + 1)
        return e

    def quiescent_since(self, uint64_t epoch):
        """True when no task is still inside a read section begun at or before `epoch`."""
        cdef uint64_t i, e
        for i in range(self.c.ntasks):
            e = emu_ld_task_epoch(&self.c.tasks[i])
            if e != 0 and e <= epoch:
                return False
        return True

    # ------------------------------------------------------------ frames
    def frame(self, uint64_t pfn):
        cdef emu_frame *f = &self.c.frames[pfn]
        return (f.flags, f.refcount, f.mapcount, f.head, f.order, f.mapping, f.index, f.private_)

    def flags(self, uint64_t pfn):
        return self.c.frames[pfn].flags

    def set_flags(self, uint64_t pfn, uint64_t flags):
        self.c.frames[pfn].flags = flags

    def test_set_flag(self, uint64_t pfn, uint64_t bit):
        cdef uint64_t old = self.c.frames[pfn].flags
        self.c.frames[pfn].flags = old | bit
        return (old & bit) != 0

    def test_clear_flag(self, uint64_t pfn, uint64_t bit):
        cdef uint64_t old = self.c.frames[pfn].flags
        self.c.frames[pfn].flags = old & ~bit
        return (old & bit) != 0

    def refcount(self, uint64_t pfn):
        return self.c.frames[pfn].refcount

    def ref_add(self, uint64_t pfn, int d):
        self.c.frames[pfn].refcount += d
        return self.c.frames[pfn].refcount

    def frames_scan(self):
        """Supervisor (debug_vm): the pfns whose frame has flags, a refcount or a
        mapcount set, and those flagged EMU_PG_HWPOISON, in one pass over the table."""
        cdef uint64_t i
        cdef emu_frame *f
        busy, poisoned = [], []
        for i in range(self.c.nframes):
            f = &self.c.frames[i]
            if f.flags or f.refcount or f.mapcount:
                busy.append(i)
                if f.flags & EMU_PG_HWPOISON:
                    poisoned.append(i)
        return busy, poisoned

    def mapcount(self, uint64_t pfn):
        return self.c.frames[pfn].mapcount

    def map_add(self, uint64_t pfn, int d):
        self.c.frames[pfn].mapcount += d
        return self.c.frames[pfn].mapcount

    cdef inline uint64_t _head(self, uint64_t pfn):
        """compound_head(): a zero tail frame belongs to the aligned huge head."""
        cdef emu_frame *f = &self.c.frames[pfn]
        cdef emu_frame *h
        cdef uint64_t cand
        cdef int o
        if f.head or f.flags or f.refcount or f.order or f.mapping or f.mapcount:
            return f.head
        for o in (9, 18):
            cand = pfn & ~((1ULL << o) - 1)
            h = &self.c.frames[cand]
            if h.flags & EMU_PG_HEAD and h.order == <uint32_t>o and h.head == cand:
                return cand
        return pfn

    def head(self, uint64_t pfn):
        return self._head(pfn)

    def order(self, uint64_t pfn):
        return self.c.frames[pfn].order

    def mapping(self, uint64_t pfn):
        return self.c.frames[self._head(pfn)].mapping

    def index(self, uint64_t pfn):
        cdef uint64_t h = self._head(pfn)
        if h != pfn and self.c.frames[pfn].head == 0:     # a zero tail
            return self.c.frames[h].index + (pfn - h)
        return self.c.frames[pfn].index

    def set_private(self, uint64_t pfn, uint64_t v):
        self.c.frames[pfn].private_ = v

    def set_folio(self, uint64_t head, uint32_t order, uint64_t flags, int refcount,
                  uint32_t mapping, uint64_t index, bint clear_tails=False):
        """Make [head, head + 2**order) one folio.  Every tail frame points at the
        head, except for a huge folio (EMU_PG_HEAD, order 9 or 18): it is the head
        frame alone, its tails zero (cleared here only when asked: they are zero
        unless the folio was split before)."""
        cdef uint64_t i, n = 1ULL << order
        cdef emu_frame *f
        if (order == 9 or order == 18) and flags & EMU_PG_HEAD:
            if clear_tails:
                memset(&self.c.frames[head + 1], 0, (n - 1) * sizeof(emu_frame))
            f = &self.c.frames[head]
            f.head, f.order, f.mapping, f.index, f.mapcount, f.private_ = head, order, mapping, index, 0, 0
            f.flags, f.refcount = flags, refcount
            return
        for i in range(n):
            f = &self.c.frames[head + i]
            f.head = head
            f.order = order if i == 0 else 0
            f.mapping = mapping
            f.index = index + i
            f.mapcount = 0
            f.private_ = 0
            if i == 0:
                f.flags = flags
                f.refcount = refcount
            else:
                f.flags = flags & 0  # tail pages carry no folio flags
                f.refcount = 0

    def split_and_map(self, uint64_t head, uint32_t order, uint64_t flags, list maps):
        """Split a folio into order-0 folios and map each page with a 4K PTE in every
        (pgd, va, bits) of `maps`, touching each frame once.  A page's refcount is its
        page-cache reference plus one per mapping."""
        cdef uint64_t n = 1ULL << order
        cdef Py_ssize_t m = len(maps), k
        cdef uint64_t *arr
        cdef uint64_t *pgds
        cdef uint64_t *vas
        cdef uint64_t *bitss
        cdef uint64_t **ptes
        cdef uint32_t mapping = self.c.frames[head].mapping
        cdef uint64_t index0 = self.c.frames[head].index
        seen = set()
        need = sum(self.pt_missing(pgd_, va_, n, seen) for pgd_, va_, _b in maps)
        if need > self.pt_free:            # checked before any frame or entry changes
            raise MemoryError("page-table pool exhausted: the split needs %d pages, %d free"
                              % (need, self.pt_free))
        arr = <uint64_t *>PyMem_Malloc((4 * m + 1) * sizeof(uint64_t))
        if arr == NULL:
            raise MemoryError()
        pgds, vas, bitss, ptes = arr, arr + m, arr + 2 * m, <uint64_t **>(arr + 3 * m)
        try:
            for k in range(m):
                pgds[k], vas[k], bitss[k] = maps[k]
                ptes[k] = NULL
            self._split_map(head, n, flags, m, mapping, index0, pgds, vas, bitss, ptes)
        finally:
            PyMem_Free(arr)

    cdef int _split_map(self, uint64_t head, uint64_t n, uint64_t flags, Py_ssize_t m,
                        uint32_t mapping, uint64_t index0, uint64_t *pgds, uint64_t *vas,
                        uint64_t *bitss, uint64_t **ptes) except -1:
        cdef uint64_t i, va
        cdef Py_ssize_t k
        cdef uint64_t *slot
        cdef emu_frame *f
        cdef uintptr_t lo, hi
        # the tail frames of a huge folio were never written: fault them in at once
        lo = (<uintptr_t>&self.c.frames[head]) & ~(<uintptr_t>4095)
        hi = (<uintptr_t>&self.c.frames[head + n] + 4095) & ~(<uintptr_t>4095)
        madvise(<void *>lo, hi - lo, MADV_POPULATE_WRITE)
        for i in range(n):
            f = &self.c.frames[head + i]
            f.head = head + i
            f.order = 0
            f.flags = flags
            f.refcount = 1 + <int>m
            f.mapcount = <int>m
            f.mapping = mapping                  # zero tails become real pages
            f.index = index0 + i
            f.private_ = 0
            for k in range(m):
                va = vas[k] + (i << 12)
                if ptes[k] == NULL or (va & 0x1FFFFF) == 0:
                    slot = self._slot(pgds[k], va, 1, True)
                    ptes[k] = slot - ((va >> 12) & 511)
                emu_st64(ptes[k] + ((va >> 12) & 511), ((head + i) << EMU_PAGE_SHIFT) | bitss[k])
        return 0

    def set_mapping(self, uint64_t head, uint32_t mapping, uint64_t index):
        cdef uint64_t i, n = 1ULL << self.c.frames[head].order
        if self.c.frames[head].flags & EMU_PG_HEAD and n >= 512:    # zero tails follow
            n = 1
        for i in range(n):
            self.c.frames[head + i].mapping = mapping
            self.c.frames[head + i].index = index + i

    def hwerr(self, uint64_t pfn):
        return self.c.hwerr[pfn]

    def set_hwerr(self, uint64_t pfn, uint8_t v):
        emu_st8(&self.c.hwerr[pfn], v)

    # ------------------------------------------------------------ physmem
    def phys_read(self, uint64_t pfn, size_t off, size_t n):
        return PyBytes_FromStringAndSize(<char *>self.phys_base + (pfn << EMU_PAGE_SHIFT) + off, n)

    def phys_write(self, uint64_t pfn, size_t off, const uint8_t[::1] data):
        if data.shape[0]:
            memcpy(self.phys_base + (pfn << EMU_PAGE_SHIFT) + off, &data[0], data.shape[0])

    def phys_zero(self, uint64_t pfn, uint64_t npages=1):
        memset(self.phys_base + (pfn << EMU_PAGE_SHIFT), 0, npages << EMU_PAGE_SHIFT)

    def phys_populate(self, uint64_t pfn, uint64_t npages=1):
        """Supervisor: fault the host memory behind frames in now (MADV_POPULATE_WRITE:
        contents unchanged), so zeroing a never-used frame later is a plain memset,
        not a first-touch page fault (~3 us in these VMs).  Before Linux 5.14 the
        advice is unknown and this does nothing."""
        if pfn + npages > self.c.nframes:
            raise ValueError("pfn range beyond RAM")
        with nogil:
            madvise(self.phys_base + (pfn << EMU_PAGE_SHIFT), npages << EMU_PAGE_SHIFT,
                    MADV_POPULATE_WRITE)

    def phys_copy(self, uint64_t dst, uint64_t src, uint64_t npages=1):
        memcpy(self.phys_base + (dst << EMU_PAGE_SHIFT), self.phys_base + (src << EMU_PAGE_SHIFT),
               npages << EMU_PAGE_SHIFT)

    # ------------------------------------------------------------ page tables
    def pt_alloc(self):
        """Supervisor: a zeroed page-table page (index into the pool)."""
        cdef uint64_t idx
        if self._pt_free:
            idx = self._pt_free.pop()
        else:
            if self._pt_next >= self.c.npt:
                raise MemoryError("page-table pool exhausted")
            idx = self._pt_next
            self._pt_next += 1
        memset(self.c.pt + idx * EMU_PTRS, 0, EMU_PTRS * 8)
        return idx

    def pt_release(self, idxs):
        """Supervisor: return page-table pages whose grace period has ended."""
        self._pt_free.extend(idxs)

    @property
    def pt_used(self):
        return self._pt_next - 1 - len(self._pt_free)

    @property
    def pt_free(self):
        """Page-table pages pt_alloc can still hand out."""
        return self.c.npt - self._pt_next + len(self._pt_free)

    def pt_missing(self, uint64_t pgd, uint64_t va, uint64_t npages, set seen=None):
        """How many page-table pages mapping [va, va + npages 4K pages) with 4K PTEs
        would allocate (pte_set/split_and_map), so a caller can check up front.
        `seen` collects the missing tables across calls (one mm may appear twice)."""
        cdef uint64_t a = va & ~(<uint64_t>0x1FFFFF), end = va + (npages << EMU_PAGE_SHIFT)
        cdef int level, lvl
        cdef uint64_t *slot
        if seen is None:
            seen = set()
        n0 = len(seen)
        while a < end:
            slot = emu_walk(&self.c, pgd, a, &level)
            if slot != NULL and level > 1:
                # (a huge leaf there is cleared before the split) tables below `level` are missing: one per level, shared by the range
                for lvl in range(level - 1, 0, -1):
                    seen.add((pgd, lvl, a >> (12 + 9 * lvl)))
            a += 0x200000
        return len(seen) - n0

    def walk(self, uint64_t pgd, uint64_t va):
        """(entry, level) of the entry that decides va; level 1=PTE, 2=PMD, 3=PUD, 4=PGD."""
        cdef int level = 0
        cdef uint64_t *slot = emu_walk(&self.c, pgd, va, &level)
        if slot == NULL:
            return (0, 0)
        return (emu_ld64(slot), level)

    cdef uint64_t *_slot(self, uint64_t pgd, uint64_t va, int level, bint alloc) except? NULL:
        cdef uint64_t *tbl = self.c.pt + pgd * EMU_PTRS
        cdef uint64_t *slot
        cdef uint64_t e, idx
        cdef int lvl, shift = 39
        for lvl in range(4, level - 1, -1):
            slot = tbl + ((va >> shift) & (EMU_PTRS - 1))
            if lvl == level:
                return slot
            e = slot[0]
            if not (e & EMU_PTE_PRESENT):
                if not alloc:
                    return NULL
                idx = self.pt_alloc()
                emu_st64(slot, (idx << EMU_PAGE_SHIFT) | EMU_PTE_PRESENT | EMU_PTE_RW | EMU_PTE_USER)
                e = slot[0]
            elif e & EMU_PTE_PSE:
                raise ValueError("a huge leaf is in the way")
            tbl = self.c.pt + ((e & EMU_PTE_PFN_MASK) >> EMU_PAGE_SHIFT) * EMU_PTRS
            shift -= 9
        return NULL

    def pte_set(self, uint64_t pgd, uint64_t va, uint64_t entry, int level=1):
        """Supervisor: install a leaf (or hwpoison) entry at `level`, allocating tables."""
        cdef uint64_t *slot = self._slot(pgd, va, level, True)
        emu_st64(slot, entry)

    def pte_get(self, uint64_t pgd, uint64_t va, int level=1):
        cdef uint64_t *slot = self._slot(pgd, va, level, False)
        return 0 if slot == NULL else emu_ld64(slot)

    def pte_pfn(self, uint64_t pgd, uint64_t va, int level=1):
        """The pfn a present entry at `level` maps, else -1 (rmap's page_vma_mapped_walk)."""
        cdef uint64_t *slot = self._slot(pgd, va, level, False)
        cdef uint64_t e
        if slot == NULL:
            return -1
        e = emu_ld64(slot)
        return <int64_t>((e & EMU_PTE_PFN_MASK) >> EMU_PAGE_SHIFT) if e & EMU_PTE_PRESENT else -1

    def pte_xchg(self, uint64_t pgd, uint64_t va, uint64_t entry, int level=1):
        """Supervisor: ptep_get_and_clear-style exchange; returns the old entry with
        the final A/D bits the CPUs set."""
        cdef uint64_t *slot = self._slot(pgd, va, level, entry != 0)
        if slot == NULL:
            return 0
        return emu_xchg64(slot, entry)

    def pte_zap(self, uint64_t pgd, uint64_t va, bint poison=False, int level=1):
        """Supervisor: the table half of zapping one entry (zap_pte_range,
        try_to_unmap_one): clear it, or with `poison` make it a hwpoison entry for the
        page it mapped (make_hwpoison_entry); if a page was mapped, move the entry's
        dirty bit to its folio and drop the page's mapcount and the folio's
        reference.  Returns (old entry, head, references left), head -1 when no page
        was mapped (or a special entry, whose page the mm does not count): the
        caller frees the folio at 0."""
        cdef uint64_t *slot = self._slot(pgd, va, level, False)
        cdef uint64_t old, head
        if slot == NULL:
            return 0, -1, 0
        old = self._zap(slot, poison)
        if not old & EMU_PTE_PRESENT or old & EMU_PTE_SPECIAL:
            return old, -1, 0
        head = self._head((old & EMU_PTE_PFN_MASK) >> EMU_PAGE_SHIFT)
        return old, head, self.c.frames[head].refcount

    cdef uint64_t _zap(self, uint64_t *slot, bint poison):
        cdef uint64_t old, new = 0, pfn, head
        old = emu_ld64(slot)              # only the supervisor writes the pfn bits
        if poison and old & EMU_PTE_PRESENT and not old & EMU_PTE_SPECIAL:
            new = (old & EMU_PTE_PFN_MASK) | EMU_PTE_HWPOISON
        old = emu_xchg64(slot, new)       # the final A/D bits the CPUs set
        if old & EMU_PTE_PRESENT and not old & EMU_PTE_SPECIAL:
            pfn = (old & EMU_PTE_PFN_MASK) >> EMU_PAGE_SHIFT
            head = self._head(pfn)
            if old & EMU_PTE_DIRTY:
                self.c.frames[head].flags |= EMU_PG_DIRTY
            self.c.frames[pfn].mapcount -= 1
            self.c.frames[head].refcount -= 1
        return old

    # ------------------------------------------------------------ rmap over i_mmap
    def i_mmap_set(self, int islot, slots):
        """Supervisor: mirror a file's i_mmap (VMA slots, in vm_pgoff order) as a chain."""
        cdef int32_t *link = &self.inodes_p[islot].i_mmap
        cdef int s
        for s in slots:
            link[0] = s + 1
            link = &self.vmas_p[s].i_mmap_next
        link[0] = 0

    def vma_address(self, int islot, uint64_t index):
        """vma_interval_tree_foreach(vma, &mapping->i_mmap, index, index): (mm slot,
        address of index) for every VMA of the file covering it, in i_mmap order."""
        cdef int32_t s = self.inodes_p[islot].i_mmap
        cdef emu_vma *v
        out = []
        while s:
            v = &self.vmas_p[s - 1]
            if v.mm >= 0 and v.pgoff <= index and index - v.pgoff < (v.end - v.start) >> EMU_PAGE_SHIFT:
                out.append((v.mm, v.start + ((index - v.pgoff) << EMU_PAGE_SHIFT)))
            s = v.i_mmap_next
        return out

    def rmap_file(self, int islot, uint64_t head, uint64_t index, uint64_t nr, int level):
        """rmap_walk_file: (vma slot, va, pfn) for every entry at `level` that maps one of
        the nr pages of the folio at head (file offset index), in i_mmap order."""
        return self._rmap(islot, head, index, nr, level, False, False)

    def unmap_file(self, int islot, uint64_t head, uint64_t index, uint64_t nr, int level,
                   bint hwpoison, sends=None):
        """try_to_unmap of a file folio: zap every entry rmap_file finds; with
        `hwpoison` a page flagged PG_hwpoison keeps a hwpoison entry.  Then, with
        `sends` (mailbox records (slot, tid, signo, code, addr, lsb, pid, seq)), send
        each as sig_send does, in the same call: signals decided before the unmap
        leave the moment the PTEs are gone.  Returns (entries zapped: (vma slot, va,
        pfn, poisoned, references left on the folio), CLOCK_MONOTONIC after the last
        zap, sig_send's result per record); the caller frees the folio at 0."""
        zapped = self._rmap(islot, head, index, nr, level, True, hwpoison)
        cdef uint64_t done = emu_now_ns()
        sent = []
        if sends:
            for slot, tid, signo, code, addr, lsb, pid, seq in sends:
                sent.append(self._send(slot, tid, signo, code, addr, lsb, pid, seq))
        return zapped, done, sent

    cdef list _rmap(self, int islot, uint64_t head, uint64_t index, uint64_t nr, int level,
                    bint zap, bint hwpoison):
        cdef int32_t s = self.inodes_p[islot].i_mmap
        cdef emu_vma *v
        cdef uint64_t i, stop, va, pfn, e, *slot
        cdef bint poison
        out = []
        while s:
            v = &self.vmas_p[s - 1]
            if v.mm < 0:                  # unlinked, its i_mmap not yet re-synced
                s = v.i_mmap_next
                continue
            i = index if index > v.pgoff else v.pgoff
            stop = v.pgoff + ((v.end - v.start) >> EMU_PAGE_SHIFT)
            if stop > index + nr:
                stop = index + nr
            while i < stop:
                va = v.start + ((i - v.pgoff) << EMU_PAGE_SHIFT)
                pfn = head + i - index
                slot = self._slot(self.c.mms[v.mm].pgd, va, level, False)
                if slot != NULL:
                    e = emu_ld64(slot)
                    if e & EMU_PTE_PRESENT and (e & EMU_PTE_PFN_MASK) >> EMU_PAGE_SHIFT == pfn:
                        if not zap:
                            out.append((s - 1, va, pfn))
                        else:
                            poison = hwpoison and self.c.frames[pfn].flags & EMU_PG_HWPOISON != 0
                            self._zap(slot, poison)
                            out.append((s - 1, va, pfn, poison,
                                        self.c.frames[self._head(pfn)].refcount))
                i += 1
            s = v.i_mmap_next
        return out

    def pte_clear_ad(self, uint64_t pgd, uint64_t va, uint64_t bits, int level=1):
        """Supervisor: atomically clear A/D bits (folio_mkclean); returns the old entry."""
        cdef uint64_t *slot = self._slot(pgd, va, level, False)
        if slot == NULL:
            return 0
        return emu_and64(slot, ~bits)

    def pt_scan(self, uint64_t pgd, uint64_t start, uint64_t end):
        """Supervisor: list of (va, entry, level) for every non-zero leaf in [start, end)."""
        out = []
        cdef uint64_t va = start, e, step
        cdef int level
        cdef uint64_t *slot
        while va < end:
            slot = emu_walk(&self.c, pgd, va, &level)
            step = 1ULL << (12 + 9 * (level - 1))
            if slot != NULL:
                e = emu_ld64(slot)
                if e != 0 and (level == 1 or (e & EMU_PTE_PSE) or (e & EMU_PTE_HWPOISON)):
                    out.append((va & ~(step - 1), e, level))
            va = (va & ~(step - 1)) + step
        return out

    def pt_detach(self, uint64_t pgd, uint64_t va, int level):
        """Supervisor, before a huge leaf goes in at `level`: unhook the lower page
        table the entry there points to (an empty one: its mappings went with a
        munmap, which free_pgtables would have freed, or with KVM's zap before it
        replaces a non-leaf SPTE with a huge one).  Returns the table pages taken
        out, for defer_pt_free; [] if the entry is no table.  ValueError, changing
        nothing, if a leaf below is still set."""
        cdef uint64_t *slot = self._slot(pgd, va, level, False)
        cdef uint64_t e, idx, size
        if slot == NULL or level < 2:
            return []
        e = emu_ld64(slot)
        if not (e & EMU_PTE_PRESENT) or (e & EMU_PTE_PSE):
            return []
        size = 1ULL << (12 + 9 * (level - 1))
        if self.pt_scan(pgd, va & ~(size - 1), (va & ~(size - 1)) + size):
            raise ValueError("pt_detach: a table under a huge leaf still maps pages")
        idx = (e & EMU_PTE_PFN_MASK) >> EMU_PAGE_SHIFT
        out = [idx]
        self._collect(idx, level - 1, out)
        emu_st64(slot, 0)
        return out

    def pt_tables(self, uint64_t pgd):
        """Supervisor: every page-table page reachable from pgd (for teardown)."""
        out = [pgd]
        self._collect(pgd, 4, out)
        return out

    cdef void _collect(self, uint64_t tbl, int level, list out):
        cdef uint64_t i, e, idx
        if level == 1:
            return
        for i in range(EMU_PTRS):
            e = self.c.pt[tbl * EMU_PTRS + i]
            if (e & EMU_PTE_PRESENT) and not (e & EMU_PTE_PSE):
                idx = (e & EMU_PTE_PFN_MASK) >> EMU_PAGE_SHIFT
                out.append(idx)
                self._collect(idx, level - 1, out)

    # ------------------------------------------------------------ tasks & mms
    def task_init(self, int slot, int tid, int tgid, int mm, bytes comm):
        cdef emu_task *t = &self.c.tasks[slot]
        memset(t, 0, sizeof(emu_task))
        t.tid, t.tgid, t.mm = tid, tgid, mm
        memcpy(t.comm, <char *>comm, min(len(comm), 15))
        emu_sti32(&t.state, EMU_TASK_ALIVE)

    def task_set(self, int slot, str field, int64_t v):
        cdef emu_task *t = &self.c.tasks[slot]
        if field == "state":
            t.state = <int32_t>v
        elif field == "mce_flags":
            t.mce_flags = <uint32_t>v
        elif field == "group_exit_sig":
            t.group_exit_sig = <int32_t>v
        elif field == "rcu_epoch":
            t.rcu_epoch = <uint64_t>v
        elif field == "tgid":
            t.tgid = <int32_t>v
        else:
            raise KeyError(field)

    def task(self, int slot):
        cdef emu_task *t = &self.c.tasks[slot]
        return {"tid": t.tid, "tgid": t.tgid, "state": t.state, "mm": t.mm,
                "mce_flags": t.mce_flags, "exit_sig": t.exit_sig, "rcu_epoch": t.rcu_epoch,
                "mb_head": t.mb_head, "mb_tail": t.mb_tail,
                "comm": t.comm[:15].split(b"\0", 1)[0].decode(errors="replace")}

    def task_exit_sig(self, int slot):
        return self.c.tasks[slot].exit_sig

    def sig_pending(self, int slot):
        """True while a mailbox record waits for the task to dequeue it."""
        return _mb_pending(&self.c.tasks[slot])

    def legacy_queue(self, int slot, bint pending_elsewhere=False):
        """kernel/signal.c legacy_queue(): True if a new SIGBUS-class (legacy,
        non-queueing) signal for the task is to be dropped, because one is already
        pending: in its mailbox, or (`pending_elsewhere`) on the reply current's
        signals ride.  The one definition of the rule: sig_send and
        unmap_file's sends apply it to other threads, Signals._queue to current."""
        return _legacy_queue(&self.c.tasks[slot], pending_elsewhere)

    cdef bint _mb_post(self, int slot, int signo, int code, uint64_t addr, int lsb, int pid,
                       uint64_t seq):
        """Queue one siginfo record in a task's mailbox; False if the ring is full."""
        cdef emu_task *t = &self.c.tasks[slot]
        cdef uint32_t h = t.mb_head
        cdef emu_siginfo *r
        if h - emu_ld32(&t.mb_tail) >= EMU_MB_RING:
            return False
        r = &t.mb[h % EMU_MB_RING]
        memset(r, 0, sizeof(emu_siginfo))
        r.signo, r.code, r.addr, r.addr_lsb, r.pid, r.seq = signo, code, addr, lsb, pid, seq
        r.ts_ns = emu_now_ns()
        emu_st32(&t.mb_head, h + 1)
        return True

    cdef tuple _send(self, int slot, int tid, int signo, int code, uint64_t addr, int lsb,
                     int pid, uint64_t seq):
        if _legacy_queue(&self.c.tasks[slot], False):   # so the ring always has room
            return C_SEND_PENDING, 0, 0
        return (C_SEND_POSTED,) + self._post(slot, tid, signo, code, addr, lsb, pid, seq)

    cdef object _post(self, int slot, int tid, int signo, int code, uint64_t addr, int lsb,
                      int pid, uint64_t seq):
        cdef uint64_t rung
        if not self._mb_post(slot, signo, code, addr, lsb, pid, seq):
            return None
        rung = emu_now_ns()
        return rung, emu_tgkill(tid, tid, signo)

    def sig_send(self, int slot, int tid, int signo, int code, uint64_t addr, int lsb,
                 int pid, uint64_t seq):
        """Supervisor: send a SIGBUS-class (legacy, non-queueing) signal to another
        thread: dropped while one is still pending (legacy_queue), else sig_post.
        Returns (SEND_POSTED, doorbell_ns, tgkill's 0 or -errno) or (SEND_PENDING, 0, 0)."""
        return self._send(slot, tid, signo, code, addr, lsb, pid, seq)

    def sig_post(self, int slot, int tid, int signo, int code, uint64_t addr, int lsb,
                 int pid, uint64_t seq):
        """Supervisor: deliver to another thread: queue the siginfo record in its
        mailbox and ring the doorbell (a SIGBUS directed at the thread).  Returns
        (doorbell_ns, tgkill's 0 or -errno), or None if the mailbox is full."""
        return self._post(slot, tid, signo, code, addr, lsb, pid, seq)

    def mm_init(self, int slot, uint64_t pgd):
        cdef emu_mm *m = &self.c.mms[slot]
        m.pgd = pgd
        m.users = 1
        m.state = 1

    def mm_clear(self, int slot):
        memset(&self.c.mms[slot], 0, sizeof(emu_mm))

    # ------------------------------------------------------------ inodes & VMAs
    @property
    def ninodes(self):
        return self.c.hdr.ninodes

    @property
    def nvmas(self):
        return self.c.hdr.nvmas

    def inode_set(self, int slot, uint32_t ino, uint32_t kind, uint64_t size, uint64_t flags,
                  uint64_t nrpages, int nlink, bytes name):
        cdef emu_inode *i = &self.inodes_p[slot]
        i.ino, i.kind, i.size, i.flags, i.nrpages, i.nlink = ino, kind, size, flags, nrpages, nlink
        memset(i.name, 0, 32)
        memcpy(i.name, <char *>name, min(len(name), 31))

    def inode_clear(self, int slot):
        memset(&self.inodes_p[slot], 0, sizeof(emu_inode))

    def inodes(self):
        """Every live inode: (slot, ino, kind, size, flags, nrpages, nlink, name)."""
        cdef uint64_t s
        cdef emu_inode *i
        out = []
        for s in range(self.c.hdr.ninodes):
            i = &self.inodes_p[s]
            if i.kind:
                out.append((s, i.ino, i.kind, i.size, i.flags, i.nrpages, i.nlink,
                            i.name[:31].split(b"\0", 1)[0].decode(errors="replace")))
        return out

    def vma_set(self, int slot, int mm, uint64_t start, uint64_t end, uint32_t prot,
                bint shared, uint32_t ino, uint64_t pgoff):
        cdef emu_vma *v = &self.vmas_p[slot]
        v.start, v.end, v.prot, v.shared, v.ino, v.pgoff = start, end, prot, shared, ino, pgoff
        v.mm = mm

    def vma_clear(self, int slot):
        self.vmas_p[slot].mm = -1

    def vmas(self, int mm=-1):
        """VMAs of one mm (or all): (mm, start, end, prot, shared, ino, pgoff), by address."""
        cdef uint64_t s
        cdef emu_vma *v
        out = []
        for s in range(self.c.hdr.nvmas):
            v = &self.vmas_p[s]
            if v.mm >= 0 and (mm < 0 or v.mm == mm):
                out.append((v.mm, v.start, v.end, v.prot, bool(v.shared), v.ino, v.pgoff))
        out.sort()
        return out

    # ------------------------------------------------------------ worker: the CPU
    def access_read(self, int slot, uint64_t pgd, uint64_t va, uint8_t[::1] buf, int priv=-1):
        """Copy len(buf) bytes of user memory at va into buf.
        Returns (done, status, xva, xpfn)."""
        cdef int status = 0
        cdef uint64_t xva = 0, xpfn = 0
        cdef size_t done, n = buf.shape[0]
        if n == 0:
            return (0, EMU_ACC_OK, 0, 0)
        with nogil:
            done = emu_access(&self.c, &self.c.tasks[slot], pgd, va, &buf[0], n, 0, priv,
                              &status, &xva, &xpfn)
        return (done, status, xva, xpfn)

    def access_write(self, int slot, uint64_t pgd, uint64_t va, const uint8_t[::1] buf,
                     int priv=-1):
        """Copy buf into user memory at va.  Returns (done, status, xva, xpfn)."""
        cdef int status = 0
        cdef uint64_t xva = 0, xpfn = 0
        cdef size_t done, n = buf.shape[0]
        if n == 0:
            return (0, EMU_ACC_OK, 0, 0)
        with nogil:
            done = emu_access(&self.c, &self.c.tasks[slot], pgd, va, <uint8_t *>&buf[0], n, 1,
                              priv, &status, &xva, &xpfn)
        return (done, status, xva, xpfn)

    def access_batch(self, int slot, uint64_t pgd, const uint64_t[::1] addrs, size_t start,
                     size_t size, const uint8_t[::1] buf, bint write, int priv=-1):
        """`size` bytes at each address from addrs[start:], packed in buf.
        Returns (next_index, status, xva, xpfn, partial_bytes)."""
        cdef int status = 0
        cdef uint64_t xva = 0, xpfn = 0
        cdef size_t nxt, partial = 0, m = addrs.shape[0]
        if m == 0 or start >= m:
            return (m, EMU_ACC_OK, 0, 0, 0)
        if <size_t>buf.shape[0] < m * size:
            raise ValueError("buffer too small")
        with nogil:
            nxt = emu_access_batch(&self.c, &self.c.tasks[slot], pgd, &addrs[0], start, m,
                                   size, <uint8_t *>&buf[0], write, priv, &status, &xva, &xpfn,
                                   &partial)
        return (nxt, status, xva, xpfn, partial)

    def soft_walk_loop(self, uint64_t pgd, const uint64_t[::1] addrs, size_t size, uint8_t[::1] buf):
        """Benchmark baseline: the fast path's walk (same walk cache, same look-ahead
        prefetch) and copy, without its checks.  Returns the accesses done."""
        cdef size_t r
        if <size_t>buf.shape[0] < <size_t>addrs.shape[0] * size:
            raise ValueError("buffer too small")
        with nogil:
            r = emu_soft_walk_loop(&self.c, pgd, &addrs[0], addrs.shape[0], size, &buf[0])
        return r

    def access_batch_ablate(self, int slot, uint64_t pgd, const uint64_t[::1] addrs, size_t size,
                            uint8_t[::1] buf, unsigned skip, bint write=False, int priv=-1):
        """Benchmark ablation: access_batch with the work in `skip` (EMU_SKIP_* bits:
        1 poison check, 2 A/D update, 4 present/permission/bound checks, 8 rcu
        section) left out.  Not for use on tables that can fault."""
        cdef size_t r
        if skip > 15 or <size_t>buf.shape[0] < <size_t>addrs.shape[0] * size:
            raise ValueError("bad skip or buffer too small")
        with nogil:
            r = emu_access_batch_ablate(&self.c, &self.c.tasks[slot], pgd, &addrs[0],
                                        addrs.shape[0], size, &buf[0], write, priv, skip)
        return r

    def info(self):
        """Offsets a pure-Python reader needs (the layout itself stays in layout.h)."""
        cdef emu_header *h = self.c.hdr
        return {"nframes": h.nframes, "npt": h.npt, "ntasks": h.ntasks, "off_pt": h.off_pt,
                "off_hwerr": h.off_hwerr, "off_tasks": h.off_tasks,
                "off_frames": h.off_frames, "sizeof_frame": sizeof(emu_frame),
                "off_epoch": <size_t>&(<emu_header *>0).epoch,
                "sizeof_task": sizeof(emu_task),
                "off_task_rcu_epoch": <size_t>&(<emu_task *>0).rcu_epoch}

    def views(self):
        """Raw memoryviews of (core, phys) for the pure-Python reference and tests."""
        return (memoryview(<uint8_t[:self.core_size]> self.core_base),
                memoryview(<uint8_t[:self.phys_size]> self.phys_base))

    # ------------------------------------------------------------ worker: signals
    def bind_self(self, int slot):
        """Worker: this process is task `slot`; the signal handler uses its mailbox.
        With protect_worker, only the pages holding this slot are writable (a page
        may hold a few neighbouring slots too: emu_task is not page-sized)."""
        global emu_self_task, emu_supervisor_pid
        cdef emu_header *h = self.c.hdr
        cdef size_t a, b
        if slot < 0 or <uint64_t>slot >= h.ntasks:
            raise OSError(22, "task slot %d out of range" % slot)
        if self.worker_ro:
            a = h.off_tasks + <size_t>slot * sizeof(emu_task)
            b = a + sizeof(emu_task)
            self._protect(h.off_tasks, h.off_mms, PROT_READ)
            self._protect(a & ~(<size_t>4095), (b + 4095) & ~(<size_t>4095), PROT_READ | PROT_WRITE)
        emu_self_task = &self.c.tasks[slot]
        emu_supervisor_pid = <int>self.c.hdr.supervisor_pid

    def set_exit_sig(self, int slot, int sig):
        self.c.tasks[slot].exit_sig = sig


def unbind_self():
    """After fork: this process is no task (yet); never touch the parent's mailbox."""
    global emu_self_task
    emu_self_task = NULL


def install_sigbus():
    """Install the C SA_SIGINFO recorder for SIGBUS (after signal.signal(SIGBUS, py))."""
    if emu_install_sigbus() != 0:
        raise OSError("sigaction(SIGBUS) failed")


def install_group_exit(int sig):
    if emu_install_group_exit(sig) != 0:
        raise OSError("sigaction failed")


def pop_siginfo():
    """Next recorded siginfo as a tuple (signo, code, errno, pid, addr, addr_lsb, ts_ns), or None."""
    cdef emu_siginfo r
    if not emu_lpop(&r):
        return None
    return (r.signo, r.code, r.errno_, r.pid, r.addr, r.addr_lsb, r.ts_ns)


def raise_self(int signo, int code, uint64_t addr, int lsb, bint check=True):
    """Raise a kernel-style signal on the calling thread; run Python handlers now."""
    cdef int r = emu_raise_self(signo, code, addr, lsb)
    if r < 0:
        raise OSError(-r, "rt_tgsigqueueinfo failed")
    if check:
        PyErr_CheckSignals()
        # A pending exception from a handler propagates from here.


def tgkill(int tgid, int tid, int sig):
    """Thread-directed doorbell; returns 0 or -errno."""
    return emu_tgkill(tgid, tid, sig)





cdef extern from "<sys/mman.h>":
    int MAP_PRIVATE, MAP_ANONYMOUS, MADV_NOHUGEPAGE


cdef class HwMem:
    """Benchmark baseline: a real anonymous mmap of `length` bytes, read with the
    CPU's own MMU (no emulation).  4 KiB pages (MADV_NOHUGEPAGE), like the
    emulator's; every page written first so it is resident."""
    cdef uint8_t *mem
    cdef readonly size_t length

    def __cinit__(self, size_t length):
        cdef void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            raise OSError("mmap")
        madvise(p, length, MADV_NOHUGEPAGE)
        self.mem = <uint8_t *>p
        self.length = length
        memset(p, 0x5a, length)

    def __dealloc__(self):
        if self.mem != NULL:
            munmap(self.mem, self.length)

    def load(self, size_t off, const uint8_t[::1] data):
        """Copy data in at off (to give it the same bytes as the emulated memory)."""
        if off + <size_t>data.shape[0] > self.length:
            raise ValueError("out of range")
        memcpy(self.mem + off, &data[0], data.shape[0])

    def read_batch(self, uint64_t base, const uint64_t[::1] addrs, size_t size, uint8_t[::1] buf):
        """`size` bytes at each addrs[i] - base, packed in buf; returns the sum of
        the 8-byte words loaded (so that no load is dropped)."""
        cdef uint64_t r
        cdef size_t i, m = addrs.shape[0]
        if <size_t>buf.shape[0] < m * size:
            raise ValueError("buffer too small")
        for i in range(m):
            if addrs[i] < base or addrs[i] - base + (size if size > 8 else 8) > self.length:
                raise ValueError("address out of range")
        with nogil:
            r = emu_hw_loop(self.mem, base, &addrs[0], m, size, &buf[0])
        return r


def hw_first_touch(size_t length, size_t stride=4096):
    """Benchmark baseline: ns to map `length` bytes of shared anonymous memory
    (shmem, as a guest_memfd is) and write 8 bytes to each page in order, the
    host kernel faulting each page in; then unmap."""
    cdef uint64_t t0, t1
    cdef size_t off
    cdef uint8_t *m
    cdef void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
    if p == MAP_FAILED:
        raise OSError("mmap")
    m = <uint8_t *>p
    with nogil:
        t0 = emu_now_ns()
        off = 0
        while off < length:
            (<uint64_t *>(m + off))[0] = off
            off += stride
        t1 = emu_now_ns()
    munmap(p, length)
    return t1 - t0


def fill_entries(size_t n, size_t record):
    """Benchmark baseline, kernel-shaped work of splitting a folio of n pages:
    write n 8-byte page-table entries (pfn | flags) and n `record`-byte per-page
    descriptors (struct page is 64 bytes), into fresh memory already resident.
    Returns the ns the writes took."""
    cdef uint64_t t0, t1, i
    cdef uint64_t *pte = <uint64_t *>PyMem_Malloc(n * 8)
    cdef uint8_t *desc = <uint8_t *>PyMem_Malloc(n * record)
    if pte == NULL or desc == NULL:
        PyMem_Free(pte); PyMem_Free(desc)
        raise MemoryError()
    memset(pte, 0, n * 8)
    memset(desc, 0, n * record)
    with nogil:
        t0 = emu_now_ns()
        for i in range(n):
            pte[i] = (i << 12) | 0x67
            memset(desc + i * record, 0, record)
            (<uint64_t *>(desc + i * record))[0] = i
        t1 = emu_now_ns()
    PyMem_Free(pte)
    PyMem_Free(desc)
    return t1 - t0
