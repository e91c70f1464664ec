"""unpoison_memory() (mm/memory-failure.c, reached through hwpoison-inject's
unpoison-pfn): a page software-poisoned for a test is made usable again, after
the kernel's checks, in its order.  A mixin of MemoryFailure, as SoftOffline is."""
from __future__ import annotations

from .. import uapi as u
from .page_alloc import PG_anon, PG_hugetlb, PG_hwpoison, PG_reserved, PG_slab
from .soft_offline import MAGIC_HWPOISON


class Unpoison:
    def unpoison_memory(self, pfn: int) -> int:
        k, core = self.k, self.k.core

        def info(msg):
            k.log("Unpoison: " + msg % pfn)

        if pfn < 0 or pfn >= core.nframes:           # !pfn_valid(pfn)
            return -u.ENXIO
        head = core.head(pfn)
        if self.hw_memory_failure:
            info("%#x: disabled after HW memory failure")
            return -u.EOPNOTSUPP
        if not core.flags(pfn) & PG_hwpoison:
            info("%#x: page was already unpoisoned")
            return -u.EBUSY
        taken_off = core.frame(pfn)[7] == MAGIC_HWPOISON
        if core.refcount(head) > 1:
            info("%#x: someone grabs the hwpoison page")
            return -u.EBUSY
        if core.flags(head) & (PG_slab | PG_reserved):
            return -u.EBUSY
        if k.mm.folio_mapped(head):
            info("%#x: someone maps the hwpoison page")
            return -u.EBUSY
        if core.mapping(head) and not core.flags(head) & PG_anon:
            info("%#x: the hwpoison page has non-NULL mapping")
            return -u.EBUSY
        count = 1                                        # num_poisoned_pages_sub(pfn, 1)
        if core.flags(head) & PG_hugetlb and k.hugetlb is not None:
            # folio_free_raw_hwp(folio, false): each raw page leaves the count and the
            # raw list is emptied (before the last put can free the folio); none on
            # record (raw_hwp_unreliable) refuses, silently
            count = len(k.hugetlb.raw_hwp.pop(head, ()))
            if not count:
                return -u.EBUSY
        core.test_clear_flag(pfn, PG_hwpoison)
        if taken_off:                                    # put_page_back_buddy
            core.set_private(pfn, 0)
            core.set_folio(pfn, 0, 0, 0, 0, 0)
            k.buddy.put_back(pfn)
        elif core.refcount(head) > 0:
            k.mm.folio_put(head)
        self.num_poisoned_pages -= count
        info("%#x: software-unpoisoned page")
        k.trace("unpoison", pfn=pfn)
        return 0
