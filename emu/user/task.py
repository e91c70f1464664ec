"""The emulated thread: this process as one thread of an emulated process (`me` in
the docs; the kernel's task_struct is emu.kernel.sched.Task).  Its system calls are
grouped as the kernel groups them, each group a mixin in its own module: memory
(mm.py), files (fs.py), KVM (kvm.py), SysV shared memory (ipc.py); process control (prctl, exit, clone, fork)
is here."""
from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

from .. import _core as C
from .. import uapi as u
from . import current, mm
from . import signal as usignal
from .channel import Channel
from .errors import EXITED_MSG, SHUTDOWN_MSG, Gone, KernelGone, from_reply
from .fs import FileCalls
from .ipc import IpcCalls
from .kvm import KvmCalls
from .mm import MmCalls
from .thread import Thread, real_prctl, spawn
from .watchdog import Watchdog

if TYPE_CHECKING:
    from .host import Host


class Task(MmCalls, FileCalls, KvmCalls, IpcCalls):
    """This process as one emulated thread (`me` in the docs)."""

    def __init__(self, host: Host, kind: str = "process", parent: int | None = None,
                 name: str = "emu"):
        t = current.task
        if t is not None and t.alive:
            raise OSError(u.EBUSY, "this process is already an emulated thread")
        self.host = host
        self.alive = False
        self._wd = None
        self._pid = os.getpid()
        self.ch = Channel(host.path)
        try:
            info = self.ch.call("attach", kind=kind, parent=parent, comm=name)
        except BaseException:
            self.ch.close()
            raise
        self.ch.spin_ns = self.ch.halt_poll_ns
        self.tid, self.tgid, self.slot, self.pgd = info["tid"], info["tgid"], info["slot"], info["pgd"]
        self.name = name
        self._names = tuple(info["segments"])
        host._segments.add(self._names)
        self._core = mm.core_for(self._names)
        self._core.bind_self(self.slot)
        self._rd, self._wr, self._bt = mm.backend(self._core)
        C.install_group_exit(info["group_exit_sig"])
        self._group_exit_sig = info["group_exit_sig"]
        for key, fn in (("shutdown_sig", usignal.on_shutdown), ("panic_sig", usignal.on_panic)):
            sig = info.get(key)
            if sig:
                try:
                    signal.signal(sig, fn)
                except ValueError:          # not the main thread: the grace period's kill
                    pass
        self._wd = Watchdog(info["supervisor_pid"], self._core)
        self.alive = True
        current.task = self

    def __repr__(self):
        return "<emu.Task %s tid=%d tgid=%d>" % (self.name, self.tid, self.tgid)

    # ---- system calls ----
    def _call(self, _cmd: str, **args):
        try:
            rep = self.ch.request(_cmd, args)
        except KernelGone as e:
            raise self._gone(e) from None
        sigs = rep.get("sigs")
        if sigs:
            usignal.deliver(self, sigs)
        if "error" in rep:
            raise from_reply(rep["error"], self.host.path)
        return rep.get("return")

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
        try:
            return self._call("prctl", option=option, arg2=arg2, arg3=arg3, arg4=arg4, arg5=arg5)
        finally:
            if option == u.PR_MCE_KILL:
                # the real thread gets it too, quirks included (a SET with a bad
                # arg3 sets PF_MCE_PROCESS before it fails)
                try:
                    real_prctl(option, arg2, arg3, arg4, arg5)
                except OSError:
                    pass

    def idle(self, timeout: float) -> None:
        """Sleep, running signal handlers as they arrive (a handler may raise)."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    # ---- threads and processes (thread.py) ----
    def clone(self, fn, *args, name: str | None = None) -> Thread:
        """A new thread of this process (a forked worker sharing the mm)."""
        return spawn(self, "clone", fn, args, name or "%s-thread" % self.name)

    def fork(self, fn, *args, name: str | None = None) -> Thread:
        """A new process with a copy of this one's mappings and fd table."""
        return spawn(self, "fork", fn, args, name or self.name)

    # ---- exit ----
    def exit(self) -> None:
        """A clean thread exit: the kernel retires this thread before exit()
        returns (as a thread's exit; the main thread's takes its process with
        it, exit_group).  This process may attach again afterwards."""
        if not self.alive:
            return
        if os.getpid() != self._pid:
            raise OSError(u.EBADF, "this emulated thread belongs to another process")
        try:
            self.ch.call("exit")
        except KernelGone as e:
            self._gone(e)                   # the kernel is gone: so is this thread
        finally:
            self._retire(u.ESRCH, EXITED_MSG)

    def pthread_exit(self) -> None:
        """This thread exits alone, the main thread too (SYS_exit, as glibc's
        pthread_exit does): a main thread that leaves others running stays a zombie
        group leader with no mm until the last of them exits (memory failure then
        skips the process: task_early_kill's !tsk->mm).  Its pid stays taken, so
        this process cannot attach again while the group lives."""
        if not self.alive:
            return
        if os.getpid() != self._pid:
            raise OSError(u.EBADF, "this emulated thread belongs to another process")
        try:
            self.ch.call("exit", thread=True)
        except KernelGone as e:
            self._gone(e)
        finally:
            self._retire(u.ESRCH, EXITED_MSG)

    def _gone(self, e: KernelGone) -> KernelGone:
        """The supervisor closed this thread's connection: retire it here too.
        If the supervisor died, this thread dies with it, as the watchdog would
        make it a moment later (whatever the race, the same outcome)."""
        if e.errno == u.ESRCH and self.alive:
            if self._core.shutdown:
                e = KernelGone(u.ESHUTDOWN, SHUTDOWN_MSG)
            elif self._wd is not None and self._wd.dead(1.0):
                self._wd.die()
            else:
                e = KernelGone(u.ESRCH, "the supervisor closed this thread's connection")
        if self.alive:
            self._retire(e.errno, e.strerror)
        return e

    def _retire(self, err: int, why: str, panic: str | None = None) -> None:
        """Forget the kernel's thread in this process: the watchdog stops and its
        fds close, signals no longer reach the old slot, the channel closes, and
        the memory is unmapped once nothing refers to it; later use of this
        handle is a clean OSError(err), or KernelPanic(panic) after a panic."""
        if not self.alive:
            return
        self.alive = False
        if current.task is self:
            current.task = None
            C.unbind_self()
            try:                            # a late group-exit doorbell: no longer ours
                signal.signal(self._group_exit_sig, signal.SIG_IGN)
            except ValueError:
                pass
        wd, self._wd = self._wd, None
        if wd is not None:
            wd.stop()
        ch, self.ch = self.ch, Gone(err, why, panic)
        ch.close()
        self._core = self._rd = self._wr = self._bt = Gone(err, why, panic)
        mm.release_core(self._names)


def attach(host: Host, name: str = "emu") -> Task:
    """This process becomes the main thread of a new emulated process."""
    return Task(host, "process", None, name)
