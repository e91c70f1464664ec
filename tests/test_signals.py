"""Who gets which SIGBUS: thread selection, AR vs AO, forced AR, pending AO, legacy_queue.

Kernel: mm/memory-failure.c (kill_proc, task_early_kill, find_early_kill_thread,
collect_procs) and kernel/signal.c (force_sig_mceerr, send_sig_mceerr,
force_sig_info_to_task, legacy_queue).

Every test runs forked (conftest).  The test process is the main thread ("qemu") of an
emulated process; vCPU threads are clone()d workers that report what their own SIGBUS
handler saw by returning it.  Threads that wait for an asynchronous AO poll with
task.idle(); nothing here asserts on timing.
"""
import contextlib
import os
import select
import signal
import time

import pytest
from checks import Stop, record_sigbus, wait_for

import emu
from emu import uapi as u

pytestmark = pytest.mark.both_backends      # conftest: on the Cython core and the reference CPU

PAGE = 4096
SIGBUS = signal.SIGBUS
EARLY, LATE, DEFAULT = u.PR_MCE_KILL_EARLY, u.PR_MCE_KILL_LATE, u.PR_MCE_KILL_DEFAULT
EARLY_KILL = "vm.memory_failure_early_kill"
WAIT = 5.0          # upper bound for an asynchronous signal to show up
GRACE = 0.3         # how long we look for a signal that must NOT arrive


class Event:
    """A one-shot flag between emulated threads (real processes): a pipe whose byte is
    never consumed, so every holder of the read end sees it set."""

    def __init__(self):
        self.r, self.w = os.pipe()

    def set(self):
        os.write(self.w, b"x")

    def is_set(self) -> bool:
        return bool(select.select([self.r], [], [], 0)[0])

    def wait(self, task, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while not self.is_set():
            if time.monotonic() > end:
                return False
            task.idle(0.05)
        return True


class Counter:
    """Workers post one byte each; the main thread waits for n of them."""

    def __init__(self):
        self.r, self.w = os.pipe()
        self.seen = 0

    def post(self):
        os.write(self.w, b"r")

    def wait(self, n: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while self.seen < n:
            left = end - time.monotonic()
            assert left > 0, "workers did not get ready (%d of %d)" % (self.seen, n)
            if select.select([self.r], [], [], min(left, 0.1))[0]:
                self.seen += len(os.read(self.r, n - self.seen))


def rec(info):
    return (info.si_code, info.si_addr, info.si_addr_lsb)


def shared_page(me, backing="memfd", npages=4, target=1):
    """A MAP_SHARED mapping of `npages`, page `target` dirtied; returns (base, va, pfn)."""
    size = npages * PAGE
    if backing == "memfd":
        fd = me.memfd_create("guest-ram")
        me.ftruncate(fd, size)
    else:
        vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        fd = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    base = me.mmap(0, size, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
    va = base + target * PAGE
    me.write(va, b"\xaa" * 64)                 # dirty: forcekill at memory_failure time
    pm = me.pagemap(va)
    assert pm.present
    return base, va, pm.pfn


def dirty_page(me, base, index, byte=b"\xbb"):
    """Dirty page `index` of the shared mapping at base; returns (va, pfn)."""
    va = base + index * PAGE
    me.write(va, byte * 64)
    return va, me.pagemap(va).pfn


def set_policy(task, policy):
    if policy is not None:
        task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, policy)
    return task.prctl(u.PR_MCE_KILL_GET)


def main_thread(host, policy=None, raise_on=()):
    """The VMM's main thread: attached as "qemu", recording SIGBUS (raising Stop for
    raise_on), its PR_MCE_KILL policy set unless None.  Returns (me, got)."""
    me = emu.attach(host, name="qemu")
    got = record_sigbus(raise_on)
    if policy is not None:
        set_policy(me, policy)
    return me, got


def vcpu_wait(task, policy, ready, done, first=False):
    """A vCPU thread (or another process): set its own policy, record SIGBUS (with
    `first`, wait for a first signal), wait until the main thread says the injection
    is over, then report (its policy, what it received)."""
    got = record_sigbus()
    pol = set_policy(task, policy)
    ready.post()
    if first:
        wait_for(task, got)
    assert done.wait(task)
    task.idle(GRACE)                           # a signal sent before `done` is in by now
    return pol, got


def start_vcpus(me, policies, ready, done):
    ths = [me.clone(vcpu_wait, pol, ready, done, name="vcpu%d" % i)
           for i, pol in enumerate(policies)]
    ready.wait(len(ths))
    return ths


def detect_and_finish(host, me, pfn, ths, done, wait=None):
    """A deferred error on pfn (hw_detect returns 0); the main thread waits for its AO
    in `wait` if given, gives a grace period, then releases the vCPUs: their results."""
    assert host.hw_detect(pfn) == 0
    if wait is not None:
        wait_for(me, wait)
    me.idle(GRACE)
    return finish(ths, done)


@contextlib.contextmanager
def sigbus_blocked():
    """SIGBUS blocked in this emulated thread for the block (an AO stays pending)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {SIGBUS})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {SIGBUS})


def finish(ths, done):
    done.set()
    out = []
    for th in ths:
        assert th.join(15) == 0, th.name
        out.append(th.result)
    return out


AO = u.BUS_MCEERR_AO
AR = u.BUS_MCEERR_AR


# ------------------------------------------------------------------ 1. thread selection (AO)
@pytest.mark.parametrize("backing", ["memfd", "gmem"])
def test_deferred_error_main_early_vcpus_late_only_main_gets_ao(host, backing):
    me, got = main_thread(host)
    assert set_policy(me, EARLY) == EARLY
    _, va, pfn = shared_page(me, backing)
    ready, done = Counter(), Event()
    ths = start_vcpus(me, [LATE, LATE, LATE], ready, done)

    res = detect_and_finish(host, me, pfn, ths, done, wait=got)

    assert got == [(AO, va, 12)]               # page VA, lsb 12, exactly once
    assert res == [(LATE, []), (LATE, []), (LATE, [])]


def test_deferred_error_main_early_wins_even_with_sysctl(host_factory):
    """sysctl=1 does not add receivers: one entry per process, the first early thread
    in group order (main first) gets the AO, not the DEFAULT or EARLY vCPUs."""
    host = host_factory(sysctl={EARLY_KILL: 1})
    me, got = main_thread(host)
    _, va, pfn = shared_page(me)
    ready, done = Counter(), Event()
    ths = start_vcpus(me, [None, EARLY], ready, done)   # vcpu0 DEFAULT, vcpu1 EARLY
    assert set_policy(me, EARLY) == EARLY

    res = detect_and_finish(host, me, pfn, ths, done, wait=got)

    assert got == [(AO, va, 12)]
    assert res == [(DEFAULT, []), (EARLY, [])]


def test_deferred_error_main_default_with_sysctl_gets_ao(host_factory):
    host = host_factory(sysctl={EARLY_KILL: 1})
    assert host.sysctl(EARLY_KILL) == 1
    me, got = main_thread(host)
    assert set_policy(me, None) == DEFAULT
    _, va, pfn = shared_page(me)
    ready, done = Counter(), Event()
    ths = start_vcpus(me, [None, LATE], ready, done)    # vcpu0 DEFAULT too: main is first

    res = detect_and_finish(host, me, pfn, ths, done, wait=got)

    assert got == [(AO, va, 12)]
    assert res == [(DEFAULT, []), (LATE, [])]


def test_deferred_error_main_late_vcpu1_default_sysctl_vcpu1_gets_ao(host):
    """main=LATE is skipped even with sysctl=1; vcpu0=LATE skipped; vcpu1 (no
    PF_MCE_PROCESS) is the first qualifying thread; vcpu2 (also DEFAULT) is not used."""
    me, got = main_thread(host)
    _, va, pfn = shared_page(me)
    ready, done = Counter(), Event()
    ths = start_vcpus(me, [LATE, None, None], ready, done)
    assert set_policy(me, LATE) == LATE        # after the clones: they stay DEFAULT/LATE
    host.sysctl(EARLY_KILL, 1)
    assert host.sysctl(EARLY_KILL) == 1

    res = detect_and_finish(host, me, pfn, ths, done)

    assert got == []
    assert res == [(LATE, []), (DEFAULT, [(AO, va, 12)]), (DEFAULT, [])]


def test_deferred_error_main_late_vcpu_early_without_sysctl(host):
    me, got = main_thread(host, LATE)
    _, va, pfn = shared_page(me)
    ready, done = Counter(), Event()
    ths = start_vcpus(me, [None, EARLY], ready, done)   # vcpu0 inherits LATE

    res = detect_and_finish(host, me, pfn, ths, done)

    assert got == []
    assert res == [(LATE, []), (EARLY, [(AO, va, 12)])]


@pytest.mark.parametrize("backing", ["memfd", "gmem"])
def test_deferred_error_all_late_with_sysctl_nobody(host_factory, backing):
    host = host_factory(sysctl={EARLY_KILL: 1})
    me, got = main_thread(host, LATE)
    _, va, pfn = shared_page(me, backing)
    ready, done = Counter(), Event()
    ths = start_vcpus(me, [LATE, LATE], ready, done)

    res = detect_and_finish(host, me, pfn, ths, done)   # late kill: nothing sent, still handled

    assert got == []
    assert res == [(LATE, []), (LATE, [])]


def test_deferred_error_default_without_sysctl_nobody(host):
    me, got = main_thread(host)
    _, va, pfn = shared_page(me)
    ready, done = Counter(), Event()
    ths = start_vcpus(me, [None, None], ready, done)

    res = detect_and_finish(host, me, pfn, ths, done)

    assert got == []
    assert res == [(DEFAULT, []), (DEFAULT, [])]


# ------------------------------------------------------------------ 2. AR goes to current only
def vcpu_consume(task, policy, va, ready, go):
    got = record_sigbus(raise_on=(AR,))
    pol = set_policy(task, policy)
    ready.post()
    assert go.wait(task)
    stopped = False
    try:
        task.read(va + 0x10, 8)                # consumes the latent poison: #MC on this thread
    except Stop:
        stopped = True
    return pol, stopped, got


@pytest.mark.parametrize("backing", ["memfd", "gmem"])
def test_ar_on_vcpu2_only_vcpu2_gets_it(host, backing):
    me, got = main_thread(host, EARLY)
    _, va, pfn = shared_page(me, backing)
    ready, done, go = Counter(), Event(), Event()
    ths = start_vcpus(me, [LATE, LATE], ready, done)
    v2 = me.clone(vcpu_consume, LATE, va, ready, go, name="vcpu2")
    ready.wait(3)

    assert host.hw_poison(pfn) == 0
    go.set()
    assert v2.join(15) == 0
    me.idle(GRACE)
    res = finish(ths, done)

    pol, stopped, v2_got = v2.result
    assert (pol, stopped) == (LATE, True)
    # memory_failure's kill_proc: AR to current with the page VA (not the byte), lsb 12;
    # the handler raised on the first one, so exactly one
    assert v2_got == [(AR, va, 12)]
    assert got == []                            # main is EARLY but gets nothing
    assert res == [(LATE, []), (LATE, [])]


@pytest.mark.parametrize("backing", ["memfd", "gmem"])
def test_ar_current_and_ao_to_early_thread_of_other_process(host, backing):
    """collect_procs: a second process mapping the same page with an EARLY thread gets AO
    while the consuming thread gets AR."""
    me, got = main_thread(host, LATE, raise_on=(AR,))
    _, va, pfn = shared_page(me, backing)
    ready, done = Counter(), Event()

    ch = me.fork(vcpu_wait, EARLY, ready, done, True, name="monitor")   # first: waits for its AO
    ready.wait(1)
    assert host.hw_poison(pfn) == 0
    with pytest.raises(Stop):
        me.read(va + 0x123, 4)
    done.set()
    assert ch.join(15) == 0

    assert got == [(AR, va, 12)]
    assert ch.result == (EARLY, [(AO, va, 12)])


def test_ar_other_process_late_gets_nothing(host):
    me, got = main_thread(host, EARLY, raise_on=(AR,))
    _, va, pfn = shared_page(me)
    ready, done = Counter(), Event()

    ch = me.fork(vcpu_wait, LATE, ready, done, name="late-proc")
    ready.wait(1)
    assert host.hw_poison(pfn) == 0
    with pytest.raises(Stop):
        me.read(va, 4)
    done.set()
    assert ch.join(15) == 0
    assert got == [(AR, va, 12)]
    assert ch.result == (LATE, [])


# ------------------------------------------------------------------ 4. forced AR kills
def _victim_blocked(task, va):
    signal.pthread_sigmask(signal.SIG_BLOCK, {SIGBUS})
    task.read(va, 8)
    return "survived"


def _victim_blocked_with_handler(task, va):
    emu.sigaction(SIGBUS, lambda s, i: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {SIGBUS})
    task.read(va, 8)
    return "survived"


def _victim_ignored(task, va):
    emu.sigaction(SIGBUS, signal.SIG_IGN)
    task.read(va, 8)
    return "survived"


@pytest.mark.parametrize("victim", [_victim_blocked, _victim_blocked_with_handler,
                                    _victim_ignored])
@pytest.mark.parametrize("backing", ["memfd", "gmem"])
def test_forced_ar_with_sigbus_blocked_or_ignored_kills(host, victim, backing):
    me, got = main_thread(host)                   # main: DEFAULT, sysctl 0 -> not signalled
    _, va, pfn = shared_page(me, backing)
    assert host.hw_poison(pfn) == 0
    ch = me.fork(victim, va, name="victim")
    assert ch.join(15) == -SIGBUS
    assert ch.result is None
    me.idle(GRACE)
    assert got == []
    # the runtime of the survivor is fine
    me.write(va - PAGE, b"ok")
    assert me.read(va - PAGE, 2) == b"ok"


def test_forced_ar_on_clone_takes_whole_thread_group(host):
    """A clone()d thread that dies of SIGBUS takes its thread group with it (exit_group):
    the fork child's main thread dies of SIGBUS too."""
    me, got = main_thread(host)
    _, va, pfn = shared_page(me)
    assert host.hw_poison(pfn) == 0

    def proc_main(task):
        th = task.clone(_victim_blocked, va, name="vcpu0")
        code = th.join(15)
        task.idle(WAIT)                        # exit_group must end us before this returns
        return "survived", code

    ch = me.fork(proc_main, name="vm-proc")
    assert ch.join(30) == -SIGBUS
    assert ch.result is None
    assert got == []
    me.write(va + PAGE, b"still here")
    assert me.read(va + PAGE, 10) == b"still here"


def test_forced_ar_on_clone_with_ignored_sigbus_takes_group(host):
    me = emu.attach(host, name="qemu")
    _, va, pfn = shared_page(me)
    assert host.hw_poison(pfn) == 0

    def proc_main(task):
        th = task.clone(_victim_ignored, va, name="vcpu0")
        code = th.join(15)
        task.idle(WAIT)
        return "survived", code

    ch = me.fork(proc_main, name="vm-proc")
    assert ch.join(30) == -SIGBUS


# ------------------------------------------------------------------ 4. AO stays pending
def blocked_early_vcpu(task, ready, injected, hold, grace):
    """An EARLY vCPU thread recording SIGBUS with SIGBUS blocked: once `injected`, it
    waits `hold` seconds, notes what came in and whether SIGBUS is pending, unblocks,
    waits for a signal and `grace` more.  Returns (while blocked, pending, all)."""
    vgot = record_sigbus()
    set_policy(task, EARLY)
    with sigbus_blocked():
        ready.post()
        assert injected.wait(task)
        task.idle(hold)
        while_blocked = list(vgot)
        pending = SIGBUS in signal.sigpending()
    wait_for(task, vgot)
    task.idle(grace)
    return while_blocked, pending, vgot


def test_ao_stays_pending_while_blocked_then_delivered(host):
    me, got = main_thread(host, LATE)
    _, va, pfn = shared_page(me)
    ready, injected = Counter(), Event()

    th = me.clone(blocked_early_vcpu, ready, injected, 0.5, GRACE, name="vcpu0")
    ready.wait(1)
    assert host.hw_detect(pfn) == 0
    injected.set()
    assert th.join(15) == 0
    while_blocked, pending, after = th.result
    assert while_blocked == []
    assert pending
    assert after == [(AO, va, 12)]
    assert got == []                            # thread-directed: main (unblocked) gets nothing


def test_ao_pending_on_main_thread(host):
    me, got = main_thread(host, EARLY)
    _, va, pfn = shared_page(me)
    with sigbus_blocked():
        assert host.hw_detect(pfn) == 0
        me.idle(0.5)
        assert got == []
        assert SIGBUS in signal.sigpending()
    wait_for(me, got)
    assert got == [(AO, va, 12)]


def test_ao_ignored_is_dropped(host):
    """send_sig_mceerr is not forced: with SIG_IGN the AO is discarded and the thread lives."""
    me = emu.attach(host, name="qemu")
    set_policy(me, LATE)
    _, va, pfn = shared_page(me)
    ready, injected = Counter(), Event()

    def vcpu(task):
        set_policy(task, EARLY)
        emu.sigaction(SIGBUS, signal.SIG_IGN)
        ready.post()
        assert injected.wait(task)
        task.idle(GRACE)
        vgot = record_sigbus()
        task.idle(GRACE)
        return "alive", vgot

    th = me.clone(vcpu, name="vcpu0")
    ready.wait(1)
    assert host.hw_detect(pfn) == 0
    injected.set()
    assert th.join(15) == 0
    assert th.result == ("alive", [])


# ------------------------------------------------------------------ legacy_queue
def test_legacy_queue_second_ao_dropped_while_first_pending(host):
    me, got = main_thread(host, EARLY)
    base, va1, pfn1 = shared_page(me, target=1)
    va2, pfn2 = dirty_page(me, base, 2, b"\xbb")
    assert pfn2 != pfn1

    with sigbus_blocked():
        assert host.hw_detect(pfn1) == 0
        assert host.hw_detect(pfn2) == 0
        me.idle(0.3)
        assert got == []
    wait_for(me, got)
    me.idle(0.5)
    assert got == [(AO, va1, 12)]              # the second SIGBUS was dropped


def test_page_mapped_twice_ao_carries_the_lower_file_offset_vma(host):
    """collect_procs_file walks i_mmap, an interval tree ordered by vm_pgoff: a page
    one process maps through two VMAs is reported at its address in the VMA that
    starts lower in the file, though that VMA lies higher in memory; the second
    SIGBUS finds the first pending and is dropped."""
    me, got = main_thread(host, EARLY)
    fd = me.memfd_create("guest-ram")
    me.ftruncate(fd, 2 * PAGE)
    rw, shared = u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED
    whole = me.mmap(0, 2 * PAGE, rw, shared, fd, 0)            # pgoff 0
    alias = me.mmap(0, PAGE, rw, shared, fd, PAGE)              # pgoff 1, placed below
    assert alias < whole
    me.write(alias, b"\xaa" * 64)
    pfn = me.pagemap(alias).pfn
    me.read(whole + PAGE, 1)
    assert me.pagemap(whole + PAGE).pfn == pfn

    with sigbus_blocked():
        assert host.hw_detect(pfn) == 0
        me.idle(0.3)
    wait_for(me, got)
    me.idle(0.5)
    assert got == [(AO, whole + PAGE, 12)]


def test_legacy_queue_on_vcpu_thread(host):
    me, got = main_thread(host, LATE)
    base, va1, pfn1 = shared_page(me, target=1)
    va2, pfn2 = dirty_page(me, base, 3, b"\xcc")
    ready, injected = Counter(), Event()

    th = me.clone(blocked_early_vcpu, ready, injected, 0.3, 0.5, name="vcpu0")
    ready.wait(1)
    assert host.hw_detect(pfn1) == 0
    assert host.hw_detect(pfn2) == 0
    injected.set()
    assert th.join(15) == 0
    blocked, _pending, after = th.result
    assert (blocked, after) == ([], [(AO, va1, 12)])
    assert got == []


def test_two_ao_unblocked_both_delivered(host):
    """Contrast: once the first AO was delivered, a second one is queued again."""
    me, got = main_thread(host, EARLY)
    base, va1, pfn1 = shared_page(me, target=1)
    va2, pfn2 = dirty_page(me, base, 2, b"\xbb")

    assert host.hw_detect(pfn1) == 0
    wait_for(me, got, 1)
    assert host.hw_detect(pfn2) == 0
    wait_for(me, got, 2)
    me.idle(GRACE)
    assert got == [(AO, va1, 12), (AO, va2, 12)]
    # the trace: one mailbox send each, the doorbell rung before the event fired
    sent = [e for e in host.events() if e["type"] == "signal" and e["via"] == "mailbox"]
    assert [(e["tid"], e["code"], e["addr"]) for e in sent] == [(me.tid, AO, va1), (me.tid, AO, va2)]
    assert all(0 < e["doorbell_ns"] <= e["ts_ns"] for e in sent)


# ------------------------------------------------------------------ handler that raises
@pytest.fixture(params=["halt-polling", "no-halt-polling"])
def polling_host(request, host_factory, tmp_path):
    """A supervisor that polls for the next call (threads spin for their replies), and
    one that sleeps at once (threads sleep in recv): a handler may land in either wait."""
    poll = 200_000 if request.param == "halt-polling" else 0
    conf = tmp_path / "emu.toml"
    conf.write_text("[supervisor]\nhalt_poll_ns = %d\n" % poll)
    return host_factory(config=str(conf)), poll


def test_raising_handler_leaves_runtime_usable(polling_host):
    host, poll = polling_host
    me = emu.attach(host, name="qemu")
    assert me.ch.spin_ns == poll                  # announced in the greeting
    got = record_sigbus(raise_on=(AR, AO))
    set_policy(me, EARLY)
    base, va, pfn = shared_page(me, npages=8, target=1)

    # AR from MADV_HWPOISON: the exception comes out of the syscall
    with pytest.raises(Stop):
        me.madvise(va, PAGE, u.MADV_HWPOISON)
    assert got == [(AR, va, 12)]

    me.write(base, b"first")
    assert me.read(base, 5) == b"first"

    # a later access to the poisoned page: AR with the faulting byte address
    with pytest.raises(Stop):
        me.read(va + 0x42, 1)
    assert got[-1] == (AR, va + 0x42, 12)
    with pytest.raises(Stop):
        me.write(va + 0x80, b"x")
    assert got[-1] == (AR, va + 0x80, 12)

    # a consumed latent error on another page: AR from the #MC path
    va3 = base + 3 * PAGE
    me.write(va3, b"\x11" * 16)
    assert host.hw_poison(me.pagemap(va3).pfn) == 0
    with pytest.raises(Stop):
        me.read(va3 + 8, 8)
    assert got[-1] == (AR, va3, 12)

    # an asynchronous AO whose handler raises out of idle()
    va5 = base + 5 * PAGE
    me.write(va5, b"\x55" * 16)
    pfn5 = me.pagemap(va5).pfn
    with pytest.raises(Stop):                  # may land inside hw_detect's own reply wait
        assert host.hw_detect(pfn5) == 0
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            me.idle(0.05)
    assert got[-1] == (AO, va5, 12)
    assert host.sysctl(EARLY_KILL) == 0        # the host channel survived the abandoned call
    assert host.kpageflags(pfn5) & (1 << u.KPF_HWPOISON)

    # everything still works
    me.write(base + 7 * PAGE, b"after")
    assert me.read(base + 7 * PAGE, 5) == b"after"
    assert me.read(base, 5) == b"first"
    fd2 = me.memfd_create("more")
    me.ftruncate(fd2, 2 * PAGE)
    a2 = me.mmap(0, 2 * PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd2, 0)
    me.write(a2 + PAGE, b"fresh mapping")
    assert me.read(a2 + PAGE, 13) == b"fresh mapping"
    assert me.pread(fd2, 5, PAGE) == b"fresh"
    anon = me.mmap(0, PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(anon, b"anon")
    assert me.read(anon, 4) == b"anon"
    assert me.prctl(u.PR_MCE_KILL_GET) == EARLY
    me.munmap(a2, 2 * PAGE)
    th = me.clone(lambda t: t.read(base, 5), name="vcpu0")
    assert th.join(15) == 0
    assert th.result == b"first"


def test_raising_handler_in_vcpu_thread_then_usable(polling_host):
    host, _ = polling_host
    me = emu.attach(host, name="qemu")
    base, va, pfn = shared_page(me)
    assert host.hw_poison(pfn) == 0

    def vcpu(task):
        vgot = record_sigbus(raise_on=(AR,))
        out = []
        for _ in range(3):
            try:
                task.read(va, 8)
                out.append("read")
            except Stop:
                out.append("stop")
        task.write(base, b"vcpu")
        out.append(task.read(base, 4))
        return out, vgot

    th = me.clone(vcpu, name="vcpu0")
    assert th.join(15) == 0
    out, vgot = th.result
    assert out == ["stop", "stop", "stop", b"vcpu"]
    assert vgot[0] == (AR, va, 12)
    assert vgot[1:] == [(AR, va, 12), (AR, va, 12)]
    assert me.read(base, 4) == b"vcpu"


# ------------------------------------------------------------------ forced AR meets a pending AO
def test_forced_ar_while_ao_pending_and_blocked_kills(host):
    """force_sig_info_to_task: SIGBUS blocked -> handler reset to SIG_DFL and SIGBUS
    unblocked *before* send_signal_locked; the new AR is then dropped by legacy_queue
    because the AO is already pending ("This can happen if the signal was already
    pending and blocked"), but the now-unblocked pending SIGBUS is delivered with the
    default action: the process dies of SIGBUS."""
    me, got = main_thread(host)                   # main: DEFAULT, sysctl 0 -> never signalled
    base, va_ao, pfn_ao = shared_page(me, target=1)
    va_ar = base + 2 * PAGE
    me.write(va_ar, b"\x77" * 32)
    pfn_ar = me.pagemap(va_ar).pfn
    ready, injected = Counter(), Event()

    def victim(task):
        emu.sigaction(SIGBUS, lambda s, i: None)
        set_policy(task, EARLY)
        signal.pthread_sigmask(signal.SIG_BLOCK, {SIGBUS})
        ready.post()
        assert injected.wait(task)
        task.idle(0.3)
        assert SIGBUS in signal.sigpending()   # the AO is pending, blocked
        task.read(va_ar, 8)                    # consumes: forced AR
        return "survived"

    ch = me.fork(victim, name="victim")
    ready.wait(1)
    assert host.hw_detect(pfn_ao) == 0
    assert host.hw_poison(pfn_ar) == 0
    injected.set()
    code = ch.join(15)
    if code is None:                           # hung retrying the access: stop it
        ch.kill()
        code = ch.join(5)
        pytest.fail("victim did not die of the forced AR (it kept running)")
    assert code == -SIGBUS
    assert got == []


def test_legacy_queue_drops_alike_for_another_thread_and_for_current(host):
    """One drop rule for both routes of send_signal_locked: with an AO pending (SIGBUS
    blocked), a second AO sent to the thread from a deferred error (another thread:
    the mailbox) and the forced AR it then takes on a poisoned page (current: the
    reply) are both dropped by legacy_queue; the pending AO is then delivered with
    the default action (force_sig_info_to_task unblocked it)."""
    me = emu.attach(host, name="qemu")
    base, va1, pfn1 = shared_page(me, target=1)
    va2, pfn2 = dirty_page(me, base, 2, b"\xbb")
    va3, pfn3 = dirty_page(me, base, 3, b"\xcc")
    ready, injected = Counter(), Event()

    def victim(task):
        emu.sigaction(SIGBUS, lambda s, i: None)
        set_policy(task, EARLY)
        task.read(va1, 1)                      # fork copied no PTE of the shared file
        task.read(va2, 1)
        signal.pthread_sigmask(signal.SIG_BLOCK, {SIGBUS})
        ready.post()
        assert injected.wait(task)
        task.idle(0.3)
        task.read(va3, 8)                      # consumes: forced AR, dropped
        return "survived"

    since = host.events()[-1]["seq"]
    ch = me.fork(victim, name="victim")
    ready.wait(1)
    assert host.hw_detect(pfn1) == 0
    assert host.hw_detect(pfn2) == 0
    assert host.hw_poison(pfn3) == 0
    injected.set()
    code = ch.join(15)
    if code is None:
        ch.kill()
        ch.join(5)
        pytest.fail("victim kept running")
    assert code == -SIGBUS
    ev = [(e["type"], e["code"], e["addr"], e["force"], e.get("reason"))
          for e in host.events(since) if e["type"] in ("signal", "signal_dropped")
          and e["tid"] == ch.pid]
    assert ev == [("signal", AO, va1, False, None),
                  ("signal_dropped", AO, va2, False, "already pending"),
                  ("signal_dropped", AR, va3, True, "already pending")]


# ------------------------------------------------------------------ AO with the default action
def test_ao_with_default_disposition_kills_whole_process(host):
    """send_sig_mceerr to an EARLY thread with SIGBUS at SIG_DFL: the default action of
    SIGBUS terminates the thread group, so the process (and its vCPU) die of SIGBUS."""
    me, got = main_thread(host)
    _, va, pfn = shared_page(me)
    ready = Counter()

    def vm_proc(task):
        emu.sigaction(SIGBUS, signal.SIG_DFL)
        set_policy(task, EARLY)

        def vcpu(t):
            emu.sigaction(SIGBUS, signal.SIG_DFL)
            set_policy(t, LATE)
            ready.post()
            t.idle(3 * WAIT)
            return "vcpu survived"

        th = task.clone(vcpu, name="vcpu0")
        ready.post()
        task.idle(3 * WAIT)
        return "survived", th.join(1)

    ch = me.fork(vm_proc, name="vm-proc")
    ready.wait(2)
    assert host.hw_detect(pfn) == 0
    assert ch.join(30) == -SIGBUS
    me.idle(GRACE)
    assert got == []                            # main is DEFAULT, sysctl 0
    end = time.monotonic() + WAIT               # the vCPU went with its group
    while time.monotonic() < end and len(host.status()["processes"]) > 1:
        me.idle(0.05)
    assert [p["tgid"] for p in host.status()["processes"]] == [me.tgid]


# ------------------------------------------------------------------ kill_procs sent with the unmap
@pytest.mark.parametrize("with_unmap", [True, False], ids=["core-sends-at-unmap", "kill_procs-sends"])
def test_signals_sent_with_the_unmap_are_those_kill_procs_sends(host_factory, monkeypatch,
                                                                 with_unmap):
    """When the kill is decided before the unmap (a dirty page), the core sends
    kill_procs' signals in try_to_unmap's own call.  The same case run both ways gives
    the same signals, drops, dmesg lines and trace: every unmap before the first
    doorbell, the signals in to_kill order, a pending SIGBUS dropping the next."""
    from emu.kernel.memory_failure import MemoryFailure

    calls_r, calls_w = os.pipe()
    os.set_inheritable(calls_w, True)           # the supervisor keeps only inheritable fds
    real = MemoryFailure.send_with_unmap

    def send_with_unmap(self, *a):
        records = real(self, *a) if with_unmap else None
        os.write(calls_w, b"y" if records else b"n")
        return records

    monkeypatch.setattr(MemoryFailure, "send_with_unmap", send_with_unmap)
    host = host_factory()                       # forked now: the supervisor has the patch
    me, got = main_thread(host, EARLY)
    base, va1, pfn1 = shared_page(me, target=1)
    va2, pfn2 = dirty_page(me, base, 2, b"\xbb")
    ready, done = Counter(), Event()

    def monitor(task):
        ogot = record_sigbus()
        set_policy(task, EARLY)
        task.read(va1, 1)                       # fork copied no PTE of the shared file
        task.read(va2, 1)                       # mapping (vma_needs_copy): fault them in
        ready.post()
        wait_for(task, ogot, 2)
        assert done.wait(task)
        return task.tid, ogot

    ch = me.fork(monitor, name="monitor")
    ready.wait(1)
    since = host.events()[-1]["seq"]
    with sigbus_blocked():
        assert host.hw_detect(pfn1) == 0
        assert host.hw_detect(pfn2) == 0
    wait_for(me, got)
    done.set()
    assert ch.join(15) == 0
    mon_tid, mon_got = ch.result
    me.idle(GRACE)

    assert os.read(calls_r, 16) == (b"yy" if with_unmap else b"nn")
    assert got == [(AO, va1, 12)]                       # the second found the first pending
    assert mon_got == [(AO, va1, 12), (AO, va2, 12)]
    who = {me.tid: "qemu", mon_tid: "monitor"}
    trace = [(e["type"], who.get(e.get("tid")), e.get("addr"), e.get("reason"))
             for e in host.events(since) if e["type"] in ("unmap", "signal", "signal_dropped")]
    assert trace == [("unmap", None, va1, None), ("unmap", None, va1, None),
                     ("signal", "qemu", va1, None), ("signal", "monitor", va1, None),
                     ("unmap", None, va2, None), ("unmap", None, va2, None),
                     ("signal_dropped", "qemu", va2, "already pending"),
                     ("signal", "monitor", va2, None)]
    evs = host.events(since)
    for pfn in (pfn1, pfn2):
        unmaps = [e["ts_ns"] for e in evs if e["type"] == "unmap" and e["pfn"] == pfn]
        rung = [e["doorbell_ns"] for e in evs if e["type"] == "signal"
                and e["addr"] == (va1 if pfn == pfn1 else va2)]
        assert max(unmaps) <= min(rung)
    assert all(e["ts_ns"] == e["doorbell_ns"] for e in evs if e["type"] == "signal")
    sending = [line.split("] ", 1)[1] for line in host.dmesg() if "Sending SIGBUS" in line]
    assert sending == ["Memory failure: %#x: Sending SIGBUS to %s:%d due to hardware memory "
                       "corruption" % (pfn, comm, tid)
                       for pfn in (pfn1, pfn2) for comm, tid in (("qemu", me.tid),
                                                                 ("monitor", mon_tid))]
    assert me.pagemap(va1).hwpoison and me.pagemap(va2).hwpoison
