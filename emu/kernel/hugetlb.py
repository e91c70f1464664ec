"""HugeTLB pools (mm/hugetlb.c): huge pages reserved at boot, per size (hstate).

This module reserves the pools and accounts them (/proc/meminfo).  Huge folios
for hugetlbfs memfd and HugeTLB guest_memfd, and their hwpoison handling, build
on it (see the HugeTLB issue).
"""
from __future__ import annotations

from dataclasses import dataclass, field

HSTATE_ORDER = {"2M": 9, "1G": 18}


@dataclass
class HState:
    name: str
    order: int
    free: list[int] = field(default_factory=list)     # head pfns on the free list
    nr_huge_pages: int = 0

    @property
    def size_kb(self) -> int:
        return 4 << self.order


def reserve_boot_pages(nframes: int, pools: dict) -> tuple[dict[str, HState], list[tuple[int, int]]]:
    """Carve naturally aligned huge pages from the top of memory, largest first, as
    many as fit (like hugepages= on the command line, a shortfall is not an error).
    Returns the hstates and the (start, npages) ranges the buddy allocator skips."""
    hstates, ranges = {}, []
    top = nframes
    for name in sorted(HSTATE_ORDER, key=lambda n: -HSTATE_ORDER[n]):
        order = HSTATE_ORDER[name]
        h = HState(name, order)
        for _ in range(int(pools.get(name, 0) or 0)):
            start = ((top - (1 << order)) >> order) << order
            if start < (64 << (20 - 12)):           # keep the first 64 MiB for the buddy allocator
                break
            h.free.append(start)
            ranges.append((start, 1 << order))
            top = start
        h.nr_huge_pages = len(h.free)
        hstates[name] = h
    return hstates, ranges


class HugeTLB:
    def __init__(self, k, hstates: dict[str, HState]):
        self.k = k
        self.hstates = hstates
        from .page_alloc import PG_hugetlb

        for h in hstates.values():
            for head in h.free:
                k.core.set_folio(head, h.order, PG_hugetlb, 0, 0, 0)

    def meminfo(self) -> dict:
        d = self.hstates.get("2M")
        total_kb = sum(h.nr_huge_pages * h.size_kb for h in self.hstates.values())
        return {
            "HugePages_Total": d.nr_huge_pages if d else 0,
            "HugePages_Free": len(d.free) if d else 0,
            "HugePages_Rsvd": 0,
            "HugePages_Surp": 0,
            "Hugepagesize": 2048,
            "Hugetlb": total_kb,
        }

    def memfd_create(self, proc, name: str, flags: int) -> int:
        raise OSError(95, "hugetlbfs memfd is not emulated yet")           # EOPNOTSUPP

    def try_memory_failure_hugetlb(self, mf, pfn: int, flags: int):
        """Not a hugetlb page unless it lies in a pool (huge folios come later)."""
        return None
