"""Guest programs: generators that yield guest operations to their vCPU.

    def guest(g):
        v = yield g.read(gpa, 8)            # a load through stage-2
        yield g.write(gpa, b"\\xff" * 8)     # a store
        out = yield g.read_batch(gpas, 8)   # many loads in one fast-path call
        yield g.sync(1)                     # ucall: KVM_EXIT_IO
        yield g.done()

An access that exits to the VMM (a fault KVM cannot resolve, a machine check,
a pending signal) is retried by the next vcpu.run(), as the CPU re-executes the
faulting instruction.  `private=True/False` is the guest's view of an access
(the C-bit / shared bit of confidential guests); None lets the memory
attributes decide, as for KVM_X86_SW_PROTECTED_VM.
"""
from __future__ import annotations

import array

from . import uapi as u


class GuestOps:
    """The `g` a guest program receives."""

    @staticmethod
    def read(gpa: int, n: int, private: bool | None = None):
        return ("read", gpa, n, private)

    @staticmethod
    def write(gpa: int, data, private: bool | None = None):
        return ("write", gpa, bytes(data), private)

    @staticmethod
    def read_batch(gpas, size: int, private: bool | None = None):
        return ("read_batch", array.array("Q", gpas), size, private)

    @staticmethod
    def write_batch(gpas, size: int, data, private: bool | None = None):
        gpas = array.array("Q", gpas)
        if len(data) != len(gpas) * size:
            raise ValueError("write_batch: data must be len(gpas) * size bytes")
        return ("write_batch", gpas, size, private, bytes(data))

    @staticmethod
    def sync(*args):
        return ("ucall", u.UCALL_SYNC, tuple(args))

    @staticmethod
    def done():
        return ("ucall", u.UCALL_DONE, ())

    @staticmethod
    def abort(msg: str):
        return ("ucall", u.UCALL_ABORT, (msg,))

    @staticmethod
    def printf(msg: str):
        return ("ucall", u.UCALL_PRINTF, (msg,))

    @staticmethod
    def hlt():
        return ("hlt",)


G = GuestOps()
