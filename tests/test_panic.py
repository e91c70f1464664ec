"""The host panic as an outcome: the kernel's panic() stops the emulated machine.

Kernel: kernel/panic.c panic(); arch/x86/kernel/cpu/mce/core.c (do_machine_check,
mce_panic, mce_reign, queue_task_work, kill_me_maybe, kill_me_never) and severity.c
(severities[], error_context(), is_copy_from_user()); mm/filemap.c
generic_perform_write(); mm/memory-failure.c memory_failure() (the
vm.memory_failure_recovery=0 panic, MF_MUST_KILL).

After a panic every call of an attached thread raises emu.KernelPanic, threads that
run or sleep get it at once (the panic doorbell), and the host can still read the
machine as one reads a crash dump, until it is stopped.
"""
import errno
import json
import os
import signal
import time

import pytest
from checks import Stop, lines_in_order
from checks import sigbus_recorder as recorder

import emu
from emu import uapi as u

PAGE = 4096
RW = u.PROT_READ | u.PROT_WRITE
FATAL = "Fatal machine check"
KPF_HWPOISON = 1 << u.KPF_HWPOISON






def shmem_page(me, data=b"page cache"):
    """A memfd page with `data` in it, and its pfn."""
    fd = me.memfd_create("f")
    me.pwrite(fd, data.ljust(PAGE, b"."), 0)
    a = me.mmap(0, PAGE, RW, u.MAP_SHARED, fd, 0)
    me.read(a, 1)
    return fd, a, me.pagemap(a).pfn


def panic_by_pread(host, me):
    """The simplest way to panic a machine: read(2) of a page-cache page with a
    latent error.  Returns the KernelPanic the reader got."""
    fd, _a, pfn = shmem_page(me)
    host.hw_poison(pfn)
    with pytest.raises(emu.KernelPanic) as ei:
        me.pread(fd, 16, 0)
    return ei.value


# ------------------------------------------------------------------ D2: read(2) panics
def test_pread_consuming_a_latent_error_in_the_page_cache_panics(host):
    """copy_to_user() from a shmem page: a kernel-mode load from a kernel address,
    is_copy_from_user() false, IN_KERNEL: "Data load in unrecoverable area of kernel",
    mce_panic("Fatal machine check").  No memory_failure(), no signal, no errno."""
    me = emu.attach(host, name="reader")
    got = recorder()
    fd, a, pfn = shmem_page(me)
    host.hw_poison(pfn)
    with pytest.raises(emu.KernelPanic) as ei:
        me.pread(fd, PAGE, 0)
    e = ei.value
    assert not isinstance(e, OSError)
    assert e.reason == FATAL and str(e) == "Kernel panic - not syncing: " + FATAL
    assert got == []
    assert host.panicked() == FATAL
    d = host.dmesg()
    assert lines_in_order(d, [
        "mce: [Hardware Error]: CPU 0: Machine Check Exception: 7 Bank 1: bd80000000000134",
        "mce: [Hardware Error]: TSC ",
        "mce: [Hardware Error]: Machine check: Data load in unrecoverable area of kernel",
        "Kernel panic - not syncing: Fatal machine check",
        "CPU: 0 PID: %d Comm: reader" % me.tid,
        "Call Trace:",
        "shmem_file_read_iter",
        "Kernel Offset: disabled",
        "---[ end Kernel panic - not syncing: Fatal machine check ]---"]), "\n".join(d)
    assert any("ADDR %x " % (pfn << 12) in line for line in d)
    assert not any("Kernel accessed poison" in line or "Memory failure" in line for line in d)
    assert host.mf_stats()["total"] == 0
    assert not host.kpageflags(pfn) & KPF_HWPOISON
    assert [ev["reason"] for ev in host.events() if ev["type"] == "panic"] == [FATAL]
    # the reader's CPU stopped with the machine: any use of its thread is KernelPanic
    with pytest.raises(emu.KernelPanic):
        me.read(a, 1)
    with pytest.raises(emu.KernelPanic):
        me.prctl(u.PR_MCE_KILL_GET)


@pytest.mark.parametrize("call, entry", [("pread", "__x64_sys_pread64"),
                                         ("read_fd", "__x64_sys_read")])
def test_read_panic_call_trace_names_the_system_call(host, call, entry):
    """The Call Trace of the copy_to_user() panic ends in the entry of the system call
    the reader made: read(2) is __x64_sys_read, pread(2) __x64_sys_pread64
    (SYSCALL_DEFINE3(read, ...), SYSCALL_DEFINE4(pread64, ...))."""
    me = emu.attach(host, name="reader")
    fd, _a, pfn = shmem_page(me)
    host.hw_poison(pfn)
    with pytest.raises(emu.KernelPanic):
        if call == "pread":
            me.pread(fd, 16, 0)
        else:
            me.read_fd(fd, 16)
    d = host.dmesg()
    assert lines_in_order(d, ["Call Trace:", "vfs_read", entry, "do_syscall_64"]), "\n".join(d)
    other = {"__x64_sys_pread64", "__x64_sys_read"} - {entry}
    assert not any(o in line for line in d for o in other)


def test_pread_of_hugetlbfs_page_with_latent_error_panics(host_factory):
    """hugetlbfs_read_iter() copies with copy_folio_to_iter(): not MC-safe either."""
    host = host_factory(ram="256M", hugepages={"2M": 2})
    me = emu.attach(host, name="reader")
    fd = me.memfd_create("huge", u.MFD_HUGETLB | u.MFD_HUGE_2MB)
    me.ftruncate(fd, 2 << 20)
    a = me.mmap(0, 2 << 20, RW, u.MAP_SHARED, fd, 0)
    me.write(a + 3 * PAGE, b"huge data")
    pfn = me.pagemap(a + 3 * PAGE).pfn
    host.hw_poison(pfn)
    assert me.pread(fd, 16, 0) == bytes(16)           # the pages before it are fine
    with pytest.raises(emu.KernelPanic) as ei:
        me.pread(fd, 4 * PAGE, 0)
    assert ei.value.reason == FATAL
    assert lines_in_order(host.dmesg(), [
        "Machine check: Data load in unrecoverable area of kernel",
        "Kernel panic - not syncing: Fatal machine check"])
    assert any("hugetlbfs_read_iter" in line for line in host.dmesg())


def test_pread_of_a_page_known_to_be_poisoned_is_still_eio(host):
    """A page already marked HWPoison is never touched: -EIO as before, no panic."""
    me = emu.attach(host, name="reader")
    fd, a, pfn = shmem_page(me)
    host.hw_detect(pfn)                               # deferred: memory_failure() ran
    with pytest.raises(OSError) as ei:
        me.pread(fd, PAGE, 0)
    assert ei.value.errno == errno.EIO
    assert host.panicked() is None


# ------------------------------------------------------------------ copy from user: no panic
def test_write_from_poisoned_user_buffer_is_efault_and_kill_me_never(host):
    """write(2) from a user buffer with a latent error: the copy's source is a user
    address (is_copy_from_user()), IN_KERNEL_RECOV with MCE_IN_KERNEL_COPYIN: the copy
    stops, write returns -EFAULT, no SIGBUS, and kill_me_never runs memory_failure()
    on the buffer's page on the way back to user mode."""
    me = emu.attach(host, name="writer")
    got = recorder()
    buf = me.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(buf, b"user data".ljust(PAGE, b"-"))
    pfn = me.pagemap(buf).pfn
    host.hw_poison(pfn)
    fd = me.memfd_create("dst")
    with pytest.raises(OSError) as ei:
        me.pwrite_from(fd, buf + 16, 64, 0)
    assert ei.value.errno == errno.EFAULT
    assert got == []
    assert host.panicked() is None
    d = host.dmesg()
    assert any("mce: Kernel accessed poison in user space at %x" % ((pfn << 12) | 16) in line
               for line in d), d
    assert any("Memory failure: %#x: recovery action for dirty LRU page: Recovered" % pfn in line
               for line in d), d
    assert host.mf_stats() == {"total": 1, "ignored": 0, "failed": 0, "delayed": 0,
                               "recovered": 1}
    assert host.kpageflags(pfn) & KPF_HWPOISON
    assert me.pagemap(buf).hwpoison                   # unmapped: a hwpoison entry now
    assert me.pread(fd, 64, 0) == b""                 # nothing was written
    with pytest.raises(Stop):                         # the thread's own load: AR
        me.read(buf + 16, 1)
    assert got == [(u.BUS_MCEERR_AR, buf + 16, 12)]


def test_write_from_user_buffer_is_short_at_the_poisoned_page(host):
    me = emu.attach(host, name="writer")
    got = recorder()
    buf = me.mmap(0, 2 * PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(buf, b"A" * PAGE + b"B" * PAGE)
    host.hw_poison(me.pagemap(buf + PAGE).pfn)
    fd = me.memfd_create("dst")
    assert me.pwrite_from(fd, buf + PAGE - 100, 300, 0) == 100
    assert me.pread(fd, PAGE, 0) == b"A" * 100
    assert got == [] and host.panicked() is None
    assert host.mf_stats()["total"] == 1


def test_write_from_user_buffer_faults_pages_in_and_refuses_bad_addresses(host):
    """copy_from_user faults a missing page in; an unmapped or hwpoison address is
    the uaccess fixup: -EFAULT without a signal."""
    me = emu.attach(host, name="writer")
    got = recorder()
    fd = me.memfd_create("dst")
    buf = me.mmap(0, 2 * PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)   # never touched
    assert me.pwrite_from(fd, buf, 2 * PAGE, 0) == 2 * PAGE
    assert me.pread(fd, 8, 0) == bytes(8)
    me.munmap(buf + PAGE, PAGE)
    assert me.pwrite_from(fd, buf, 2 * PAGE, 0) == PAGE
    with pytest.raises(OSError) as ei:
        me.pwrite_from(fd, buf + PAGE, 8, 0)
    assert ei.value.errno == errno.EFAULT
    assert got == []


# ------------------------------------------------------------------ the panic reaches everyone
def test_panic_reaches_every_attached_thread(host):
    """A thread sleeping in idle(), one looping on system calls, one running a guest
    (KVM_RUN) and one waiting in sigsuspend-like pause() all end with KernelPanic at
    once; the controller then reads dmesg, and close() leaves nothing behind."""
    me = emu.attach(host, name="main")

    def idler(t):
        t0 = time.monotonic()
        try:
            t.idle(60)
        except emu.KernelPanic as e:
            return ("idle", e.reason, time.monotonic() - t0)
        return ("idle", None, 0)

    def caller(t):
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 60:
                t.prctl(u.PR_MCE_KILL_GET)
        except emu.KernelPanic as e:
            return ("calls", e.reason, time.monotonic() - t0)
        return ("calls", None, 0)

    def pauser(t):
        t0 = time.monotonic()
        try:
            signal.pause()
        except emu.KernelPanic as e:
            return ("pause", e.reason, time.monotonic() - t0)
        return ("pause", None, 0)

    def vcpu_thread(t, vmfd):
        vm = emu.user.kvm.Vm(t, vmfd, u.KVM_X86_DEFAULT_VM)
        vcpu = vm.create_vcpu(0)
        hva = t.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
        vm.set_user_memory_region2(0, 0, 1 << 32, PAGE, hva)

        def guest(g):
            while True:
                yield g.read(1 << 32, 8)

        vcpu.set_guest(guest)
        t0 = time.monotonic()
        try:
            vcpu.run()
        except emu.KernelPanic as e:
            return ("kvm_run", e.reason, time.monotonic() - t0)
        return ("kvm_run", None, 0)

    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    threads = [me.fork(idler, name="idler"), me.clone(caller, name="caller"),
               me.fork(pauser, name="pauser"), me.clone(vcpu_thread, vm.fd, name="vcpu0")]
    end = time.monotonic() + 10
    while len([p for p in host.status()["processes"] for _ in p["threads"]]) < 5:
        assert time.monotonic() < end, host.status()
        time.sleep(0.05)
    time.sleep(0.3)                                   # let them settle in
    e = panic_by_pread(host, me)
    t_panic = time.monotonic()
    results = [th.join(20) for th in threads]
    waited = time.monotonic() - t_panic
    assert results == [0, 0, 0, 0], [(th.name, th.exitcode) for th in threads]
    assert sorted(th.result[:2] for th in threads) == sorted(
        [("idle", e.reason), ("calls", e.reason), ("pause", e.reason), ("kvm_run", e.reason)])
    assert waited < 10                                # woken at once, not at a timeout
    # the controller reads the crash dump
    assert host.panicked() == FATAL
    assert any("Kernel panic - not syncing: Fatal machine check" in line for line in host.dmesg())
    st = host.status()
    assert st["panic"] == FATAL
    assert len(st["processes"]) == 3                  # the frozen task table keeps them


def test_after_a_panic_the_host_reads_and_nothing_changes(host):
    me = emu.attach(host, name="main")
    fd, a, pfn = shmem_page(me)
    e = panic_by_pread(host, me)
    before = host.status()
    assert any("end Kernel panic" in line for line in host.dmesg())
    assert host.events()[-1]["type"] == "panic"
    assert host.meminfo()["MemTotal"] == 64 << 10
    assert host.mf_stats()["total"] == 0
    assert host.policy()["name"] == "mf-delayed-fix"
    assert host.tainted() == 1 << u.TAINT_MACHINE_CHECK      # the #MC that panicked
    assert isinstance(host.check_invariants(), list)
    assert host.panicked() == e.reason
    assert host.kpageflags(pfn) & (1 << u.KPF_MMAP)
    assert host.sysctl("vm.memory_failure_early_kill") == 0
    writes = [(host.hw_poison, pfn), (host.hw_detect, pfn), (host.corrupt_pfn, pfn),
              (host.unpoison_pfn, pfn), (host.sysctl, "vm.memory_failure_early_kill", 1)]
    for fn, *args in writes:
        with pytest.raises(emu.KernelPanic) as ei:
            fn(*args)
        assert ei.value.reason == e.reason
    with pytest.raises(emu.KernelPanic):
        emu.attach(host, name="latecomer")
    after = host.status()
    assert after["processes"] == before["processes"] and after["meminfo"] == before["meminfo"]
    assert host.mf_stats()["total"] == 0
    assert host.sysctl("vm.memory_failure_early_kill") == 0
    # the fixture's close() stops it and checks that nothing is left behind


def test_a_connected_process_sees_the_panic_too(host):
    """A second host handle (another process's emu.connect()) reads the same dump."""
    me = emu.attach(host, name="main")
    panic_by_pread(host, me)
    other = emu.connect(host.path)
    assert other.panicked() == FATAL
    assert any("end Kernel panic" in line for line in other.dmesg())
    with pytest.raises(emu.KernelPanic):
        other.hw_poison(1)


def test_memory_failure_with_recovery_disabled_panics(host):
    """memory_failure() with vm.memory_failure_recovery=0: panic("Memory failure on
    page %lx").  The host call that caused it gets KernelPanic; the machine stays
    readable."""
    me = emu.attach(host, name="main")
    _fd, _a, pfn = shmem_page(me)
    host.sysctl("vm.memory_failure_recovery", 0)
    with pytest.raises(emu.KernelPanic) as ei:
        host.hw_detect(pfn)
    reason = "Memory failure on page %x" % pfn
    assert ei.value.reason == reason
    assert host.panicked() == reason
    assert lines_in_order(host.dmesg(), ["Kernel panic - not syncing: " + reason,
                                         "---[ end Kernel panic - not syncing: %s ]---" % reason])
    with pytest.raises(emu.KernelPanic):              # its attached thread is retired
        me.read(_a, 1)


def test_status_cli_shows_the_panic(tmp_path, monkeypatch):
    """`emu status` and `emu status --json` on a panicked daemon; `emu stop` still
    stops it."""
    from test_cli import emu_cmd

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    from emu import shm

    sock = os.path.join(shm.runtime_dir(), "panic-%d.sock" % os.getpid())
    r = emu_cmd("daemon", "--background", "--socket", sock, "--ram", "32M")
    assert r.returncode == 0, r.stderr
    with open(sock[:-5] + ".pid") as f:
        dpid = int(f.read())
    try:
        h = emu.connect(sock)
        me = emu.attach(h, name="victim")
        panic_by_pread(h, me)
        r = emu_cmd("status", "--socket", sock)
        assert r.returncode == 0, r.stderr
        assert "Kernel panic - not syncing: Fatal machine check" in r.stdout, r.stdout
        r = emu_cmd("status", "--json", "--socket", sock)
        assert json.loads(r.stdout)["panic"] == FATAL
        r = emu_cmd("inject", "hw-poison", "0x10", "--socket", sock)
        assert r.returncode == 1 and r.stderr.count("\n") == 1
        assert "panicked: Fatal machine check" in r.stderr, r.stderr
        r = emu_cmd("dmesg", "--socket", sock)
        assert "end Kernel panic - not syncing: Fatal machine check" in r.stdout
        h.close()
        r = emu_cmd("stop", "--socket", sock)
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(sock)
        assert not any(e.startswith("emu-%d-" % dpid) for e in os.listdir("/dev/shm"))
    finally:
        try:
            os.kill(dpid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_an_unhandled_panic_ends_a_worker_with_one_line(host, capfd):
    me = emu.attach(host, name="main")

    def careless(t):
        t.idle(60)

    th = me.fork(careless, name="careless")
    end = time.monotonic() + 10
    while th.pid not in {p["tgid"] for p in host.status()["processes"]}:
        assert time.monotonic() < end
        time.sleep(0.05)
    panic_by_pread(host, me)
    assert th.join(20) == 1
    err = capfd.readouterr().err
    assert "emu: careless (pid %d): Kernel panic - not syncing: Fatal machine check" % th.pid in err
    assert "Traceback" not in err


# ------------------------------------------------------------------ D12: MF_MUST_KILL
def test_instruction_fetch_srar_is_must_kill(host):
    """An instruction fetch that consumes poison: MCG_STATUS.RIPV is clear, so
    kill_me_maybe passes MF_MUST_KILL and memory_failure() kills the consumer even
    for a clean page (forcekill); a data load of the same kind of page is recovered
    silently and only the retried access gets SIGBUS, at the byte."""
    me = emu.attach(host, name="exec")
    got = recorder()
    fd = me.memfd_create("text")
    me.ftruncate(fd, 2 * PAGE)
    a = me.mmap(0, 2 * PAGE, u.PROT_READ | u.PROT_EXEC, u.MAP_SHARED, fd, 0)
    assert me.fetch(a, 16) == bytes(16)               # read fault: a clean page
    assert me.read(a + PAGE, 1) == b"\0"
    p0, p1 = me.pagemap(a).pfn, me.pagemap(a + PAGE).pfn
    host.hw_poison(p0)
    host.hw_poison(p1)
    with pytest.raises(Stop):
        me.fetch(a + 0x40, 16)
    # MF_MUST_KILL: kill_proc() sends AR at the page (the folio's address) right away
    assert got == [(u.BUS_MCEERR_AR, a, 12)]
    assert any("Uncorrected hardware memory error in user-access at %x" % ((p0 << 12) | 0x40)
               in line for line in host.dmesg())
    assert any("%#x: Sending SIGBUS to exec:%d due to hardware memory corruption" % (p0, me.tid)
               in line for line in host.dmesg())
    del got[:]
    with pytest.raises(Stop):                         # a load of a clean page: no kill_procs,
        me.read(a + PAGE + 0x40, 1)                   # the retry faults on the hwpoison entry
    assert got == [(u.BUS_MCEERR_AR, a + PAGE + 0x40, 12)]
    assert host.mf_stats()["total"] == 2 and host.panicked() is None


# ------------------------------------------------------------------ D12: !mce_usable_address
def test_error_without_usable_address_is_kill_me_now(host):
    """An SRAR whose bank reports a granularity coarser than a page: not
    mce_usable_address(), so do_machine_check queues kill_me_now: SIGBUS with
    SI_KERNEL and no address, no memory_failure(); the page stays mapped and the next
    load takes the machine check again."""
    me = emu.attach(host, name="victim")
    got = recorder()
    a = me.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"data")
    pfn = me.pagemap(a).pfn
    with pytest.raises(OSError) as ei:
        host.hw_poison(pfn, addr_lsb=64)
    assert ei.value.errno == errno.EINVAL
    host.hw_poison(pfn, addr_lsb=21)
    for _ in range(2):
        with pytest.raises(Stop):
            me.read(a, 4)
    assert got == [(u.SI_KERNEL, 0, 0)] * 2
    assert host.mf_stats()["total"] == 0
    assert me.pagemap(a).present and not host.kpageflags(pfn) & KPF_HWPOISON
    assert not any("Uncorrected hardware memory error" in line for line in host.dmesg())


def test_error_with_page_granularity_is_still_usable(host):
    """addr_lsb 12 (PAGE_SHIFT) is usable: kill_me_maybe, memory_failure() of the
    page; the reported address is the page's (MCi_ADDR masked by the LSB)."""
    me = emu.attach(host, name="victim")
    got = recorder()
    a = me.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"data")
    pfn = me.pagemap(a).pfn
    host.hw_poison(pfn, addr_lsb=12)
    with pytest.raises(Stop):
        me.read(a + 0x123, 4)
    assert got and got[0][0] == u.BUS_MCEERR_AR
    assert any("Uncorrected hardware memory error in user-access at %x" % (pfn << 12) in line
               for line in host.dmesg())
    assert host.mf_stats()["total"] == 1


# ------------------------------------------------------------------ the machine-check taint
def test_a_consumed_machine_check_taints_the_kernel(host):
    """__mc_scan_banks() counts every signalled bank and do_machine_check() then
    add_taint(TAINT_MACHINE_CHECK): 'M' in the taint column from the first #MC on,
    even when the error was recovered.  A software injection (no #MC) does not."""
    me = emu.attach(host, name="victim")
    got = recorder()
    a = me.mmap(0, 2 * PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"data")
    me.write(a + PAGE, b"more")
    host.corrupt_pfn(me.pagemap(a + PAGE).pfn)
    assert host.tainted() == 0
    host.hw_poison(me.pagemap(a).pfn)
    with pytest.raises(Stop):
        me.read(a, 4)
    assert got and got[0][0] == u.BUS_MCEERR_AR
    assert host.tainted() == 1 << u.TAINT_MACHINE_CHECK
    assert host.status()["tainted"] == 1 << u.TAINT_MACHINE_CHECK
