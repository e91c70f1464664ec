"""KVM machine-check odds and ends and the memory-failure sysctls (issue 17 items 6, 7).

Upstream cases: tools/testing/selftests/kvm/x86/ucna_injection_test.c (UCNA through
KVM_X86_SET_MCE, CMCI signalling, KVM_X86_GET_MCE_CAP_SUPPORTED), KVM_CHECK_EXTENSION
as selftests' kvm_check_cap() uses it, mce-test's sysctl use (tinjpage and friends
write /proc/sys/vm/memory_failure_early_kill), and
tools/testing/selftests/mm/memory-failure.c's panic_on_unrecoverable cases."""
from __future__ import annotations

import errno

import pytest
from checks import Stop, dmesg_has, lines_in_order, sigbus_recorder

import emu
from emu import uapi as u

PAGE = 4096
RW = u.PROT_READ | u.PROT_WRITE
ANON = u.MAP_PRIVATE | u.MAP_ANONYMOUS


# ------------------------------------------------------------------ sysctls as files
def test_mce_test_sysctl_files_read_and_write(host):
    """mce-test (tinjpage, the hwpoison scripts) echoes 0/1 into
    /proc/sys/vm/memory_failure_early_kill and reads it back: proc_dointvec_minmax,
    "%d\\n" on read, a value outside 0..1 or not a number is EINVAL and changes nothing."""
    path = "/proc/sys/vm/memory_failure_early_kill"
    assert host.read_file(path) == "0\n"
    assert host.write_file(path, "1\n") == 2
    assert host.read_file(path) == "1\n"
    assert host.sysctl("vm.memory_failure_early_kill") == 1
    for bad in ("2\n", "abc", "-1"):
        with pytest.raises(OSError) as ei:
            host.write_file(path, bad)
        assert ei.value.errno == errno.EINVAL
    assert host.read_file(path) == "1\n"
    assert host.read_file("/proc/sys/vm/memory_failure_recovery") == "1\n"
    with pytest.raises(OSError) as ei:
        host.read_file("/proc/sys/vm/no_such_knob")
    assert ei.value.errno == errno.ENOENT


def test_panic_on_unrecoverable_user_page_does_not_panic(host):
    """selftests/mm/memory-failure.c panic_on_unrecoverable_user_page: with the sysctl
    on, MADV_HWPOISON of a written anonymous page is still recovered (SIGBUS path),
    no panic."""
    path = "/proc/sys/vm/panic_on_unrecoverable_memory_failure"
    assert host.read_file(path) == "0\n"
    host.write_file(path, "1")
    me = emu.attach(host, name="t")
    got = sigbus_recorder()
    a = me.mmap(0, PAGE, RW, ANON)
    me.write(a, b"x")
    with pytest.raises(Stop):
        me.madvise(a, PAGE, u.MADV_HWPOISON)
    assert got and got[0][:2] == (u.BUS_MCEERR_AR, a)
    assert host.panicked() is None
    assert not any("unrecoverable page" in line for line in host.dmesg())


def test_panic_on_unrecoverable_kernel_page_panics(host):
    """selftests/mm/memory-failure.c (hwpoison-panic): MADV_HWPOISON of never-written
    anonymous memory reaches the zero page, a reserved kernel page, MF_MSG_KERNEL +
    MF_IGNORED: with vm.panic_on_unrecoverable_memory_failure=1 action_result()
    panics "Memory failure: %#lx: unrecoverable page"."""
    host.sysctl("vm.panic_on_unrecoverable_memory_failure", 1)
    me = emu.attach(host, name="t")
    a = me.mmap(0, PAGE, RW, ANON)
    me.read(a, 1)
    zp = me.pagemap(a).pfn
    reason = "Memory failure: %#x: unrecoverable page" % zp
    with pytest.raises(emu.KernelPanic) as ei:
        me.madvise(a, PAGE, u.MADV_HWPOISON)
    assert ei.value.reason == reason
    assert host.panicked() == reason
    assert lines_in_order(host.dmesg(), [
        "Memory failure: %#x: recovery action for reserved kernel page: Ignored" % zp,
        "Kernel panic - not syncing: " + reason])


def test_panic_sysctl_off_kernel_page_is_ignored(host):
    """Default 0: the same injection is only "Ignored" (6.18 behaviour), -EBUSY."""
    assert host.sysctl("vm.panic_on_unrecoverable_memory_failure") == 0
    me = emu.attach(host, name="t")
    a = me.mmap(0, PAGE, RW, ANON)
    with pytest.raises(OSError) as ei:
        me.madvise(a, PAGE, u.MADV_HWPOISON)
    assert ei.value.errno == errno.EBUSY
    assert host.panicked() is None
    assert dmesg_has(host, "recovery action for reserved kernel page: Ignored")


# ------------------------------------------------------------------ KVM machine checks
# tools/testing/selftests/kvm/x86/ucna_injection_test.c
UCNA_BANK = 7
BANKS = 10
UCNA_STATUS = (u.MCI_STATUS_VAL | u.MCI_STATUS_UC | u.MCI_STATUS_EN | u.MCI_STATUS_MISCV
               | u.MCI_STATUS_ADDRV | 0x9A)
UCNA_ADDR, UCNA_MISC = 0xDEADBEEF, 0x1
CMCI_CAP = u.MCG_CTL_P | u.MCG_SER_P | u.MCG_LMCE_P | u.MCG_CMCI_P | BANKS


def ucna():
    return u.KvmX86Mce(status=UCNA_STATUS, addr=UCNA_ADDR, misc=UCNA_MISC, mcg_status=0,
                       bank=UCNA_BANK)


def vcpu_of(host):
    me = emu.attach(host, name="qemu")
    kvm = me.open_kvm()
    vm = kvm.create_vm()
    anon = me.mmap(0, 16 * PAGE, RW, ANON)
    vm.set_user_memory_region2(0, 0, 0, 16 * PAGE, anon)
    return kvm, vm, vm.create_vcpu(0)


def run_sync(vcpu):
    assert vcpu.run() == 0 and vcpu.kvm_run.exit_reason == u.KVM_EXIT_IO
    return vcpu.ucall()


def test_ucna_injection_get_mce_cap_supported_and_setup_with_cmci(host):
    """ucna_injection_test main(): KVM_X86_GET_MCE_CAP_SUPPORTED has MCG_CMCI_P (KVM
    on VMX since 6.0), and KVM_X86_SETUP_MCE takes it; a bit outside the supported
    set is still EINVAL."""
    kvm, _vm, vcpu = vcpu_of(host)
    sup = kvm.get_mce_cap_supported()
    assert sup == u.MCG_CTL_P | u.MCG_SER_P | u.MCG_LMCE_P | u.MCG_CMCI_P
    assert vcpu.setup_mce(CMCI_CAP) == 0
    st = vcpu.mce_state()
    assert st["mcg_cap"] == CMCI_CAP and st["mci_ctl2"] == [0] * BANKS
    with pytest.raises(OSError) as ei:
        vcpu.setup_mce(1 << 9 | BANKS)               # MCG_EXT_P: not supported
    assert ei.value.errno == errno.EINVAL


def test_ucna_injection_cmci_enabled(host):
    """ucna_injection_test test_ucna_injection: the guest enables CMCI on the bank
    (MCi_CTL2.CMCI_EN), the host injects a UCNA (UC, no S/AR/PCC, MCG_STATUS 0):
    KVM_X86_SET_MCE returns 0, the bank holds status/addr/misc, the CMCI is signalled,
    no #MC (the guest did not even set CR4.MCE) and no triple fault."""
    _kvm, _vm, vcpu = vcpu_of(host)
    vcpu.setup_mce(CMCI_CAP)
    seen = []

    def guest(g):
        yield g.wrmsr_mci_ctl2(UCNA_BANK, u.MCI_CTL2_CMCI_EN | 2)
        yield g.sync(b"ctl2")
        seen.append((yield g.rdmsr_mce_bank(UCNA_BANK)))
        yield g.done()

    vcpu.set_guest(guest)
    assert run_sync(vcpu)[0] == u.UCALL_SYNC
    assert vcpu.set_mce(ucna()) == 0
    assert vcpu.run() == 0 and vcpu.kvm_run.exit_reason == u.KVM_EXIT_IO
    assert vcpu.ucall()[0] == u.UCALL_DONE
    assert seen == [(UCNA_STATUS, UCNA_ADDR, UCNA_MISC)]
    st = vcpu.mce_state()
    assert st["cmci"] == [UCNA_BANK] and vcpu.guest_kernel.cmci == [UCNA_BANK]
    assert st["mcg_status"] == 0 and st["mci_ctl2"][UCNA_BANK] == u.MCI_CTL2_CMCI_EN | 2
    assert vcpu.guest_kernel.log == []            # no #MC handler ran


def test_ucna_injection_cmci_disabled(host):
    """ucna_injection_test test_ucna_injection with CMCI off (test_cmci_disabled):
    the UCNA is only logged in the bank, no CMCI, no #MC; a second one overwrites
    the bank (kvm_vcpu_x86_set_ucna writes status/addr/misc as given)."""
    _kvm, _vm, vcpu = vcpu_of(host)
    vcpu.setup_mce(CMCI_CAP)
    assert vcpu.set_mce(ucna()) == 0
    assert vcpu.set_mce(ucna()) == 0
    st = vcpu.mce_state()
    assert st["banks"][UCNA_BANK][1:] == [UCNA_STATUS, UCNA_ADDR, UCNA_MISC]
    assert st["cmci"] == [] and vcpu.guest_kernel.cmci == []
    vcpu.set_guest(lambda g: (yield g.sync(b"up")))
    assert run_sync(vcpu)[0] == u.UCALL_SYNC      # no KVM_EXIT_SHUTDOWN


def test_ucna_injection_no_cmci_p_ctl2_gp(host):
    """Without MCG_CMCI_P a guest write of MCi_CTL2 is a #GP (kvm_set_msr_common), and
    reserved bits in it likewise; the bank's CTL2 stays 0."""
    _kvm, _vm, vcpu = vcpu_of(host)
    vcpu.setup_mce(u.MCG_CTL_P | u.MCG_SER_P | BANKS)
    vcpu.set_guest(lambda g: (yield g.wrmsr_mci_ctl2(UCNA_BANK, u.MCI_CTL2_CMCI_EN)))
    with pytest.raises(OSError) as ei:
        vcpu.run()
    assert ei.value.errno == errno.EINVAL
    assert vcpu.mce_state()["mci_ctl2"] == []


def test_check_extension_modelled_caps(host):
    """KVM_CHECK_EXTENSION as selftests' kvm_check_cap()/vm_check_cap() use it:
    KVM_CAP_MCE is KVM_MAX_MCE_BANKS (32); KVM_CAP_GUEST_MEMFD 1;
    KVM_CAP_GUEST_MEMFD_FLAGS the flags kvm_gmem_create accepts (MMAP|INIT_SHARED,
    and the HugeTLB series' flag, on every VM type: in-place conversion);
    USER_MEMORY2 and MEMORY_FAULT_INFO 1; MEMORY_ATTRIBUTES PRIVATE on /dev/kvm and
    a VM with private memory, 0 on a default VM; VM_TYPES the types create_vm
    takes; others 0."""
    me = emu.attach(host, name="qemu")
    kvm = me.open_kvm()
    flags = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
    assert kvm.check_extension(u.KVM_CAP_MCE) == 32
    assert kvm.check_extension(u.KVM_CAP_GUEST_MEMFD) == 1
    assert kvm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) == flags
    assert kvm.check_extension(u.KVM_CAP_USER_MEMORY2) == 1
    assert kvm.check_extension(u.KVM_CAP_MEMORY_FAULT_INFO) == 1
    assert kvm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES) == u.KVM_MEMORY_ATTRIBUTE_PRIVATE
    types = kvm.check_extension(u.KVM_CAP_VM_TYPES)
    assert types & (1 << u.KVM_X86_DEFAULT_VM) and types & (1 << u.KVM_X86_SW_PROTECTED_VM)
    assert kvm.check_extension(9999) == 0
    vm = kvm.create_vm()
    assert vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) == flags
    assert vm.check_extension(u.KVM_CAP_MCE) == 32
    assert vm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    pvm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    assert pvm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) == flags
    assert pvm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES) == u.KVM_MEMORY_ATTRIBUTE_PRIVATE
    gfd = pvm.create_guest_memfd(1 << 20, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    assert gfd >= 0                                # what the capability says is accepted
    fd = me.memfd_create("x", 0)
    with pytest.raises(OSError) as ei:
        me._call("check_extension", fd=fd, cap=u.KVM_CAP_MCE)
    assert ei.value.errno == errno.ENOTTY
