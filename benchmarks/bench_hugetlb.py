"""HugeTLB at scale.

(1) Splitting a poisoned 1 GiB guest_memfd folio under the `eventual` policy
    (split, remap host and stage-2 at 4K, unmap the one failed page): end to end
    through host.corrupt_pfn(), control request included.  Target < 5 ms.
(2) A 1 TiB guest of 1 GiB folios (1024 folios, host-mapped, one PUD entry each):
    munmap of the whole 1 TiB guest_memfd mapping; baseline a bare control
    request.
(3) Shared-memory table footprint of that 1 TiB guest: resident bytes of the core
    segment, beside what per-4K frame tables would take (1 TiB / 4 KiB * 48 B).
    Target < 64 MiB.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import report  # noqa: E402

import emu  # noqa: E402
from emu import uapi as u  # noqa: E402

GIB = 1 << 30
RUNS = 3
FLAGS = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
         | u.GUESTMEM_HUGETLB_FLAG_1GB)


def terabyte() -> list[dict]:
    n = 1024
    flags = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
             | u.GUESTMEM_HUGETLB_FLAG_1GB)
    with emu.start(ram="%dG" % (n + 1), hugepages={"1G": n}) as host:
        me = emu.attach(host, name="bench")
        base = []
        for _ in range(200):
            t = time.perf_counter_ns()
            host.meminfo()
            base.append(time.perf_counter_ns() - t)
        vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        gfd = vm.create_guest_memfd(n * GIB, flags)
        unmaps = []
        for _ in range(3):
            hva = me.mmap(0, n * GIB, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
            for i in range(n):
                me.read(hva + i * GIB, 1)
            core_name = host._call("segments")["names"][0]
            st = os.stat("/dev/shm" + core_name)
            resident = st.st_blocks * 512
            t = time.perf_counter_ns()
            me.munmap(hva, n * GIB)
            unmaps.append(time.perf_counter_ns() - t)
        me.exit()
    per4k = (n * GIB >> 12) * 48
    print("\n(HugeTLB) a 1 TiB guest_memfd of 1 GiB folios")
    return [report("munmap of the whole 1 TiB mapping", statistics.median(unmaps) / 1e6, "ms",
                   "bare control request", statistics.median(base) / 1e6, ""),
            report("core shm tables resident (1 TiB guest)", resident / (1 << 20), "MiB",
                   "per-4K frame tables would need", per4k / (1 << 20), "< 64 MiB")]


def main() -> list[dict]:
    return split() + terabyte()


def split() -> list[dict]:
    with emu.start(ram="%dM" % ((RUNS + 1) * 1024), hugepages={"1G": RUNS}, policy="eventual") as host:
        me = emu.attach(host, name="bench")
        vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        base = []
        for _ in range(200):
            t = time.perf_counter_ns()
            host.meminfo()
            base.append(time.perf_counter_ns() - t)
        split = []
        for _ in range(RUNS):
            gfd = vm.create_guest_memfd(GIB, FLAGS)
            hva = me.mmap(0, GIB, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
            me.read(hva, 1)                                   # one PUD entry maps it all
            head = me.pagemap(hva).pfn
            t = time.perf_counter_ns()
            host.corrupt_pfn(head + 12345)
            split.append(time.perf_counter_ns() - t)
            assert me.pagemap(hva + (12345 << 12)).hwpoison
            assert me.pagemap(hva + (12346 << 12)).present    # its neighbours stay mapped
            me.munmap(hva, GIB)
            me.close(gfd)
        me.exit()
    print("\n(HugeTLB) split of a 1 GiB guest_memfd folio + unmap of one 4 KiB page, %d runs" % RUNS)
    return [report("corrupt_pfn -> split + unmap (eventual)", statistics.median(split) / 1e6, "ms",
                   "bare control request", statistics.median(base) / 1e6, "< 5 ms")]


if __name__ == "__main__":
    main()
