"""HugeTLB: splitting a poisoned 1 GiB guest_memfd folio under the `eventual`
policy (split, remap the host and stage-2 at 4K, unmap the one failed page).

Measured: host.corrupt_pfn() of one 4K page of a host-mapped 1 GiB folio, end to
end (control-socket request included).  Baseline, same run: a bare control
request (host.meminfo()).  Target: < 5 ms.  Each run uses up one 1 GiB page.
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


def main() -> list[dict]:
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
