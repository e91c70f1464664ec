"""A Firecracker-shaped VMM worker: what Firecracker turns a memory error into.

From firecracker-microvm/firecracker's source:
- No prctl(PR_MCE_KILL): its threads follow the vm.memory_failure_early_kill
  sysctl (0 by default), so a deferred error signals nobody.
- src/vmm/src/signal_handler.rs sigbus_sigsegv_handler: any SIGBUS, whatever its
  si_code (BUS_MCEERR_AR, BUS_MCEERR_AO, BUS_ADRERR ...), bumps
  METRICS.signals.sigbus, logs "Shutting down VM after intercepting signal 7,
  code N." and _exit(149) (FcExitCode::SIGBUS, src/vmm/src/lib.rs).  No
  injection into the guest, no AO/AR distinction.
- src/vmm/src/vstate/vcpu.rs handle_kvm_exit: KVM_RUN -1/EINTR re-checks events,
  EAGAIN re-enters; any other errno logs "Failure during vcpu run: <err>"
  (FaultyKvmExit).  kvm-ioctls' VcpuFd::run turns -1/EFAULT and -1/EHWPOISON with
  KVM_EXIT_MEMORY_FAULT into Ok(VcpuExit::MemoryFault{flags, gpa, size}), which
  x86 Peripherals::run_arch_emulation does not handle: "Unexpected exit reason on
  vcpu run: MemoryFault { ... }" (UnhandledKvmExit).  Either error ends
  Vcpu::running with self.exit(FcExitCode::GenericError): the VMM stops and the
  process exits 1.
"""
from __future__ import annotations

import os
import signal

import emu
from emu import uapi as u

from .vmm_base import Vmm, memory_fault_debug

FC_EXIT_CODE_GENERIC_ERROR = 1
FC_EXIT_CODE_SIGBUS = 149


class FirecrackerLike(Vmm):
    name = "firecracker"

    def install_signal_handlers(self) -> None:
        """register_signal_handlers(): SIGBUS -> sigbus_sigsegv_handler."""
        def sigbus_handler(signum, info):
            self.sigbus.append((info.si_code, info.si_addr, info.si_addr_lsb))
            self.log("Shutting down VM after intercepting signal %d, code %d."
                     % (signum, info.si_code))
            os._exit(FC_EXIT_CODE_SIGBUS)

        emu.sigaction(signal.SIGBUS, sigbus_handler)

    def on_kvm_error(self, err: int, kvm_run) -> str | None:
        if err == u.EAGAIN:
            return None
        if err in (u.EFAULT, u.EHWPOISON) and kvm_run.exit_reason == u.KVM_EXIT_MEMORY_FAULT:
            self.log("Unexpected exit reason on vcpu run: %s" % memory_fault_debug(kvm_run))
        else:
            self.log("Failure during vcpu run: %s (os error %d)" % (os.strerror(err), err))
        self.exit(FC_EXIT_CODE_GENERIC_ERROR)

    def exit(self, code: int) -> None:
        """Vcpu::exit -> the VMM's exit event: stop the VM, exit with the code."""
        self.close()
        self.task.exit()
        os._exit(code)
