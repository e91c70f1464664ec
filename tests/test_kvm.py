"""KVM emulation seen from a VMM: vCPUs running guest programs against stage-2,
guest_memfd EHWPOISON exits, SIGBUS for ordinary slots, conversion requests and
ioctl validation.

Kernel sources followed: virt/kvm/guest_memfd.c (kvm_gmem_get_pfn, kvm_gmem_error_folio),
virt/kvm/kvm_main.c and arch/x86/kvm/mmu/mmu.c (memslots, kvm_handle_error_pfn's
-EHWPOISON, KVM_EXIT_MEMORY_FAULT); tools/testing/selftests/kvm/guest_memfd_test.c.
"""
import errno
import os
import signal

import pytest
from checks import corrupt_pfn_delayed, dmesg_has
from gmem_harness import Recorder, Stop

import emu
from emu import uapi as u

pytestmark = pytest.mark.both_backends      # conftest: on the Cython core and the reference CPU

PAGE = 4096
GPA = 1 << 32                   # test_memory_failure_guest: GPA 4G, slot 1
SLOT = 1
POLICIES = ["mf-delayed-fix", "v6.18"]
RW = u.PROT_READ | u.PROT_WRITE
SHARED_GMEM = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE
KPF_HWPOISON = 1 << u.KPF_HWPOISON


def attach(h, name="qemu"):
    me = emu.attach(h, name=name)
    rec = Recorder()
    emu.sigaction(signal.SIGBUS, rec)
    return me, rec


def run_err(vcpu):
    """KVM_RUN that must return -1: its errno."""
    with pytest.raises(OSError) as ei:
        vcpu.run()
    return ei.value.errno


def mf(vcpu):
    m = vcpu.kvm_run.memory_fault
    return (vcpu.kvm_run.exit_reason, m.gpa, m.size, m.flags)


def runs_until_ehwpoison(vcpu, tries=3):
    """Up to `tries` KVM_RUNs, stopping at a clean exit or at -EHWPOISON: each one's
    (0, exit_reason) or (errno,) + mf()."""
    out = []
    for _ in range(tries):
        try:
            vcpu.run()
            out.append((0, vcpu.kvm_run.exit_reason))
            break
        except OSError as e:
            out.append((e.errno,) + mf(vcpu))
            if e.errno == u.EHWPOISON:
                break
    return out


def run_ok(vcpu, reason=u.KVM_EXIT_IO):
    assert vcpu.run() == 0
    assert vcpu.kvm_run.exit_reason == reason
    return vcpu.ucall()


def sync_value(vcpu):
    cmd, args = run_ok(vcpu)
    assert cmd == u.UCALL_SYNC, (cmd, args)
    return args[0] if len(args) == 1 else args


def run_done(vcpu):
    assert run_ok(vcpu) == (u.UCALL_DONE, ())


# =================================================================== 1. guest_memfd_test.c guest side
def test_guest_memfd_guest_sharing(host):
    """test_guest_memfd_guest: host memset 0xaa through the mmap and munmaps; the
    guest asserts every byte is 0xaa and writes 0xff; UCALL_DONE; the host maps
    the file again and sees 0xff everywhere."""
    me, rec = attach(host)
    size = 4 * PAGE
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    gfd = vm.create_guest_memfd(size, SHARED_GMEM)
    assert vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, size, 0, gfd, 0) == 0
    mem = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    me.write(mem, b"\xaa" * size)
    me.munmap(mem, size)

    def guest(g, gpa, size):
        for off in range(0, size, 512):
            v = yield g.read(gpa + off, 512)
            if v != b"\xaa" * 512:
                yield g.abort("mem[%d] != 0xaa: %r" % (off, v[:8]))
            yield g.write(gpa + off, b"\xff" * 512)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest, GPA, size)
    assert run_ok(vcpu) == (u.UCALL_DONE, ())
    mem = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    assert me.read(mem, size) == b"\xff" * size
    assert rec.got == []


def test_guest_and_host_share_data_both_ways(host):
    """Reads and writes in both directions, incl. an access that crosses a page
    boundary, while the host keeps its mapping."""
    me, rec = attach(host)
    size = 1 << 20
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(size, SHARED_GMEM)
    hva = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, size, hva, gfd, 0)
    me.write(hva, b"\xaa" * 8)
    me.write(hva + PAGE - 4, b"0123456789")

    def guest(g):
        v = yield g.read(GPA, 8)
        yield g.sync(v)
        v = yield g.read(GPA + PAGE - 4, 10)          # crosses into page 1
        yield g.sync(v)
        yield g.write(GPA + 8, b"\xff" * 8)
        yield g.write(GPA + 2 * PAGE - 3, b"abcdef")  # crosses into page 2
        yield g.sync("written")
        v = yield g.read(GPA + 3 * PAGE, 8)          # host wrote this after the guest started
        yield g.sync(v)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert sync_value(vcpu) == b"\xaa" * 8
    assert sync_value(vcpu) == b"0123456789"
    assert sync_value(vcpu) == "written"
    assert me.read(hva + 8, 8) == b"\xff" * 8
    assert me.read(hva + 2 * PAGE - 3, 6) == b"abcdef"
    me.write(hva + 3 * PAGE, b"\x5a" * 8)
    assert sync_value(vcpu) == b"\x5a" * 8
    run_done(vcpu)
    # the guest and the host use the same frame
    assert vm.gpa_to_pfn(GPA)["pfn"] == me.pagemap(hva).pfn
    assert rec.got == []


@pytest.mark.parametrize("vm_type,gmem", [
    (u.KVM_X86_SW_PROTECTED_VM, True), (u.KVM_X86_DEFAULT_VM, False)])
def test_batched_guest_accesses_agree_with_host(host, vm_type, gmem):
    """read_batch / write_batch: many accesses in one yield; what the guest wrote
    is in host memory, what the host wrote is what the guest reads (incl. entries
    that straddle a page boundary and repeated gpas)."""
    me, rec = attach(host)
    npages = 256
    size = npages * PAGE
    vm = me.open_kvm().create_vm(vm_type)
    if gmem:
        fd = vm.create_guest_memfd(size, SHARED_GMEM)
        hva = me.mmap(0, size, RW, u.MAP_SHARED, fd, 0)
        vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, size, hva, fd, 0)
    else:
        hva = me.mmap(0, size, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
        vm.set_user_memory_region2(SLOT, 0, GPA, size, hva)
    wgpas = [GPA + i * PAGE + (i % 7) * 16 for i in range(npages)]
    wdata = b"".join(bytes([i & 0xFF, 0x5A, i >> 8, 0xA5]) * 4 for i in range(npages))
    rgpas = [GPA + i * PAGE + 2048 for i in range(0, npages, 3)] + [GPA + 5 * PAGE - 8, GPA + 2048]

    def guest(g):
        yield g.write_batch(wgpas, 16, wdata)
        yield g.sync("w")
        out = yield g.read_batch(rgpas, 16)
        yield g.sync(out)
        out = yield g.read_batch(wgpas, 16)
        yield g.sync(out)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert sync_value(vcpu) == "w"
    for i, gpa in enumerate(wgpas):
        assert me.read(hva + gpa - GPA, 16) == wdata[16 * i:16 * i + 16]
    for gpa in rgpas:
        me.write(hva + gpa - GPA, os.urandom(16))
    # (GPA + 2048 is read twice: both reads see the last write)
    expect = b"".join(me.read(hva + gpa - GPA, 16) for gpa in rgpas)
    out = sync_value(vcpu)
    assert len(out) == 16 * len(rgpas)
    assert out == expect
    # read back what the guest wrote, except where the host just overwrote it
    out = sync_value(vcpu)
    assert out == b"".join(me.read(hva + gpa - GPA, 16) for gpa in wgpas)
    run_done(vcpu)
    assert rec.got == []


def test_exits_ucalls_and_hlt(host):
    """UCALL_SYNC args, UCALL_ABORT with its message, KVM_EXIT_HLT; a finished guest
    program halts."""
    me, _rec = attach(host)
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)

    def guest(g):
        yield g.sync(1, 2, 3)
        yield g.hlt()
        yield g.abort("guest assertion failed")
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert run_ok(vcpu) == (u.UCALL_SYNC, (1, 2, 3))
    assert vcpu.run() == 0 and vcpu.kvm_run.exit_reason == u.KVM_EXIT_HLT
    assert run_ok(vcpu) == (u.UCALL_ABORT, ("guest assertion failed",))
    assert run_ok(vcpu) == (u.UCALL_DONE, ())
    assert vcpu.run() == 0 and vcpu.kvm_run.exit_reason == u.KVM_EXIT_HLT


# =================================================================== 2. test_memory_failure_guest
@pytest.mark.parametrize("cleanup", ["punch", "free_vm"])
@pytest.mark.parametrize("policy", POLICIES)
def test_memory_failure_guest_stage2(host_factory, policy, cleanup):
    """Lisa Wang's test_memory_failure_guest (guest_memfd_test.c, MF_DELAYED series):
    1-page MMAP|INIT_SHARED gmem at GPA 4G, slot 1; the host learns the pfn and
    munmaps; the guest read maps it in stage-2; debugfs corrupt-pfn returns 0
    (MF_DELAYED fix; -EBUSY on v6.18) and zaps stage-2 (kvm_gmem_error_folio);
    the next guest read: KVM_RUN -1/EHWPOISON, exit 39, gpa page-aligned, size
    4096, flags 0, no signal.  Unpoison: EBUSY while the file holds the page,
    0 once the VM is freed (or the page punched out)."""
    fixed = policy == "mf-delayed-fix"
    h = host_factory(policy=policy)
    me, rec = attach(h)
    kvm = me.open_kvm()
    vm = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
    gfd = vm.create_guest_memfd(PAGE, SHARED_GMEM)
    mem = me.mmap(0, PAGE, RW, u.MAP_SHARED, gfd, 0)
    me.write(mem, b"\x3c" * PAGE)
    pfn = me.pagemap(mem).pfn
    me.munmap(mem, PAGE)
    vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, PAGE, 0, gfd, 0)

    def guest(g):
        v = yield g.read(GPA + 0x10, 8)
        yield g.sync(v)
        yield g.done()
        v = yield g.read(GPA + 0x10, 8)
        yield g.sync(v)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert sync_value(vcpu) == b"\x3c" * 8
    run_done(vcpu)
    s2 = vm.gpa_to_pfn(GPA)
    assert (s2["mapped"], s2["pfn"], s2["slot"]) == (True, pfn, SLOT)
    stats0 = h.mf_stats()

    corrupt_pfn_delayed(h, pfn, fixed)
    assert h.kpageflags(pfn) & KPF_HWPOISON
    assert vm.gpa_to_pfn(GPA)["mapped"] is False             # stage-2 zapped
    stats = h.mf_stats()
    key = "delayed" if fixed else "failed"
    assert stats[key] == stats0[key] + 1
    assert dmesg_has(h, "Injecting memory failure at pfn %#x" % pfn)
    assert dmesg_has(h, "Memory failure: %#x: recovery action for dirty unevictable LRU page: %s"
                     % (pfn, "Delayed" if fixed else "Failed"))

    assert run_err(vcpu) == u.EHWPOISON
    assert mf(vcpu) == (u.KVM_EXIT_MEMORY_FAULT, GPA, PAGE, 0)
    # the access is retried by the next KVM_RUN: same exit again
    assert run_err(vcpu) == u.EHWPOISON
    assert mf(vcpu) == (u.KVM_EXIT_MEMORY_FAULT, GPA, PAGE, 0)
    assert rec.got == []                                      # no SIGBUS to anyone

    with pytest.raises(OSError) as ei:                       # the file still holds the page
        h.unpoison_pfn(pfn)
    assert ei.value.errno == errno.EBUSY

    if cleanup == "punch":
        me.fallocate(gfd, PUNCH, 0, PAGE)
        assert h.unpoison_pfn(pfn) == 0
        assert not h.kpageflags(pfn) & KPF_HWPOISON
        # a fresh zeroed page for the guest
        assert sync_value(vcpu) == bytes(8)
        assert vm.gpa_to_pfn(GPA)["mapped"] is True
    else:
        me.close(vcpu.fd)
        me.close(gfd)
        me.close(vm.fd)
        me.close(kvm.fd)
        assert h.unpoison_pfn(pfn) == 0
        assert not h.kpageflags(pfn) & KPF_HWPOISON


# =================================================================== 3. private memory
def _private_vm(me, size, kind):
    """A SW_PROTECTED VM whose slot at GPA is private: either a gmem-only file that
    starts private (MMAP, no INIT_SHARED) or a plain gmem with the PRIVATE attribute."""
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    if kind == "gmem_only":
        gfd = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP)
        vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, size, 0, gfd, 0)
    else:
        gfd = vm.create_guest_memfd(size, 0)
        shared = me.mmap(0, size, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
        vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, size, shared, gfd, 0)
        vm.set_memory_attributes(GPA, size, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return vm, gfd


@pytest.mark.parametrize("inject", ["corrupt_pfn", "hw_detect"])
@pytest.mark.parametrize("kind", ["attributes", "gmem_only"])
@pytest.mark.parametrize("policy", POLICIES)
def test_private_ehwpoison_and_punch_hole_recovery(host_factory, policy, kind, inject):
    """kvm_gmem_error_folio: a deferred error on private gmem memory signals nobody; stage-2 of
    that page (only) is zapped; the next guest access: -1/EHWPOISON, exit 39,
    gpa page-aligned, size 4096, flags PRIVATE.  Punching the hole recovers: the
    guest then reads zeros (as the KVM hwpoison selftest RFC expects)."""
    fixed = policy == "mf-delayed-fix"
    h = host_factory(policy=policy)
    me, rec = attach(h)
    size = 16 * PAGE
    vm, gfd = _private_vm(me, size, kind)
    p0, p1 = GPA + 2 * PAGE, GPA + 3 * PAGE

    def guest(g):
        yield g.write(p0, b"\x11" * PAGE)
        yield g.write(p1, b"\x22" * PAGE)
        yield g.sync("filled")
        v = yield g.read(p1 + 8, 8)                 # the neighbour still works
        yield g.sync(v)
        v = yield g.read(p0 + 0x18, 8)              # the poisoned page
        yield g.sync(v)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert sync_value(vcpu) == "filled"
    s2 = vm.gpa_to_pfn(p0)
    assert s2["mapped"] and s2["pfn"] == s2["backing_pfn"]
    pfn = s2["pfn"]

    if inject == "corrupt_pfn":
        corrupt_pfn_delayed(h, pfn, fixed)
    else:
        assert h.hw_detect(pfn) == (0 if fixed else -errno.EBUSY)
    assert vm.gpa_to_pfn(p0)["mapped"] is False
    assert vm.gpa_to_pfn(p1)["mapped"] is True              # only the failed folio is zapped

    assert sync_value(vcpu) == b"\x22" * 8
    assert run_err(vcpu) == u.EHWPOISON
    assert mf(vcpu) == (u.KVM_EXIT_MEMORY_FAULT, p0, PAGE, u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert run_err(vcpu) == u.EHWPOISON
    assert mf(vcpu) == (u.KVM_EXIT_MEMORY_FAULT, p0, PAGE, u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert rec.got == []

    me.fallocate(gfd, PUNCH, 2 * PAGE, PAGE)
    assert sync_value(vcpu) == bytes(8)
    new = vm.gpa_to_pfn(p0)
    assert new["mapped"] and new["pfn"] != pfn
    run_done(vcpu)
    assert rec.got == []
    if inject == "corrupt_pfn":
        assert h.unpoison_pfn(pfn) == 0                      # unpoison_memory: no mapping, no extra ref
    else:
        with pytest.raises(OSError) as ei:                   # unpoison is off after a real error
            h.unpoison_pfn(pfn)
        assert ei.value.errno == errno.EOPNOTSUPP


# =================================================================== 4. consumed error in guest mode
def _consumed_in_vcpu_thread(vm, h):
    """Runs in a clone()d vCPU thread; returns what it saw."""
    out = {"tid": os.getpid()}
    rec = Recorder()
    emu.sigaction(signal.SIGBUS, rec)
    vcpu = vm.create_vcpu(1)
    p0 = GPA + PAGE

    def guest(g):
        yield g.write(p0, b"\x77" * PAGE)
        yield g.sync("in stage-2")
        v = yield g.read(p0 + 8, 8)
        yield g.sync(v)
        yield g.done()

    vcpu.set_guest(guest)
    assert sync_value(vcpu) == "in stage-2"
    pfn = vm.gpa_to_pfn(p0)["pfn"]
    out["pfn"] = pfn
    h.hw_poison(pfn)
    errs = runs_until_ehwpoison(vcpu)
    out["runs"] = errs
    out["signals"] = rec.take()
    out["s2"] = vm.gpa_to_pfn(p0)
    return out


@pytest.mark.parametrize("kind", ["private", "shared_unmapped"])
@pytest.mark.parametrize("policy", POLICIES)
def test_consumed_error_in_guest_mode(host_factory, policy, kind):
    """kill_me_maybe from kvm: a latent error consumed by the guest is a #MC on the vCPU thread
    (MF_ACTION_REQUIRED, current = the vCPU thread).
    - fix: no signal; the vCPU re-enters and gets the EHWPOISON exit;
    - v6.18: memory_failure -EBUSY -> "Memory error not recovered" and kill_me_now:
      SIGBUS SI_KERNEL to the vCPU thread only; with the handler returning, KVM_RUN
      returns -EINTR (KVM_EXIT_INTR), the next KVM_RUN gives EHWPOISON."""
    fixed = policy == "mf-delayed-fix"
    h = host_factory(policy=policy)
    me, main_rec = attach(h)
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    size = 4 * PAGE
    if kind == "private":
        gfd = vm.create_guest_memfd(size, 0)
        vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, size, 0, gfd, 0)
        vm.set_memory_attributes(GPA, size, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        flags = u.KVM_MEMORY_EXIT_FLAG_PRIVATE
    else:
        gfd = vm.create_guest_memfd(size, SHARED_GMEM)
        vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, size, 0, gfd, 0)
        flags = 0

    def body(task):
        return _consumed_in_vcpu_thread(vm, h)

    th = me.clone(body, name="vcpu1")
    assert th.join(30) == 0
    r = th.result
    pfn, tid = r["pfn"], r["tid"]
    ehw = (u.EHWPOISON, u.KVM_EXIT_MEMORY_FAULT, GPA + PAGE, PAGE, flags)
    if fixed:
        assert r["signals"] == []
        assert r["runs"] == [ehw]
    else:
        assert r["signals"] == [(tid, u.SI_KERNEL, 0, 0)]
        assert r["runs"][0][:2] == (u.EINTR, u.KVM_EXIT_INTR)
        assert r["runs"][1:] == [ehw]
    assert r["s2"]["mapped"] is False
    assert main_rec.got == []                                # only the vCPU thread
    assert h.kpageflags(pfn) & KPF_HWPOISON
    assert dmesg_has(h, "mce: Uncorrected hardware memory error in user-access at %x"
                     % ((pfn << 12) | 8))
    assert dmesg_has(h, "mce: Memory error not recovered") == (not fixed)


@pytest.mark.parametrize("policy", POLICIES)
def test_consumed_error_guest_mode_shared_page_dirty_in_host(host_factory, policy):
    """memory_failure(MF_ACTION_REQUIRED) on a mapped, dirty gmem page: the #MC the
    guest consumed is handled with
    current = the vCPU thread, so the AR SIGBUS (kill_procs, forcekill: dirty) goes
    to the vCPU thread with the page's host VA, lsb 12; KVM_RUN returns -EINTR and
    the next one gives EHWPOISON, flags 0."""
    fixed = policy == "mf-delayed-fix"
    h = host_factory(policy=policy)
    me, main_rec = attach(h)
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    size = 4 * PAGE
    gfd = vm.create_guest_memfd(size, SHARED_GMEM)
    hva = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, size, hva, gfd, 0)
    me.write(hva + PAGE, b"\x99" * PAGE)                     # dirty, host-mapped

    def body(task):
        rec = Recorder()
        emu.sigaction(signal.SIGBUS, rec)
        vcpu = vm.create_vcpu(1)

        def guest(g):
            v = yield g.read(GPA + PAGE, 8)
            yield g.sync(v)
            v = yield g.read(GPA + PAGE + 8, 8)
            yield g.sync(v)

        vcpu.set_guest(guest)
        assert sync_value(vcpu) == b"\x99" * 8
        h.hw_poison(vm.gpa_to_pfn(GPA + PAGE)["pfn"])
        runs = runs_until_ehwpoison(vcpu)
        return os.getpid(), runs, rec.take()

    th = me.clone(body, name="vcpu1")
    assert th.join(30) == 0
    tid, runs, sigs = th.result
    assert sigs[0] == (tid, u.BUS_MCEERR_AR, hva + PAGE, 12)
    if not fixed:
        # kill_me_now's SIGBUS is dropped while the AR is still pending (legacy signal)
        assert all(s[1] in (u.BUS_MCEERR_AR, u.SI_KERNEL) for s in sigs)
    else:
        assert len(sigs) == 1
    assert runs[0][:2] == (u.EINTR, u.KVM_EXIT_INTR)
    assert runs[-1] == (u.EHWPOISON, u.KVM_EXIT_MEMORY_FAULT, GPA + PAGE, PAGE, 0)
    assert main_rec.got == []


# =================================================================== 5. ordinary slots
def test_ordinary_slot_deferred_error_sigbus_ar_with_hva(host):
    """kvm_send_hwpoison_signal (arch/x86/kvm/mmu/mmu.c): a deferred error on the
    anon page behind an ordinary slot, then a
    guest access: GUP meets the hwpoison entry -> kvm_send_hwpoison_signal: SIGBUS
    BUS_MCEERR_AR to the vCPU thread, si_addr = the page's hva, lsb 12; KVM_RUN
    returns -EINTR (KVM_EXIT_INTR) and the access stays pending.  Recovery with
    munmap + mmap MAP_FIXED: the guest reads zeros there, data elsewhere intact."""
    me, main_rec = attach(host)
    size = 16 * PAGE
    anon = me.mmap(0, size, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    gbase = 0x100000
    vm.set_user_memory_region2(0, 0, gbase, size, anon)

    def body(task):
        rec = Recorder()
        emu.sigaction(signal.SIGBUS, rec)
        vcpu = vm.create_vcpu(1)

        def guest(g):
            yield g.write_batch([gbase + i * PAGE for i in range(16)], 8, b"\xcc" * 128)
            yield g.sync("filled")
            v = yield g.read(gbase + 5 * PAGE + 0x123, 8)
            yield g.sync(v)
            v = yield g.read(gbase + 6 * PAGE, 8)
            yield g.sync(v)
            yield g.done()

        vcpu.set_guest(guest)
        assert sync_value(vcpu) == "filled"
        pfn = task.pagemap(anon + 5 * PAGE).pfn
        assert vm.gpa_to_pfn(gbase + 5 * PAGE)["pfn"] == pfn
        host.hw_detect(pfn)
        res = {"tid": os.getpid(), "s2_after_mf": vm.gpa_to_pfn(gbase + 5 * PAGE)["mapped"]}
        runs = []
        for _ in range(2):
            runs.append((run_err(vcpu), vcpu.kvm_run.exit_reason))
        res["runs"], res["sigs"] = runs, rec.take()
        # QEMU-like recovery of an anonymous page: a fresh mapping at the same hva
        task.munmap(anon + 5 * PAGE, PAGE)
        assert task.mmap(anon + 5 * PAGE, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_FIXED) \
            == anon + 5 * PAGE
        res["v5"] = sync_value(vcpu)
        res["v6"] = sync_value(vcpu)
        run_done(vcpu)
        res["late"] = rec.take()
        return res

    th = me.clone(body, name="vcpu1")
    assert th.join(30) == 0
    r = th.result
    assert r["s2_after_mf"] is False
    assert r["runs"] == [(u.EINTR, u.KVM_EXIT_INTR)] * 2
    assert r["sigs"] == [(r["tid"], u.BUS_MCEERR_AR, anon + 5 * PAGE, 12)] * 2
    assert (r["v5"], r["v6"], r["late"]) == (bytes(8), b"\xcc" * 8, [])
    assert main_rec.got == []


def test_ordinary_slot_hugetlb_unmap_zaps_the_whole_huge_range(host_factory):
    """A HugeTLB folio behind an ordinary slot: try_to_unmap_one() starts the MMU
    notifier over the whole huge page (mmu_notifier_range_init with the hstate
    size), so KVM drops every stage-2 entry the guest built from it, not only the
    one at the huge entry's address.  After a failure on page 2 the guest's read of
    page 9 faults, meets the hwpoison entry and gets kvm_send_hwpoison_signal():
    SIGBUS BUS_MCEERR_AR at page 9's hva, lsb PAGE_SHIFT; KVM_RUN -EINTR."""
    host = host_factory(ram="128M", hugepages={"2M": 2})
    me, rec = attach(host)
    fd = me.memfd_create("guest-ram", u.MFD_HUGETLB | u.MFD_HUGE_2MB)
    me.ftruncate(fd, 2 << 20)
    hva = me.mmap(0, 2 << 20, RW, u.MAP_SHARED, fd, 0)
    me.write(hva + 9 * PAGE, b"nine")
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    vm.set_user_memory_region2(1, 0, GPA, 2 << 20, hva)

    def guest(g):
        v = yield g.read(GPA + 2 * PAGE, 4)
        w = yield g.read(GPA + 9 * PAGE, 4)
        yield g.sync((v, w))
        w = yield g.read(GPA + 9 * PAGE, 4)
        yield g.sync(w)

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert sync_value(vcpu) == (bytes(4), b"nine")
    assert vm.gpa_to_pfn(GPA + 9 * PAGE)["mapped"]
    assert host.corrupt_pfn(me.pagemap(hva + 2 * PAGE).pfn) == 0
    assert not vm.gpa_to_pfn(GPA + 9 * PAGE)["mapped"]
    assert run_err(vcpu) == errno.EINTR
    assert rec.got == [(os.getpid(), u.BUS_MCEERR_AR, hva + 9 * PAGE, 12)]


@pytest.mark.parametrize("how", ["munmap", "dontneed"])
def test_ordinary_slot_host_unmap_zaps_stage2(host, how):
    """The MMU notifier: unmapping host memory behind an ordinary slot zaps the
    stage-2 mapping.  After MADV_DONTNEED the guest sees fresh zeroed anon memory;
    after munmap with nothing mapped, KVM_RUN fails with EFAULT; a new mapping at
    the same hva is then used."""
    me, rec = attach(host)
    size = 8 * PAGE
    anon = me.mmap(0, size, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    vm.set_user_memory_region2(0, 0, 0, size, anon)

    def guest(g):
        yield g.write(2 * PAGE, b"\xcc" * 16)
        yield g.write(3 * PAGE, b"\xdd" * 16)
        yield g.sync("w")
        v = yield g.read(2 * PAGE, 16)
        yield g.sync(v)
        v = yield g.read(3 * PAGE, 16)
        yield g.sync(v)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert sync_value(vcpu) == "w"
    old = vm.gpa_to_pfn(2 * PAGE)
    assert old["mapped"] and old["pfn"] == me.pagemap(anon + 2 * PAGE).pfn
    if how == "dontneed":
        me.madvise(anon + 2 * PAGE, PAGE, u.MADV_DONTNEED)
    else:
        me.munmap(anon + 2 * PAGE, PAGE)
    assert vm.gpa_to_pfn(2 * PAGE)["mapped"] is False
    assert vm.gpa_to_pfn(3 * PAGE)["mapped"] is True
    if how == "munmap":
        assert run_err(vcpu) == errno.EFAULT
        me.mmap(anon + 2 * PAGE, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_FIXED)
    assert sync_value(vcpu) == bytes(16)
    assert sync_value(vcpu) == b"\xdd" * 16
    assert vm.gpa_to_pfn(2 * PAGE)["pfn"] == me.pagemap(anon + 2 * PAGE).pfn
    run_done(vcpu)
    assert rec.got == []


def test_ordinary_slot_memfd_backing_shares_with_host(host):
    """An ordinary slot backed by a memfd mapping: the guest and the host see the
    same page; punching the memfd zaps stage-2 and the guest then reads zeros."""
    me, rec = attach(host)
    fd = me.memfd_create("guest-ram")
    me.ftruncate(fd, 4 * PAGE)
    hva = me.mmap(0, 4 * PAGE, RW, u.MAP_SHARED, fd, 0)
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    vm.set_user_memory_region2(3, 0, 0x10000, 4 * PAGE, hva)
    me.write(hva + PAGE, b"host")

    def guest(g):
        v = yield g.read(0x10000 + PAGE, 4)
        yield g.sync(v)
        yield g.write(0x10000 + PAGE, b"gst!")
        yield g.sync("w")
        v = yield g.read(0x10000 + PAGE, 4)
        yield g.sync(v)

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert sync_value(vcpu) == b"host"
    assert sync_value(vcpu) == "w"
    assert me.read(hva + PAGE, 4) == b"gst!"
    assert me.pread(fd, 4, PAGE) == b"gst!"
    me.fallocate(fd, PUNCH, PAGE, PAGE)
    assert vm.gpa_to_pfn(0x10000 + PAGE)["mapped"] is False
    assert sync_value(vcpu) == bytes(4)
    assert rec.got == []


# =================================================================== 6. conversion requests
def _inplace_vm(me, size):
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(size, SHARED_GMEM)
    hva = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, size, hva, gfd, 0)
    return vm, gfd, hva


def _attr_vm(me, size):
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(size, 0)
    anon = me.mmap(0, size, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, size, anon, gfd, 0)
    return vm, gfd, anon


def test_conversion_request_in_place(host):
    """KVM_X86_SW_PROTECTED_VM, gmem-only (MMAP|INIT_SHARED) slot: a private access
    to a shared page is a conversion request: -1/EFAULT, exit 39, gpa page-aligned,
    size 4096, flags PRIVATE.  Unresolved, the retry asks again.  The VMM converts
    in place (KVM_GMEM_CONVERT_PRIVATE) and the retried access completes; the host
    can no longer fault the page (SIGBUS BUS_ADRERR).  And the other way: a shared
    access to a private page: flags 0; converted to shared, contents kept."""
    me, rec = attach(host)
    vm, gfd, hva = _inplace_vm(me, 4 * PAGE)
    me.write(hva + PAGE, b"\x42" * PAGE)
    me.write(hva + 3 * PAGE, b"\x24" * 8)
    me.gmem_convert(gfd, 3 * PAGE, PAGE, private=True)      # page 3: private, untouched by the guest

    def guest(g):
        v = yield g.read(GPA + PAGE + 0x40, 8, private=True)  # conversion request
        yield g.sync(v)
        yield g.write(GPA + PAGE, b"\x43" * 8, private=True)
        yield g.sync("private write")
        v = yield g.read(GPA + 3 * PAGE, 8, private=False)    # shared view of a private page
        yield g.sync(v)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert run_err(vcpu) == errno.EFAULT
    assert mf(vcpu) == (u.KVM_EXIT_MEMORY_FAULT, GPA + PAGE, PAGE, u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert run_err(vcpu) == errno.EFAULT
    assert mf(vcpu) == (u.KVM_EXIT_MEMORY_FAULT, GPA + PAGE, PAGE, u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert vm.gpa_to_pfn(GPA + PAGE)["mapped"] is False
    me.gmem_convert(gfd, PAGE, PAGE, private=True)
    assert sync_value(vcpu) == b"\x42" * 8                    # in place: contents kept
    assert sync_value(vcpu) == "private write"
    # the host cannot fault a private page of the file (kvm_gmem_fault_user_mapping)
    rec.raising = True
    with pytest.raises(Stop):
        me.read(hva + PAGE, 8)
    rec.raising = False
    assert [(c, a) for _t, c, a, _l in rec.take()] == [(u.BUS_ADRERR, hva + PAGE)]
    assert run_err(vcpu) == errno.EFAULT
    assert mf(vcpu) == (u.KVM_EXIT_MEMORY_FAULT, GPA + 3 * PAGE, PAGE, 0)
    me.gmem_convert(gfd, 3 * PAGE, PAGE, private=False)
    assert sync_value(vcpu) == b"\x24" * 8
    run_done(vcpu)
    me.gmem_convert(gfd, PAGE, PAGE, private=False)
    assert me.read(hva + PAGE, 8) == b"\x43" * 8              # the guest's private write
    assert rec.got == []


def test_conversion_request_attributes(host):
    """KVM_SET_MEMORY_ATTRIBUTES path: plain gmem (private backing) plus anon memory
    at the hva (shared backing).  A private access to a shared gfn: EFAULT, exit 39,
    flags PRIVATE; the VMM sets PRIVATE and the access is served from guest_memfd.
    A shared access to a private gfn: flags 0; clearing the attribute serves it
    from the hva's memory."""
    me, rec = attach(host)
    vm, gfd, anon = _attr_vm(me, 4 * PAGE)
    me.write(anon + 2 * PAGE, b"shared!!")
    me.write(anon + 3 * PAGE, b"SHARED!!")
    vm.set_memory_attributes(GPA + 3 * PAGE, PAGE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def guest(g):
        yield g.write(GPA + 2 * PAGE, b"private!", private=True)
        yield g.sync("w")
        v = yield g.read(GPA + 2 * PAGE, 8)                     # attribute decides: private
        yield g.sync(v)
        v = yield g.read(GPA + 3 * PAGE, 8, private=False)
        yield g.sync(v)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert run_err(vcpu) == errno.EFAULT
    assert mf(vcpu) == (u.KVM_EXIT_MEMORY_FAULT, GPA + 2 * PAGE, PAGE,
                        u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert vm.set_memory_attributes(GPA + 2 * PAGE, PAGE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE) == 0
    assert sync_value(vcpu) == "w"
    assert me.read(anon + 2 * PAGE, 8) == b"shared!!"          # the private write went to gmem
    assert sync_value(vcpu) == b"private!"
    s2 = vm.gpa_to_pfn(GPA + 2 * PAGE)
    assert s2["private"] is True and s2["pfn"] != me.pagemap(anon + 2 * PAGE).pfn
    assert run_err(vcpu) == errno.EFAULT
    assert mf(vcpu) == (u.KVM_EXIT_MEMORY_FAULT, GPA + 3 * PAGE, PAGE, 0)
    assert vm.set_memory_attributes(GPA + 3 * PAGE, PAGE, 0) == 0
    assert sync_value(vcpu) == b"SHARED!!"
    assert vm.gpa_to_pfn(GPA + 3 * PAGE)["pfn"] == me.pagemap(anon + 3 * PAGE).pfn
    run_done(vcpu)
    assert rec.got == []


@pytest.mark.parametrize("path", ["in_place", "attributes"])
def test_conversion_request_with_page_already_in_stage2(host, path):
    """The guest's private/shared view must match the page's state whether or not
    stage-2 already maps the gfn (TDX: separate shared/private EPT; SNP: RMP
    check).  Shared page mapped by a shared access, then a private access: EFAULT,
    flags PRIVATE.  After the conversion, mapped by a private access, then a
    shared access: EFAULT, flags 0."""
    me, rec = attach(host)
    if path == "in_place":
        vm, gfd, hva = _inplace_vm(me, 4 * PAGE)

        def convert(private):
            me.gmem_convert(gfd, PAGE, PAGE, private=private)
    else:
        vm, gfd, hva = _attr_vm(me, 4 * PAGE)

        def convert(private):
            vm.set_memory_attributes(GPA + PAGE, PAGE,
                                     u.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)
    me.write(hva + PAGE, b"\x42" * 8)

    def guest(g):
        v = yield g.read(GPA + PAGE, 8)                       # maps it (shared)
        yield g.sync(v)
        v = yield g.read(GPA + PAGE, 8, private=True)
        yield g.sync(v)
        v = yield g.read(GPA + PAGE, 8, private=False)
        yield g.sync(v)

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert sync_value(vcpu) == b"\x42" * 8
    assert vm.gpa_to_pfn(GPA + PAGE)["mapped"] is True
    assert run_err(vcpu) == errno.EFAULT
    assert mf(vcpu) == (u.KVM_EXIT_MEMORY_FAULT, GPA + PAGE, PAGE, u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    convert(True)
    sync_value(vcpu)
    assert vm.gpa_to_pfn(GPA + PAGE)["mapped"] is True
    assert run_err(vcpu) == errno.EFAULT
    assert mf(vcpu) == (u.KVM_EXIT_MEMORY_FAULT, GPA + PAGE, PAGE, 0)
    convert(False)
    assert sync_value(vcpu) == b"\x42" * 8
    assert rec.got == []


def test_private_access_without_gmem_is_efault(host):
    """kvm_mmu_faultin_pfn: a private fault in a slot without guest_memfd: -EFAULT with a memory
    fault exit (flags PRIVATE)."""
    me, rec = attach(host)
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    anon = me.mmap(0, 2 * PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    vm.set_user_memory_region2(0, 0, 0, 2 * PAGE, anon)
    vm.set_memory_attributes(0, 2 * PAGE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def guest(g):
        v = yield g.read(PAGE, 8)
        yield g.sync(v)

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert run_err(vcpu) == errno.EFAULT
    assert mf(vcpu) == (u.KVM_EXIT_MEMORY_FAULT, PAGE, PAGE, u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert rec.got == []


# =================================================================== 7. bad ioctl arguments
@pytest.fixture
def vmenv(host):
    me, _rec = attach(host)
    kvm = me.open_kvm()
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    anon = me.mmap(0, 64 * PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    return me, kvm, vm, anon


def _errno_of(fn, *a, **kw):
    with pytest.raises(OSError) as ei:
        fn(*a, **kw)
    return ei.value.errno


def _no_slot(vm, *gpas):
    for gpa in gpas:
        assert vm.gpa_to_pfn(gpa)["slot"] is None


@pytest.mark.parametrize("gpa,size,hva_off", [
    (0x100000 + 1, 4 * PAGE, 0), (0x100000 + 0x800, 4 * PAGE, 0),
    (0x100000, 4 * PAGE + 1, 0), (0x100000, PAGE // 2, 0),
    (0x100000, 4 * PAGE, 1), (0x100000, 4 * PAGE, 0x800)])
def test_memslot_unaligned_einval(vmenv, gpa, size, hva_off):
    me, _kvm, vm, anon = vmenv
    assert _errno_of(vm.set_user_memory_region2, 0, 0, gpa, size, anon + hva_off) == errno.EINVAL
    _no_slot(vm, 0x100000)
    assert vm.set_user_memory_region2(0, 0, 0x100000, 4 * PAGE, anon) == 0   # still free


def test_memslot_overlap_eexist(vmenv):
    me, _kvm, vm, anon = vmenv
    vm.set_user_memory_region2(0, 0, 0x100000, 8 * PAGE, anon)
    for gpa, size in [(0x100000, 8 * PAGE), (0x100000 + 7 * PAGE, 4 * PAGE),
                      (0x100000 - PAGE, 2 * PAGE), (0x100000 - PAGE, 16 * PAGE)]:
        assert _errno_of(vm.set_user_memory_region2, 1, 0, gpa, size,
                         anon + 16 * PAGE) == errno.EEXIST
    _no_slot(vm, 0x100000 - PAGE, 0x100000 + 8 * PAGE)
    assert vm.gpa_to_pfn(0x100000)["slot"] == 0
    # adjacent is fine
    assert vm.set_user_memory_region2(1, 0, 0x100000 + 8 * PAGE, PAGE, anon + 16 * PAGE) == 0


@pytest.mark.parametrize("flags", [1 << 3, 1 << 5, 1 << 31,
                                   u.KVM_MEM_GUEST_MEMFD | u.KVM_MEM_LOG_DIRTY_PAGES,
                                   u.KVM_MEM_GUEST_MEMFD | u.KVM_MEM_READONLY],
                         ids=["bit3", "bit5", "bit31", "gmem+log_dirty", "gmem+readonly"])
def test_memslot_bad_flags_einval(vmenv, flags):
    """check_memory_region_flags: unknown bits; dirty logging and READONLY are not
    valid together with KVM_MEM_GUEST_MEMFD."""
    me, _kvm, vm, anon = vmenv
    gfd = vm.create_guest_memfd(4 * PAGE, 0)
    assert _errno_of(vm.set_user_memory_region2, 0, flags, 0x100000, 4 * PAGE, anon, gfd,
                     0) == errno.EINVAL
    _no_slot(vm, 0x100000)


def test_memslot_gmem_with_non_gmem_fd_einval(vmenv):
    me, _kvm, vm, anon = vmenv
    fd = me.memfd_create("notgmem")
    me.ftruncate(fd, 4 * PAGE)
    assert _errno_of(vm.set_user_memory_region2, 0, u.KVM_MEM_GUEST_MEMFD, 0, 4 * PAGE, anon,
                     fd, 0) == errno.EINVAL
    _no_slot(vm, 0)


@pytest.mark.parametrize("fd", [-1, 999])
def test_memslot_gmem_bad_fd_ebadf(vmenv, fd):
    me, _kvm, vm, anon = vmenv
    assert _errno_of(vm.set_user_memory_region2, 0, u.KVM_MEM_GUEST_MEMFD, 0, 4 * PAGE, anon,
                     fd, 0) == errno.EBADF
    _no_slot(vm, 0)


def test_memslot_gmem_of_another_vm_einval(vmenv):
    me, kvm, vm, anon = vmenv
    other = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = other.create_guest_memfd(4 * PAGE, 0)
    assert _errno_of(vm.set_user_memory_region2, 0, u.KVM_MEM_GUEST_MEMFD, 0, 4 * PAGE, anon,
                     gfd, 0) == errno.EINVAL
    _no_slot(vm, 0)


@pytest.mark.parametrize("off,size", [(PAGE, 4 * PAGE), (4 * PAGE, PAGE), (0, 8 * PAGE),
                                      (0x800, PAGE), (8 * PAGE, PAGE)])
def test_memslot_gmem_offset_beyond_size_einval(vmenv, off, size):
    me, _kvm, vm, anon = vmenv
    gfd = vm.create_guest_memfd(4 * PAGE, 0)
    assert _errno_of(vm.set_user_memory_region2, 0, u.KVM_MEM_GUEST_MEMFD, 0, size, anon,
                     gfd, off) == errno.EINVAL
    _no_slot(vm, 0)
    # the file is not bound: the whole of it can still be bound
    assert vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, 4 * PAGE, anon, gfd, 0) == 0


def test_memslot_gmem_range_bound_twice_einval(vmenv):
    """kvm_gmem_bind: a file range may back only one slot."""
    me, _kvm, vm, anon = vmenv
    gfd = vm.create_guest_memfd(8 * PAGE, 0)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, 4 * PAGE, anon, gfd, 0)
    assert _errno_of(vm.set_user_memory_region2, 1, u.KVM_MEM_GUEST_MEMFD, 0x100000, 4 * PAGE,
                     anon, gfd, 2 * PAGE) == errno.EINVAL
    _no_slot(vm, 0x100000)
    assert vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, 0x100000, 4 * PAGE, anon, gfd,
                                      4 * PAGE) == 0


def test_memslot_delete_and_recreate(vmenv):
    """memory_size 0 deletes the slot (and its stage-2 mappings)."""
    me, _kvm, vm, anon = vmenv
    vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, anon)

    def guest(g):
        yield g.write(0, b"x")
        yield g.sync(0)

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert sync_value(vcpu) == 0
    assert vm.gpa_to_pfn(0)["mapped"]
    assert vm.set_user_memory_region2(0, 0, 0, 0, 0) == 0
    assert vm.gpa_to_pfn(0)["mapped"] is False
    _no_slot(vm, 0)
    assert vm.set_user_memory_region2(0, 0, 0x200000, 4 * PAGE, anon) == 0


def test_set_memory_attributes_default_vm_einval(host):
    me, _rec = attach(host)
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    anon = me.mmap(0, 4 * PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, anon)
    assert _errno_of(vm.set_memory_attributes, 0, 4 * PAGE,
                     u.KVM_MEMORY_ATTRIBUTE_PRIVATE) == errno.EINVAL
    assert vm.gpa_to_pfn(0)["private"] is False


@pytest.mark.parametrize("gpa,size,attrs,flags", [
    (0x800, PAGE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0),
    (0, PAGE + 1, u.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0),
    (0, 0, u.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0),
    (0, PAGE, 1 << 0, 0),
    (0, PAGE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE, 1)])
def test_set_memory_attributes_bad_args_einval(vmenv, gpa, size, attrs, flags):
    me, _kvm, vm, anon = vmenv
    assert _errno_of(vm.set_memory_attributes, gpa, size, attrs, flags) == errno.EINVAL
    assert vm.gpa_to_pfn(0)["private"] is False


def test_create_vcpu_duplicate_eexist(vmenv):
    me, _kvm, vm, _anon = vmenv
    vcpu = vm.create_vcpu(0)
    assert _errno_of(vm.create_vcpu, 0) == errno.EEXIST
    vm.create_vcpu(1)
    # the first vCPU still works
    def guest(g):
        yield g.sync(7)

    vcpu.set_guest(guest)
    assert sync_value(vcpu) == 7


def test_run_from_other_thread_eperm(vmenv):
    me, _kvm, vm, _anon = vmenv
    vcpu = vm.create_vcpu(0)

    def guest(g):
        yield g.sync("ran")

    vcpu.set_guest(guest)

    def body(task):
        try:
            vcpu.run()
        except OSError as e:
            return e.errno
        return 0

    th = me.clone(body, name="intruder")
    assert th.join(30) == 0
    assert th.result == errno.EPERM
    assert sync_value(vcpu) == "ran"                     # the owner runs it fine


def test_vcpu_created_in_clone_runs_there(vmenv):
    """A vCPU thread: the clone creates and runs its own vCPU through the VM handle."""
    me, _kvm, vm, anon = vmenv
    vm.set_user_memory_region2(0, 0, 0, 4 * PAGE, anon)
    me.write(anon + PAGE, b"fromhost")

    def body(task):
        vcpu = vm.create_vcpu(3)

        def guest(g):
            v = yield g.read(PAGE, 8)
            yield g.sync(v)

        vcpu.set_guest(guest)
        return sync_value(vcpu)

    th = me.clone(body, name="vcpu3")
    assert th.join(30) == 0
    assert th.result == b"fromhost"
    assert _errno_of(vm.create_vcpu, 3) == errno.EEXIST
