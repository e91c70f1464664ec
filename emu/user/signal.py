"""Signals on the worker side (kernel/signal.c, arch/x86/kernel/signal.c as a
process sees them): sigaction() for SIGBUS with SA_SIGINFO, the handler that turns
the core's mailbox records into SigInfo, delivery of the signals the kernel sent to
current on return from a system call, and the supervisor's doorbells (shutdown,
panic) that end whatever this thread is doing."""
from __future__ import annotations

import signal
from collections import namedtuple
from typing import TYPE_CHECKING

from .. import _core as C
from .. import uapi as u
from . import current
from .errors import SHUTDOWN_MSG, KernelGone, panicked

if TYPE_CHECKING:
    from .task import Task

SigInfo = namedtuple("SigInfo", "si_signo si_code si_errno si_pid si_addr si_addr_lsb ts_ns")
handlers: dict[int, object] = {}
delivered = 0            # SIGBUS deliveries handled in this process (KVM_RUN's signal_pending)


def dispatch(signum, frame):
    """The real SIGBUS handler: each record the core's recorder took (the siginfo the
    kernel filled) goes to the handler sigaction() installed, in order."""
    global delivered
    while True:
        rec = C.pop_siginfo()
        if rec is None:
            return
        delivered += 1
        h = handlers.get(signum)
        if callable(h):
            h(signum, SigInfo._make(rec))


def sigaction(sig: int, handler):
    """Install `handler(signum, info)` with SA_SIGINFO semantics: info carries
    si_code, si_addr, si_addr_lsb, si_pid as the kernel filled them.  SIG_DFL and
    SIG_IGN work as in sigaction(2).  Returns the previous handler."""
    if sig != signal.SIGBUS:
        raise OSError(u.EINVAL, "emu.sigaction handles SIGBUS; use signal.signal for others")
    prev = handlers.get(sig, signal.getsignal(sig))
    if handler in (signal.SIG_DFL, signal.SIG_IGN):
        handlers.pop(sig, None)
        signal.signal(sig, handler)
        return prev
    if not callable(handler):
        raise OSError(u.EINVAL, "handler must be callable, SIG_DFL or SIG_IGN")
    handlers[sig] = handler
    signal.signal(sig, dispatch)
    C.install_sigbus()
    return prev

def on_panic(signum, frame):
    """The supervisor's panic doorbell: whatever this thread is doing (a call, the
    fast path, idle, KVM_RUN) ends with KernelPanic."""
    t = current.task
    if t is None or not t.alive:
        return
    reason = t._core.panic_reason
    if reason is not None:                  # (a stale doorbell of another machine: ignore)
        raise panicked(reason)


def on_shutdown(signum, frame):
    """The supervisor's shutdown doorbell: the emulated thread is retired and
    the interrupted code gets ESHUTDOWN (a handler is Python's siglongjmp)."""
    t = current.task
    if t is not None and t.alive:
        t._retire(u.ESHUTDOWN, SHUTDOWN_MSG)
        raise KernelGone(u.ESHUTDOWN, SHUTDOWN_MSG + " (emu stop)")


def deliver(task: Task, sigs) -> None:
    """Signals the kernel sent to current, delivered on 'return to user'."""
    for signo, code, addr, lsb, force, queued in sigs:
        if force:
            blocked = signo in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            ignored = signal.getsignal(signo) == signal.SIG_IGN
            if blocked or ignored:                # force_sig_info_to_task
                handlers.pop(signo, None)
                task._core.set_exit_sig(task.slot, signo)
                signal.signal(signo, signal.SIG_DFL)
                if blocked:                       # a pending one may kill us right here
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signo])
        if not queued:                            # dropped: an identical one is pending
            continue
        if signal.getsignal(signo) == signal.SIG_DFL:
            task._core.set_exit_sig(task.slot, signo)
        C.raise_self(signo, code, addr, lsb)
