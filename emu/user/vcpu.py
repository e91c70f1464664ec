"""A vCPU as a VMM drives it (virt/kvm/kvm_main.c's vCPU ioctls, KVM_RUN and its
struct kvm_run): the run loop interprets the guest program (a generator, see
emu.guest), runs its memory ops through stage-2 in this process, and takes faults,
machine checks and emulated instructions to the kernel on this thread.  Machine
checks for the guest (KVM_X86_SETUP_MCE/SET_MCE, QEMU's kvm_mce_inject) reach the
guest-kernel model of emu.guest before its next instruction."""
from __future__ import annotations

import base64
import os
from typing import TYPE_CHECKING

from .. import _core as C
from .. import uapi as u
from . import signal as usignal

if TYPE_CHECKING:
    from .kvm import Vm
    from .task import Task

class MemoryFault:
    __slots__ = ("flags", "gpa", "size")

    def __init__(self):
        self.flags = self.gpa = self.size = 0

    def __repr__(self):
        return "memory_fault(flags=%#x, gpa=%#x, size=%d)" % (self.flags, self.gpa, self.size)


class Internal:
    """kvm_run.internal (KVM_EXIT_INTERNAL_ERROR)."""
    __slots__ = ("ndata", "suberror", "flags", "insn_size")

    def __init__(self):
        self.suberror = self.ndata = self.flags = self.insn_size = 0

    def __repr__(self):
        return "internal(suberror=%d, ndata=%d, flags=%#x, insn_size=%d)" % (
            self.suberror, self.ndata, self.flags, self.insn_size)


class KvmRun:
    """The parts of struct kvm_run a VMM reads after KVM_RUN."""

    def __init__(self):
        self.exit_reason = u.KVM_EXIT_UNKNOWN
        self.memory_fault = MemoryFault()
        self.internal = Internal()

    def __repr__(self):
        return "kvm_run(exit_reason=%d, %r)" % (self.exit_reason, self.memory_fault)


_FAULT_AHEAD = 512       # pages a stage-2 fault request may resolve in one round trip


class Vcpu:
    """A vCPU fd and its thread's view of it (the kernel's struct kvm_vcpu is
    emu.kernel.kvm.Vcpu); only the creating thread may run it."""

    def __init__(self, task: Task, vm: Vm, vcpu_id: int, fd: int, s2_root: int):
        self.task, self.vm, self.id, self.fd, self.s2 = task, vm, vcpu_id, fd, s2_root
        self.owner = os.getpid()
        self.kvm_run = KvmRun()
        self._gen = None
        self._fn = None
        self._op = None
        self._pos = 0
        self._value = None
        self._ucall = (u.UCALL_NONE, ())
        from ..guest import GuestKernel

        self.guest_kernel = GuestKernel()
        self.fault_requests = 0          # stage-2 fault round trips to the kernel (statistics)
        self._pending_mce: list[dict] = []
        self._in_mc: list[tuple] = []    # #MC handlers running guest code: interrupted programs
        self._shutdown = False

    # ---- machine checks for the guest (QEMU: kvm_mce_inject) ----
    def setup_mce(self, mcg_cap: int) -> int:
        """KVM_X86_SETUP_MCE."""
        return self.task._call("setup_mce", vcpu=self.fd, mcg_cap=mcg_cap)

    def set_mce(self, mce) -> int:
        """KVM_X86_SET_MCE with a uapi.KvmX86Mce.  Call it from the vCPU's own thread,
        as QEMU does with run_on_cpu()."""
        if os.getpid() != self.owner:
            raise OSError(u.EPERM, "KVM_X86_SET_MCE from a thread that does not own vCPU %d" % self.id)
        r = self.task._call("set_mce", vcpu=self.fd, status=mce.status, addr=mce.addr, misc=mce.misc,
                            mcg_status=mce.mcg_status, bank=mce.bank)
        if r.get("cmci"):                        # a UCNA signalled by CMCI (APIC_LVTCMCI)
            self.guest_kernel.cmci.append(mce.bank)
        if r.get("triple_fault"):
            self._shutdown = True
        elif r.get("inject"):
            self._pending_mce.append(r["inject"])
        return 0

    def mce_state(self) -> dict:
        """KVM's view of the vCPU's machine-check MSRs: cr4_mce, mcg_status, mcg_cap,
        banks ([CTL, STATUS, ADDR, MISC] each), mci_ctl2 (per bank with MCG_CMCI_P)
        and cmci (the banks whose UCNA was signalled by CMCI, in order)."""
        return self.task._call("guest_state", vcpu=self.fd)

    def _deliver_mce(self) -> int | None:
        """The queued #MC reaches the guest kernel before its next instruction."""
        ev = self._pending_mce.pop(0)
        gk = self.guest_kernel
        outcome = gk.handler(gk, ev)
        if callable(outcome):
            # a handler that runs guest code (a guest program fn(g, ev) returning the
            # outcome) before it returns: MCG_STATUS.MCIP stays set meanwhile
            from ..guest import G

            self._in_mc.append((ev, self._gen, self._op, self._pos, self._value))
            self._gen, self._op, self._pos, self._value = outcome(G, ev), None, 0, None
            return None
        return self._mce_done(ev, outcome)

    def _mce_done(self, ev: dict, outcome: str) -> int | None:
        """The guest's #MC handler returned with `outcome`."""
        from ..guest import GuestTaskKilled

        if outcome == "panic":
            return u.KVM_EXIT_HLT
        # the handler clears MCi_STATUS and MCG_STATUS.MCIP (mce_clear_state, mce_wrmsrl)
        self.task._call("guest_state", vcpu=self.fd, mcg_status=0, clear_bank=ev["bank"])
        if outcome == "killed":
            self._value, self._pos = None, 0
            try:
                self._op = self._gen.throw(GuestTaskKilled(ev["addr"]))
            except (StopIteration, GuestTaskKilled):
                self._gen, self._op = None, None
                return u.KVM_EXIT_HLT
        return None

    def reset(self) -> None:
        """The VMM resets the vCPU at a system reset (QEMU: x86_cpu_reset_hold, then
        KVM_SET_SREGS/KVM_SET_MSRS in kvm_arch_put_registers): CR4 and MCG_STATUS
        cleared, no triple fault or #MC pending, a guest kernel that has not booted.
        Call set_guest() next."""
        if os.getpid() != self.owner:
            raise OSError(u.EPERM, "reset from a thread that does not own vCPU %d" % self.id)
        from ..guest import GuestKernel

        self.task._call("guest_state", vcpu=self.fd, cr4_mce=False, mcg_status=0)
        self._shutdown = False
        self._pending_mce.clear()
        self._in_mc.clear()
        self.guest_kernel = GuestKernel()
        self._fn = self._gen = self._op = None

    def set_guest(self, fn, *args) -> None:
        """The guest program: a generator function fn(g, *args).  Set while the
        guest's #MC handler runs guest code, it runs inside that handler: MCIP stays
        set until the handler's own program returns."""
        from ..guest import G

        self._fn, self._gen, self._op, self._pos, self._value = fn, fn(G, *args), None, 0, None

    def ucall(self):
        """(cmd, args) of the last KVM_EXIT_IO ucall."""
        return self._ucall

    def run(self) -> int:
        """KVM_RUN: 0 on an exit (see kvm_run.exit_reason); OSError(errno) for -1."""
        if os.getpid() != self.owner:
            raise OSError(u.EPERM, "KVM_RUN from a thread that does not own vCPU %d" % self.id)
        if self._fn is None:
            raise OSError(u.ENOEXEC, "no guest program (vcpu.set_guest)")
        kr = self.kvm_run
        kr.exit_reason = u.KVM_EXIT_UNKNOWN
        sig0 = usignal.delivered
        while True:
            if usignal.delivered != sig0:
                kr.exit_reason = u.KVM_EXIT_INTR
                raise OSError(u.EINTR, "KVM_RUN interrupted by a signal")
            if self._shutdown:                       # triple fault: the VM needs a reset
                kr.exit_reason = u.KVM_EXIT_SHUTDOWN
                return 0
            if self.guest_kernel.panicked:
                kr.exit_reason = u.KVM_EXIT_HLT
                return 0
            if self._pending_mce:
                reason = self._deliver_mce()
                if reason is not None:
                    kr.exit_reason = reason
                    return 0
                continue
            if self._gen is None:
                kr.exit_reason = u.KVM_EXIT_HLT
                return 0
            if self._op is None:
                try:
                    self._op = self._gen.send(self._value)
                except StopIteration as e:
                    if self._in_mc:              # the #MC handler returns
                        ev, self._gen, self._op, self._pos, self._value = self._in_mc.pop()
                        reason = self._mce_done(ev, e.value or "recovered")
                        if reason is not None:
                            kr.exit_reason = reason
                            return 0
                        continue
                    self._gen = None
                    kr.exit_reason = u.KVM_EXIT_HLT
                    return 0
                self._value, self._pos = None, 0
            op = self._op
            kind = op[0]
            if kind == "ucall":
                self._ucall = (op[1], op[2])
                self._op = None
                kr.exit_reason = u.KVM_EXIT_IO
                return 0
            if kind == "hlt":
                self._op = None
                kr.exit_reason = u.KVM_EXIT_HLT
                return 0
            if kind == "cr4_mce":
                self.task._call("guest_state", vcpu=self.fd, cr4_mce=op[1])
                self.guest_kernel.cr4_mce = op[1]
                self._op = None
                continue
            if kind == "mci_ctl2":
                self.task._call("guest_state", vcpu=self.fd, mci_ctl2=[op[1], op[2]])
                self._op = None
                continue
            if kind == "mce_bank":
                bank = self.task._call("guest_state", vcpu=self.fd)["banks"]
                if not 0 <= op[1] < len(bank):
                    raise OSError(u.EINVAL, "rdmsr MC%d: #GP" % op[1])
                self._op, self._value = None, tuple(bank[op[1]][1:4])
                continue
            if kind == "mode":
                self.guest_kernel.mode = op[1]
                self._op = None
                continue
            if kind in ("emulate", "kvm_map_read"):
                reason = self._kvm_read(op)
                if reason is not None:
                    kr.exit_reason = reason
                    return 0
                continue
            exit_ = self._access(op)
            if exit_ is None:
                continue
            return exit_

    def _kvm_read(self, op) -> int | None:
        """KVM itself reads guest memory for this vCPU: an instruction it emulates
        (a copy from user: an error is an emulation failure) or a page it maps into
        the kernel (a plain load).  The exit reason to return, or None to go on."""
        from ..guest import GuestTaskKilled

        kind, gpa, n = op
        gk = self.guest_kernel
        r = self.task._call("kvm_guest_read", vcpu=self.fd, gpa=gpa, n=n,
                            how="emulate" if kind == "emulate" else "map",
                            cpl=3 if gk.mode == "user" else 0)
        if r.get("exit"):                   # the instruction stays where it was
            ex, internal = r["exit"], self.kvm_run.internal
            internal.suberror = ex["suberror"]
            internal.ndata, internal.flags = ex.get("ndata", 0), ex.get("flags", 0)
            internal.insn_size = ex.get("insn_size", 0)
            return r["exit"]["reason"]
        self._op, self._pos = None, 0
        if r.get("ud"):                     # #UD at CPL 3: the guest kernel kills the task
            gk.log.append("traps: guest-task trap invalid opcode ip:%x" % gpa)
            gk.killed += 1
            try:
                self._op = self._gen.throw(GuestTaskKilled(gpa))
            except (StopIteration, GuestTaskKilled):
                self._gen = None
                return u.KVM_EXIT_HLT
            self._value = None
            return None
        self._value = None if r["data"] is None else base64.b64decode(r["data"])
        return None

    def _access(self, op):
        """Run one memory op through stage-2: None when it completed or is to be
        retried (run() checks for a handled signal first), else the exit."""
        t = self.task
        rd, wr, bt = t._rd, t._wr, t._bt           # the CPU: Cython core or the reference
        kind, priv = op[0], op[3]
        cpriv = -1 if priv is None else int(bool(priv))
        while True:
            if kind in ("read", "write"):
                gpa, n = op[1], (op[2] if kind == "read" else len(op[2]))
                if self._value is None and kind == "read":
                    self._value = bytearray(n)
                buf = self._value if kind == "read" else op[2]
                mv = memoryview(buf)[self._pos:]
                if kind == "read":
                    done, st, xva, xpfn = rd(t.slot, self.s2, gpa + self._pos, mv, cpriv)
                else:
                    done, st, xva, xpfn = wr(t.slot, self.s2, gpa + self._pos, mv, cpriv)
                self._pos += done
                if st == C.ACC_FAULT:
                    ahead = list(range(xva & ~0xFFF, min(gpa + n, (xva & ~0xFFF) + _FAULT_AHEAD * 4096),
                                       4096))
            else:
                gpas, size = op[1], op[2]
                if self._value is None:
                    self._value = bytearray(len(gpas) * size) if kind == "read_batch" else op[4]
                self._pos, st, xva, xpfn, _p = bt(
                    t.slot, self.s2, gpas, self._pos, size, self._value, kind == "write_batch", cpriv)
                if st == C.ACC_FAULT:
                    ahead = pages_ahead(gpas, self._pos, size)
            if st == C.ACC_OK:
                self._op = None
                if kind in ("read", "read_batch"):
                    self._value = bytes(self._value)
                else:
                    self._value = None
                return None
            if st == C.ACC_MCE:
                # a machine check in guest mode: handled on this thread (current)
                t._call("mce", addr=xva, pfn=xpfn, guest=True)
                return None     # run() goes on: EINTR if a signal was handled, else a retry
            if st != C.ACC_FAULT:
                raise OSError(u.EFAULT, "bad frame in a stage-2 entry")
            self.fault_requests += 1
            rep = t._call("kvm_fault", vcpu=self.fd, gpas=ahead, write=kind.startswith("write"),
                          private=priv)
            ex = rep["exit"]
            if ex is None:
                continue
            kr = self.kvm_run
            if ex["reason"] is not None:
                kr.exit_reason = ex["reason"]
            if ex["reason"] == u.KVM_EXIT_MEMORY_FAULT:
                mf = kr.memory_fault
                mf.gpa, mf.size, mf.flags = ex["gpa"], ex["size"], ex["flags"]
            if ex["errno"] == u.EINTR or ex["reason"] is None and ex["errno"] == 0:
                return None     # the same
            if ex["errno"]:
                raise OSError(ex["errno"], os.strerror(ex["errno"]))
            return 0


def pages_ahead(gpas, start, size):
    out, seen = [], set()
    for i in range(start, min(len(gpas), start + _FAULT_AHEAD * 4)):
        for p in (gpas[i] & ~0xFFF, (gpas[i] + size - 1) & ~0xFFF):
            if p not in seen:
                seen.add(p)
                out.append(p)
        if len(out) >= _FAULT_AHEAD:
            break
    return out
