"""The kernel reading a process's memory on its behalf: who survives a latent error.

Kernel: arch/x86/kernel/cpu/mce/severity.c error_context() (EX_TYPE_UACCESS with
is_copy_from_user(): IN_KERNEL_RECOV and MCE_IN_KERNEL_COPYIN; any other kernel load:
IN_KERNEL) and core.c do_machine_check() (fixup_exception, queue_task_work(...,
kill_me_never); mce_panic("Fatal machine check")); virt/kvm/kvm_main.c
__kvm_read_guest_page() (__copy_from_user on the memslot's hva, -EFAULT) and
kvm_vcpu_map() (a kernel mapping of the page: plain loads); arch/x86/kvm/x86.c
kvm_fetch_guest_virt() (X86EMUL_IO_NEEDED) and handle_emulation_failure()
(KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION at CPL 0, #UD at CPL 3);
drivers/vhost/vhost.c (copy_from_iter on the owner's mm from the vhost_task).
"""
import errno
import time

import pytest
from checks import Stop, lines_in_order
from checks import sigbus_recorder as recorder

import emu
from emu import uapi as u
from emu.guest import GuestTaskKilled

PAGE = 4096
GPA = 1 << 32
SLOT = 1
RW = u.PROT_READ | u.PROT_WRITE
ANON = u.MAP_PRIVATE | u.MAP_ANONYMOUS
SHARED_GMEM = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
KPF_HWPOISON = 1 << u.KPF_HWPOISON
FATAL = "Fatal machine check"


def anon_vm(me, size=4 * PAGE):
    """A default VM whose RAM is anonymous memory of the VMM: (vm, hva)."""
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    mem = me.mmap(0, size, RW, ANON)
    me.write(mem, b"guest ram".ljust(size, b"."))
    assert vm.set_user_memory_region2(SLOT, 0, GPA, size, mem) == 0
    return vm, mem


def memfd_vm(me, size=4 * PAGE):
    """Guest RAM in a memfd the VMM maps shared (QEMU's memory-backend-memfd)."""
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    fd = me.memfd_create("guest-ram")
    me.ftruncate(fd, size)
    mem = me.mmap(0, size, RW, u.MAP_SHARED, fd, 0)
    me.write(mem, b"guest ram".ljust(size, b"."))
    assert vm.set_user_memory_region2(SLOT, 0, GPA, size, mem) == 0
    return vm, mem


def gmem_vm(me, size=4 * PAGE):
    """guest_memfd with MMAP | INIT_SHARED: shared memory the VMM maps, and the
    memslot's userspace_addr is that mapping (what __kvm_read_guest_page uses)."""
    vm, mem, _gfd = gmem_vm_fd(me, size)
    return vm, mem


def gmem_vm_fd(me, size=4 * PAGE):
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(size, SHARED_GMEM)
    mem = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    me.write(mem, b"guest ram".ljust(size, b"."))
    assert vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, size, mem, gfd, 0) == 0
    return vm, mem, gfd


BACKINGS = {"anon": anon_vm, "memfd": memfd_vm, "gmem-shared": gmem_vm}


def poison(host, me, mem, off):
    pfn = me.pagemap(mem + off).pfn
    host.hw_poison(pfn)
    return pfn


def after_kill_me_never(host, pfn, at, got):
    """What the kernel shows once the queued memory_failure() ran: no signal
    (late kill), the page poisoned and counted.  `at`: the offset in the page of
    the first byte the copy loaded there (the emulated bank's MCi_ADDR)."""
    d = host.dmesg()
    assert got == []
    assert host.panicked() is None
    assert not any(FATAL in line for line in d)
    assert lines_in_order(d, ["mce: Kernel accessed poison in user space at %x" % (pfn << 12 | at),
                              "Memory failure: %#x: " % pfn]), d
    assert host.kpageflags(pfn) & KPF_HWPOISON
    assert host.meminfo()["HardwareCorrupted"] == 4
    assert host.tainted() & (1 << u.TAINT_MACHINE_CHECK)
    assert host.mf_stats()["total"] == 1


# ------------------------------------------------------------------ KVM emulating an instruction
@pytest.mark.parametrize("backing", list(BACKINGS))
def test_emulated_instruction_fetch_of_poisoned_guest_ram_is_emulation_failure(host, backing):
    """KVM fetches the bytes of an instruction it must emulate with
    kvm_fetch_guest_virt() -> __kvm_read_guest_page() -> __copy_from_user() on the
    slot's hva: a recoverable #MC (copy from user), the copy fails, X86EMUL_IO_NEEDED,
    and at CPL 0 handle_emulation_failure() exits with KVM_EXIT_INTERNAL_ERROR
    (KVM_INTERNAL_ERROR_EMULATION); KVM_RUN returns 0.  No SIGBUS; kill_me_never
    runs memory_failure() on the vCPU thread's way back to user mode."""
    me = emu.attach(host, name="qemu")
    got = recorder()
    vm, mem = BACKINGS[backing](me)
    off = PAGE + 8
    vcpu = vm.create_vcpu(0)

    def guest(g):
        yield g.kernel()
        insn = yield g.emulate(GPA, 4)
        yield g.sync(insn)
        yield g.emulate(GPA + off, 4)
        yield g.done()

    vcpu.set_guest(guest)
    assert vcpu.run() == 0 and vcpu.kvm_run.exit_reason == u.KVM_EXIT_IO
    assert vcpu.ucall() == (u.UCALL_SYNC, (b"gues",))
    pfn = poison(host, me, mem, off)
    assert vcpu.run() == 0
    assert vcpu.kvm_run.exit_reason == u.KVM_EXIT_INTERNAL_ERROR
    assert vcpu.kvm_run.internal.suberror == u.KVM_INTERNAL_ERROR_EMULATION
    # prepare_emulation_failure_exit (arch/x86/kvm/x86.c): no instruction byte was
    # fetched, so flags = 0 and ndata = 1 (flags) + 5 (get_exit_info's info[])
    assert vcpu.kvm_run.internal.flags == 0
    assert vcpu.kvm_run.internal.ndata == 6
    after_kill_me_never(host, pfn, off & 0xFFF, got)
    assert me.pagemap(mem + off).hwpoison
    assert host.check_invariants() == []


def test_emulation_failure_reports_the_bytes_fetched_before_the_poisoned_page(host):
    """An instruction that starts 2 bytes before a poisoned page: the emulator's
    first fetch (__do_insn_fetch_bytes, up to the page end) gets those 2 bytes, the
    next one fails; prepare_emulation_failure_exit reports them: flags
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, insn_size 2, ndata 1 + 2 + 5."""
    me = emu.attach(host, name="qemu")
    vm, mem = BACKINGS["anon"](me)
    vcpu = vm.create_vcpu(0)

    def guest(g):
        yield g.kernel()
        yield g.sync((yield g.emulate(GPA + PAGE - 2, 4)))
        yield g.done()

    me.read(mem + PAGE, 8)                                 # both pages present
    poison(host, me, mem, PAGE)
    vcpu.set_guest(guest)
    assert vcpu.run() == 0 and vcpu.kvm_run.exit_reason == u.KVM_EXIT_INTERNAL_ERROR
    internal = vcpu.kvm_run.internal
    assert internal.suberror == u.KVM_INTERNAL_ERROR_EMULATION
    assert internal.flags == u.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    assert internal.insn_size == 2
    assert internal.ndata == 8


def test_emulated_instruction_fetch_at_cpl3_injects_ud(host):
    """handle_emulation_failure() at CPL 3 queues #UD for the guest and re-enters:
    the guest kernel kills its task (the guest program gets GuestTaskKilled)."""
    me = emu.attach(host, name="qemu")
    got = recorder()
    vm, mem = anon_vm(me)
    vcpu = vm.create_vcpu(0)
    seen = []

    def guest(g):
        yield g.user()
        try:
            yield g.emulate(GPA + 16, 4)
        except GuestTaskKilled:
            seen.append("killed")
        yield g.done()

    pfn = poison(host, me, mem, 16)
    vcpu.set_guest(guest)
    assert vcpu.run() == 0 and vcpu.ucall() == (u.UCALL_DONE, ())
    assert seen == ["killed"]
    assert any("invalid opcode" in line for line in vcpu.guest_kernel.log)
    after_kill_me_never(host, pfn, 16, got)


def test_emulated_fetch_of_a_clean_page_and_of_an_unbacked_gpa(host):
    """Without an error the bytes come back; a gpa no memslot covers has no hva
    (kvm_is_error_hva: -EFAULT) and is an emulation failure too, with no #MC."""
    me = emu.attach(host, name="qemu")
    got = recorder()
    vm, mem = anon_vm(me)
    vcpu = vm.create_vcpu(0)

    def guest(g):
        yield g.kernel()
        v = yield g.emulate(GPA + 4, 5)
        yield g.sync(v)
        yield g.emulate(GPA + (1 << 30), 4)
        yield g.done()

    vcpu.set_guest(guest)
    assert vcpu.run() == 0 and vcpu.ucall() == (u.UCALL_SYNC, (b"t ram",))
    assert vcpu.run() == 0 and vcpu.kvm_run.exit_reason == u.KVM_EXIT_INTERNAL_ERROR
    assert got == [] and host.mf_stats()["total"] == 0
    assert not host.tainted() & (1 << u.TAINT_MACHINE_CHECK)


def test_emulate_bad_length_is_einval(host):
    """An instruction is 1 to 15 bytes (X86_MAX_INSTRUCTION_LENGTH)."""
    me = emu.attach(host, name="qemu")
    vm, mem = anon_vm(me)
    vcpu = vm.create_vcpu(0)

    def guest(g):
        yield g.emulate(GPA, 16)

    vcpu.set_guest(guest)
    with pytest.raises(OSError) as ei:
        vcpu.run()
    assert ei.value.errno == errno.EINVAL


# ------------------------------------------------------------------ KVM through a kernel mapping
@pytest.mark.parametrize("backing", list(BACKINGS))
def test_kvm_map_read_of_poisoned_guest_ram_panics(host, backing):
    """kvm_vcpu_map() maps the page into the kernel (nested VMX's VMPTRLD reads the
    VMCS12 revision id through it): a plain load from a kernel address, not a
    uaccess, IN_KERNEL: "Data load in unrecoverable area of kernel", mce_panic().
    Every attached thread gets KernelPanic; no memory_failure(), no signal."""
    me = emu.attach(host, name="qemu")
    got = recorder()
    vm, mem = BACKINGS[backing](me)
    vcpu = vm.create_vcpu(0)

    def guest(g):
        v = yield g.kvm_map_read(GPA, 4)
        yield g.sync(v)
        yield g.kvm_map_read(GPA + 2 * PAGE, 4)
        yield g.done()

    def other(t):                                 # another process, asleep
        try:
            t.idle(60)
        except emu.KernelPanic as e:
            return e.reason
        return None

    vcpu.set_guest(guest)
    assert vcpu.run() == 0 and vcpu.ucall() == (u.UCALL_SYNC, (b"gues",))
    ch = me.fork(other, name="other")
    end = time.monotonic() + 10
    while len(host.status()["processes"]) < 2:
        assert time.monotonic() < end
        time.sleep(0.05)
    pfn = poison(host, me, mem, 2 * PAGE)
    with pytest.raises(emu.KernelPanic) as ei:
        vcpu.run()
    assert ch.join(20) == 0 and ch.result == FATAL
    assert ei.value.reason == FATAL
    assert host.panicked() == FATAL
    d = host.dmesg()
    assert lines_in_order(d, [
        "mce: [Hardware Error]: Machine check: Data load in unrecoverable area of kernel",
        "Kernel panic - not syncing: Fatal machine check",
        "kvm_vcpu_map"]), d
    assert any("ADDR %x " % (pfn << 12) in line for line in d)
    assert host.mf_stats()["total"] == 0 and got == []
    with pytest.raises(emu.KernelPanic):
        me.read(mem, 1)


# ------------------------------------------------------------------ vhost worker
@pytest.mark.parametrize("backing", list(BACKINGS))
def test_vhost_copy_from_poisoned_guest_ram_is_efault(host, backing):
    """A vhost worker (a vhost_task in the owner's thread group, on its mm) copies a
    buffer from guest RAM with copy_from_iter() -> copy_user_generic(): a copy from
    user, recoverable: EFAULT to the worker, no SIGBUS, memory_failure() queued."""
    me = emu.attach(host, name="qemu")
    got = recorder()
    vm, mem = BACKINGS[backing](me)
    assert me.vhost_copy(mem + PAGE, 9) == b"........."
    pfn = poison(host, me, mem, 3 * PAGE + 100)
    with pytest.raises(OSError) as ei:
        me.vhost_copy(mem + 3 * PAGE, 200)
    assert ei.value.errno == errno.EFAULT
    after_kill_me_never(host, pfn, 0, got)
    assert me.pagemap(mem + 3 * PAGE).hwpoison
    with pytest.raises(Stop):                     # the VMM's own load: AR, as usual
        me.read(mem + 3 * PAGE, 1)
    assert got == [(u.BUS_MCEERR_AR, mem + 3 * PAGE, 12)]


def test_vhost_copy_bad_address_is_efault_without_mce(host):
    me = emu.attach(host, name="qemu")
    got = recorder()
    with pytest.raises(OSError) as ei:
        me.vhost_copy(0x1000, 8)
    assert ei.value.errno == errno.EFAULT
    with pytest.raises(OSError) as ei:
        me.vhost_copy(0x1000, -1)
    assert ei.value.errno == errno.EINVAL
    assert got == [] and host.mf_stats()["total"] == 0


def test_vhost_copy_with_early_kill_sends_ao_to_the_vmm(host):
    """kill_me_never's memory_failure(pfn, 0) is not action required: with
    PR_MCE_KILL_EARLY the process mapping the page gets BUS_MCEERR_AO."""
    me = emu.attach(host, name="qemu")
    got = recorder()
    me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
    vm, mem = anon_vm(me)
    pfn = poison(host, me, mem, PAGE)
    try:
        me.vhost_copy(mem + PAGE, 8)
    except (OSError, Stop) as e:
        assert isinstance(e, Stop) or e.errno == errno.EFAULT
    assert got == [(u.BUS_MCEERR_AO, mem + PAGE, 12)]
    assert host.kpageflags(pfn) & KPF_HWPOISON


# ------------------------------------------------------------------ write(2), for comparison
@pytest.mark.parametrize("backing", list(BACKINGS))
def test_write_from_poisoned_guest_ram_is_efault(host, backing):
    """write(2) of guest RAM (a VMM saving it to a file): copy_from_user,
    recoverable, EFAULT, kill_me_never: the same outcome as vhost."""
    me = emu.attach(host, name="qemu")
    got = recorder()
    vm, mem = BACKINGS[backing](me)
    pfn = poison(host, me, mem, 40)
    fd = me.memfd_create("dump")
    with pytest.raises(OSError) as ei:
        me.pwrite_from(fd, mem, 64, 0)
    assert ei.value.errno == errno.EFAULT
    after_kill_me_never(host, pfn, 0, got)


def test_emulated_fetch_of_private_guest_memfd_memory_never_touches_it(host):
    """A private page of an mmap-able guest_memfd is not mapped for the VMM:
    __copy_from_user on the hva faults, kvm_gmem_fault() refuses a private index
    (VM_FAULT_SIGBUS), the uaccess fixup gives -EFAULT.  The latent error is never
    loaded: no #MC, nothing queued, an emulation failure all the same."""
    me = emu.attach(host, name="qemu")
    got = recorder()
    vm, mem, gfd = gmem_vm_fd(me)
    pfn = me.pagemap(mem + PAGE).pfn
    me.gmem_convert(gfd, PAGE, PAGE, private=True)
    host.hw_poison(pfn)
    vcpu = vm.create_vcpu(0)

    def guest(g):
        yield g.kernel()
        yield g.emulate(GPA + PAGE, 4)
        yield g.done()

    vcpu.set_guest(guest)
    assert vcpu.run() == 0 and vcpu.kvm_run.exit_reason == u.KVM_EXIT_INTERNAL_ERROR
    assert got == [] and host.mf_stats()["total"] == 0
    assert not host.tainted() & (1 << u.TAINT_MACHINE_CHECK)
    assert not host.kpageflags(pfn) & KPF_HWPOISON
