"""HugeTLB pools (mm/hugetlb.c): huge pages reserved at boot, per size (hstate).

This module reserves the pools and accounts them (/proc/meminfo).  Huge folios
for hugetlbfs memfd and HugeTLB guest_memfd, and their hwpoison handling, build
on it (see the HugeTLB issue).  MAP_PRIVATE mappings (faults, copy-on-write, fork,
per-VMA reservations) are in hugetlb_fault.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import uapi as u
from . import hugetlb_fault
from .fs import File, FileOps, Inode, filemap_read, filemap_remove_folio, truncate_inode_pages_range
from .memory_failure import MF_MSG_ALREADY_POISONED, MF_MSG_FREE_HUGE, MF_MSG_UNMAP_FAILED
from .mm import PAGE_SHIFT
from .page_alloc import MAX_PAGE_ORDER, PG_dirty, PG_head, PG_hugetlb, PG_hwpoison, PG_uptodate

HSTATE_ORDER = {"2M": 9, "1G": 18}


def hstate_name(size_log: int) -> str | None:
    """The pool a MFD_HUGE_* / GUESTMEM_HUGETLB_FLAG_* size field names (log2 of the
    page size; 0: the default, 2M); None for a size with no pool."""
    return {0: "2M", 21: "2M", 30: "1G"}.get(size_log)


@dataclass
class HState:
    name: str
    order: int
    free: list[int] = field(default_factory=list)     # head pfns on the free list
    nr_huge_pages: int = 0
    resv: int = 0                                     # reserved, not yet faulted
    clean: set = field(default_factory=set)           # never used since boot: still zero

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
        h.clean = set(h.free)
        hstates[name] = h
    return hstates, ranges


class HugetlbfsOps(FileOps):
    """hugetlbfs (fs/hugetlbfs): the file system behind MFD_HUGETLB memfds."""

    name = "hugetlbfs"
    huge = True
    # hugetlbfs_read_iter (6.18): adjust_range_hwpoison() == 0 for the next folio sets
    # retval = -EIO over the bytes already copied (generic_file_read_iter would keep
    # them; Jane Chu's 2026 series switches hugetlbfs to it, after 6.18)
    read_eio_at_folio_start = True
    # hugetlbfs_file_operations: read_iter but no write_iter, default_llseek, noop_fsync
    has_read = fmode_pread = True
    llseek = "default"
    fsync = "noop"
    statfs_magic = u.HUGETLBFS_MAGIC
    st_mode = u.S_IFREG | 0o777

    def st_nlink(self, inode: Inode) -> int:
        return 0                            # hugetlb_file_setup: an unlinked file

    def blksize(self, inode: Inode) -> int:
        return 1 << self.shift(inode)       # i_blkbits = huge_page_shift

    def stat_blocks(self, k, inode: Inode) -> int:
        return inode.nrpages * 8            # hugetlb_add_to_page_cache: blocks_per_huge_page

    @staticmethod
    def hstate(inode: Inode) -> HState:
        return inode.private["hstate"]

    def shift(self, inode: Inode) -> int:
        return 12 + self.hstate(inode).order

    def mmap_check(self, k, file: File, shared: bool, prot: int) -> None:
        return None

    def mmap_done(self, k, inode: Inode, end: int, prot: int) -> None:
        """hugetlbfs_file_mmap(): `if (vma->vm_flags & VM_WRITE && inode->i_size <
        len) i_size_write(inode, len);` a writable mapping (shared or private)
        extends the file to its end, so a store past EOF faults a page in."""
        if prot & u.PROT_WRITE and inode.size < end:
            inode.size = end
            k.inode_sync(inode)

    def read(self, k, inode: Inode, n: int, off: int) -> bytes:
        return filemap_read(k, inode, n, off)

    def page_poisoned(self, k, pfn: int) -> bool:
        """is_raw_hwpoison_page_in_hugepage(): reads stop at the poisoned raw page."""
        head = k.core.head(pfn)
        if not k.core.flags(head) & PG_hwpoison:
            return False
        raw = k.hugetlb.raw_hwp.get(head)
        return raw is None or pfn in raw          # no raw list: the whole folio

    def truncate(self, k, inode: Inode, length: int) -> None:
        hsize = 1 << self.shift(inode)
        if length < 0 or length % hsize:
            raise OSError(u.EINVAL, "ftruncate: hugetlbfs sizes are multiples of the huge page size")
        if length < inode.size:
            truncate_inode_pages_range(k, inode, length >> PAGE_SHIFT, None, even_cows=True)
        inode.size = length
        k.inode_sync(inode)

    def fallocate(self, k, inode: Inode, mode: int, off: int, length: int) -> None:
        if mode & ~(u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE):
            raise OSError(u.EOPNOTSUPP, "fallocate")
        if off < 0 or length <= 0:
            raise OSError(u.EINVAL, "fallocate")
        hsize = 1 << self.shift(inode)
        if mode & u.FALLOC_FL_PUNCH_HOLE:
            if not mode & u.FALLOC_FL_KEEP_SIZE:
                raise OSError(u.EOPNOTSUPP, "fallocate")
            start = (off + hsize - 1) // hsize * hsize      # whole huge pages go ...
            end = (off + length) // hsize * hsize
            for lo, hi in ((off, min(off + length, start)), (max(end, off), off + length)):
                if lo < hi:                                  # ... partial ones are zeroed
                    pfn = inode.find(k.core, lo >> PAGE_SHIFT)
                    if pfn is not None:
                        base = pfn - ((lo >> PAGE_SHIFT) % (hsize >> PAGE_SHIFT))
                        _zero_bytes(k, base, lo % hsize, hi - lo)
            if start < end:
                # __unmap_hugepage_range clears hwpoison entries too
                truncate_inode_pages_range(k, inode, start >> PAGE_SHIFT, end >> PAGE_SHIFT,
                                           even_cows=True)
            return
        for hoff in range(off // hsize * hsize, off + length, hsize):
            if k.hugetlb.get_folio(inode, hoff >> PAGE_SHIFT) is None:
                raise OSError(u.ENOSPC, "fallocate: HugeTLB pool exhausted")
        if not mode & u.FALLOC_FL_KEEP_SIZE and off + length > inode.size:
            inode.size = (off + length + hsize - 1) // hsize * hsize
            k.inode_sync(inode)

    def error_remove_folio(self, k, inode: Inode, head: int) -> int:
        """hugetlbfs_error_remove_folio: keep it in the page cache."""
        return 0

    def huge_fault(self, k, task, vma, va: int, write: bool) -> int:
        return k.hugetlb.fault(task, vma, va, write)

    def reserve(self, k, inode: Inode, offset: int, length: int) -> None:
        """hugetlb_reserve_pages: a shared mapping reserves the huge pages it may
        fault, or mmap fails with ENOMEM (HugePages_Rsvd)."""
        h = self.hstate(inode)
        nr = 1 << h.order
        resv = inode.private.setdefault("resv", set())
        want = [i for i in range(offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT, nr)
                if i not in inode.pages and i not in resv]
        if len(h.free) - h.resv < len(want):
            raise OSError(u.ENOMEM, "mmap: not enough free huge pages to reserve")
        resv.update(want)
        h.resv += len(want)

    def release(self, k, inode: Inode) -> None:
        if inode.nlink <= 1:
            h = self.hstate(inode)
            h.resv -= len(inode.private.pop("resv", ()))
        super().release(k, inode)

    def huge_get_folio(self, k, inode: Inode, index: int) -> int | None:
        return k.hugetlb.get_folio(inode, index)

    def remove_folio(self, k, inode: Inode, head: int) -> None:
        filemap_remove_folio(k, inode, head)      # the last reference frees it to the pool


def _zero_bytes(k, head: int, off: int, n: int) -> None:
    while n > 0:
        pfn, po = head + (off >> PAGE_SHIFT), off & 4095
        chunk = min(4096 - po, n)
        k.core.phys_write(pfn, po, bytes(chunk))
        off += chunk
        n -= chunk


class HugeTLB:
    def __init__(self, k, hstates: dict[str, HState]):
        self.k = k
        self.hstates = hstates
        self.raw_hwp: dict[int, set[int]] = {}      # head -> poisoned raw pfns (raw_hwp_page list)
        self.groups: dict[int, dict] = {}           # old head -> {"order", "live", "raw"}
        self.temporary: set[int] = set()            # heads of folios that leave on free
        self.by_order = {h.order: h for h in hstates.values()}
        self.anon_maps: dict[int, list] = {}         # anon head -> [(mm, va)] (hugetlb_fault.py)
        self.restore_reserve: set[int] = set()       # heads whose free restores a reservation
        for h in hstates.values():
            for head in h.free:
                k.core.set_folio(head, h.order, PG_hugetlb | PG_head, 0, 0, 0)

    def meminfo(self) -> dict:
        d = self.hstates.get("2M")
        total_kb = sum(h.nr_huge_pages * h.size_kb for h in self.hstates.values())
        return {
            "HugePages_Total": d.nr_huge_pages if d else 0,
            "HugePages_Free": len(d.free) if d else 0,
            "HugePages_Rsvd": d.resv if d else 0,
            "HugePages_Surp": 0,
            "Hugepagesize": 2048,
            "Hugetlb": total_kb,
        }

    # ------------------------------------------------------------ files and folios
    def memfd_create(self, proc, name: str, flags: int) -> int:
        size_log = (flags >> u.MFD_HUGE_SHIFT) & u.MFD_HUGE_MASK
        hname = hstate_name(size_log)
        if hname is None:
            raise OSError(u.EINVAL, "memfd_create: unsupported huge page size")
        h = self.hstates.get(hname) or HState(hname, HSTATE_ORDER[hname])
        inode = self.k.new_inode(HUGETLBFS_OPS, "memfd:" + name)
        inode.private["hstate"] = h
        inode.huge_order = h.order
        return proc.fd_install(File(inode))

    def file_setup(self, length: int, flags: int) -> File:
        """hugetlb_file_setup(HUGETLB_ANON_FILE, ...) for MAP_ANONYMOUS|MAP_HUGETLB:
        hstate_sizelog() of the MAP_HUGE_SHIFT bits (EINVAL for a size with no
        hstate), i_size the length rounded up to the huge page size; the mapping
        holds the only reference."""
        hname = hstate_name((flags >> u.MAP_HUGE_SHIFT) & u.MAP_HUGE_MASK)
        if hname is None:
            raise OSError(u.EINVAL, "mmap: unsupported huge page size")
        h = self.hstates.get(hname) or HState(hname, HSTATE_ORDER[hname])
        inode = self.k.new_inode(HUGETLBFS_OPS, "anon_hugepage")
        inode.private["hstate"] = h
        inode.huge_order = h.order
        hsize = 4096 << h.order
        inode.size = (length + hsize - 1) // hsize * hsize
        self.k.inode_sync(inode)
        return File(inode)

    def dequeue(self, h: HState) -> int | None:
        """dequeue_hugetlb_folio_node_exact: a poisoned folio is never handed out."""
        core = self.k.core
        for i, head in enumerate(h.free):
            if not core.flags(head) & PG_hwpoison:
                del h.free[i]
                return head
        return None

    def get_folio(self, inode: Inode, index: int, extra_flags: int = PG_dirty) -> int | None:
        """The huge folio at page index (4K units), allocated from the pool if absent;
        hugetlb_add_to_page_cache marks it dirty.  The page cache holds folio_nr_pages
        references (__filemap_add_folio: folio_ref_add(folio, nr), hugetlb included
        since 6.7)."""
        h = inode.private["hstate"]
        nr = 1 << h.order
        base = index - index % nr
        head = inode.pages.get(base)
        if head is not None:
            if self.k.core.mapping(head) == inode.ino:
                return head
            if self.split_group_of(head) is not None:
                return None       # a punched page of a split folio: not refilled (limitation)
        resv = inode.private.get("resv")
        reserved = resv is not None and base in resv
        if not reserved and len(h.free) - h.resv <= 0:
            return None                               # the rest is promised to others
        head = self.dequeue(h)
        if head is None:
            return None
        if reserved:
            resv.discard(base)
            h.resv -= 1
        core = self.k.core
        if head in h.clean:
            h.clean.discard(head)          # never used since boot: still zero
        else:
            core.phys_zero(head, nr)
        core.set_folio(head, h.order, PG_hugetlb | PG_head | PG_uptodate | extra_flags, nr, inode.ino,
                       base)
        inode.pages[base] = head           # one entry per folio
        self.k.inode_sync(inode)
        return head

    def free_huge_folio(self, head: int) -> None:
        """The last reference is gone.  A poisoned folio is dissolved: the flag moves to
        the raw pages (folio_clear_hugetlb_hwpoison), which stay retired, and the
        healthy subpages go back to the page allocator.  Otherwise back to the pool."""
        k, core = self.k, self.k.core
        self.anon_maps.pop(head, None)
        order = core.order(head)
        h = self.by_order[order]
        if head in self.restore_reserve:       # folio_test_hugetlb_restore_reserve
            self.restore_reserve.discard(head)
            h.resv += 1
        tracked = {p for p in k.memory_failure.tracked if head <= p < head + (1 << order)}
        if tracked and not core.flags(head) & PG_hwpoison:
            k.memory_failure.mark_on_release(head, tracked)     # reported to HugeTLB now
            self.raw_hwp[head] = tracked
        if core.flags(head) & PG_hwpoison:
            raw = self.raw_hwp.pop(head, {head})
            self.temporary.discard(head)
            self._dissolve(head, order, raw)
            k.trace("hugetlb_dissolve", pfn=head, raw=len(raw))
            return
        if head in self.temporary:             # back to the page allocator, not the pool
            self.temporary.discard(head)
            self._dissolve(head, order, set())
            return
        core.set_folio(head, order, PG_hugetlb | PG_head, 0, 0, 0)
        h.free.append(head)

    def dissolve_free_hugetlb_folio(self, head: int) -> int:
        """Break a free huge page up into base pages for the page allocator: 0 (also
        for a folio that is no HugeTLB folio any more), -EBUSY if it is in use or no
        huge page is available beyond the reservations (!available_huge_pages())."""
        core = self.k.core
        if not core.flags(head) & PG_hugetlb:
            return 0
        h = self.by_order.get(core.order(head))
        if h is None or core.refcount(head) or head not in h.free or len(h.free) - h.resv <= 0:
            return -u.EBUSY
        h.free.remove(head)
        h.clean.discard(head)
        self._dissolve(head, h.order, set())
        self.k.trace("hugetlb_dissolve", pfn=head, raw=0)
        return 0

    # ------------------------------------------------------------ migration
    def alloc_migration_target(self, h: HState) -> int | None:
        """alloc_hugetlb_folio_nodemask(): a free huge page beyond the reservations,
        else a fresh one from the page allocator marked temporary
        (alloc_migrate_hugetlb_folio; never a gigantic one); None if neither."""
        if len(h.free) - h.resv > 0:
            head = self.dequeue(h)
            if head is not None:
                return head
        if h.order > MAX_PAGE_ORDER:                     # hstate_is_gigantic()
            return None
        try:
            head = self.k.buddy.alloc(h.order)
        except MemoryError:
            return None
        h.nr_huge_pages += 1                              # account_new_hugetlb_folio()
        self.temporary.add(head)
        return head

    def migrate(self, head: int) -> int:
        """unmap_and_move_huge_page() of an isolated in-use folio: 0, -ENOMEM
        when there is no target, or 1 (a failed folio) when the copy hit a latent
        error.  The old folio then loses its last reference
        (folio_putback_hugetlb): back to the pool, or, when the target was a
        temporary page, to the page allocator (move_hugetlb_state() handed the
        temporary state over)."""
        k = self.k
        h = self.by_order[k.core.order(head)]
        new = self.alloc_migration_target(h)
        if new is None:
            return -u.ENOMEM
        if k.mm.migrate_folio(head, new):
            # hugetlbfs_migrate_folio(): folio_mc_copy() hit a latent error (-EHWPOISON,
            # one folio failed); the untouched target goes back (folio_putback_hugetlb)
            self.free_huge_folio(new)
            return 1
        h.clean.discard(new)
        if new in self.temporary:
            self.temporary.discard(new)
            self.temporary.add(head)
        self.free_huge_folio(head)
        return 0

    def _dissolve(self, head: int, order: int, raw: set) -> None:
        """The folio leaves HugeTLB page by page: the raw poisoned pages stay retired,
        the healthy ones go back to the page allocator."""
        k, core = self.k, self.k.core
        self.by_order[order].nr_huge_pages -= 1
        for pfn in range(head, head + (1 << order)):
            if pfn in raw:
                k.memory_failure.retire_raw(pfn)
            else:
                core.set_folio(pfn, 0, 0, 0, 0, 0)
                k.buddy.free(pfn, 0)

    # ------------------------------------------------------------ split and merge
    def merge_gmem_folio(self, inode: Inode, base: int, head: int) -> bool:
        """Merge a split folio back (its range is uniform again): host and stage-2
        mappings are dropped so refaults map it whole.  With any page poisoned the
        policy either refuses or summarizes the flag on the head."""
        from .fs import unmap_mapping_range

        k, core = self.k, self.k.core
        g = self.groups[head]
        nr = 1 << g["order"]
        if g["live"] != nr:
            return False                                  # pages were punched out
        poisoned = {p for p in range(head, head + nr)
                    if core.flags(p) & PG_hwpoison or p in k.memory_failure.tracked}
        if poisoned and k.policy.refuse_merge_if_poisoned:
            k.trace("hugetlb_merge_refused", pfn=head, raw=len(poisoned))
            return False
        unmap_mapping_range(k, inode, base, base + nr, even_cows=False)
        inode.ops.invalidate(k, inode, base, base + nr)
        k.synchronize_rcu()
        flags = core.flags(head) & (PG_dirty | PG_uptodate)
        # the page cache's folio_nr_pages references, and the pins the pages kept
        refs = nr + sum(core.refcount(p) - 1 for p in range(head, head + nr))
        core.set_folio(head, g["order"], PG_hugetlb | PG_head | PG_uptodate | flags
                       | (PG_hwpoison if poisoned else 0), refs, inode.ino, base, True)
        if poisoned:
            self.raw_hwp[head] = poisoned
        del self.groups[head]
        k.trace("hugetlb_merge", pfn=head, raw=len(poisoned), why="conversion")
        return True

    def split_gmem_folio(self, head: int, why: str = "poison", keep_stage2: bool = False) -> None:
        """Split a HugeTLB guest_memfd folio into 4K folios: stage-2 huge entries are
        zapped (refaults map 4K), or with keep_stage2 split into 4K entries; host huge
        entries become 4K PTE tables."""
        from .. import _core as C
        from .page_alloc import PG_lru, PG_unevictable

        k, core = self.k, self.k.core
        order, flags = core.order(head), core.flags(head)
        nr = 1 << order
        inode = k.inodes[core.mapping(head)]
        index0 = core.index(head)
        walk = k.mm.rmap_walk(head)
        self.split_check(walk, nr)
        if keep_stage2 and k.kvm is not None:
            k.kvm.gmem_split_huge(inode, index0, index0 + nr)
        else:
            inode.ops.invalidate(k, inode, index0, index0 + nr)
        maps = []
        for mm, va, _p, _vma, level in walk:
            old = core.pte_xchg(mm.pgd, va, 0, level)
            maps.append((mm, va, bool(old & C.PTE_RW), bool(old & C.PTE_DIRTY)))
        sub = (flags & ~(PG_head | PG_hugetlb | PG_hwpoison)) | PG_lru | PG_unevictable | PG_uptodate
        if any(d for *_x, d in maps):
            sub |= PG_dirty
        # a poisoned folio (split for a conversion): the flag goes to its raw pages,
        # as folio_clear_hugetlb_hwpoison() moves it when a folio leaves HugeTLB
        raw = (self.raw_hwp.pop(head, None) or {head}) if flags & PG_hwpoison else set()
        self.groups[head] = {"order": order, "live": nr}
        k.synchronize_rcu()
        core.split_and_map(head, order, sub, [
            (mm.pgd, va, C.PTE_PRESENT | C.PTE_USER | C.PTE_ACCESSED | (C.PTE_RW if rw else 0)
             | (C.PTE_DIRTY if dirty else 0)) for mm, va, rw, dirty in maps])
        for pfn in sorted(raw):
            core.test_set_flag(pfn, PG_hwpoison)
            if maps:                               # mapped whole until now: not this page
                k.mm.try_to_unmap(pfn, hwpoison=True)
        k.trace("hugetlb_split", pfn=head, pages=nr, why=why)
        k.log("HugeTLB: split guest_memfd folio %#x into %d pages" % (head, nr))

    def split_check(self, walk: list, nr: int, seen: set | None = None) -> int:
        """ENOMEM before a split changes anything when the page tables its 4K
        mappings need (one PTE table per mapping of a 2M folio, however many
        processes map it) are not there.  Returns the number needed."""
        core = self.k.core
        seen = set() if seen is None else seen
        need = sum(core.pt_missing(mm.pgd, va, nr, seen) for mm, va, _p, _v, _l in walk)
        if need > core.pt_free:
            raise OSError(u.ENOMEM, "HugeTLB split: %d page-table pages needed, %d free"
                          % (need, core.pt_free))
        return need

    def split_group_of(self, pfn: int) -> int | None:
        """The old head of the split folio pfn belongs to (folios, not pages, are kept)."""
        for head, g in self.groups.items():
            if head <= pfn < head + (1 << g["order"]):
                return head
        return None

    def release_split_page(self, pfn: int) -> None:
        """A page of a split folio left guest_memfd.  When the last one goes the folio
        is merged back, HWpoison summarized on its head, and returned to HugeTLB."""
        k, core = self.k, self.k.core
        head = self.split_group_of(pfn)
        g = self.groups[head]
        if core.flags(pfn) & PG_hwpoison or pfn in k.memory_failure.tracked:
            g.setdefault("raw", set()).add(pfn)
        g["live"] -= 1
        if g["live"]:
            return
        del self.groups[head]
        raw = g.get("raw", set())
        if raw and not k.policy.summarize_on_merge:      # freed page by page instead
            self._dissolve(head, g["order"], raw)
            k.trace("hugetlb_free_unmerged", pfn=head, raw=len(raw))
            return
        core.set_folio(head, g["order"], PG_hugetlb | PG_head | (PG_hwpoison if raw else 0), 0, 0, 0,
                       True)
        if raw:
            self.raw_hwp[head] = raw
        k.trace("hugetlb_merge", pfn=head, raw=len(raw))
        self.free_huge_folio(head)

    # ------------------------------------------------------------ faults
    def fault(self, task, vma, va: int, write: bool) -> int:
        """hugetlb_fault / hugetlb_no_page: map the whole huge folio with one entry
        (a private mapping: hugetlb_fault.py)."""
        from .mm import VM_FAULT_HWPOISON_LARGE, VM_FAULT_OK, VM_FAULT_SIGBUS

        if not vma.shared:
            return hugetlb_fault.hugetlb_fault(self.k, task, vma, va, write)
        inode = vma.inode
        h = inode.private["hstate"]
        hsize = 4096 << h.order
        haddr = va & ~(hsize - 1)
        index = vma.pgoff + ((haddr - vma.start) >> PAGE_SHIFT)
        if index << PAGE_SHIFT >= inode.size:
            return VM_FAULT_SIGBUS
        head = inode.ops.huge_get_folio(self.k, inode, index)
        if head is None:
            return VM_FAULT_SIGBUS                     # alloc_hugetlb_folio: -ENOSPC
        if self.k.core.flags(head) & PG_hwpoison \
                and (self.k.policy.faults_check or not inode.ops.gmem):
            return VM_FAULT_HWPOISON_LARGE             # hugetlb_no_page's folio_test_hwpoison
        level = 2 if h.order == 9 else 3
        self.k.mm.set_pte(vma.mm, haddr, head, bool(vma.prot & u.PROT_WRITE), write, level)
        return VM_FAULT_OK

    # ------------------------------------------------------------ memory failure
    def try_memory_failure_hugetlb(self, mf, pfn: int, flags: int):
        """None when pfn is not in a HugeTLB folio; else memory_failure()'s result."""
        k, core = self.k, self.k.core
        head = core.head(pfn)
        if not core.flags(head) & PG_hugetlb:
            return None
        h = self.by_order.get(core.order(head))
        if h is None:
            return None
        if core.refcount(head) == 0 and head in h.free:
            # a free huge page: dissolve it, the raw page goes, the rest to buddy
            h.free.remove(head)
            core.test_set_flag(head, PG_hwpoison)
            self.raw_hwp[head] = {pfn}
            self.free_huge_folio(head)
            return mf.action_result(pfn, MF_MSG_FREE_HUGE, u.MF_RECOVERED)
        if k.policy.split_on_poison and mf.gmem_inode_of(head) is not None \
                and not core.flags(head) & PG_hwpoison:
            if core.order(head):
                nr = 1 << core.order(head)
                self.split_gmem_folio(head, keep_stage2=k.policy.stage2_unmap == "page")
                mf.split_from = (head, nr)
                if not k.policy.distribute_on_split:      # the whole old folio is flagged
                    for p in range(head, head + nr):
                        if p != pfn:
                            core.test_set_flag(p, PG_hwpoison)
            return None                       # the generic path takes the 4K page now
        raw = self.raw_hwp.setdefault(head, set())
        if core.test_set_flag(head, PG_hwpoison):
            # already poisoned: a new raw page is still recorded and counted
            if pfn not in raw:
                raw.add(pfn)
                mf.num_poisoned_pages += 1
            res = -u.EHWPOISON
            if flags & u.MF_ACTION_REQUIRED:
                res = mf.kill_accessing_process(head, flags)
            if flags & u.MF_COUNT_INCREASED:
                k.mm.folio_put(head)
            mf.action_result(pfn, MF_MSG_ALREADY_POISONED, u.MF_FAILED)
            return res
        raw.add(pfn)
        if not flags & u.MF_COUNT_INCREASED:
            core.ref_add(head, 1)                     # get_huge_page_for_hwpoison
        if not mf.hwpoison_user_mappings(head, pfn, flags):
            return mf.action_result(pfn, MF_MSG_UNMAP_FAILED, u.MF_FAILED)
        return mf.identify_page_state(pfn, core.flags(head))


HUGETLBFS_OPS = HugetlbfsOps()
