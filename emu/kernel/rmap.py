"""Reverse mapping (mm/rmap.c): from a folio to the page-table entries that map it,
and what memory_failure() and migration do through them (try_to_unmap,
folio_mkclean).  A mixin of MM: `k.mm.rmap_walk(head)`.

An anonymous 4K folio has one mapping (anon_rmap: no fork sharing is kept for it
here, fork copies); an anonymous HugeTLB folio is found through its private
mappings (hugetlb_fault.anon_rmap_walk); a file folio through the file's i_mmap,
walked in the core (rmap_file / unmap_file).
"""
from __future__ import annotations

from .. import _core as C
from . import hugetlb_fault
from .page_alloc import PAGE_SIZE, PG_anon, PG_hugetlb, PG_hwpoison


class Rmap:
    def rmap_walk(self, head: int) -> list[tuple]:
        """(mm, va, pfn, vma, level) for every entry that maps a page of the folio
        (one huge entry for a HugeTLB folio)."""
        core = self.core
        out: list[tuple] = []
        fl = core.flags(head)
        if fl & PG_anon and fl & PG_hugetlb:
            return hugetlb_fault.anon_rmap_walk(self.k, head)
        if fl & PG_anon:
            ent = self.anon_rmap.get(head)
            if ent is not None:
                mm, va = ent
                if core.pte_pfn(mm.pgd, va) == head:
                    out.append((mm, va, head, mm.find_vma(va), 1))
            return out
        inode = self.k.inodes.get(core.mapping(head))
        if inode is None:
            return out
        n, level = self._span(head, fl)
        vma_of = self.k.vma_of
        for s, va, pfn in core.rmap_file(inode.slot, head, core.index(head), n, level):
            vma = vma_of[s]
            out.append((vma.mm, va, pfn, vma, level))
        return out

    def _span(self, head: int, fl: int) -> tuple[int, int]:
        """(pages, level) a folio is mapped with: page by page, or one HugeTLB entry."""
        order = self.core.order(head)
        return (1, 2 if order == 9 else 3) if fl & PG_hugetlb else (1 << order, 1)

    def try_to_unmap(self, head: int, hwpoison: bool, sends: list | None = None) -> None:
        """try_to_unmap(folio, TTU_HWPOISON?): poisoned subpages become hwpoison entries.

        A file folio's rmap walk and zaps run in the core, in one call, after the MMU
        notifiers of its mappings (try_to_unmap_one's invalidate_range_start).  With
        `sends` (Signals.early_records, file folios only) that call also posts them,
        right after the last zap; kill_procs then accounts for them (Signals.posted_early)."""
        core, k = self.core, self.k
        fl = core.flags(head)
        inode = None if fl & PG_anon and not fl & PG_hugetlb else k.inodes.get(core.mapping(head))
        if inode is None:
            assert not sends, "the core sends only after a file folio's unmap"
            for mm, va, pfn, _vma, level in self.rmap_walk(head):
                poison = hwpoison and core.flags(pfn) & PG_hwpoison != 0
                self.zap_pte(mm, va, poison, level)
                k.trace("unmap", mm=mm.slot, addr=va, pfn=pfn, hwpoison=poison, level=level)
            return
        n, level = self._span(head, fl)
        index, vma_of = core.index(head), k.vma_of
        if k.kvm.vms:
            for s, va, _pfn in core.rmap_file(inode.slot, head, index, n, level):
                if vma_of[s].mm.kvm_users:
                    k.kvm.mmu_notifier_invalidate(vma_of[s].mm, va, PAGE_SIZE << 9 * (level - 1))
        zapped, done, sent = core.unmap_file(inode.slot, head, index, n, level, hwpoison, sends)
        if sends:
            k.signals.posted_early(sends, sent)
        for s, va, pfn, poison, refs in zapped:
            if refs <= 0:
                self.folio_free(head)
            k.trace("unmap", _ts=done, mm=vma_of[s].mm.slot, addr=va, pfn=pfn, hwpoison=poison,
                    level=level)

    def folio_mkclean(self, head: int) -> bool:
        """page_mkclean_one() on every mapping: write-protect and clean the entry (the
        next store faults and dirties the folio again), with the MMU notifiers of a
        writable one; True if any entry was dirty."""
        core, k = self.core, self.k
        dirty = False
        for mm, va, _pfn, _vma, level in self.rmap_walk(head):
            old = core.pte_clear_ad(mm.pgd, va, C.PTE_DIRTY | C.PTE_RW, level)
            dirty |= bool(old & C.PTE_DIRTY)
            if old & C.PTE_RW and mm.kvm_users:
                k.kvm.mmu_notifier_invalidate(mm, va, PAGE_SIZE << 9 * (level - 1))
        if dirty:
            k.synchronize_rcu()        # a store that saw the old entry has landed
        return dirty
