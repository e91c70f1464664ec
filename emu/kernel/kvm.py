"""KVM (virt/kvm/kvm_main.c): /dev/kvm, VMs and their guest_memfd files.

This issue models the VM as the owner of guest_memfd files; memslots, stage-2
and vCPUs build on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import uapi as u
from .fs import File, FileOps, Inode

VM_TYPES = (u.KVM_X86_DEFAULT_VM, u.KVM_X86_SW_PROTECTED_VM, u.KVM_X86_SNP_VM, u.KVM_X86_TDX_VM)


class KvmDevOps(FileOps):
    name = "kvm"


class KvmVmOps(FileOps):
    name = "kvm-vm"


@dataclass(eq=False)
class Vm:
    type: int
    inode: Inode
    gmem: list = field(default_factory=list)


class KVM:
    def __init__(self, k):
        self.k = k

    def open_kvm(self, proc) -> int:
        inode = self.k.new_inode(KvmDevOps(), "/dev/kvm")
        return proc.fd_install(File(inode))

    def create_vm(self, proc, kvm_fd: int, vm_type: int) -> int:
        f = proc.fget(kvm_fd)
        if not isinstance(f.inode.ops, KvmDevOps):
            raise OSError(u.ENOTTY, "KVM_CREATE_VM on a non-KVM fd")
        if vm_type not in VM_TYPES:
            raise OSError(u.EINVAL, "KVM_CREATE_VM type")
        inode = self.k.new_inode(KvmVmOps(), "kvm-vm")
        inode.private["vm"] = Vm(vm_type, inode)
        return proc.fd_install(File(inode))

    def vm_of(self, proc, vm_fd: int) -> Vm:
        f = proc.fget(vm_fd)
        if not isinstance(f.inode.ops, KvmVmOps):
            raise OSError(u.ENOTTY, "not a VM fd")
        return f.inode.private["vm"]

    def create_guest_memfd(self, proc, vm_fd: int, size: int, flags: int) -> int:
        from .guest_memfd import kvm_gmem_create

        vm = self.vm_of(proc, vm_fd)
        fd = kvm_gmem_create(self.k, proc, vm, size, flags)
        vm.gmem.append(proc.fget(fd).inode)
        return fd

    def gmem_invalidate(self, inode: Inode, start: int, end: int) -> None:
        """Zap stage-2 for [start, end) of a guest_memfd in every bound slot."""
        self.k.trace("gmem_invalidate", ino=inode.ino, start=start, end=end)
