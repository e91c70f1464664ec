"""Crash at any point: SIGKILL workers while they run random operation mixes.

    python benchmarks/soak_crash.py [--kills 1000] [--seed N] [--workers 3]

A private supervisor; worker processes (emulated processes with clone()d threads
and fork()ed children) run random mixes of mmap (anonymous, memfd, HugeTLB memfd,
guest_memfd incl. HugeTLB 2M), reads and writes, madvise, fallocate punch,
ftruncate, pread/pwrite, KVM vCPUs running guest programs, conversions,
PR_MCE_KILL, MADV_HWPOISON / corrupt_pfn / hw_poison / hw_detect injections,
and SIGBUS handlers that unwind, return, or SIGKILL their own thread.  The
harness SIGKILLs a random task after a random delay, so kills land inside system
calls, during fork/clone and attach, during a memory_failure, while a handler
runs and while a vCPU spins.

After every round (and at the end) every worker is killed and the supervisor
must come back to its baseline: host.check_invariants() == [] (when the kernel
has it), no emulated task, file, VMA or page-table page left, every frame free,
in the HugeTLB pool or retired by poison, and the supervisor's open fds and RSS
within a small bound of the baseline taken after a warm-up round.

Figures: kills, violations, leaks, kills/s, and the time from SIGKILL to the
supervisor retiring the task (median, p99) beside SIGKILL to waitpid() of a plain
forked child measured in the same run.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import report  # noqa: E402

import emu  # noqa: E402
from emu import _core as C  # noqa: E402
from emu import shm  # noqa: E402
from emu import uapi as u  # noqa: E402

PAGE = 4096
MB2 = 2 << 20
RW = u.PROT_READ | u.PROT_WRITE
PR_SET_CHILD_SUBREAPER = 36
PG_HWPOISON = C.PG_HWPOISON
PG_BUDDY = 1 << 13
PG_RESERVED = 1 << 8
PG_HUGETLB = 1 << 16
GMEM = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM_HUGE = GMEM | u.GUEST_MEMFD_FLAG_HUGETLB | u.GUESTMEM_HUGETLB_FLAG_2MB
SELF_KILL = "SIGKILL from its own SIGBUS handler"
FD_GROWTH_MAX = 2          # open fds the supervisor may gain over the run
RSS_GROWTH_MAX_KB = 8192   # RssAnon (its trace and dmesg rings are bounded deques that fill up)


# ============================================================== the workers
class Unwind(Exception):
    """Raised by the SIGBUS handler: the siglongjmp out of a poisoned access."""


class Worker:
    """One emulated thread's random operation mix (the main thread of a worker, or
    a clone()d thread / fork()ed child with a bounded number of operations)."""

    def __init__(self, me, host, rng, errlog: int, depth: int, huge_poison: bool):
        self.me, self.host, self.rng, self.errlog = me, host, rng, errlog
        self.depth, self.huge_poison = depth, huge_poison
        self.maps: list[tuple[int, int, int, bool]] = []   # (addr, length, fd, huge)
        self.fds: list[tuple[int, str, int]] = []          # (fd, kind, size)
        self.vm = None
        self.vcpus: list = []
        self.nslots = 0
        self.children: list = []
        self.in_op = False

    # ---- the SIGBUS handler ----
    def on_sigbus(self, signum, info) -> None:
        r = self.rng.random()
        if r < 0.03:
            self.note(SELF_KILL)
            os.kill(os.getpid(), signal.SIGKILL)        # die inside the handler
        if self.in_op:
            raise Unwind(info.si_code)
        # not inside an operation: an action-optional signal; return

    def note(self, what: str) -> None:
        try:
            os.write(self.errlog, ("%d %s\n" % (os.getpid(), what.replace("\n", " | "))).encode())
        except OSError:
            pass

    # ---- helpers ----
    def _map(self, length: int, fd: int = -1, huge: bool = False) -> int:
        flags = u.MAP_SHARED if fd >= 0 else u.MAP_PRIVATE | u.MAP_ANONYMOUS
        a = self.me.mmap(0, length, RW, flags, fd, 0)
        self.maps.append((a, length, fd, huge))
        return a

    def _page(self):
        if not self.maps:
            return None
        a, length, _fd, huge = self.rng.choice(self.maps)
        return a + self.rng.randrange(length // PAGE) * PAGE, huge

    def _pfn(self):
        p = self._page()
        if p is None:
            return None
        addr, huge = p
        ent = self.me.pagemap(addr)
        if not ent.present:
            return None
        return addr, ent.pfn, huge

    # ---- operations ----
    def op_anon(self):
        n = self.rng.randint(1, 8)
        a = self._map(n * PAGE)
        self.me.write(a, os.urandom(16) * (n * PAGE // 16 // self.rng.randint(1, 4)))

    def op_memfd(self):
        n = self.rng.randint(1, 8)
        fd = self.me.memfd_create("soak", 0)
        self.fds.append((fd, "memfd", n * PAGE))
        self.me.ftruncate(fd, n * PAGE)
        a = self._map(n * PAGE, fd)
        self.me.write(a + self.rng.randrange(n) * PAGE, b"m" * 64)

    def op_huge(self):
        fd = self.me.memfd_create("soak-huge", u.MFD_HUGETLB | u.MFD_HUGE_2MB)
        self.fds.append((fd, "huge", MB2))
        self.me.ftruncate(fd, MB2)
        a = self._map(MB2, fd, huge=True)
        self.me.write(a + self.rng.randrange(512) * PAGE, b"h" * 64)

    def op_kvm(self):
        me, rng = self.me, self.rng
        if self.vm is None:
            self.vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        huge = rng.random() < 0.3
        size = MB2 if huge else rng.randint(1, 16) * PAGE
        gfd = self.vm.create_guest_memfd(size, GMEM_HUGE if huge else GMEM)
        self.fds.append((gfd, "gmem", size))
        hva = self._map(size, gfd, huge=huge)
        slot = self.nslots
        self.nslots += 1
        gpa = (slot + 1) << 32
        self.vm.set_user_memory_region2(slot, u.KVM_MEM_GUEST_MEMFD, gpa, size, hva, gfd, 0)
        if len(self.vcpus) < 2:
            vcpu = self.vm.create_vcpu(len(self.vcpus))
            self.vcpus.append(vcpu)
        else:
            vcpu = rng.choice(self.vcpus)
        vcpu.soak_ranges = getattr(vcpu, "soak_ranges", []) + [(gpa, size)]
        self._program(vcpu)
        self.op_vcpu()

    def _program(self, vcpu):
        """A new guest program on random pages of the vCPU's memslots."""
        rng = self.rng
        gpas = []
        for _ in range(rng.randint(1, 8)):
            gpa, size = rng.choice(vcpu.soak_ranges)
            gpas.append(gpa + rng.randrange(size // PAGE) * PAGE)
        vcpu.set_guest(_guest_loop, gpas, rng.randint(4, 64))

    def op_vcpu(self):
        ready = [v for v in self.vcpus if getattr(v, "soak_ranges", None)]
        if not ready:
            return self.op_kvm()
        vcpu = self.rng.choice(ready)
        for _ in range(self.rng.randint(1, 20)):       # the vCPU spins in guest mode
            try:
                vcpu.run()
            except OSError as e:
                if e.errno not in (u.EHWPOISON, u.EFAULT, u.EINTR):
                    raise
                if e.errno != u.EINTR:                  # the access would fail again
                    self._program(vcpu)
                return
            if vcpu.kvm_run.exit_reason != u.KVM_EXIT_IO:
                return

    def op_access(self):
        p = self._page()
        if p is None:
            return self.op_anon()
        addr, _ = p
        if self.rng.random() < 0.5:
            self.me.read(addr, self.rng.choice((8, 64, PAGE)))
        else:
            self.me.write(addr, b"w" * self.rng.choice((8, 64, PAGE)))

    def op_batch(self):
        if not self.maps:
            return self.op_anon()
        a, length, _fd, _h = self.rng.choice(self.maps)
        addrs = [a + self.rng.randrange(length // PAGE) * PAGE for _ in range(16)]
        if self.rng.random() < 0.5:
            self.me.read_batch(addrs, 8)
        else:
            self.me.write_batch(addrs, 8, b"b" * 128)

    def op_dontneed(self):
        if self.maps:
            a, length, _fd, huge = self.rng.choice(self.maps)
            if not huge:
                self.me.madvise(a, length, u.MADV_DONTNEED)

    def op_madv_poison(self):
        p = self._page()
        if p is not None and (self.huge_poison or not p[1]):
            self.me.madvise(p[0], PAGE, u.MADV_HWPOISON)
            self.me.read(p[0], 8)

    def op_corrupt(self):
        p = self._pfn()
        if p is not None and (self.huge_poison or not p[2]):
            self.host.corrupt_pfn(p[1])
            self.me.read(p[0], 8)
            if self.rng.random() < 0.3:
                self.host.unpoison_pfn(p[1])

    def op_hw_poison(self):
        p = self._pfn()
        if p is not None and (self.huge_poison or not p[2]):
            if self.rng.random() < 0.5:
                self.host.hw_poison(p[1])           # consumed by the access: AR #MC
                self.me.read(p[0], 8)
            else:
                self.host.hw_detect(p[1])           # deferred memory_failure

    def op_punch(self):
        files = [f for f in self.fds if f[1] in ("memfd", "gmem", "huge")]
        if files:
            fd, kind, size = self.rng.choice(files)
            unit = MB2 if kind == "huge" or size % MB2 == 0 and size else PAGE
            off = self.rng.randrange(max(size // unit, 1)) * unit
            self.me.fallocate(fd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, off, unit)

    def op_pio(self):
        files = [f for f in self.fds if f[1] in ("memfd", "huge")]
        if files:
            fd, kind, size = self.rng.choice(files)
            off = self.rng.randrange(max(size // PAGE, 1)) * PAGE
            if kind == "memfd" and self.rng.random() < 0.5:     # hugetlbfs has no write()
                self.me.pwrite(fd, b"p" * 256, off)
            else:
                self.me.pread(fd, 256, off)

    def op_convert(self):
        files = [f for f in self.fds if f[1] == "gmem"]
        if files:
            fd, _kind, size = self.rng.choice(files)
            self.me.gmem_convert(fd, 0, size, private=self.rng.random() < 0.5)

    def op_prctl(self):
        arg = self.rng.choice(((u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY),
                               (u.PR_MCE_KILL_SET, u.PR_MCE_KILL_LATE),
                               (u.PR_MCE_KILL_CLEAR, 0)))
        self.me.prctl(u.PR_MCE_KILL, *arg)

    def op_munmap(self):
        if self.maps:
            m = self.maps.pop(self.rng.randrange(len(self.maps)))
            self.me.munmap(m[0], m[1])

    def op_close(self):
        if self.fds:
            f = self.fds.pop(self.rng.randrange(len(self.fds)))
            self.me.close(f[0])

    def op_clone(self):
        self._child(self.me.clone)

    def op_fork(self):
        self._child(self.me.fork)

    def _child(self, how):
        if self.depth >= 2 or len(self.children) >= 3:
            return self._join()
        seed = self.rng.randrange(1 << 30)
        th = how(_child_main, seed, self.errlog, self.depth + 1, self.huge_poison)
        self.children.append(th)

    def _join(self):
        if self.children:
            th = self.children.pop(0)
            th.join(self.rng.choice((0, 0.05, 1.0)))

    OPS = (("op_anon", 8), ("op_memfd", 6), ("op_huge", 2), ("op_kvm", 3), ("op_vcpu", 6),
           ("op_access", 14), ("op_batch", 5), ("op_dontneed", 3), ("op_madv_poison", 2),
           ("op_corrupt", 2), ("op_hw_poison", 2), ("op_punch", 4), ("op_pio", 3),
           ("op_convert", 2), ("op_prctl", 2), ("op_munmap", 4), ("op_close", 3),
           ("op_clone", 2), ("op_fork", 2))

    def run(self, nops: int | None) -> None:
        names = [n for n, _w in self.OPS]
        weights = [w for _n, w in self.OPS]
        done = 0
        while nops is None or done < nops:
            done += 1
            name = self.rng.choices(names, weights)[0]
            try:
                self.in_op = True
                getattr(self, name)()
            except Unwind:
                self.in_op = False
            except OSError as e:
                self.in_op = False
                if e.errno == u.EINVAL:     # every argument here is valid
                    self.note("suspicious %s: OSError(%s, %r)" % (name, e.errno, e.strerror))
            except Exception as e:          # EmulatorBug, or a runtime exception: a finding
                self.in_op = False
                self.note("unexpected %s: %s" % (name, "".join(
                    traceback.format_exception_only(type(e), e)).strip()))
            finally:
                self.in_op = False
        while self.children:
            self._join()


_worker: Worker | None = None


def _guest_loop(g, gpas, n):
    i = 0
    while True:
        for _ in range(n):
            gpa = gpas[i % len(gpas)]
            i += 1
            v = yield g.read(gpa, 8)
            yield g.write(gpa, v)
        yield g.sync(i)


def _sigbus(signum, info):
    if _worker is not None:
        _worker.on_sigbus(signum, info)


def _child_main(t, seed, errlog, depth, huge_poison):
    """A clone()d thread or fork()ed child: a bounded mix, then a clean exit."""
    global _worker
    rng = random.Random(seed)
    _worker = Worker(t, t.host, rng, errlog, depth, huge_poison)
    _worker.run(rng.randint(3, 30))
    return 0


def _worker_main(host, seed: int, errlog: int, huge_poison: bool) -> None:
    global _worker
    rng = random.Random(seed)
    me = emu.attach(host, name="soak%d" % (seed % 1000))
    _worker = Worker(me, host, rng, errlog, 0, huge_poison)
    emu.sigaction(signal.SIGBUS, _sigbus)
    _worker.run(None)


def launch(host, seed: int, errlog: int, errfd: int, huge_poison: bool) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.dup2(errfd, 2)
            _worker_main(host, seed, errlog, huge_poison)
        except BaseException as e:           # noqa: BLE001 (a worker reports, then dies)
            try:
                os.write(errlog, ("%d worker: %s\n" % (os.getpid(), "".join(
                    traceback.format_exception_only(type(e), e)).strip())).encode())
            except OSError:
                pass
            code = 1
        os._exit(code)
    return pid


# ============================================================== the harness
def _stat_state(pid: int) -> str | None:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _sup_fds(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def _sup_rss_kb(pid: int) -> int:
    """The supervisor's private resident memory (RssAnon): its shared-memory pages
    (RssShmem) grow as frames are first used, up to the size of RAM, by design."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def _pctl(xs, q):
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def baseline_kill_reap(n: int) -> list[float]:
    """SIGKILL to waitpid() of a plain forked child that sleeps: ns per sample."""
    out = []
    for _ in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"R")
            while True:
                signal.pause()
        os.close(w)
        os.read(r, 1)
        os.close(r)
        t0 = time.monotonic_ns()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        out.append(time.monotonic_ns() - t0)
    return out


def fill_rings(host, events: int = 52000, lines: int = 21000) -> None:
    """Fill the supervisor's trace and dmesg rings (bounded deques, 50000 and 20000
    entries) so that RSS growth after the baseline is not their filling up: one
    trace event per MAP_FIXED mmap over the same page, one dmesg line per unpoison
    of a page that is not poisoned (EBUSY, nothing changes)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            me = emu.attach(host, name="filler")
            a = me.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
            for _ in range(events):
                me.mmap(a, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_FIXED)
            pfn = host.meminfo()["MemTotal"] // 4 - 1
            for _ in range(lines):
                try:
                    host.unpoison_pfn(pfn)
                except OSError:
                    pass
            code = 0
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


def quiet_retire(host, core, n: int) -> list[int]:
    """SIGKILL to the supervisor retiring the task, for an idle attached worker with
    nothing else running: ns per sample."""
    out = []
    for _ in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                emu.attach(host, name="idle")
                os.write(w, b"R")
                while True:
                    signal.pause()
            finally:
                os._exit(1)
        os.close(w)
        ok = os.read(r, 1) == b"R"
        os.close(r)
        slot = next((s for s in range(core.ntasks) if core.task(s)["tid"] == pid
                     and core.task(s)["state"] == C.TASK_ALIVE), None) if ok else None
        time.sleep(0.01)
        t0 = time.monotonic_ns()
        os.kill(pid, signal.SIGKILL)
        if slot is not None:
            end = time.monotonic() + 5
            while core.task(slot)["tid"] == pid and core.task(slot)["state"] == C.TASK_ALIVE \
                    and time.monotonic() < end:
                time.sleep(0.00005)
            out.append(time.monotonic_ns() - t0)
        os.waitpid(pid, 0)
    return out


class Soak:
    def __init__(self, kills: int, seed: int, workers: int, round_kills: int, ram: str,
                 huge: int, policy: str | None, max_delay: float, verbose: bool,
                 fill: bool = True):
        self.kills_target, self.seed, self.conc = kills, seed, workers
        self.fill = fill
        self.round_kills, self.max_delay, self.verbose = round_kills, max_delay, verbose
        self.rng = random.Random(seed)
        self.host = emu.start(ram=ram, hugepages={"2M": huge} if huge else None, policy=policy)
        self.sup = self.host.private_pid
        self.core = shm.Segments.open(tuple(self.host._call("segments")["names"])).core
        self.tmp = tempfile.mkdtemp(prefix="emu-soak-")
        self.errlog = os.open(os.path.join(self.tmp, "errors"), os.O_WRONLY | os.O_CREAT
                              | os.O_APPEND, 0o600)
        self.errfd = os.open(os.path.join(self.tmp, "stderr"), os.O_WRONLY | os.O_CREAT
                             | os.O_APPEND, 0o600)
        self.workers: set[int] = set()
        self.kills = 0
        self.kinds: dict[str, int] = {}
        self.retire_ns: list[int] = []
        self.unretired = 0
        self.violations: list[str] = []
        self.leaked_tasks = 0
        self.sup_died = False
        self.rounds = 0
        self.frames_leaked = 0
        self.fd0 = self.rss0 = None
        self.fd_growth = self.rss_growth = 0
        self.t_kill = 0.0
        self.huge_total0 = self.host.meminfo().get("HugePages_Total", 0)

    def close(self) -> None:
        self._kill_all()
        self.host.close()
        os.close(self.errlog)
        os.close(self.errfd)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- children ----
    def _reap(self) -> None:
        while True:
            try:
                pid, _st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.workers.discard(pid)
            if pid == self.sup:
                self.sup_died = True
                self.host.private_pid = None

    def _alive_tasks(self) -> list[tuple[int, int, int]]:
        """(slot, tid, tgid) of every task the supervisor has in its table."""
        out = []
        for s in range(self.core.ntasks):
            t = self.core.task(s)
            if t["state"] == C.TASK_ALIVE:
                out.append((s, t["tid"], t["tgid"]))
        return out

    def _kill_one(self) -> None:
        tasks = self._alive_tasks()
        cands = [(s, tid, tg) for s, tid, tg in tasks]
        # sometimes a worker that may not have attached yet (a kill during attach)
        if not cands or self.rng.random() < 0.1:
            cands += [(-1, pid, pid) for pid in self.workers]
        if not cands:
            return
        slot, tid, tgid = self.rng.choice(cands)
        if _stat_state(tid) in (None, "Z", "X"):
            return
        what = ("worker, any state" if slot < 0 else "clone()d thread" if tid != tgid
                else "worker main thread" if tid in self.workers else "fork()ed process")
        t0 = time.monotonic_ns()
        try:
            os.kill(tid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.kills += 1
        self.kinds[what] = self.kinds.get(what, 0) + 1
        if slot < 0:
            return
        end = time.monotonic() + 5
        core = self.core
        while True:
            t = core.task(slot)
            if t["tid"] != tid or t["state"] != C.TASK_ALIVE:
                self.retire_ns.append(time.monotonic_ns() - t0)
                return
            if time.monotonic() > end:
                self.unretired += 1
                self.violations.append("task %d not retired 5 s after SIGKILL" % tid)
                return
            time.sleep(0.0001)

    def _scrub(self) -> None:
        """Patrol scrub.  A worker killed between hw_poison and the read that was
        to consume it leaves a latent error in a frame that is then freed and
        reused; a later read(2) of it as page cache would panic the machine (a
        kernel-mode load, as in Linux) and end the soak.  Each such error is
        reported as a deferred one (hw_detect: memory_failure()), as a scrubber
        would find it."""
        core = self.core
        info = core.info()
        cv, _pv = core.views()
        hwerr = bytes(cv[info["off_hwerr"]:info["off_hwerr"] + core.nframes])
        for m in re.finditer(rb"[^\x00]", hwerr):
            if not core.flags(m.start()) & PG_HWPOISON:
                self.host.hw_detect(m.start())

    def _kill_all(self) -> None:
        """Kill every worker and every task, reap, and wait until the supervisor has
        retired them all."""
        end = time.monotonic() + 10
        while time.monotonic() < end:
            tids = {tid for _s, tid, _tg in self._alive_tasks()} | self.workers
            for tid in tids:
                try:
                    os.kill(tid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._reap()
            if not tids:
                return
            time.sleep(0.01)

    def _huge_poison_ok(self) -> bool:
        return self.host.meminfo().get("HugePages_Total", 0) > self.huge_total0 // 2

    # ---- a round ----
    def run_round(self, nkills: int) -> None:
        goal = self.kills + nkills
        huge_poison = self._huge_poison_ok()
        t0 = time.monotonic()
        while self.kills < goal and not self.sup_died:
            while len(self.workers) < self.conc:
                self.workers.add(launch(self.host, self.rng.randrange(1 << 30), self.errlog,
                                        self.errfd, huge_poison))
            time.sleep(self.rng.random() ** 2 * self.max_delay)
            self._reap()
            self._kill_one()
            self._reap()
            self._scrub()
        self.t_kill += time.monotonic() - t0
        self._kill_all()

    # ---- the checks, with every worker gone ----
    def frames_unaccounted(self) -> tuple[list[int], int]:
        """Frames neither free, nor reserved, nor in the HugeTLB pool, nor retired by
        poison: with no process left, each one is a leak.  Also: how many huge
        folios poison retired (memory_failure keeps its reference on an in-use
        HugeTLB folio, as get_huge_page_for_hwpoison does: it never goes back)."""
        core = self.core
        n = core.nframes
        out = []
        huge_poisoned = 0
        pfn = 0
        while pfn < n:
            fl = core.flags(pfn)
            if fl & PG_BUDDY:
                pfn += 1 << core.order(pfn)
                continue
            if fl & PG_HUGETLB and core.head(pfn) == pfn:
                if fl & PG_HWPOISON:
                    huge_poisoned += 1
                elif core.refcount(pfn) or core.mapcount(pfn):
                    out.append(pfn)
                pfn += 1 << core.order(pfn)
                continue
            if not fl & (PG_RESERVED | PG_HWPOISON):
                out.append(pfn)
            pfn += 1
        return out, huge_poisoned

    def check(self, final: bool = False) -> list[str]:
        v = []
        self._kill_all()
        end = time.monotonic() + 3
        while True:
            st = self.host.status()
            procs = st["processes"]
            frames, huge_poisoned = self.frames_unaccounted()
            mi = st["meminfo"]
            pool_ok = (mi.get("HugePages_Free", 0) + huge_poisoned == mi.get("HugePages_Total", 0)
                       and not mi.get("HugePages_Rsvd"))
            bad = bool(procs or st["files"] or st["inodes"] or self.core.vmas() or frames
                       or not pool_ok or st["pt_pages"] > (self.pt0 or 0))
            if not bad or time.monotonic() > end:
                break
            time.sleep(0.05)
        if procs:
            n = sum(len(p["threads"]) for p in procs)
            self.leaked_tasks += n
            v.append("leaked tasks: %s" % [(p["tgid"], [t["tid"] for t in p["threads"]])
                                           for p in procs])
        if st["files"] or st["inodes"]:
            v.append("leaked files: %d inodes %s" % (st["inodes"], st["files"][:4]))
        if self.core.vmas():
            v.append("leaked VMAs: %s" % self.core.vmas()[:4])
        if frames:
            self.frames_leaked = max(self.frames_leaked, len(frames))
            v.append("%d frames neither free nor poisoned, e.g. %s" % (
                len(frames), ["%#x flags=%#x ref=%d map=%d" % (
                    p, self.core.flags(p), self.core.refcount(p), self.core.mapcount(p))
                    for p in frames[:4]]))
        if not pool_ok:
            v.append("HugeTLB pool: free %s + %d poisoned of %s, rsvd %s" % (
                mi.get("HugePages_Free"), huge_poisoned, mi.get("HugePages_Total"),
                mi.get("HugePages_Rsvd")))
        if hasattr(self.host, "check_invariants"):
            v += ["invariant: %s" % x for x in self.host.check_invariants()]
        if self.pt0 is not None and st["pt_pages"] > self.pt0:
            v.append("page-table pages %d, baseline %d" % (st["pt_pages"], self.pt0))
        self.violations += v
        return v

    def take_baseline(self) -> None:
        if self.fill:
            fill_rings(self.host)
            self.check()
        time.sleep(0.3)
        self.pt0 = self.host.status()["pt_pages"]
        self.fd0 = _sup_fds(self.sup)
        self.rss0 = _sup_rss_kb(self.sup)

    def measure_growth(self) -> None:
        self.fd_growth = _sup_fds(self.sup) - self.fd0
        self.rss_growth = _sup_rss_kb(self.sup) - self.rss0

    def run(self) -> dict:
        self.pt0 = None
        warm = min(30, max(self.kills_target // 10, 5))
        self.run_round(warm)
        self.check()
        self.take_baseline()
        while self.kills < self.kills_target and not self.sup_died:
            self.run_round(min(self.round_kills, self.kills_target - self.kills))
            self.rounds += 1
            v = self.check()
            self.measure_growth()
            if self.verbose:
                print("round %d: %d kills, %d violations, fds %+d, rss %+d kB"
                      % (self.rounds, self.kills, len(v), self.fd_growth, self.rss_growth),
                      flush=True)
                for x in v[:5]:
                    print("   ", x, flush=True)
        if self.sup_died:
            self.violations.append("the supervisor died")
        self.measure_growth()
        if self.fd_growth > FD_GROWTH_MAX:
            self.violations.append("supervisor fds grew by %d" % self.fd_growth)
        if self.rss_growth > RSS_GROWTH_MAX_KB:
            self.violations.append("supervisor RSS grew by %d kB" % self.rss_growth)
        return self.figures()

    def worker_errors(self) -> list[str]:
        """What workers noted: an exception no valid operation should raise, or EINVAL."""
        with open(os.path.join(self.tmp, "errors")) as f:
            return [e for e in f.read().splitlines() if not e.endswith(SELF_KILL)]

    def self_kills(self) -> int:
        with open(os.path.join(self.tmp, "errors")) as f:
            return sum(e.endswith(SELF_KILL) for e in f.read().splitlines())

    def figures(self) -> dict:
        errs = self.worker_errors()
        self.violations += ["worker: " + e for e in errs]
        self.kinds["thread, by itself in a SIGBUS handler"] = self.self_kills()
        return {"kills": self.kills, "kinds": self.kinds, "rounds": self.rounds,
                "violations": len(self.violations),
                "violation_list": self.violations, "leaked_tasks": self.leaked_tasks,
                "leaked_frames": self.frames_leaked, "fd_growth": self.fd_growth,
                "rss_growth_kb": self.rss_growth, "unretired": self.unretired,
                "kills_per_s": self.kills / self.t_kill if self.t_kill else 0.0,
                "retire_ns": self.retire_ns, "worker_errors": errs,
                "supervisor_died": self.sup_died}


def run(kills: int = 1000, seed: int | None = None, workers: int = 3, round_kills: int = 100,
        ram: str = "256M", huge: int = 24, policy: str | None = None, max_delay: float = 0.25,
        verbose: bool = False, baseline_samples: int = 200, fill: bool = True) -> dict:
    """The crash soak; returns the figures (see Soak.figures) plus the baseline."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)     # orphaned workers come back here
    s = Soak(kills, seed, workers, round_kills, ram, huge, policy, max_delay, verbose, fill)
    try:
        fig = s.run()
        fig["quiet_ns"] = quiet_retire(s.host, s.core, baseline_samples // 2)
    finally:
        s.close()
    fig["seed"] = seed
    fig["baseline_ns"] = baseline_kill_reap(baseline_samples)
    return fig


def print_figures(fig: dict) -> None:
    r, b = fig["retire_ns"], fig["baseline_ns"]
    print("seed %d: %d kills in %d rounds, %.1f kills/s" % (
        fig["seed"], fig["kills"], fig["rounds"], fig["kills_per_s"]))
    print("killed: %s" % ", ".join("%d %s" % (n, k) for k, n in sorted(fig["kinds"].items())))
    print("violations %d, leaked tasks %d, leaked frames %d, unretired %d, supervisor fds %+d,"
          " RSS %+d kB, worker errors %d" % (
              fig["violations"], fig["leaked_tasks"], fig["leaked_frames"], fig["unretired"],
              fig["fd_growth"], fig["rss_growth_kb"], len(fig["worker_errors"])))
    for v in fig["violation_list"][:20]:
        print("  violation:", v)
    q = fig.get("quiet_ns")
    if q and b:
        report("idle worker: SIGKILL -> retired, median", statistics.median(q) / 1e3, "us",
               "SIGKILL -> waitpid reap, median", statistics.median(b) / 1e3)
        report("idle worker: SIGKILL -> retired, p99", _pctl(q, 0.99) / 1e3, "us",
               "SIGKILL -> waitpid reap, p99", _pctl(b, 0.99) / 1e3)
    if r and b:
        report("under load: SIGKILL -> retired, median", statistics.median(r) / 1e3, "us",
               "SIGKILL -> waitpid reap, median", statistics.median(b) / 1e3)
        report("under load: SIGKILL -> retired, p99", _pctl(r, 0.99) / 1e3, "us",
               "SIGKILL -> waitpid reap, p99", _pctl(b, 0.99) / 1e3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workers", type=int, default=3, help="worker processes at once")
    ap.add_argument("--round", type=int, default=100, help="kills between checks")
    ap.add_argument("--ram", default="256M")
    ap.add_argument("--hugepages", type=int, default=24, help="2M pages in the pool")
    ap.add_argument("--policy", default=None)
    ap.add_argument("--max-delay", type=float, default=0.25)
    ap.add_argument("--no-fill", action="store_true",
                    help="do not fill the supervisor's trace/dmesg rings before the RSS baseline")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    fig = run(a.kills, a.seed, a.workers, a.round, a.ram, a.hugepages, a.policy, a.max_delay,
              a.verbose, fill=not a.no_fill)
    print_figures(fig)
    ok = not fig["violations"] and not fig["supervisor_died"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
