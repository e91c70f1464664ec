"""What a scenario's processes do with SIGBUS and with KVM_RUN's errors: the VMM
models, as decisions a thread asks, so that a scenario can put the same memory
error in front of QEMU, Firecracker or a process with no VMM at all.

- none: a test program.  Its handler records the signal; an action-required one
  unwinds the access (siglongjmp), an action-optional one returns.  With
  sigbus = "default" there is no handler: SIGBUS kills the process.
- qemu-like: QEMU's accel/kvm (kvm_on_sigbus, kvm_on_sigbus_vcpu,
  kvm_arch_on_sigbus_vcpu): AO on the main thread for guest RAM is injected into
  the guest as an AO #MC on the first vCPU (run_on_cpu), AR on a vCPU is injected
  as an AR #MC and the vCPU re-enters, AR outside a vCPU and any non-MCE SIGBUS
  re-raise (sigbus_reraise: the process dies of SIGBUS); KVM_RUN -1/EHWPOISON
  pauses the VM ("kvm run failed"), -1/EFAULT with KVM_EXIT_MEMORY_FAULT converts
  and re-enters.
- recovering: qemu-like, but EHWPOISON punches a hole over the page and
  re-enters (the guest reads zeros), as the guest_memfd RFC selftests do.
- firecracker-like: no PR_MCE_KILL; any SIGBUS logs "Shutting down VM after
  intercepting signal 7, code N." and exits 149 (vmm/src/signal_handler.rs
  sigbus_sigsegv_handler); a KVM_RUN error other than EINTR/EAGAIN logs and ends
  the VM with FcExitCode::GenericError, 1 (vstate/vcpu.rs handle_kvm_exit: kvm-ioctls
  turns -1 with KVM_EXIT_MEMORY_FAULT into VcpuExit::MemoryFault, an exit reason
  run_arch_emulation does not handle).
- cloud-hypervisor-like: no SIGBUS handler (SIGBUS kills it); a KVM_RUN error is
  "VCPU generated error" and the VM shuts down (vmm/src/cpu.rs; the exit status 0 is
  inferred).  workers/ has the same VMMs as standalone workers.
"""
from __future__ import annotations

import os
import signal

from .. import uapi as u

CODES = {u.BUS_MCEERR_AO: "BUS_MCEERR_AO", u.BUS_MCEERR_AR: "BUS_MCEERR_AR",
         u.BUS_ADRERR: "BUS_ADRERR", u.SI_KERNEL: "SI_KERNEL"}
SHORT = {u.BUS_MCEERR_AO: "AO", u.BUS_MCEERR_AR: "AR", u.BUS_ADRERR: "ADRERR", u.SI_KERNEL: "SI_KERNEL"}
MCE_CODES = (u.BUS_MCEERR_AO, u.BUS_MCEERR_AR)
FIRECRACKER_SIGBUS_EXIT = 149          # FcExitCode::SIGBUS
MCG_CAP = u.MCG_SER_P | u.MCG_CTL_P | 10
AR_STATUS = (u.MCI_STATUS_VAL | u.MCI_STATUS_UC | u.MCI_STATUS_EN | u.MCI_STATUS_MISCV
             | u.MCI_STATUS_ADDRV | u.MCI_STATUS_S | u.MCI_STATUS_AR | 0x134)
AO_STATUS = (u.MCI_STATUS_VAL | u.MCI_STATUS_UC | u.MCI_STATUS_EN | u.MCI_STATUS_MISCV
             | u.MCI_STATUS_ADDRV | u.MCI_STATUS_S | 0xC0)


class Unwind(Exception):
    """A handler's siglongjmp out of the access that took SIGBUS."""

    def __init__(self, code: int):
        super().__init__(CODES.get(code, code))
        self.code = code


def kvm_mce(code: int, gpa: int) -> u.KvmX86Mce:
    """QEMU's kvm_mce_inject() for an Intel guest: bank 9, misc 0x8c."""
    ar = code == u.BUS_MCEERR_AR
    mcg = u.MCG_STATUS_MCIP | u.MCG_STATUS_RIPV | (u.MCG_STATUS_EIPV if ar else 0)
    return u.KvmX86Mce(status=AR_STATUS if ar else AO_STATUS, addr=gpa, misc=0x8C,
                       mcg_status=mcg, bank=9)


def sigbus_reraise(actor) -> None:
    """QEMU's sigbus_reraise(): SIG_DFL, raise, unblock: the process dies of SIGBUS."""
    actor.flush()
    signal.signal(signal.SIGBUS, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGBUS)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGBUS])
    os._exit(134)                       # perror("Failed to re-raise SIGBUS!"); abort()


class Model:
    """vmm = "none"."""

    name = "none"
    prctl = True                        # the scenario's mce_kill is applied
    recover = False
    pause_on_ehwpoison = False
    handles_sigbus = True

    def on_kvm_error(self, actor, err: int, kvm_run) -> None:
        """A KVM_RUN error the loop did not resolve: a VMM that ends the VM here exits."""

    def on_sigbus(self, actor, info) -> None:
        if info.si_code == u.BUS_MCEERR_AO:
            return
        raise Unwind(info.si_code)

    def on_vcpu_sigbus(self, actor, info) -> None:
        self.on_sigbus(actor, info)


class QemuLike(Model):
    name = "qemu-like"
    pause_on_ehwpoison = True

    def on_sigbus(self, actor, info) -> None:
        # sigbus_handler -> kvm_on_sigbus: only AO is handled outside a vCPU
        if info.si_code != u.BUS_MCEERR_AO:
            actor.log("QEMU: SIGBUS %s at %#x outside a vCPU: re-raising" % (
                CODES.get(info.si_code, info.si_code), info.si_addr))
            sigbus_reraise(actor)
        gpa = actor.gpa_of(info.si_addr)
        if gpa is None:
            actor.log("QEMU: warning: Hardware memory error at addr %#x of type BUS_MCEERR_AO "
                      "for memory used by QEMU itself instead of guest system!" % info.si_addr)
            return
        actor.log("QEMU: warning: Guest MCE Memory Error at QEMU addr %#x and GUEST addr %#x of "
                  "type BUS_MCEERR_AO injected" % (info.si_addr, gpa[1]))
        actor.requests.append(("inject_mce", gpa[0], u.BUS_MCEERR_AO, gpa[1]))

    def on_vcpu_sigbus(self, actor, info) -> None:
        # kvm_on_sigbus_vcpu: remember it, KVM_RUN returns -EINTR and the loop injects
        if info.si_code not in MCE_CODES:
            actor.log("QEMU: SIGBUS si_code %#x is not a memory error: re-raising" % info.si_code)
            sigbus_reraise(actor)
        if actor.pending:                     # a second one before the first was handled
            sigbus_reraise(actor)
        actor.pending.append((info.si_code, info.si_addr))


class Recovering(QemuLike):
    name = "recovering"
    recover = True
    pause_on_ehwpoison = False


class FirecrackerLike(Model):
    name = "firecracker-like"
    prctl = False

    def on_sigbus(self, actor, info) -> None:
        actor.log("Shutting down VM after intercepting signal 7, code %d." % info.si_code)
        actor.last_words("exit %d" % FIRECRACKER_SIGBUS_EXIT)
        os._exit(FIRECRACKER_SIGBUS_EXIT)

    on_vcpu_sigbus = on_sigbus

    def on_kvm_error(self, actor, err: int, kvm_run) -> None:
        mf = kvm_run.memory_fault
        if kvm_run.exit_reason == u.KVM_EXIT_MEMORY_FAULT:
            actor.log("Unexpected exit reason on vcpu run: MemoryFault { flags: %d, gpa: %d, size: %d }"
                      % (mf.flags, mf.gpa, mf.size))
        else:
            actor.log("Failure during vcpu run: %s" % os.strerror(err))
        actor.last_words("exit 1")
        os._exit(1)


class CloudHypervisorLike(Model):
    name = "cloud-hypervisor-like"
    prctl = False
    handles_sigbus = False

    def on_kvm_error(self, actor, err: int, kvm_run) -> None:
        actor.log("VCPU generated error: VcpuRun(%s)" % os.strerror(err))
        actor.last_words("exit 0")
        os._exit(0)


MODELS = {m.name: m for m in (Model, QemuLike, Recovering, FirecrackerLike, CloudHypervisorLike)}
