"""A Firecracker-shaped VMM worker: what Firecracker turns a memory error into.

The decisions are workers/models.py's FirecrackerLike, from
firecracker-microvm/firecracker's source:
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

from . import models
from .vmm_base import Vmm


class FirecrackerLike(Vmm):
    name = "firecracker"
    model = models.FirecrackerLike()


def main(argv=None) -> int:
    """`emu run-worker firecracker-like` (also `python -m
    workers.firecracker_like`): this VMM on a running daemon, driven from stdin (workers/console.py)."""
    from workers.console import vmm_main

    return vmm_main("firecracker-like", argv)


if __name__ == "__main__":
    from workers.console import script

    script(main)
