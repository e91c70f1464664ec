"""What a call on the worker side raises besides OSError(errno): the kernel's BUG()
and panic(), and the kernel having gone away (shutdown, death, this thread's exit)."""
from __future__ import annotations

import os

from .. import uapi as u
from . import current


class EmulatorBug(RuntimeError):
    """The emulated kernel hit an unexpected exception (its BUG()): not an errno, not
    bad input.  The message says where; the traceback is in dmesg and the daemon log."""

    def __init__(self, desc: str, where: str | None = None):
        super().__init__(desc)
        self.where = where


class KernelPanic(Exception):
    """The emulated kernel panicked (kernel/panic.c panic()): the machine has stopped.
    `reason` is the panic string ("Fatal machine check", ...).  Every attached thread
    gets it, at its next call or at once wherever it runs (a doorbell), and is retired;
    the host can still read the machine (dmesg, status, meminfo, ...: a crash dump)
    until it is stopped, and gets this for anything that would change it."""

    def __init__(self, reason: str | None):
        super().__init__("Kernel panic - not syncing: %s" % reason)
        self.reason = reason


def from_reply(err: dict, path: str | None = None) -> Exception:
    """The exception an error reply from the supervisor at `path` stands for:
    OSError(errno), EmulatorBug or KernelPanic (this process's emulated thread on
    that machine is then retired)."""
    if err.get("class") == "EmulatorBug":
        return EmulatorBug(err.get("desc") or "emulator bug", err.get("where"))
    if err.get("class") == "KernelPanic":
        return panicked(err.get("reason"), path)
    e = err.get("errno", u.EINVAL)
    desc = err.get("desc") or os.strerror(e)
    return OSError(e, desc)


class KernelGone(OSError):
    """The emulated kernel is no longer there for this thread: ESHUTDOWN after an
    orderly shutdown (`emu stop`, Host.close), ESRCH if the supervisor died or the
    thread exited.  (A subclass, so OSError(ESHUTDOWN) does not turn into
    BrokenPipeError; `e.errno` is what to test.)"""


SHUTDOWN_MSG = "the emulated kernel has shut down"
DIED_MSG = "the supervisor has gone away"
EXITED_MSG = "this emulated thread has exited"


class Gone:
    """Stands in for the channel and the CPU of a retired thread: any use is a
    clean OSError (KernelPanic after a panic), and nothing can reach the memory
    that was unmapped."""
    __slots__ = ("errno", "why", "panic")

    def __init__(self, err: int, why: str, panic: str | None = None):
        self.errno, self.why, self.panic = err, why, panic

    def _error(self) -> Exception:
        if self.panic is not None:
            return KernelPanic(self.panic)
        return KernelGone(self.errno, self.why)

    def __getattr__(self, name):
        raise self._error()

    def __call__(self, *a, **k):
        raise self._error()

    def close(self) -> None:
        pass


def panicked(reason: str | None, path: str | None = None) -> KernelPanic:
    """This process heard that the machine at `path` panicked: its emulated thread
    there is retired at once (its CPU stops: memory unmapped, every later use
    KernelPanic), so a later doorbell finds nothing to do.  Returns the error."""
    t = current.task
    if t is not None and t.alive and (path is None or t.host.path == path):
        t._retire(u.EIO, "the emulated kernel panicked", panic=reason)
    return KernelPanic(reason)

