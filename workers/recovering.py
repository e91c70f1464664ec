"""A VMM that recovers from memory errors: the design documents' "what userspace
can do" (docs: ../shared/reference/vmm-and-tests.md section 5.3), one pattern each.

- "punch": fallocate(PUNCH_HOLE) over the poisoned guest_memfd page and retry;
  for private memory (KVM_RUN -1/EHWPOISON) the guest's next load faults in a
  fresh zeroed page.  For a page the host maps, the punch alone leaves the hwpoison
  entry in the host page table (unmap_mapping_range keeps it unless even_cows,
  mm/memory.c zap_nonpresent_ptes), so the next host access gets SIGBUS AR again.
- "replace": for a guest_memfd page the host maps, punch the hole and map the file
  again over the old range with mmap(MAP_FIXED), which unmaps the hwpoison entry
  (munmap zaps it); for anonymous memory madvise(MADV_DONTNEED), after which the
  next touch faults in a zero page; private memory: as "punch".
- "degrade": forward the error to the guest as an action-required #MC
  (KVM_X86_SET_MCE, QEMU's values), the guest kills its task and offlines the
  page, and the VM keeps going without it.
- "shutdown": log the error and stop the VM cleanly (exit status 0).

A SIGBUS that is not a memory error (SI_KERNEL from kill_me_now, BUS_ADRERR) is
re-raised with the default action, as QEMU's sigbus_reraise.  The VMM asks for
early kill (PR_MCE_KILL_EARLY, as QEMU's main thread): an AO is logged and left
for a later access.  A page that faults again after its fix ends the
access ("re-faulted"), as tinjpage's "I seem to be in a signal loop" guard.
"""
from __future__ import annotations

import os
import signal

import emu
from emu import uapi as u

from . import models
from .vmm_base import PAGE, HostFault, Vmm

PATTERNS = ("punch", "replace", "degrade", "shutdown")


class RecoveringVmm(Vmm):
    name = "recovering-vmm"

    def __init__(self, task, pattern: str, **kw):
        if pattern not in PATTERNS:
            raise ValueError("pattern: one of %s" % ", ".join(PATTERNS))
        self.pattern = pattern
        self.pending: list[tuple[int, int]] = []          # (si_code, si_addr) during KVM_RUN
        self.fixed: set[int] = set()                      # GPAs already recovered once
        self.blind = False                                # an AR without a usable address seen
        super().__init__(task, **kw)

    def install_signal_handlers(self) -> None:
        def on_sigbus(signum, info):
            self.sigbus.append((info.si_code, info.si_addr, info.si_addr_lsb))
            if info.si_code == u.BUS_MCEERR_AO:
                self.log("AO memory error at hva %#x: noted" % info.si_addr)
                return
            if info.si_code != u.BUS_MCEERR_AR:
                self.log("SIGBUS si_code %d is not a memory error: re-raising" % info.si_code)
                emu.sigaction(signal.SIGBUS, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGBUS)
                self.task.idle(5)
                os._exit(134)
            if self._host_access:
                raise HostFault(info.si_addr)             # siglongjmp out of the access
            self.pending.append((info.si_code, info.si_addr))   # KVM_RUN returns -EINTR

        emu.sigaction(signal.SIGBUS, on_sigbus)
        # as QEMU's qemu_init_sigbus: take AO errors early, or the AO branch never runs
        self.task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)

    # ---- recovery ----
    def recover(self, gpa: int, private: bool) -> str | None:
        """Apply the pattern to the page at gpa: None to retry, else the outcome."""
        gpa &= ~(PAGE - 1)
        if gpa in self.fixed:
            self.log("GPA %#x faulted again after recovery: giving up" % gpa)
            return "re-faulted"
        self.fixed.add(gpa)
        ram, t = self.ram, self.task
        if self.pattern == "shutdown":
            self.log("memory error at GPA %#x: shutting down" % gpa)
            return "shutdown"
        if self.pattern == "degrade":
            self.log("memory error at GPA %#x: injecting a machine check" % gpa)
            self.vcpu.set_mce(models.kvm_mce(u.BUS_MCEERR_AR, gpa))
            return None
        if ram.gmem is not None:
            self.log("punch hole over GPA %#x" % gpa)
            t.fallocate(ram.gmem, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, gpa, PAGE)
            if self.pattern == "replace" and not private:
                self.log("mmap(MAP_FIXED) over hva %#x" % (ram.hva + gpa))
                t.mmap(ram.hva + gpa, PAGE, u.PROT_READ | u.PROT_WRITE,
                       u.MAP_SHARED | u.MAP_FIXED, ram.gmem, gpa)
        elif self.pattern == "replace":
            self.log("madvise(MADV_DONTNEED) over hva %#x" % (ram.hva + gpa))
            t.madvise(ram.hva + gpa, PAGE, u.MADV_DONTNEED)
        else:
            self.log("nothing to punch in anonymous memory")
            return "unrecoverable"
        return None

    def on_eintr(self) -> str | None:
        while self.pending:
            _code, addr = self.pending.pop(0)
            if not self.ram.contains(addr):
                # no host mapping of the page (private memory): si_addr says nothing;
                # re-enter once so that KVM reports the GPA (-EHWPOISON)
                if self.blind:
                    self.log("AR again with no guest address at %#x: giving up" % addr)
                    return "fatal"
                self.blind = True
                self.log("AR with no guest address (si_addr %#x): re-entering" % addr)
                continue
            out = self.recover(self.ram.gpa(addr), False)
            if out is not None:
                return out
        return None

    def on_kvm_error(self, err: int, kvm_run) -> str | None:
        mf = kvm_run.memory_fault
        private = bool(mf.flags & u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
        if kvm_run.exit_reason == u.KVM_EXIT_MEMORY_FAULT and err == u.EFAULT:
            self.task.gmem_convert(self.ram.gmem, mf.gpa, mf.size, private)
            return None
        if kvm_run.exit_reason == u.KVM_EXIT_MEMORY_FAULT and err == u.EHWPOISON:
            self.log("KVM_RUN: %s at GPA %#x%s" % (os.strerror(err), mf.gpa,
                                                    " (private)" if private else ""))
            return self.recover(mf.gpa, private)
        self.log("KVM_RUN failed: %s" % os.strerror(err))
        return "error"

    def device_read(self, gpa: int, n: int = 8):
        """A device-model read of guest RAM that recovers from an AR once."""
        for _ in range(2):
            try:
                return self.host_read(gpa, n)
            except HostFault as f:
                self.log("SIGBUS BUS_MCEERR_AR at hva %#x in the device model" % f.args[0])
                out = self.recover(self.ram.gpa(f.args[0]), False)
                if out is not None:
                    return out
        return "re-faulted"


def main(argv=None) -> int:
    """`emu run-worker recovering` (also `python -m
    workers.recovering`): this VMM on a running daemon, driven from stdin (workers/console.py)."""
    from workers.console import vmm_main

    return vmm_main("recovering", argv)


if __name__ == "__main__":
    from workers.console import script

    script(main)
