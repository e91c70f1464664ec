"""gmem-emu: a multiprocess emulator of Linux memory failure for KVM guest_memfd.

    import emu
    from emu import uapi as u
    with emu.start(policy="mf-delayed-fix", ram="512M") as host:
        me = emu.attach(host, name="qemu")
        ...
"""
from . import uapi
from .runtime import EmulatorBug, Host, KernelPanic, SigInfo, Task, Thread, attach, connect, sigaction, start

__version__ = "0.1.0"
__all__ = ["EmulatorBug", "Host", "KernelPanic", "SigInfo", "Task", "Thread", "attach", "connect",
           "sigaction", "start", "uapi"]
