"""The emulated kernel: runs in the supervisor, the only writer of the core tables."""
from __future__ import annotations

import collections
import itertools
import os
import time
import traceback
from collections.abc import Sequence
from typing import NoReturn

from .. import _core as C
from .. import uapi as u
from . import page_alloc as P
from .fs import Inode
from .ipc_shm import SYSCTLS as IPC_SHM_SYSCTLS
from .ipc_shm import IpcNamespace
from .kvm import KVM
from .mce import MachineCheck
from .memory_failure import MemoryFailure
from .mm import MM, Mm
from .page_alloc import BuddyAllocator, PG_hwpoison
from .policies import load as load_policy
from .sched import Process, Task
from .signal import Signals

SYSCTL_DEFAULTS = {
    "vm.memory_failure_early_kill": 0,
    "vm.memory_failure_recovery": 1,
    "vm.enable_soft_offline": 1,
    "vm.panic_on_unrecoverable_memory_failure": 0,
}
SYSCTL_RANGE = {
    "vm.memory_failure_early_kill": (0, 1),
    "vm.memory_failure_recovery": (0, 1),
    "vm.enable_soft_offline": (0, 3),
    "vm.panic_on_unrecoverable_memory_failure": (0, 1),
}
# ipc/ipc_sysctl.c: kernel.shmmax, shmall, shmmni, shm_rmid_forced (emu.kernel.ipc_shm)
SYSCTL_DEFAULTS.update({name: d for name, (d, _lo, _hi) in IPC_SHM_SYSCTLS.items()})
SYSCTL_RANGE.update({name: (lo, hi) for name, (_d, lo, hi) in IPC_SHM_SYSCTLS.items()})


class Panic(BaseException):
    """panic() does not return: it unwinds the kernel path that called it (not an
    Exception, so no `except Exception` on the way swallows it).  The supervisor
    turns it into the machine's stopped state (daemon.Supervisor._panicked)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# system calls whose entry symbol is not __x64_sys_<name> (include/linux/syscalls.h)
SYSCALL_SYMBOL = {"pread": "pread64", "pwrite": "pwrite64"}


class Kernel:
    def __init__(self, core, nframes: int, policy="mf-delayed-fix", sysctl=None,
                 madvise_action_required: bool = True, hugepages=None, events: int = 65536):
        self.core = core
        self.nframes = nframes
        self.policy = load_policy(policy)
        self.sysctl = dict(SYSCTL_DEFAULTS)
        for key, val in (sysctl or {}).items():
            self.set_sysctl(key, val)
        self.madvise_action_required = madvise_action_required   # MF_ACTION_REQUIRED since ~6.11
        self.boot_ns = time.monotonic_ns()
        self.dmesg_lines: collections.deque[tuple] = collections.deque(maxlen=20000)
        self.events: collections.deque[tuple] = collections.deque(maxlen=events)   # limits.events
        self.event_seq = 0
        self.current: Task | None = None
        self.syscall: str | None = None       # the system call current is in (its stacks)
        self.ext2_files: dict = {}            # the root file system's one directory: path -> Inode
        from .hugetlb import HugeTLB, reserve_boot_pages

        hstates, taken = reserve_boot_pages(nframes, hugepages or {})
        self.buddy = BuddyAllocator(core, nframes, skip=taken)
        self.mm = MM(self)
        self.signals = Signals(self)
        self.memory_failure = MemoryFailure(self)
        self.mce = MachineCheck(self)
        self.kvm = KVM(self)
        self.hugetlb = HugeTLB(self, hstates) if taken else None
        self.ipc = IpcNamespace(self)                 # init_ipc_ns: SysV shared memory
        self.inodes: dict[int, Inode] = {}
        self._next_ino = 1
        self.tasks: dict[int, Task] = {}              # tid -> task
        self.tasklist: list[Process] = []     # for_each_process: thread groups in creation order
        self._free_slots = list(range(core.ntasks - 1, -1, -1))
        self._free_mm = list(range(core.nmms - 1, -1, -1))
        self._free_inode = list(range(core.ninodes - 1, -1, -1))
        self._free_vma = list(range(core.nvmas - 1, -1, -1))
        self.vma_of: dict[int, object] = {}       # core VMA slot -> Vma (the core's rmap names slots)
        self._pt_pending: collections.deque = collections.deque()
        self.tainted = 0                          # /proc/sys/kernel/tainted
        self.oops_count = 0
        self.panicked: str | None = None          # panic()'s reason once it was called
        self.log("Linux version 6.18.0-gmem-emu (policy %s)" % self.policy.name)

    def syscall_entry(self) -> str:
        """The entry symbol of the system call current is in, for a Call Trace
        (SYSCALL_DEFINE names: pread is pread64)."""
        name = self.syscall or "ni_syscall"
        return "__x64_sys_" + SYSCALL_SYMBOL.get(name, name)

    # ------------------------------------------------------------ logging and tracing
    def log(self, fmt: str, *args) -> None:
        """printk: the record (time, pr_fmt prefix, format, args) is stamped now and
        formatted when dmesg is read, so logging costs the kernel path almost nothing."""
        self.dmesg_lines.append((time.monotonic_ns(), "", fmt, args))

    def logger(self, pr_fmt: str):
        """printk for a file whose messages carry a pr_fmt prefix ("Memory failure: ")."""
        lines, now = self.dmesg_lines, time.monotonic_ns

        def log(fmt: str, *args) -> None:
            lines.append((now(), pr_fmt, fmt, args))
        return log

    def dmesg(self) -> list[str]:
        b = self.boot_ns
        return ["[%12.6f] %s%s" % ((ts - b) / 1e9, prefix, fmt % args if args else fmt)
                for ts, prefix, fmt, args in self.dmesg_lines]

    def trace(self, type_: str, _ts: int = 0, **kw) -> None:
        """A structured trace event, kept as it comes and made a dict only when read
        (`trace_events`): the kernel path pays for an append.  `_ts`: when it
        happened, if that was earlier than now."""
        self.event_seq += 1
        self.events.append((self.event_seq, _ts or time.monotonic_ns(), type_, kw))

    def trace_events(self, since: int = 0) -> list[dict]:
        """The events after seq `since` still in the ring, oldest first."""
        ev = self.events
        new = min(len(ev), self.event_seq - since) if since > 0 else len(ev)
        out = [{**kw, "seq": seq, "ts_ns": ts, "type": type_}
               for seq, ts, type_, kw in itertools.islice(reversed(ev), max(new, 0))]
        out.reverse()
        return out

    # ------------------------------------------------------------ bugs (kernel/panic.c, lib/bug.c)
    def add_taint(self, flag: int) -> None:
        self.tainted |= 1 << flag

    def print_tainted(self) -> str:
        """print_tainted(): "Not tainted", or one column per taint bit."""
        if not self.tainted:
            return "Not tainted"
        return "Tainted: " + "".join(c[0] if self.tainted >> i & 1 else c[1]
                                     for i, c in enumerate(u.TAINT_CHARS))

    def report_bug(self, exc: BaseException, pid: int, comm: str) -> str:
        """An unexpected exception unwound a kernel path: the emulator's BUG().  Like
        an oops with panic_on_oops=0 the record goes to the log, the kernel is
        tainted (TAINT_DIE: the path stopped half way, its state may be partial) and
        keeps serving.  Returns "file:line" of the frame that raised."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = _source(frames[-1]) if frames else "?"
        fn = frames[-1].name if frames else "?"
        self.oops_count += 1
        self.add_taint(u.TAINT_DIE)
        self.log("------------[ cut here ]------------")
        self.log("kernel BUG at %s!", where)
        self.log("Oops: %s: %s [#%d] SMP", type(exc).__name__, _one_line(exc), self.oops_count)
        self.log("CPU: 0 PID: %d Comm: %.15s %s 6.18.0-gmem-emu", pid, comm, self.print_tainted())
        self.log("RIP: %s", fn)
        self.log("Call Trace:")
        self.log(" <TASK>")
        for fr in frames:
            self.log("  %s in %s", _source(fr), fr.name)
            if fr.line:
                self.log("    %s", fr.line)
        self.log(" </TASK>")
        self.log("---[ end trace %016x ]---", 0)
        return where

    def panic(self, reason: str, lines: Sequence[str] = (), stack: Sequence[str] = ()) -> NoReturn:
        """kernel/panic.c panic(): the caller's own last words (`lines`, already
        formatted, e.g. mce_panic's record), "Kernel panic - not syncing: <reason>",
        dump_stack() (skipped after an oops, TAINT_DIE, as panic() does) with the
        kernel functions in `stack`, then the end marker.  The machine stops here:
        `panicked` is set and the path that called this unwinds (Panic); the
        supervisor then refuses whatever would change the machine and tells every
        attached thread (KernelPanic), while the state stays readable, as a crash
        dump is."""
        if self.panicked is not None:           # panic_try_start: someone else won
            raise Panic(self.panicked)
        for line in lines:
            self.log("%s", line)
        self.log("Kernel panic - not syncing: %s", reason)
        if not self.tainted >> u.TAINT_DIE & 1:
            cur = self.current
            self.log("CPU: 0 PID: %d Comm: %.15s %s 6.18.0-gmem-emu",
                     cur.tid if cur is not None else 0, cur.comm if cur is not None else "swapper/0",
                     self.print_tainted())
            self.log("Call Trace:")
            self.log(" <TASK>")
            for fn in stack:
                self.log("  %s", fn)
            self.log(" </TASK>")
        self.log("Kernel Offset: disabled")       # x86's panic notifier (dump_kernel_offset)
        self.log("---[ end Kernel panic - not syncing: %s ]---", reason)
        self.panicked = reason
        cur = self.current
        self.trace("panic", reason=reason, tid=cur.tid if cur is not None else 0)
        raise Panic(reason)

    def set_sysctl(self, key: str, val) -> None:
        import errno

        if key not in SYSCTL_DEFAULTS:
            raise OSError(errno.ENOENT, "no such sysctl: %s" % key)
        lo, hi = SYSCTL_RANGE[key]
        if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
            raise OSError(errno.EINVAL, "%s: value out of range %d..%d" % (key, lo, hi))
        self.sysctl[key] = val
        if key == "kernel.shm_rmid_forced" and val and hasattr(self, "ipc"):
            self.ipc.destroy_orphaned()               # proc_ipc_dointvec_minmax_orphans

    # ------------------------------------------------------------ objects
    def new_inode(self, ops, name: str) -> Inode:
        if not self._free_inode:
            raise OSError(u.ENFILE, "too many open files in system (limits.inodes = %d)"
                          % self.core.ninodes)
        ino = self._next_ino
        self._next_ino += 1
        inode = Inode(ino, ops, name, nlink=1, slot=self._free_inode.pop())
        self.inodes[ino] = inode
        self.inode_sync(inode)
        return inode

    # the core's inode table kind (layout.h EMU_INODE_*) of each FileOps.name
    INODE_KIND = {"shmem": C.INODE_SHMEM, "kvm-gmem": C.INODE_GMEM,
                  "hugetlbfs": C.INODE_HUGETLBFS, "kvm": C.INODE_KVM, "kvm-vm": C.INODE_KVM,
                  "ext2": C.INODE_EXT2}

    def inode_sync(self, inode: Inode) -> None:
        """Mirror an inode into the core's inode table."""
        self.core.inode_set(inode.slot, inode.ino, self.INODE_KIND.get(inode.ops.name, C.INODE_KVM),
                            inode.size, inode.flags, inode.nrpages, inode.nlink,
                            inode.name.encode()[:31])

    def inode_release(self, inode: Inode) -> None:
        self.inodes.pop(inode.ino, None)
        if inode.slot >= 0:
            self.core.inode_clear(inode.slot)
            self._free_inode.append(inode.slot)
            inode.slot = -1

    def vma_link(self, vma) -> None:
        """Insert a VMA into its mm and the core's VMA table (ENOMEM past the limit,
        as max_map_count does)."""
        if not self._free_vma:
            raise OSError(u.ENOMEM, "too many mappings (limits.vmas = %d)" % self.core.nvmas)
        vma.slot = self._free_vma.pop()
        self.vma_of[vma.slot] = vma
        vma.mm.insert(vma)
        self.core.vma_set(vma.slot, vma.mm.slot, vma.start, vma.end, vma.prot, vma.shared,
                          vma.inode.ino if vma.file is not None else 0, vma.pgoff)

    def i_mmap_sync(self, inode: Inode) -> None:
        """Mirror a file's i_mmap into the core, whose rmap walks it (after any change)."""
        if inode.slot >= 0:
            self.core.i_mmap_set(inode.slot, [v.slot for v in inode.i_mmap])

    def vma_unlink(self, vma) -> None:
        vma.mm.remove(vma)
        if vma.slot >= 0:
            self.core.vma_clear(vma.slot)
            del self.vma_of[vma.slot]
            self._free_vma.append(vma.slot)
            vma.slot = -1

    def vmas_available(self, n: int, what: str) -> None:
        """ENOMEM up front when n more VMAs would not fit (max_map_count's check in
        do_mmap and __split_vma), so nothing is changed half way."""
        if n > len(self._free_vma):
            raise OSError(u.ENOMEM, "%s: too many mappings (limits.vmas = %d)"
                          % (what, self.core.nvmas))

    def _check_new_task(self, tid: int, new_mm: bool) -> None:
        """copy_process's up-front checks: nothing is built before they pass."""
        if tid in self.tasks or any(p.tgid == tid for p in self.tasklist):
            raise OSError(u.EEXIST, "task %d exists" % tid)   # a zombie leader's pid too
        if not self._free_slots:                  # nr_threads >= max_threads: -EAGAIN
            raise OSError(u.EAGAIN, "too many threads (limits.tasks = %d)" % self.core.ntasks)
        if new_mm and not self._free_mm:
            raise OSError(u.ENOMEM, "too many processes (limits.mms = %d)" % self.core.nmms)
        if new_mm and self.core.pt_free < 1:
            raise OSError(u.ENOMEM, "page-table pool exhausted")

    def _new_mm(self) -> Mm:
        if not self._free_mm:
            raise OSError(u.ENOMEM, "too many processes (limits.mms = %d)" % self.core.nmms)
        slot = self._free_mm.pop()
        pgd = self.core.pt_alloc()
        self.core.mm_init(slot, pgd)
        return Mm(slot, pgd)

    def _new_task(self, tid: int, comm: str, proc: Process, flags: int = 0) -> Task:
        self._check_new_task(tid, False)
        slot = self._free_slots.pop()
        t = Task(tid, slot, comm[:15], proc, flags)
        self.core.task_init(slot, tid, proc.tgid, proc.mm.slot, comm.encode()[:15])
        self.core.task_set(slot, "mce_flags", flags)
        proc.threads.append(t)
        self.tasks[tid] = t
        self.trace("task_new", tid=tid, tgid=proc.tgid, comm=t.comm)
        return t

    def new_process(self, tid: int, comm: str) -> Task:
        self._check_new_task(tid, True)
        proc = Process(tid, self._new_mm(), comm)
        t = self._new_task(tid, comm, proc)
        self.tasklist.append(proc)
        return t

    def clone(self, parent: Task, tid: int, comm: str) -> Task:
        return self._new_task(tid, comm, parent.process, parent.flags)

    def fork(self, parent: Task, tid: int, comm: str) -> Task:
        """copy_process: checks first; a dup_mmap that runs out of frames or page
        tables is undone (mmput of the half-built mm) and fork fails with ENOMEM."""
        self._check_new_task(tid, True)
        self.vmas_available(len(parent.process.mm.vmas), "fork")
        proc = Process(tid, self._new_mm(), comm)
        self.ipc.cur_tgid = parent.tgid                # dup_mmap runs as the parent (shm_open)
        try:
            self.mm.dup_mmap(parent.process.mm, proc.mm)
        except MemoryError as e:
            self.mm.exit_mmap(proc.mm)
            self._free_mm.append(proc.mm.slot)
            raise OSError(u.ENOMEM, "fork: %s" % e) from None
        for fd, f in parent.process.files.items():
            proc.files[fd] = f.get()
        t = self._new_task(tid, comm, proc, parent.flags)
        self.tasklist.append(proc)
        return t

    def exit_task(self, t: Task) -> None:
        """do_exit: the last thread of a process tears its mm down and its files."""
        if not t.alive:
            return
        t.alive = False
        self.core.task_set(t.slot, "state", C.TASK_DEAD)
        self.core.task_set(t.slot, "rcu_epoch", 0)
        proc = t.process
        self.tasks.pop(t.tid, None)
        self._free_slots.append(t.slot)
        self.trace("task_exit", tid=t.tid, tgid=proc.tgid)
        proc.threads.remove(t)              # __unhash_process: no dead thread stays listed
        if t.tid == proc.tgid:
            proc.leader_exited = True       # exit_mm(): the leader's mm is NULL from now
        if not proc.threads:
            self.tasklist.remove(proc)
            self.ipc.cur_tgid = proc.tgid              # exit_mm runs as the exiting task
            self.mm.exit_mmap(proc.mm)
            self._free_mm.append(proc.mm.slot)
            for f in list(proc.files.values()):
                f.put(self)
            proc.files.clear()
        self.ipc.exit_shm(t)

    def defer_pt_free(self, tables) -> None:
        self._pt_pending.append((self.core.epoch_bump(), list(tables)))

    def synchronize_rcu(self, timeout: float = 1.0) -> None:
        """Wait for every CPU to leave the read sections that could see the old
        tables.  Accesses are short; a worker that died inside one (SIGKILL in
        the middle of a copy) is quiescent for good, though its death may not be
        settled yet: its read section is closed here rather than waited out.  A
        live CPU stuck past `timeout` is reported as an RCU stall, then ignored
        (Linux would wait for ever)."""
        epoch = self.core.epoch_bump()
        if self.core.quiescent_since(epoch):
            return
        start = time.monotonic()
        end = start + timeout
        checked = False
        while not self.core.quiescent_since(epoch):
            now = time.monotonic()
            if not checked and now - start > 0.001:
                checked = True
                for t in self._rcu_blockers(epoch):
                    if _process_gone(t.tid):
                        self.core.task_set(t.slot, "rcu_epoch", 0)
                continue
            if now >= end:
                self.log("rcu: INFO: rcu_sched detected stalls on CPUs/tasks: %s (%.0f ms)",
                         " ".join(str(t.tid) for t in self._rcu_blockers(epoch)),
                         (now - start) * 1e3)
                return
            time.sleep(0)

    def _rcu_blockers(self, epoch: int) -> list[Task]:
        """The tasks still inside a read section begun at or before epoch."""
        out = []
        for t in self.tasks.values():
            e = self.core.task(t.slot)["rcu_epoch"]
            if e and e <= epoch:
                out.append(t)
        return out

    def tick(self) -> None:
        """Periodic housekeeping: finish grace periods."""
        self.buddy.reclaim()
        while self._pt_pending and self.core.quiescent_since(self._pt_pending[0][0]):
            self.core.pt_release(self._pt_pending.popleft()[1])

    # ------------------------------------------------------------ observability
    def limits(self) -> dict:
        """Each table the core sizes at boot ([limits] in the config): in use and max."""
        core = self.core
        return {
            "tasks": {"used": core.ntasks - len(self._free_slots), "max": core.ntasks},
            "mms": {"used": core.nmms - len(self._free_mm), "max": core.nmms},
            "inodes": {"used": core.ninodes - len(self._free_inode), "max": core.ninodes},
            "vmas": {"used": core.nvmas - len(self._free_vma), "max": core.nvmas},
            "page_tables": {"used": core.pt_used, "max": core.npt - 1},
        }

    def meminfo(self) -> dict:
        total = self.nframes * 4
        return {
            "MemTotal": total,
            "MemFree": self.buddy.nr_free * 4,
            "HardwareCorrupted": self.memory_failure.num_poisoned_pages * 4,
            "HugePages_Total": 0, "HugePages_Free": 0, "HugePages_Rsvd": 0,
            "HugePages_Surp": 0, "Hugepagesize": 2048, "Hugetlb": 0,
            **(self.hugetlb.meminfo() if self.hugetlb else {}),
        }

    def kpageflags(self, pfn: int) -> int | None:
        """One entry of /proc/kpageflags (fs/proc/page.c stable_page_flags).  None past
        max_pfn: kpageflags_read() returns 0 bytes there (end of file); a negative
        file position is EINVAL."""
        if pfn < 0 or pfn >= 1 << 60:
            raise OSError(u.EINVAL, "kpageflags: file position out of range")
        if pfn >= self.nframes:
            return None
        core = self.core
        fl = core.flags(pfn)
        head = core.head(pfn)
        hfl = core.flags(head)
        bits = 0
        for pg, kpf in _KPF_FROM_FOLIO:
            if hfl & pg:
                bits |= 1 << kpf
        # HugeTLB records the failure on the folio (raw pages on its own list): the
        # folio's flag for every page of it; any other page its own flag
        if (hfl if hfl & P.PG_hugetlb else fl) & PG_hwpoison:
            bits |= 1 << u.KPF_HWPOISON
        # a free block is not a compound page; every page of it is a free buddy page
        # (PageBuddy on the first, is_free_buddy_page() for the others)
        if self.buddy.free_block_of(pfn) is not None:
            bits |= 1 << u.KPF_BUDDY
        else:
            if self.mm.folio_mapped(head):           # page_mapped() = folio_mapped()
                bits |= 1 << u.KPF_MMAP
            if core.order(head) > 0:
                bits |= 1 << (u.KPF_COMPOUND_HEAD if pfn == head else u.KPF_COMPOUND_TAIL)
        if pfn == P.ZERO_PFN:
            bits |= 1 << u.KPF_ZERO_PAGE
        if fl & P.PG_reserved:
            bits |= 1 << u.KPF_RESERVED
        return bits


# stable_page_flags()'s kpf_copy_bit(folio->flags, ...): the folio's flags, for every page
_KPF_FROM_FOLIO = (
    (P.PG_locked, u.KPF_LOCKED), (P.PG_referenced, u.KPF_REFERENCED),
    (P.PG_uptodate, u.KPF_UPTODATE), (P.PG_dirty, u.KPF_DIRTY), (P.PG_lru, u.KPF_LRU),
    (P.PG_active, u.KPF_ACTIVE), (P.PG_slab, u.KPF_SLAB), (P.PG_writeback, u.KPF_WRITEBACK),
    (P.PG_anon, u.KPF_ANON), (P.PG_swapcache, u.KPF_SWAPCACHE),
    (P.PG_swapbacked, u.KPF_SWAPBACKED), (P.PG_unevictable, u.KPF_UNEVICTABLE),
    (P.PG_mlocked, u.KPF_MLOCKED),
    (P.PG_hugetlb, u.KPF_HUGE))


def _process_gone(pid: int) -> bool:
    """The worker has exited (a zombie, or reaped): it runs no more code."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _source(fr) -> str:
    """file:line of a traceback frame, relative to the source tree when inside it."""
    path = fr.filename
    if path.startswith(_PKG_ROOT + os.sep):
        path = path[len(_PKG_ROOT) + 1:]
    return "%s:%s" % (path, fr.lineno)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
