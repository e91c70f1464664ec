"""The worker side: what a process sees of Linux (the emulated kernel is emu.kernel)."""
from .task import EmulatorBug, Host, KernelPanic, SigInfo, Task, Thread, attach, connect, sigaction, start

__all__ = ["EmulatorBug", "Host", "KernelPanic", "SigInfo", "Task", "Thread", "attach", "connect",
           "sigaction", "start"]
