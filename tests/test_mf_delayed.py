"""Lisa Wang's guest_memfd test_memory_failure table (guest_memfd_test.c, "[RFC PATCH
2/3] KVM: selftests: Add memory failure tests in guest_memfd_test", Oct 2025), run
against both memory-failure policies (the port for the fixed kernel alone, row by row
and for each VM type, is tests/test_selftest_kvm_gmem_memory_failure.py):

- "mf-delayed-fix": kvm_gmem_error_folio's MF_DELAYED propagates, memory_failure()
  returns 0, the stats count "delayed";
- "v6.18": truncate_error_folio takes MF_DELAYED (2) as "Failed to punch page: 2",
  MF_FAILED, memory_failure() returns -EBUSY (the injection write / madvise fails
  with EBUSY), and a consumed #MC also gets kill_me_now (SIGBUS SI_KERNEL).

Signals at injection are the same under both policies: the fix changes what
truncate_error_folio() makes of MF_DELAYED, not who hwpoison_user_mappings() kills.
Every case then expects SIGBUS BUS_MCEERR_AR on a later read and on a later write,
at the faulting byte (x86 do_sigbus), lsb 12; cleanup is munmap,
PUNCH_HOLE of the whole file, PR_MCE_KILL back to DEFAULT and unpoison == 0
(unpoison before the punch: EBUSY, the page still has a mapping).
"""
import errno
import signal

import pytest
from checks import Stop, corrupt_pfn_delayed, dmesg_has

import emu
from emu import uapi as u

PAGE = 4096
NPAGES = 4
OFF = 0x123                    # a byte inside the page: fault si_addr is not page-aligned
KPF_HWPOISON = 1 << u.KPF_HWPOISON
POLICIES = ["mf-delayed-fix", "v6.18"]
SIGNAL_WAIT = 5.0              # bound for asynchronous (AO) delivery; never a latency assert
QUIET_WAIT = 0.3               # how long to look for a signal that must not come


class SigbusRecorder:
    """handler(signum, info): records every SIGBUS.  In "record" mode it returns
    (for signals that arrive during a syscall such as madvise, or asynchronously);
    in "raise" mode it raises Stop so that a faulting access ends instead of
    retrying forever.  `passthrough` lists si_codes that return even in raise mode
    (kill_me_now's SI_KERNEL: the access then retries, as the CPU would)."""

    def __init__(self):
        self.got = []
        self.raising = False
        self.passthrough = ()
        self.stop_after = 8

    def __call__(self, signum, info):
        assert signum == signal.SIGBUS
        self.got.append(info)
        if self.raising and (info.si_code not in self.passthrough
                             or len(self.got) >= self.stop_after):
            raise Stop()

    def take(self):
        out = [(i.si_code, i.si_addr, i.si_addr_lsb) for i in self.got]
        self.got.clear()
        return out


def access_expect_sigbus(rec, fn, passthrough=(), stop_after=8):
    """Run one access that must end in a SIGBUS; return the signals it got."""
    rec.got.clear()
    rec.raising, rec.passthrough, rec.stop_after = True, passthrough, stop_after
    try:
        with pytest.raises(Stop):
            fn()
    finally:
        rec.raising, rec.passthrough, rec.stop_after = False, (), 8
    return rec.take()


def wait_for_signal(me, rec, n=1, timeout=SIGNAL_WAIT):
    """Bounded poll for asynchronously delivered signals (AO via the doorbell)."""
    import time

    end = time.monotonic() + timeout
    while len(rec.got) < n and time.monotonic() < end:
        me.idle(0.05)


def hw_corrupted(h):
    return h.meminfo()["HardwareCorrupted"]


def setup_gmem(h, name="qemu"):
    me = emu.attach(h, name=name)
    rec = SigbusRecorder()
    emu.sigaction(signal.SIGBUS, rec)
    kvm = me.open_kvm()
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    size = NPAGES * PAGE
    gfd = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    addr = me.mmap(0, size, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
    return me, rec, vm, gfd, addr, size


# (case, method, PR_MCE_KILL policy, mapped, dirty, SIGBUS at injection)
TABLE = [
    (1, "debugfs", u.PR_MCE_KILL_EARLY, True, True, True),
    (2, "debugfs", u.PR_MCE_KILL_EARLY, True, False, False),
    (3, "debugfs", u.PR_MCE_KILL_EARLY, False, True, False),
    (4, "debugfs", u.PR_MCE_KILL_LATE, True, True, False),
    (5, "debugfs", u.PR_MCE_KILL_LATE, True, False, False),
    (6, "debugfs", u.PR_MCE_KILL_LATE, False, True, False),
    (7, "madvise", u.PR_MCE_KILL_DEFAULT, True, True, True),
    (8, "madvise", u.PR_MCE_KILL_DEFAULT, True, False, False),
]
_PNAME = {u.PR_MCE_KILL_EARLY: "early", u.PR_MCE_KILL_LATE: "late",
          u.PR_MCE_KILL_DEFAULT: "default"}


def _case_id(c):
    n, method, pol, mapped, dirty, _ = c
    return "%d-%s-%s-%s-%s" % (n, method, _PNAME[pol], "mapped" if mapped else "unmapped",
                               "dirty" if dirty else "clean")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", TABLE, ids=[_case_id(c) for c in TABLE])
def test_memory_failure_table(host_factory, policy, case):
    n, method, mce_policy, mapped, dirty, sig_at_inject = case
    fixed = policy == "mf-delayed-fix"
    h = host_factory(policy=policy)
    me, rec, _vm, gfd, addr, size = setup_gmem(h)
    target = addr + PAGE                     # page 1 of 4, as in the selftest

    # dirty (write) or clean (read), then the pfn from pagemap
    if dirty:
        me.write(target, b"\xaa" * PAGE)
    else:
        assert me.read(target, PAGE) == bytes(PAGE)
    pm = me.pagemap(target)
    assert pm.present and not pm.hwpoison
    pfn = pm.pfn
    assert not h.kpageflags(pfn) & KPF_HWPOISON

    if not mapped:
        me.madvise(target, PAGE, u.MADV_DONTNEED)
        assert not me.pagemap(target).present
    me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, mce_policy)
    assert me.prctl(u.PR_MCE_KILL_GET) == mce_policy

    stats0, hc0 = h.mf_stats(), hw_corrupted(h)
    assert rec.take() == []

    # ---- inject
    if method == "debugfs":
        corrupt_pfn_delayed(h, pfn, fixed)
    else:
        if fixed:
            me.madvise(target, PAGE, u.MADV_HWPOISON)
        else:
            with pytest.raises(OSError) as ei:
                me.madvise(target, PAGE, u.MADV_HWPOISON)
            assert ei.value.errno == errno.EBUSY

    # ---- signal at injection
    if sig_at_inject and method == "debugfs":
        # deferred error, EARLY thread: AO, thread-directed, asynchronous
        wait_for_signal(me, rec)
        assert rec.take() == [(u.BUS_MCEERR_AO, target, 12)]
    elif sig_at_inject:
        # MF_ACTION_REQUIRED: AR to current, delivered before madvise returns
        assert rec.take() == [(u.BUS_MCEERR_AR, target, 12)]
    else:
        me.idle(QUIET_WAIT)
        assert rec.take() == []

    # ---- bookkeeping
    stats = h.mf_stats()
    assert stats["total"] == stats0["total"] + 1
    if fixed:
        assert stats["delayed"] == stats0["delayed"] + 1
        assert stats["failed"] == stats0["failed"]
    else:
        assert stats["failed"] == stats0["failed"] + 1
        assert stats["delayed"] == stats0["delayed"]
    assert stats["recovered"] == stats0["recovered"]
    assert stats["ignored"] == stats0["ignored"]
    assert hw_corrupted(h) == hc0 + 4
    assert h.kpageflags(pfn) & KPF_HWPOISON
    state = "dirty" if dirty else "clean"
    if fixed:
        assert dmesg_has(h, "Memory failure: %#x: recovery action for %s unevictable LRU page: "
                         "Delayed" % (pfn, state))
        assert not dmesg_has(h, "Failed to punch page")
    else:
        assert dmesg_has(h, "Memory failure: %#x: Failed to punch page: 2" % pfn)
        assert dmesg_has(h, "Memory failure: %#x: recovery action for %s unevictable LRU page: "
                         "Failed" % (pfn, state))
    if mapped:
        pm = me.pagemap(target)
        assert not pm.present and pm.hwpoison and pm.pfn == pfn

    # ---- later accesses: SIGBUS AR at the faulting byte, lsb 12
    got = access_expect_sigbus(rec, lambda: me.read(target + OFF, 8))
    assert got == [(u.BUS_MCEERR_AR, target + OFF, 12)]
    got = access_expect_sigbus(rec, lambda: me.write(target + OFF, b"\x55" * 8))
    assert got == [(u.BUS_MCEERR_AR, target + OFF, 12)]
    # the other pages of the file are untouched
    me.write(addr, b"ok")
    assert me.read(addr, 2) == b"ok"

    # ---- cleanup
    me.munmap(addr, size)
    with pytest.raises(OSError) as ei:       # the page still has a mapping (the gmem file)
        h.unpoison_pfn(pfn)
    assert ei.value.errno == errno.EBUSY
    assert h.kpageflags(pfn) & KPF_HWPOISON
    me.fallocate(gfd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 0, size)
    me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_DEFAULT)
    assert me.prctl(u.PR_MCE_KILL_GET) == u.PR_MCE_KILL_DEFAULT
    assert h.unpoison_pfn(pfn) == 0
    assert not h.kpageflags(pfn) & KPF_HWPOISON
    assert hw_corrupted(h) == hc0

    # after the punch the file hands out a fresh zeroed page (kvm_gmem_get_folio)
    addr2 = me.mmap(0, size, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
    assert me.read(addr2 + PAGE + OFF, 16) == bytes(16)
    me.write(addr2 + PAGE, b"fresh")
    assert me.read(addr2 + PAGE, 5) == b"fresh"
    me.munmap(addr2, size)
    assert rec.take() == []


# ------------------------------------------------------------------ consumed #MC
@pytest.mark.parametrize("policy", POLICIES)
def test_consumed_error_clean_gmem_page(host_factory, policy):
    """host.hw_poison + a read: the #MC is handled with MF_ACTION_REQUIRED on the
    reading thread (kill_me_maybe).  The page is clean, so hwpoison_user_mappings
    turns the PTE into a hwpoison entry and signals nobody (forcekill false).
    - fix: memory_failure returns 0, no signal at the #MC; the access retries, takes
      the hwpoison PTE and gets SIGBUS AR (do_sigbus) at the faulting byte, lsb 12.
    - v6.18: -EBUSY, so "Memory error not recovered" and kill_me_now: SIGBUS
      SI_KERNEL with no address; if the handler returns, the retry gets the same AR.
    Either way, unpoison is disabled after a hardware failure (EOPNOTSUPP)."""
    fixed = policy == "mf-delayed-fix"
    h = host_factory(policy=policy)
    me, rec, _vm, gfd, addr, size = setup_gmem(h)
    target = addr + PAGE
    assert me.read(target, PAGE) == bytes(PAGE)            # clean
    pfn = me.pagemap(target).pfn
    stats0, hc0 = h.mf_stats(), hw_corrupted(h)

    h.hw_poison(pfn)
    got = access_expect_sigbus(rec, lambda: me.read(target + OFF, 8),
                               passthrough=(u.SI_KERNEL,))
    if fixed:
        assert got == [(u.BUS_MCEERR_AR, target + OFF, 12)]
    else:
        assert got == [(u.SI_KERNEL, 0, 0), (u.BUS_MCEERR_AR, target + OFF, 12)]

    stats = h.mf_stats()
    assert stats["total"] == stats0["total"] + 1
    assert stats["delayed" if fixed else "failed"] == stats0["delayed" if fixed else "failed"] + 1
    assert hw_corrupted(h) == hc0 + 4
    assert h.kpageflags(pfn) & KPF_HWPOISON
    assert dmesg_has(h, "mce: Uncorrected hardware memory error in user-access at")
    assert dmesg_has(h, "mce: Memory error not recovered") == (not fixed)
    assert dmesg_has(h, "recovery action for clean unevictable LRU page: %s"
                     % ("Delayed" if fixed else "Failed"))
    pm = me.pagemap(target)
    assert pm.hwpoison and not pm.present

    # a later write behaves like any later access
    got = access_expect_sigbus(rec, lambda: me.write(target + OFF, b"x"))
    assert got == [(u.BUS_MCEERR_AR, target + OFF, 12)]

    me.munmap(addr, size)
    me.fallocate(gfd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 0, size)
    with pytest.raises(OSError) as ei:
        h.unpoison_pfn(pfn)
    assert ei.value.errno == errno.EOPNOTSUPP
    assert h.kpageflags(pfn) & KPF_HWPOISON


@pytest.mark.parametrize("policy", POLICIES)
def test_consumed_error_dirty_gmem_page(host_factory, policy):
    """The dirty mapped row of the table with a consumed #MC: AR to current with the page VA
    from kill_procs (forcekill: dirty).  Under v6.18 kill_me_now also runs, but it
    runs in the same task_work while that AR SIGBUS is still pending, and SIGBUS is
    a legacy signal: __send_signal_locked drops it (kernel/signal.c legacy_queue).
    The handler returns, the access retries and takes the hwpoison PTE: AR at the
    faulting byte."""
    fixed = policy == "mf-delayed-fix"
    h = host_factory(policy=policy)
    me, rec, _vm, _gfd, addr, _size = setup_gmem(h)
    target = addr + PAGE
    me.write(target, b"\xaa" * PAGE)                         # dirty
    pfn = me.pagemap(target).pfn
    h.hw_poison(pfn)
    got = access_expect_sigbus(rec, lambda: me.read(target + OFF, 8),
                               passthrough=(u.BUS_MCEERR_AR, u.SI_KERNEL), stop_after=2)
    # the first (page-VA) AR returns and the access retries; stop on the 2nd signal
    assert got[:1] == [(u.BUS_MCEERR_AR, target, 12)]
    assert got[-1] == (u.BUS_MCEERR_AR, target + OFF, 12)
    assert len(got) == 2, got
    assert dmesg_has(h, "mce: Memory error not recovered") == (not fixed)

