"""mm/memory-failure.c: one flow, page-state handlers in a table, results counted.

The flow follows memory_failure() of the kernel step by step; where the kernel
branches on what a file system or a kernel version does, it asks the policy
(`k.policy`), a bundle of named decisions.  Entry points: hwpoison debugfs
(corrupt-pfn / unpoison-pfn), madvise(MADV_HWPOISON), a consumed machine check
(x86 kill_me_maybe) and a deferred error (memory_failure_queue).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import _core as C
from .. import uapi as u
from .filemap import mapping_set_error
from .mlock import munlock_folio
from .page_alloc import (
    PG_anon,
    PG_dirty,
    PG_head,
    PG_hugetlb,
    PG_hwpoison,
    PG_lru,
    PG_mlocked,
    PG_reserved,
    PG_slab,
    PG_swapbacked,
    PG_swapcache,
    PG_unevictable,
    PG_writeback,
)
from .sched import PF_MCE_EARLY, PF_MCE_PROCESS
from .soft_offline import MAGIC_HWPOISON, SoftOffline
from .unpoison import Unpoison

# enum mf_action_page_type -> action_page_types[]
MF_MSG_KERNEL = "reserved kernel page"
MF_MSG_KERNEL_HIGH_ORDER = "high-order kernel page"
MF_MSG_HUGE = "huge page"
MF_MSG_FREE_HUGE = "free huge page"
MF_MSG_GET_HWPOISON = "get hwpoison page"
MF_MSG_UNMAP_FAILED = "unmapping failed page"
MF_MSG_DIRTY_SWAPCACHE = "dirty swapcache page"
MF_MSG_CLEAN_SWAPCACHE = "clean swapcache page"
MF_MSG_DIRTY_MLOCKED_LRU = "dirty mlocked LRU page"
MF_MSG_CLEAN_MLOCKED_LRU = "clean mlocked LRU page"
MF_MSG_DIRTY_UNEVICTABLE_LRU = "dirty unevictable LRU page"
MF_MSG_CLEAN_UNEVICTABLE_LRU = "clean unevictable LRU page"
MF_MSG_DIRTY_LRU = "dirty LRU page"
MF_MSG_CLEAN_LRU = "clean LRU page"
MF_MSG_TRUNCATED_LRU = "already truncated LRU page"
MF_MSG_BUDDY = "free buddy page"
MF_MSG_UNSPLIT_THP = "unsplit thp"
MF_MSG_ALREADY_POISONED = "already poisoned page"
MF_MSG_UNKNOWN = "unknown page"

ACTION_NAME = {u.MF_IGNORED: "Ignored", u.MF_FAILED: "Failed",
               u.MF_DELAYED: "Delayed", u.MF_RECOVERED: "Recovered"}
STAT_NAME = {u.MF_IGNORED: "ignored", u.MF_FAILED: "failed",
             u.MF_DELAYED: "delayed", u.MF_RECOVERED: "recovered"}


# struct to_kill: (tsk, addr, size_shift, why), a plain tuple (built on the kernel
# path); `why` is the emulator's note of the decision that picked tsk (trace, demo)
ToKill = tuple


# why task_early_kill() picked a thread, by its PF_MCE_* flags (PF_MCE_PROCESS alone,
# i.e. PR_MCE_KILL_LATE, is picked only as current by force_early: action required)
EARLY_WHY = {PF_MCE_PROCESS | PF_MCE_EARLY: "early kill: PR_MCE_KILL_EARLY",
             PF_MCE_PROCESS: "force_early: the consuming thread",
             0: "early kill: vm.memory_failure_early_kill=1",
             PF_MCE_EARLY: "early kill: vm.memory_failure_early_kill=1"}
_MCE_BITS = PF_MCE_PROCESS | PF_MCE_EARLY


# ------------------------------------------------------------------ page-state handlers
def me_kernel(mf, ps, pfn):
    return u.MF_IGNORED


def me_unknown(mf, ps, pfn):
    mf.log("%#x: Unknown page state" % pfn)
    return u.MF_IGNORED


def me_pagecache_clean(mf, ps, pfn):
    k, core = mf.k, mf.k.core
    head = core.head(pfn)
    mf.delete_from_lru_cache(head)
    if core.flags(head) & PG_anon:
        ret = u.MF_RECOVERED
    else:
        inode = k.inodes.get(core.mapping(head))
        if inode is None:
            return u.MF_FAILED            # torn down in the meantime
        ret = mf.truncate_error_folio(head, pfn, inode)
        extra_pins = inode.ops.shmem or (ret == u.MF_DELAYED)
        if mf.has_extra_refcount(ps, pfn, extra_pins):
            ret = u.MF_FAILED
    return ret


def me_pagecache_dirty(mf, ps, pfn):
    """me_pagecache_dirty(): "IO error will be reported by write(), fsync(), etc.
    who check the mapping": mapping_set_error(mapping, -EIO) (AS_EIO and the
    errseq wb_err each open file reports once), then the clean case."""
    k = mf.k
    head = k.core.head(pfn)
    if not k.core.flags(head) & PG_anon:
        inode = k.inodes.get(k.core.mapping(head))
        if inode is not None:
            mapping_set_error(inode, -u.EIO)
    return me_pagecache_clean(mf, ps, pfn)


def me_huge_page(mf, ps, pfn):
    """A HugeTLB folio with a mapping stays in the page cache (hugetlbfs's
    error_remove_folio returns 0): extra_pins discounts the page cache's
    folio_nr_pages references, so only other users count."""
    k = mf.k
    head = k.core.head(pfn)
    inode = k.inodes.get(k.core.mapping(head))
    if inode is None:
        # no mapping (an anonymous MAP_PRIVATE huge page): the hwpoison entries keep
        # it from being used again, so memory_failure's reference is put and a folio
        # freed by it is dissolved for its healthy subpages (__page_handle_poison)
        freed = k.core.refcount(head) == 1
        k.mm.folio_put(head)
        res = u.MF_RECOVERED if freed and not k.core.flags(head) & PG_hugetlb else u.MF_FAILED
        if mf.has_extra_refcount(ps, pfn, False):
            res = u.MF_FAILED
        return res
    res = mf.truncate_error_folio(head, pfn, inode)
    if mf.has_extra_refcount(ps, pfn, True):
        res = u.MF_FAILED
    return res


def me_swapcache(mf, ps, pfn):
    return u.MF_FAILED                    # no swap in the emulator


_dirty, _sc, _unevict = PG_dirty, PG_swapcache | PG_swapbacked, PG_unevictable
_mlock, _lru, _head, _reserved = PG_mlocked, PG_lru, PG_head, PG_reserved


@dataclass(frozen=True)
class PageState:
    mask: int
    res: int
    type: str
    action: object


# error_states[], matched in order
ERROR_STATES = (
    PageState(_reserved, _reserved, MF_MSG_KERNEL, me_kernel),
    PageState(_head, _head, MF_MSG_HUGE, me_huge_page),
    PageState(_sc | _dirty, _sc | _dirty, MF_MSG_DIRTY_SWAPCACHE, me_swapcache),
    PageState(_sc | _dirty, _sc, MF_MSG_CLEAN_SWAPCACHE, me_swapcache),
    PageState(_mlock | _dirty, _mlock | _dirty, MF_MSG_DIRTY_MLOCKED_LRU, me_pagecache_dirty),
    PageState(_mlock | _dirty, _mlock, MF_MSG_CLEAN_MLOCKED_LRU, me_pagecache_clean),
    PageState(_unevict | _dirty, _unevict | _dirty, MF_MSG_DIRTY_UNEVICTABLE_LRU, me_pagecache_dirty),
    PageState(_unevict | _dirty, _unevict, MF_MSG_CLEAN_UNEVICTABLE_LRU, me_pagecache_clean),
    PageState(_lru | _dirty, _lru | _dirty, MF_MSG_DIRTY_LRU, me_pagecache_dirty),
    PageState(_lru | _dirty, _lru, MF_MSG_CLEAN_LRU, me_pagecache_clean),
    PageState(0, 0, MF_MSG_UNKNOWN, me_unknown),
)


class MemoryFailure(SoftOffline, Unpoison):
    def __init__(self, k):
        self.k = k
        self.hw_memory_failure = False
        self.num_poisoned_pages = 0
        self.tracked: set[int] = set()        # failures recorded without PG_hwpoison
        self.split_from: tuple[int, int] | None = None   # (old head, pages): this failure split it
        self.stats = {"total": 0, "ignored": 0, "failed": 0, "delayed": 0, "recovered": 0}
        self.log = k.logger("Memory failure: ")
        self.soft_log = k.logger("Soft offline: ")
        self.printed_once: set[str] = set()         # pr_info_once() texts already out
        # memory_failure_queue() from a machine-check-safe copy (copy_mc_highpage()):
        # the per-CPU kfifo, run by memory_failure_work_func() once the caller is done
        self.queued: list[int] = []

    # ------------------------------------------------------------ bookkeeping
    def action_result(self, pfn: int, type_: str, result: int) -> int:
        if type_ != MF_MSG_ALREADY_POISONED:
            self.num_poisoned_pages += 1
            self.stats[STAT_NAME[result]] += 1
            self.stats["total"] += 1
        self.log("%#x: recovery action for %s: %s", pfn, type_, ACTION_NAME[result])
        self.k.trace("mf_result", pfn=pfn, page=type_, result=ACTION_NAME[result])
        if self.panic_on_unrecoverable_mf(type_, result):
            self.k.panic("Memory failure: %#x: unrecoverable page" % pfn,
                         stack=("action_result", "memory_failure"))
        return 0 if result in (u.MF_RECOVERED, u.MF_DELAYED) else -u.EBUSY

    def panic_on_unrecoverable_mf(self, type_: str, result: int) -> bool:
        """vm.panic_on_unrecoverable_memory_failure (mm/memory-failure.c, Breno Leitao's
        "add panic option for unrecoverable pages", after 6.18): only a kernel page
        left Ignored panics; GET_HWPOISON shares its path with transient races."""
        return bool(self.k.sysctl["vm.panic_on_unrecoverable_memory_failure"]) \
            and type_ == MF_MSG_KERNEL and result == u.MF_IGNORED

    def has_extra_refcount(self, ps, pfn: int, extra_pins: bool) -> bool:
        core = self.k.core
        head = core.head(pfn)
        count = core.refcount(head) - 1
        if extra_pins:
            count -= 1 << core.order(head)
        if count > 0:
            self.log("%#x: %s still referenced by %d users", pfn, ps.type, count)
            return True
        return False

    def delete_from_lru_cache(self, head: int) -> None:
        core = self.k.core
        if core.flags(head) & PG_lru:
            core.set_flags(head, core.flags(head) & ~(PG_lru | PG_unevictable))

    def truncate_error_folio(self, head: int, pfn: int, inode) -> int:
        err = inode.ops.error_remove_folio(self.k, inode, head)
        if err is None:
            return u.MF_FAILED if self.k.mm.folio_mapped(head) else u.MF_RECOVERED
        if err == u.MF_DELAYED and self.k.policy.propagate_mf_delayed:
            return u.MF_DELAYED
        if err != 0:
            self.log("%#x: Failed to punch page: %d", pfn, err)
            return u.MF_FAILED
        return u.MF_RECOVERED

    # ------------------------------------------------------------ who to kill
    def task_early_kill(self, proc, force_early: bool, honour_early: bool = True):
        """task_early_kill(tsk = proc's group leader): NULL when the leader has no mm
        (it exited while other threads run: a zombie), even for current's own
        process; else current under force_early, or find_early_kill_thread()."""
        if proc.leader_exited:
            return None
        cur = self.k.current
        if force_early and cur is not None and cur.process is proc:
            return cur
        if not honour_early:
            return None
        for t in proc.threads:
            if not t.alive:
                continue
            if t.flags & PF_MCE_PROCESS:
                if t.flags & PF_MCE_EARLY:
                    return t
            elif self.k.sysctl["vm.memory_failure_early_kill"]:
                return t
        return None

    def collect_procs(self, head: int, pfn: int, force_early: bool, inode=None) -> list[ToKill]:
        """collect_procs_anon / collect_procs_file: each process mapping the page
        whose task_early_kill() thread is to hear of it, with the page's address
        there (a covering VMA suffices, as page_address_in_vma)."""
        k, core = self.k, self.k.core
        tokill: list[ToKill] = []
        shift = 12 + core.order(head)
        if core.flags(head) & PG_anon and core.flags(head) & PG_hugetlb:
            # anonymous huge folios, shared after fork: every mapping, at pfn's address
            maps = [(mm.slot, va + ((pfn - head) << 12)) for mm, va, *_x in k.mm.rmap_walk(head)]
        elif core.flags(head) & PG_anon:
            ent = k.mm.anon_rmap.get(head)
            maps = [] if ent is None else [(ent[0].slot, ent[1])]
        elif inode is None:
            return tokill
        else:                                      # vma_interval_tree_foreach(.., index, index)
            maps = core.vma_address(inode.slot, core.index(pfn))
        gmem = inode if inode is not None and inode.ops.gmem else None
        honour = gmem is None or k.policy.early_kill != "ignored"
        for proc in k.tasklist:                    # for_each_process
            t = self.task_early_kill(proc, force_early, honour)
            if t is not None:
                for mm, addr in maps:
                    if mm == proc.mm.slot:
                        tokill.append((t, addr, shift, EARLY_WHY[t.flags & _MCE_BITS]))
        if gmem is not None and k.policy.early_kill == "kvm_owner":
            tokill += self.kvm_owners(gmem, pfn, shift, tokill, force_early)
        return tokill

    def kvm_owners(self, inode, pfn: int, shift: int, have: list, force_early: bool) -> list:
        """Policy: the processes owning the struct kvm of a guest_memfd get the early
        kill even without a host mapping of the page (si_addr 0 then)."""
        vm = inode.private.get("vm")
        if vm is None or any(tk[0].process is vm.proc for tk in have):
            return []
        t = self.task_early_kill(vm.proc, force_early)
        return [] if t is None else [
            (t, 0, shift, "policy: owner of the struct kvm, " + EARLY_WHY[t.flags & _MCE_BITS])]

    def kill_proc(self, tk: ToKill, pfn: int, flags: int) -> int:
        """kill_proc(): BUS_MCEERR_AR forced on current for an action-required error,
        else BUS_MCEERR_AO sent (blockable) to the early-kill thread."""
        t, addr, size_shift, why = tk
        self.log("%#x: Sending SIGBUS to %s:%d due to hardware memory corruption", pfn, t.comm, t.tid)
        sig = self.k.signals
        if flags & u.MF_ACTION_REQUIRED and t is self.k.current:
            ret = sig.force_sig_mceerr(t, u.BUS_MCEERR_AR, addr, size_shift,
                                       why="action required: current consumed the error")
        else:
            ret = sig.send_sig_mceerr(t, u.BUS_MCEERR_AO, addr, size_shift, why=why)
        if ret < 0:
            self.log("Error sending signal to %s:%d: %d", t.comm, t.tid, ret)
        return ret

    def kill_procs(self, tokill: list[ToKill], forcekill: bool, pfn: int, flags: int) -> None:
        if forcekill:
            for tk in tokill:
                if self.kill_proc(tk, pfn, flags) < 0:
                    self.log("%#x: Cannot send advisory machine check signal to %s:%d",
                             pfn, tk[0].comm, tk[0].tid)
        self.k.signals.early_done()

    def send_with_unmap(self, tokill: list[ToKill], head: int, inode, flags: int) -> list | None:
        """An optimisation of kill_procs' sends, not another route: when the kill is
        decided before the unmap (a dirty folio or MF_MUST_KILL) and every target is
        another live thread, the core posts kill_procs' records in try_to_unmap's own
        call, right after the last zap, so the signals leave as soon as the PTEs are
        gone.  kill_procs then runs as always; send_sig_mceerr takes each early
        result instead of posting again (Signals.early_records).  None: no early send."""
        if inode is None or not tokill or not (self.k.core.flags(head) & PG_dirty
                                               or flags & u.MF_MUST_KILL):
            return None
        return self.k.signals.early_records(tokill, u.SIGBUS, u.BUS_MCEERR_AO)

    def current_entries(self, pfn: int):
        """Current's page-table entries (present, or hwpoison swap entries) covering
        pfn, in VMA and address order: (va of the entry, its first pfn, level)."""
        cur = self.k.current
        core = self.k.core
        mask, valid = C.PTE_PFN_MASK, C.PTE_PRESENT | C.PTE_HWPOISON
        for vma in cur.process.mm.vmas:
            for va, e, level in core.pt_scan(cur.process.mm.pgd, vma.start, vma.end):
                epfn = (e & mask) >> 12
                if e & valid and epfn <= pfn < epfn + (1 << (9 * (level - 1))):
                    yield va, epfn, level

    def kill_accessing_process(self, pfn: int, flags: int) -> int:
        """Walk current's page tables for a present or hwpoison entry of pfn.
        check_hwpoisoned_entry() matches an entry whose pfn is poisoned_pfn rounded
        down to the entry's size; a huge leaf therefore matches only through its
        head, which is what try_memory_failure_hugetlb passes (folio_pfn), and the
        address is the leaf's own.  No THP here: check_hwpoisoned_pmd_entry's
        any-subpage match has nothing to match."""
        cur = self.k.current
        if cur is None:
            return -u.EFAULT
        for va, epfn, level in self.current_entries(pfn):
            if epfn == pfn:
                self.kill_proc((cur, va, 12 + 9 * (level - 1), "kill_accessing_process"), pfn, flags)
                return -u.EHWPOISON
        return 0

    # ------------------------------------------------------------ unmapping
    def hwpoison_user_mappings(self, head: int, pfn: int, flags: int) -> bool:
        k, core = self.k, self.k.core
        fl = core.flags(head)
        if fl & (PG_reserved | PG_slab):
            return True
        if not fl & (PG_lru | PG_hugetlb):
            return True
        inode = None if fl & PG_anon else k.inodes.get(core.mapping(head))
        gmem = inode is not None and inode.ops.gmem
        if not k.mm.folio_mapped(head):
            if gmem and k.policy.early_kill == "kvm_owner":
                # private guest memory: no host mapping, but the VMM owns the struct kvm
                self.kill_procs(self.kvm_owners(inode, pfn, 12 + core.order(head),
                                                [], bool(flags & u.MF_ACTION_REQUIRED)),
                                True, pfn, flags)
            return True
        tokill = self.collect_procs(head, pfn, flags & u.MF_ACTION_REQUIRED != 0, inode)
        ttu_hwpoison = not fl & PG_swapcache
        if gmem and k.policy.signal_all_mappers:
            # every process with the folio mapped in host page tables, early-kill or not
            have = {id(tk[0].process) for tk in tokill}
            for mm, va, _p, _v, _l in k.mm.rmap_walk(head):
                proc = next((p for p in k.tasklist if p.mm is mm), None)
                if proc is not None and id(proc) not in have:
                    have.add(id(proc))
                    t = next(th for th in proc.threads if th.alive)
                    index = core.index(pfn)
                    vma = proc.mm.find_vma(va)
                    addr = vma.addr_of(index) if vma is not None and vma.covers_index(index) else va
                    tokill.append((t, addr, 12 + core.order(head),
                                   "policy: every process mapping the folio"))
        if gmem and k.policy.host_unmap == "none":
            forcekill = bool(core.flags(head) & PG_dirty) or bool(flags & u.MF_MUST_KILL)
            self.kill_procs(tokill, forcekill, pfn, flags)
            return True
        if (not flags & u.MF_MUST_KILL and not fl & PG_dirty and inode is not None
                and inode.ops.writeback):
            if k.mm.folio_mkclean(head):
                core.test_set_flag(head, PG_dirty)
            else:
                ttu_hwpoison = False
                self.log("%#x: corrupted page was clean: dropped without side effects", pfn)
        extra = self.host_unmap_range(inode, head) if gmem else None  # between unmap and kill
        records = None if extra else self.send_with_unmap(tokill, head, inode, flags)
        locked = fl & PG_mlocked and any(v is not None and v.locked
                                         for _m, _va, _p, v, _l in k.mm.rmap_walk(head))
        k.mm.try_to_unmap(head, ttu_hwpoison, records)
        if locked:
            # try_to_unmap_one: folio_remove_rmap_pte -> munlock_vma_folio for a VM_LOCKED
            # VMA, drained there (mlock_drain_local) and by `if (mlocked) shake_folio()`:
            # PG_mlocked is gone before identify_page_state looks at the flags
            munlock_folio(k, head)
        if extra:
            from .fs import unmap_mapping_range

            unmap_mapping_range(k, inode, extra[0], extra[1], even_cows=False)
            if extra[1] is None:
                k.trace("unmap_file", ino=inode.ino)
            else:
                k.trace("unmap_folio", ino=inode.ino, start=extra[0], end=extra[1])
        unmap_success = not k.mm.folio_mapped(head)
        if not unmap_success:
            self.log("%#x: failed to unmap page (folio mapcount=%d)", pfn, core.mapcount(pfn))
        forcekill = core.flags(head) & PG_dirty != 0 or flags & u.MF_MUST_KILL != 0 \
            or not unmap_success
        self.kill_procs(tokill, forcekill, pfn, flags)
        return unmap_success

    def host_unmap_range(self, inode, head: int) -> tuple[int, int | None] | None:
        """The page indices the policy unmaps from the host besides try_to_unmap's folio:
        the whole file ("file"), or the other pages of the HugeTLB folio this failure
        split ("folio": the folio as the failure found it).  "page" and an unsplit
        folio need nothing more."""
        scope = self.k.policy.host_unmap
        if scope == "file":
            return 0, None
        if scope == "folio" and self.split_from is not None:
            old, nr = self.split_from
            index0 = self.k.core.index(old)
            return index0, index0 + nr
        return None

    def identify_page_state(self, pfn: int, page_flags: int) -> int:
        flags = self.k.core.flags(self.k.core.head(pfn))
        ps = next(s for s in ERROR_STATES if flags & s.mask == s.res)
        page_flags |= flags & PG_dirty
        if not ps.mask:
            ps = next(s for s in ERROR_STATES if page_flags & s.mask == s.res)
        return self.action_result(pfn, ps.type, ps.action(self, ps, pfn))

    # ------------------------------------------------------------ memory_failure()
    def get_hwpoison_page(self, pfn: int, head: int) -> int:
        """get_hwpoison_page() -> get_any_page(), after zone_pcp_disable() drained the
        per-CPU lists: 1 with a reference taken on an LRU folio; 0 for a free buddy
        page (folio_try_get fails on refcount 0); -EIO for a page that is not
        HWPoisonHandlable (slab, reserved and other kernel pages, or a page with no
        reference that is neither free nor on the LRU), with "unhandlable page."."""
        core = self.k.core
        fl = core.flags(head)
        if fl & PG_slab or not (fl & PG_lru or self.k.buddy.is_free_buddy_page(pfn)):
            self.log("%#x: unhandlable page.", pfn)
            return -u.EIO
        if core.refcount(head) <= 0:
            return 0
        core.ref_add(head, 1)
        return 1

    def gmem_inode_of(self, pfn: int):
        """The guest_memfd owning pfn's folio, if any (policy decisions apply there)."""
        inode = self.k.inodes.get(self.k.core.mapping(self.k.core.head(pfn)))
        return inode if inode is not None and inode.ops.gmem else None

    def memory_failure(self, pfn: int, flags: int) -> int:
        """memory_failure() between two trace events: "memory_failure" as it starts
        and "memory_failure_end" (with its result, or the errno it was refused
        with) as it returns, so a trace shows it as a slice holding what it did
        (the unmaps, the signals).  A panic inside it ends no slice."""
        k = self.k
        tid = k.current.tid if k.current is not None else 0
        k.trace("memory_failure", pfn=pfn, flags=flags, tid=tid)
        try:
            ret = self._memory_failure_entry(pfn, flags)
        except OSError as e:
            k.trace("memory_failure_end", pfn=pfn, tid=tid, ret=-(e.errno or 0))
            raise
        k.trace("memory_failure_end", pfn=pfn, tid=tid, ret=ret)
        return ret

    def _memory_failure_entry(self, pfn: int, flags: int) -> int:
        k, pol = self.k, self.k.policy
        # the policy's guest_memfd decisions; the folio's file is looked up only for them
        sigbus_cur = (pol.sigbus_current_on_consume if flags & u.MF_ACTION_REQUIRED
                      else pol.deferred_failure == "sigbus_current")
        gmem = None
        if pol.hwpoison_mark == "release" or sigbus_cur:
            gmem = self.gmem_inode_of(pfn) if 0 <= pfn < k.nframes else None
        self.split_from = None
        if gmem is not None and pol.hwpoison_mark == "release":
            if not k.sysctl["vm.memory_failure_recovery"]:
                k.panic("Memory failure on page %x" % pfn)
            if not flags & u.MF_SW_SIMULATED:
                self.hw_memory_failure = True
            return self.memory_failure_tracked(pfn, flags, gmem)
        ret = self._memory_failure(pfn, flags)
        cur = k.current
        if gmem is not None and sigbus_cur and cur is not None \
                and not any(s[0] == u.SIGBUS for s in cur.reply_sigs):
            self.sigbus_current(pfn)
        return ret

    def memory_failure_tracked(self, pfn: int, flags: int, inode) -> int:
        """A guest_memfd folio under a policy that marks HWpoison only on release:
        the failure goes to a global table; nothing is unmapped or flagged."""
        k, core = self.k, self.k.core
        head = core.head(pfn)
        first = pfn not in self.tracked
        self.tracked.add(pfn)
        k.trace("mf_track", pfn=pfn, ino=inode.ino, first=first)
        if flags & u.MF_COUNT_INCREASED:
            k.mm.folio_put(head)
        if flags & u.MF_ACTION_REQUIRED and k.policy.sigbus_current_on_consume:
            self.sigbus_current(pfn)
        if not first:
            self.action_result(pfn, MF_MSG_ALREADY_POISONED, u.MF_FAILED)
            return -u.EHWPOISON
        fl = core.flags(head)
        ps = next(s for s in ERROR_STATES if fl & s.mask == s.res)
        return self.action_result(pfn, ps.type, u.MF_DELAYED)

    def sigbus_current(self, pfn: int) -> None:
        """SIGBUS BUS_MCEERR_AR to current for a consumed failure: at current's
        mapping of the page if it has one, else with si_addr 0 (a vCPU consuming
        memory the host never mapped, e.g. private guest_memfd)."""
        k, core = self.k, self.k.core
        cur = k.current
        if cur is None:
            return
        shift = 12 + core.order(core.head(pfn))
        for va, epfn, _level in self.current_entries(pfn):
            k.signals.force_sig_mceerr(cur, u.BUS_MCEERR_AR, va + ((pfn - epfn) << 12), shift,
                                       why="policy: SIGBUS current on a consumed failure")
            return
        k.signals.force_sig_mceerr(cur, u.BUS_MCEERR_AR, 0, shift,
                                   why="policy: SIGBUS current on a consumed failure (no host address)")

    def _memory_failure(self, pfn: int, flags: int) -> int:
        k, core = self.k, self.k.core
        if not k.sysctl["vm.memory_failure_recovery"]:
            k.panic("Memory failure on page %x" % pfn)
        if not flags & u.MF_SW_SIMULATED:
            self.hw_memory_failure = True
        if pfn < 0 or pfn >= k.nframes:
            self.log("%#x: memory outside kernel control", pfn)
            return -u.ENXIO
        if k.hugetlb is not None:
            res = k.hugetlb.try_memory_failure_hugetlb(self, pfn, flags)
            if res is not None:
                return res
        if core.test_set_flag(pfn, PG_hwpoison):
            res = -u.EHWPOISON
            if flags & u.MF_ACTION_REQUIRED:
                res = self.kill_accessing_process(pfn, flags)
            if flags & u.MF_COUNT_INCREASED:
                k.mm.folio_put(core.head(pfn))
            self.action_result(pfn, MF_MSG_ALREADY_POISONED, u.MF_FAILED)
            return res
        head = core.head(pfn)
        if not flags & u.MF_COUNT_INCREASED:
            res = self.get_hwpoison_page(pfn, head)
            if res == 0:
                if k.buddy.is_free_buddy_page(pfn):
                    if k.buddy.take_page_off_buddy(pfn):
                        core.set_flags(pfn, PG_hwpoison)
                        core.ref_add(pfn, 1)
                        core.set_private(pfn, MAGIC_HWPOISON)
                        return self.action_result(pfn, MF_MSG_BUDDY, u.MF_RECOVERED)
                    return self.action_result(pfn, MF_MSG_BUDDY, u.MF_FAILED)
                return self.action_result(pfn, MF_MSG_KERNEL_HIGH_ORDER, u.MF_IGNORED)
            if res < 0:
                return self.action_result(pfn, MF_MSG_GET_HWPOISON, u.MF_IGNORED)
        page_flags = core.flags(head)
        if not page_flags & PG_lru and not page_flags & PG_writeback:
            return self.identify_page_state(pfn, page_flags)
        if not self.hwpoison_user_mappings(head, pfn, flags):
            return self.action_result(pfn, MF_MSG_UNMAP_FAILED, u.MF_FAILED)
        if core.flags(head) & PG_lru and not core.flags(head) & (PG_swapcache | PG_anon) \
                and core.mapping(head) == 0:
            return self.action_result(pfn, MF_MSG_TRUNCATED_LRU, u.MF_IGNORED)
        return self.identify_page_state(pfn, page_flags)

    def mark_on_release(self, head: int, raw: set) -> None:
        """A folio leaves guest_memfd with failures only tracked so far: the flag is
        set now, so the allocator (or HugeTLB) never hands the bad pages out."""
        self.k.core.test_set_flag(head, PG_hwpoison)
        for pfn in sorted(raw):
            self.log("%#x: released by guest_memfd: marked HWPoison", pfn)
        self.k.trace("mf_mark_on_release", pfn=head, raw=len(raw))

    def retire_raw(self, pfn: int) -> None:
        """A poisoned raw page of a dissolved HugeTLB folio (already counted)."""
        core = self.k.core
        core.set_folio(pfn, 0, PG_hwpoison, 1, 0, 0)
        core.set_private(pfn, MAGIC_HWPOISON)

    # ------------------------------------------------------------ entry points
    def kill_me_maybe(self, pfn: int, phys_addr: int, ripv: bool = True) -> int:
        """x86: a consumed uncorrected error in user mode (or in the guest), run as
        task_work on the consuming thread (current)."""
        k = self.k
        k.log("mce: Uncorrected hardware memory error in user-access at %x", phys_addr)
        flags = u.MF_ACTION_REQUIRED | (0 if ripv else u.MF_MUST_KILL)
        ret = self.memory_failure(pfn, flags)
        if ret == 0:
            return 0                                  # set_mce_nospec
        if ret in (-u.EHWPOISON, -u.EOPNOTSUPP):
            return ret
        k.log("mce: Memory error not recovered")
        k.signals.force_sig(k.current, u.SIGBUS,       # kill_me_now
                            why="kill_me_now: memory_failure() returned %d" % ret)
        return ret

    def kill_me_never(self, pfn: int, phys_addr: int | None = None) -> int:
        """x86: the kernel consumed poison copying from user memory (a recoverable
        copy-in): no signal, memory_failure() of the source page only."""
        self.k.log("mce: Kernel accessed poison in user space at %x",
                   pfn << 12 if phys_addr is None else phys_addr)
        return self.memory_failure(pfn, 0)

    def hwpoison_inject(self, pfn: int) -> int:
        """debugfs hwpoison/corrupt-pfn (filter disabled)."""
        if pfn < 0 or pfn >= self.k.core.nframes:
            return -u.ENXIO
        self.k.log("Injecting memory failure at pfn %#x", pfn)
        err = self.memory_failure(pfn, u.MF_SW_SIMULATED)
        return 0 if err == -u.EOPNOTSUPP else err

    def queue(self, pfn: int) -> None:
        """memory_failure_queue(pfn, 0) from a kernel copy: recorded now, run by
        run_queued() when the work item gets the CPU (after the caller's locks,
        mf_mutex for soft offline, are dropped)."""
        self.queued.append(pfn)

    def run_queued(self) -> None:
        """memory_failure_work_func(): the queued pfns, in order."""
        while self.queued:
            self.memory_failure_queue(self.queued.pop(0))

    def memory_failure_queue(self, pfn: int) -> int:
        """A deferred error (CMCI/UCNA, patrol scrub, GHES): memory_failure(pfn, 0)
        from the workqueue, no current."""
        k = self.k
        saved, k.current = k.current, None
        try:
            return self.memory_failure(pfn, 0)
        finally:
            k.current = saved
