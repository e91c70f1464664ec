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


def corrupt_pfn_delayed(h, pfn: int, fixed: bool) -> None:
    """debugfs corrupt-pfn on a guest_memfd page (kvm_gmem_error_folio: MF_DELAYED):
    0 with the MF_DELAYED fix, EBUSY on v6.18 (taken as "Failed to punch page")."""
    if fixed:
        assert h.corrupt_pfn(pfn) == 0
    else:
        with pytest.raises(OSError) as ei:
            h.corrupt_pfn(pfn)
        assert ei.value.errno == errno.EBUSY


WAIT = 5.0          # upper bound for an asynchronous signal to show up


class Stop(Exception):
    """Raised by a SIGBUS handler to stop a faulting access (the Python counterpart
    of siglongjmp): sigbus_recorder()'s, recorder()'s for the codes in raise_on."""


def recorder(raise_on=()):
    """A SIGBUS handler that records (si_code, si_addr, si_addr_lsb); it raises Stop for
    the si_codes in raise_on (so a faulting access does not retry forever)."""
    import signal

    got = []

    def handler(signum, info):
        assert signum == signal.SIGBUS
        got.append((info.si_code, info.si_addr, info.si_addr_lsb))
        if info.si_code in raise_on:
            raise Stop(info)

    return got, handler


def record_sigbus(raise_on=()) -> list:
    """Install recorder(raise_on) as this emulated process's SIGBUS handler; returns
    the list it records (si_code, si_addr, si_addr_lsb) into."""
    import signal

    import emu

    got, handler = recorder(raise_on)
    emu.sigaction(signal.SIGBUS, handler)
    return got


def sigbus_of(got, fn) -> list:
    """Run an access that must fault, under a record_sigbus() recorder that raises
    Stop on it (a handler that returned would re-run the access: the fault again,
    forever); return the SIGBUS records it raised."""
    got.clear()
    with pytest.raises(Stop):
        fn()
    out = list(got)
    got.clear()
    return out


def wait_for(task, lst, n=1, timeout=WAIT):
    """Idle in the emulated task (its signals are delivered) until lst has n items."""
    end = time.monotonic() + timeout
    while len(lst) < n and time.monotonic() < end:
        task.idle(0.05)
    return lst


def dmesg_has(h, text) -> bool:
    """Some dmesg line contains text."""
    return any(text in line for line in h.dmesg())


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


def fork_with_log(me, fn, name: str, timeout: float = 30):
    """Fork an emulated process running fn(task, log_fd) (a VMM writing its log to a
    pipe); returns (its exit status, fn's return value or None, the log's lines)."""
    import os

    r, w = os.pipe()

    def main(task):
        os.close(r)
        return fn(task, w)

    th = me.fork(main, name=name)
    os.close(w)
    code = th.join(timeout)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    return code, th.result, data.decode().splitlines()
