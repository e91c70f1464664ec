"""(b) A supervisor system call vs a bare unix-socket JSON round trip.

Measured from a worker: a page fault (first touch of an anonymous page: the
fast path stops, one request to the supervisor allocates, zeroes and maps a
frame, the access retries) and a one-page anonymous mmap.  Baseline, same run:
a JSON-lines echo server on a unix socket with the same loop shape as the
supervisor's (selector, recv, split, json.loads, json.dumps, sendall, and halt
polling with the same window and guard) and the same client code (a thread's
channel, which spins for its reply).  The three are measured in interleaved
blocks of 100.

For information, the same again without halt polling (halt_poll_ns = 0: both
sides sleep at once), and with the client and both servers on CPU 0.
Free-running, each server runs on the other CPU from its client (measured for
the supervisor and the echo server alike); without polling every request and
every reply wakes an idle vCPU, and on these VMs that wake costs more the
longer the server works, and the supervisor works longer per request than an
echo.  On one CPU the figure is the software cost alone.
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import report  # noqa: E402

import emu  # noqa: E402
from emu import config as cfgmod  # noqa: E402
from emu import uapi as u  # noqa: E402
from emu.haltpoll import others_waiting  # noqa: E402
from emu.user.channel import Channel  # noqa: E402

N = 3000
BLOCK = 100


def _echo_server(path: str, ready_w: int, poll_ns: int, many: bool = False) -> None:
    """The supervisor's loop with nothing behind it, halt polling included.  With
    `many`, any number of clients come and go (bench_scaling); else the first
    client's EOF ends it."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(128 if many else 4)
    os.write(ready_w, b"r")
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, None)
    bufs = {}
    clock = time.perf_counter_ns
    polling_until = 0
    while True:
        events = sel.select(0 if polling_until else 0.1)
        for key, _ in events:
            if key.data is None:
                c, _ = srv.accept()
                c.sendall(b'{"QMP":{"halt_poll_ns":%d}}\n' % poll_ns)
                bufs[c] = b""
                sel.register(c, selectors.EVENT_READ, c)
                continue
            c = key.data
            data = c.recv(65536)
            if not data:
                if not many:
                    os._exit(0)
                sel.unregister(c)
                del bufs[c]
                c.close()
                continue
            bufs[c] += data
            while b"\n" in bufs[c]:
                line, bufs[c] = bufs[c].split(b"\n", 1)
                req = json.loads(line)
                c.sendall(json.dumps({"id": req.get("id"), "return": 0},
                                     separators=(",", ":")).encode() + b"\n")
            if poll_ns:
                polling_until = clock() + poll_ns
        if not events and polling_until:
            if clock() < polling_until and not others_waiting():
                os.sched_yield()
            else:
                polling_until = 0


def _median_us(samples):
    samples.sort()
    return samples[len(samples) // 2] / 1000


def main() -> list[dict]:
    poll = cfgmod.default()["supervisor"]["halt_poll_ns"]
    out = measure(poll, pinned=False)
    measure(0, pinned=False)                              # for information
    measure(poll, pinned=True)                            # for information
    return out


def measure(poll_ns: int, pinned: bool) -> list[dict]:
    mask = os.sched_getaffinity(0)
    if pinned:
        os.sched_setaffinity(0, {0})                      # inherited by both servers
    tmp = tempfile.mkdtemp(prefix="emu-bench-")
    path = os.path.join(tmp, "echo.sock")
    conf = os.path.join(tmp, "emu.toml")
    with open(conf, "w") as f:
        f.write("[supervisor]\nhalt_poll_ns = %d\n" % poll_ns)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _echo_server(path, w, poll_ns)
    os.read(r, 1)
    ch = Channel(path)
    ch.spin_ns = ch.halt_poll_ns                          # spins as a thread's channel does
    base, faults, maps = [], [], []
    with emu.start(ram="256M", config=conf) as host:
        me = emu.attach(host, name="bench")
        a = me.mmap(0, N * 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
        # interleaved blocks, so drift on a noisy machine hits all three alike
        for blk in range(0, N, BLOCK):
            for _ in range(BLOCK):
                t = time.perf_counter_ns()
                ch.call("echo", addr=0x7F0000000000, write=False)
                base.append(time.perf_counter_ns() - t)
            for i in range(blk, blk + BLOCK):
                t = time.perf_counter_ns()
                me.read(a + i * 4096, 1)           # not present: one fault round trip
                faults.append(time.perf_counter_ns() - t)
            for _ in range(BLOCK):
                t = time.perf_counter_ns()
                me.mmap(0, 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
                maps.append(time.perf_counter_ns() - t)
        me.exit()
    ch.close()
    os.waitpid(pid, 0)
    os.sched_setaffinity(0, mask)
    shutil.rmtree(tmp)
    b = _median_us(base)
    how = ("" if poll_ns and not pinned else
           ", everything on CPU 0: for information" if pinned else
           ", no halt polling (halt_poll_ns = 0): for information")
    print("\n(b) supervisor system calls, %d each, medians%s" % (N, how))
    target = "<= 1.5x" if not how else ""
    base_name = "echo, same loop and client"
    return [report("page fault (first touch, anon)", _median_us(faults), "us",
                   base_name, b, target),
            report("mmap of one page", _median_us(maps), "us", base_name, b, target)]

if __name__ == "__main__":
    main()
