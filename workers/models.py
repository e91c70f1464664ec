"""What each VMM turns a memory error into: one bundle of decisions per VMM.

A model decides; an executor carries the decision out.  There are two executors:
the standalone workers (workers/qemu_like.py, firecracker_like.py,
cloud_hypervisor_like.py, driven by tests and `emu run-worker`) and the threads of
a scenario (emu/scenario/actors.py, driven by `emu run` and `emu compare`).  Both
ask the same model, so a VMM is written down once, with the source it follows:

- none: a test program.  Its handler records the signal; an action-required one
  unwinds the access (siglongjmp), an action-optional one returns.
- qemu-like: QEMU's accel/kvm/kvm-all.c (kvm_on_sigbus, kvm_on_sigbus_vcpu,
  kvm_cpu_exec), target/i386/kvm/kvm.c (kvm_arch_on_sigbus_vcpu, kvm_mce_inject)
  and target/i386/helper.c (do_inject_x86_mce).  The main thread is EARLY and
  injects an AO into the first vCPU; a vCPU's AR is injected as an AR #MC and the
  vCPU re-enters; an AR outside guest RAM is hardware_memory_error (exit 1); an
  AR outside a vCPU and any non-MCE SIGBUS re-raise (the process dies of SIGBUS);
  KVM_RUN -1/EHWPOISON pauses the VM ("kvm run failed"), -1/EFAULT with
  KVM_EXIT_MEMORY_FAULT converts and re-enters.  QMP MEMORY_FAILURE events are
  reported through the executor.
- recovering: qemu-like, but KVM_RUN -1/EHWPOISON punches a hole over the page
  and re-enters (the guest reads zeros), as the guest_memfd RFC selftests do
  (`emu run-worker qemu-like --recover`).
- firecracker-like: no PR_MCE_KILL; any SIGBUS logs "Shutting down VM after
  intercepting signal 7, code N." and _exit(149) (src/vmm/src/signal_handler.rs
  sigbus_sigsegv_handler, FcExitCode::SIGBUS); a KVM_RUN error other than
  EINTR/EAGAIN ends the VM with FcExitCode::GenericError, 1 (vstate/vcpu.rs
  handle_kvm_exit; kvm-ioctls turns -1 with KVM_EXIT_MEMORY_FAULT into
  VcpuExit::MemoryFault, which run_arch_emulation does not handle).
- cloud-hypervisor-like: no PR_MCE_KILL and no SIGBUS handler (SIGBUS kills it);
  a KVM_RUN error is "VCPU generated error" (vmm/src/cpu.rs), the VM shuts down
  and the process exits 0 (vmm/src/lib.rs control_loop, src/main.rs).

The executor interface (`Executor`) is what a decision needs from the thread
that takes it; each method is a line of the VMM's code, not a decision.
"""
from __future__ import annotations

import os
import signal
from typing import NoReturn, Protocol

from emu import uapi as u

PAGE = 4096
MCE_CODES = (u.BUS_MCEERR_AO, u.BUS_MCEERR_AR)
CODES = {u.BUS_MCEERR_AO: "BUS_MCEERR_AO", u.BUS_MCEERR_AR: "BUS_MCEERR_AR",
         u.BUS_ADRERR: "BUS_ADRERR", u.SI_KERNEL: "SI_KERNEL"}
SHORT = {u.BUS_MCEERR_AO: "AO", u.BUS_MCEERR_AR: "AR", u.BUS_ADRERR: "ADRERR",
         u.SI_KERNEL: "SI_KERNEL"}

MCG_CAP = u.MCG_SER_P | u.MCG_CTL_P | 10            # 10 banks, as QEMU's default CPU models
MCG_CAP_NO_SER = u.MCG_CTL_P | 10                   # a CPU model without MCG_SER_P
AR_STATUS = (u.MCI_STATUS_VAL | u.MCI_STATUS_UC | u.MCI_STATUS_EN | u.MCI_STATUS_MISCV
             | u.MCI_STATUS_ADDRV | u.MCI_STATUS_S | u.MCI_STATUS_AR | 0x134)
AO_STATUS = (u.MCI_STATUS_VAL | u.MCI_STATUS_UC | u.MCI_STATUS_EN | u.MCI_STATUS_MISCV
             | u.MCI_STATUS_ADDRV | u.MCI_STATUS_S | 0xC0)
FC_EXIT_CODE_GENERIC_ERROR = 1                      # FcExitCode::GenericError
FC_EXIT_CODE_SIGBUS = 149                           # FcExitCode::SIGBUS


def kvm_mce(code: int, gpa: int) -> u.KvmX86Mce:
    """QEMU's kvm_mce_inject() for an Intel guest: bank 9, misc 0x8c."""
    ar = code == u.BUS_MCEERR_AR
    mcg = u.MCG_STATUS_MCIP | u.MCG_STATUS_RIPV | (u.MCG_STATUS_EIPV if ar else 0)
    return u.KvmX86Mce(status=AR_STATUS if ar else AO_STATUS, addr=gpa, misc=0x8C,
                       mcg_status=mcg, bank=9)


def sigbus_reraise() -> NoReturn:
    """QEMU's sigbus_reraise(): SIG_DFL, raise, unblock: the process dies of SIGBUS."""
    signal.signal(signal.SIGBUS, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGBUS)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGBUS])
    os._exit(134)                       # perror("Failed to re-raise SIGBUS!"); abort()


def errname(err: int) -> str:
    import errno

    return {u.EHWPOISON: "EHWPOISON"}.get(err) or errno.errorcode.get(err, str(err))


def memory_fault_debug(kr) -> str:
    """kvm-ioctls' VcpuExit::MemoryFault as Rust's {:?} prints it (VcpuFd::run maps
    -1/EFAULT or -1/EHWPOISON with KVM_EXIT_MEMORY_FAULT to it; the errno is lost)."""
    mf = kr.memory_fault
    return "MemoryFault { flags: %d, gpa: %d, size: %d }" % (mf.flags, mf.gpa, mf.size)


class Executor(Protocol):
    """The thread a decision is carried out on."""

    pending: list                       # (si_code, si_addr) taken during KVM_RUN
    index: int                          # this vCPU's index (cpu_index)

    def log(self, text: str) -> None: ...
    def qmp(self, recipient: str, action: str, ar: bool, recursive: bool = False) -> None: ...
    def die(self, status: int) -> NoReturn: ...         # leave the log, then _exit(status)
    def reraise(self) -> NoReturn: ...                  # sigbus_reraise, after leaving the log
    def unwind(self, code: int) -> NoReturn: ...        # siglongjmp out of the access
    def guest_addr(self, hva: int) -> int | None: ...   # the GPA guest RAM has at hva
    def hwpoison_page_add(self, gpa: int) -> None: ...
    def kvm_mce_inject(self, code: int, gpa: int) -> str | None: ...  # on this vCPU or first_cpu
    def guest_state(self) -> dict: ...                  # cpu_synchronize_state
    def set_mce(self, mce: u.KvmX86Mce) -> None: ...
    def convert(self, gpa: int, size: int, private: bool) -> None: ...
    def punch(self, gpa: int, size: int) -> None: ...
    def pause(self): ...                                # vm_stop(RUN_STATE_INTERNAL_ERROR)


class Model:
    """vmm = "none": a test program with a SIGBUS handler."""

    name = "none"
    prctl = True                        # the process sets PR_MCE_KILL (as the scenario says)
    handles_sigbus = True               # a handler is installed (else SIG_DFL)
    mce_banks = False                   # the vCPUs get KVM_X86_SETUP_MCE

    def on_sigbus(self, x: Executor, info, vcpu: bool) -> None:
        """The SIGBUS handler, on a vCPU thread (vcpu=True) or another thread."""
        if info.si_code != u.BUS_MCEERR_AO:
            x.unwind(info.si_code)

    def post_run(self, x: Executor) -> str | None:
        """Right after KVM_RUN returned: a SIGBUS the handler left pending."""
        return None

    def on_kvm_error(self, x: Executor, err: int, kr) -> str | None:
        """KVM_RUN returned -1/err (not EINTR): None re-enters, else the result."""
        if err == u.EAGAIN:
            return None
        return errname(err)


class QemuLike(Model):
    name = "qemu-like"
    mce_banks = True

    def __init__(self, ser: bool = True, recover: bool = False):
        self.ser, self.recover = ser, recover        # CPU model with MCG_SER_P; --recover

    @property
    def mcg_cap(self) -> int:
        return MCG_CAP if self.ser else MCG_CAP_NO_SER

    def on_sigbus(self, x: Executor, info, vcpu: bool) -> None:
        """system/cpus.c sigbus_handler -> kvm_on_sigbus_vcpu (current_cpu set) or
        kvm_on_sigbus (the main loop's signalfd)."""
        code, addr = info.si_code, info.si_addr
        if code not in MCE_CODES:
            x.log("QEMU: SIGBUS si_code %#x is not a memory error: re-raising" % code)
            x.reraise()
        if vcpu:
            if x.pending:                               # have_sigbus_pending: return 1
                x.log("QEMU: second SIGBUS %s at %#x while one is pending: re-raising"
                      % (CODES[code], addr))
                x.reraise()
            x.pending.append((code, addr))              # KVM_RUN returns -EINTR
            return
        if code == u.BUS_MCEERR_AR:                     # kvm_on_sigbus: assert(code != AR)
            x.log("QEMU: SIGBUS BUS_MCEERR_AR at %#x outside a vCPU: re-raising" % addr)
            x.reraise()
        self.kvm_arch_on_sigbus_vcpu(x, code, addr)     # on first_cpu

    def post_run(self, x: Executor) -> str | None:
        """kvm_cpu_exec: if (have_sigbus_pending) kvm_arch_on_sigbus_vcpu(...)."""
        if not x.pending:
            return None
        code, addr = x.pending.pop()
        return self.kvm_arch_on_sigbus_vcpu(x, code, addr)

    def kvm_arch_on_sigbus_vcpu(self, x: Executor, code: int, addr: int) -> str | None:
        """target/i386/kvm/kvm.c; "reset" when the injection raised a triple fault."""
        if self.ser and addr:                           # env->mcg_cap & MCG_SER_P
            gpa = x.guest_addr(addr)                    # qemu_ram_addr_from_host + memslot
            if gpa is not None:
                x.hwpoison_page_add(gpa)
                r = x.kvm_mce_inject(code, gpa)
                if code == u.BUS_MCEERR_AR:        # error_report: no prefix (util/error-report.c)
                    x.log("QEMU: Guest MCE Memory Error at QEMU addr %#x and GUEST addr "
                          "%#x of type BUS_MCEERR_AR injected" % (addr, gpa))
                else:
                    x.log("QEMU: warning: Guest MCE Memory Error at QEMU addr %#x and GUEST addr "
                          "%#x of type BUS_MCEERR_AO injected" % (addr, gpa))
                return r
            if code == u.BUS_MCEERR_AO:
                x.log("QEMU: warning: Hardware memory error at addr %#x of type BUS_MCEERR_AO "
                      "for memory used by QEMU itself instead of guest system!" % addr)
        if code == u.BUS_MCEERR_AR:                     # hardware_memory_error
            x.qmp("hypervisor", "fatal", True)
            x.log("QEMU: QEMU got Hardware memory error at addr %#x" % addr)
            x.die(1)
        x.qmp("hypervisor", "ignore", False)            # "Hope we are lucky for AO MCE"
        return None

    def do_inject_x86_mce(self, x: Executor, code: int, gpa: int) -> str | None:
        """target/i386/helper.c do_inject_x86_mce on the vCPU's thread, after
        cpu_synchronize_state: the guest's CR4, MCG_STATUS/MCG_CTL and the bank's
        MCi_CTL as KVM holds them.  "reset" when it raised a triple fault."""
        ar = code == u.BUS_MCEERR_AR
        st = x.guest_state()
        recursive = bool(st["mcg_status"] & u.MCG_STATUS_MCIP)
        if not ar and recursive:                        # an AO while the guest is mid-#MC
            x.qmp("guest", "ignore", ar, recursive)
            return None
        ones = (1 << 64) - 1
        # "Uncorrected error reporting disabled": printed to params->mon, which is
        # NULL for kvm_mce_inject, so nothing is shown and no event is sent.
        if st["mcg_cap"] & u.MCG_CTL_P and st.get("mcg_ctl", ones) != ones:
            return None
        if st["banks"][9][0] != ones:
            return None
        msg = None
        if not st["cr4_mce"]:
            msg = "CPU %d: MCE capability is not enabled, raising triple fault" % x.index
        elif recursive:
            msg = "CPU %d: Previous MCE still in progress, raising triple fault" % x.index
        if msg:                                         # qemu_system_reset_request(GUEST_RESET)
            x.qmp("guest", "reset", ar, recursive)
            x.log("QEMU: " + msg)                       # qemu_log_mask(CPU_LOG_RESET)
            return "reset"
        x.set_mce(kvm_mce(code, gpa))
        x.qmp("guest", "inject", ar, recursive)
        return None

    def on_kvm_error(self, x: Executor, err: int, kr) -> str | None:
        """kvm_cpu_exec: run_ret < 0."""
        if err == u.EAGAIN:                             # EXCP_INTERRUPT
            return None
        mf = kr.memory_fault
        if err == u.EFAULT and kr.exit_reason == u.KVM_EXIT_MEMORY_FAULT:
            private = bool(mf.flags & u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
            x.log("QEMU: KVM_EXIT_MEMORY_FAULT gpa %#x: converting to %s"
                  % (mf.gpa, "private" if private else "shared"))
            x.convert(mf.gpa, mf.size, private)         # kvm_convert_memory
            return None
        x.log("QEMU: error: kvm run failed %s" % os.strerror(err))
        if self.recover and err == u.EHWPOISON:
            x.log("recovering VMM: punch hole over GPA %#x and re-enter" % mf.gpa)
            x.punch(mf.gpa, mf.size)
            return None
        x.log("QEMU: KVM_EXIT_MEMORY_FAULT gpa %#x size %#x flags %#x; VM paused "
              "(internal-error)" % (mf.gpa, mf.size, mf.flags))
        return x.pause()                                # cpu_dump_state, vm_stop


class Recovering(QemuLike):
    name = "recovering"

    def __init__(self, ser: bool = True, recover: bool = True):
        super().__init__(ser, recover)


class FirecrackerLike(Model):
    name = "firecracker-like"
    prctl = False

    def on_sigbus(self, x: Executor, info, vcpu: bool) -> NoReturn:
        """sigbus_sigsegv_handler: whatever the si_code, from whichever thread."""
        x.log("Shutting down VM after intercepting signal %d, code %d."
              % (signal.SIGBUS, info.si_code))
        x.die(FC_EXIT_CODE_SIGBUS)

    def on_kvm_error(self, x: Executor, err: int, kr) -> str | None:
        """handle_kvm_exit: EAGAIN re-enters; anything else stops the VMM."""
        if err == u.EAGAIN:
            return None
        if err in (u.EFAULT, u.EHWPOISON) and kr.exit_reason == u.KVM_EXIT_MEMORY_FAULT:
            x.log("Unexpected exit reason on vcpu run: %s" % memory_fault_debug(kr))
        else:
            x.log("Failure during vcpu run: %s (os error %d)" % (os.strerror(err), err))
        x.die(FC_EXIT_CODE_GENERIC_ERROR)


class CloudHypervisorLike(Model):
    name = "cloud-hypervisor-like"
    prctl = False
    handles_sigbus = False

    exit_status = 0                     # control_loop's Exit -> Ok(()) -> process::exit(0)

    def on_kvm_error(self, x: Executor, err: int, kr) -> str | None:
        """hypervisor/src/kvm/mod.rs KvmVcpu::run, then vmm/src/cpu.rs: the error is
        logged and exit_evt written; the VMM shuts the VM down."""
        if err == u.EAGAIN:
            return None
        if err in (u.EFAULT, u.EHWPOISON) and kr.exit_reason == u.KVM_EXIT_MEMORY_FAULT:
            why = "Unexpected exit reason on vcpu run: %s" % memory_fault_debug(kr)
        else:
            why = "VCPU error Error(%d)" % err
        x.log("VCPU generated error: VcpuRun(%s)" % why)
        x.die(self.exit_status)


MODELS = {m.name: m for m in (Model, QemuLike, Recovering, FirecrackerLike, CloudHypervisorLike)}
