"""Scaling curves: how each cost grows, beside a same-run baseline per point.

    python benchmarks/bench_scaling.py [CURVE ...] [--quick] [--plot FILE.png]

Curves (all by default):
  mappers   memory_failure() latency (host.corrupt_pfn of a dirty shmem page) vs the
            number of early-kill processes mapping it (1..256).  Baseline: a bare
            os.kill to the same processes.
  threads   the same vs threads per process (1..64), 4 processes, only the last
            thread of each PR_MCE_KILL_EARLY (find_early_kill_thread scans them all).
            Baseline: a bare os.kill to the 4 early threads.
  syscalls  a supervisor system call (getpid) from N concurrent workers (1..64):
            p50/p99 latency and calls/s.  Baseline: the bare unix-socket JSON round
            trip (bench_syscall's echo server, same loop and client) at the same N.
  tasks     one worker's system call vs the number of tasks attached (1..768, the
            rest idle).  Baseline: the bare round trip, same run.
  guest     guest read_batch throughput vs vCPUs (1..32).  Baseline: the 1-vCPU
            figure x min(vCPUs, CPUs).
  rss       supervisor RSS and core table bytes vs guest_memfd size (1 GiB..1 TiB,
            mapped in the host and in a memslot, 64 pages touched, spread out; RAM
            fixed at 512M).  Baseline: the host kernel's page-table bytes (VmPTE) for
            a real mapping of the same size with the same 64 pages present.

Each table: x, the figure (median of repeats), the baseline, the ratio; then the
growth exponent (slope of log(figure) vs log(x) over the upper points) and the
complexity the code has, beside what the kernel's algorithm gives.
"""
from __future__ import annotations

import argparse
import array
import contextlib
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from bench_syscall import _echo_server  # noqa: E402

import emu  # noqa: E402
from emu import uapi as u  # noqa: E402

GIB = 1 << 30
CPUS = len(os.sched_getaffinity(0))
RW = u.PROT_READ | u.PROT_WRITE


# ------------------------------------------------------------------ helpers
def exponent(xs, ys) -> float | None:
    """Slope of log(y) vs log(x) over the upper half of the points (at least two)."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y and y > 0]
    pts = pts[len(pts) // 2 - (1 if len(pts) % 2 == 0 else 0):] if len(pts) > 2 else pts
    if len(pts) < 2:
        return None
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    return math.log(y1 / y0) / math.log(x1 / x0)


def table(title: str, xname: str, rows: list, cols: list[str], fig: str, base: str | None,
          complexity: str) -> dict:
    """Print one curve; rows are dicts with xname, the columns, or 'skip' (a reason)."""
    print("\n" + title, flush=True)
    head = "%8s" % xname + "".join("%16s" % c for c in cols) + ("%10s" % "ratio" if base else "")
    print(head)
    xs, ys, bs = [], [], []
    for r in rows:
        if "skip" in r:
            print("%8s  not reached: %s" % (r[xname], r["skip"]))
            continue
        line = "%8s" % r[xname] + "".join("%16s" % _fmt(r.get(c)) for c in cols)
        if base:
            line += "%9.2fx" % (r[fig] / r[base] if r.get(base) else float("nan"))
        print(line)
        xs.append(r[xname])
        ys.append(r[fig])
        bs.append(r.get(base) if base else None)
    e = exponent(xs, ys)
    eb = exponent(xs, bs) if base and all(bs) else None
    print("growth exponent of %s: %s%s" % (fig, "n/a" if e is None else "%.2f" % e,
                                           "" if eb is None else " (baseline %.2f)" % eb))
    print("complexity: " + complexity, flush=True)
    return {"title": title, "x": xname, "fig": fig, "base": base, "rows": rows, "exponent": e,
            "base_exponent": eb}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "%.1f" % v if v >= 100 else "%.3g" % v
    return str(v)


def _read_n(fd: int, n: int, timeout: float = 30.0) -> None:
    """Wait for n ack bytes on fd (each worker writes one per signal it handled)."""
    end = time.monotonic() + timeout
    got = 0
    while got < n:
        if time.monotonic() > end:
            raise TimeoutError("%d of %d acks" % (got, n))
        got += len(os.read(fd, n - got))


# ------------------------------------------------------------------ memory_failure()
def _wait_eof(fd: int) -> None:
    """Block until fd is readable, running signal handlers meanwhile: the worker's
    SIGBUS handler is SA_RESTART, so a blocking read would never let Python run it;
    select() always returns EINTR."""
    import select

    while not select.select([fd], [], [], 1.0)[0]:
        pass


def _mf_proc(t, base, npages, go_r, go_w, ack_w, nthreads):
    """An emulated process mapping the pages: main thread + nthreads-1 clones; the
    last thread is PR_MCE_KILL_EARLY and acks each SIGBUS (and each SIGWINCH, the
    baseline's bare kill) on ack_w; all end at EOF on go_r."""
    os.close(go_w)
    for i in range(npages):
        t.read(base + i * 4096, 1)                      # map every page in this process

    def early(th):
        th.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
        emu.sigaction(signal.SIGBUS, lambda s, info: os.write(ack_w, b"b"))
        signal.signal(signal.SIGWINCH, lambda s, f: os.write(ack_w, b"w"))
        os.write(ack_w, b"r")
        _wait_eof(go_r)                                 # EOF: the curve point is over
        return os.getpid()

    def idle(th):
        _wait_eof(go_r)

    if nthreads == 1:
        return early(t)
    clones = [t.clone(idle, name="idle%d" % i) for i in range(nthreads - 2)]
    last = t.clone(early, name="early")
    last.join()
    for c in clones:
        c.join()


def _mf_point(host, me, nproc: int, nthreads: int, repeats: int) -> dict:
    """corrupt_pfn of `repeats` dirty shmem pages that nproc processes map, each
    with an early-kill thread; beside a bare os.kill to those threads."""
    base = me.mmap(0, repeats * 4096, RW, u.MAP_SHARED | u.MAP_ANONYMOUS)
    for i in range(repeats):
        me.write(base + i * 4096, b"dirty")
    pfns = [me.pagemap(base + i * 4096).pfn for i in range(repeats)]
    go_r, go_w = os.pipe()
    ack_r, ack_w = os.pipe()
    procs = []
    try:
        for i in range(nproc):
            procs.append(me.fork(_mf_proc, base, repeats, go_r, go_w, ack_w, nthreads, name="m%d" % i))
        _read_n(ack_r, nproc, 120)
        # the early threads' pids: from /proc, the children of each process
        early = _early_pids(procs, nthreads)
        mf, kill = [], []
        for i in range(repeats):
            t0 = time.perf_counter_ns()
            for pid in early:
                os.kill(pid, signal.SIGWINCH)
            kill.append(time.perf_counter_ns() - t0)
            _read_n(ack_r, nproc)
            t0 = time.perf_counter_ns()
            host.corrupt_pfn(pfns[i])
            mf.append(time.perf_counter_ns() - t0)
            _read_n(ack_r, nproc)                       # every early thread got its AO
    finally:
        os.close(go_w)
        for p in procs:
            p.join(30)
        os.close(go_r)
        os.close(ack_r)
        os.close(ack_w)
        me.munmap(base, repeats * 4096)
    return {"mf_us": statistics.median(mf) / 1e3, "kill_us": statistics.median(kill) / 1e3}


def _result(th, timeout: float):
    """A thread's or process's return value (join() gives its exit status)."""
    code = th.join(timeout)
    if code != 0 or th.result is None:
        raise RuntimeError("%s exited with %s" % (th.name, code))
    return th.result


def _early_pids(procs, nthreads: int) -> list[int]:
    if nthreads == 1:
        return [p.pid for p in procs]
    import psutil

    out = []
    for p in procs:
        kids = [c for c in psutil.Process(p.pid).children() if c.name() or True]
        kids.sort(key=lambda c: c.create_time())
        out.append(kids[-1].pid)                        # the last clone: the early one
    return out


def _mf_curve(xs, nproc_of, nthreads_of, repeats, xname, title, complexity, tasks=1100):
    conf = _conf(tasks=tasks, mms=600)
    rows = []
    with emu.start(ram="512M", config=conf) as host:
        me = emu.attach(host, name="bench")
        for x in xs:
            try:
                r = _mf_point(host, me, nproc_of(x), nthreads_of(x), repeats)
            except OSError as e:
                rows.append({xname: x, "skip": "%s" % e})
                continue
            r[xname] = x
            rows.append(r)
        me.exit()
    os.unlink(conf)
    return table(title, xname, rows, ["mf_us", "kill_us"], "mf_us", "kill_us", complexity)


def _conf(**limits) -> str:
    fd, path = tempfile.mkstemp(prefix="emu-scaling-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write("[limits]\n" + "".join("%s = %d\n" % kv for kv in limits.items()))
    return path


MF_MAPPERS = (
    "the kernel's collect_procs_file walks every process (for_each_process) and, for each "
    "early-kill one, the i_mmap interval tree at the page's index: O(P x (log V + M)), "
    "i.e. O(M^2) when all P processes map the page, plus kill_procs' O(M) signals.  The "
    "emulator: %s")


def mappers(quick: bool) -> dict:
    xs = [1, 4, 16, 64, 128, 256] if not quick else [1, 8, 64]
    return _mf_curve(xs, lambda x: x, lambda x: 1, 9 if not quick else 5, "procs",
                     "memory_failure() latency vs processes mapping the page (1 thread each, "
                     "early kill), medians, us", MF_MAPPERS % MF_EMU)


MF_EMU = ("the same loops (MemoryFailure.collect_procs): for each process of the task "
          "list, task_early_kill, then the page's (mm, address) list from the core's i_mmap "
          "lookup (vma_address): O(P x M), as the kernel's; then O(M) signals (a mailbox "
          "record and a tgkill each) and try_to_unmap's O(M) rmap walk.  The signals "
          "dominate up to 256: the curve is linear, as the bare kills are.")


MF_THREADS = (
    "the kernel's find_early_kill_thread scans each process's threads until the first "
    "early one (for_each_thread): O(P x T) when it is the last; the signals stay O(P).  "
    "The emulator's task_early_kill is the same scan over Python objects.")


def threads(quick: bool) -> dict:
    xs = [1, 4, 16, 32, 64] if not quick else [1, 8, 32]
    return _mf_curve(xs, lambda x: 4, lambda x: x, 9 if not quick else 5, "threads",
                     "memory_failure() latency vs threads per process (4 processes, the last "
                     "thread of each early kill), medians, us", MF_THREADS)


# ------------------------------------------------------------------ system calls
def _sc_worker(t, n, go_r, out_w):
    os.read(go_r, 1)
    samples = array.array("q")
    t0 = time.perf_counter_ns()
    for _ in range(n):
        s = time.perf_counter_ns()
        t._call("getpid")
        samples.append(time.perf_counter_ns() - s)
    t1 = time.perf_counter_ns()
    return t0, t1, samples.tobytes()


def _echo_worker(path, n, go_r, out_w):
    from emu.user.channel import Channel

    ch = Channel(path)
    ch.spin_ns = ch.halt_poll_ns
    os.write(out_w, b"r")
    os.read(go_r, 1)
    samples = array.array("q")
    t0 = time.perf_counter_ns()
    for _ in range(n):
        s = time.perf_counter_ns()
        ch.call("echo", addr=0x7F0000000000, write=False)
        samples.append(time.perf_counter_ns() - s)
    t1 = time.perf_counter_ns()
    ch.close()
    return t0, t1, samples.tobytes()


def _summary(results) -> tuple[float, float, float]:
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    allv = array.array("q")
    for r in results:
        allv.frombytes(r[2])
    s = sorted(allv)
    return (s[len(s) // 2] / 1e3, s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3,
            len(s) / ((end - start) / 1e9))


def _echo_round(path: str, nw: int, n: int) -> tuple:
    import pickle

    go_r, go_w = os.pipe()
    rd_r, rd_w = os.pipe()
    kids = []
    for _ in range(nw):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                res = _echo_worker(path, n, go_r, rd_w)
                data = pickle.dumps(res)
                while data:
                    data = data[os.write(w, data):]
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        kids.append((pid, r))
    _read_n(rd_r, nw)
    os.write(go_w, b"g" * nw)
    out = []
    for pid, r in kids:
        chunks = []
        while True:
            b = os.read(r, 1 << 20)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        os.waitpid(pid, 0)
        out.append(pickle.loads(b"".join(chunks)))
    for fd in (go_r, go_w, rd_r, rd_w):
        os.close(fd)
    return _summary(out)


def _emu_round(me, nw: int, n: int) -> tuple:
    go_r, go_w = os.pipe()
    ws = [me.fork(_sc_worker, n, go_r, -1, name="w%d" % i) for i in range(nw)]
    os.write(go_w, b"g" * nw)
    out = [_result(w, 120) for w in ws]
    os.close(go_r)
    os.close(go_w)
    return _summary(out)


@contextlib.contextmanager
def _echo_service():
    """The baseline server (many clients), polling as the supervisor does: yields
    its socket path; killed and removed after."""
    from emu import config as cfgmod

    poll = cfgmod.default()["supervisor"]["halt_poll_ns"]
    tmp = tempfile.mkdtemp(prefix="emu-scaling-")
    path = os.path.join(tmp, "echo.sock")
    r, w = os.pipe()
    epid = os.fork()
    if epid == 0:
        try:
            _echo_server(path, w, poll, many=True)
        finally:
            os._exit(1)
    os.read(r, 1)
    try:
        yield path
    finally:
        os.kill(epid, signal.SIGKILL)
        os.waitpid(epid, 0)
        os.unlink(path)
        os.rmdir(tmp)


def syscalls(quick: bool) -> dict:
    xs = [1, 4, 16, 64] if not quick else [1, 4, 16]
    n = 400 if not quick else 150
    repeats = 3 if not quick else 1
    rows = []
    with _echo_service() as path, emu.start(ram="256M") as host:
        me = emu.attach(host, name="bench")
        for x in xs:
            em, ec = [], []
            for _ in range(repeats):                     # interleaved
                em.append(_emu_round(me, x, n))
                ec.append(_echo_round(path, x, n))
            med = lambda rs, i: statistics.median(v[i] for v in rs)
            rows.append({"workers": x, "p50_us": med(em, 0), "p99_us": med(em, 1),
                         "calls_s": med(em, 2), "echo_p50": med(ec, 0), "echo_p99": med(ec, 1),
                         "echo_calls_s": med(ec, 2)})
        me.exit()
    t = table("supervisor system call (getpid) vs concurrent workers, %d calls each, medians "
              "of %d rounds" % (n, repeats), "workers", rows,
              ["p50_us", "echo_p50", "p99_us", "echo_p99", "calls_s", "echo_calls_s"],
              "p50_us", "echo_p50", SYSCALL_CX)
    e = exponent([r["workers"] for r in rows], [r["calls_s"] for r in rows])
    print("growth exponent of calls/s: %.2f (1 supervisor thread: 0 is the best it can do)" % e)
    return t


def _idle_proc(t, go_r, go_w):
    os.close(go_w)
    _wait_eof(go_r)


def tasks(quick: bool) -> dict:
    """One worker's system calls while other tasks exist (idle, attached)."""
    xs = [1, 64, 256, 768] if not quick else [1, 256]
    n = 4000 if not quick else 2000
    conf = _conf(tasks=1100, mms=1000)
    rows = []
    with _echo_service() as path, emu.start(ram="512M", config=conf) as host:
        me = emu.attach(host, name="bench")
        idle = []
        go_r, go_w = os.pipe()
        for x in xs:
            try:
                while len(idle) + 2 < x:
                    idle.append(me.fork(_idle_proc, go_r, go_w, name="idle"))
            except OSError as e:
                rows.append({"tasks": x, "skip": str(e)})
                break
            _emu_round(me, 1, n // 10)                    # warm up
            em = _emu_round(me, 1, n)
            ec = _echo_round(path, 1, n)
            rows.append({"tasks": x, "p50_us": em[0], "echo_p50": ec[0], "p99_us": em[1],
                         "echo_p99": ec[1], "calls_s": em[2], "echo_calls_s": ec[2]})
        os.close(go_w)
        for th in idle:
            th.join(30)
        os.close(go_r)
        me.exit()
    os.unlink(conf)
    return table("one worker's system call (getpid, %d calls) vs tasks attached (the rest "
                 "idle), calls/s and us" % n, "tasks", rows,
                 ["calls_s", "echo_calls_s", "p50_us", "echo_p50", "p99_us", "echo_p99"],
                 "calls_s", "echo_calls_s", TASKS_CX % TASKS_EMU)


TASKS_CX = (
    "the kernel's per-call cost does not depend on how many tasks exist (a task's exit "
    "is an event, nothing polls).  The emulator: %s  Before: every task every tick (~50-"
    "100 us each), O(tasks) per 100 ms on the serving thread.")
TASKS_EMU = ("_supervise checks at most SWEEP_BATCH (32) tasks' liveness per 100 ms tick, round "
             "robin (a death is seen at once as EOF on its socket; the sweep is the "
             "fallback): O(1) per tick, so a call's cost does not grow with the tasks.")


SYSCALL_CX = (
    "the kernel serves system calls on every CPU at once: O(1) per call, throughput grows "
    "with CPUs.  The emulator has one supervisor thread: each request is O(1) (a dict "
    "lookup of the connection, the handler), so calls/s is flat and p50 grows as O(N) "
    "queueing, as the echo server's does; _supervise's liveness sweep checks at most 32 "
    "tasks per 100 ms tick, not per request.")


# ------------------------------------------------------------------ guest access
SLOT = 64 << 20
NACC = 100_000


def _vcpu_thread(t, vm, idx, go_r, ready_w, runs):
    vcpu = vm.create_vcpu(idx)
    rng = random.Random(idx)
    gpas = array.array("Q", (rng.randrange(0, SLOT - 8) & ~7 for _ in range(NACC)))

    def batch(g):
        while True:
            yield g.read_batch(gpas, 8)
            yield g.sync(0)

    vcpu.set_guest(batch)
    vcpu.run()                                           # populate stage-2
    os.write(ready_w, b"r")
    os.read(go_r, 1)
    t0 = time.perf_counter_ns()
    for _ in range(runs):
        vcpu.run()
    return t0, time.perf_counter_ns()


_next_id = [0]


def _guest_round(me, vm, n, runs) -> float:
    go_r, go_w = os.pipe()
    rd_r, rd_w = os.pipe()
    ths = []
    for i in range(n):                                   # vCPU ids live as long as the VM
        ths.append(me.clone(_vcpu_thread, vm, _next_id[0], go_r, rd_w, runs, name="vcpu%d" % i))
        _next_id[0] += 1
    _read_n(rd_r, n, 120)
    os.write(go_w, b"g" * n)
    res = [_result(th, 300) for th in ths]
    for fd in (go_r, go_w, rd_r, rd_w):
        os.close(fd)
    span = max(r[1] for r in res) - min(r[0] for r in res)
    return n * runs * NACC / (span / 1e9) / 1e6         # M accesses/s


def _hw_round(n, runs) -> float:
    """n plain processes reading the same random addresses from a real resident mmap
    (emu._core.HwMem) at once: what this machine's CPUs give, measured."""
    import pickle

    from emu import _core as C

    go_r, go_w = os.pipe()
    rd_r, rd_w = os.pipe()
    kids = []
    for i in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                hw = C.HwMem(SLOT)
                rng = random.Random(i)
                gpas = array.array("Q", (rng.randrange(0, SLOT - 8) & ~7 for _ in range(NACC)))
                out = bytearray(8 * NACC)
                hw.read_batch(0, gpas, 8, out)
                os.write(rd_w, b"r")
                os.read(go_r, 1)
                t0 = time.perf_counter_ns()
                for _ in range(runs):
                    hw.read_batch(0, gpas, 8, out)
                os.write(w, pickle.dumps((t0, time.perf_counter_ns())))
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        kids.append((pid, r))
    _read_n(rd_r, n, 120)
    os.write(go_w, b"g" * n)
    res = []
    for pid, r in kids:
        res.append(pickle.loads(os.read(r, 4096)))
        os.close(r)
        os.waitpid(pid, 0)
    for fd in (go_r, go_w, rd_r, rd_w):
        os.close(fd)
    span = max(x[1] for x in res) - min(x[0] for x in res)
    return n * runs * NACC / (span / 1e9) / 1e6


def guest(quick: bool) -> dict:
    xs = [1, 2, 4, 8, 16, 32] if not quick else [1, 2, 8]
    runs = 20 if not quick else 10                     # windows of 2M+ accesses: shorter ones were noise
    repeats = 3 if not quick else 1
    rows = []
    with emu.start(ram="512M") as host:
        me = emu.attach(host, name="bench")
        vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        gfd = vm.create_guest_memfd(SLOT, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
        vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, SLOT, 0, gfd, 0)
        one = None
        for x in xs:
            try:
                v = statistics.median(_guest_round(me, vm, x, runs) for _ in range(repeats))
            except OSError as e:
                rows.append({"vcpus": x, "skip": str(e)})
                continue
            hw = statistics.median(_hw_round(x, runs) for _ in range(repeats))
            if x == 1:
                one = v
            rows.append({"vcpus": x, "Macc_s": v, "ideal": one * min(x, CPUS), "hw_Macc_s": hw})
        me.exit()
    return table("guest read_batch throughput vs vCPUs (8-byte reads at random GPAs over 64 MiB, "
                 "%d per run), medians, M accesses/s; ideal = 1 vCPU x min(vCPUs, %d CPUs); hw = "
                 "the same reads as plain loads from a real mmap in as many processes"
                 % (NACC, CPUS), "vcpus", rows, ["Macc_s", "ideal", "hw_Macc_s"], "Macc_s", "ideal",
                 GUEST_CX)


GUEST_CX = (
    "on hardware each vCPU thread runs its guest's loads itself: throughput grows with "
    "vCPUs up to the CPUs, then stays flat (time-sliced).  The emulator's read_batch is "
    "the same: the walk runs in the vCPU's own process with no supervisor round trip "
    "once stage-2 is populated, so the curve should follow min(vCPUs, CPUs).")


# ------------------------------------------------------------------ memory
TOUCH = 64


def _rss_point(size: int) -> dict:
    import psutil
    from bench_hugetlb import host_pte_bytes

    with emu.start(ram="512M") as host:
        seg = host._call("segments")
        sup = psutil.Process(seg["pid"])
        me = emu.attach(host, name="bench")
        boot_rss = sup.memory_info().rss
        boot_pt = host.status()["limits"]["page_tables"]["used"]
        vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        gfd = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
        vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, size, 0, gfd, 0)
        hva = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
        step = size // TOUCH
        for i in range(TOUCH):
            me.write(hva + i * step, b"x")
        rss = sup.memory_info().rss
        uss = sup.memory_full_info().uss
        st = os.stat("/dev/shm" + seg["names"][0])
        tables = st.st_blocks * 512
        pt = (host.status()["limits"]["page_tables"]["used"] - boot_pt) * 4096
        me.exit()
    pte = host_pte_bytes(size, step)
    return {"rss_MiB": rss / 2**20, "d_rss_MiB": (rss - boot_rss) / 2**20, "uss_MiB": uss / 2**20,
            "tables_MiB": tables / 2**20, "pt_MiB": pt / 2**20,
            "host_pte_MiB": pte / 2**20}


def rss(quick: bool) -> dict:
    xs = [1, 16, 256, 1024] if not quick else [1, 64, 1024]
    rows = []
    for g in xs:
        try:
            r = _rss_point(g * GIB)
        except OSError as e:
            rows.append({"GiB": g, "skip": str(e)})
            continue
        r["GiB"] = g
        rows.append(r)
    t = table("supervisor memory vs guest_memfd size (RAM 512M, %d pages touched, spread; "
              "host mmap + memslot of the whole size), MiB" % TOUCH, "GiB", rows,
              ["rss_MiB", "d_rss_MiB", "uss_MiB", "tables_MiB", "pt_MiB", "host_pte_MiB"],
              "pt_MiB", "host_pte_MiB", RSS_CX % RSS_EMU)
    e = exponent([r["GiB"] for r in rows if "skip" not in r],
                 [r["rss_MiB"] for r in rows if "skip" not in r])
    print("growth exponent of rss_MiB: %s" % ("n/a" if e is None else "%.2f" % e))
    return t


RSS_CX = (
    "the kernel's cost of a sparse guest is its page tables for the touched pages (a PTE "
    "page and a PMD page per 1 GiB region touched): O(touched), independent of the size; "
    "struct pages are O(RAM), not O(guest).  The emulator: %s")
# rss_MiB/uss_MiB: the supervisor process; d_rss_MiB: its growth since boot; tables_MiB:
# the core segment resident (mostly the 512M RAM's frame records)
RSS_EMU = ("the core segment (frame records for the RAM, a page-table pool) is sized by "
           "RAM and limits, not by the guest; page-table pages are taken per touched "
           "region (pt_MiB: the page-table pages taken since boot); the supervisor's "
           "Python state per guest_memfd is O(touched pages).  Flat: O(touched).  RAM itself "
           "costs O(frames) in frame records, as struct pages do (a 1 TiB RAM boot: 12 GiB, "
           "48 B per 4 KiB frame; the kernel's struct page is 64 B).")


# ------------------------------------------------------------------ main
CURVES = {"mappers": mappers, "threads": threads, "syscalls": syscalls, "tasks": tasks,
          "guest": guest, "rss": rss}


def plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install 'gmem-emu[plot]'); tables only")
        return
    import textwrap

    cols = min(3, len(results))
    nrows = -(-len(results) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.0 * cols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.set_visible(False)
    for ax, res in zip(axes.flat, results, strict=False):   # spare cells stay hidden
        rows = [r for r in res["rows"] if "skip" not in r]
        xs = [r[res["x"]] for r in rows]
        ax.loglog(xs, [r[res["fig"]] for r in rows], "o-", label=res["fig"])
        if res["base"]:
            ax.loglog(xs, [r[res["base"]] for r in rows], "s--", label=res["base"])
        ax.set_xlabel(res["x"])
        title = res["title"].split(",")[0]
        if title.count("(") > title.count(")"):
            title = title[:title.rindex(" (")]          # not half a parenthesis
        ax.set_title("\n".join(textwrap.wrap(title, 44)), fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("plot written to %s" % path)


def main(argv: list[str] | None = None, quick: bool = True) -> list[dict]:
    """benchmarks/run.py: the quick curves.  Returns report rows (figure beside baseline)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("curves", nargs="*", metavar="CURVE",
                    help="one or more of: %s (default: all)" % ", ".join(CURVES))
    ap.add_argument("--quick", action="store_true", help="fewer points and repeats")
    ap.add_argument("--plot", metavar="FILE.png", help="also plot (needs the [plot] extra)")
    a = ap.parse_args(argv if argv is not None else [] if quick else None)
    if argv is None and quick:
        a.quick = True
    bad = [c for c in a.curves if c not in CURVES]
    if bad:
        ap.error("unknown curve %s (choose from %s)" % (", ".join(bad), ", ".join(CURVES)))
    results = []
    t0 = time.monotonic()
    for name in a.curves or CURVES:
        results.append(CURVES[name](a.quick))
    print("\n%d curves in %.0f s" % (len(results), time.monotonic() - t0))
    if a.plot:
        plot(results, a.plot)
    out = []
    for res in results:
        last = [r for r in res["rows"] if "skip" not in r]
        if last and res["base"]:
            r = last[-1]
            out.append({"name": "%s at %s=%s" % (res["fig"], res["x"], r[res["x"]]),
                        "value": r[res["fig"]], "baseline": res["base"],
                        "baseline_value": r[res["base"]], "ratio": r[res["fig"]] / r[res["base"]],
                        "exponent": res["exponent"]})
    return out


if __name__ == "__main__":
    main(sys.argv[1:], quick=False)
