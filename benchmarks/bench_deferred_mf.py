"""(c) A deferred memory failure until the AO handler ran in another worker.

A worker (the main thread of a QEMU-shaped process, PR_MCE_KILL_EARLY) has
dirtied a shared memfd mapping and idles.  Each iteration a patrol-scrub error
is reported on one of its pages (host.hw_detect).  Measured: from the moment
memory_failure() begins in the supervisor (its "memory_failure" trace event, the
function's first line) to the worker's SIGBUS handler running: the handler
stamps CLOCK_MONOTONIC into shared memory.  The figure covers the whole kernel
path: page-state dispatch, rmap walk, unmap, thread selection, mailbox, doorbell,
delivery, and the runtime's dispatch to the handler (mailbox record to SigInfo).

Baseline, same run: os.kill(SIGBUS) from one process to another idling the same
way, whose Python handler has the same body (the stamp); measured from just
before os.kill to that stamp.  Both receivers live side by side and
blocks of 50 errors alternate between them.
For information: the split of that figure at the doorbell (the "signal" trace
event's doorbell_ns, taken just before the tgkill), and the end-to-end figure
from the injecting client (it adds one control-socket request).

Also for information, the idle case again pinned two ways: the sending side
(supervisor and client; the bare sender) on CPU 0 and the worker on CPU 1, and
everything on CPU 0.  On these VMs (no guest halt polling) waking an idle vCPU
costs tens of microseconds, and a process that slept for 2 ms runs cold: random
loads over a 256 KiB working set cost 3-4x what they cost warm.  The bare sender
runs a few lines before the kill; the supervisor, idle between errors, a whole
memory_failure() in Python (about 200 lines before the doorbell).
"""
from __future__ import annotations

import mmap
import os
import signal
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import report  # noqa: E402

import emu  # noqa: E402
from emu import uapi as u  # noqa: E402

N = 1000
BLOCK = 50
BARE, EMU = 0, 16                 # the two receivers' (stamp, count) in the shared page


def _idle_forever(task=None, busy=False):
    """Idle (asleep, as QEMU's main loop mostly is) or busy (a vCPU running guest code)."""
    while True:
        if busy:
            x = 0
            for _ in range(100000):
                x += 1
        elif task is not None:
            task.idle(1.0)
        else:
            time.sleep(1.0)


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _stamper(shared, off: int):
    """The handler body both receivers run: CLOCK_MONOTONIC and a count into shm."""
    def stamp(signum, _info):
        struct.pack_into("QQ", shared, off, time.monotonic_ns(),
                         struct.unpack_from("Q", shared, off + 8)[0] + 1)
    return stamp


def _bare_receiver(shared, w, busy: bool, cpu: int | None) -> None:
    _pin(cpu)
    signal.signal(signal.SIGBUS, _stamper(shared, BARE))
    os.write(w, b"r")
    _idle_forever(busy=busy)


def _emu_worker(host, shared, w, busy: bool, cpu: int | None) -> None:
    """The QEMU-shaped worker: main thread, PR_MCE_KILL_EARLY, a dirty shared mapping."""
    _pin(cpu)
    me = emu.attach(host, name="qemu")
    me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
    emu.sigaction(signal.SIGBUS, _stamper(shared, EMU))
    fd = me.memfd_create("guest-ram")
    me.ftruncate(fd, N * 4096)
    a = me.mmap(0, N * 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
    me.write(a, b"\xab" * (N * 4096))
    pfns = [me.pagemap(a + i * 4096).pfn for i in range(N)]
    os.write(w, struct.pack("<%dQ" % N, *pfns))
    _idle_forever(me, busy)


def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += os.read(fd, n - len(data))
    return data


def main() -> list[dict]:
    out = []
    for busy in (False, True):
        out.append(measure(busy))
    measure(False, apart=True)                             # for information
    measure(False, together=True)
    return out


def measure(busy: bool, apart: bool = False, together: bool = False) -> dict:
    """Both receivers live side by side; blocks of BLOCK errors alternate between
    them, so the machine's drift hits both alike.  Busy: the receiver whose turn
    it is not is stopped (SIGSTOP), so one busy loop competes, as when alone."""
    mask = os.sched_getaffinity(0)
    recv_cpu = 1 if apart else (0 if together else None)
    shared = mmap.mmap(-1, 4096)
    r, w = os.pipe()
    bare = os.fork()
    if bare == 0:
        _bare_receiver(shared, w, busy, recv_cpu)
    _read_exactly(r, 1)
    base, kernel_lat, e2e, split = [], [], [], []
    with emu.start(ram="256M") as host:
        if apart or together:
            os.sched_setaffinity(host.private_pid, {0})
        worker = os.fork()
        if worker == 0:
            _emu_worker(host, shared, w, busy, recv_cpu)
        pfns = struct.unpack("<%dQ" % N, _read_exactly(r, 8 * N))
        _pin(0 if apart or together else None)
        since = host.events()[-1]["seq"]
        for blk in range(0, N, BLOCK):
            if busy:
                os.kill(worker, signal.SIGSTOP)
                os.kill(bare, signal.SIGCONT)
            for i in range(blk, blk + BLOCK):
                time.sleep(0.002)
                t0 = time.monotonic_ns()
                os.kill(bare, signal.SIGBUS)
                while struct.unpack_from("Q", shared, BARE + 8)[0] != i + 1:
                    time.sleep(0.0002)
                base.append(struct.unpack_from("Q", shared, BARE)[0] - t0)
            if busy:
                os.kill(bare, signal.SIGSTOP)
                os.kill(worker, signal.SIGCONT)
            for i, pfn in enumerate(pfns[blk:blk + BLOCK], blk):
                time.sleep(0.002)
                t0 = time.monotonic_ns()
                host.hw_detect(pfn)
                while struct.unpack_from("Q", shared, EMU + 8)[0] != i + 1:
                    time.sleep(0.0002)
                done = struct.unpack_from("Q", shared, EMU)[0]
                evs = host.events(since)
                since = evs[-1]["seq"]
                mf = next(e for e in evs if e["type"] == "memory_failure")
                sig = next(e for e in evs if e["type"] == "signal")
                kernel_lat.append(done - mf["ts_ns"])
                split.append((sig["doorbell_ns"] - mf["ts_ns"], done - sig["doorbell_ns"]))
                e2e.append(done - t0)
        os.sched_setaffinity(0, mask)
        for pid in (worker, bare):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    state = ("busy" if busy else "idle") + (", sender CPU 0, worker CPU 1: for information"
                                           if apart else "") + (
        ", everything on CPU 0: for information" if together else "")
    print("\n(c) deferred memory failure -> AO handler in another worker (%s), %d errors, medians"
          % (state, N))
    med = statistics.median
    r1 = report("memory_failure() start -> AO handler ran", med(kernel_lat) / 1000, "us",
                "os.kill -> handler ran (bare)", med(base) / 1000,
                "" if apart or together else "<= 2x")
    print("    of which memory_failure() start -> doorbell sent: %.1f us; doorbell -> handler ran:"
          " %.1f us (medians)" % (med(a for a, _ in split) / 1000, med(b for _, b in split) / 1000))
    print("    end to end from the injecting client: %.1f us (adds one control-socket request)"
          % (med(e2e) / 1000))
    return r1

if __name__ == "__main__":
    main()
