"""Invariant checks on the emulated kernel's own state (CONFIG_DEBUG_VM in spirit).

`check_invariants(k)` walks the allocator's lists, the HugeTLB pools, the core's
frame table and every host and stage-2 page table, and returns one line per
violation (empty: all hold).  Nothing here trusts a counter it checks: counts are
recomputed from the tables and compared with what meminfo reports.  It only reads.
"""
from __future__ import annotations

from .. import _core as C
from .hugetlb_fault import private_reserved
from .mm import TASK_SIZE
from .page_alloc import PG_buddy, PG_head, PG_hugetlb, PG_hwpoison, PG_reserved

# what owns a frame (one byte per frame while checking)
FREE, PENDING, POOL, SPLIT, RESERVED, USED, POISONED = 1, 2, 3, 4, 5, 6, 7
_NAME = {FREE: "free", PENDING: "freed (grace period)", POOL: "HugeTLB pool", SPLIT: "split HugeTLB",
         RESERVED: "reserved", USED: "in use", POISONED: "poisoned"}
_GONE = (FREE, PENDING, POOL)            # a frame nobody may map
_MAX = 20                                 # violations reported per invariant


class _Frames:
    """The shared frame table (emu_frame, see cext/layout.h), read in place.  Only
    frames with a flag, a reference or a mapping are looked at one by one (fresh and
    free tail frames have none); the core finds them in one pass."""

    def __init__(self, core):
        info = core.info()
        n, size, off = info["nframes"], info["sizeof_frame"], info["off_frames"]
        cv, _pv = core.views()
        raw = cv[off:off + n * size]
        self.q = q = raw.cast("Q")
        self.w = w = size // 8
        self.n = n
        busy, self.poisoned = core.frames_scan()
        self.ref_nz, self.map_nz = {}, {}
        for pfn in busy:
            v = q[pfn * w + 1]                     # refcount | mapcount << 32 (int32 each)
            if v & 0xFFFFFFFF:
                self.ref_nz[pfn] = _s32(v)
            if v >> 32:
                self.map_nz[pfn] = _s32(v >> 32)
        self.interesting = busy

    def flags(self, pfn: int) -> int:
        return self.q[pfn * self.w]

    def ref(self, pfn: int) -> int:
        return self.ref_nz.get(pfn, 0)

    def head(self, pfn: int) -> int:
        return self.q[pfn * self.w + 2]

    def order(self, pfn: int) -> int:
        return self.q[pfn * self.w + 3] & 0xFFFFFFFF


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _mms(k):
    """(name, pgd, stage2) of every live address space: host mms and stage-2 roots."""
    for proc in k.tasklist:
        yield "mm %d (tgid %d)" % (proc.mm.slot, proc.tgid), proc.mm.pgd, False
    for i, vm in enumerate(k.kvm.vms):
        yield "stage-2 of vm %d" % i, vm.s2_root, True


def check_invariants(k) -> list[str]:
    """One line per violated invariant ("<invariant>: <what, with pfn/address>"),
    at most _MAX per invariant; empty when the kernel's state is consistent."""
    out: list[str] = []
    core, hugetlb, mf = k.core, k.hugetlb, k.memory_failure
    fr = _Frames(core)
    n = fr.n
    cls = bytearray(n)
    seen: dict[str, int] = {}

    def bad(inv: str, msg: str) -> None:
        seen[inv] = seen.get(inv, 0) + 1
        if seen[inv] <= _MAX:
            out.append("%s: %s" % (inv, msg))

    def claim(lo: int, nr: int, what: int, why: str) -> None:
        if lo < 0 or lo + nr > n:
            bad("frames", "%s block pfn %#x+%d outside memory" % (why, lo, nr))
            return
        part = cls[lo:lo + nr]
        if part.count(0) != nr:
            other = next(c for c in part if c)
            bad("frames", "pfn %#x+%d is %s and %s at once" % (lo, nr, why, _NAME[other]))
        cls[lo:lo + nr] = bytes((what,)) * nr

    # -- the allocator's and the pools' own lists
    buddy = k.buddy
    nr_free = 0
    for order, heads in enumerate(buddy.free_area):
        for pfn in heads:
            claim(pfn, 1 << order, FREE, "free (order %d)" % order)
            nr_free += 1 << order
            if pfn & ((1 << order) - 1):
                bad("buddy", "free block pfn %#x not aligned to its order %d" % (pfn, order))
            if not fr.flags(pfn) & PG_buddy or fr.order(pfn) != order or fr.ref(pfn):
                bad("buddy", "free block head pfn %#x: flags %#x order %d refcount %d"
                    % (pfn, fr.flags(pfn), fr.order(pfn), fr.ref(pfn)))
    if nr_free != buddy.nr_free:
        bad("buddy", "MemFree counts %d frames, the free lists hold %d" % (buddy.nr_free, nr_free))
    for _epoch, pfn, order in buddy.pending:
        if fr.flags(pfn) & PG_hwpoison:
            continue                    # reclaim keeps it off the lists: counted as poisoned
        claim(pfn, 1 << order, PENDING, "freed")
    groups = {}
    if hugetlb is not None:
        groups = hugetlb.groups
        for h in hugetlb.hstates.values():
            nr = 1 << h.order
            for head in h.free:
                claim(head, nr, POOL, "in the %s pool" % h.name)
                want = PG_hugetlb | PG_head
                if fr.flags(head) & want != want or fr.order(head) != h.order or fr.ref(head):
                    bad("hugetlb", "%s pool page pfn %#x: flags %#x order %d refcount %d"
                        % (h.name, head, fr.flags(head), fr.order(head), fr.ref(head)))
        for head, g in groups.items():
            claim(head, 1 << g["order"], SPLIT, "a split HugeTLB folio")

    # -- folios found in the frame table: in use, poisoned, reserved, or leaked
    mapped_refs: dict[int, int] = {}
    used_by_order: dict[int, int] = {}           # HugeTLB folios not in a pool
    for pfn in fr.interesting:
        if cls[pfn] or fr.head(pfn) != pfn:
            continue
        fl, ref = fr.flags(pfn), fr.ref(pfn)
        if fl & PG_head and fr.order(pfn) in (9, 18):
            nr = 1 << fr.order(pfn)
        else:
            nr = 1 << fr.order(pfn) if fr.order(pfn) <= 18 else 1
        if fl & PG_reserved:
            what = RESERVED
        elif fl & PG_hwpoison:
            what = POISONED
        elif ref > 0:
            what = USED
        else:
            bad("frames", "pfn %#x (%d frames) leaked: refcount %d, flags %#x, on no free list"
                % (pfn, nr, ref, fl))
            what = USED
        claim(pfn, nr, what, _NAME[what])
        if fl & PG_hugetlb and what != RESERVED:
            used_by_order[fr.order(pfn)] = used_by_order.get(fr.order(pfn), 0) + 1
    pos = cls.find(0)
    while pos >= 0:
        end = pos
        while end < n and not cls[end]:
            end += 1
        bad("frames", "pfn %#x+%d belongs to no folio and no free list" % (pos, end - pos))
        pos = cls.find(0, end)
    for pfn, ref in fr.ref_nz.items():
        if ref < 0:
            bad("refcount", "pfn %#x refcount %d" % (pfn, ref))

    # -- a poisoned frame is never free
    for pfn in fr.poisoned:
        if cls[pfn] in _GONE:
            bad("hwpoison", "poisoned pfn %#x is %s" % (pfn, _NAME[cls[pfn]]))

    # -- HardwareCorrupted counts the raw pages known to be poisoned
    # (a policy that flags a whole split folio, distribute_on_split = False, flags
    # pages it does not count: there the count only has to lie between the bounds)
    raw: set[int] = set()
    raw_hwp = hugetlb.raw_hwp if hugetlb is not None else {}
    for pfn in fr.poisoned:
        if fr.flags(pfn) & PG_hugetlb and fr.head(pfn) == pfn and fr.order(pfn):
            raw |= raw_hwp.get(pfn) or {pfn}
        else:
            raw.add(pfn)
    raw |= mf.tracked
    hc = k.meminfo()["HardwareCorrupted"] // 4
    loose = k.policy.split_on_poison and not k.policy.distribute_on_split
    if not (hc == len(raw) or loose and hc <= len(raw) and (hc > 0) == bool(raw)):
        bad("hwpoison", "HardwareCorrupted is %d pages, %d pages are poisoned (%s)"
            % (hc, len(raw), ", ".join("%#x" % p for p in sorted(raw)[:8])))

    # -- HugeTLB pools: every huge page is free, in use or split, and counted once
    if hugetlb is not None:
        for h in hugetlb.hstates.values():
            split = sum(1 for g in groups.values() if g["order"] == h.order)
            have = len(h.free) + used_by_order.get(h.order, 0) + split
            if have != h.nr_huge_pages:
                bad("hugetlb", "%s: HugePages_Total %d, found %d free + %d in use + %d split"
                    % (h.name, h.nr_huge_pages, len(h.free), used_by_order.get(h.order, 0), split))
            if not 0 <= h.resv <= len(h.free):
                bad("hugetlb", "%s: HugePages_Rsvd %d with %d free" % (h.name, h.resv, len(h.free)))
            promised = sum(len(i.private.get("resv", ())) for i in k.inodes.values()
                           if i.private.get("hstate") is h)
            private = sum(private_reserved(v) for v in k.vma_of.values()
                          if v.resv is not None and v.resv.h is h)
            if promised + private != h.resv:
                bad("hugetlb", "%s: HugePages_Rsvd %d, files hold %d reservations, private "
                    "mappings %d" % (h.name, h.resv, promised, private))

    # -- page tables: no entry maps a freed frame; mapcounts match the entries
    maps: dict[int, int] = {}
    for name, pgd, stage2 in _mms(k):
        for va, e, level in core.pt_scan(pgd, 0, TASK_SIZE):
            if not e & C.PTE_PRESENT:
                continue
            pfn = (e & C.PTE_PFN_MASK) >> 12
            npages = 1 << (9 * (level - 1))
            if pfn + npages > n:
                bad("pte", "%s va %#x maps pfn %#x beyond memory" % (name, va, pfn))
                continue
            if cls[pfn] in _GONE:
                bad("pte", "%s va %#x maps pfn %#x, which is %s" % (name, va, pfn, _NAME[cls[pfn]]))
            if e & C.PTE_SPECIAL:           # the zero page: no mapcount, no reference
                if cls[pfn] != RESERVED:
                    bad("pte", "%s va %#x: a special entry for pfn %#x, which is %s"
                        % (name, va, pfn, _NAME.get(cls[pfn], "nothing")))
                continue
            head = core.head(pfn)
            if fr.ref(head) <= 0:
                bad("pte", "%s va %#x maps pfn %#x whose folio %#x has refcount %d"
                    % (name, va, pfn, head, fr.ref(head)))
            if not stage2:                  # stage-2 entries hold no reference of their own
                maps[pfn] = maps.get(pfn, 0) + 1
                mapped_refs[head] = mapped_refs.get(head, 0) + 1
    for pfn in set(maps) | set(fr.map_nz):
        if maps.get(pfn, 0) != fr.map_nz.get(pfn, 0):
            bad("mapcount", "pfn %#x mapcount %d, mapped by %d entries"
                % (pfn, fr.map_nz.get(pfn, 0), maps.get(pfn, 0)))
    for head, m in mapped_refs.items():
        if fr.ref(head) < m:
            bad("refcount", "folio %#x refcount %d below its %d mappings" % (head, fr.ref(head), m))
    for inv, c in seen.items():
        if c > _MAX:
            out.append("%s: ... %d more" % (inv, c - _MAX))
    return out
