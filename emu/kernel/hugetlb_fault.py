"""MAP_PRIVATE HugeTLB mappings (mm/hugetlb.c, Linux 6.18): the private fault path,
copy-on-write, fork and the per-VMA reservation map.

- hugetlb_reserve_pages() of a private VMA (no VM_NORESERVE) reserves its whole range
  (chg = to - from) in a resv_map the VMA owns (HPAGE_RESV_OWNER); a fault that
  allocates for an index consumes that index's reservation; hugetlb_vm_op_close()
  gives back the unconsumed rest.  A fork child gets none (hugetlb_dup_vma_private).
- hugetlb_no_page(): a page-cache folio is mapped read-only; without one a new
  anonymous huge folio is allocated (never added to the page cache).
- hugetlb_wp(): a sole-mapped anonymous folio is reused (made writable); otherwise the
  folio is copied (copy_user_large_folio, machine-check safe) into a new one.
- copy_hugetlb_page_range(): fork write-protects a private mapping's entries in parent
  and child, which then share the folio (mapcount 2) until one writes.

Anonymous huge folios have no mapping: their reverse map is `anon_maps` (head ->
the (mm, address) entries that map it, checked against the page tables when walked).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import _core as C
from .. import uapi as u
from .mm_types import VM_FAULT_HWPOISON_LARGE, VM_FAULT_OK, VM_FAULT_SIGBUS
from .page_alloc import PAGE_SHIFT, PG_anon, PG_head, PG_hugetlb, PG_hwpoison, PG_uptodate

_ANON_HUGE = PG_hugetlb | PG_head | PG_uptodate | PG_anon
_COW_STACK = ("copy_mc_enhanced_fast_string", "copy_mc_to_kernel", "copy_mc_user_highpage",
              "copy_subpage", "process_huge_page", "copy_user_large_folio", "hugetlb_wp",
              "hugetlb_fault", "handle_mm_fault", "do_user_addr_fault", "exc_page_fault")


@dataclass(eq=False)
class ResvMap:
    """A private VMA's resv_map: the VMA's range is reserved; `consumed` holds the file
    indices (4K units, huge-page aligned) whose reservation a fault took (region_add).
    Pieces of a split VMA share it (hugetlb_vm_op_open takes a reference)."""

    h: object
    consumed: set = field(default_factory=set)


def _level(h) -> int:
    return 2 if h.order == 9 else 3


def reserve_private(k, inode, offset: int, length: int) -> ResvMap:
    """hugetlb_reserve_pages() for a private mapping: the whole range, whatever the page
    cache holds; ENOMEM (nothing changed) when the free pages beyond the existing
    reservations cannot cover it (hugetlb_acct_memory)."""
    h = inode.private["hstate"]
    chg = length >> (PAGE_SHIFT + h.order)
    if len(h.free) - h.resv < chg:
        raise OSError(u.ENOMEM, "mmap: not enough free huge pages to reserve")
    h.resv += chg
    return ResvMap(h)


def vm_op_close(k, vma, lo: int, hi: int) -> None:
    """hugetlb_vm_op_close() for [lo, hi) of a private VMA leaving: the reservations of
    that range no fault consumed go back (HugePages_Rsvd)."""
    r = vma.resv
    nr = 1 << r.h.order
    first = vma.pgoff + ((lo - vma.start) >> PAGE_SHIFT)
    idx = range(first, first + ((hi - lo) >> PAGE_SHIFT), nr)
    r.h.resv -= sum(1 for i in idx if i not in r.consumed)
    r.consumed.difference_update(idx)


def private_reserved(vma) -> int:
    """The reservations a private VMA still holds (its indices no fault consumed)."""
    nr = 1 << vma.resv.h.order
    return sum(1 for i in range(vma.pgoff, vma.pgoff + ((vma.end - vma.start) >> PAGE_SHIFT), nr)
               if i not in vma.resv.consumed)


def _alloc(k, vma, base: int, avoid_reserve: bool) -> tuple[int | None, bool]:
    """alloc_hugetlb_folio(vma, addr, avoid_reserve): the VMA's reservation for base if
    it has one left, else a free page beyond all reservations.  (head, reservation
    used); head None: -ENOSPC."""
    h = vma.inode.private["hstate"]
    r = vma.resv
    use = r is not None and not avoid_reserve and base not in r.consumed
    if not use and len(h.free) - h.resv <= 0:
        return None, False
    head = k.hugetlb.dequeue(h)
    if head is None:
        return None, False
    if use:
        r.consumed.add(base)
        h.resv -= 1
    return head, use


def _restore_reserve(vma, base: int) -> None:
    """restore_reserve_on_error(): a failed fault gives the reservation it took back."""
    vma.resv.consumed.discard(base)
    vma.resv.h.resv += 1


def _map_anon(k, vma, haddr: int, head: int, writable: bool, level: int) -> None:
    """hugetlb_add_new_anon_rmap() and set_huge_pte_at(): the new folio's only
    reference is the mapping's."""
    k.mm.set_pte(vma.mm, haddr, head, writable, writable, level)
    k.mm.folio_put(head)
    k.hugetlb.anon_maps.setdefault(head, []).append((vma.mm, haddr))
    vma.anon_vma = True                                   # vmf_anon_prepare


def _new_anon_folio(k, h, head: int, haddr: int) -> None:
    k.core.set_folio(head, h.order, _ANON_HUGE, 1, 0, haddr >> PAGE_SHIFT)


def hugetlb_fault(k, task, vma, va: int, write: bool) -> int:
    """hugetlb_fault() of a private mapping: hugetlb_no_page for an empty entry,
    hugetlb_wp for a write to a read-only one.  Returns a VM_FAULT_* code."""
    h = vma.inode.private["hstate"]
    haddr = va & ~((1 << (PAGE_SHIFT + h.order)) - 1)
    entry, _level_ = k.core.walk(vma.mm.pgd, haddr)
    if entry & C.PTE_PRESENT:
        if write and not entry & C.PTE_RW:
            return hugetlb_wp(k, vma, haddr, (entry & C.PTE_PFN_MASK) >> PAGE_SHIFT)
        return VM_FAULT_OK
    return hugetlb_no_page(k, vma, haddr, write)


def hugetlb_no_page(k, vma, haddr: int, write: bool) -> int:
    """A page-cache folio is mapped read-only (a write then copies it: hugetlb_wp, whose
    failure leaves the read-only entry);
    past EOF with none is VM_FAULT_SIGBUS; else a new zeroed anonymous folio, mapped
    writable on a write (hugetlb_wp reuses an exclusive anon folio)."""
    core, inode = k.core, vma.inode
    h = inode.private["hstate"]
    base = vma.pgoff + ((haddr - vma.start) >> PAGE_SHIFT)
    folio = inode.pages.get(base)
    if folio is not None and core.mapping(folio) != inode.ino:
        folio = None
    level = _level(h)
    if folio is not None:
        if core.flags(folio) & PG_hwpoison:
            return VM_FAULT_HWPOISON_LARGE
        k.mm.set_pte(vma.mm, haddr, folio, False, False, level)
        if write:                          # "Optimization, do the COW without a second fault"
            return hugetlb_wp(k, vma, haddr, folio)
        return VM_FAULT_OK
    if base << PAGE_SHIFT >= inode.size:
        return VM_FAULT_SIGBUS
    head, _used = _alloc(k, vma, base, False)
    if head is None:
        return VM_FAULT_SIGBUS                         # vmf_error(-ENOSPC)
    if head in h.clean:
        h.clean.discard(head)                          # never used since boot: still zero
    else:
        core.phys_zero(head, 1 << h.order)
    _new_anon_folio(k, h, head, haddr)
    _map_anon(k, vma, haddr, head, write, level)
    return VM_FAULT_OK


def hugetlb_wp(k, vma, haddr: int, old: int) -> int:
    """A write to a read-only private entry: an anonymous folio mapped only here is
    reused; anything else (a page-cache folio, a folio fork shares) is copied."""
    core = k.core
    h = vma.inode.private["hstate"]
    if core.flags(old) & PG_anon and core.mapcount(old) == 1:
        core.pte_set(vma.mm.pgd, haddr, core.pte_get(vma.mm.pgd, haddr, _level(h))
                     | C.PTE_RW | C.PTE_DIRTY, _level(h))
        return VM_FAULT_OK
    base = vma.pgoff + ((haddr - vma.start) >> PAGE_SHIFT)
    # cow_from_owner: the owner copying a folio fork shares allocates outside its
    # reservations (that index's was consumed by the folio being copied)
    owner = vma.resv is not None and bool(core.flags(old) & PG_anon)
    return _cow(k, vma, haddr, old, base, owner)


def _cow(k, vma, haddr: int, old: int, base: int, avoid_reserve: bool) -> int:
    """Copy `old` into a new anonymous folio mapped writable at haddr in place of the
    read-only entry.  copy_user_large_folio() is machine-check safe: a latent error
    leaves everything as it was and is VM_FAULT_HWPOISON_LARGE, memory_failure()
    queued for the bad page."""
    h = vma.inode.private["hstate"]
    new, used = _alloc(k, vma, base, avoid_reserve)
    if new is None:
        return VM_FAULT_SIGBUS
    h.clean.discard(new)
    _new_anon_folio(k, h, new, haddr)
    if k.mm.copy_mc_highpages(new, old, 1 << h.order, _COW_STACK) >= 0:
        if used:
            _restore_reserve(vma, base)
        k.mm.folio_put(new)
        return VM_FAULT_HWPOISON_LARGE
    k.mm.zap_pte(vma.mm, haddr, False, _level(h))
    _map_anon(k, vma, haddr, new, True, _level(h))
    return VM_FAULT_OK


def copy_hugetlb_page_range(k, src, dst) -> None:
    """fork of a HugeTLB VMA with an anon_vma: hwpoison entries are copied as they are;
    a private (COW) mapping's entries are write-protected in the parent and mapped
    read-only in the child, both then mapping the folio (mapcount and reference)."""
    core = k.core
    cow = not src.shared
    wrprotected = False
    for va, e, level in core.pt_scan(src.mm.pgd, src.start, src.end):
        if not e & C.PTE_PRESENT:
            if e & C.PTE_HWPOISON:
                core.pte_set(dst.mm.pgd, va, e, level)
            continue
        pfn = (e & C.PTE_PFN_MASK) >> PAGE_SHIFT
        if cow and e & C.PTE_RW:
            core.pte_clear_ad(src.mm.pgd, va, C.PTE_RW, level)    # huge_ptep_set_wrprotect
            e &= ~C.PTE_RW
            wrprotected = True
        k.mm.set_pte(dst.mm, va, pfn, bool(e & C.PTE_RW), bool(e & C.PTE_DIRTY), level)
        if core.flags(pfn) & PG_anon:
            k.hugetlb.anon_maps.setdefault(pfn, []).append((dst.mm, va))
    if wrprotected:
        k.synchronize_rcu()           # flush_tlb_mm: no CPU still stores through the old entry


def restore_reserve_on_unmap(k, vma, va: int, e: int) -> None:
    """__unmap_hugepage_range() (munmap, MADV_DONTNEED, truncation, exit): zapping an
    anonymous folio of a private VMA owning a resv_map gives its index the reservation
    back (vma_add_reservation); HugePages_Rsvd counts it when the folio is freed
    (folio_set_hugetlb_restore_reserve, free_huge_folio)."""
    if vma is None or vma.resv is None or not e & C.PTE_PRESENT:
        return
    head = (e & C.PTE_PFN_MASK) >> PAGE_SHIFT
    base = vma.pgoff + ((va - vma.start) >> PAGE_SHIFT)
    # only a folio this zap frees: a fork child still sharing one is left alone (see
    # docs/deviations.md)
    if k.core.flags(head) & PG_anon and k.core.mapcount(head) == 1 and base in vma.resv.consumed:
        vma.resv.consumed.discard(base)
        k.hugetlb.restore_reserve.add(head)


def anon_rmap_walk(k, head: int) -> list[tuple]:
    """(mm, va, pfn, vma, level) for each entry mapping the anonymous huge folio, newest
    first; entries the page tables no longer hold are dropped."""
    core = k.core
    level = 2 if core.order(head) == 9 else 3
    ents = k.hugetlb.anon_maps.get(head, [])
    out, seen, keep = [], set(), []
    for mm, va in reversed(ents):
        key = (mm.pgd, va)
        if key in seen or core.pte_pfn(mm.pgd, va, level) != head:
            continue
        seen.add(key)
        keep.append((mm, va))
        out.append((mm, va, head, mm.find_vma(va), level))
    if ents:
        ents[:] = keep[::-1]
    return out
