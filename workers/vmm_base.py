"""What the VMM workers share: guest RAM, one vCPU running guest accesses, a log.

A worker is one emulated process.  Its main thread runs both the vCPU loop and the
device model (a host access to guest RAM, as a virtio queue read does): a
one-vCPU microVM.  Real VMMs run each vCPU in its own thread, but for the events
modelled here the outcome is the same: Firecracker's SIGBUS handler _exit()s the
whole process from whichever thread got the signal, and a default SIGBUS action
takes the whole thread group (cloud-hypervisor).

Guest RAM layouts (`ram=`):
- "anon": MAP_PRIVATE|MAP_ANONYMOUS memory on an ordinary memslot (Firecracker's
  and cloud-hypervisor's default guest memory);
- "gmem": one guest_memfd (MMAP|INIT_SHARED) mapped shared and bound to a
  gmem-only memslot; a page becomes private by in-place conversion
  (make_private), and the host cannot map it then.
"""
from __future__ import annotations

import os
import signal
from typing import NoReturn

import emu
from emu import uapi as u
from workers import guest_programs, models

PAGE = models.PAGE


class HostFault(Exception):
    """Raised out of the SIGBUS handler during a host access (siglongjmp)."""


class GuestRam:
    def __init__(self, task, kind: str = "anon", size: int = 16 * PAGE):
        if kind not in ("anon", "gmem"):
            raise ValueError("ram: 'anon' or 'gmem'")
        self.task, self.kind, self.size = task, kind, size
        self.kvm = task.open_kvm()
        self.vm = self.kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM if kind == "gmem"
                                     else u.KVM_X86_DEFAULT_VM)
        rw = u.PROT_READ | u.PROT_WRITE
        if kind == "anon":
            self.gmem = None
            self.hva = task.mmap(0, size, rw, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
            self.vm.set_user_memory_region2(0, 0, 0, size, self.hva)
        else:
            self.gmem = self.vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP
                                                   | u.GUEST_MEMFD_FLAG_INIT_SHARED)
            self.hva = task.mmap(0, size, rw, u.MAP_SHARED, self.gmem, 0)
            self.vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, size, self.hva,
                                            self.gmem, 0)

    def contains(self, hva: int) -> bool:
        return self.hva <= hva < self.hva + self.size

    def gpa(self, hva: int) -> int:
        return hva - self.hva

    def make_private(self, gpa: int, size: int = PAGE) -> None:
        self.task.gmem_convert(self.gmem, gpa, size, True)

    def pfn(self, gpa: int) -> int:
        """The frame backing gpa (the guest touched it or the host faulted it in)."""
        return self.vm.gpa_to_pfn(gpa)["backing_pfn"]




class Vmm:
    """The common part: guest RAM, one vCPU, a log; `model` (workers/models.py)
    decides what a SIGBUS and a KVM_RUN error turn into, and this class carries
    the decisions out.  It carries out those of the models that do not inject
    into the guest (none, firecracker-like, cloud-hypervisor-like); the QEMU
    models run in workers/qemu_like.py, whose threads do the whole Executor."""

    name = "vmm"
    model: models.Model = models.Model()

    def __init__(self, task, ram: str = "anon", ram_size: int = 16 * PAGE, log_fd: int = 2):
        self.task, self.log_fd = task, log_fd
        self.lines: list[str] = []
        self.sigbus: list[tuple[int, int, int]] = []       # (si_code, si_addr, si_addr_lsb)
        self._host_access = False
        self.install_signal_handlers()
        self.ram = GuestRam(task, ram, ram_size)
        self.vcpu = self.ram.vm.create_vcpu(0)
        self.vcpu.setup_mce(models.MCG_CAP)
        self.vcpu.set_guest(guest_programs.boot)
        self._run()

    # ---- output ----
    def log(self, text: str) -> None:
        self.lines.append(text)
        os.write(self.log_fd, (text + "\n").encode())

    # ---- the executor of the model's decisions (workers/models.py Executor) ----
    def install_signal_handlers(self) -> None:
        if not self.model.handles_sigbus:
            emu.sigaction(signal.SIGBUS, signal.SIG_DFL)
            return

        def on_sigbus(signum, info):
            self.sigbus.append((info.si_code, info.si_addr, info.si_addr_lsb))
            self.model.on_sigbus(self, info, vcpu=not self._host_access)

        emu.sigaction(signal.SIGBUS, on_sigbus)

    def die(self, status: int) -> NoReturn:
        """The log is already written (log_fd); the process ends, the kernel
        tears its VM and mappings down."""
        os._exit(status)

    def unwind(self, code: int) -> NoReturn:
        raise HostFault(code)

    def on_kvm_error(self, err: int, kvm_run) -> str | None:
        """KVM_RUN returned -1 with errno err (not EINTR): None re-enters, a string
        ends the access with that result."""
        return self.model.on_kvm_error(self, err, kvm_run)

    def on_eintr(self) -> str | None:
        return self.model.post_run(self)

    # ---- the guest and the device model ----
    def guest_read(self, gpa: int, n: int = 8, private: bool | None = None):
        """The guest reads n bytes at gpa; its result (bytes, ("killed", va), or
        what a hook decided)."""
        self.vcpu.set_guest(guest_programs.access, gpa, n, private)
        return self._run()

    def guest_write(self, gpa: int, data: bytes, private: bool | None = None):
        """The guest stores data at gpa; len(data), or as guest_read."""
        self.vcpu.set_guest(guest_programs.access, gpa, len(data), private, data)
        return self._run()

    def host_read(self, gpa: int, n: int = 8) -> bytes:
        """The device model reads guest RAM through the host mapping."""
        self._host_access = True
        try:
            return self.task.read(self.ram.hva + gpa, n)
        finally:
            self._host_access = False

    def host_write(self, gpa: int, data: bytes) -> None:
        """The VMM writes guest RAM (loading the kernel image, a virtio reply)."""
        self._host_access = True
        try:
            self.task.write(self.ram.hva + gpa, data)
        finally:
            self._host_access = False

    def _run(self):
        vcpu = self.vcpu
        while True:
            try:
                vcpu.run()
            except OSError as e:
                out = self.on_eintr() if e.errno == u.EINTR else self.on_kvm_error(e.errno,
                                                                                   vcpu.kvm_run)
                if out is not None:
                    return out
                continue
            kr = vcpu.kvm_run
            if kr.exit_reason == u.KVM_EXIT_IO:
                cmd, args = vcpu.ucall()
                if cmd == u.UCALL_SYNC:
                    return args[0] if len(args) == 1 else args
            return "exit %d" % kr.exit_reason

    def close(self) -> None:
        """Tear the VM down: the vCPU, the VM, guest RAM."""
        t = self.task
        for fd in (self.vcpu.fd, self.ram.gmem, self.ram.vm.fd, self.ram.kvm.fd):
            if fd is not None:
                t.close(fd)
        t.munmap(self.ram.hva, self.ram.size)

