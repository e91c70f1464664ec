"""Port of the guest_memfd memory-failure selftests of Lisa Wang's MF_DELAYED series
(tools/testing/selftests/kvm/guest_memfd_test.c; kvm@/linux-kselftest@, Oct 2025):

- "[RFC PATCH 2/3] KVM: selftests: Add memory failure tests in guest_memfd_test":
  test_memory_failure() runs do_test_memory_failure() for eight rows (injection
  method, PR_MCE_KILL policy, mapped, dirty, SIGBUS expected at injection, return
  code 0), through gmem_test(memory_failure, vm, flags): a 4-page MMAP|INIT_SHARED
  guest_memfd, for every VM type main() finds (the emulator offers INIT_SHARED on
  KVM_X86_DEFAULT_VM and KVM_X86_SW_PROTECTED_VM).
- "[RFC PATCH 3/3] KVM: selftests: Test guest_memfd behavior with respect to stage 2
  page tables": test_memory_failure_guest().

Both run on the kernel the series fixes: policy "mf-delayed-fix" (memory_failure()
returns 0).  tests/test_mf_delayed.py runs the same table under v6.18 as well.

TEST_EXPECT_SIGBUS installs a handler that siglongjmps; outside it SIGBUS has its
default action, so "no SIGBUS" rows would die of one.  The port records every
SIGBUS and also checks what the kernel puts in it (si_code, si_addr, si_addr_lsb),
which the C test does not look at.  (One CPU backend: tests/test_kvm.py runs the
guest_memfd fault paths on both.)
"""
import pytest
from selftest_harness import AO, AR, KPF_HWPOISON, PAGE, QUIET, RW, attach

from emu import uapi as u

POLICY = "mf-delayed-fix"
FLAGS = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE
VM_TYPES = {"default_vm": u.KVM_X86_DEFAULT_VM, "sw_protected_vm": u.KVM_X86_SW_PROTECTED_VM}

# test_memory_failure(): do_test_memory_failure(fd, total_size, method, kill_config,
#                                                map_page, dirty_page, sigbus_expected, 0)
ROWS = [
    ("debugfs", u.PR_MCE_KILL_EARLY, True, True, True),
    ("debugfs", u.PR_MCE_KILL_EARLY, True, False, False),
    ("debugfs", u.PR_MCE_KILL_EARLY, False, True, False),
    ("debugfs", u.PR_MCE_KILL_LATE, True, True, False),
    ("debugfs", u.PR_MCE_KILL_LATE, True, False, False),
    ("debugfs", u.PR_MCE_KILL_LATE, False, True, False),
    ("madvise", u.PR_MCE_KILL_DEFAULT, True, True, True),
    ("madvise", u.PR_MCE_KILL_DEFAULT, True, False, False),
]
_KILL = {u.PR_MCE_KILL_EARLY: "early", u.PR_MCE_KILL_LATE: "late",
         u.PR_MCE_KILL_DEFAULT: "default"}


def _row_id(i):
    method, kill, mapped, dirty, sig = ROWS[i]
    return "row%d-%s-%s-%s-%s" % (i + 1, method, _KILL[kill], "mapped" if mapped else "unmapped",
                                  "dirty" if dirty else "clean")


@pytest.mark.parametrize("vm_type", list(VM_TYPES))
@pytest.mark.parametrize("row", range(len(ROWS)), ids=_row_id)
def test_memory_failure(host_factory, row, vm_type):
    """guest_memfd_test.c do_test_memory_failure(), one row of test_memory_failure().
    mem + page_size is written ('A') or read; its pfn from pagemap; MADV_DONTNEED if
    not mapped; prctl(PR_MCE_KILL, SET, policy); injection through debugfs
    corrupt-pfn (must return 0) or madvise (must return 0); a SIGBUS at injection
    only where expected: AO to the early thread for debugfs (deferred), AR to the
    caller for madvise (MF_ACTION_REQUIRED), for the page, lsb 12.  Then a read and
    a write of the page each get SIGBUS (AR at the page: READ_ONCE(*addr) and
    *addr = 'A' touch byte 0).  Cleanup: munmap, PUNCH_HOLE of the whole file,
    PR_MCE_KILL back to DEFAULT, unpoison-pfn succeeds."""
    method, kill, mapped, dirty, sigbus_expected = ROWS[row]
    h = host_factory(policy=POLICY)
    me, rec = attach(h, name="guest_memfd_test")
    vm = me.open_kvm().create_vm(VM_TYPES[vm_type])
    total = 4 * PAGE
    fd = vm.create_guest_memfd(total, FLAGS)

    mem = me.mmap(0, total, RW, u.MAP_SHARED, fd, 0)
    addr = mem + PAGE
    if dirty:
        me.write(addr, b"A")
    else:
        me.read(addr, 1)                                   # READ_ONCE(*memory_failure_addr)
    pm = me.pagemap(addr)                                  # addr_to_pfn: must be present
    assert pm.present
    pfn = pm.pfn
    if not mapped:
        me.madvise(addr, PAGE, u.MADV_DONTNEED)
    assert me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, kill) == 0
    stats0 = h.mf_stats()

    if method == "debugfs":
        assert h.corrupt_pfn(pfn) == 0                     # mark_memory_failure(pfn, 0)
        if sigbus_expected:
            rec.wait(me)
            assert rec.take() == [(AO, addr, 12)]
    else:
        me.madvise(addr, PAGE, u.MADV_HWPOISON)            # returns 0
        if sigbus_expected:
            assert rec.take() == [(AR, addr, 12)]
    if not sigbus_expected:
        me.idle(QUIET)
        assert rec.take() == []
    st = h.mf_stats()                                      # MF_DELAYED: returned 0, counted
    assert st["delayed"] == stats0["delayed"] + 1 and st["failed"] == stats0["failed"]
    assert h.kpageflags(pfn) & KPF_HWPOISON

    assert rec.run(me.read, addr, 1) == ("jump", (AR, addr, 12))       # READ_ONCE
    assert rec.run(me.write, addr, b"A") == ("jump", (AR, addr, 12))   # *addr = 'A'

    me.munmap(mem, total)
    me.fallocate(fd, PUNCH, 0, total)
    assert me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_DEFAULT) == 0
    assert h.unpoison_pfn(pfn) == 0                        # unmark_memory_failure(pfn, 0)
    assert not h.kpageflags(pfn) & KPF_HWPOISON
    assert rec.take() == []


def test_memory_failure_guest(host_factory):
    """guest_memfd_test.c test_memory_failure_guest(): a one-page MMAP|INIT_SHARED
    guest_memfd at GPA 4G, slot 1; the host reads the page to learn its pfn and
    munmaps; the guest reads it (UCALL_DONE), so stage-2 maps it; debugfs
    corrupt-pfn returns 0 and kvm_gmem_error_folio zaps stage-2; the guest's next
    read makes KVM_RUN return -1 with errno EHWPOISON (a KVM_EXIT_MEMORY_FAULT for
    the page, flags 0: shared).  Nobody gets a SIGBUS.  After close(fd) and
    kvm_vm_free, unpoison-pfn succeeds."""
    gpa, slot = 1 << 32, 1
    h = host_factory(policy=POLICY)
    me, rec = attach(h, name="guest_memfd_test")
    kvm = me.open_kvm()
    vm = kvm.create_vm(u.KVM_X86_DEFAULT_VM)               # VM_SHAPE_DEFAULT
    vcpu = vm.create_vcpu(0)
    size = PAGE                                            # vm->page_size
    fd = vm.create_guest_memfd(size, FLAGS)
    assert vm.set_user_memory_region2(slot, u.KVM_MEM_GUEST_MEMFD, gpa, size, 0, fd, 0) == 0
    mem = me.mmap(0, size, RW, u.MAP_SHARED, fd, 0)
    me.read(mem, 1)                                        # READ_ONCE(*mem)
    pfn = me.pagemap(mem).pfn
    me.munmap(mem, size)

    def guest_code_read(g, gpa):                           # __guest_code_read
        yield g.read(gpa, 1)
        yield g.done()

    vcpu.set_guest(guest_code_read, gpa)                   # guest_read(vcpu, gpa, 0)
    assert vcpu.run() == 0 and vcpu.kvm_run.exit_reason == u.KVM_EXIT_IO
    assert vcpu.ucall() == (u.UCALL_DONE, ())
    assert vm.gpa_to_pfn(gpa)["mapped"] is True

    stats0 = h.mf_stats()
    assert h.corrupt_pfn(pfn) == 0                         # mark_memory_failure(pfn, 0)
    assert vm.gpa_to_pfn(gpa)["mapped"] is False           # zapped from stage-2
    assert h.mf_stats()["delayed"] == stats0["delayed"] + 1

    vcpu.set_guest(guest_code_read, gpa)                   # guest_read(vcpu, gpa, EHWPOISON)
    with pytest.raises(OSError) as ei:
        vcpu.run()
    assert ei.value.errno == u.EHWPOISON
    m = vcpu.kvm_run.memory_fault
    assert (vcpu.kvm_run.exit_reason, m.gpa, m.size, m.flags) == (u.KVM_EXIT_MEMORY_FAULT, gpa,
                                                                  PAGE, 0)
    me.idle(QUIET)
    assert rec.take() == []

    me.close(fd)                                           # close(fd); kvm_vm_free(vm)
    me.close(vcpu.fd)
    me.close(vm.fd)
    me.close(kvm.fd)
    assert h.unpoison_pfn(pfn) == 0                        # unmark_memory_failure(pfn, 0)
    assert not h.kpageflags(pfn) & KPF_HWPOISON
