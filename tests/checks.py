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


def lines_in_order(lines, wanted) -> bool:
    """Each wanted text is in one of the lines (dmesg), in this order."""
    i = 0
    for line in lines:
        if i < len(wanted) and wanted[i] in line:
            i += 1
    return i == len(wanted)


class Event:
    """A one-shot flag shared by forked processes (a pipe byte never consumed)."""

    def __init__(self):
        import os

        self.r, self.w = os.pipe()

    def set(self):
        import os

        os.write(self.w, b"x")

    def wait(self, task, timeout: float = 10.0) -> bool:
        """Wait in the emulated task (task.idle, so its signals are delivered)."""
        import select

        end = time.monotonic() + timeout
        while not select.select([self.r], [], [], 0)[0]:
            if time.monotonic() > end:
                return False
            task.idle(0.05)
        return True
