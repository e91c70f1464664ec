"""PR_MCE_KILL / PR_MCE_KILL_GET exactly as kernel/sys.c (the PR_MCE_KILL and PR_MCE_KILL_GET cases of prctl).

    case PR_MCE_KILL:
        if (arg4 | arg5) return -EINVAL;
        switch (arg2) {
        case PR_MCE_KILL_CLEAR: if (arg3 != 0) return -EINVAL;
                                current->flags &= ~PF_MCE_PROCESS; break;
        case PR_MCE_KILL_SET:   current->flags |= PF_MCE_PROCESS;
                                EARLY: |= PF_MCE_EARLY; LATE: &= ~PF_MCE_EARLY;
                                DEFAULT: &= ~(PF_MCE_EARLY|PF_MCE_PROCESS);
                                else return -EINVAL;      <- PF_MCE_PROCESS already set
        default: return -EINVAL; }
    case PR_MCE_KILL_GET:
        if (arg2 | arg3 | arg4 | arg5) return -EINVAL;
        PROCESS ? (EARLY ? EARLY : LATE) : DEFAULT

The setting is per thread (current->flags) and inherited at clone/fork.  The emulator
sets it on the real thread too, so the real prctl(PR_MCE_KILL_GET) must agree.
"""
import ctypes
import errno
import os
import select
import time

import pytest

import emu
from emu import uapi as u

KILL, GET = u.PR_MCE_KILL, u.PR_MCE_KILL_GET
CLEAR, SET = u.PR_MCE_KILL_CLEAR, u.PR_MCE_KILL_SET
EARLY, LATE, DEFAULT = u.PR_MCE_KILL_EARLY, u.PR_MCE_KILL_LATE, u.PR_MCE_KILL_DEFAULT

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


def real_get() -> int:
    """The real thread's setting: libc prctl(PR_MCE_KILL_GET, 0, 0, 0, 0)."""
    return _libc.prctl(34, 0, 0, 0, 0)


def get(task) -> int:
    return task.prctl(GET)


def einval(task, *args):
    with pytest.raises(OSError) as ei:
        task.prctl(*args)
    return ei.value.errno


class Event:
    def __init__(self):
        self.r, self.w = os.pipe()

    def set(self):
        os.write(self.w, b"x")

    def wait(self, task=None, timeout=10.0) -> bool:
        end = time.monotonic() + timeout
        while not select.select([self.r], [], [], 0)[0]:
            if time.monotonic() > end:
                return False
            if task is not None:
                task.idle(0.05)
            else:
                time.sleep(0.05)
        return True


def test_real_prctl_sanity():
    """The host kernel itself: PR_MCE_KILL_GET works unprivileged (no emulator)."""
    assert real_get() in (EARLY, LATE, DEFAULT)


# ------------------------------------------------------------------ values
def test_get_starts_default(host):
    me = emu.attach(host, name="qemu")
    assert get(me) == DEFAULT == 2
    assert real_get() == DEFAULT


@pytest.mark.parametrize("policy", [EARLY, LATE, DEFAULT])
def test_set_then_get(host, policy):
    me = emu.attach(host, name="qemu")
    assert me.prctl(KILL, SET, policy) == 0
    assert get(me) == policy
    assert real_get() == policy


def test_set_sequence_and_clear(host):
    me = emu.attach(host, name="qemu")
    seq = [(SET, EARLY, 1), (SET, LATE, 0), (SET, DEFAULT, 2), (SET, EARLY, 1),
           (CLEAR, 0, 2), (SET, LATE, 0), (CLEAR, 0, 2), (CLEAR, 0, 2), (SET, EARLY, 1),
           (SET, EARLY, 1), (SET, DEFAULT, 2)]
    for arg2, arg3, want in seq:
        assert me.prctl(KILL, arg2, arg3, 0, 0) == 0
        assert get(me) == want, (arg2, arg3)
        assert real_get() == want, (arg2, arg3)


def test_policies_visible_in_status(host):
    me = emu.attach(host, name="qemu")
    me.prctl(KILL, SET, EARLY)
    (proc,) = [p for p in host.status()["processes"] if p["tgid"] == me.tgid]
    assert [t["mce_kill"] for t in proc["threads"]] == ["EARLY"]


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("args", [
    (SET, EARLY, 1, 0), (SET, EARLY, 0, 1), (SET, LATE, 1, 1), (CLEAR, 0, 1, 0),
    (CLEAR, 0, 0, 1), (7, 0, 1, 0),                 # arg4|arg5 is checked first
    (SET, 99, 1, 0),                                # ... before the SET quirk can happen
    (SET, DEFAULT, 1 << 63, 0),
])
def test_arg4_arg5_nonzero_einval_unchanged(host, args):
    me = emu.attach(host, name="qemu")
    for before in (DEFAULT, EARLY, LATE):
        me.prctl(KILL, SET, before)
        assert einval(me, KILL, *args) == errno.EINVAL
        assert get(me) == before
        assert real_get() == before


@pytest.mark.parametrize("arg3", [1, 2, 3, 0xFFFF])
def test_clear_with_arg3_einval_unchanged(host, arg3):
    me = emu.attach(host, name="qemu")
    for before in (DEFAULT, EARLY, LATE):
        me.prctl(KILL, SET, before)
        assert einval(me, KILL, CLEAR, arg3) == errno.EINVAL
        assert get(me) == before


@pytest.mark.parametrize("arg2", [2, 3, 0x100, (1 << 64) - 1])
def test_bad_arg2_einval_unchanged(host, arg2):
    me = emu.attach(host, name="qemu")
    for before in (DEFAULT, EARLY, LATE):
        me.prctl(KILL, SET, before)
        assert einval(me, KILL, arg2, EARLY) == errno.EINVAL
        assert einval(me, KILL, arg2, 0) == errno.EINVAL
        assert get(me) == before


@pytest.mark.parametrize("args", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1),
                                  (EARLY, EARLY, 0, 0)])
def test_get_with_nonzero_args_einval(host, args):
    me = emu.attach(host, name="qemu")
    me.prctl(KILL, SET, EARLY)
    assert einval(me, GET, *args) == errno.EINVAL
    assert get(me) == EARLY


# ------------------------------------------------------------------ the SET/bad-arg3 quirk
@pytest.mark.parametrize("bad", [3, 4, 0x7F, (1 << 64) - 1])
def test_set_bad_arg3_from_default_becomes_late(host, bad):
    """SET sets PF_MCE_PROCESS before checking arg3: from DEFAULT, GET then says LATE."""
    me = emu.attach(host, name="qemu")
    assert get(me) == DEFAULT
    assert einval(me, KILL, SET, bad) == errno.EINVAL
    assert get(me) == LATE


@pytest.mark.parametrize("before", [EARLY, LATE])
def test_set_bad_arg3_from_explicit_keeps_value(host, before):
    me = emu.attach(host, name="qemu")
    me.prctl(KILL, SET, before)
    assert einval(me, KILL, SET, 3) == errno.EINVAL
    assert get(me) == before


def test_set_bad_arg3_after_clear_from_early_revives_early(host):
    """CLEAR clears only PF_MCE_PROCESS, so PF_MCE_EARLY survives it; a SET with a bad
    arg3 then sets PF_MCE_PROCESS again and GET reports EARLY."""
    me = emu.attach(host, name="qemu")
    me.prctl(KILL, SET, EARLY)
    me.prctl(KILL, CLEAR, 0)
    assert get(me) == DEFAULT
    assert einval(me, KILL, SET, 5) == errno.EINVAL
    assert get(me) == EARLY


def test_set_bad_arg3_after_clear_from_late_is_late(host):
    me = emu.attach(host, name="qemu")
    me.prctl(KILL, SET, LATE)
    me.prctl(KILL, CLEAR, 0)
    assert get(me) == DEFAULT
    assert einval(me, KILL, SET, 5) == errno.EINVAL
    assert get(me) == LATE


def test_set_bad_arg3_real_thread_agrees(host):
    """The real thread must carry the same flags as the emulated one; the real kernel
    applies the same quirk (PF_MCE_PROCESS set, then -EINVAL)."""
    me = emu.attach(host, name="qemu")
    # what the host kernel does with the quirk, on this very thread
    assert _libc.prctl(33, 1, 3, 0, 0) == -1 and ctypes.get_errno() == errno.EINVAL
    assert real_get() == LATE
    assert _libc.prctl(33, 1, 2, 0, 0) == 0 and real_get() == DEFAULT
    # now through the emulator
    assert einval(me, KILL, SET, 3) == errno.EINVAL
    assert get(me) == LATE
    assert real_get() == get(me)


def test_clear_after_early_real_thread_agrees(host):
    me = emu.attach(host, name="qemu")
    me.prctl(KILL, SET, EARLY)
    me.prctl(KILL, CLEAR, 0)
    assert get(me) == real_get() == DEFAULT
    einval(me, KILL, SET, 9)
    assert get(me) == EARLY
    assert real_get() == get(me)


# ------------------------------------------------------------------ per thread
def test_per_thread_clone_inherits_and_is_independent(host):
    me = emu.attach(host, name="qemu")
    me.prctl(KILL, SET, EARLY)
    changed, main_changed = Event(), Event()

    def vcpu(task):
        out = {"inherited": (get(task), real_get())}
        task.prctl(KILL, SET, LATE)
        out["after_set"] = (get(task), real_get())
        changed.set()
        assert main_changed.wait(task)
        out["after_main_changed"] = (get(task), real_get())
        return out

    th = me.clone(vcpu, name="vcpu0")
    assert changed.wait()
    assert get(me) == EARLY                     # the clone's SET did not touch main
    assert real_get() == EARLY
    st = {t["tid"]: t["mce_kill"] for p in host.status()["processes"]
          if p["tgid"] == me.tgid for t in p["threads"]}
    assert st == {me.tid: "EARLY", th.tid: "LATE"}
    me.prctl(KILL, SET, DEFAULT)
    main_changed.set()
    assert th.join(15) == 0
    assert th.result == {"inherited": (EARLY, EARLY), "after_set": (LATE, LATE),
                         "after_main_changed": (LATE, LATE)}
    assert get(me) == DEFAULT


@pytest.mark.parametrize("policy", [EARLY, LATE, DEFAULT])
def test_clone_inherits_setting_at_clone_time(host, policy):
    me = emu.attach(host, name="qemu")
    me.prctl(KILL, SET, policy)
    th = me.clone(lambda t: (get(t), real_get()), name="vcpu0")
    assert th.join(15) == 0
    assert th.result == (policy, policy)


def test_clone_inherits_quirk_state(host):
    """The flags are copied, not the last prctl: a thread whose EARLY bit survived a
    CLEAR passes it on, and a bad SET in the clone turns it back into EARLY."""
    me = emu.attach(host, name="qemu")
    me.prctl(KILL, SET, EARLY)
    me.prctl(KILL, CLEAR, 0)

    def vcpu(task):
        before = get(task)
        try:
            task.prctl(KILL, SET, 3)
            err = 0
        except OSError as e:
            err = e.errno
        return before, err, get(task)

    th = me.clone(vcpu, name="vcpu0")
    assert th.join(15) == 0
    assert th.result == (DEFAULT, errno.EINVAL, EARLY)
    assert get(me) == DEFAULT


def test_fork_inherits_and_is_independent(host):
    me = emu.attach(host, name="qemu")
    me.prctl(KILL, SET, LATE)

    def child(task):
        a = (get(task), real_get())
        task.prctl(KILL, SET, EARLY)
        return a, (get(task), real_get())

    ch = me.fork(child, name="child")
    assert ch.join(15) == 0
    assert ch.result == ((LATE, LATE), (EARLY, EARLY))
    assert get(me) == LATE
    assert real_get() == LATE


def test_many_threads_each_own_setting(host):
    me = emu.attach(host, name="qemu")
    want = [EARLY, LATE, DEFAULT, EARLY]
    done = Event()
    rfd, wfd = os.pipe()

    def vcpu(task, pol):
        task.prctl(KILL, SET, pol)
        os.write(wfd, b"r")
        assert done.wait(task)
        return get(task), real_get()

    ths = [me.clone(vcpu, p, name="vcpu%d" % i) for i, p in enumerate(want)]
    n = 0
    end = time.monotonic() + 10
    while n < len(ths):
        assert time.monotonic() < end
        if select.select([rfd], [], [], 0.1)[0]:
            n += len(os.read(rfd, 16))
    st = {t["tid"]: t["mce_kill"] for p in host.status()["processes"]
          if p["tgid"] == me.tgid for t in p["threads"]}
    names = {EARLY: "EARLY", LATE: "LATE", DEFAULT: "DEFAULT"}
    assert st == {me.tid: "DEFAULT", **{th.tid: names[p] for th, p in zip(ths, want, strict=True)}}
    assert get(me) == DEFAULT
    done.set()
    for th, p in zip(ths, want, strict=True):
        assert th.join(15) == 0
        assert th.result == (p, p)
