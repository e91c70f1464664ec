"""gmem-emu: a multiprocess emulator of Linux memory failure for KVM guest_memfd.

    import emu
    from emu import uapi as u
    with emu.start(policy="mf-delayed-fix", ram="512M") as host:
        me = emu.attach(host, name="qemu")
        ...
"""
try:
    from . import _core  # noqa: F401  (the Cython core: built by `pip install`)
except ImportError as e:                # a source tree shadowing the installed package
    import os as _os

    raise ImportError(
        "emu's Cython core is not built in %s: this source tree shadows the installed emu "
        "(run from another directory, or use the `emu` command, e.g. `emu run-worker`), or "
        "build it here: python setup.py build_ext --inplace" % _os.path.dirname(__file__)) from e
from . import uapi
from .user import (
    EmulatorBug,
    Host,
    KernelGone,
    KernelPanic,
    SigInfo,
    Task,
    Thread,
    attach,
    connect,
    sigaction,
    start,
)

__version__ = "0.1.0"
__all__ = ["EmulatorBug", "Host", "KernelGone", "KernelPanic", "SigInfo", "Task", "Thread", "attach",
           "connect", "sigaction", "start", "uapi"]
