"""/dev/kvm as a VMM sees it (virt/kvm/kvm_main.c's ioctls): the system fd (Kvm),
a VM fd (Vm), and the guest_memfd conversion call; vCPUs are in vcpu.py."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .. import uapi as u
from . import current
from .vcpu import Vcpu

if TYPE_CHECKING:
    from .task import Task


class KvmCalls:
    """Task's KVM entry points (mixed into Task)."""

    def open_kvm(self) -> Kvm:
        return Kvm(self, self._call("open_kvm"))

    def gmem_convert(self, fd: int, offset: int, size: int, private: bool) -> None:
        """In-place conversion of a guest_memfd range (KVM_GMEM_CONVERT_PRIVATE/_SHARED)."""
        self._call("gmem_convert", fd=fd, offset=offset, size=size, private=private)


class Kvm:
    """An open /dev/kvm (the kernel's file is emu.kernel.kvm.KvmDevOps)."""

    def __init__(self, task: Task, fd: int):
        self.task, self.fd = task, fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: KVM_CAP_MCE (the bank limit, 32),
        KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS as 6.18 answers; other caps 0."""
        return self.task._call("check_extension", fd=self.fd, cap=cap)

    def get_mce_cap_supported(self) -> int:
        """KVM_X86_GET_MCE_CAP_SUPPORTED: the MCG_CAP bits KVM_X86_SETUP_MCE accepts."""
        return self.task._call("get_mce_cap_supported", fd=self.fd)

    def create_vm(self, vm_type: int = u.KVM_X86_DEFAULT_VM) -> Vm:
        return Vm(self.task, self.task._call("create_vm", fd=self.fd, type=vm_type), vm_type)


class Vm:
    """A VM fd as the VMM holds it (the kernel's struct kvm is emu.kernel.kvm.Vm)."""

    def __init__(self, task: Task, fd: int, vm_type: int):
        self.task, self.fd, self.type = task, fd, vm_type

    def _t(self) -> Task:
        """The calling thread (a VM handle may be used from any thread of the process)."""
        t = current.task
        return t if t is not None and t.alive else self.task

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (the VM's own answer, e.g. no
        GUEST_MEMFD_FLAG_INIT_SHARED for a VM with private memory)."""
        return self._t()._call("check_extension", fd=self.fd, cap=cap)

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        return self._t()._call("create_guest_memfd", vmfd=self.fd, size=size, flags=flags)

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int,
                                memory_size: int, userspace_addr: int = 0, guest_memfd: int = -1,
                                guest_memfd_offset: int = 0) -> int:
        """KVM_SET_USER_MEMORY_REGION2."""
        return self._t()._call("set_user_memory_region2", vmfd=self.fd, slot=slot, flags=flags,
                               guest_phys_addr=guest_phys_addr, memory_size=memory_size,
                               userspace_addr=userspace_addr, guest_memfd=guest_memfd,
                               guest_memfd_offset=guest_memfd_offset)

    def set_memory_attributes(self, gpa: int, size: int, attributes: int, flags: int = 0) -> int:
        """KVM_SET_MEMORY_ATTRIBUTES."""
        return self._t()._call("set_memory_attributes", vmfd=self.fd, address=gpa, size=size,
                               attributes=attributes, flags=flags)

    def gpa_to_pfn(self, gpa: int) -> dict:
        """Debug view: is gpa mapped in stage-2, to which pfn, at which level, backed by what."""
        return self._t()._call("gpa_to_pfn", vmfd=self.fd, gpa=gpa)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU; the calling thread owns the vCPU and must be the one to run it."""
        t = self._t()
        info = t._call("create_vcpu", vmfd=self.fd, id=vcpu_id)
        return Vcpu(t, self, vcpu_id, info["fd"], info["s2_root"])
