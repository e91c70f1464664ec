"""Address spaces: VMAs, page faults, zapping, fork (mm/memory.c, mm/mmap.c in
miniature).  Reverse mapping is rmap.py (mm/rmap.c), migration migrate.py
(mm/migrate.c), HugeTLB faults hugetlb_fault.py: mixins and helpers of MM.

Page tables live in the shared-memory core; the workers' MMU walks them.  Here
the kernel fills them on faults and tears them down on munmap/madvise/unmap.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .. import _core as C
from .. import uapi as u
from . import hugetlb_fault
from .migrate import Migrate
from .mm_types import (  # noqa: F401  (re-exported: the fault handlers' return codes)
    VM_FAULT_HWPOISON,
    VM_FAULT_HWPOISON_LARGE,
    VM_FAULT_OK,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
)
from .page_alloc import (
    PAGE_SHIFT,
    PAGE_SIZE,
    ZERO_PFN,
    PG_anon,
    PG_dirty,
    PG_hugetlb,
    PG_hwpoison,
    PG_lru,
    PG_swapbacked,
    PG_uptodate,
)
from .rmap import Rmap

TASK_SIZE = 1 << 47
MMAP_BASE = 0x7F0000000000
MAP_NORESERVE = 0x4000
MMAP_MIN = 0x10000


_LEAF_PROT = C.PTE_PRESENT | C.PTE_USER
_ANON_FLAGS = PG_anon | PG_lru | PG_swapbacked | PG_uptodate
_COW_STACK = ("copy_mc_enhanced_fast_string", "copy_mc_to_kernel", "copy_mc_user_highpage",
              "handle_mm_fault", "do_user_addr_fault", "exc_page_fault")


def page_align(x: int) -> int:
    return (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


@dataclass(eq=False, slots=True)
class Vma:
    """vm_area_struct."""

    mm: Mm
    start: int
    end: int
    prot: int
    shared: bool
    file: object | None = None     # struct file (emu.kernel.fs.File)
    pgoff: int = 0
    slot: int = -1                 # row in the core's VMA table
    # vma->anon_vma: set once the VMA holds an anonymous page of its own (an anonymous
    # write fault, a copy-on-write, a private HugeTLB fault), never for the zero
    # page; fork copies the page tables of such VMAs only (vma_needs_copy)
    anon_vma: bool = False
    locked: int = 0                # VM_LOCKED | VM_LOCKONFAULT (emu.kernel.mlock)
    resv: object = None            # a private HugeTLB VMA's resv_map (hugetlb_fault.ResvMap)

    @property
    def inode(self):
        return self.file.inode if self.file is not None else None

    def covers_index(self, index: int) -> bool:
        return self.pgoff <= index < self.pgoff + ((self.end - self.start) >> PAGE_SHIFT)

    def addr_of(self, index: int) -> int:
        return self.start + ((index - self.pgoff) << PAGE_SHIFT)


@dataclass(eq=False, slots=True)
class Mm:
    """mm_struct: a page-table root in the core plus the VMA list."""

    slot: int
    pgd: int
    vmas: list[Vma] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    kvm_users: int = 0                 # VMs whose ordinary memslots this mm backs

    def find_vma(self, addr: int) -> Vma | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and self.vmas[i].start <= addr < self.vmas[i].end:
            return self.vmas[i]
        return None

    def overlapping(self, start: int, end: int) -> list[Vma]:
        """The VMAs meeting [start, end), by address (the list is sorted and the VMAs
        do not overlap: a bisection, so thousands of VMAs cost no more per call)."""
        vmas, out = self.vmas, []
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        while i < len(vmas) and vmas[i].start < end:
            if vmas[i].end > start:
                out.append(vmas[i])
            i += 1
        return out

    def insert(self, vma: Vma) -> None:
        i = bisect.bisect_left(self.starts, vma.start)
        self.starts.insert(i, vma.start)
        self.vmas.insert(i, vma)

    def remove(self, vma: Vma) -> None:
        i = bisect.bisect_left(self.starts, vma.start)
        if i >= len(self.vmas) or self.vmas[i] is not vma:
            i = self.vmas.index(vma)
        del self.vmas[i]
        del self.starts[i]

    def get_unmapped_area(self, length: int, align: int = PAGE_SIZE) -> int:
        """Top-down search below MMAP_BASE, as the default x86-64 layout does.
        The gap just below the lowest mapping is tried first (a free-area cache).
        HugeTLB mappings need `align` (the huge page size)."""
        if self.vmas:
            low = self.vmas[0].start
            cand = (low - length) & ~(align - 1)
            if cand >= MMAP_MIN and low <= MMAP_BASE:
                return cand
        top = MMAP_BASE
        for v in reversed(self.vmas):
            if v.start >= top:
                continue
            if v.end <= (top - length) & ~(align - 1):
                break
            top = min(top, v.start)
        addr = (top - length) & ~(align - 1)
        if addr < MMAP_MIN:
            raise OSError(u.ENOMEM, "no address space")
        return addr


# mm/interval_tree.c: a file's i_mmap holds its VMAs in vm_pgoff order (an equal
# key goes after those already there), the order rmap and collect_procs walk them in.
def _vm_pgoff(vma: Vma) -> int:
    return vma.pgoff


def vma_interval_tree_insert(vma: Vma, root: list) -> None:
    bisect.insort_right(root, vma, key=_vm_pgoff)


def vma_interval_tree_insert_after(vma: Vma, prev: Vma, root: list) -> None:
    """fork (dup_mmap): the child's VMA goes right after the parent's."""
    root.insert(root.index(prev) + 1, vma)


def vma_interval_tree_remove(vma: Vma, root: list) -> None:
    root.remove(vma)


class MM(Rmap, Migrate):
    """The memory-management part of the kernel: owns frames' lifetimes in mappings."""

    def __init__(self, k):
        self.k = k
        self.core = k.core
        self.anon_rmap: dict[int, tuple[Mm, int]] = {}   # anon pfn -> (mm, va)
        # frames whose latent error fork copied (dup_mmap): the error is the source
        # frame's, so a copy that is freed unconsumed leaves no bad frame behind
        self.hwerr_copies: set[int] = set()

    # ------------------------------------------------------------------ folios
    def folio_alloc(self, order: int, flags: int, mapping: int, index: int) -> int:
        pfn = self.k.buddy.alloc(order)
        self.core.phys_zero(pfn, 1 << order)
        self.core.set_folio(pfn, order, flags, 1, mapping, index)
        return pfn

    def folio_put(self, head: int, n: int = 1) -> None:
        """Drop references; the last one frees the folio (a poisoned one never returns)."""
        if self.core.ref_add(head, -n) <= 0:
            self.folio_free(head)

    def folio_free(self, head: int) -> None:
        """__folio_put: the last reference is gone."""
        self.anon_rmap.pop(head, None)
        flags = self.core.flags(head)
        if flags & PG_hugetlb:
            self.k.synchronize_rcu()          # no CPU may still read through it
            self.k.hugetlb.free_huge_folio(head)
            return
        if self.k.hugetlb is not None and self.k.hugetlb.groups \
                and self.k.hugetlb.split_group_of(head) is not None:
            self.k.synchronize_rcu()
            self.k.hugetlb.release_split_page(head)
            return
        if head in self.k.memory_failure.tracked:     # marked only now, on release
            flags |= PG_hwpoison
            self.k.memory_failure.mark_on_release(head, {head})
        if head in self.hwerr_copies:
            self.hwerr_copies.discard(head)
            if not flags & PG_hwpoison:
                self.core.set_hwerr(head, 0)
        self.core.set_flags(head, flags & PG_hwpoison)
        if not flags & PG_hwpoison:
            self.k.buddy.free(head, self.core.order(head))

    def folio_mapped(self, head: int) -> bool:
        core = self.core
        if core.mapcount(head) > 0:
            return True
        order = core.order(head)
        if not order or core.flags(head) & PG_hugetlb:    # HugeTLB: mapped whole, counted on the head
            return False
        return any(core.mapcount(head + i) > 0 for i in range(1, 1 << order))

    def folio_mark_dirty(self, head: int) -> None:
        self.core.test_set_flag(head, PG_dirty)

    # ------------------------------------------------------------------ PTEs
    def set_pte(self, mm: Mm, va: int, pfn: int, writable: bool, dirty: bool, level: int = 1) -> None:
        """Map pfn at va: a 4K PTE, or a huge leaf (PSE) at PMD (2) / PUD (3) level."""
        e = (pfn << PAGE_SHIFT) | _LEAF_PROT | C.PTE_ACCESSED
        if writable:
            e |= C.PTE_RW
        if dirty:
            e |= C.PTE_DIRTY
        if level > 1:
            e |= C.PTE_PSE
            stale = self.core.pt_detach(mm.pgd, va, level)
            if stale:            # a table left by an earlier munmap of 4K mappings here
                self.k.defer_pt_free(stale)
        self.core.pte_set(mm.pgd, va, e, level)
        self.core.map_add(pfn, 1)
        self.core.ref_add(self.core.head(pfn), 1)

    def set_pte_zero(self, mm: Mm, va: int) -> None:
        """Map the shared zero page at va: pte_mkspecial(pfn_pte(my_zero_pfn(va))),
        read-only whatever the VMA allows (a write faults and copies), no mapcount or
        reference (vm_normal_page() is NULL for it)."""
        self.core.pte_set(mm.pgd, va, (ZERO_PFN << PAGE_SHIFT) | _LEAF_PROT | C.PTE_ACCESSED
                          | C.PTE_SPECIAL)

    def zap_pte(self, mm: Mm, va: int, poison: bool = False, level: int = 1) -> int:
        """ptep_get_and_clear (a hwpoison entry left with `poison`) + the rmap
        bookkeeping + MMU notifiers; returns the old entry.  The core moves the dirty
        bit and drops mapcount and reference."""
        old, head, refs = self.core.pte_zap(mm.pgd, va, poison, level)
        if mm.kvm_users:
            self.k.kvm.mmu_notifier_invalidate(mm, va, PAGE_SIZE << 9 * (level - 1))
        if head >= 0:
            if refs <= 0:
                self.folio_free(head)
            elif self.anon_rmap.get(head, (None,))[0] is mm and not self.core.mapcount(head):
                # still referenced (poison retired it) but mapped nowhere: no rmap
                # left (folio_lock_anon_vma_read finds none for an unmapped folio),
                # and none that outlives its mm
                del self.anon_rmap[head]
        return old

    def zap_range(self, mm: Mm, start: int, end: int) -> int:
        """zap_page_range: clear present and hwpoison entries in [start, end)."""
        n = 0
        for va, e, level in self.core.pt_scan(mm.pgd, start, end):
            if e & C.PTE_PRESENT or e & C.PTE_HWPOISON:
                if level > 1:                     # __unmap_hugepage_range
                    hugetlb_fault.restore_reserve_on_unmap(self.k, mm.find_vma(va), va, e)
                self.zap_pte(mm, va, False, level)
                n += 1
        if n:
            self.k.trace("zap", mm=mm.slot, start=start, end=end, pages=n)
        return n

    # ------------------------------------------------------------------ rmap
    # ------------------------------------------------------------------ faults
    def handle_mm_fault(self, task, va: int, write: bool, gup: bool = False) -> int:
        """Resolve a fault for `task`; a user fault that fails is signalled as x86's
        do_sigbus/bad_area would.  For get_user_pages (gup=True) nothing is signalled:
        the VM_FAULT_* code is returned for the caller to turn into an errno.  A page
        faulted into a VM_LOCKED VMA is mlocked (mlock_new_folio)."""
        ret = self._handle_mm_fault(task, va, write, gup)
        if ret == VM_FAULT_OK:
            from .mlock import mlock_fault

            mlock_fault(self.k, task, va)
        return ret

    def _handle_mm_fault(self, task, va: int, write: bool, gup: bool = False) -> int:
        mm = task.process.mm
        vma = mm.find_vma(va)
        if vma is None or (write and not vma.prot & u.PROT_WRITE) \
                or not vma.prot & (u.PROT_READ | u.PROT_WRITE):
            if gup:
                return VM_FAULT_SIGSEGV
            code = u.SEGV_MAPERR if vma is None else u.SEGV_ACCERR
            self.k.signals.force_sig_fault(task, u.SIGSEGV, code, va)
            return VM_FAULT_SIGSEGV
        entry, level = self.core.walk(mm.pgd, va)
        if entry & C.PTE_HWPOISON:
            lsb = 12 + 9 * (level - 1)            # a huge hwpoison entry loses the huge page
            return self._sigbus(task, va, VM_FAULT_HWPOISON if lsb == 12 else VM_FAULT_HWPOISON_LARGE,
                                lsb, gup)
        if entry & C.PTE_PRESENT:
            if write and not entry & C.PTE_RW and not vma.shared:
                if entry & C.PTE_SPECIAL:           # do_wp_page on the zero page
                    self._wp_zero_page(vma, va)
                elif vma.file is not None and vma.inode.ops.huge:
                    return self._huge_fault(task, vma, va, write, gup)      # hugetlb_wp
                elif vma.file is not None:
                    return self._cow_done(task, va, self._cow(task, vma, va, entry), gup)
            elif write and not entry & C.PTE_RW and vma.file is not None \
                    and vma.inode.ops.writeback:
                self._wp_page_shared(vma, va, entry, level)
            return VM_FAULT_OK                  # else spurious: another thread fixed it
        if vma.file is None:
            self._do_anonymous_page(vma, va, write)
            return VM_FAULT_OK
        if vma.inode.ops.huge:
            return self._huge_fault(task, vma, va, write, gup)
        index = vma.pgoff + ((va - vma.start) >> PAGE_SHIFT)
        ret, pfn = vma.inode.ops.fault(self.k, vma.inode, index)
        if ret == VM_FAULT_OK and self.core.flags(pfn) & PG_hwpoison \
                and (self.k.policy.faults_check or not vma.inode.ops.gmem):
            ret = VM_FAULT_HWPOISON          # __do_fault's PageHWPoison check
            if self.folio_mapped(self.core.head(pfn)):
                self.try_to_unmap(self.core.head(pfn), hwpoison=False)
        if ret != VM_FAULT_OK:
            return self._sigbus(task, va, ret, PAGE_SHIFT, gup)
        if write and not vma.shared:                       # do_cow_fault
            return self._cow_done(task, va, self._cow_from(vma, va, pfn), gup)
        self.set_pte(mm, va & ~(PAGE_SIZE - 1), pfn, vma.shared and vma.prot & u.PROT_WRITE
                     and (write or not vma.inode.ops.writeback), write)
        if write:
            self.folio_mark_dirty(self.core.head(pfn))    # fault_dirty_shared_page
        if not write:
            self._fault_around(vma, va)
        return VM_FAULT_OK

    def _huge_fault(self, task, vma: Vma, va: int, write: bool, gup: bool) -> int:
        """hugetlb_fault (emu.kernel.hugetlb); a copy-on-write that consumed a latent
        error runs the memory_failure() it queued after the SIGBUS, as _cow_done."""
        ret = vma.inode.ops.huge_fault(self.k, task, vma, va, write)
        if ret:                                   # a split folio's page loses 4 KiB only
            lsb = PAGE_SHIFT if ret & VM_FAULT_HWPOISON else vma.inode.ops.shift(vma.inode)
            ret = self._sigbus(task, va, ret, lsb, gup)
            self.k.memory_failure.run_queued()
        return ret

    def _sigbus(self, task, va: int, ret: int, lsb: int, gup: bool = False) -> int:
        if gup:
            return ret
        self._do_sigbus(task, va, ret, lsb)
        return ret

    def _do_sigbus(self, task, va: int, ret: int, lsb: int) -> None:
        sig = self.k.signals
        if ret & (VM_FAULT_HWPOISON | VM_FAULT_HWPOISON_LARGE):
            self.k.log("MCE: Killing %s:%d due to hardware memory corruption fault at %x"
                       % (task.comm, task.tid, va))
            return sig.force_sig_mceerr(task, u.BUS_MCEERR_AR, va, lsb,
                                        why="fault on a hwpoisoned page")
        return sig.force_sig_fault(task, u.SIGBUS, u.BUS_ADRERR, va, why="VM_FAULT_SIGBUS")

    def _do_anonymous_page(self, vma: Vma, va: int, write: bool) -> None:
        """do_anonymous_page: a read maps the shared zero page ("Use the zero-page
        for reads"); a write allocates a zeroed private page (vmf_anon_prepare)."""
        va &= ~(PAGE_SIZE - 1)
        if not write and not vma.shared:
            self.set_pte_zero(vma.mm, va)
            return
        pfn = self.folio_alloc(0, _ANON_FLAGS, 0, va >> PAGE_SHIFT)
        self.set_pte(vma.mm, va, pfn, bool(vma.prot & u.PROT_WRITE), write)
        self.folio_put(pfn)                  # the mapping holds it now
        self.anon_rmap[pfn] = (vma.mm, va)
        vma.anon_vma = True

    def _cow_done(self, task, va: int, ret: int, gup: bool) -> int:
        """A copy that consumed a latent error: VM_FAULT_HWPOISON goes to the fault's
        caller (do_sigbus: BUS_MCEERR_AR, lsb PAGE_SHIFT); then the work item runs the
        memory_failure() copy_mc_user_highpage() queued for the source page."""
        if ret:
            ret = self._sigbus(task, va, ret, PAGE_SHIFT, gup)
            self.k.memory_failure.run_queued()
        return ret

    def _cow_from(self, vma: Vma, va: int, src: int, replace: bool = False) -> int:
        """A private copy of the file page `src` at va (`replace`: of the read-only
        entry there, wp_page_copy; else do_cow_fault).  The copy is
        copy_mc_user_highpage(): a latent error in `src` leaves everything as it was
        and gives VM_FAULT_HWPOISON."""
        va &= ~(PAGE_SIZE - 1)
        pfn = self.folio_alloc(0, _ANON_FLAGS, 0, va >> PAGE_SHIFT)
        if self.copy_mc_highpages(pfn, src, 1, _COW_STACK) >= 0:
            self.folio_put(pfn)
            return VM_FAULT_HWPOISON
        if replace:
            self.zap_pte(vma.mm, va)
        self.set_pte(vma.mm, va, pfn, True, True)
        self.folio_put(pfn)
        self.anon_rmap[pfn] = (vma.mm, va)
        vma.anon_vma = True
        return VM_FAULT_OK

    def _wp_zero_page(self, vma: Vma, va: int) -> None:
        """wp_page_copy from the zero page: a new zeroed page (nothing is read from the
        zero page), swapped in for the read-only entry (with the MMU notifiers)."""
        va &= ~(PAGE_SIZE - 1)
        pfn = self.folio_alloc(0, _ANON_FLAGS, 0, va >> PAGE_SHIFT)
        self.zap_pte(vma.mm, va)
        self.set_pte(vma.mm, va, pfn, True, True)
        self.folio_put(pfn)
        self.anon_rmap[pfn] = (vma.mm, va)
        vma.anon_vma = True

    def _wp_page_shared(self, vma: Vma, va: int, entry: int, level: int) -> None:
        """wp_page_shared: the first store to a page of a shared mapping the file
        system tracks (vma_wants_writenotify: mapping_can_writeback) makes the entry
        writable and dirty and dirties the folio (fault_dirty_shared_page)."""
        if not vma.prot & u.PROT_WRITE:
            return
        va &= ~((PAGE_SIZE << 9 * (level - 1)) - 1)
        self.core.pte_set(vma.mm.pgd, va, entry | C.PTE_RW | C.PTE_DIRTY | C.PTE_ACCESSED, level)
        self.folio_mark_dirty(self.core.head((entry & C.PTE_PFN_MASK) >> PAGE_SHIFT))

    def _cow(self, task, vma: Vma, va: int, entry: int) -> int:
        src = (entry & C.PTE_PFN_MASK) >> PAGE_SHIFT
        return self._cow_from(vma, va, src, replace=True)

    FAULT_AROUND_PAGES = 16

    def _fault_around(self, vma: Vma, va: int) -> None:
        """do_fault_around: map neighbours already in the page cache (read faults),
        for files whose vm_ops have map_pages (should_fault_around): shmem's
        filemap_map_pages; guest_memfd's kvm_gmem_vm_ops has only .fault."""
        if not vma.shared or not vma.inode.ops.map_pages:
            return
        inode = vma.inode
        span = self.FAULT_AROUND_PAGES << PAGE_SHIFT
        lo = max(vma.start, va & ~(span - 1))
        hi = min(vma.end, lo + span)
        core = self.core
        for a in range(lo, hi, PAGE_SIZE):
            index = vma.pgoff + ((a - vma.start) >> PAGE_SHIFT)
            pfn = inode.find(core, index)
            if pfn is None or core.flags(pfn) & PG_hwpoison or not inode.ops.map_ok(inode, index):
                continue
            if core.pte_get(vma.mm.pgd, a) == 0:
                self.set_pte(vma.mm, a, pfn, bool(vma.prot & u.PROT_WRITE)
                             and not inode.ops.writeback, False)

    # ------------------------------------------------------------------ mmap family
    def mmap(self, proc, addr: int, length: int, prot: int, flags: int, file, offset: int) -> int:
        mm = proc.mm
        if length <= 0 or offset % PAGE_SIZE or offset < 0:
            raise OSError(u.EINVAL, "mmap")
        length = page_align(length)
        mtype = flags & u.MAP_TYPE
        if mtype not in (u.MAP_SHARED, u.MAP_PRIVATE, u.MAP_SHARED_VALIDATE):
            raise OSError(u.EINVAL, "mmap")
        shared = mtype != u.MAP_PRIVATE
        if flags & (u.MAP_FIXED | u.MAP_FIXED_NOREPLACE):
            if addr % PAGE_SIZE or addr < MMAP_MIN or addr + length > TASK_SIZE:
                raise OSError(u.EINVAL, "mmap")
            if flags & u.MAP_FIXED_NOREPLACE and mm.overlapping(addr, addr + length):
                raise OSError(u.EEXIST, "mmap")
        fixed = flags & (u.MAP_FIXED | u.MAP_FIXED_NOREPLACE)
        self.k.vmas_available(1 + (self._splits(mm, addr, addr + length) if fixed else 0), "mmap")
        if file is None and flags & u.MAP_HUGETLB:
            # ksys_mmap_pgoff(): hugetlb_file_setup() of an anonymous hugetlbfs file
            # of the size MAP_HUGE_SHIFT names, mapped as any hugetlbfs file
            if self.k.hugetlb is None:                 # no pool: the reservation fails
                raise OSError(u.ENOMEM, "mmap: no huge pages")
            file = self.k.hugetlb.file_setup(length, flags)
            try:
                return self.mmap(proc, addr, length, prot, flags, file, offset)
            finally:
                file.put(self.k)
        if file is not None and flags & u.MAP_HUGETLB and not file.inode.ops.huge:
            raise OSError(u.EINVAL, "mmap: MAP_HUGETLB on a file that is not hugetlbfs")
        if file is None and shared:
            # mmap_region(): shared anonymous memory is shmem (shmem_zero_setup), its
            # pgoff ignored; the mapping holds the only reference to the file
            from .shmem import shmem_zero_setup

            file = shmem_zero_setup(self.k, length)
            try:
                return self.mmap(proc, addr, length, prot, flags, file, 0)
            finally:
                file.put(self.k)
        align, resv = PAGE_SIZE, None
        if file is not None:
            file.inode.ops.mmap_check(self.k, file, shared, prot)
            if file.inode.ops.huge:                  # hugetlb_get_unmapped_area
                align = 1 << file.inode.ops.shift(file.inode)
                if offset % align or addr % align:
                    raise OSError(u.EINVAL, "mmap: hugetlb offset/address alignment")
                length = (length + align - 1) & ~(align - 1)    # ksys_mmap_pgoff rounds up
        if not flags & (u.MAP_FIXED | u.MAP_FIXED_NOREPLACE):
            addr = mm.get_unmapped_area(length, align)
        if file is not None and file.inode.ops.huge and not flags & MAP_NORESERVE:
            if shared:                                # hugetlb_reserve_pages
                file.inode.ops.reserve(self.k, file.inode, offset, length)
            else:                                     # the same, into the VMA's resv_map
                resv = hugetlb_fault.reserve_private(self.k, file.inode, offset, length)
        if flags & (u.MAP_FIXED | u.MAP_FIXED_NOREPLACE):
            self.munmap(proc, addr, length)
        vma = Vma(mm, addr, addr + length, prot, shared, file, offset >> PAGE_SHIFT, resv=resv)
        self.k.vma_link(vma)
        if file is not None:
            file.get()
            vma_interval_tree_insert(vma, file.inode.i_mmap)
            self.k.i_mmap_sync(file.inode)
            file.inode.ops.mmap_done(self.k, file.inode, offset + length, prot)
        self.k.trace("mmap", mm=mm.slot, addr=addr, length=length)
        return addr

    def munmap(self, proc, addr: int, length: int) -> None:
        if addr % PAGE_SIZE or length <= 0 or addr + length > TASK_SIZE:
            raise OSError(u.EINVAL, "munmap")
        end = addr + page_align(length)
        mm = proc.mm
        for vma in mm.overlapping(addr, end):      # hugetlb_vm_op_split: no splitting a huge page
            if vma.file is not None and vma.inode.ops.huge:
                hsize = 1 << vma.inode.ops.shift(vma.inode)
                if (addr > vma.start and addr % hsize) or (end < vma.end and end % hsize):
                    raise OSError(u.EINVAL, "munmap: inside a huge page")
        self.k.vmas_available(self._splits(mm, addr, end), "munmap")
        for vma in mm.overlapping(addr, end):
            self._zap_locked(vma, max(addr, vma.start), min(end, vma.end))
            self._split_out(mm, vma, addr, end)

    def _zap_locked(self, vma: Vma, start: int, end: int) -> None:
        """zap_range, and for a VM_LOCKED VMA the munlock of what it mapped
        (folio_remove_rmap -> munlock_vma_folio): page-cache folios stay."""
        if not vma.locked:
            self.zap_range(vma.mm, start, end)
            return
        from .mlock import munlock_folio

        heads = {self.core.head((e & C.PTE_PFN_MASK) >> PAGE_SHIFT)
                 for _va, e, level in self.core.pt_scan(vma.mm.pgd, start, end)
                 if e & C.PTE_PRESENT and not e & C.PTE_SPECIAL and level == 1}
        self.zap_range(vma.mm, start, end)
        for head in heads:
            munlock_folio(self.k, head)

    @staticmethod
    def _splits(mm: Mm, start: int, end: int) -> int:
        """VMAs an unmap of [start, end) cuts in two (each needs one more VMA)."""
        return sum(1 for vma in mm.overlapping(start, end) if vma.start < start and vma.end > end)

    def _split_out(self, mm: Mm, vma: Vma, start: int, end: int) -> None:
        self.k.vma_unlink(vma)
        if vma.resv is not None:                  # hugetlb_vm_op_close of the removed part
            hugetlb_fault.vm_op_close(self.k, vma, max(start, vma.start), min(end, vma.end))
        if vma.file is not None:
            vma_interval_tree_remove(vma, vma.inode.i_mmap)
        for lo, hi in ((vma.start, min(start, vma.end)), (max(end, vma.start), vma.end)):
            if lo < hi:
                piece = Vma(mm, lo, hi, vma.prot, vma.shared, vma.file,
                            vma.pgoff + ((lo - vma.start) >> PAGE_SHIFT), anon_vma=vma.anon_vma,
                            locked=vma.locked, resv=vma.resv)
                self.k.vma_link(piece)
                if vma.file is not None:
                    vma.file.get()
                    vma_interval_tree_insert(piece, vma.inode.i_mmap)
        if vma.file is not None:
            self.k.i_mmap_sync(vma.inode)
            vma.file.put(self.k)

    def populate(self, task, addr: int, length: int, write: bool) -> None:
        """mm_populate (MAP_POPULATE): faults the range in with GUP, which signals
        nothing; it stops at the first failure, and mmap ignores it (vm_mmap_pgoff)."""
        try:
            for va in range(addr, addr + length, PAGE_SIZE):
                e, _ = self.core.walk(task.process.mm.pgd, va)
                if not e & C.PTE_PRESENT and self.handle_mm_fault(task, va, write, gup=True):
                    return
        except MemoryError:
            return

    def exit_mmap(self, mm: Mm) -> None:
        for vma in list(mm.vmas):
            self._zap_locked(vma, vma.start, vma.end)
            self._split_out(mm, vma, vma.start, vma.end)
        tables = self.core.pt_tables(mm.pgd)
        self.k.defer_pt_free(tables)
        self.core.mm_clear(mm.slot)

    def dup_mmap(self, src: Mm, dst: Mm) -> None:
        """fork: page tables are copied only where vma_needs_copy() says, i.e. for VMAs
        with an anon_vma; the child faults in the rest (shared file mappings, HugeTLB
        shared mappings, private mappings never written, with their hwpoison
        entries).  HugeTLB VMAs go to copy_hugetlb_page_range (private ones are
        write-protected and shared copy-on-write).  Elsewhere, shared mappings share
        frames, and private anonymous 4K pages are copied at fork time (no 4K
        copy-on-write across processes); a copy keeps the source frame's latent error, as the page Linux
        would share, so the child's first load still consumes it."""
        core = self.core
        for vma in src.vmas:
            nv = Vma(dst, vma.start, vma.end, vma.prot, vma.shared, vma.file, vma.pgoff,
                     anon_vma=vma.anon_vma)             # anon_vma_fork
            self.k.vma_link(nv)
            if vma.file is not None:
                vma.file.get()
                vma_interval_tree_insert_after(nv, vma, vma.inode.i_mmap)
                self.k.i_mmap_sync(vma.inode)
            if not vma.anon_vma:                          # vma_needs_copy() is false
                continue
            if vma.file is not None and vma.inode.ops.huge:
                hugetlb_fault.copy_hugetlb_page_range(self.k, vma, nv)
                continue
            for va, e, level in core.pt_scan(src.pgd, vma.start, vma.end):
                if e & (C.PTE_HWPOISON | C.PTE_SPECIAL):
                    core.pte_set(dst.pgd, va, e, level)   # copy_nonpresent_pte; no page
                    continue
                pfn = (e & C.PTE_PFN_MASK) >> PAGE_SHIFT
                if core.flags(core.head(pfn)) & PG_anon:
                    new = self.folio_alloc(0, _ANON_FLAGS, 0, va >> PAGE_SHIFT)
                    core.phys_copy(new, pfn)
                    if core.hwerr(pfn):      # Linux shares the poisoned page: so does the copy
                        core.set_hwerr(new, core.hwerr(pfn))
                        self.hwerr_copies.add(new)
                    self.set_pte(dst, va, new, bool(e & C.PTE_RW), bool(e & C.PTE_DIRTY))
                    self.folio_put(new)
                    self.anon_rmap[new] = (dst, va)
                else:
                    self.set_pte(dst, va, pfn, bool(e & C.PTE_RW), bool(e & C.PTE_DIRTY))

    # ------------------------------------------------------------------ /proc/pid/pagemap
    def pagemap(self, mm: Mm, addr: int) -> int:
        """One /proc/pid/pagemap entry (fs/proc/task_mmu.c), as CAP_SYS_ADMIN reads it
        (show_pfn).  A 4K entry: pte_to_pagemap_entry(); a HugeTLB one:
        pagemap_hugetlb_range(), which reports a non-present huge entry (hwpoison
        included) as 0."""
        core = self.core
        e, level = core.walk(mm.pgd, addr)
        if e & C.PTE_PRESENT:
            sub = (addr >> PAGE_SHIFT) & ((1 << (9 * (level - 1))) - 1)
            pfn = ((e & C.PTE_PFN_MASK) >> PAGE_SHIFT) + sub
            v = u.PM_PRESENT | pfn
            if e & C.PTE_SPECIAL:                 # vm_normal_page() is NULL: no folio
                return v
            head = core.head(pfn)
            if not core.flags(head) & PG_anon:
                v |= u.PM_FILE
            # folio_precise_page_mapcount() == 1; HugeTLB: !folio_maybe_mapped_shared()
            if (core.mapcount(head) if level > 1 else core.mapcount(pfn)) == 1:
                v |= u.PM_MMAP_EXCLUSIVE
            return v
        if e & C.PTE_HWPOISON and level == 1:
            # a pfn swap entry: the pfn as offset, and the folio for PM_FILE
            pfn = (e & C.PTE_PFN_MASK) >> PAGE_SHIFT
            v = u.PM_SWAP | u.SWP_HWPOISON | (pfn << u.PM_SWAP_TYPE_BITS)
            if not core.flags(core.head(pfn)) & PG_anon:
                v |= u.PM_FILE
            return v
        return 0
