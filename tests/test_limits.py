"""No arbitrary limits that real workloads hit: a folio mapped by hundreds of
processes, a VM with 64 vCPUs, thousands of VMAs all work; a [limits] table that
does run out fails up front (ENOMEM, EAGAIN for threads as fork past max_threads,
ENFILE for files) and leaves status and meminfo as they were."""
import errno
import os
import select
import signal
import time

import pytest
from checks import settled
from gmem_harness import FLAGS, GPA, MB2, RW, SLOT, reader, run

import emu
from emu import uapi as u

PAGE = 4096
ANON = u.MAP_PRIVATE | u.MAP_ANONYMOUS
MAPPERS = 200                       # forked processes mapping one 2M folio (plus the parent)



def comes_back(host, before, timeout=5.0):
    """host.status() once it equals `before` again (frames and page tables a rollback
    freed return after a grace period, at the next tick), else the last one seen."""
    end = time.monotonic() + timeout
    while (cur := host.status()) != before and time.monotonic() < end:
        time.sleep(0.05)
    return cur


def limited(host_factory, tmp_path, **limits):
    conf = tmp_path / "limits.toml"
    conf.write_text("[limits]\n" + "".join("%s = %d\n" % kv for kv in limits.items()))
    return host_factory(config=str(conf))


# ------------------------------------------------------------------ hundreds of mappers
@pytest.mark.parametrize("policy", ["eventual", "mf-delayed-fix"])
def test_folio_mapped_by_hundreds_of_processes(host_factory, policy):
    """A.9: a HugeTLB guest_memfd folio mapped by the parent and 200 forked children
    (each PR_MCE_KILL_EARLY), corrupt_pfn on one page.  `eventual` splits the folio
    and unmaps the one page in all 201 mms; mf-delayed-fix unmaps the whole folio.
    Every child gets its AO SIGBUS for the page."""
    host = host_factory(ram="256M", hugepages={"2M": 2}, policy=policy)
    me = emu.attach(host, name="qemu")
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(MB2, FLAGS)
    hva = me.mmap(0, MB2, RW, u.MAP_SHARED, gfd, 0)
    me.write(hva, bytes(range(256)) * (MB2 // 256))
    head = me.pagemap(hva).pfn
    bad = 3
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def child(task):
        got = []
        emu.sigaction(signal.SIGBUS, lambda s, i: got.append((i.si_code, i.si_addr, i.si_addr_lsb)))
        task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
        assert task.read(hva + PAGE * 7, 2) == bytes([0, 1])
        os.write(ready_w, b"r")
        while not select.select([go_r], [], [], 0)[0]:
            task.idle(0.02)
        end = time.monotonic() + 5
        while not got and time.monotonic() < end:
            task.idle(0.02)
        ok = task.pagemap(hva + PAGE * 7).present            # a healthy page
        return got, ok, task.pagemap(hva + PAGE * bad).hwpoison

    kids = [me.fork(child, name="c%d" % i) for i in range(MAPPERS)]
    for _ in range(MAPPERS):
        assert os.read(ready_r, 1) == b"r"
    assert len(host.status()["processes"]) == MAPPERS + 1
    assert host.corrupt_pfn(head + bad) == 0
    os.write(go_w, b"g")
    assert [k.join(30) for k in kids] == [0] * MAPPERS
    for got, healthy_present, bad_hwpoison in (k.result for k in kids):
        assert got == [(u.BUS_MCEERR_AO, hva + PAGE * bad, 12 if policy == "eventual" else 21)]
        assert healthy_present == (policy == "eventual")
        # a 4K hwpoison entry reads as one in pagemap; a huge one reads as 0
        # (fs/proc/task_mmu.c pagemap_hugetlb_range)
        assert bad_hwpoison == (policy == "eventual")
    assert host.mf_stats()["total"] == 1
    assert host.meminfo()["HardwareCorrupted"] == 4
    assert me.pagemap(hva).present == (policy == "eventual")
    if policy == "eventual":
        assert me.read(hva + PAGE * 7, 2) == bytes([0, 1])
        assert any(e["type"] == "hugetlb_split" for e in host.events())
    assert host.tainted() == 0


# ------------------------------------------------------------------ 64 vCPUs
def test_vm_with_64_vcpus(host_factory):
    host = host_factory(ram="128M")
    me = emu.attach(host, name="qemu")
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    ram = me.mmap(0, MB2, RW, ANON)
    for i in range(64):
        me.write(ram + i * 8, (1000 + i).to_bytes(8, "little"))
    vm.set_user_memory_region2(SLOT, 0, GPA, MB2, ram, -1, 0)

    def vcpu_thread(task, vid):
        vcpu = vm.create_vcpu(vid)
        vcpu.set_guest(reader((GPA + vid * 8, False)))
        return run(vcpu)

    threads = [me.clone(vcpu_thread, i, name="vcpu%d" % i) for i in range(64)]
    assert [t.join(30) for t in threads] == [0] * 64
    assert [t.result for t in threads] == [("sync", (1000 + i).to_bytes(8, "little"))
                                          for i in range(64)]
    assert host.tainted() == 0


# ------------------------------------------------------------------ thousands of VMAs
def test_thousands_of_vmas(host):
    me = emu.attach(host, name="t")
    n = 3000
    addrs = []
    for i in range(n):
        # PROT alternating so neighbours stay distinct VMAs
        addrs.append(me.mmap(0, PAGE, RW if i % 2 else u.PROT_READ | u.PROT_WRITE | u.PROT_EXEC,
                             ANON))
    assert len(set(addrs)) == n
    for i in range(0, n, 97):
        me.write(addrs[i], b"%d" % i)
    st = host.status()
    assert st["processes"][0]["vmas"] == n
    assert st["limits"]["vmas"]["used"] == n
    for i in range(0, n, 97):
        assert me.read(addrs[i], len(b"%d" % i)) == b"%d" % i
    for a in addrs:
        me.munmap(a, PAGE)
    assert host.status()["limits"]["vmas"]["used"] == 0


# ------------------------------------------------------------------ exhaustion: up front, no change
def test_vma_limit_enomem_and_nothing_changes(host_factory, tmp_path):
    host = limited(host_factory, tmp_path, vmas=16)
    me = emu.attach(host, name="t")
    big = me.mmap(0, 8 * PAGE, RW, ANON)
    me.write(big, b"\x5a" * 8 * PAGE)
    while host.status()["limits"]["vmas"]["used"] < 16:
        me.mmap(0, PAGE, RW, ANON)
    before = settled(host)
    mi = host.meminfo()
    for call in (lambda: me.mmap(0, PAGE, RW, ANON),
                 lambda: me.munmap(big + 2 * PAGE, PAGE),             # would split: +1 VMA
                 lambda: me.mmap(big + 2 * PAGE, PAGE, RW, ANON | u.MAP_FIXED)):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.ENOMEM and "limits.vmas" in ei.value.strerror
        assert host.status() == before and host.meminfo() == mi
        assert me.read(big, 8 * PAGE) == b"\x5a" * 8 * PAGE
    me.munmap(big, PAGE)                        # shrinking from an end needs no new VMA
    assert me.read(big + PAGE, 1) == b"\x5a"
    assert host.tainted() == 0


def _attach_errno(host, kind="process", parent=None):
    """Attach (as a new process, or as `parent`'s fork child) from a fresh OS process;
    its exit status is the errno (0: attached)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            emu.user.task.Task(host, kind, parent, "late")
        except OSError as e:
            code = e.errno
        except BaseException:
            code = 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_task_limit_eagain_and_mm_limit_enomem(host_factory, tmp_path):
    host = limited(host_factory, tmp_path, tasks=3, mms=2)
    me = emu.attach(host, name="t")
    park = os.pipe()

    def sleeper(task):
        os.read(park[0], 1)

    th = me.clone(sleeper, name="thread")            # 2 tasks, 1 mm
    st = settled(host)
    mi = host.meminfo()
    assert st["limits"]["tasks"] == {"used": 2, "max": 3}
    ch = me.fork(sleeper, name="child")               # 3 tasks, 2 mms: both full
    before = settled(host)
    assert _attach_errno(host) == errno.EAGAIN        # copy_process: nr_threads >= max_threads
    assert host.status() == before
    os.write(park[1], b"xx")
    assert ch.join(10) == 0 and th.join(10) == 0
    assert settled(host)["limits"]["tasks"]["used"] == 1
    ch2 = me.fork(sleeper, name="child2")             # a task slot is free, the mms are not ...
    before = settled(host)
    assert _attach_errno(host) == errno.ENOMEM        # ... a new process needs an mm
    assert host.status() == before
    os.write(park[1], b"x")
    assert ch2.join(10) == 0
    lim = settled(host)["limits"]
    assert lim["tasks"]["used"] == 1 and lim["mms"]["used"] == 1
    assert host.meminfo() == mi
    assert host.tainted() == 0


def test_fork_past_vma_limit_enomem_and_nothing_changes(host_factory, tmp_path):
    host = limited(host_factory, tmp_path, vmas=10)
    me = emu.attach(host, name="t")
    for _ in range(6):
        a = me.mmap(0, PAGE, RW, ANON)
        me.write(a, b"x")
    before = settled(host)
    mi = host.meminfo()
    assert _attach_errno(host, "fork", me.tid) == errno.ENOMEM   # 6 VMAs to copy, 4 free
    assert host.status() == before and host.meminfo() == mi
    assert host.tainted() == 0


def test_inode_limit_enfile_and_nothing_changes(host_factory, tmp_path):
    host = limited(host_factory, tmp_path, inodes=5)
    me = emu.attach(host, name="t")
    kvm = me.open_kvm()
    vm = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
    me.memfd_create("a")
    me.memfd_create("b")
    vm.create_vcpu(0)                                 # 5 inodes: kvm, vm, a, b, vcpu
    before = settled(host)
    for call in (lambda: me.memfd_create("c"), lambda: vm.create_vcpu(1),
                 lambda: kvm.create_vm(u.KVM_X86_DEFAULT_VM)):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.ENFILE
        assert host.status() == before
    me.close(3)                                       # /dev/kvm's fd: one inode free again
    assert vm.create_vcpu(1) is not None              # vCPU 1 was not half-created
    assert host.tainted() == 0


def test_limits_in_status(host):
    lim = host.status()["limits"]
    assert set(lim) == {"tasks", "mms", "inodes", "vmas", "page_tables"}
    assert lim["tasks"]["max"] >= 1024 and lim["mms"]["max"] >= 512
    assert lim["vmas"]["max"] >= 16384 and lim["inodes"]["max"] >= 4096
    assert all(v["used"] == 0 for k, v in lim.items() if k != "page_tables")


# ------------------------------------------------------------------ running out of RAM
def test_shmem_fallocate_out_of_memory_enomem_and_undone(host_factory):
    host = host_factory(ram="8M")
    me = emu.attach(host, name="t")
    fd = me.memfd_create("big")
    me.pwrite(fd, b"keep", 0)
    before = settled(host)
    mi = host.meminfo()
    with pytest.raises(OSError) as ei:
        me.fallocate(fd, 0, 0, 16 << 20)              # twice the RAM
    assert ei.value.errno == errno.ENOMEM
    assert comes_back(host, before) == before and host.meminfo() == mi
    assert me.pread(fd, 4, 0) == b"keep"
    assert host.tainted() == 0


def test_map_populate_does_not_signal_and_ignores_failure(host_factory):
    """mm_populate faults with GUP: past EOF it stops without a SIGBUS, and out of
    memory it stops too; mmap succeeds either way, as vm_mmap_pgoff ignores it."""
    host = host_factory(ram="8M")
    me = emu.attach(host, name="t")
    got = []
    emu.sigaction(signal.SIGBUS, lambda s, i: got.append(i.si_code))
    fd = me.memfd_create("short")
    me.ftruncate(fd, PAGE)
    a = me.mmap(0, 4 * PAGE, RW, u.MAP_SHARED | u.MAP_POPULATE, fd, 0)
    me.idle(0.1)
    assert got == []
    assert me.pagemap(a).present and not me.pagemap(a + PAGE).present
    b = me.mmap(0, 16 << 20, RW, ANON | u.MAP_POPULATE)  # more than the RAM
    assert me.pagemap(b).present
    me.munmap(b, 16 << 20)
    assert host.tainted() == 0


def test_split_out_of_page_tables_enomem_then_works(host_factory, tmp_path):
    """`eventual` splits a 2M folio mapped by 4 processes: 4 new PTE tables.  With the
    page-table pool used up (a filler process faults pages 2M apart) corrupt_pfn fails
    with ENOMEM before anything changes; once the filler exits, the same call works."""
    conf = tmp_path / "pt.toml"
    conf.write_text("[limits]\npage_tables = 64\n")
    host = host_factory(ram="256M", hugepages={"2M": 2}, policy="eventual", config=str(conf))
    me = emu.attach(host, name="qemu")
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(MB2, FLAGS)
    hva = me.mmap(0, MB2, RW, u.MAP_SHARED, gfd, 0)
    me.write(hva, b"\x11" * MB2)
    head = me.pagemap(hva).pfn
    go, go_fill = os.pipe(), os.pipe()
    ready = os.pipe()

    def mapper(task):
        assert task.read(hva, 1) == b"\x11"
        os.write(ready[1], b"r")
        os.read(go[0], 1)

    def filler(task):
        base = 1 << 40
        n = 0
        try:
            while True:                       # one PTE table per 2M step
                a = task.mmap(base + n * MB2, PAGE, RW, ANON | u.MAP_FIXED)
                task.write(a, b"f")
                n += 1
        except OSError as e:
            assert e.errno == errno.ENOMEM, e
        os.write(ready[1], b"r")
        os.read(go_fill[0], 1)
        return n

    mappers = [me.fork(mapper, name="m%d" % i) for i in range(3)]
    fill = me.fork(filler, name="filler")
    for _ in range(4):
        os.read(ready[0], 1)
    assert host.status()["limits"]["page_tables"]["used"] == 64
    before = settled(host)
    mi, mf = host.meminfo(), host.mf_stats()
    with pytest.raises(OSError) as ei:
        host.corrupt_pfn(head + 3)
    assert ei.value.errno == errno.ENOMEM
    assert host.status() == before and host.meminfo() == mi and host.mf_stats() == mf
    assert me.pagemap(hva + 3 * PAGE).present and not host.kpageflags(head + 3) & (1 << u.KPF_HWPOISON)
    assert me.read(hva, 4) == b"\x11" * 4
    os.write(go_fill[1], b"g")                # the filler exits: its tables come back
    assert fill.join(30) == 0 and fill.result > 10
    end = time.monotonic() + 10
    while host.status()["limits"]["page_tables"]["used"] > 40 and time.monotonic() < end:
        time.sleep(0.05)
    assert host.corrupt_pfn(head + 3) == 0
    assert host.mf_stats()["total"] == 1
    assert me.pagemap(hva).present and me.pagemap(hva + 3 * PAGE).hwpoison
    os.write(go[1], b"ggg")
    assert [m.join(30) for m in mappers] == [0] * 3
    assert host.tainted() == 0


def test_fork_out_of_memory_enomem_and_undone(host_factory):
    """fork copies private anonymous pages (the emulator has no COW across
    processes): with RAM for only one copy, the half-built child is torn down and
    the attach fails with ENOMEM; nothing is left behind."""
    host = host_factory(ram="8M")
    me = emu.attach(host, name="t")
    n = 1200                                          # 4.7 MiB of 8
    a = me.mmap(0, n * PAGE, RW, ANON)
    me.write(a, b"\x33" * (n * PAGE))
    before = settled(host)
    mi = host.meminfo()
    assert _attach_errno(host, "fork", me.tid) == errno.ENOMEM
    assert comes_back(host, before) == before and host.meminfo() == mi
    assert me.read(a + (n - 1) * PAGE, 4) == b"\x33" * 4
    assert host.tainted() == 0


def test_limits_events_is_how_many_trace_events_host_events_keeps(host_factory, tmp_path):
    """[limits] events sizes the trace that host.events() and `emu trace` read: the
    newest that many, the oldest dropped."""
    host = limited(host_factory, tmp_path, events=8)
    me = emu.attach(host, name="tracer")
    for _ in range(6):                                  # each mmap/munmap pair traces
        va = me.mmap(0, PAGE, u.PROT_READ | u.PROT_WRITE, ANON)
        me.write(va, b"x")
        me.munmap(va, PAGE)
    evs = host.events()
    assert len(evs) == 8
    assert [e["seq"] for e in evs] == list(range(evs[-1]["seq"] - 7, evs[-1]["seq"] + 1))
    assert evs[-1]["seq"] > 8
