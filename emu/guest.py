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


# ---- more guest operations ----
def _cr4(on: bool):
    return ("cr4_mce", bool(on))


GuestOps.set_cr4_mce = staticmethod(_cr4)
GuestOps.user = staticmethod(lambda: ("mode", "user"))
GuestOps.kernel = staticmethod(lambda: ("mode", "kernel"))
# KVM reading guest memory itself (the guest's code is identity-mapped, gva == gpa):
# emulate(gpa, n): an instruction at gpa that KVM must emulate; it fetches the n bytes
#   with __copy_from_user on the slot's hva (kvm_fetch_guest_virt); the value is them.
# kvm_map_read(gpa, n): KVM maps the page into the kernel (kvm_vcpu_map, as nested
#   VMX's VMPTRLD does) and loads n bytes; the value is them, or None if the map failed.
# wrmsr_mci_ctl2(bank, value): the guest writes MSR_IA32_MCx_CTL2 (CMCI_EN, threshold);
#   a #GP (OSError EINVAL out of run()) without MCG_CMCI_P or with reserved bits.
# rdmsr_mce_bank(bank): the guest reads MCi_STATUS, MCi_ADDR, MCi_MISC; the value is
#   the tuple (status, addr, misc).
GuestOps.wrmsr_mci_ctl2 = staticmethod(lambda bank, value: ("mci_ctl2", bank, value))
GuestOps.rdmsr_mce_bank = staticmethod(lambda bank: ("mce_bank", bank))
GuestOps.emulate = staticmethod(lambda gpa, n: ("emulate", gpa, n))
GuestOps.kvm_map_read = staticmethod(lambda gpa, n: ("kvm_map_read", gpa, n))


class GuestTaskKilled(Exception):
    """Thrown into a guest program whose task the guest kernel killed (an
    action-required machine check in guest user mode)."""


class GuestKernel:
    """The guest OS's machine-check handling, Linux-like by default.

    `handler(gk, event)` may be replaced; it returns "killed", "recovered" or
    "panic", or a guest program fn(g, event) that the handler runs before it
    returns (MCG_STATUS.MCIP stays set until that program returns its outcome).
    The guest's view stays readable: `log`, `offlined` (guest page
    frames taken offline), `killed`, `panicked`.
    """

    def __init__(self):
        self.cr4_mce = False
        self.mode = "user"
        self.log: list[str] = []
        self.offlined: list[int] = []
        self.killed = 0
        self.panicked: str | None = None
        self.cmci: list[int] = []
        self.handler = linux_mce_handler

    def offline(self, gpa: int) -> None:
        gfn = gpa >> 12
        if gfn not in self.offlined:
            self.offlined.append(gfn)


def linux_mce_handler(gk: GuestKernel, ev: dict) -> str:
    """do_machine_check + memory_failure in a Linux guest, reduced to its outcome."""
    status, addr = ev["status"], ev["addr"]
    if not status & u.MCI_STATUS_UC:
        gk.log.append("mce: [Hardware Error]: Machine check events logged")
        return "recovered"
    if status & u.MCI_STATUS_PCC:
        gk.panicked = "Fatal machine check"
        gk.log.append("Kernel panic - not syncing: Fatal machine check")
        return "panic"
    if status & u.MCI_STATUS_AR:
        if gk.mode == "kernel":
            gk.panicked = "Fatal local machine check"
            gk.log.append("Kernel panic - not syncing: Fatal local machine check")
            return "panic"
        gk.log.append("mce: Uncorrected hardware memory error in user-access at %x" % addr)
        gk.log.append("Memory failure: %#x: Sending SIGBUS to guest-task due to hardware memory "
                      "corruption" % (addr >> 12))
        gk.offline(addr)
        gk.killed += 1
        return "killed"
    gk.log.append("Memory failure: %#x: recovery action for dirty LRU page: Recovered" % (addr >> 12))
    gk.offline(addr)
    return "recovered"
