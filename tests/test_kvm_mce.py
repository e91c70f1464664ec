"""Machine checks into the guest: KVM_X86_SETUP_MCE / KVM_X86_SET_MCE and the
guest kernel model (QEMU target/i386/kvm/kvm.c kvm_arch_on_sigbus_vcpu; kvm_vcpu_ioctl_x86_setup_mce /
kvm_vcpu_ioctl_x86_set_mce in arch/x86/kvm/x86.c).

The injected records are QEMU's kvm_mce_inject for an Intel guest:
  AR: VAL|EN|MISCV|ADDRV|S|UC|AR|0x134, MCG_STATUS MCIP|RIPV|EIPV, bank 9, misc 0x8c
  AO: VAL|EN|MISCV|ADDRV|S|UC|0xc0,     MCG_STATUS MCIP|RIPV
"""
import errno
import os
import signal

import pytest

import emu
from emu import uapi as u
from emu.guest import GuestTaskKilled

pytestmark = pytest.mark.both_backends      # conftest: on the Cython core and the reference CPU

PAGE = 4096
RW = u.PROT_READ | u.PROT_WRITE
BANKS = 10
MCG_CAP = u.MCG_SER_P | u.MCG_CTL_P | BANKS          # QEMU's default for an Intel guest
BASE = u.MCI_STATUS_VAL | u.MCI_STATUS_EN | u.MCI_STATUS_MISCV | u.MCI_STATUS_ADDRV
AR_STATUS = BASE | u.MCI_STATUS_S | u.MCI_STATUS_UC | u.MCI_STATUS_AR | 0x134
AO_STATUS = BASE | u.MCI_STATUS_S | u.MCI_STATUS_UC | 0xC0
AR_MCG = u.MCG_STATUS_MCIP | u.MCG_STATUS_RIPV | u.MCG_STATUS_EIPV
AO_MCG = u.MCG_STATUS_MCIP | u.MCG_STATUS_RIPV
MISC = 0x8C
BANK = 9
ERR_GPA = 0x3000


def ar_mce(gpa=ERR_GPA):
    return u.KvmX86Mce(status=AR_STATUS, addr=gpa, misc=MISC, mcg_status=AR_MCG, bank=BANK)


def ao_mce(gpa=ERR_GPA):
    return u.KvmX86Mce(status=AO_STATUS, addr=gpa, misc=MISC, mcg_status=AO_MCG, bank=BANK)


def errno_of(fn, *a, **kw):
    with pytest.raises(OSError) as ei:
        fn(*a, **kw)
    return ei.value.errno


def make_vm(host, vm_type=u.KVM_X86_DEFAULT_VM, npages=16):
    me = emu.attach(host, name="qemu")
    vm = me.open_kvm().create_vm(vm_type)
    anon = me.mmap(0, npages * PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    vm.set_user_memory_region2(0, 0, 0, npages * PAGE, anon)
    return me, vm, anon


def vcpu0(host):
    """vCPU 0 of a fresh VM (make_vm), machine checks not set up."""
    _me, vm, _anon = make_vm(host)
    return vm.create_vcpu(0)


def mce_vcpu(host, guest=None, first=None):
    """vCPU 0 of a fresh VM after KVM_X86_SETUP_MCE(QEMU's MCG_CAP); with `guest`, that
    guest has run up to its first sync, which reported `first`."""
    vcpu = vcpu0(host)
    vcpu.setup_mce(MCG_CAP)
    if guest is not None:
        vcpu.set_guest(guest)
        assert sync_value(vcpu) == first
    return vcpu


def syncs(*labels, cr4_mce=True):
    """Guest program: CR4.MCE set (unless cr4_mce=False), then one sync per label."""

    def guest(g):
        if cr4_mce:
            yield g.set_cr4_mce(True)
        for label in labels:
            yield g.sync(label)

    return guest


def exit_reason(vcpu):
    """One KVM_RUN that returns 0: the exit reason."""
    assert vcpu.run() == 0
    return vcpu.kvm_run.exit_reason


def run_ok(vcpu, reason=u.KVM_EXIT_IO):
    assert vcpu.run() == 0
    assert vcpu.kvm_run.exit_reason == reason, vcpu.kvm_run
    return vcpu.ucall()


def sync_value(vcpu):
    cmd, args = run_ok(vcpu)
    assert cmd == u.UCALL_SYNC, (cmd, args)
    return args[0] if len(args) == 1 else args


# =================================================================== KVM_X86_SETUP_MCE
@pytest.mark.parametrize("mcg_cap", [
    0,                                         # no banks
    u.MCG_SER_P | u.MCG_CTL_P,                 # still no banks
    33, 0xFF, u.MCG_SER_P | 33,                # more than KVM_MAX_MCE_BANKS (32)
    BANKS | (1 << 9),                          # MCG_EXT_P: not supported by KVM
    BANKS | (1 << 11),                         # MCG_TES_P
    BANKS | (1 << 63),
])
def test_setup_mce_invalid_einval(host, mcg_cap):
    vcpu = vcpu0(host)
    assert errno_of(vcpu.setup_mce, mcg_cap) == errno.EINVAL
    # nothing configured: no bank accepts an error
    assert errno_of(vcpu.set_mce, ar_mce()) == errno.EINVAL


@pytest.mark.parametrize("mcg_cap", [1, 32, MCG_CAP, u.MCG_SER_P | u.MCG_LMCE_P | 32,
                                     BANKS | 0x30000])      # MCG_EXT_CNT field is allowed
def test_setup_mce_valid(host, mcg_cap):
    vcpu = vcpu0(host)
    assert vcpu.setup_mce(mcg_cap) == 0
    bank = (mcg_cap & 0xFF) - 1
    assert vcpu.set_mce(u.KvmX86Mce(status=BASE, addr=0, misc=0, mcg_status=0, bank=bank)) == 0


def test_setup_mce_failure_keeps_previous_setup(host):
    vcpu = vcpu0(host)
    assert vcpu.setup_mce(MCG_CAP) == 0
    assert errno_of(vcpu.setup_mce, 0) == errno.EINVAL
    assert errno_of(vcpu.setup_mce, 40) == errno.EINVAL
    # still 10 banks
    assert vcpu.set_mce(u.KvmX86Mce(status=BASE, addr=0, misc=0, mcg_status=0, bank=9)) == 0
    assert errno_of(vcpu.set_mce, u.KvmX86Mce(status=BASE, addr=0, misc=0, mcg_status=0,
                                              bank=10)) == errno.EINVAL


# =================================================================== KVM_X86_SET_MCE validation
@pytest.mark.parametrize("bank,status", [
    (BANKS, AR_STATUS), (BANKS + 1, AR_STATUS), (255, AR_STATUS),
    (BANK, AR_STATUS & ~u.MCI_STATUS_VAL), (BANK, 0), (0, u.MCI_STATUS_UC)])
def test_set_mce_invalid_einval(host, bank, status):
    vcpu = mce_vcpu(host, syncs("up", "still running"), "up")
    assert errno_of(vcpu.set_mce, u.KvmX86Mce(status=status, addr=ERR_GPA, misc=MISC,
                                              mcg_status=AR_MCG, bank=bank)) == errno.EINVAL
    # nothing was injected
    assert sync_value(vcpu) == "still running"
    gk = vcpu.guest_kernel
    assert (gk.log, gk.offlined, gk.killed, gk.panicked) == ([], [], 0, None)


def test_set_mce_without_setup_einval(host):
    vcpu = vcpu0(host)
    assert errno_of(vcpu.set_mce, ar_mce()) == errno.EINVAL
    assert errno_of(vcpu.set_mce, u.KvmX86Mce(status=BASE, addr=0, misc=0, mcg_status=0,
                                              bank=0)) == errno.EINVAL


@pytest.mark.parametrize("vm_type", [u.KVM_X86_SNP_VM, u.KVM_X86_TDX_VM])
def test_confidential_vm_refuses_mce(host, vm_type):
    """No machine-check injection by the host into SNP / TDX guests."""
    me = emu.attach(host, name="qemu")
    vm = me.open_kvm().create_vm(vm_type)
    vcpu = vm.create_vcpu(0)
    assert errno_of(vcpu.setup_mce, MCG_CAP) == errno.EINVAL
    assert errno_of(vcpu.set_mce, ar_mce()) == errno.EINVAL
    assert errno_of(vcpu.set_mce, ao_mce()) == errno.EINVAL


@pytest.mark.parametrize("vm_type", [u.KVM_X86_DEFAULT_VM, u.KVM_X86_SW_PROTECTED_VM])
def test_non_confidential_vm_accepts_mce(host, vm_type):
    me = emu.attach(host, name="qemu")
    vm = me.open_kvm().create_vm(vm_type)
    vcpu = vm.create_vcpu(0)
    assert vcpu.setup_mce(MCG_CAP) == 0


# =================================================================== the guest's #MC handling
def guest_user_task(g, gpa=ERR_GPA):
    """A guest with CR4.MCE set running a user task that touches gpa."""
    yield g.set_cr4_mce(True)
    yield g.user()
    try:
        yield g.write(gpa, b"user data")
        yield g.sync("running")
        v = yield g.read(gpa, 9)
        yield g.sync(v)
    except GuestTaskKilled as e:
        yield g.sync("killed", e.args[0])
    yield g.sync("after")
    yield g.done()


def test_ar_in_guest_user_mode_kills_task_and_offlines_page(host):
    vcpu = mce_vcpu(host, guest_user_task, "running")
    assert vcpu.set_mce(ar_mce()) == 0
    assert sync_value(vcpu) == ("killed", ERR_GPA)
    gk = vcpu.guest_kernel
    assert gk.offlined == [ERR_GPA >> 12]
    assert gk.killed == 1 and gk.panicked is None
    assert gk.log == [
        "mce: Uncorrected hardware memory error in user-access at %x" % ERR_GPA,
        "Memory failure: %#x: Sending SIGBUS to guest-task due to hardware memory corruption"
        % (ERR_GPA >> 12)]
    assert sync_value(vcpu) == "after"
    assert run_ok(vcpu) == (u.UCALL_DONE, ())


def test_ar_kills_guest_task_that_does_not_catch(host):
    """A guest program that does not catch GuestTaskKilled ends: the vCPU halts."""
    vcpu = mce_vcpu(host, syncs("running", "not reached"), "running")
    vcpu.set_mce(ar_mce())
    assert exit_reason(vcpu) == u.KVM_EXIT_HLT
    assert vcpu.guest_kernel.offlined == [ERR_GPA >> 12]
    assert vcpu.guest_kernel.killed == 1


def test_ao_offlines_page_and_guest_continues(host):
    vcpu = mce_vcpu(host, guest_user_task, "running")
    assert vcpu.set_mce(ao_mce(0x5000)) == 0
    assert sync_value(vcpu) == b"user data"              # the task was not killed
    gk = vcpu.guest_kernel
    assert gk.offlined == [0x5]
    assert gk.killed == 0 and gk.panicked is None
    assert gk.log == ["Memory failure: 0x5: recovery action for dirty LRU page: Recovered"]
    assert sync_value(vcpu) == "after"


def test_ar_in_guest_kernel_mode_panics(host):
    def guest(g):
        yield g.set_cr4_mce(True)
        yield g.kernel()
        yield g.sync("in kernel")
        yield g.sync("not reached")

    vcpu = mce_vcpu(host, guest, "in kernel")
    vcpu.set_mce(ar_mce())
    assert exit_reason(vcpu) == u.KVM_EXIT_HLT
    gk = vcpu.guest_kernel
    assert gk.panicked
    assert gk.log[-1] == "Kernel panic - not syncing: Fatal local machine check"
    assert gk.killed == 0
    assert exit_reason(vcpu) == u.KVM_EXIT_HLT             # a panicked guest stays halted


def test_guest_back_in_user_mode_is_not_panicked(host):
    def guest(g):
        yield g.set_cr4_mce(True)
        yield g.kernel()
        yield g.user()
        try:
            yield g.sync("user again")
            yield g.sync("not reached")
        except GuestTaskKilled:
            yield g.sync("killed")

    vcpu = mce_vcpu(host, guest, "user again")
    vcpu.set_mce(ar_mce())
    assert sync_value(vcpu) == "killed"
    assert vcpu.guest_kernel.panicked is None


@pytest.mark.parametrize("mce", ["ar", "ao"])
def test_cr4_mce_clear_triple_fault_shutdown(host, mce):
    """UC #MC with CR4.MCE clear: KVM_REQ_TRIPLE_FAULT -> KVM_EXIT_SHUTDOWN; the
    guest's #MC handler never runs."""
    vcpu = mce_vcpu(host, syncs("no cr4.mce", "not reached", cr4_mce=False), "no cr4.mce")
    assert vcpu.set_mce(ar_mce() if mce == "ar" else ao_mce()) == 0
    assert exit_reason(vcpu) == u.KVM_EXIT_SHUTDOWN
    gk = vcpu.guest_kernel
    assert (gk.log, gk.offlined, gk.killed, gk.panicked) == ([], [], 0, None)


def test_cr4_mce_turned_off_again_triple_fault(host):
    def guest(g):
        yield g.set_cr4_mce(True)
        yield g.set_cr4_mce(False)
        yield g.sync("off")

    vcpu = mce_vcpu(host, guest, "off")
    vcpu.set_mce(ar_mce())
    assert exit_reason(vcpu) == u.KVM_EXIT_SHUTDOWN


def test_mcip_already_set_triple_fault_shutdown(host):
    """Two UC set_mce before the guest handled the first: MCIP is still set ->
    triple fault -> KVM_EXIT_SHUTDOWN."""
    vcpu = mce_vcpu(host, guest_user_task, "running")
    assert vcpu.set_mce(ar_mce()) == 0
    assert vcpu.set_mce(ar_mce(0x4000)) == 0
    assert exit_reason(vcpu) == u.KVM_EXIT_SHUTDOWN


def test_second_mce_after_guest_handled_first_is_delivered(host):
    """The guest's handler clears MCG_STATUS.MCIP, so a later #MC is delivered
    normally; the guest kernel has also cleared the bank (mce_clear_state), so
    the second record does not carry OVER."""
    vcpu = mce_vcpu(host)
    seen = []
    gk = vcpu.guest_kernel
    default = gk.handler

    def handler(gk_, ev):
        seen.append(dict(ev))
        return default(gk_, ev)

    gk.handler = handler

    vcpu.set_guest(syncs("a", "b", "c"))
    assert sync_value(vcpu) == "a"
    vcpu.set_mce(ao_mce(0x5000))
    assert sync_value(vcpu) == "b"
    vcpu.set_mce(ao_mce(0x6000))
    assert sync_value(vcpu) == "c"
    assert gk.offlined == [0x5, 0x6]
    assert [(e["bank"], e["addr"], e["misc"], e["mcg_status"]) for e in seen] == [
        (BANK, 0x5000, MISC, AO_MCG), (BANK, 0x6000, MISC, AO_MCG)]
    assert seen[0]["status"] == AO_STATUS
    assert seen[1]["status"] == AO_STATUS                  # no MCI_STATUS_OVER


def test_corrected_error_is_not_injected(host):
    """A corrected (non-UC) record is only logged in the bank: no #MC for the guest."""
    vcpu = mce_vcpu(host, guest_user_task, "running")
    assert vcpu.set_mce(u.KvmX86Mce(status=BASE | 0x9F, addr=ERR_GPA, misc=MISC, mcg_status=0,
                                    bank=BANK)) == 0
    assert sync_value(vcpu) == b"user data"
    gk = vcpu.guest_kernel
    assert (gk.offlined, gk.killed, gk.panicked) == ([], 0, None)


def test_custom_guest_handler(host):
    """The #MC handler hook: a guest kernel that recovers instead of killing."""
    vcpu = mce_vcpu(host)
    events = []

    def handler(gk, ev):
        events.append((ev["status"], ev["addr"]))
        gk.offline(ev["addr"])
        return "recovered"

    vcpu.guest_kernel.handler = handler
    vcpu.set_guest(guest_user_task)
    assert sync_value(vcpu) == "running"
    vcpu.set_mce(ar_mce())
    assert sync_value(vcpu) == b"user data"
    assert events == [(AR_STATUS, ERR_GPA)]
    assert vcpu.guest_kernel.offlined == [ERR_GPA >> 12]


# =================================================================== QEMU's path end to end
@pytest.mark.parametrize("installed_by", ["main_before_clone", "vcpu_thread"])
def test_qemu_like_forwarding_of_ar_sigbus(host, installed_by):
    """QEMU kvm_arch_on_sigbus_vcpu / kvm_mce_inject: a consumed error in guest memory on an ordinary
    slot: SIGBUS BUS_MCEERR_AR on the vCPU thread with the hva; KVM_RUN -EINTR;
    the VMM maps hva -> gpa through its memslot and injects an AR #MC; the guest
    kills the task that touched the page and offlines it.
    `installed_by`: QEMU installs its SIGBUS handler in the main thread before it
    creates the vCPU threads (qemu_init_sigbus), and handlers are per process, so the vCPU
    thread must run it; the other variant installs it in the vCPU thread."""
    me, vm, anon = make_vm(host)
    gbase = 0
    got = []

    def h(signum, info):
        got.append((os.getpid(), info.si_code, info.si_addr, info.si_addr_lsb))

    if installed_by == "main_before_clone":
        emu.sigaction(signal.SIGBUS, h)

    def body(task):
        if installed_by == "vcpu_thread":
            emu.sigaction(signal.SIGBUS, h)
        vcpu = vm.create_vcpu(1)
        vcpu.setup_mce(MCG_CAP)
        vcpu.set_guest(guest_user_task, 0x7000)
        assert sync_value(vcpu) == "running"
        host.hw_poison(task.pagemap(anon + 0x7000).pfn)
        with pytest.raises(OSError) as ei:
            vcpu.run()
        res = {"errno": ei.value.errno, "reason": vcpu.kvm_run.exit_reason,
               "sigs": list(got), "tid": os.getpid()}
        tid, code, addr, lsb = got[-1]
        assert code == u.BUS_MCEERR_AR
        gpa = gbase + (addr - anon)                      # kvm_physical_memory_addr_from_host
        vcpu.set_mce(ar_mce(gpa))
        res["after"] = sync_value(vcpu)
        res["after2"] = sync_value(vcpu)
        gk = vcpu.guest_kernel
        res["offlined"], res["killed"] = gk.offlined, gk.killed
        return res

    th = me.clone(body, name="vcpu1")
    assert th.join(30) == 0
    r = th.result
    assert (r["errno"], r["reason"]) == (errno.EINTR, u.KVM_EXIT_INTR)
    assert r["sigs"] == [(r["tid"], u.BUS_MCEERR_AR, anon + 0x7000, 12)]
    assert r["after"] == ("killed", 0x7000)
    assert r["after2"] == "after"
    assert (r["offlined"], r["killed"]) == ([0x7], 1)
    assert got == []                                     # the main thread got nothing
