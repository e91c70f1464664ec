"""HugeTLB-backed guest_memfd (the HugeTLB guest_memfd series) as the kernel
handles it today: huge folios, huge host and stage-2 mappings, the head flag
poisoning every index of the folio, and the huge lsb on host faults."""
import signal

import pytest

import emu
from emu import uapi as u

MB2 = 2 << 20
GPA = 1 << 32
FLAGS = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
         | u.GUESTMEM_HUGETLB_FLAG_2MB)


class Unwind(Exception):
    pass


def _setup(host, size=2 * MB2):
    me = emu.attach(host, name="qemu")
    kvm = me.open_kvm()
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(size, FLAGS)
    hva = me.mmap(0, size, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, hva, gfd, 0)
    return me, vm, gfd, hva


def _run_reads(vm, gpas):
    def guest(g):
        for gpa in gpas:
            v = yield g.read(gpa, 4)
            yield g.sync(v)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    return vcpu


@pytest.mark.parametrize("policy", ["mf-delayed-fix", "v6.18"])
def test_huge_folio_poisoned_as_a_whole(host_factory, policy):
    host = host_factory(ram="256M", hugepages={"2M": 4}, policy=policy)
    me, vm, gfd, hva = _setup(host)
    me.write(hva, b"\x5a" * 64)
    assert host.meminfo()["HugePages_Free"] == 3          # one huge folio, faulted by the host
    vcpu = _run_reads(vm, [GPA, GPA + 0x1000, GPA + 0x1FF000, GPA + MB2])
    assert vcpu.run() == 0 and vcpu.ucall()[1] == (b"\x5a" * 4,)
    st = vm.gpa_to_pfn(GPA + 0x3000)
    assert st["mapped"] and st["level"] == 2               # one stage-2 entry for the folio
    head = st["pfn"]
    if policy == "v6.18":
        with pytest.raises(OSError) as ei:
            host.corrupt_pfn(head + 3)
        assert ei.value.errno == u.EBUSY
    else:
        assert host.corrupt_pfn(head + 3) == 0
    assert not vm.gpa_to_pfn(GPA)["mapped"]               # the whole folio left stage-2
    # every index of the folio now returns -EHWPOISON (the head flag), not just page 3
    with pytest.raises(OSError) as ei:
        vcpu.run()
    assert ei.value.errno == u.EHWPOISON
    mf = vcpu.kvm_run.memory_fault
    assert (vcpu.kvm_run.exit_reason, mf.gpa, mf.size, mf.flags) == (
        u.KVM_EXIT_MEMORY_FAULT, GPA + 0x1000, 4096, 0)
    assert host.meminfo()["HardwareCorrupted"] == 4       # one raw page, not 2 MiB


def test_host_fault_on_huge_gmem_has_huge_lsb(host_factory):
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, vm, gfd, hva = _setup(host)
    me.write(hva, b"x")
    got = []

    def h(signum, info):
        got.append((info.si_code, info.si_addr, info.si_addr_lsb))
        raise Unwind

    emu.sigaction(signal.SIGBUS, h)
    head = me.pagemap(hva).pfn
    host.corrupt_pfn(head + 7)
    with pytest.raises(Unwind):
        me.read(hva + 0x123456, 1)
    assert got == [(u.BUS_MCEERR_AR, hva + 0x123456, 21)]
    assert me.read(hva + MB2 + 8, 1) == b"\0"              # the next huge folio is fine


def test_huge_gmem_validation(host_factory):
    host = host_factory(ram="256M", hugepages={"2M": 2})
    me = emu.attach(host, name="qemu")
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    for size, flags in ((MB2 + 4096, FLAGS),                      # not a multiple of 2M
                        (MB2, FLAGS & ~u.GUEST_MEMFD_FLAG_HUGETLB),   # size field alone
                        (MB2, (FLAGS & ~(u.GUESTMEM_HUGETLB_FLAG_MASK << u.GUESTMEM_HUGETLB_FLAG_SHIFT))
                         | (16 << u.GUESTMEM_HUGETLB_FLAG_SHIFT))):             # a 64K "hstate"
        with pytest.raises(OSError) as ei:
            vm.create_guest_memfd(size, flags)
        assert ei.value.errno == u.EINVAL
    gfd = vm.create_guest_memfd(MB2, FLAGS)
    with pytest.raises(OSError) as ei:
        me.fallocate(gfd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 0, 4096)
    assert ei.value.errno == u.EINVAL


def test_huge_gmem_punch_returns_the_folio_to_the_pool(host_factory):
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, vm, gfd, hva = _setup(host)
    me.write(hva, b"\x77" * 16)
    me.munmap(hva, 2 * MB2)
    assert host.meminfo()["HugePages_Free"] == 3
    me.fallocate(gfd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 0, MB2)
    assert host.meminfo()["HugePages_Free"] == 4


def test_folio_allocated_over_a_mixed_range_is_split_at_once(host_factory):
    """A conversion that cuts a present folio splits it; one made before the folio
    exists must give the same result when the folio is allocated: the host maps the
    shared page alone (4K), never a PMD over private pages, and a private page stays
    SIGBUS (kvm_gmem_fault_user_mapping)."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, vm, gfd, hva = _setup(host)
    me.gmem_convert(gfd, MB2 + MB2 // 2, MB2 // 2, private=True)   # before any fault
    me.write(hva + MB2, b"x")
    (vma,) = host.smaps(me.tgid)
    assert vma["present"] == [[hva + MB2, 4096, 1]] and vma["Rss"] == 4096
    got = []

    def h(signum, info):
        got.append(info.si_code)
        raise Unwind

    emu.sigaction(signal.SIGBUS, h)
    with pytest.raises(Unwind):
        me.read(hva + MB2 + MB2 // 2, 1)
    assert got == [u.BUS_ADRERR]
    me.write(hva, b"y")                                    # a uniform folio still maps huge
    assert [hva, MB2, 2] in host.smaps(me.tgid)[0]["present"]
    assert host.check_invariants() == []
