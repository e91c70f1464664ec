"""(a) Batched host memory access through the fast path.

A worker maps a 64 MiB memfd, faults it in, then reads 8 bytes at each of 1M
addresses in one Cython call, for three access patterns: random over 64 MiB
(DRAM-latency bound, so the batch starts the misses of the access 16 ahead),
random within a 4 MiB working set, and a sequential scan.  Baselines, same run,
same tables:
- a plain C loop doing the same 4-level lookup, look-ahead prefetch and copy
  (no epoch, TLB, A/D or poison check);
- the pure-Python reference of the same fast path (emu._pyref), on fewer addresses.
"""
from __future__ import annotations

import array
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _common import median_of, report, timed  # noqa: E402

import emu  # noqa: E402
from emu import uapi as u  # noqa: E402
from emu._pyref import PyCore  # noqa: E402

SIZE = 64 << 20
N = 1_000_000
N_PY = 20_000


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
        me.write(base, os.urandom(1 << 20))
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
            fast = median_of(lambda a=addrs, o=out: timed(core.access_batch, slot, pgd, a, 0, 8, o,
                                                          False) / N)
            plain = median_of(lambda a=addrs, o=out: timed(core.plain_c_loop, pgd, a, 8, o) / N)
            small = addrs[:N_PY]
            pout = bytearray(N_PY * 8)
            pyref = median_of(lambda a=small, o=pout: timed(py.access_batch, slot, pgd, a, 0, 8, o,
                                                            False) / N_PY, runs=3)
            check = bytearray(N_PY * 8)             # the same bytes either way
            core.plain_c_loop(pgd, small, 8, check)
            assert check == pout
            results.append(report("fast path, %s" % name, fast, "ns/acc",
                                  "plain C loop", plain, "<= 3x"))
            results.append(report("pure-Python reference, %s" % name, pyref, "ns/acc",
                                  "fast path", fast, ">= 50x"))
            unprot = median_of(lambda a=addrs, o=out: timed(rw.access_batch, slot, pgd, a, 0, 8, o,
                                                            False) / N)
            results.append(report("fast path, tables read-only, %s" % name, fast, "ns/acc",
                                  "same, all mapped read-write", unprot, "<= 1.05x"))
        me.exit()
    return results


if __name__ == "__main__":
    main()
