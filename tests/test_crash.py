"""A worker that dies at any instant corrupts nothing (issue 12 item 6).

Each test makes one emulated process die at a chosen point (SIGKILL from
outside, or from inside its own SIGBUS handler, or in the middle of a call) and
then checks that the supervisor came back to where it started: no task, no
file, no VMA, no page-table page, every frame free, in the HugeTLB pool or
retired by poison.  The last test is a short run of the crash soak
(benchmarks/soak_crash.py).
"""
import os
import sys
import time

import pytest

import emu
from emu import _core as C
from emu import uapi as u

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

PAGE = 4096
MB2 = 2 << 20
RW = u.PROT_READ | u.PROT_WRITE
ANON = u.MAP_PRIVATE | u.MAP_ANONYMOUS
GPA = 1 << 32
HUGE_GMEM = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
             | u.GUESTMEM_HUGETLB_FLAG_2MB)


def in_process(host, body, *args):
    """Run body(me, *args) as the main thread of a new emulated process (a forked
    child); returns its wait status as an exit code (0, n, -signum)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            me = emu.attach(host, name="victim")
            body(me, *args)
            code = 0
        except BaseException:                     # noqa: BLE001 (reported by the exit code)
            import traceback

            traceback.print_exc()
        os._exit(code)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st)


def settled(host, timeout=5.0) -> dict:
    """emu status once every emulated process is gone and the deferred page-table
    frees have run (a grace period, at most a supervisor tick)."""
    end = time.monotonic() + timeout
    while True:
        st = host.status()
        if not st["processes"] and st["pt_pages"] == 0 or time.monotonic() > end:
            return st
        time.sleep(0.02)


def assert_clean(host):
    st = settled(host)
    assert st["processes"] == []
    assert st["files"] == [] and st["inodes"] == 0
    assert st["pt_pages"] == 0
    mi = st["meminfo"]
    assert mi["HugePages_Free"] == mi["HugePages_Total"] and mi["HugePages_Rsvd"] == 0
    return st


# ====================================================== page tables under a huge leaf
def test_huge_mapping_where_4k_pages_were_frees_their_page_table(host_factory):
    """A 4K mapping leaves a PTE table behind when it goes (the emulator frees tables
    at exit, not at munmap); a HugeTLB mapping later faulted in at the same 2 MiB
    puts its leaf in the PMD entry that pointed to that table.  The table must go
    back to the pool (free_pgtables), not leak: emu status pt_pages returns to 0."""
    host = host_factory(ram="128M", hugepages={"2M": 2})
    at = 0x7E0000000000

    def body(me):
        a = me.mmap(at, PAGE, RW, ANON | u.MAP_FIXED)
        me.write(a, b"4k")
        fd = me.memfd_create("huge", u.MFD_HUGETLB | u.MFD_HUGE_2MB)
        me.ftruncate(fd, MB2)
        h = me.mmap(at, MB2, RW, u.MAP_SHARED | u.MAP_FIXED, fd, 0)   # replaces the 4K one
        assert h == at
        me.write(h + 5 * PAGE, b"2M")
        assert me.read(h, 2) == b"\0\0"
        assert me.read(h + 5 * PAGE, 2) == b"2M"

    assert in_process(host, body) == 0
    assert_clean(host)


def test_stage2_huge_entry_over_split_folio_frees_its_page_table(host_factory):
    """A HugeTLB guest_memfd folio split by a conversion is mapped 4K in stage-2 (and
    by the host); merged back, it is mapped by one level-2 entry where the 4K
    SPTEs' table was.  KVM frees that table when a huge SPTE replaces it; so must
    the emulator (and the host mapping's, faulted in huge again)."""
    host = host_factory(ram="128M", hugepages={"2M": 2})

    def guest(g):
        v = yield g.read(GPA + 0x20000, 8)
        yield g.sync(v)

    def body(me):
        vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        gfd = vm.create_guest_memfd(MB2, HUGE_GMEM)
        hva = me.mmap(0, MB2, RW, u.MAP_SHARED, gfd, 0)
        me.write(hva + 0x20000, b"shared!!")
        vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, MB2, hva, gfd, 0)
        vcpu = vm.create_vcpu(0)
        me.gmem_convert(gfd, 0x10000, PAGE, private=True)     # cuts the folio: split
        vcpu.set_guest(guest)
        assert vcpu.run() == 0 and vcpu.ucall()[1] == (b"shared!!",)
        assert vm.gpa_to_pfn(GPA + 0x20000)["level"] == 1
        assert me.read(hva + 0x20000, 8) == b"shared!!"       # host: 4K too
        me.gmem_convert(gfd, 0x10000, PAGE, private=False)    # uniform again: merge
        vcpu.set_guest(guest)
        assert vcpu.run() == 0 and vcpu.ucall()[1] == (b"shared!!",)
        assert vm.gpa_to_pfn(GPA + 0x20000)["level"] == 2
        assert me.read(hva + 0x20000, 8) == b"shared!!"       # host: huge again

    assert in_process(host, body) == 0
    assert_clean(host)


# ====================================================== what outlives a process
@pytest.fixture
def kernel():
    """An emulated kernel in this process, on a private pair of segments (no
    supervisor: the test looks at the kernel's own tables)."""
    from emu import shm
    from emu.kernel import Kernel

    segs = shm.Segments.create(4096, 8, 8, 256, 64, 16, 64)
    try:
        yield Kernel(segs.core, 4096)
    finally:
        segs.unlink()


def test_poisoned_anon_page_keeps_no_rmap_to_its_dead_mm(kernel):
    """memory_failure keeps its reference on a poisoned anonymous page (the frame is
    retired), but the page is mapped nowhere once unmapped: its rmap entry must go
    with the mapping, not stay pointing at the mm (whose slot the next process
    reuses) for the life of the supervisor: one leaked entry per poisoned page."""
    k = kernel
    t = k.new_process(os.getpid(), "victim")    # late kill, AO: no signal is sent
    addr = k.mm.mmap(t.process, 0, PAGE, RW, ANON, None, 0)
    k.mm.handle_mm_fault(t, addr, True)
    e, _level = k.core.walk(t.process.mm.pgd, addr)
    pfn = (e & C.PTE_PFN_MASK) >> 12
    assert pfn in k.mm.anon_rmap
    assert k.memory_failure.memory_failure(pfn, 0) == 0
    assert k.core.flags(pfn) & C.PG_HWPOISON and k.core.refcount(pfn) == 1   # retired
    assert pfn not in k.mm.anon_rmap            # unmapped: a hwpoison entry, no rmap
    k.exit_task(t)
    assert k.mm.anon_rmap == {}
