"""Checks the error-path tests share: an errno raised, a state that settled."""
import errno
import time

import pytest


def settled(host, timeout: float = 10.0) -> dict:
    """host.status() once two consecutive snapshots agree (deferred frees done)."""
    end = time.monotonic() + timeout
    prev = host.status()
    while True:
        time.sleep(0.05)
        cur = host.status()
        if cur == prev or time.monotonic() > end:
            return cur
        prev = cur


def raises_errno(err: int, fn, *args) -> OSError:
    """fn(*args) raises OSError(err) with a one-line message."""
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == err, "expected %s, got %r" % (errno.errorcode[err], ei.value)
    assert "\n" not in str(ei.value)
    return ei.value


class Stop(Exception):
    """Raised by sigbus_recorder()'s handler: ends the access (siglongjmp)."""


def sigbus_recorder() -> list:
    """Install a SIGBUS handler in this emulated process that records (si_code,
    si_addr, si_addr_lsb) and raises Stop; returns the list it appends to."""
    import signal

    import emu

    got = []

    def h(signum, info):
        got.append((info.si_code, info.si_addr, info.si_addr_lsb))
        raise Stop

    emu.sigaction(signal.SIGBUS, h)
    return got
