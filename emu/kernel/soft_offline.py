"""Soft offline (the second half of mm/memory-failure.c): take a page that is still
good but suspected out of use without killing anything: free pages come off the
free lists, in-use pages are migrated (or dropped, when clean and unmapped), and
the old frame is retired with page_handle_poison().  A mixin of MemoryFailure,
which holds the state (k, num_poisoned_pages, the loggers) both halves share."""
from __future__ import annotations

from .. import uapi as u
from .page_alloc import (
    PG_anon,
    PG_dirty,
    PG_hugetlb,
    PG_hwpoison,
    PG_lru,
    PG_slab,
    PG_swapcache,
    PG_writeback,
    format_page_flags,
)

MAGIC_HWPOISON = 0x48575053   # page->private of a page taken off buddy


class SoftOffline:
    # ------------------------------------------------------------ soft_offline_page()
    def soft_offline_page(self, pfn: int) -> int:
        """soft_offline_page(): take a page that is still good out of use without
        killing anything: an in-use page is migrated (or, clean and unmapped in the
        page cache, dropped), a free one taken off the allocator; the frame is then
        HWPoison for good.  No signal, content kept, HardwareCorrupted rises (the mf
        stats do not).  The checks come in the kernel's order."""
        k, core = self.k, self.k.core
        if pfn < 0 or pfn >= core.nframes:
            return -u.ENXIO                                 # !pfn_valid()
        mode = k.sysctl["vm.enable_soft_offline"]
        if not mode & u.SOFT_OFFLINE_ENABLED:
            self.soft_info_once("disabled by /proc/sys/vm/enable_soft_offline")
            return -u.EOPNOTSUPP
        if mode & u.SOFT_OFFLINE_SKIP_HUGETLB and core.flags(core.head(pfn)) & PG_hugetlb:
            self.soft_info_once("disabled for HugeTLB pages by /proc/sys/vm/enable_soft_offline")
            return -u.EOPNOTSUPP
        if core.flags(pfn) & PG_hwpoison:
            self.soft_log("%#x: page already poisoned", pfn)
            return 0
        for _try in range(2):                       # a free page lost to a race: once more
            ret = self.get_any_page(pfn)
            if ret > 0:
                ret = self.soft_offline_in_use_page(pfn)
                k.trace("soft_offline", pfn=pfn, ret=ret)
                self.run_queued()                   # a failed copy's memory_failure()
                return ret
            if ret < 0:
                return ret
            if self.page_handle_poison(pfn, True, False):
                k.trace("soft_offline", pfn=pfn, ret=0)
                return 0
        return -u.EBUSY

    def soft_info_once(self, msg: str) -> None:
        """pr_info_once(): the first time since boot only."""
        if msg not in self.printed_once:
            self.printed_once.add(msg)
            self.soft_log(msg)

    def drain_all_pages(self) -> None:
        """Put frames still waiting out their grace period (the emulator's per-CPU
        lists) on the free lists, as drain_all_pages() does, so MemFree shows them."""
        self.k.synchronize_rcu()
        self.k.buddy.reclaim()

    def get_any_page(self, pfn: int) -> int:
        """get_hwpoison_page(p, MF_SOFT_OFFLINE) -> get_any_page(): 1 for an in-use
        page soft offline can handle (on the LRU, or a migratable HugeTLB folio), 0
        for a free one (a free buddy page, a freed huge page), else -EIO after
        "unhandlable page." (logged under memory failure's prefix)."""
        k, core = self.k, self.k.core
        head = core.head(pfn)
        fl, ref = core.flags(head), core.refcount(head)
        h = k.hugetlb.by_order.get(core.order(head)) if k.hugetlb is not None \
            and fl & PG_hugetlb else None
        if h is not None:                                # get_hwpoison_hugetlb_folio()
            if ref == 0 and head in h.free:
                return 0                                 # folio_test_hugetlb_freed()
            if ref > 0 and not fl & PG_hwpoison:         # ...hugetlb_migratable()
                return 1
        elif ref == 0:
            if k.buddy.is_free_buddy_page(pfn):          # after zone_pcp_disable()
                return 0
        elif fl & PG_lru and not fl & PG_slab:           # HWPoisonHandlable()
            return 1
        self.log("%#x: unhandlable page.", pfn)
        return -u.EIO

    def soft_offline_in_use_page(self, pfn: int) -> int:
        """soft_offline_in_use_page(): try to drop a clean unmapped page-cache folio
        (mapping_evict_folio), else isolate (isolate_hugetlb / the LRU) and migrate,
        then page_handle_poison().  A failed migration: -EBUSY for a count of folios
        left behind, the error itself otherwise (-ENOMEM: no target)."""
        core = self.k.core
        head = core.head(pfn)
        huge = bool(core.flags(head) & PG_hugetlb)
        what = "hugepage" if huge else "page"
        if not huge and core.order(head):                # no THP is ever made here
            self.soft_log("%#x: thp split failed", pfn)
            return -u.EBUSY
        fl = core.flags(head)
        if not huge and fl & PG_lru and not fl & PG_swapcache and self.mapping_evict_folio(head):
            self.soft_log("%#x: invalidated", pfn)
            self.page_handle_poison(pfn, False, True)
            return 0
        isolated = (core.refcount(head) > 0 and not fl & PG_hwpoison) if huge else fl & PG_lru
        if not isolated:
            self.soft_log("%#x: %s isolation failed, page count %d, type %s", pfn, what,
                          core.refcount(head), format_page_flags(core.flags(pfn), pfn))
            return -u.EBUSY
        ret = self.migrate_pages(head)
        if ret == 0:
            if not self.page_handle_poison(pfn, huge, not huge):
                ret = -u.EBUSY
        else:
            self.soft_log("%#x: %s migration failed %d, type %s", pfn, what, ret,
                          format_page_flags(core.flags(pfn), pfn))
            if ret > 0:
                ret = -u.EBUSY
        return ret

    def mapping_evict_folio(self, head: int) -> bool:
        """mm/truncate.c mapping_evict_folio(): remove a clean page-cache folio that
        nobody maps or holds (refcount: the page cache's alone) from its file.
        Anonymous folios have no mapping.  (A page of a split HugeTLB guest_memfd
        folio, out-of-tree, is left to migration, which refuses it.)"""
        from .fs import filemap_remove_folio

        k, core = self.k, self.k.core
        fl = core.flags(head)
        inode = None if fl & PG_anon else k.inodes.get(core.mapping(head))
        if inode is None or fl & (PG_dirty | PG_writeback) or core.refcount(head) > 1 \
                or k.mm.folio_mapped(head):
            return False
        if k.hugetlb is not None and k.hugetlb.groups and k.hugetlb.split_group_of(head) is not None:
            return False
        core.ref_add(head, 1)                            # get_any_page()'s reference
        filemap_remove_folio(k, inode, head)             # remove_mapping()
        return True

    def migrate_pages(self, head: int) -> int:
        """migrate_pages(MR_MEMORY_FAILURE) of one isolated folio: 0 when it moved, else
        the number of folios that did not (1: also a copy that hit a latent error,
        folio_mc_copy()'s -EHWPOISON, migrate_folios_move()'s "other errno"), or
        -ENOMEM when no target page could be allocated."""
        k = self.k
        if self.gmem_inode_of(head) is not None:
            # move_to_new_folio(): a mapping_inaccessible() mapping (guest_memfd) gets
            # -EOPNOTSUPP before any migrate_folio: one folio not migrated
            return 1
        if k.core.flags(head) & PG_hugetlb:
            return k.hugetlb.migrate(head)
        try:
            new = k.buddy.alloc(0)                       # alloc_migration_target()
        except MemoryError:
            return -u.ENOMEM
        if k.mm.migrate_folio(head, new):                # -EHWPOISON: the copy failed
            k.buddy.free(new, 0)                         # migrate_folio_undo_dst()
            return 1
        return 0

    def page_handle_poison(self, pfn: int, hugepage_or_freepage: bool, release: bool) -> bool:
        """page_handle_poison(): make the frame HWPoison for good.  A free page, or
        the raw page of a huge page (dissolved first: dissolve_free_hugetlb_folio),
        must come off the buddy lists, else False and nothing changes.  `release`:
        the caller's reference goes (the frame is freed, and a HWPoison page never
        reaches the free lists); either way one reference keeps it."""
        k, core = self.k, self.k.core
        if hugepage_or_freepage:
            head = core.head(pfn)
            if k.hugetlb is not None and core.flags(head) & PG_hugetlb \
                    and k.hugetlb.dissolve_free_hugetlb_folio(head) < 0:
                return False
            if not k.buddy.take_page_off_buddy(pfn):     # per-CPU lists included
                return False
            self.drain_all_pages()                       # the rest reaches the free lists
            core.set_folio(pfn, 0, PG_hwpoison, 1, 0, 0)
            core.set_private(pfn, MAGIC_HWPOISON)        # SetPageHWPoisonTakenOff()
        else:
            core.set_folio(pfn, 0, PG_hwpoison, 1, 0, 0)
        self.num_poisoned_pages += 1
        return True
