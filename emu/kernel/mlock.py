"""mm/mlock.c: mlock, mlock2, munlock and MAP_LOCKED.

A locked VMA (VM_LOCKED) is faulted in by __mm_populate (write faults for a private
writable VMA, populate_vma_page_range) unless VM_LOCKONFAULT; every folio it maps
is PG_mlocked and PG_unevictable (mlock_folio / mlock_new_folio at fault), which
memory_failure()'s unmap munlocks (so error_states[] sees a plain LRU page).
Locks are not inherited by fork (dup_mmap clears VM_LOCKED_MASK).
"""
from __future__ import annotations

from .. import _core as C
from .. import uapi as u
from .mm import PAGE_SHIFT, PAGE_SIZE, VM_FAULT_HWPOISON, VM_FAULT_OK, Vma
from .page_alloc import PG_hugetlb, PG_lru, PG_mlocked, PG_unevictable

VM_LOCKED = 0x00002000
VM_LOCKONFAULT = 0x00080000


def _special(vma: Vma) -> bool:
    """mlock_fixup leaves VM_LOCKED off HugeTLB (and VM_SPECIAL) VMAs; the range is
    still populated."""
    return vma.file is not None and vma.inode.ops.huge


def _folio_of(k, vma: Vma, va: int) -> int | None:
    e, level = k.core.walk(vma.mm.pgd, va)
    if not e & C.PTE_PRESENT or e & C.PTE_SPECIAL or level != 1:
        return None                            # the zero page has no folio to lock
    head = k.core.head((e & C.PTE_PFN_MASK) >> PAGE_SHIFT)
    return None if k.core.flags(head) & PG_hugetlb else head


def mlock_folio(k, head: int) -> None:
    """mlock_folio: PG_mlocked, and onto the unevictable LRU (PG_unevictable)."""
    fl = k.core.flags(head)
    if fl & PG_lru:
        fl |= PG_unevictable
    k.core.set_flags(head, fl | PG_mlocked)


def munlock_folio(k, head: int) -> None:
    """__munlock_folio: PG_mlocked goes unless another VM_LOCKED VMA maps the folio
    (mlock_count); it becomes evictable again unless its mapping is unevictable
    (guest_memfd's mapping_set_unevictable, SHM_LOCK's shmem_lock)."""
    core = k.core
    if core.refcount(head) <= 0 or not core.flags(head) & PG_mlocked:
        return                                 # freed with its last mapping
    if any(v is not None and v.locked and not _special(v) for _m, _va, _p, v, _l in
           k.mm.rmap_walk(head)):
        return
    fl = core.flags(head) & ~PG_mlocked
    inode = k.inodes.get(core.mapping(head))
    if inode is None or not (getattr(inode.ops, "gmem", False)
                             or inode.private.get("unevictable")):   # SHM_LOCK'ed shmem
        fl &= ~PG_unevictable
    core.set_flags(head, fl)


def mlock_fault(k, task, va: int) -> None:
    """A fault in a VM_LOCKED VMA mlocks the folio it mapped (mlock_new_folio /
    mlock_vma_folio from the rmap add)."""
    vma = task.process.mm.find_vma(va)
    if vma is not None and vma.locked and not _special(vma):
        head = _folio_of(k, vma, va & ~(PAGE_SIZE - 1))
        if head is not None:
            mlock_folio(k, head)


def munlock_range(k, vma: Vma, start: int, end: int) -> None:
    """munlock_vma_pages_range / the munlock of an unmap (folio_remove_rmap ->
    munlock_vma_folio), called with VM_LOCKED already clear on [start, end)."""
    for _va, e, level in k.core.pt_scan(vma.mm.pgd, start, end):
        if e & C.PTE_PRESENT and not e & C.PTE_SPECIAL and level == 1:
            munlock_folio(k, k.core.head((e & C.PTE_PFN_MASK) >> PAGE_SHIFT))


def _range(addr: int, length: int) -> tuple[int, int]:
    """len = PAGE_ALIGN(len + offset_in_page(start)); start &= PAGE_MASK; EINVAL if
    start + len wraps (do_mlock); past TASK_SIZE is a hole (ENOMEM)."""
    mask = (1 << 64) - 1
    start = addr & ~(PAGE_SIZE - 1)
    length = (length + (addr & (PAGE_SIZE - 1)) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1) & mask
    end = (start + length) & mask
    if end < start:
        raise OSError(u.EINVAL, "mlock: range wraps")
    return start, end


def apply_vma_lock_flags(k, mm, start: int, end: int, flags: int) -> None:
    """Set (or with flags 0 clear) VM_LOCKED|VM_LOCKONFAULT on [start, end), splitting
    VMAs at the edges (mlock_fixup); the pages already mapped are mlocked or
    munlocked.  ENOMEM for a hole, checked before anything changes."""
    vmas = mm.overlapping(start, end)
    pos = start
    for v in vmas:
        if v.start > pos:
            break
        pos = v.end
    if pos < end:
        raise OSError(u.ENOMEM, "mlock: unmapped range")
    k.vmas_available(sum((v.start < start) + (v.end > end) for v in vmas), "mlock")
    for v in vmas:
        if v.locked == flags or _special(v):
            continue
        lo, hi = max(start, v.start), min(end, v.end)
        mid = _split(k, v, lo, hi)
        mid.locked = flags
        if flags:
            for va in range(lo, hi, PAGE_SIZE):
                head = _folio_of(k, mid, va)
                if head is not None:
                    mlock_folio(k, head)
        else:
            munlock_range(k, mid, lo, hi)


def _split(k, vma: Vma, lo: int, hi: int) -> Vma:
    """split_vma at lo and hi: the piece [lo, hi), the VMA itself when it fits."""
    if vma.start == lo and vma.end == hi:
        return vma
    from .mm import vma_interval_tree_insert, vma_interval_tree_remove

    k.vma_unlink(vma)
    if vma.file is not None:
        vma_interval_tree_remove(vma, vma.inode.i_mmap)
    mid = None
    for a, b in ((vma.start, lo), (lo, hi), (hi, vma.end)):
        if a < b:
            piece = Vma(vma.mm, a, b, vma.prot, vma.shared, vma.file,
                        vma.pgoff + ((a - vma.start) >> PAGE_SHIFT), anon_vma=vma.anon_vma,
                        locked=vma.locked, resv=vma.resv)
            k.vma_link(piece)
            if vma.file is not None:
                vma.file.get()
                vma_interval_tree_insert(piece, vma.inode.i_mmap)
            if a == lo:
                mid = piece
    if vma.file is not None:
        k.i_mmap_sync(vma.inode)
        vma.file.put(k)
    return mid


def mm_populate(k, task, start: int, end: int, ignore_errors: bool) -> None:
    """__mm_populate: fault in each VMA of [start, end) with GUP (no signal), write
    faults for private writable VMAs, nothing for VM_LOCKONFAULT.  An error stops
    the walk; mlock returns it (__mlock_posix_error_return: EFAULT -> ENOMEM),
    MAP_LOCKED/MAP_POPULATE ignore it (vm_mmap_pgoff)."""
    mm = task.process.mm
    for vma in mm.overlapping(start, end):
        if vma.locked & VM_LOCKONFAULT:
            continue
        write = bool(vma.prot & u.PROT_WRITE) and not vma.shared
        for va in range(max(start, vma.start), min(end, vma.end), PAGE_SIZE):
            e, _ = k.core.walk(mm.pgd, va)
            if e & C.PTE_PRESENT and (e & C.PTE_RW or not write):
                continue
            try:
                ret = k.mm.handle_mm_fault(task, va, write, gup=True)
            except MemoryError:
                ret = -1
            if ret == VM_FAULT_OK:
                continue
            if ignore_errors:
                break                              # continue at the next VMA
            if ret == -1:
                raise OSError(u.EAGAIN, "mlock: out of memory")
            if ret & VM_FAULT_HWPOISON:
                raise OSError(u.EHWPOISON, "mlock: hwpoisoned page")
            raise OSError(u.ENOMEM, "mlock: fault failed")


def do_mlock(k, task, addr: int, length: int, flags: int) -> int:
    start, end = _range(addr, length)
    if start == end:
        return 0
    apply_vma_lock_flags(k, task.process.mm, start, end, flags)
    mm_populate(k, task, start, end, False)
    return 0


def sys_mlock(k, task, addr: int, length: int) -> int:
    return do_mlock(k, task, addr, length, VM_LOCKED)


def sys_mlock2(k, task, addr: int, length: int, flags: int) -> int:
    if flags & ~u.MLOCK_ONFAULT:
        raise OSError(u.EINVAL, "mlock2: flags")
    return do_mlock(k, task, addr, length,
                    VM_LOCKED | (VM_LOCKONFAULT if flags & u.MLOCK_ONFAULT else 0))


def sys_munlock(k, task, addr: int, length: int) -> int:
    start, end = _range(addr, length)
    if start != end:
        apply_vma_lock_flags(k, task.process.mm, start, end, 0)
    return 0


def map_locked(k, mm, addr: int) -> None:
    """do_mmap with MAP_LOCKED: the new VMA is VM_LOCKED (mmap_region drops it for
    HugeTLB); vm_mmap_pgoff then populates it."""
    vma = mm.find_vma(addr)
    if vma is not None and not _special(vma):
        vma.locked = VM_LOCKED
