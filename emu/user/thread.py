"""New threads and processes (kernel/fork.c as a process sees clone() and fork()):
each is a forked worker that attaches as a thread of the caller's process (clone)
or as a new process (fork); Thread is the handle its creator joins.  Also what a
forked child must drop of its parent (connections, the watchdog, `current`)."""
from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import traceback
from typing import TYPE_CHECKING

from .. import _core as C
from .. import uapi as u
from . import current
from . import signal as usignal
from .channel import channels
from .errors import KernelGone, KernelPanic

if TYPE_CHECKING:
    from .task import Task

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
PR_SET_PDEATHSIG = 1


def real_prctl(*a) -> int:
    """prctl(2) of this real process (libc), beside the emulated one."""
    a = list(a) + [0] * (5 - len(a))
    r = _libc.prctl(*a)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


class Thread:
    """Handle of a clone()d thread or fork()ed process: join() gives the exit status
    as multiprocessing does (0, n, -signum); .result is fn's return value."""

    def __init__(self, pid: int, rfd: int, name: str, kind: str, parent: Task | None = None):
        self.pid, self.name, self.kind = pid, name, kind
        self._parent = parent
        self._rfd = rfd
        self._buf = b""
        self.exitcode = None
        self.result = None

    @property
    def tid(self) -> int:
        return self.pid

    def _drain(self, timeout):
        while self._rfd is not None:
            r, _, _ = select.select([self._rfd], [], [], timeout)
            if not r:
                return False
            chunk = os.read(self._rfd, 65536)
            if not chunk:
                os.close(self._rfd)
                self._rfd = None
                break
            self._buf += chunk
        return True

    def _reap(self) -> None:
        """The child has exited (seen with WNOWAIT): let the kernel settle its death
        from the zombie's status first, then reap it."""
        p = self._parent
        if p is not None and p.alive and current.task is p:
            try:
                p.ch.call("reap", tid=self.pid)
            except OSError:
                pass
        _, status = os.waitpid(self.pid, 0)
        self.exitcode = os.waitstatus_to_exitcode(status)
        self._drain(0)
        if self._buf:
            try:
                self.result = pickle.loads(self._buf)
            except Exception:
                self.result = None

    def join(self, timeout: float | None = None):
        if self.exitcode is not None:
            return self.exitcode
        if not self._drain(timeout):
            return None
        os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        self._reap()
        return self.exitcode

    def is_alive(self) -> bool:
        if self.exitcode is not None:
            return False
        if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
            return True
        self._reap()
        return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)


def spawn(parent: Task, kind: str, fn, args, name: str) -> Thread:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            import faulthandler

            if faulthandler.is_enabled():   # dying of SIGBUS/SIGSEGV is this worker's job here
                faulthandler.disable()      # (this restores the handlers saved at enable():
                if usignal.handlers.get(signal.SIGBUS):    # put back the inherited SIGBUS recorder)
                    signal.signal(signal.SIGBUS, usignal.dispatch)
                    C.install_sigbus()
            if kind == "clone":
                real_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            t = type(parent)(parent.host, kind=kind, parent=parent.tid, name=name)
            os.write(w, b"R")
            res = fn(t, *args)
            code = 0
            try:
                payload = pickle.dumps(res)
            except Exception:
                payload = pickle.dumps(None)
            t.exit()
            try:
                write_all(w, payload)
            except BrokenPipeError:
                pass                        # the parent is gone: nobody reads the result
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if current.task is not None:
                current.task.exit()
        except KernelGone as e:             # the kernel stopped under it: one line, no traceback
            os.write(2, ("emu: %s (pid %d): %s\n" % (name, os.getpid(), e.strerror)).encode())
            code = 1
        except KernelPanic as e:            # the same, for a kernel that panicked
            os.write(2, ("emu: %s (pid %d): %s\n" % (name, os.getpid(), e)).encode())
            code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
            if current.task is not None:
                current.task.exit()
        os._exit(code)
    os.close(w)
    ready = os.read(r, 1)
    th = Thread(pid, r, name, kind, parent)
    if ready != b"R":
        th.join()
        raise OSError(u.ECHILD, "%s: the new %s died before it attached (exit %s)"
                      % (name, "thread" if kind == "clone" else "process", th.exitcode))
    return th


def write_all(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def after_fork_child() -> None:
    # A forked child must not hold its parent's connections: the supervisor sees a
    # thread's death as EOF on its socket.
    for ch in list(channels):
        if ch.pid != os.getpid():
            try:
                os.close(ch.sock.detach())
            except OSError:
                pass
    C.unbind_self()
    t = current.task
    if t is not None and t._wd is not None:
        t._wd.forget()                  # its thread did not survive the fork; its fds did
    current.task = None


os.register_at_fork(after_in_child=after_fork_child)
