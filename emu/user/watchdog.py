"""The worker dies with its kernel: a thread waiting on the supervisor's pidfd kills
this process if the supervisor dies (an orderly shutdown comes as ESHUTDOWN and a
doorbell instead).  A real thread cannot outlive its kernel; without this a worker
blocked in the fast path or idle would never notice."""
from __future__ import annotations

import os
import select
import signal
import threading


class Watchdog:
    """A thread that waits on the supervisor's pidfd: if the kernel dies (not an
    orderly shutdown, which comes as ESHUTDOWN and a doorbell), this process dies
    with it at once, whatever its main thread is doing (blocked in a call, idle,
    or spinning in the fast path).  stop() ends it and closes its fds."""

    def __init__(self, sup_pid: int, core):
        self._stop_r, self._stop_w = os.pipe()
        self._sup_pid = sup_pid
        try:
            self._pidfd = os.pidfd_open(sup_pid)
        except OSError:
            self._pidfd = -1                  # already gone: fire at once
        self._thread = threading.Thread(target=self._run, args=(sup_pid, core), daemon=True,
                                        name="emu-watchdog")
        self._thread.start()

    def _run(self, sup_pid: int, core) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        if self._pidfd >= 0:
            r, _, _ = select.select([self._pidfd, self._stop_r], [], [])
            if self._stop_r in r:
                return
        if core.shutdown:
            return
        self.die()

    def dead(self, timeout: float) -> bool:
        """Has the supervisor died (waiting up to `timeout` s: a connection sees
        EOF at exit_files(), a moment before the pidfd fires)?"""
        if self._pidfd < 0:
            return True
        return bool(select.select([self._pidfd], [], [], timeout)[0])

    def die(self) -> None:
        """The kernel died: so does this thread, at once, as its other threads."""
        try:
            os.write(2, b"emu: pid %d: the supervisor (pid %d) died; its threads die with it\n"
                     % (os.getpid(), self._sup_pid))
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    def stop(self) -> None:
        if self._stop_w < 0:
            return
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join()
        self.forget()

    def forget(self) -> None:
        """Close the fds (after a fork the thread is not ours to stop)."""
        for fd in (self._pidfd, self._stop_r, self._stop_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._pidfd = self._stop_r = self._stop_w = -1
