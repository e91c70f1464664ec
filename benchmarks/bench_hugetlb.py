"""HugeTLB at scale.

(1) Splitting a poisoned 1 GiB guest_memfd folio under the `eventual` policy
    (split, remap host and stage-2 at 4K, unmap the one failed page): end to end
    through host.corrupt_pfn(), control request included.  Target < 5 ms.
    Baseline, same run: the kernel-shaped work of that split done in C, writing
    262144 page-table entries and 262144 64-byte struct pages.
(2) A 1 TiB guest of 1 GiB folios (1024 folios, host-mapped, one PUD entry each):
    munmap of the whole 1 TiB guest_memfd mapping.  Baseline, same run: the host
    kernel's munmap of a real 1 TiB mapping with 1024 present pages, one per GiB
    (anonymous, read-faulted: the zero page, so no RAM is used).
(3) Shared-memory table footprint of that 1 TiB guest: resident bytes of the core
    segment (page tables, frame records, task table, event ring).  Baseline,
    same run: the host kernel's page-table bytes (VmPTE) for a real 1 TiB
    mapping with the same number of present leaves, one 4 KiB page per GiB
    (read-faulted zero pages).  With a 1 GiB HugeTLB pool the kernel would need
    one PUD entry per folio instead; this machine has no such pool to measure.
    Target < 64 MiB.
"""
from __future__ import annotations

import mmap
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import report  # noqa: E402

import emu  # noqa: E402
from emu import _core as C  # noqa: E402
from emu import uapi as u  # noqa: E402

GIB = 1 << 30
RUNS = 5
FLAGS = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
         | u.GUESTMEM_HUGETLB_FLAG_1GB)


def _vm_pte() -> int:
    """This process's page-table bytes, as the kernel counts them (VmPTE)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmPTE:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmPTE")


def _reserve(length: int) -> mmap.mmap:
    """A real private anonymous mapping of `length` bytes that takes no RAM until
    written (MAP_NORESERVE; reads fault in the zero page)."""
    return mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | u.MAP_NORESERVE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)


def host_munmap_ns(length: int, step: int) -> int:
    """The host kernel's munmap of a `length` mapping with one present page per `step`."""
    m = _reserve(length)
    for off in range(0, length, step):
        m[off]                                                  # read fault: zero page
    t = time.perf_counter_ns()
    m.close()
    return time.perf_counter_ns() - t


def host_pte_bytes(length: int, step: int) -> int:
    """The host kernel's page-table bytes (VmPTE) for a `length` mapping with one
    page present per `step`."""
    m = _reserve(length)
    before = _vm_pte()
    for off in range(0, length, step):
        m[off]                                                  # read fault: zero page
    used = _vm_pte() - before
    m.close()
    return used


def terabyte() -> list[dict]:
    n = 1024
    flags = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
             | u.GUESTMEM_HUGETLB_FLAG_1GB)
    with emu.start(ram="%dG" % (n + 1), hugepages={"1G": n}) as host:
        me = emu.attach(host, name="bench")
        vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        gfd = vm.create_guest_memfd(n * GIB, flags)
        unmaps = []
        host_unmaps = []
        for _ in range(RUNS):
            hva = me.mmap(0, n * GIB, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
            for i in range(n):
                me.read(hva + i * GIB, 1)
            core_name = host._call("segments")["names"][0]
            st = os.stat("/dev/shm" + core_name)
            resident = st.st_blocks * 512
            t = time.perf_counter_ns()
            me.munmap(hva, n * GIB)
            unmaps.append(time.perf_counter_ns() - t)
            host_unmaps.append(host_munmap_ns(n * GIB, GIB))
        me.exit()
        pte = host_pte_bytes(n * GIB, GIB)
    print("\n(HugeTLB) a 1 TiB guest_memfd of 1 GiB folios, %d runs" % RUNS)
    return [report("munmap of the whole 1 TiB mapping", statistics.median(unmaps) / 1e6, "ms",
                   "host munmap, 1 TiB, 1024 pages present", statistics.median(host_unmaps) / 1e6,
                   ""),
            report("core shm tables resident (1 TiB guest)", resident / (1 << 20), "MiB",
                   "host VmPTE, 1 TiB, 1024 pages present", pte / (1 << 20), "< 64 MiB")]


def main() -> list[dict]:
    return split() + terabyte()


def split() -> list[dict]:
    with emu.start(ram="%dM" % ((RUNS + 1) * 1024), hugepages={"1G": RUNS}, policy="eventual") as host:
        me = emu.attach(host, name="bench")
        vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        split, base = [], []
        for _ in range(RUNS):
            gfd = vm.create_guest_memfd(GIB, FLAGS)
            hva = me.mmap(0, GIB, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
            me.read(hva, 1)                                   # one PUD entry maps it all
            head = me.pagemap(hva).pfn
            t = time.perf_counter_ns()
            host.corrupt_pfn(head + 12345)
            split.append(time.perf_counter_ns() - t)
            base.append(C.fill_entries(GIB >> 12, 64))
            assert me.pagemap(hva + (12345 << 12)).hwpoison
            assert me.pagemap(hva + (12346 << 12)).present    # its neighbours stay mapped
            me.munmap(hva, GIB)
            me.close(gfd)
        me.exit()
    print("\n(HugeTLB) split of a 1 GiB guest_memfd folio + unmap of one 4 KiB page, %d runs" % RUNS)
    return [report("corrupt_pfn -> split + unmap (eventual)", statistics.median(split) / 1e6, "ms",
                   "262144 PTEs + struct pages written (C)", statistics.median(base) / 1e6,
                   "< 5 ms")]


if __name__ == "__main__":
    main()
