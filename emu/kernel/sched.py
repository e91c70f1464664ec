"""Tasks and thread groups (kernel/fork.c, kernel/exit.c, kernel/sys.c prctl).

A Task is one emulated thread = one worker process (tid = its real pid).  A
Process is the thread group: one mm, one fd table, one tgid (the main thread).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import uapi as u

PF_MCE_PROCESS = 0x00000080
PF_MCE_EARLY = 0x08000000


@dataclass(eq=False, slots=True)
class Process:
    tgid: int
    mm: object
    comm: str
    files: dict = field(default_factory=dict)
    threads: list = field(default_factory=list)      # group order, leader first
    # the group leader has exited while other threads run (pthread_exit): a zombie
    # whose mm is NULL (exit_mm) until the last thread goes; for_each_process still
    # finds the group through it
    leader_exited: bool = False

    def fd_install(self, f) -> int:
        fd = 3
        while fd in self.files:
            fd += 1
        self.files[fd] = f
        return fd

    def fget(self, fd: int):
        f = self.files.get(fd) if isinstance(fd, int) else None
        if f is None:
            raise OSError(u.EBADF, "bad file descriptor")
        return f


@dataclass(eq=False, slots=True)
class Task:
    tid: int
    slot: int
    comm: str
    process: Process
    flags: int = 0                      # PF_MCE_* (per thread, as current->flags)
    conn: object = None                 # the daemon's connection to the worker
    reply_sigs: list = field(default_factory=list)   # signals for current, delivered on return
    alive: bool = True
    clean_exit: bool = False
    thread_exit: bool = False           # exited with SYS_exit alone, even as the leader
    # x86 #MC task work (current->mce_*): queue_task_work() fills, task_work_run() runs
    mce_count: int = 0
    mce_addr: int = 0
    mce_ripv: bool = True
    mce_kill_me: str | None = None

    @property
    def tgid(self) -> int:
        return self.process.tgid

    def mce_policy(self) -> int:
        if self.flags & PF_MCE_PROCESS:
            return u.PR_MCE_KILL_EARLY if self.flags & PF_MCE_EARLY else u.PR_MCE_KILL_LATE
        return u.PR_MCE_KILL_DEFAULT


def prctl(task: Task, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """The PR_MCE_KILL cases of kernel/sys.c, quirks included (SET with a bad arg3
    has already set PF_MCE_PROCESS when it returns -EINVAL)."""
    if option == u.PR_MCE_KILL:
        if arg4 | arg5:
            raise OSError(u.EINVAL, "prctl")
        if arg2 == u.PR_MCE_KILL_CLEAR:
            if arg3 != 0:
                raise OSError(u.EINVAL, "prctl")
            task.flags &= ~PF_MCE_PROCESS
        elif arg2 == u.PR_MCE_KILL_SET:
            task.flags |= PF_MCE_PROCESS
            if arg3 == u.PR_MCE_KILL_EARLY:
                task.flags |= PF_MCE_EARLY
            elif arg3 == u.PR_MCE_KILL_LATE:
                task.flags &= ~PF_MCE_EARLY
            elif arg3 == u.PR_MCE_KILL_DEFAULT:
                task.flags &= ~(PF_MCE_EARLY | PF_MCE_PROCESS)
            else:
                raise OSError(u.EINVAL, "prctl")
        else:
            raise OSError(u.EINVAL, "prctl")
        return 0
    if option == u.PR_MCE_KILL_GET:
        if arg2 | arg3 | arg4 | arg5:
            raise OSError(u.EINVAL, "prctl")
        return task.mce_policy()
    raise OSError(u.EINVAL, "prctl: option not emulated")
