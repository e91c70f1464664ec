"""A SIGKILLed supervisor: how long until each attached worker notices.

A worker blocked in a system call (the supervisor is stopped first, so the call
stays unanswered), one idling in me.idle(), and one spinning in the fast path
(loads and stores with no call to the kernel).  Measured from the SIGKILL of the
supervisor to the worker's exit, seen by this process through a pidfd.

Baseline, same run, same shape: a bare process waiting in select() on a pidfd of
a sleeping process; that process is SIGKILLed, the waiter SIGKILLs itself (as
the worker's watchdog does), and this process sees it exit through a pidfd.
The ratio is the runtime's cost over the kernel's own wakeup chain.  The first
figure includes the supervisor's own teardown (a pidfd fires once the process
has exited, its segments unmapped; the bare victim is a small process); the
second starts when this process sees the supervisor gone, and includes, for the
spinning worker, the GIL hand-over to the watchdog thread
(sys.getswitchinterval(), 5 ms).
"""
from __future__ import annotations

import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import report  # noqa: E402

import emu  # noqa: E402

RUNS = 7
CWD = tempfile.gettempdir()

WORKER = """
    import os, sys
    import emu
    from emu import uapi as u
    h = emu.connect(sys.argv[1])
    me = emu.attach(h, name=sys.argv[2])
    a = me.mmap(0, 8 * 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"data" * 8192)
    print("ready", flush=True)
    mode = sys.argv[2]
    if mode == "blocked":
        sys.stdin.readline()
        me.mmap(0, 4096, u.PROT_READ, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    elif mode == "idle":
        me.idle(120)
    else:
        while True:
            me.write(a, b"spin")
            me.read(a, 4)
"""

WAITER = """
    import os, select, signal, sys
    fd = os.pidfd_open(int(sys.argv[1]))
    print("ready", flush=True)
    select.select([fd], [], [])
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _kill_and_watch(victim: int, p: subprocess.Popen, timeout: float = 10.0) -> tuple[float, float]:
    """SIGKILL victim; ns until it is gone, and until p has exited (both seen
    through pidfds, as the worker's watchdog sees the supervisor)."""
    vfd, pfd = os.pidfd_open(victim), os.pidfd_open(p.pid)
    try:
        t0 = time.perf_counter_ns()
        os.kill(victim, signal.SIGKILL)
        select.select([vfd], [], [], timeout)
        t_dead = time.perf_counter_ns()
        if not select.select([pfd], [], [], timeout)[0]:
            raise RuntimeError("pid %d did not notice within %.0f s" % (p.pid, timeout))
        t1 = time.perf_counter_ns()
    finally:
        os.close(vfd)
        os.close(pfd)
    p.wait()
    return t1 - t0, t1 - t_dead


def worker_notice(mode: str) -> tuple[float, float]:
    h = emu.start(ram="64M")
    spid = h.private_pid
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WORKER), h.path, mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, cwd=CWD)
    try:
        assert p.stdout.readline().startswith("ready")
        if mode == "blocked":
            os.kill(spid, signal.SIGSTOP)
            p.stdin.write("go\n")
            p.stdin.flush()
            time.sleep(0.1)
        if mode == "spin":
            time.sleep(0.05)
        ns = _kill_and_watch(spid, p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.waitpid(spid, 0)
        h.private_pid = None
        h.close()
    return ns


def bare_notice() -> tuple[float, float]:
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], cwd=CWD)
    w = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WAITER), str(victim.pid)],
                         stdout=subprocess.PIPE, text=True, cwd=CWD)
    try:
        assert w.stdout.readline().startswith("ready")
        ns = _kill_and_watch(victim.pid, w)
    finally:
        for p in (victim, w):
            if p.poll() is None:
                p.kill()
            p.wait()
    return ns


def main() -> list[dict]:
    out = []
    base, figs = [], {"blocked": [], "idle": [], "spin": []}
    for _ in range(RUNS):                       # interleaved: the machine's load hits both alike
        base.append(bare_notice())
        for mode in figs:
            figs[mode].append(worker_notice(mode))
    med = statistics.median
    b_kill, b_gone = med(x[0] for x in base) / 1e3, med(x[1] for x in base) / 1e3
    for mode, label in (("blocked", "blocked in a call"), ("idle", "in me.idle()"),
                        ("spin", "spinning in the fast path")):
        v = figs[mode]
        out.append(report("SIGKILL supervisor -> worker %s exits" % label, med(x[0] for x in v) / 1e3,
                          "us", "SIGKILL -> bare pidfd waiter exits", b_kill, target="< 1 s"))
        out.append(report("  of which: supervisor gone -> worker exits", med(x[1] for x in v) / 1e3,
                          "us", "  victim gone -> waiter exits", b_gone))
    worst = max(x[0] for v in figs.values() for x in v) / 1e3
    print("worst of %d kills per state: %.0f us" % (RUNS, worst))
    emu.shm.cleanup()
    return out


if __name__ == "__main__":
    main()
