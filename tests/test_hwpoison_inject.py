"""Injection and unpoison rules beyond the upstream selftests (whose ports are the
tests/test_selftest_*.py files): a consumed error on an anonymous page, a second
failure on an already poisoned pfn, and the debugfs hwpoison/corrupt-pfn and
unpoison-pfn checks.  Kernel sources: mm/memory-failure.c (memory_failure,
kill_accessing_process, get_hwpoison_page, unpoison_memory, soft_offline_page),
mm/hwpoison-inject.c (hwpoison_inject), mm/madvise.c (madvise_inject_error),
arch/x86/kernel/cpu/mce/core.c (kill_me_maybe).

Default policy (mf-delayed-fix); nothing here depends on the guest_memfd policy.
"""
import errno
import signal

import pytest
from checks import Stop, dmesg_has

import emu
from emu import uapi as u

pytestmark = pytest.mark.both_backends      # conftest: on the Cython core and the reference CPU

PAGE = 4096
OFF = 0x123
KPF_HWPOISON = 1 << u.KPF_HWPOISON
EHWPOISON = 133
FREE_PFN = 16000          # 64M = 16384 frames; nothing allocates this high in a fresh host
RESERVED_PFN = 1
QUIET_WAIT = 0.3


class Rec:
    def __init__(self):
        self.got = []
        self.raising = False

    def __call__(self, signum, info):
        self.got.append(info)
        if self.raising:
            raise Stop()

    def take(self):
        out = [(i.si_code, i.si_addr, i.si_addr_lsb) for i in self.got]
        self.got.clear()
        return out


def sigbus_of(rec, fn):
    rec.got.clear()
    rec.raising = True
    try:
        with pytest.raises(Stop):
            fn()
    finally:
        rec.raising = False
    return rec.take()


def hc(h):
    return h.meminfo()["HardwareCorrupted"]


def anon_page(me):
    a = me.mmap(0, PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"\xce" * PAGE)                              # memset(addr, 0xce, page_size)
    pm = me.pagemap(a)
    assert pm.present
    return a, pm.pfn


def setup(h):
    me = emu.attach(h, name="selftest")
    rec = Rec()
    emu.sigaction(signal.SIGBUS, rec)
    return me, rec


# ------------------------------------------------------------------ consumed error
def test_anon_consumed_error(host):
    """A latent error consumed by a load (AR #MC in user mode): kill_me_maybe ->
    memory_failure(AR): AR to current with the page VA; memory_failure returns 0 so
    no kill_me_now.  Afterwards unpoison is disabled (hw_memory_failure)."""
    me, rec = setup(host)
    a, pfn = anon_page(me)
    st0 = host.mf_stats()
    host.hw_poison(pfn)
    assert sigbus_of(rec, lambda: me.read(a + OFF, 1)) == [(u.BUS_MCEERR_AR, a, 12)]
    assert sigbus_of(rec, lambda: me.read(a + OFF, 1)) == [(u.BUS_MCEERR_AR, a + OFF, 12)]
    assert host.mf_stats()["recovered"] == st0["recovered"] + 1
    assert not dmesg_has(host, "Memory error not recovered")
    with pytest.raises(OSError) as ei:
        host.unpoison_pfn(pfn)
    assert ei.value.errno == errno.EOPNOTSUPP
    assert dmesg_has(host, "Unpoison: %#x: disabled after HW memory failure" % pfn)


# ------------------------------------------------------------------ already poisoned
def _poisoned_anon(host):
    me, rec = setup(host)
    a, pfn = anon_page(me)
    me.madvise(a, PAGE, u.MADV_HWPOISON)
    assert [c for c, _, _ in rec.take()] == [u.BUS_MCEERR_AR]
    return me, rec, a, pfn


def test_already_poisoned_debugfs(host):
    """memory_failure(): TestSetPageHWPoison finds the flag set, so a second, non-AR
    injection returns -EHWPOISON, no signal, and (Kyle Meyer, "Fix redundant updates
    for already poisoned pages", 2025) neither num_poisoned_pages nor the per-node
    stats change."""
    me, rec, a, pfn = _poisoned_anon(host)
    hc0, st0 = hc(host), host.mf_stats()
    with pytest.raises(OSError) as ei:
        host.corrupt_pfn(pfn)
    assert ei.value.errno == EHWPOISON
    assert hc(host) == hc0
    assert host.mf_stats() == st0
    assert dmesg_has(host, "Memory failure: %#x: recovery action for already poisoned page: Failed"
                     % pfn)
    me.idle(QUIET_WAIT)
    assert rec.take() == []
    assert host.unpoison_pfn(pfn) == 0                      # still software-only


def test_already_poisoned_second_madvise(host):
    """A second MADV_HWPOISON on the same address: madvise_inject_error's
    get_user_pages_fast(start, 1, 0, ...) faults on the hwpoison entry,
    VM_FAULT_HWPOISON, and vm_fault_to_errno() without FOLL_HWPOISON gives -EFAULT;
    memory_failure is never reached, GUP sends no signal, nothing is counted."""
    me, rec, a, pfn = _poisoned_anon(host)
    hc0, st0 = hc(host), host.mf_stats()
    with pytest.raises(OSError) as ei:
        me.madvise(a, PAGE, u.MADV_HWPOISON)
    assert ei.value.errno == errno.EFAULT
    assert rec.take() == []
    assert hc(host) == hc0
    assert host.mf_stats() == st0


def test_already_poisoned_madvise_other_mapping(host):
    """Two mappings of one memfd page in one process.  The first MADV_HWPOISON gets
    AR to current (one to_kill entry per covering VMA, both for current: the second
    SIGBUS is merged into the pending one), and unmaps both.  The second madvise,
    through the other mapping (never faulted), fails in GUP with EFAULT."""
    me, rec = setup(host)
    fd = me.memfd_create("shm")
    me.ftruncate(fd, PAGE)
    a = me.mmap(0, PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
    b = me.mmap(0, PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
    me.write(a, b"\xce" * PAGE)
    pfn = me.pagemap(a).pfn
    me.madvise(a, PAGE, u.MADV_HWPOISON)
    got = rec.take()
    assert len(got) == 1 and got[0][0] == u.BUS_MCEERR_AR and got[0][1] in (a, b)
    hc0, st0 = hc(host), host.mf_stats()
    with pytest.raises(OSError) as ei:
        me.madvise(b, PAGE, u.MADV_HWPOISON)
    assert ei.value.errno == errno.EFAULT
    assert rec.take() == []
    assert hc(host) == hc0 and host.mf_stats() == st0
    # both addresses fault with AR at the faulting byte
    assert sigbus_of(rec, lambda: me.read(b + OFF, 1)) == [(u.BUS_MCEERR_AR, b + OFF, 12)]
    assert sigbus_of(rec, lambda: me.read(a + OFF, 1)) == [(u.BUS_MCEERR_AR, a + OFF, 12)]
    # has a mapping (the memfd's page cache): EBUSY until the hole is punched
    me.munmap(a, PAGE)
    me.munmap(b, PAGE)
    with pytest.raises(OSError) as ei:
        host.unpoison_pfn(pfn)
    assert ei.value.errno == errno.EBUSY
    me.fallocate(fd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 0, PAGE)
    assert host.unpoison_pfn(pfn) == 0


def test_already_poisoned_hw_consumption(host):
    """A real latent error in a frame that is already software-poisoned and unmapped
    (hwpoison entry): no translation reaches the frame, so there is no #MC; the
    access takes the fault path: SIGBUS AR at the faulting byte, nothing counted."""
    me, rec, a, pfn = _poisoned_anon(host)
    hc0, st0 = hc(host), host.mf_stats()
    host.hw_poison(pfn)
    assert sigbus_of(rec, lambda: me.read(a + OFF, 1)) == [(u.BUS_MCEERR_AR, a + OFF, 12)]
    assert hc(host) == hc0 and host.mf_stats() == st0
    assert not dmesg_has(host, "mce: Uncorrected hardware memory error")


def test_already_poisoned_hw_detect(host):
    """A deferred (non-AR) hardware report of an already poisoned pfn: -EHWPOISON,
    no signal, nothing counted; but it is a hardware failure, so unpoison is
    disabled from now on (EOPNOTSUPP), for every pfn."""
    me, rec, a, pfn = _poisoned_anon(host)
    assert host.corrupt_pfn(FREE_PFN) == 0
    hc0, st0 = hc(host), host.mf_stats()
    assert host.hw_detect(pfn) == -EHWPOISON
    assert hc(host) == hc0 and host.mf_stats() == st0
    me.idle(QUIET_WAIT)
    assert rec.take() == []
    for p in (pfn, FREE_PFN):
        with pytest.raises(OSError) as ei:
            host.unpoison_pfn(p)
        assert ei.value.errno == errno.EOPNOTSUPP
    assert hc(host) == hc0


# ------------------------------------------------------------------ unpoison / debugfs rules
def test_unpoison_invalid_pfn(host):
    """unpoison_memory (mm/memory-failure.c): !pfn_valid(pfn) -> -ENXIO (the -EIO
    for pfn_to_online_page() == NULL is soft_offline_page's)."""
    for pfn in (16384, 1 << 40):
        with pytest.raises(OSError) as ei:
            host.unpoison_pfn(pfn)
        assert ei.value.errno == errno.ENXIO


def test_corrupt_invalid_pfn(host):
    """hwpoison_inject: !pfn_valid(pfn) -> -ENXIO, nothing counted."""
    st0 = host.mf_stats()
    with pytest.raises(OSError) as ei:
        host.corrupt_pfn(16384)
    assert ei.value.errno == errno.ENXIO
    assert host.mf_stats() == st0


def test_unpoison_not_poisoned(host):
    """unpoison_memory: !PageHWPoison -> "page was already unpoisoned", -EBUSY."""
    me, _rec = setup(host)
    a, pfn = anon_page(me)
    for p in (FREE_PFN, pfn):                 # a free page, an in-use mapped page
        with pytest.raises(OSError) as ei:
            host.unpoison_pfn(p)
        assert ei.value.errno == errno.EBUSY
    assert dmesg_has(host, "Unpoison: %#x: page was already unpoisoned" % FREE_PFN)
    assert me.read(a, 4) == b"\xce" * 4


def test_corrupt_free_page(host):
    """memory_failure on a free page: get_hwpoison_page() == 0 and is_free_buddy_page,
    take_page_off_buddy -> "free buddy page: Recovered"; unpoison_memory puts it back
    (put_page_back_buddy)."""
    assert not host.kpageflags(FREE_PFN) & (1 << u.KPF_MMAP | 1 << u.KPF_LRU | KPF_HWPOISON)
    hc0, st0 = hc(host), host.mf_stats()
    assert host.corrupt_pfn(FREE_PFN) == 0
    st = host.mf_stats()
    assert st["recovered"] == st0["recovered"] + 1
    assert st["total"] == st0["total"] + 1
    assert hc(host) == hc0 + 4
    assert host.kpageflags(FREE_PFN) & KPF_HWPOISON
    assert dmesg_has(host, "Injecting memory failure at pfn %#x" % FREE_PFN)
    assert dmesg_has(host, "Memory failure: %#x: recovery action for free buddy page: Recovered"
                     % FREE_PFN)
    assert host.unpoison_pfn(FREE_PFN) == 0
    assert hc(host) == hc0
    assert not host.kpageflags(FREE_PFN) & KPF_HWPOISON
    # back in the allocator: poisoning it again works the same way
    assert host.corrupt_pfn(FREE_PFN) == 0
    assert host.unpoison_pfn(FREE_PFN) == 0


def test_corrupt_reserved_page(host):
    """A reserved kernel page is not HWPoisonHandlable: get_any_page gives -EIO
    ("unhandlable page."), action_result(GET_HWPOISON, IGNORED) -> -EBUSY.  The
    flag was already set by TestSetPageHWPoison and the page is counted."""
    hc0, st0 = hc(host), host.mf_stats()
    with pytest.raises(OSError) as ei:
        host.corrupt_pfn(RESERVED_PFN)
    assert ei.value.errno == errno.EBUSY
    assert dmesg_has(host, "Memory failure: %#x: unhandlable page." % RESERVED_PFN)
    assert dmesg_has(host, "Memory failure: %#x: recovery action for get hwpoison page: Ignored"
                     % RESERVED_PFN)
    st = host.mf_stats()
    assert st["ignored"] == st0["ignored"] + 1 and st["total"] == st0["total"] + 1
    assert hc(host) == hc0 + 4
    assert host.kpageflags(RESERVED_PFN) & KPF_HWPOISON
    # the flag is set: a second injection takes the already-poisoned path
    with pytest.raises(OSError) as ei:
        host.corrupt_pfn(RESERVED_PFN)
    assert ei.value.errno == EHWPOISON
    # unpoison refuses reserved pages
    with pytest.raises(OSError) as ei:
        host.unpoison_pfn(RESERVED_PFN)
    assert ei.value.errno == errno.EBUSY
    assert hc(host) == hc0 + 4


# ------------------------------------------------------------------ soft offline
def test_soft_offline_disabled_by_sysctl(host):
    """soft_offline_page: vm.enable_soft_offline 0 -> -EOPNOTSUPP."""
    me = emu.attach(host, name="soft")
    host.sysctl("vm.enable_soft_offline", 0)
    a = me.mmap(0, 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"x")
    with pytest.raises(OSError) as ei:
        me.madvise(a, 4096, u.MADV_SOFT_OFFLINE)
    assert ei.value.errno == u.EOPNOTSUPP


# ------------------------------------------------------------------ pre-6.11 madvise
def test_pre611_madvise_default_thread_follows_the_sysctl(host_factory):
    """Before MF_ACTION_REQUIRED (pre-6.11 madvise, emu's madvise_action_required=False)
    the caller is picked like any mapper: find_early_kill_thread() takes a thread
    without PF_MCE_PROCESS (PR_MCE_KILL_DEFAULT) when vm.memory_failure_early_kill
    is 1, so the dirty page's injection sends it an AO; the write then gets AR."""
    host = host_factory(madvise_action_required=False)
    me, rec = setup(host)
    host.sysctl("vm.memory_failure_early_kill", 1)
    assert me.prctl(u.PR_MCE_KILL_GET) == u.PR_MCE_KILL_DEFAULT
    a, _pfn = anon_page(me)
    me.madvise(a, PAGE, u.MADV_HWPOISON)
    assert rec.take() == [(u.BUS_MCEERR_AO, a, 12)]
    assert sigbus_of(rec, lambda: me.write(a + OFF, b"x")) == [(u.BUS_MCEERR_AR, a + OFF, 12)]
