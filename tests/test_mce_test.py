"""MADV_HWPOISON before and after MF_ACTION_REQUIRED (~6.11), and mce-test's tprctl.

Since Jane Chu's patch madvise_inject_error() passes MF_ACTION_REQUIRED, so the
caller is `current` of an action-required failure: AR at injection whatever its
PR_MCE_KILL.  Before it, the caller was treated like any early-kill candidate:
AO at injection if EARLY, nothing if LATE (AR only on the next access).
"""
import signal

import pytest

import emu
from emu import uapi as u

PAGE = 4096


def _dirty_shared_page(me):
    fd = me.memfd_create("tprctl")
    me.ftruncate(fd, PAGE)
    a = me.mmap(0, PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
    me.write(a, b"\x5a" * PAGE)
    return a


class Unwind(Exception):
    pass


def _run(host, policy, expect_ao=False):
    me = emu.attach(host, name="tprctl")
    got = []

    def h(signum, info):
        got.append((info.si_code, info.si_addr, info.si_addr_lsb))
        if info.si_code == u.BUS_MCEERR_AR:
            raise Unwind

    emu.sigaction(signal.SIGBUS, h)
    assert me.prctl(u.PR_MCE_KILL_GET) == u.PR_MCE_KILL_DEFAULT
    if policy is not None:
        me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, policy)
    a = _dirty_shared_page(me)
    try:
        me.madvise(a, PAGE, u.MADV_HWPOISON)
    except Unwind:
        pass
    at_injection = list(got)
    got.clear()
    for _ in range(200):                        # an AO arrives asynchronously
        if at_injection or not expect_ao:
            break
        me.idle(0.01)
        at_injection = list(got)
        got.clear()
    with pytest.raises(Unwind):
        me.read(a + 0x10, 1)
    return a, at_injection, got


@pytest.mark.parametrize("policy", [u.PR_MCE_KILL_LATE, u.PR_MCE_KILL_EARLY, None])
def test_new_madvise_is_action_required_for_the_caller(host_factory, policy):
    a, at_injection, later = _run(host_factory(), policy)
    assert at_injection == [(u.BUS_MCEERR_AR, a, 12)]
    assert later == [(u.BUS_MCEERR_AR, a + 0x10, 12)]


def test_tprctl_late_signals_at_access_only(host_factory):
    a, at_injection, later = _run(host_factory(madvise_action_required=False), u.PR_MCE_KILL_LATE)
    assert at_injection == []
    assert later == [(u.BUS_MCEERR_AR, a + 0x10, 12)]


def test_tprctl_early_signals_at_injection(host_factory):
    a, at_injection, later = _run(host_factory(madvise_action_required=False), u.PR_MCE_KILL_EARLY,
                                    expect_ao=True)
    assert at_injection == [(u.BUS_MCEERR_AO, a, 12)]
    assert later == [(u.BUS_MCEERR_AR, a + 0x10, 12)]


def test_tprctl_default_follows_the_sysctl(host_factory):
    host = host_factory(madvise_action_required=False)
    host.sysctl("vm.memory_failure_early_kill", 1)
    a, at_injection, later = _run(host, None, expect_ao=True)
    assert at_injection == [(u.BUS_MCEERR_AO, a, 12)]
    assert later == [(u.BUS_MCEERR_AR, a + 0x10, 12)]
