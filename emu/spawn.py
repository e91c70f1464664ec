"""A private supervisor: forked by its owner (a test, a script), serving only it.

Started as if exec'd: the child keeps none of the caller's fds or logging
handlers, runs the supervisor (emu.daemon.run) and reports "ready <socket>" or
"error ..." on a pipe the caller waits on.
"""
from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import sys
import traceback

from . import shm
from .daemon import run


def _private_child(keep: int) -> None:
    """Right after the fork: hold none of the caller's fds (a parent waiting for
    EOF on a pipe must not wait for us), and none of its Python state that would
    use them.  As if the supervisor were exec'd: an fd the caller did not make
    inheritable (PEP 446: Python's default, O_CLOEXEC) is closed; stdio and the
    ones it did (os.set_inheritable) stay.  Only this thread survived the fork;
    it takes no lock another thread of the caller could hold but the
    interpreter's own (reset at fork) and logging's (reset at fork too)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                if not os.get_inheritable(fd):
                    os.close(fd)
            except OSError:                 # the listing's own fd, gone already
                pass
    gc.freeze()                  # the caller's objects are never finalized here: their
    #                              fd numbers are closed and may be reused by ours
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    for lg in [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]:
        lg.handlers = []             # the caller's handlers write to closed fds: warnings
    #                                  go to stderr (logging.lastResort)
    if faulthandler.is_enabled():
        faulthandler.enable(file=2)
    from .user import mm as user_mm
    user_mm.cores.clear()            # the caller's mappings of other machines


def _private_log() -> None:
    """A private supervisor logs to its owner's stderr, whatever handlers the owner
    had configured (they were forked along and may keep records in memory)."""
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("emu-daemon[%d]: %%(message)s" % os.getpid()))
    lg = logging.getLogger("emu")
    lg.handlers[:] = [h]
    lg.propagate = False
    lg.setLevel(logging.WARNING)


def spawn_private(cfg: dict) -> tuple[int, str]:
    """Fork a private supervisor owned by this process; returns (pid, socket)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # the supervisor
        try:
            _private_child(keep=w)
            os.setpgid(0, 0)
            for s in (signal.SIGBUS, signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(s, signal.SIG_DFL)
            path = os.path.join(shm.runtime_dir(), "priv-%d.sock" % os.getpid())
            _private_log()
            run(cfg, path, owner_pid=os.getppid(), ready_fd=w)
            code = 0
        except SystemExit as e:
            os.write(w, ("error %s\n" % e).encode())
            code = 1
        except BaseException as e:
            try:
                os.write(w, ("error %s: %s\n" % (type(e).__name__, e)).encode())
            except OSError:                       # after "ready": the caller's stderr
                traceback.print_exc()             # is its only trace (no log file)
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        line = f.readline().decode().strip()
    if not line.startswith("ready "):
        os.waitpid(pid, 0)
        raise RuntimeError("supervisor failed to start: %s" % (line or "no output"))
    return pid, line[6:]

