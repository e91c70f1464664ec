"""The worker side: what a process sees of Linux.  The emulated kernel, in the
supervisor, is emu.kernel; a name here (Task, Vm, Vcpu) is the user-space handle,
the same name there is the kernel object.

    Linux, as a process sees it            module
    ------------------------------------   ----------------------------------------
    current (this thread)                  current.py   the Task this process is
    the system call instruction            channel.py   Channel: a request, a reply
    a task: attach, prctl, exit            task.py      Task, attach()
    mm syscalls, the CPU's loads/stores    mm.py        mmap, madvise, pagemap, read...
    file I/O syscalls                      fs.py        pread, pwrite, fallocate...
    clone(), fork(), wait()                thread.py    Thread (the handle), spawn
    sigaction, signal delivery             signal.py    sigaction(), SigInfo
    /dev/kvm and a VM fd                   kvm.py       Kvm, Vm
    a vCPU fd, KVM_RUN, struct kvm_run     vcpu.py      Vcpu, KvmRun
    BUG(), panic(), a dead kernel          errors.py    EmulatorBug, KernelPanic, KernelGone
    debugfs, /proc, /sys, sysctl           host.py      Host, start(), connect()
    (none: dying with the kernel)          watchdog.py  the supervisor's pidfd
"""
from .errors import EmulatorBug, KernelGone, KernelPanic
from .host import Host, connect, start
from .signal import SigInfo, sigaction
from .task import Task, attach
from .thread import Thread

__all__ = ["EmulatorBug", "Host", "KernelGone", "KernelPanic", "SigInfo", "Task", "Thread",
           "attach", "connect", "sigaction", "start"]
