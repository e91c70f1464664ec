"""Page flags and the buddy allocator (mm/page_alloc.c in miniature).

Frame state lives in the shared-memory frame table (struct page / struct folio);
the free lists are the supervisor's own, as they are the kernel's.  Frames a zap
freed go through a grace period before reuse (emulated TLB shootdown): a CPU
that walked the old PTE may still be copying from them.  They wait in `pending`,
the emulator's per-CPU lists: not free memory yet (not PageBuddy, not MemFree),
but free pages to memory failure, whose zone_pcp_disable() drains the per-CPU
lists first (is_free_buddy_page, take_page_off_buddy).  Retiring one at once is
safe: a retired frame is never handed out, so a late reader only sees old data.
"""
from __future__ import annotations

from collections import deque

from .. import _core as C

PAGE_SHIFT = 12            # arch/x86/include/asm/page_types.h
PAGE_SIZE = 1 << PAGE_SHIFT

# page flags (our bit numbers, the kernel's names)
PG_locked = 1 << 0
PG_referenced = 1 << 1
PG_uptodate = 1 << 2
PG_dirty = C.PG_DIRTY     # the core moves a zapped dirty PTE's bit to it
PG_lru = 1 << 4
PG_head = C.PG_HEAD       # the core resolves zero tail frames through it
PG_active = 1 << 6
PG_writeback = 1 << 7
PG_reserved = 1 << 8
PG_swapbacked = 1 << 9
PG_unevictable = 1 << 10
PG_mlocked = 1 << 11
PG_hwpoison = C.PG_HWPOISON  # try_to_unmap leaves hwpoison entries for it
PG_buddy = 1 << 13        # a page type in the kernel; the head of a free block
PG_slab = 1 << 14
PG_anon = 1 << 15         # folio_test_anon: mapping has PAGE_MAPPING_ANON
PG_hugetlb = 1 << 16
PG_swapcache = 1 << 17
PG_private = 1 << 18
PG_error = 1 << 19

# ---- page->flags as the kernel lays them out, for %pGp (dmesg only) ----
# include/linux/page-flags.h enum pageflags, 6.18 x86_64 (CONFIG_MMU, CONFIG_MEMORY_FAILURE,
# CONFIG_PAGE_IDLE_FLAG): our flags that are page flags there, and their bit numbers.
# PG_buddy, PG_slab and PG_hugetlb are page types, PG_anon a bit of ->mapping: not shown.
KERNEL_PAGEFLAG = ((PG_locked, "locked", 0), (PG_writeback, "writeback", 1),
                   (PG_referenced, "referenced", 2), (PG_uptodate, "uptodate", 3),
                   (PG_dirty, "dirty", 4), (PG_lru, "lru", 5), (PG_head, "head", 6),
                   (PG_active, "active", 8), (PG_swapcache, "owner_priv_1", 10),
                   (PG_reserved, "reserved", 13), (PG_private, "private", 14),
                   (PG_swapbacked, "swapbacked", 17), (PG_unevictable, "unevictable", 18),
                   (PG_mlocked, "mlocked", 20), (PG_hwpoison, "hwpoison", 21))
# include/trace/events/mmflags.h __def_pageflag_names: the order %pGp prints names in
PAGEFLAG_NAMES = ("locked", "waiters", "referenced", "uptodate", "dirty", "lru", "active",
                  "workingset", "owner_priv_1", "owner_2", "arch_1", "reserved", "private",
                  "private_2", "writeback", "head", "reclaim", "swapbacked", "unevictable",
                  "dropbehind", "mlocked", "hwpoison", "idle", "young")
# include/linux/page-flags-layout.h on a distribution x86_64 config (SPARSEMEM_VMEMMAP: no
# section field; NODES_SHIFT 10; ZONE_DEVICE: 3 zone bits; NUMA_BALANCING with NR_CPUS
# 8192: a 21-bit last_cpupid, reset to all ones); no KASAN tags
NODES_PGSHIFT, ZONES_PGSHIFT, LAST_CPUPID_PGSHIFT = 54, 51, 30
LAST_CPUPID_MASK = (1 << 21) - 1
ZONE_DMA, ZONE_DMA32, ZONE_NORMAL = 0, 1, 2


def page_zonenum(pfn: int) -> int:
    """x86-64 zones: DMA below 16 MiB, DMA32 below 4 GiB, Normal above (one node)."""
    return ZONE_DMA if pfn < (16 << 20) >> 12 else ZONE_DMA32 if pfn < (4 << 30) >> 12 \
        else ZONE_NORMAL


def format_page_flags(flags: int, pfn: int) -> str:
    """lib/vsprintf.c format_page_flags(), what %pGp prints for a page with our
    `flags` at `pfn`: the whole flags word, then the set flags by name and the
    fields ("0x...(uptodate|lru|node=0|zone=1|lastcpupid=0x1fffff)")."""
    bits = {name: bit for pg, name, bit in KERNEL_PAGEFLAG if flags & pg}
    zone = page_zonenum(pfn)
    word = (0 << NODES_PGSHIFT) | (zone << ZONES_PGSHIFT) \
        | (LAST_CPUPID_MASK << LAST_CPUPID_PGSHIFT)
    for bit in bits.values():
        word |= 1 << bit
    fields = [n for n in PAGEFLAG_NAMES if n in bits]
    fields += ["node=0", "zone=%d" % zone, "lastcpupid=%#x" % LAST_CPUPID_MASK]
    return "%#x(%s)" % (word, "|".join(fields))


MAX_PAGE_ORDER = 10
NR_RESERVED = 16          # low frames the "kernel image" owns (PG_reserved)
ZERO_PFN = NR_RESERVED - 1   # empty_zero_page, in the kernel image: my_zero_pfn()
POPULATE_AHEAD = 256      # never-used frames whose host memory is kept faulted in


class BuddyAllocator:
    """Per-order free lists of block heads; PG_buddy + order mark a free block."""

    def __init__(self, core, nframes: int, reserved: int = NR_RESERVED, skip=()):
        self.core = core
        self.nframes = nframes
        self.free_area: list[set[int]] = [set() for _ in range(MAX_PAGE_ORDER + 1)]
        self.nr_free = 0
        self.pending: deque[tuple[int, int, int]] = deque()   # (epoch, pfn, order)
        for pfn in range(reserved):
            core.set_folio(pfn, 0, PG_reserved, 1, 0, 0)
        # free memory = [reserved, nframes) minus the ranges boot code took (HugeTLB)
        holes = sorted(skip)
        spans, pos = [], reserved
        for start, n in holes:
            if start > pos:
                spans.append((pos, start))
            pos = max(pos, start + n)
        spans.append((pos, nframes))
        # never-used RAM goes out bottom-up (the lowest free block is split first):
        # frames at and above hiwater are fresh; see populate_ahead()
        self.hiwater = self.populated = spans[0][0]
        for lo, hi in spans:
            pfn = lo
            while pfn < hi:
                order = MAX_PAGE_ORDER
                while order and (pfn & ((1 << order) - 1) or pfn + (1 << order) > hi):
                    order -= 1
                self._add(pfn, order)
                pfn += 1 << order

    # -- free lists --
    def _add(self, pfn: int, order: int) -> None:
        self.core.set_folio(pfn, order, PG_buddy, 0, 0, 0)
        self.free_area[order].add(pfn)
        self.nr_free += 1 << order

    def _del(self, pfn: int, order: int) -> None:
        self.free_area[order].discard(pfn)
        self.core.set_flags(pfn, 0)
        self.nr_free -= 1 << order

    def alloc(self, order: int = 0) -> int:
        """A free block of 2**order frames, contents not cleared; raises MemoryError."""
        self.reclaim()
        for o in range(order, MAX_PAGE_ORDER + 1):
            if self.free_area[o]:
                pfn = min(self.free_area[o]) if o > order else self.free_area[o].pop()
                self.free_area[o].discard(pfn)
                self.nr_free -= 1 << o
                while o > order:               # split, keep the low half
                    o -= 1
                    self._add(pfn + (1 << o), o)
                self.core.set_flags(pfn, 0)
                if pfn + (1 << order) > self.hiwater:
                    self.hiwater = pfn + (1 << order)
                return pfn
        if self.pending:
            raise MemoryError("out of memory (frames wait for a grace period)")
        raise MemoryError("out of memory")

    def populate_ahead(self, n: int = 1) -> bool:
        """Idle work, the emulator's own: fault in the host memory behind up to n of
        the next POPULATE_AHEAD fresh frames, so that zeroing one on allocation is
        a memset, not a first-touch page fault of the host (~3 us here, the better
        part of a page-fault system call).  False when there is nothing to do."""
        start = max(self.populated, self.hiwater)
        end = min(start + n, self.hiwater + POPULATE_AHEAD, self.nframes)
        if start >= end:
            return False
        self.core.phys_populate(start, end - start)
        self.populated = end
        return True

    def free(self, pfn: int, order: int = 0) -> None:
        """Free after the current grace period (the caller just zapped its mappings)."""
        self.pending.append((self.core.epoch_bump(), pfn, order))

    def pending_block_of(self, pfn: int) -> int | None:
        """The index in `pending` of the freed block holding pfn, if any."""
        for i, (_epoch, head, order) in enumerate(self.pending):
            if head <= pfn < head + (1 << order):
                return i
        return None

    def free_now(self, pfn: int, order: int = 0) -> None:
        while order < MAX_PAGE_ORDER:
            buddy = pfn ^ (1 << order)
            if buddy not in self.free_area[order]:
                break
            self._del(buddy, order)
            pfn = min(pfn, buddy)
            order += 1
        self._add(pfn, order)

    def reclaim(self) -> None:
        core = self.core
        while self.pending and core.quiescent_since(self.pending[0][0]):
            _, pfn, order = self.pending.popleft()
            if core.flags(pfn) & PG_hwpoison:
                continue               # never hand a poisoned frame out again
            self.free_now(pfn, order)

    # -- hwpoison support --
    def free_block_of(self, pfn: int) -> tuple[int, int] | None:
        """The block (head, order) on the free lists holding pfn, if any (PageBuddy)."""
        for order in range(MAX_PAGE_ORDER + 1):
            head = pfn & ~((1 << order) - 1)
            if head in self.free_area[order]:
                return head, order
        return None

    def is_free_buddy_page(self, pfn: int) -> bool:
        """is_free_buddy_page() after zone_pcp_disable(): on the free lists, or freed
        and waiting for its grace period (the per-CPU lists it would drain)."""
        return self.free_block_of(pfn) is not None or self.pending_block_of(pfn) is not None

    def take_page_off_buddy(self, pfn: int) -> bool:
        """Remove one frame from the free lists for good (page_handle_poison).  A frame
        still in its grace period is taken from its freed block; the rest of the
        block keeps waiting with the block's epoch."""
        blk = self.free_block_of(pfn)
        if blk is not None:
            head, order = blk
            self._del(head, order)
            for h, o in _split_around(head, order, pfn):
                self._add(h, o)
        else:
            i = self.pending_block_of(pfn)
            if i is None:
                return False
            epoch, head, order = self.pending[i]
            del self.pending[i]
            for j, (h, o) in enumerate(_split_around(head, order, pfn)):
                self.core.set_folio(h, o, 0, 0, 0, 0)   # its frames no longer point at pfn
                self.pending.insert(i + j, (epoch, h, o))
        self.core.set_folio(pfn, 0, 0, 0, 0, 0)
        return True

    def put_back(self, pfn: int) -> None:
        """unpoison of a page taken off buddy: give it back (put_page_back_buddy).  It
        may have been taken while CPUs could still read it, so it goes through a
        grace period like any freed frame; with no CPU inside an access that is
        now."""
        self.free(pfn, 0)
        self.reclaim()


def _split_around(head: int, order: int, pfn: int) -> list[tuple[int, int]]:
    """break_down_buddy_pages(): the blocks (head, order) left of a block of 2**order
    frames once pfn is taken out of it."""
    out = []
    while order:
        order -= 1
        half = 1 << order
        if pfn >= head + half:
            out.append((head, order))
            head += half
        else:
            out.append((head + half, order))
    return out
