"""KVM (virt/kvm/kvm_main.c, arch/x86/kvm/mmu): VMs, memslots, stage-2, vCPU faults.

Stage-2 tables live in the shared core in the same 4-level format as host page
tables (gfn -> pfn), so a vCPU worker's fast path walks them exactly like the
host MMU.  This module fills them on stage-2 faults and zaps them on guest_memfd
invalidation and on MMU-notifier events from the host mm.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import _core as C
from .. import uapi as u
from .fs import File, FileOps, Inode
from .mm import PAGE_SHIFT, PAGE_SIZE, VM_FAULT_HWPOISON, VM_FAULT_HWPOISON_LARGE
from .uaccess import copy_from_user

VM_TYPES = (u.KVM_X86_DEFAULT_VM, u.KVM_X86_SW_PROTECTED_VM, u.KVM_X86_SNP_VM, u.KVM_X86_TDX_VM)
CONFIDENTIAL = (u.KVM_X86_SNP_VM, u.KVM_X86_TDX_VM)
KVM_MEM_SLOTS_NUM = 32767
KVM_EXIT_MMIO = 6
X86_MAX_INSTRUCTION_LENGTH = 15

# the kernel paths of KVM's own reads of guest memory, for a machine check's call trace
_FETCH_STACK = ("copy_user_generic", "__kvm_read_guest_page", "kvm_vcpu_read_guest_page",
                "kvm_fetch_guest_virt", "x86_decode_insn", "x86_emulate_instruction",
                "kvm_mmu_page_fault", "vcpu_enter_guest", "kvm_arch_vcpu_ioctl_run",
                "kvm_vcpu_ioctl", "__x64_sys_ioctl", "do_syscall_64")
_MAP_STACK = ("kvm_vcpu_map", "handle_vmptrld", "vmx_handle_exit", "vcpu_enter_guest",
              "kvm_arch_vcpu_ioctl_run", "kvm_vcpu_ioctl", "__x64_sys_ioctl", "do_syscall_64")


class KvmDevOps(FileOps):
    """/dev/kvm, a misc character device on devtmpfs (opened by do_dentry_open:
    FMODE_PREAD); kvm_chardev_ops has noop_llseek and no read."""

    name = "kvm"
    fmode_pread = True
    statfs_magic = u.TMPFS_MAGIC
    st_mode = u.S_IFCHR | 0o666
    st_rdev = (232 & 0xFF) | (10 << 8)     # new_encode_dev(MKDEV(MISC_MAJOR, KVM_MINOR))


class KvmVmOps(FileOps):
    name = "kvm-vm"

    def release(self, k, inode: Inode) -> None:
        inode.nlink -= 1
        if inode.nlink <= 0:
            k.kvm.release_vm(inode.private["vm"])
            k.inode_release(inode)


class KvmVcpuOps(FileOps):
    name = "kvm-vcpu"


@dataclass(eq=False)
class Memslot:
    id: int
    flags: int
    gpa: int
    size: int
    hva: int
    gmem: Inode | None = None
    gmem_off: int = 0

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT

    def covers(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size

    @property
    def gmem_only(self) -> bool:
        """KVM_MEMSLOT_GMEM_ONLY: bound to an mmap-able guest_memfd, every access
        (shared or private) goes through the file."""
        return self.gmem is not None and bool(self.gmem.flags & u.GUEST_MEMFD_FLAG_MMAP)


@dataclass(eq=False)
class Vm:
    type: int
    inode: Inode
    proc: object                       # the VMM process (its mm backs ordinary slots)
    s2_root: int
    slots: dict = field(default_factory=dict)
    private_gfns: set = field(default_factory=set)   # KVM_MEMORY_ATTRIBUTE_PRIVATE
    vcpus: dict = field(default_factory=dict)
    gmem: list = field(default_factory=list)

    @property
    def has_private_mem(self) -> bool:
        return self.type != u.KVM_X86_DEFAULT_VM

    def slot_for(self, gpa: int) -> Memslot | None:
        for s in self.slots.values():
            if s.covers(gpa):
                return s
        return None


KVM_MAX_MCE_BANKS = 32
# kvm_caps.supported_mce_cap on VMX: MCG_CTL_P | MCG_SER_P (x86.c), MCG_LMCE_P and,
# since 6.0, MCG_CMCI_P (vmx.c hardware_setup)
KVM_MCE_CAP_SUPPORTED = u.MCG_CTL_P | u.MCG_SER_P | u.MCG_LMCE_P | u.MCG_CMCI_P


@dataclass(eq=False)
class Vcpu:
    id: int
    vm: Vm
    owner: int                         # tid of the thread that created it
    mcg_cap: int = 0
    mcg_ctl: int = 0
    mcg_status: int = 0
    mce_banks: list = field(default_factory=list)   # 4 per bank: CTL, STATUS, ADDR, MISC
    mci_ctl2_banks: list = field(default_factory=list)   # MSR_IA32_MCx_CTL2 (with MCG_CMCI_P)
    cr4_mce: bool = False
    cmci: list = field(default_factory=list)   # CMCIs delivered through APIC_LVTCMCI (banks)


class KVM:
    def __init__(self, k):
        self.k = k
        self.vms: list[Vm] = []

    # ------------------------------------------------------------ /dev/kvm and VMs
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
        try:
            root = self.k.core.pt_alloc()
        except MemoryError:
            self.k.inode_release(inode)
            raise OSError(u.ENOMEM, "KVM_CREATE_VM: page-table pool exhausted") from None
        vm = Vm(vm_type, inode, proc, root)
        inode.private["vm"] = vm
        self.vms.append(vm)
        return proc.fd_install(File(inode))

    def vm_of(self, proc, vm_fd: int) -> Vm:
        f = proc.fget(vm_fd)
        if not isinstance(f.inode.ops, KvmVmOps):
            raise OSError(u.ENOTTY, "not a VM fd")
        return f.inode.private["vm"]

    def release_vm(self, vm: Vm) -> None:
        for s in list(vm.slots.values()):
            self._delete_slot(vm, s)
        self.k.defer_pt_free(self.k.core.pt_tables(vm.s2_root))
        if vm in self.vms:
            self.vms.remove(vm)

    def create_guest_memfd(self, proc, vm_fd: int, size: int, flags: int) -> int:
        from .guest_memfd import kvm_gmem_create

        vm = self.vm_of(proc, vm_fd)
        fd = kvm_gmem_create(self.k, proc, vm, size, flags)
        vm.gmem.append(proc.fget(fd).inode)
        return fd

    # ------------------------------------------------------------ memslots
    def set_user_memory_region2(self, proc, vm_fd: int, slot: int, flags: int, gpa: int,
                                size: int, hva: int, gmem_fd: int, gmem_off: int) -> int:
        vm = self.vm_of(proc, vm_fd)
        # check_memory_region_flags: no dirty logging of guest_memfd slots, and
        # guest_memfd is incompatible with read-only slots
        valid = u.KVM_MEM_LOG_DIRTY_PAGES | u.KVM_MEM_GUEST_MEMFD
        if flags & u.KVM_MEM_GUEST_MEMFD:
            valid &= ~u.KVM_MEM_LOG_DIRTY_PAGES
        else:
            valid |= u.KVM_MEM_READONLY
        if flags & ~valid:
            raise OSError(u.EINVAL, "memslot flags")
        if not 0 <= slot < KVM_MEM_SLOTS_NUM:
            raise OSError(u.EINVAL, "memslot id")
        if size % PAGE_SIZE or gpa % PAGE_SIZE or hva % PAGE_SIZE or size < 0 or gpa < 0:
            raise OSError(u.EINVAL, "memslot alignment")
        if gpa + size > 1 << 52 or hva + size > 1 << 47:
            raise OSError(u.EINVAL, "memslot range")
        old = vm.slots.get(slot)
        if size == 0:                                     # delete
            if old is not None:
                self._delete_slot(vm, old)
            return 0
        if old is not None:
            raise OSError(u.EINVAL, "memslot %d exists: moving or resizing is not emulated" % slot)
        for s in vm.slots.values():
            if s.gpa < gpa + size and gpa < s.gpa + s.size:
                raise OSError(u.EEXIST, "memslot overlaps slot %d" % s.id)
        gmem = None
        if flags & u.KVM_MEM_GUEST_MEMFD:
            f = proc.fget(gmem_fd)
            gmem = f.inode
            from .guest_memfd import GuestMemfdOps

            if not isinstance(gmem.ops, GuestMemfdOps) or gmem.private.get("vm") is not vm:
                raise OSError(u.EINVAL, "not a guest_memfd of this VM")
            if gmem_off < 0 or gmem_off % PAGE_SIZE or gmem_off + size > gmem.size:
                raise OSError(u.EINVAL, "guest_memfd offset")
            for s in vm.slots.values():              # kvm_gmem_bind: no overlapping binding
                if s.gmem is gmem and s.gmem_off < gmem_off + size and gmem_off < s.gmem_off + s.size:
                    raise OSError(u.EINVAL, "guest_memfd range already bound")
            gmem.nlink += 1                          # the binding holds the file
        else:
            proc.mm.kvm_users += 1                   # MMU notifier on the VMM's mm
        ms = Memslot(slot, flags, gpa, size, hva, gmem, gmem_off)
        vm.slots[slot] = ms
        self.k.trace("kvm_memslot", slot=slot, gpa=gpa, size=size, hva=hva,
                     gmem=gmem.ino if gmem else 0)
        return 0

    def _delete_slot(self, vm: Vm, s: Memslot) -> None:
        self.zap_gfn_range(vm, s.gpa >> PAGE_SHIFT, (s.gpa + s.size) >> PAGE_SHIFT)
        del vm.slots[s.id]
        if s.gmem is not None:
            s.gmem.ops.release(self.k, s.gmem)
        else:
            vm.proc.mm.kvm_users -= 1

    def set_memory_attributes(self, proc, vm_fd: int, gpa: int, size: int, attrs: int,
                              flags: int = 0) -> int:
        vm = self.vm_of(proc, vm_fd)
        if not vm.has_private_mem:
            raise OSError(u.EINVAL, "KVM_SET_MEMORY_ATTRIBUTES needs a VM with private memory")
        if flags or attrs & ~u.KVM_MEMORY_ATTRIBUTE_PRIVATE:
            raise OSError(u.EINVAL, "memory attributes")
        if size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE or gpa + size > 1 << 52:
            raise OSError(u.EINVAL, "memory attributes range")
        lo, hi = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
        if attrs & u.KVM_MEMORY_ATTRIBUTE_PRIVATE:
            vm.private_gfns.update(range(lo, hi))
        else:
            vm.private_gfns.difference_update(range(lo, hi))
        self.zap_gfn_range(vm, lo, hi)              # kvm_vm_set_mem_attributes: unmap the range
        return 0

    # ------------------------------------------------------------ stage-2
    def zap_gfn_range(self, vm: Vm, lo: int, hi: int) -> int:
        core, n = self.k.core, 0
        for gpa, e, level in core.pt_scan(vm.s2_root, lo << PAGE_SHIFT, hi << PAGE_SHIFT):
            if e & C.PTE_PRESENT:
                core.pte_xchg(vm.s2_root, gpa, 0, level)     # a huge entry goes whole
                n += 1 << (9 * (level - 1))
        if n:
            self.k.trace("kvm_zap", gfn=lo, npages=hi - lo, zapped=n)
        return n

    def gmem_invalidate(self, inode: Inode, start: int, end: int) -> None:
        """kvm_gmem_invalidate_begin: zap stage-2 for [start, end) of the file in every
        bound slot."""
        for vm, lo, hi in self._gmem_gfns(inode, start, end):
            self.zap_gfn_range(vm, lo, hi)

    def _gmem_gfns(self, inode: Inode, start: int, end: int):
        """(vm, first gfn, last gfn + 1) for [start, end) of the file in every bound slot."""
        for vm in self.vms:
            for s in vm.slots.values():
                if s.gmem is not inode:
                    continue
                lo = max(start, s.gmem_off >> PAGE_SHIFT)
                hi = min(end, (s.gmem_off >> PAGE_SHIFT) + s.npages)
                if lo < hi:
                    base = (s.gpa >> PAGE_SHIFT) - (s.gmem_off >> PAGE_SHIFT)
                    yield vm, base + lo, base + hi

    def split_huge_spte(self, vm: Vm, gpa: int, level: int) -> None:
        """Replace the huge stage-2 leaf at gpa (`level`) with 512 entries one level down
        mapping the same pages with the same bits (KVM's huge page split, TDX demote):
        nothing is unmapped.  A vCPU that looks in between faults and waits for us."""
        core = self.k.core
        size = 1 << (PAGE_SHIFT + 9 * (level - 1))
        base = gpa & ~(size - 1)
        if core.pt_free < 1:        # no table for the 512 entries: zap instead, as KVM
            #                         does when its split cannot allocate (the guest refaults)
            self.zap_gfn_range(vm, base >> PAGE_SHIFT, (base + size) >> PAGE_SHIFT)
            return
        old = core.pte_xchg(vm.s2_root, base, 0, level)
        bits = old & ~C.PTE_PFN_MASK
        if level == 2:
            bits &= ~C.PTE_PSE
        pfn0, step = (old & C.PTE_PFN_MASK) >> PAGE_SHIFT, size >> 9
        for i in range(512):
            core.pte_set(vm.s2_root, base + i * step, ((pfn0 + i * (step >> PAGE_SHIFT)) << PAGE_SHIFT)
                         | bits, level - 1)
        self.k.trace("kvm_split", gfn=base >> PAGE_SHIFT, level=level)

    def gmem_split_huge(self, inode: Inode, start: int, end: int) -> None:
        """Split every huge stage-2 entry over [start, end) of the file down to 4K."""
        core = self.k.core
        for vm, lo, hi in self._gmem_gfns(inode, start, end):
            todo = [(gpa, level) for gpa, e, level in
                    core.pt_scan(vm.s2_root, lo << PAGE_SHIFT, hi << PAGE_SHIFT)
                    if level > 1 and e & C.PTE_PRESENT]
            while todo:
                gpa, level = todo.pop()
                self.split_huge_spte(vm, gpa, level)
                if level > 2:
                    size = 1 << (PAGE_SHIFT + 9 * (level - 1))
                    todo += [(gpa + i * (size >> 9), level - 1) for i in range(512)]

    def gmem_zap_page(self, inode: Inode, index: int) -> None:
        """Zap the stage-2 entry of one page of the file in every bound slot; a huge
        entry over it is split first, one level at a time, so the rest stays mapped."""
        core = self.k.core
        for vm, gfn, _hi in self._gmem_gfns(inode, index, index + 1):
            gpa = gfn << PAGE_SHIFT
            while True:
                e, level = core.walk(vm.s2_root, gpa)
                if not e & C.PTE_PRESENT or level <= 1:
                    break
                self.split_huge_spte(vm, gpa, level)
            self.zap_gfn_range(vm, gfn, gfn + 1)

    def mmu_notifier_invalidate(self, mm, va: int, size: int = PAGE_SIZE) -> None:
        """kvm_mmu_notifier_invalidate_range_start: the host is about to change
        [va, va + size) of mm (a zap, a migration; a huge entry covers its whole
        range): drop the stage-2 mappings made from it."""
        core = self.k.core
        for vm in self.vms:
            if vm.proc.mm is not mm:
                continue
            for s in vm.slots.values():
                lo, hi = max(va, s.hva), min(va + size, s.hva + s.size)
                if s.gmem_only or lo >= hi:
                    continue
                for gpa, e, level in core.pt_scan(vm.s2_root, s.gpa + (lo - s.hva),
                                                  s.gpa + (hi - s.hva)):
                    if e & C.PTE_PRESENT:
                        core.pte_xchg(vm.s2_root, gpa, 0, level)

    # ------------------------------------------------------------ stage-2 faults
    def page_fault(self, t, vm: Vm, gpa: int, write: bool, private) -> dict | None:
        """kvm_mmu_page_fault for one gfn: None when mapped (retry the access), or
        the exit KVM_RUN reports: {"reason", "errno", "gpa", "size", "flags"}."""
        k = self.k
        gpa &= ~(PAGE_SIZE - 1)
        gfn = gpa >> PAGE_SHIFT
        s = vm.slot_for(gpa)
        if s is None:
            return {"reason": KVM_EXIT_MMIO, "errno": 0, "gpa": gpa, "size": 0, "flags": 0}
        index = (s.gmem_off >> PAGE_SHIFT) + (gfn - (s.gpa >> PAGE_SHIFT))
        if s.gmem_only:           # in-place conversion: the file knows what is private
            attr_private = not s.gmem.ops.is_shared(s.gmem, index)
        else:                     # kvm_mem_is_private(): the VM's memory attributes
            attr_private = gfn in vm.private_gfns
        is_private = attr_private if private is None else bool(private)
        if is_private != attr_private:
            # the guest's view disagrees: a conversion request for the VMM
            return self._memory_fault(gpa, is_private, u.EFAULT)
        if is_private or s.gmem_only:
            if s.gmem is None:
                return self._memory_fault(gpa, is_private, u.EFAULT)
            try:
                pfn = s.gmem.ops.get_pfn(k, s.gmem, index)
            except OSError as e:
                return self._memory_fault(gpa, is_private, e.errno)
            writable = True                  # kvm_gmem_get_pfn: no host mapping to ask
        else:
            pfn, writable = self._hva_to_pfn(t, vm, s, gpa, write)
            if pfn is None:
                return {"reason": None, "errno": u.EINTR}   # signal pending: -EINTR
            if pfn < 0:
                return {"reason": None, "errno": -pfn}
        level = 1
        if s.gmem is not None and s.gmem.ops.huge:
            level, pfn, gpa = self._huge_level(vm, s, gpa, pfn, is_private)
        entry = (pfn << PAGE_SHIFT) | C.PTE_PRESENT | C.PTE_USER | C.PTE_ACCESSED
        if level > 1:
            entry |= C.PTE_PSE
        if is_private:
            entry |= C.PTE_S2_PRIVATE
        if not s.flags & u.KVM_MEM_READONLY and writable:
            entry |= C.PTE_RW
            # kvm_release_faultin_page(..., dirty = fault->map_writable): since 6.12 KVM
            # marks the folio dirty when it creates a writable SPTE, not when it zaps it
            k.mm.folio_mark_dirty(k.core.head(pfn))
        if level > 1:
            stale = k.core.pt_detach(vm.s2_root, gpa, level)   # the 4K SPTEs' table, zapped
            if stale:
                k.defer_pt_free(stale)
        k.core.pte_set(vm.s2_root, gpa, entry, level)
        return None

    def _huge_level(self, vm: Vm, s: Memslot, gpa: int, pfn: int, private: bool):
        """Map a HugeTLB guest_memfd folio with one stage-2 entry when the slot's
        alignment allows and the folio's range is uniformly shared or private."""
        core = self.k.core
        head = core.head(pfn)
        order = core.order(head)
        if order not in (9, 18):                  # split (or never huge): 4K entries
            return 1, pfn, gpa
        size = 4096 << order
        hgpa = gpa & ~(size - 1)
        if (hgpa < s.gpa or hgpa + size > s.gpa + s.size
                or (hgpa - s.gpa + s.gmem_off) % size):
            return 1, pfn, gpa
        start = (s.gmem_off + (hgpa - s.gpa)) >> PAGE_SHIFT
        ops, inode = s.gmem.ops, s.gmem
        if any(ops.is_shared(inode, i) == private for i in range(start, start + (1 << order))):
            return 1, pfn, gpa
        if self.k.core.walk(vm.s2_root, hgpa)[1] < (2 if order == 9 else 3):
            self.zap_gfn_range(vm, hgpa >> PAGE_SHIFT, (hgpa + size) >> PAGE_SHIFT)
        return (2 if order == 9 else 3), head, hgpa

    @staticmethod
    def _memory_fault(gpa: int, private: bool, err: int) -> dict:
        return {"reason": u.KVM_EXIT_MEMORY_FAULT, "errno": err,
                "gpa": gpa, "size": PAGE_SIZE,
                "flags": u.KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0}

    def _hva_to_pfn(self, t, vm: Vm, s: Memslot, gpa: int, write: bool):
        """GUP on the VMM's mm: (pfn, writable).  A read fault is mapped writable only
        if the host entry is (hva_to_pfn's "map read fault as writable if possible"
        takes no copy-on-write: the zero page stays read-only).  A hwpoisoned page:
        kvm_send_hwpoison_signal (AR to current at the hva, lsb PAGE_SHIFT, a plain
        send) and RET_PF_RETRY, pfn None; an error: pfn -errno."""
        k = self.k
        hva = s.hva + (gpa - s.gpa)
        mm = vm.proc.mm
        for _ in range(2):
            e, level = k.core.walk(mm.pgd, hva)
            if e & C.PTE_PRESENT and (not write or e & C.PTE_RW):
                sub = (hva >> PAGE_SHIFT) & ((1 << (9 * (level - 1))) - 1)
                return ((e & C.PTE_PFN_MASK) >> PAGE_SHIFT) + sub, bool(e & C.PTE_RW)
            ret = k.mm.handle_mm_fault(t, hva, write, gup=True)
            if ret & (VM_FAULT_HWPOISON | VM_FAULT_HWPOISON_LARGE):
                k.signals.send_sig_mceerr(t, u.BUS_MCEERR_AR, hva, PAGE_SHIFT,
                                          why="kvm_send_hwpoison_signal")
                return None, False
            if ret:
                return -u.EFAULT, False
        return -u.EFAULT, False

    # ------------------------------------------------------------ KVM reading guest memory
    def read_guest(self, t, vm: Vm, gpa: int, n: int, stack: tuple[str, ...]) -> bytes | None:
        """kvm_vcpu_read_guest(): page by page, __kvm_read_guest_page() copies from the
        memslot's hva with __copy_from_user() on the VMM's mm (current is the vCPU
        thread), so a latent error is a recoverable #MC (is_copy_from_user()) and
        kill_me_never is queued.  None for -EFAULT: no slot (kvm_is_error_hva) or a
        copy that stopped short.  Whatever the slot's memory attributes say, the read
        goes through the hva: KVM has no kernel path into private guest_memfd here."""
        out = bytearray()
        while n > 0:
            s = vm.slot_for(gpa)
            chunk = min(n, PAGE_SIZE - (gpa & (PAGE_SIZE - 1)))
            if s is None:
                return None
            data = copy_from_user(self.k, t, s.hva + (gpa - s.gpa), chunk, stack)
            out += data
            if len(data) < chunk:
                return None
            gpa, n = gpa + chunk, n - chunk
        return bytes(out)

    def emulate_fetch(self, t, v: Vcpu, gpa: int, n: int, cpl: int) -> dict:
        """x86_emulate_instruction() fetching the instruction at gpa (the guest's code
        is identity-mapped: gva == gpa): kvm_fetch_guest_virt() reads it with
        kvm_vcpu_read_guest_page(); a failed read is X86EMUL_IO_NEEDED, the decode
        fails and handle_emulation_failure() queues #UD: at CPL 0 KVM_RUN returns 0
        with KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION, at CPL 3 the
        guest gets the #UD.  Returns {"data"} or {"exit"} or {"ud"}."""
        if not 1 <= n <= X86_MAX_INSTRUCTION_LENGTH:
            raise OSError(u.EINVAL, "emulate: an instruction is 1 to 15 bytes")
        # __do_insn_fetch_bytes: the first fetch runs to the page end, the next
        # one (if the instruction crosses it) from the next page
        first = min(n, PAGE_SIZE - (gpa & (PAGE_SIZE - 1)))
        data = self.read_guest(t, v.vm, gpa, first, _FETCH_STACK)
        got = 0 if data is None else first
        if data is not None and first < n:
            rest = self.read_guest(t, v.vm, gpa + first, n - first, _FETCH_STACK)
            data = None if rest is None else data + rest
        if data is not None:
            return {"data": data}
        self.k.trace("kvm_emulate_insn_failed", vcpu=v.id, gpa=gpa, cpl=cpl)
        if cpl == 0:
            # prepare_emulation_ctxt_failure_exit: the bytes fetched (ctxt->fetch),
            # the flags word, then get_exit_info's 5 words
            return {"exit": {"reason": u.KVM_EXIT_INTERNAL_ERROR,
                             "suberror": u.KVM_INTERNAL_ERROR_EMULATION,
                             "flags": u.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
                             if got else 0, "insn_size": got,
                             "ndata": 1 + (2 if got else 0) + 5}}
        return {"ud": True}

    def map_read(self, t, v: Vcpu, gpa: int, n: int) -> bytes | None:
        """kvm_vcpu_map() of the page at gpa and a load through that kernel mapping
        (nested VMX's handle_vmptrld() reading the VMCS12 header): the pfn comes from
        GUP on the slot's hva (a hwpoison entry or no slot: -EFAULT, None); the load
        is a plain kernel load, not a uaccess: a latent error there is IN_KERNEL,
        mce_panic("Fatal machine check")."""
        if n < 1 or (gpa & (PAGE_SIZE - 1)) + n > PAGE_SIZE:
            raise OSError(u.EINVAL, "kvm_map_read: 1 byte to the end of one page")
        k = self.k
        s = v.vm.slot_for(gpa)
        if s is None:
            return None
        hva = s.hva + (gpa - s.gpa)
        mm = t.process.mm
        for _ in range(2):
            e, level = k.core.walk(mm.pgd, hva)
            if e & C.PTE_PRESENT:
                break
            if k.mm.handle_mm_fault(t, hva, False, gup=True):
                return None                      # KVM_PFN_ERR_HWPOISON / _FAULT: -EFAULT
        else:
            return None
        sub = (hva >> PAGE_SHIFT) & ((1 << (9 * (level - 1))) - 1)
        pfn = ((e & C.PTE_PFN_MASK) >> PAGE_SHIFT) + sub
        po = gpa & (PAGE_SIZE - 1)
        if k.core.hwerr(pfn):
            k.mce.kernel_load(t, pfn, (pfn << PAGE_SHIFT) | po, False, _MAP_STACK)
        return bytes(k.core.phys_read(pfn, po, n))

    # ------------------------------------------------------------ vCPUs
    def create_vcpu(self, t, vm_fd: int, vcpu_id: int) -> dict:
        vm = self.vm_of(t.process, vm_fd)
        if not 0 <= vcpu_id < 4096:
            raise OSError(u.EINVAL, "vcpu id")
        if vcpu_id in vm.vcpus:
            raise OSError(u.EEXIST, "vcpu %d exists" % vcpu_id)
        inode = self.k.new_inode(KvmVcpuOps(), "kvm-vcpu:%d" % vcpu_id)    # ENFILE first
        vm.vcpus[vcpu_id] = Vcpu(vcpu_id, vm, t.tid)
        inode.private["vcpu"] = vm.vcpus[vcpu_id]
        fd = t.process.fd_install(File(inode))
        return {"fd": fd, "s2_root": vm.s2_root, "owner": t.tid}

    def vcpu_of(self, t, vcpu_fd: int) -> Vcpu:
        f = t.process.fget(vcpu_fd)
        if not isinstance(f.inode.ops, KvmVcpuOps):
            raise OSError(u.ENOTTY, "not a vCPU fd")
        return f.inode.private["vcpu"]

    # ------------------------------------------------------------ machine checks for the guest
    def setup_mce(self, t, vcpu_fd: int, mcg_cap: int) -> int:
        """KVM_X86_SETUP_MCE (kvm_vcpu_ioctl_x86_setup_mce)."""
        v = self.vcpu_of(t, vcpu_fd)
        if v.vm.type in CONFIDENTIAL:            # kvm_guest_mce_disallowed (TDX; SNP likewise)
            raise OSError(u.EINVAL, "machine-check injection is not allowed for this VM type")
        bank_num = mcg_cap & 0xFF
        if not bank_num or bank_num > KVM_MAX_MCE_BANKS:
            raise OSError(u.EINVAL, "mcg_cap: bank count")
        if mcg_cap & ~(KVM_MCE_CAP_SUPPORTED | 0xFF | 0xFF0000):
            raise OSError(u.EINVAL, "mcg_cap: unsupported capability bits")
        v.mcg_cap = mcg_cap
        if mcg_cap & u.MCG_CTL_P:
            v.mcg_ctl = (1 << 64) - 1
        v.mce_banks = []
        for _ in range(bank_num):
            v.mce_banks += [(1 << 64) - 1, 0, 0, 0]
        v.mci_ctl2_banks = [0] * bank_num if mcg_cap & u.MCG_CMCI_P else []
        return 0

    def get_mce_cap_supported(self) -> int:
        """KVM_X86_GET_MCE_CAP_SUPPORTED (kvm_arch_dev_ioctl): kvm_caps.supported_mce_cap."""
        return KVM_MCE_CAP_SUPPORTED

    def check_extension(self, t, fd: int, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm (kvm == NULL) or a VM fd
        (kvm_vm_ioctl_check_extension{,_generic}): the capabilities the emulator
        models answer as 6.18 does, any other is 0."""
        f = t.process.fget(fd)
        if isinstance(f.inode.ops, KvmVmOps):
            vm = f.inode.private["vm"]
        elif isinstance(f.inode.ops, KvmDevOps):
            vm = None
        else:
            raise OSError(u.ENOTTY, "not a KVM fd")
        if cap == u.KVM_CAP_MCE:
            return KVM_MAX_MCE_BANKS
        if cap == u.KVM_CAP_GUEST_MEMFD:
            return 1
        if cap == u.KVM_CAP_GUEST_MEMFD_FLAGS:
            # kvm_gmem_get_supported_flags(): what kvm_gmem_create accepts.  6.18 drops
            # INIT_SHARED for a VM with private memory; with in-place conversion, which
            # the emulator models, every VM type may start shared (guest_memfd.py)
            from .guest_memfd import HUGETLB_SIZE_FLAGS, supported_flags
            return supported_flags(vm.type if vm else u.KVM_X86_DEFAULT_VM) & ~HUGETLB_SIZE_FLAGS
        if cap in (u.KVM_CAP_USER_MEMORY2, u.KVM_CAP_MEMORY_FAULT_INFO):
            return 1
        if cap == u.KVM_CAP_MEMORY_ATTRIBUTES:     # kvm_supported_mem_attributes()
            return u.KVM_MEMORY_ATTRIBUTE_PRIVATE if vm is None or vm.has_private_mem else 0
        if cap == u.KVM_CAP_VM_TYPES:              # kvm_caps.supported_vm_types
            return sum(1 << t for t in VM_TYPES)
        return 0

    def set_mce(self, t, vcpu_fd: int, status: int, addr: int, misc: int, mcg_status: int,
                bank: int) -> dict:
        """KVM_X86_SET_MCE (kvm_vcpu_ioctl_x86_set_mce).  Returns what the vCPU will
        see: {"inject": {...}}, {"triple_fault": True} or {} (reporting disabled)."""
        v = self.vcpu_of(t, vcpu_fd)
        if v.vm.type in CONFIDENTIAL:
            raise OSError(u.EINVAL, "machine-check injection is not allowed for this VM type")
        bank_num = v.mcg_cap & 0xFF
        if bank >= bank_num or not status & u.MCI_STATUS_VAL:
            raise OSError(u.EINVAL, "kvm_x86_mce: bank or status")
        b = 4 * bank
        if self.is_ucna(status, mcg_status):
            return self.set_ucna(v, bank, status, addr, misc, mcg_status)
        uc = status & u.MCI_STATUS_UC
        ones = (1 << 64) - 1
        ev = {"bank": bank, "status": status, "addr": addr, "misc": misc, "mcg_status": mcg_status}
        if uc and v.mcg_cap & u.MCG_CTL_P and v.mcg_ctl != ones:
            return {}
        if uc and v.mce_banks[b] != ones:
            return {}
        if uc:
            if v.mcg_status & u.MCG_STATUS_MCIP or not v.cr4_mce:
                self.k.trace("kvm_mce", vcpu=v.id, addr=addr, result="triple fault")
                return {"triple_fault": True}
            if v.mce_banks[b + 1] & u.MCI_STATUS_VAL:
                status |= u.MCI_STATUS_OVER
            v.mce_banks[b + 1:b + 4] = [status, addr, misc]
            v.mcg_status = mcg_status
            ev["status"] = status
            self.k.trace("kvm_mce", vcpu=v.id, addr=addr, result="injected")
            return {"inject": ev}
        if not v.mce_banks[b + 1] & u.MCI_STATUS_VAL or not v.mce_banks[b + 1] & u.MCI_STATUS_UC:
            if v.mce_banks[b + 1] & u.MCI_STATUS_VAL:
                status |= u.MCI_STATUS_OVER
            v.mce_banks[b + 1:b + 4] = [status, addr, misc]
        else:
            v.mce_banks[b + 1] |= u.MCI_STATUS_OVER
        return {}

    @staticmethod
    def is_ucna(status: int, mcg_status: int) -> bool:
        """x86.c is_ucna(): uncorrected, no action required (no PCC/S/AR), MCG_STATUS 0."""
        return not mcg_status and bool(status & u.MCI_STATUS_UC) \
            and not status & (u.MCI_STATUS_PCC | u.MCI_STATUS_S | u.MCI_STATUS_AR)

    def set_ucna(self, v: Vcpu, bank: int, status: int, addr: int, misc: int,
                 mcg_status: int) -> dict:
        """kvm_vcpu_x86_set_ucna(): logged in the bank (no overflow bit, no #MC, no
        triple fault), then a CMCI if MCG_CMCI_P and MCi_CTL2.CMCI_EN.  The emulated
        guest has no local APIC: the CMCI is recorded as delivered (Vcpu.cmci)."""
        v.mce_banks[4 * bank + 1:4 * bank + 4] = [status, addr, misc]
        v.mcg_status = mcg_status
        cmci = bool(v.mcg_cap & u.MCG_CMCI_P and v.mci_ctl2_banks[bank] & u.MCI_CTL2_CMCI_EN)
        if cmci:                                  # kvm_apic_local_deliver(APIC_LVTCMCI)
            v.cmci.append(bank)
        self.k.trace("kvm_mce", vcpu=v.id, addr=addr, result="ucna cmci" if cmci else "ucna")
        return {"cmci": True} if cmci else {}

    def guest_state(self, t, vcpu_fd: int, cr4_mce=None, mcg_status=None, clear_bank=None,
                    mci_ctl2=None) -> dict:
        """The guest writes CR4, MCG_STATUS, MCi_STATUS and MCi_CTL2 (KVM sees them);
        returns the MCE state.  `mci_ctl2`: (bank, value), kvm_set_msr_common's
        MSR_IA32_MCx_CTL2 (a #GP, here EINVAL, without MCG_CMCI_P or with reserved bits)."""
        v = self.vcpu_of(t, vcpu_fd)
        if clear_bank is not None and not 0 <= clear_bank < len(v.mce_banks) // 4:
            raise OSError(u.EINVAL, "clear_bank: no such MCE bank")     # checked before any write
        if mci_ctl2 is not None:
            bank, val = mci_ctl2
            if not 0 <= bank < len(v.mci_ctl2_banks) or not isinstance(val, int) \
                    or val & ~(u.MCI_CTL2_CMCI_EN | u.MCI_CTL2_CMCI_THRESHOLD_MASK):
                raise OSError(u.EINVAL, "MSR_IA32_MC%d_CTL2: #GP" % bank)
        if cr4_mce is not None:
            v.cr4_mce = bool(cr4_mce)
        if mcg_status is not None:
            v.mcg_status = mcg_status
        if clear_bank is not None:
            v.mce_banks[4 * clear_bank + 1] = 0
        if mci_ctl2 is not None:
            v.mci_ctl2_banks[mci_ctl2[0]] = mci_ctl2[1]
        return {"cr4_mce": v.cr4_mce, "mcg_status": v.mcg_status, "mcg_cap": v.mcg_cap,
                "banks": [v.mce_banks[i:i + 4] for i in range(0, len(v.mce_banks), 4)],
                "mci_ctl2": list(v.mci_ctl2_banks), "cmci": list(v.cmci)}

    def gpa_to_pfn(self, proc, vm_fd: int, gpa: int) -> dict:
        vm = self.vm_of(proc, vm_fd)
        e, level = self.k.core.walk(vm.s2_root, gpa)
        s = vm.slot_for(gpa)
        backing = None
        if s is not None and s.gmem is not None:
            index = (s.gmem_off >> PAGE_SHIFT) + ((gpa - s.gpa) >> PAGE_SHIFT)
            pfn = s.gmem.find(self.k.core, index)
            backing = pfn
        elif s is not None:
            he, hl = self.k.core.walk(vm.proc.mm.pgd, s.hva + (gpa - s.gpa))
            if he & C.PTE_PRESENT:
                backing = (he & C.PTE_PFN_MASK) >> PAGE_SHIFT
        return {"mapped": bool(e & C.PTE_PRESENT),
                "pfn": ((e & C.PTE_PFN_MASK) >> PAGE_SHIFT) if e & C.PTE_PRESENT else backing,
                "level": level if e & C.PTE_PRESENT else 0, "backing_pfn": backing,
                "private": (gpa >> PAGE_SHIFT) in vm.private_gfns,
                "slot": s.id if s is not None else None}
