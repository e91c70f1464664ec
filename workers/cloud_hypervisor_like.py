"""A cloud-hypervisor-shaped VMM worker: no SIGBUS handler at all (the decisions
are workers/models.py's CloudHypervisorLike).

cloud-hypervisor installs handlers for SIGWINCH, SIGTERM and SIGINT but none for
SIGBUS and sets no PR_MCE_KILL policy (no SIGBUS or machine-check handling found
in its source; its issues #5730 and #7387 show a hugepage SIGBUS ending the
process).  So any SIGBUS takes the default action: the process dies of SIGBUS.

A KVM_RUN error (hypervisor/src/kvm/mod.rs KvmVcpu::run): -1 with an errno other
than EAGAIN/EINTR is RunVcpu("VCPU error ..."); an exit kvm-ioctls reports but
the match does not handle (VcpuExit::MemoryFault for -1/EFAULT or -1/EHWPOISON
with KVM_EXIT_MEMORY_FAULT) is RunVcpu("Unexpected exit reason on vcpu run:
...").  vmm/src/cpu.rs logs "VCPU generated error: ..." and writes exit_evt
(the vCPU loop's Err arm); Vmm::control_loop (vmm/src/lib.rs) takes
EpollDispatch::Exit, vmm_shutdown() and leaves the loop with Ok(()); main
(cloud-hypervisor/src/main.rs) maps Ok to "Cloud Hypervisor exited successfully"
and process::exit(0).  Exit status 0 (read at cloud-hypervisor ae44c29).
"""
from __future__ import annotations

from . import models
from .vmm_base import Vmm


class CloudHypervisorLike(Vmm):
    name = "cloud-hypervisor"
    model = models.CloudHypervisorLike()


def main(argv=None) -> int:
    """`emu run-worker cloud-hypervisor-like` (also `python -m
    workers.cloud_hypervisor_like`): this VMM on a running daemon, driven from stdin (workers/console.py)."""
    from workers.console import vmm_main

    return vmm_main("cloud-hypervisor-like", argv)


if __name__ == "__main__":
    from workers.console import script

    script(main)
