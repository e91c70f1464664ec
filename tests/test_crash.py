"""A worker that dies at any instant corrupts nothing (issue 12 item 6).

Each test makes one emulated process die at a chosen point (SIGKILL from
outside, or from inside its own SIGBUS handler, or in the middle of a call) and
then checks that the supervisor came back to where it started: no task, no
file, no VMA, no page-table page, every frame free, in the HugeTLB pool or
retired by poison.  The last test is a short run of the crash soak
(benchmarks/soak_crash.py).
"""
import os
import signal
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

    segs = shm.Segments.create(4096, 8, 8, 256, 16, 64)
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


# ====================================================== deaths at chosen points
def _poisoned_anon_page(me, host, how="hw_poison"):
    a = me.mmap(0, PAGE, RW, ANON)
    me.write(a, b"data")
    pfn = me.pagemap(a).pfn
    if how == "hw_poison":
        assert host.hw_poison(pfn) == 0          # latent: the next access consumes it
    return a, pfn


def test_sigkill_inside_the_sigbus_handler(host):
    """The worker consumes poison (AR #MC, a SIGBUS on itself) and its handler
    SIGKILLs the thread: it dies inside the handler, with the poison handled."""
    base = host.meminfo()

    def body(me):
        a, _pfn = _poisoned_anon_page(me, host)

        def handler(signum, info):
            assert info.si_code == u.BUS_MCEERR_AR
            os.kill(os.getpid(), signal.SIGKILL)

        emu.sigaction(signal.SIGBUS, handler)
        me.read(a, 4)
        raise AssertionError("survived the poisoned read")

    assert in_process(host, body) == -signal.SIGKILL
    st = assert_clean(host)
    mi = st["meminfo"]
    assert mi["HardwareCorrupted"] == base["HardwareCorrupted"] + 4      # retired, once
    assert mi["MemFree"] == base["MemFree"] - 4                         # all but that page
    assert host.mf_stats()["total"] == 1


def test_clone_thread_sigkilled_while_main_thread_waits_takes_the_group(host):
    """A clone()d thread SIGKILLed while the main thread sits in join(): exit_group,
    the main thread dies of SIGKILL too, and the process is torn down once."""
    base = host.meminfo()

    def body(me):
        a = me.mmap(0, 16 * PAGE, RW, ANON)
        me.write(a, b"x" * 16 * PAGE)

        def spin(t):
            while True:
                t.write(a + PAGE, b"spin")
                t.read(a, 8)

        th = me.clone(spin, name="spinner")
        time.sleep(0.05)
        os.kill(th.pid, signal.SIGKILL)
        th.join(30)
        me.idle(30)                  # exit_group ends this thread before it returns
        raise AssertionError("the group survived")

    assert in_process(host, body) == -signal.SIGKILL
    st = assert_clean(host)
    assert st["meminfo"]["MemFree"] == base["MemFree"]


def test_main_thread_sigkilled_while_a_vcpu_spins(host_factory):
    """The VMM's main thread dies while its vCPU thread runs a guest that never
    exits to it: the vCPU thread goes with the group; the VM, its guest_memfd,
    stage-2 tables and memory are all released."""
    host = host_factory(ram="128M", hugepages={"2M": 2})
    base = host.meminfo()

    def guest(g):
        while True:
            v = yield g.read(GPA + PAGE, 8)
            yield g.write(GPA + 3 * PAGE, v)

    def body(me):
        vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        gfd = vm.create_guest_memfd(MB2, HUGE_GMEM)
        hva = me.mmap(0, MB2, RW, u.MAP_SHARED, gfd, 0)
        me.write(hva + PAGE, b"guest ok")
        vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, MB2, hva, gfd, 0)
        r, w = os.pipe()

        def vcpu_main(t):
            vcpu = vm.create_vcpu(0)
            vcpu.set_guest(guest)
            os.write(w, b"R")
            while True:
                vcpu.run()

        me.clone(vcpu_main, name="vcpu0")
        assert os.read(r, 1) == b"R"
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

    assert in_process(host, body) == -signal.SIGKILL
    st = assert_clean(host)
    assert st["meminfo"]["MemFree"] == base["MemFree"]


def test_fork_child_that_dies_before_it_attaches_is_echild(host_factory, tmp_path):
    """fork()/clone() whose new worker dies before it is attached (here: the kernel
    is out of task slots) fails with ECHILD, as an OSError, and leaves the parent
    usable."""
    cfg = tmp_path / "emu.toml"
    cfg.write_text("[limits]\ntasks = 1\n")
    host = host_factory(config=str(cfg))

    def body(me):
        for how in (me.fork, me.clone):
            try:
                how(lambda t: 0)
            except OSError as e:
                assert e.errno == u.ECHILD, e
            else:
                raise AssertionError("the new task attached past limits.tasks")
        a = me.mmap(0, PAGE, RW, ANON)
        me.write(a, b"still fine")
        assert me.read(a, 10) == b"still fine"

    assert in_process(host, body) == 0
    assert_clean(host)


def test_pending_sigbus_of_a_dead_task_does_not_reach_the_next_one(host_factory, tmp_path):
    """A task dies with a SIGBUS still queued in its mailbox (blocked).  The next task
    gets the same slot (there is only one): it must not receive that record, and a
    SIGBUS sent to it is delivered, not dropped as already pending."""
    cfg = tmp_path / "emu.toml"
    cfg.write_text("[limits]\ntasks = 1\n")
    host = host_factory(config=str(cfg))

    def victim(me, w):
        me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGBUS})
        a, pfn = _poisoned_anon_page(me, host, how="none")
        os.write(w, b"%d\n" % pfn)
        while True:
            signal.pause()

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            me = emu.attach(host, name="victim")
            victim(me, w)
        finally:
            os._exit(1)
    pfn = int(os.read(r, 64))
    assert host.corrupt_pfn(pfn) == 0                 # AO to the early-kill victim
    assert [e["tid"] for e in host.events() if e["type"] == "signal"] == [pid]
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    settled(host)

    def successor(me):
        got = []
        emu.sigaction(signal.SIGBUS, lambda s, info: got.append((info.si_code, info.si_addr)))
        me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
        a, pfn = _poisoned_anon_page(me, host, how="none")
        me.idle(0.2)
        assert got == [], got                           # nothing of the victim's
        assert host.corrupt_pfn(pfn) == 0
        end = time.monotonic() + 10
        while not got and time.monotonic() < end:
            me.idle(0.01)
        assert got == [(u.BUS_MCEERR_AO, a)], got

    assert in_process(host, successor) == 0
    assert_clean(host)


def test_worker_killed_with_half_a_request_sent(host):
    """A worker dies after sending part of a request line: the partial line goes
    with its connection; the thread is retired and nothing else changes."""
    import json
    import socket

    base = host.meminfo()
    pid = os.fork()
    if pid == 0:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(host.path)
            f = s.makefile("rb")
            f.readline()
            s.sendall(json.dumps({"execute": "attach", "arguments": {}, "id": 1}).encode() + b"\n")
            assert "return" in json.loads(f.readline())
            s.sendall(b'{"execute": "mmap", "arguments": {"addr": 0, "len')
            time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == -signal.SIGKILL
    st = assert_clean(host)
    assert st["meminfo"]["MemFree"] == base["MemFree"]


def test_exited_threads_leave_the_thread_group(kernel):
    """A long-lived process whose threads come and go keeps only its live threads
    in the group (a thread list that only grows is a leak per thread ever created,
    walked by every memory_failure)."""
    k = kernel
    main = k.new_process(os.getpid(), "vmm")
    for tid in range(10**6, 10**6 + 20):                    # no such processes
        k.exit_task(k.clone(main, tid, "vcpu"))
    assert main.process.threads == [main]
    assert main.process in k.tasklist
    k.exit_task(main)
    assert main.process not in k.tasklist and k.tasks == {}


def test_reap_of_a_live_thread_retires_nothing(host):
    """"reap" settles the death of a worker that has exited; asked for a thread that
    is still running, it must not retire it."""
    import select

    me = emu.attach(host, name="parent")
    r, w = os.pipe()
    stop_r, stop_w = os.pipe()

    def sibling(t):
        a = t.mmap(0, PAGE, RW, ANON)
        os.write(w, b"R")
        while not select.select([stop_r], [], [], 0.01)[0]:
            t.write(a, b"alive")
            assert t.read(a, 5) == b"alive"
        return "done"

    th = me.clone(sibling, name="sibling")
    assert os.read(r, 1) == b"R"
    me.ch.call("reap", tid=th.pid)
    time.sleep(0.2)
    threads = [x["tid"] for p in host.status()["processes"] for x in p["threads"]]
    assert th.pid in threads
    os.write(stop_w, b"x")
    assert th.join(30) == 0 and th.result == "done"


# ====================================================== the crash soak, short
def test_crash_soak_short():
    """benchmarks/soak_crash.py in small: 40 SIGKILLs at random points into workers
    running random operation mixes; after each round every invariant holds, no
    task, file, VMA, page table or frame is left, fds are back to the baseline."""
    import soak_crash

    fig = soak_crash.run(kills=40, seed=12, workers=2, round_kills=20, ram="128M", huge=8,
                         fill=False, baseline_samples=10, max_delay=0.08)
    assert fig["kills"] >= 40
    assert not fig["supervisor_died"]
    assert fig["violation_list"] == []
    assert fig["leaked_tasks"] == 0 and fig["leaked_frames"] == 0 and fig["fd_growth"] <= 2
    assert fig["worker_errors"] == []           # no EmulatorBug, no stray exception, no EINVAL


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_grace_period_does_not_wait_for_a_worker_that_died_reading(kernel):
    """A worker SIGKILLed in the middle of an access dies inside its RCU read
    section; until the supervisor has settled its death, its rcu_epoch still says
    "reading".  A grace period must not wait that out (up to its 1 s cap, the
    whole kernel stalled): a dead CPU reads nothing."""
    k = kernel
    t = k.new_process(_dead_pid(), "died-reading")
    k.core.task_set(t.slot, "rcu_epoch", k.core.epoch_bump() + 1)   # inside a read section
    k.synchronize_rcu(timeout=30)
    assert k.core.task(t.slot)["rcu_epoch"] == 0
    assert not [line for line in k.dmesg() if "rcu" in line and "stall" in line]


def test_grace_period_stalled_by_a_live_cpu_is_reported(kernel):
    """A live CPU that stays in its read section past the timeout: the grace period
    gives up (the emulator's choice; Linux waits for ever) and says so in dmesg."""
    k = kernel
    t = k.new_process(os.getpid(), "stuck")
    k.core.task_set(t.slot, "rcu_epoch", k.core.epoch_bump() + 1)
    k.synchronize_rcu(timeout=0.05)
    assert k.core.task(t.slot)["rcu_epoch"] != 0                   # still reading
    stalls = [line for line in k.dmesg() if "detected stalls" in line]
    assert len(stalls) == 1 and str(os.getpid()) in stalls[0]
