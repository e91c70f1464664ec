"""Guest memory access through stage-2, and first touch of a 1 GiB guest_memfd.

(a) A vCPU's guest reads 8 bytes at each of 1M random GPAs of a 64 MiB
    guest_memfd slot in one yield (g.read_batch: one fast-path call).  Baselines,
    same run: the same GPAs read with plain loads from a real resident 64 MiB mmap
    (the hardware); a C walk of the same stage-2 tables with the fast path's walk
    cache (software walk); and the same guest issuing one access per yield.
(b) First touch of a 1 GiB guest_memfd range by the guest (sequential batch).
    Baseline, same run: the host kernel's first touch of 1 GiB of shared
    anonymous memory (shmem, as guest_memfd is), 8 bytes written per page in C.
    Stage-2 faults are resolved in batches; the supervisor round trips per 16
    pages are printed too (target <= 1).
"""
from __future__ import annotations

import array
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import median_of, report, timed  # noqa: E402

import emu  # noqa: E402
from emu import _core as C  # noqa: E402
from emu import uapi as u  # noqa: E402

N = 1_000_000
N_YIELD = 20_000
SLOT = 64 << 20
GIB = 1 << 30


def _vm(me, size):
    kvm = me.open_kvm()
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, size, 0, gfd, 0)
    return vm


def access() -> list[dict]:
    with emu.start(ram="256M") as host:
        me = emu.attach(host, name="bench")
        vm = _vm(me, SLOT)
        vcpu = vm.create_vcpu(0)
        rng = random.Random(42)
        gpas = array.array("Q", (rng.randrange(0, SLOT - 8) & ~7 for _ in range(N)))
        few = gpas[:N_YIELD]

        def batch(g):
            while True:
                yield g.read_batch(gpas, 8)
                yield g.sync(0)

        def one_by_one(g):
            while True:
                for a in few:
                    yield g.read(a, 8)
                yield g.sync(0)

        vcpu.set_guest(batch)
        vcpu.run()                                   # first touch: populate stage-2
        fast = median_of(lambda: timed(vcpu.run) / N)
        out = bytearray(N * 8)
        core = me._core
        soft = median_of(lambda: timed(core.soft_walk_loop, vcpu.s2, gpas, 8, out) / N)
        hw = C.HwMem(SLOT)
        hard = median_of(lambda: timed(hw.read_batch, 0, gpas, 8, out) / N)
        vcpu.set_guest(one_by_one)
        per_yield = median_of(lambda: timed(vcpu.run) / N_YIELD, runs=3)
        me.exit()
    print("\n(a) guest access through stage-2: 8-byte reads at random GPAs over 64 MiB")
    return [report("guest read_batch (one yield, one call)", fast, "ns/acc",
                   "hardware (plain loads, real mmap)", hard, ""),
            report("guest read_batch (one yield, one call)", fast, "ns/acc",
                   "software stage-2 walk, same walk cache", soft, ""),
            report("guest read, one access per yield", per_yield, "ns/acc",
                   "guest read_batch", fast, "")]


def first_touch() -> list[dict]:
    with emu.start(ram="1280M") as host:
        me = emu.attach(host, name="bench")
        vm = _vm(me, GIB)
        vcpu = vm.create_vcpu(0)
        pages = GIB // 4096
        gpas = array.array("Q", range(0, GIB, 4096))

        def touch(g):
            yield g.write_batch(gpas, 8, bytes(8 * len(gpas)))
            yield g.done()

        vcpu.set_guest(touch)
        t = time.perf_counter()
        vcpu.run()
        dt = time.perf_counter() - t
        trips = vcpu.fault_requests
        me.exit()
        host_ns = statistics.median(C.hw_first_touch(GIB) for _ in range(3))
    per16 = trips / (pages / 16)
    print("\n(b) first touch of a 1 GiB guest_memfd by the guest: %d pages, %d stage-2 fault "
          "round trips = %.3f per 16 pages (target <= 1), %.2f s" % (pages, trips, per16, dt))
    return [report("guest first touch of 1 GiB guest_memfd", dt / pages * 1e9, "ns/page",
                   "host kernel first touch, 1 GiB shmem", host_ns / pages, "")]


def main() -> list[dict]:
    return access() + first_touch()


if __name__ == "__main__":
    main()
