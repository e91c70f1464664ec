"""(a) Batched host memory access through the fast path.

A worker maps a 64 MiB memfd, faults it in, then reads 8 bytes at each of 1M
addresses in one Cython call, for three access patterns: random over 64 MiB
(DRAM-latency bound, so the batch starts the misses of the access 16 ahead),
random within a 4 MiB working set, and a sequential scan.  Baselines, same run:
- hardware: the same address pattern read with plain loads (same look-ahead
  prefetch, same copy) from a real resident 64 MiB mmap of 4 KiB pages: the
  CPU's MMU translates, nothing is emulated (the physical limit);
- software walk: a C walk over the same shm tables with the fast path's own
  walk cache and look-ahead, without its checks (the fair software baseline);
- the pure-Python reference of the same fast path (emu._pyref), on fewer addresses.
Then an ablation: the fast path with one piece of its work left out at a time,
to show what the gap to the hardware is made of.
"""
from __future__ import annotations

import array
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _common import median_of, report, timed  # noqa: E402

import emu  # noqa: E402
from emu import _core as C  # noqa: E402
from emu import uapi as u  # noqa: E402
from emu._pyref import PyCore  # noqa: E402

SIZE = 64 << 20
N = 1_000_000
N_PY = 20_000
ROUNDS = 9
TARGET_HW = {"random over 64 MiB": "<= 4x", "sequential scan": "<= 8x"}
# EMU_SKIP_* bits of Core.access_batch_ablate (cext/fastpath.h)
ABLATE = [("poison check", 1), ("A/D bit check", 2), ("present/permission/bound checks", 4),
          ("rcu section (epoch)", 8), ("all four", 15)]


def _unprotected(host):
    """A second mapping of the worker's segments without protect_worker(): the
    baseline for what mapping the kernel's tables read-only costs (nothing, the
    protection is per VMA and the fast path only writes what stays writable)."""
    from emu import shm

    return shm.Segments.open(tuple(host.ch.call("segments")["names"]), protect=False).core


def main() -> list[dict]:
    with emu.start(ram="256M") as host:
        me = emu.attach(host, name="bench")
        fd = me.memfd_create("bench")
        me.ftruncate(fd, SIZE)
        base = me.mmap(0, SIZE, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED | u.MAP_POPULATE, fd, 0)
        rng = random.Random(42)
        data = os.urandom(SIZE)
        for off in range(0, SIZE, 8 << 20):
            me.write(base + off, data[off:off + (8 << 20)])
        hw = C.HwMem(SIZE)                            # the same bytes in a real mmap
        hw.load(0, data)
        patterns = {
            "random over 64 MiB": [base + (rng.randrange(0, SIZE - 8) & ~7) for _ in range(N)],
            "random within 4 MiB": [base + (rng.randrange(0, 4 << 20) & ~7) for _ in range(N)],
            "sequential scan": [base + ((i * 64) % SIZE) for i in range(N)],
        }
        core, slot, pgd = me._core, me.slot, me.pgd
        assert core.worker_ro
        rw = _unprotected(host)                     # the same segments, all read-write
        py = PyCore(core)
        results = []
        print("\n(a) batched host memory access: %d 8-byte reads per call" % N)
        for name, lst in patterns.items():
            addrs = array.array("Q", lst)
            out = bytearray(N * 8)
            me.read_batch(addrs, 8)                 # warm: A bits set, tables hot
            check = bytearray(N * 8)                # the same bytes every way
            core.access_batch(slot, pgd, addrs, 0, 8, out, False)
            core.soft_walk_loop(pgd, addrs, 8, check)
            assert check == out
            hw.read_batch(base, addrs, 8, check)
            assert check == out
            # Interleaved rounds: a busy neighbour (2 cores, shared) hits every variant alike.
            variants = {"fast": lambda a=addrs, o=out: core.access_batch(slot, pgd, a, 0, 8, o,
                                                                         False),
                        "soft": lambda a=addrs, o=check: core.soft_walk_loop(pgd, a, 8, o),
                        "hw": lambda a=addrs, o=check: hw.read_batch(base, a, 8, o),
                        "rw": lambda a=addrs, o=out: rw.access_batch(slot, pgd, a, 0, 8, o, False)}
            for what, skip in ABLATE:
                variants[what] = (lambda a=addrs, o=out, k=skip:
                                  core.access_batch_ablate(slot, pgd, a, 8, o, k))
            samples = {k: [] for k in variants}
            for _ in range(ROUNDS):
                for k, fn in variants.items():
                    samples[k].append(timed(fn) / N)
            med = {k: statistics.median(v) for k, v in samples.items()}
            fast, soft, hard = med["fast"], med["soft"], med["hw"]
            results.append(report("fast path, %s" % name, fast, "ns/acc",
                                  "hardware (plain loads, real mmap)", hard,
                                  TARGET_HW.get(name, "")))
            results.append(report("fast path, %s" % name, fast, "ns/acc",
                                  "software walk, same walk cache", soft, ""))
            results.append(report("software walk, %s" % name, soft, "ns/acc",
                                  "hardware (plain loads, real mmap)", hard, ""))
            for what, _ in ABLATE:
                results.append(report("  fast path without %s" % what, med[what], "ns/acc",
                                      "fast path", fast, ""))
            small = addrs[:N_PY]
            pout = bytearray(N_PY * 8)
            pyref = median_of(lambda a=small, o=pout: timed(py.access_batch, slot, pgd, a, 0, 8, o,
                                                            False) / N_PY, runs=3)
            assert pout == out[:N_PY * 8]
            results.append(report("pure-Python reference, %s" % name, pyref, "ns/acc",
                                  "fast path", fast, ""))
            results.append(report("fast path, tables read-only, %s" % name, fast, "ns/acc",
                                  "same, all mapped read-write", med["rw"], "<= 1.05x"))
        me.exit()
    return results


if __name__ == "__main__":
    main()
