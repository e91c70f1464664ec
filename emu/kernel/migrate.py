"""Page migration (mm/migrate.c) and the machine-check-safe copy it and COW use
(folio_mc_copy, copy_mc_user_highpage).  A mixin of MM: `k.mm.migrate_folio(old, new)`.
"""
from __future__ import annotations

from .. import _core as C
from .. import uapi as u
from .page_alloc import PAGE_SHIFT, PAGE_SIZE, PG_anon, PG_hugetlb

_MIGRATE_STACK = ("copy_mc_enhanced_fast_string", "copy_mc_to_kernel", "folio_mc_copy",
                  "__migrate_folio", "move_to_new_folio", "migrate_pages_batch", "migrate_pages",
                  "soft_offline_in_use_page")


class Migrate:
    def migrate_folio(self, old: int, new: int) -> int:
        """migrate_pages() of one folio (order 0, or a HugeTLB folio mapped whole) to
        the free folio at `new`: try_to_migrate (each mapping's MMU notifiers, so KVM
        drops the stage-2 entries it made from it, then the PTE goes), copy, then
        remove_migration_ptes (the same entries, now to `new`), and the page cache
        (or the anon rmap) follows.  The old folio is left unreferenced, its
        mappings gone, for the caller; 0.

        The copy is folio_mc_copy() (__migrate_folio, hugetlbfs_migrate_folio): a
        latent error in the source fails it with -EHWPOISON, returned after
        remove_migration_ptes(src, src) put the old entries back; `new` is untouched
        and memory_failure() of the bad page is queued (copy_mc_highpage())."""
        core, k = self.core, self.k
        flags, order = core.flags(old), core.order(old)
        mapping, index = core.mapping(old), core.index(old)
        saved = []
        for mm, va, _p, _v, level in self.rmap_walk(old):
            if mm.kvm_users:
                k.kvm.mmu_notifier_invalidate(mm, va, PAGE_SIZE << 9 * (level - 1))
            saved.append((mm, va, level, core.pte_xchg(mm.pgd, va, 0, level)))
        # no CPU may still be copying through an old translation (host or stage-2)
        k.synchronize_rcu()
        if self.copy_mc_highpages(new, old, 1 << order, _MIGRATE_STACK) >= 0:
            for mm, va, level, e in saved:               # migrate_folio_undo_src()
                core.pte_set(mm.pgd, va, e, level)
            return -u.EHWPOISON
        inode = None if flags & PG_anon and not flags & PG_hugetlb else k.inodes.get(mapping)
        core.set_folio(new, order, flags, len(saved) + (1 if inode is not None else 0), mapping,
                       index, bool(flags & PG_hugetlb))
        for mm, va, level, e in saved:
            core.pte_set(mm.pgd, va, (e & ~C.PTE_PFN_MASK) | (new << PAGE_SHIFT), level)
            core.map_add(new, 1)
        if inode is not None:
            inode.pages[index] = new
        if old in self.anon_rmap:
            self.anon_rmap[new] = self.anon_rmap.pop(old)
        k.trace("migrate", pfn=old, new=new, order=order)
        return 0

    def copy_mc_highpages(self, dst: int, src: int, npages: int, stack: tuple[str, ...]) -> int:
        """folio_mc_copy() / copy_mc_user_highpage(): copy page by page with
        copy_mc_to_kernel(); a page with a latent error raises a recoverable #MC
        (mce.kernel_copy_mc) and the copy stops there, memory_failure_queue(pfn, 0)
        for it (the caller runs the queue).  Returns that pfn, or -1 when all was
        copied."""
        core = self.core
        for i in range(npages):
            if core.hwerr(src + i):
                self.k.mce.kernel_copy_mc(self.k.current, src + i, stack)
                self.k.memory_failure.queue(src + i)
                return src + i
        core.phys_copy(dst, src, npages)
        return -1
