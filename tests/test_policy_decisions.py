"""Single decisions, switched on in user-defined policies (file.py:Class)."""
import signal
import textwrap

import pytest

import emu
from emu import uapi as u

MB2 = 2 << 20
GPA = 1 << 32
FLAGS = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
         | u.GUESTMEM_HUGETLB_FLAG_2MB)


def _policy(tmp_path, body):
    path = tmp_path / "pol.py"
    head = "from emu.kernel.policies import MfDelayedFix\n\nclass P(MfDelayedFix):\n    name = 'p'\n"
    path.write_text(head + textwrap.indent(textwrap.dedent(body), "    "))
    return "%s:P" % path


def _gmem(host, size=2 * MB2):
    me = emu.attach(host, name="qemu")
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(size, FLAGS)
    hva = me.mmap(0, size, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, hva, gfd, 0)
    me.write(hva, b"\x11" * size)
    return me, vm, gfd, hva


def test_no_conversions_after_a_failure(tmp_path):
    with emu.start(ram="256M", hugepages={"2M": 4},
                   policy=_policy(tmp_path, 'gmem_after_failure = "no_conversions"')) as host:
        me, vm, gfd, hva = _gmem(host)
        me.gmem_convert(gfd, MB2, 4096, private=True)           # fine before
        host.corrupt_pfn(me.pagemap(hva).pfn + 3)
        with pytest.raises(OSError) as ei:
            me.gmem_convert(gfd, MB2 + 4096, 4096, private=True)
        assert ei.value.errno == u.EHWPOISON
        assert me.read(hva + MB2 + 8192, 1) == b"\x11"           # but the file stays usable


def test_deferred_failure_sigbus_current(tmp_path):
    pol = _policy(tmp_path, 'deferred_failure = "sigbus_current"')
    with emu.start(ram="256M", hugepages={"2M": 4}, policy=pol,
                   madvise_action_required=False) as host:
        me, vm, gfd, hva = _gmem(host)
        got = []

        class Unwind(Exception):
            pass

        def h(signum, info):
            got.append((info.si_code, info.si_addr, info.si_addr_lsb))
            raise Unwind

        emu.sigaction(signal.SIGBUS, h)
        with pytest.raises(Unwind):
            me.madvise(hva + 0x3000, 4096, u.MADV_HWPOISON)      # pre-6.11: no AR flag
        assert got == [(u.BUS_MCEERR_AR, hva + 0x3000, 21)]


@pytest.mark.parametrize("distribute", [True, False])
def test_distribute_on_split(tmp_path, distribute):
    pol = _policy(tmp_path, "split_on_poison = True\ndistribute_on_split = %s" % distribute)
    with emu.start(ram="256M", hugepages={"2M": 4}, policy=pol) as host:
        me, vm, gfd, hva = _gmem(host)
        head = me.pagemap(hva).pfn
        host.corrupt_pfn(head + 3)
        flagged = [p for p in range(head, head + 512) if host.kpageflags(p) & (1 << u.KPF_HWPOISON)]
        assert flagged == ([head + 3] if distribute else list(range(head, head + 512)))


@pytest.mark.parametrize("summarize", [True, False])
def test_summarize_on_merge(tmp_path, summarize):
    pol = _policy(tmp_path, "split_on_poison = True\nreturn_poisoned_to_hugetlb = True\n"
                  "summarize_on_merge = %s" % summarize)
    with emu.start(ram="256M", hugepages={"2M": 4}, policy=pol) as host:
        me, vm, gfd, hva = _gmem(host, MB2)
        head = me.pagemap(hva).pfn
        host.corrupt_pfn(head + 3)
        me.munmap(hva, MB2)
        vm.set_user_memory_region2(1, 0, GPA, 0)                 # delete the memslot
        me.close(gfd)
        types = [e["type"] for e in host.events()]
        assert ("hugetlb_merge" in types) == summarize
        assert ("hugetlb_free_unmerged" in types) == (not summarize)
        assert host.meminfo()["HugePages_Total"] == 3            # the huge page is gone either way
        assert host.kpageflags(head + 3) & (1 << u.KPF_HWPOISON)


# ================================================================== faults_check
class Unwind(Exception):
    pass


def _read_or_sigbus(me, addr):
    """(data, None) or (None, (si_code, si_addr, si_addr_lsb)) of the SIGBUS the read got."""
    got = []

    def h(signum, info):
        got.append((info.si_code, info.si_addr, info.si_addr_lsb))
        raise Unwind

    emu.sigaction(signal.SIGBUS, h)
    try:
        return me.read(addr, 4), None
    except Unwind:
        return None, got[0]


@pytest.mark.parametrize("check", [True, False])
def test_faults_check_on_a_host_refault_of_a_guest_memfd_page(tmp_path, check):
    """Audit A.3: host_unmap "none" leaves the poisoned page mapped; MADV_DONTNEED drops
    the PTE and the next access faults it in again.  With faults_check the fault finds
    PG_hwpoison (__do_fault) and SIGBUSes BUS_MCEERR_AR; without it the page is mapped
    and the access reads the data."""
    pol = _policy(tmp_path, 'host_unmap = "none"\nfaults_check = %s' % check)
    with emu.start(ram="64M", policy=pol) as host:
        me = emu.attach(host, name="qemu")
        vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        gfd = vm.create_guest_memfd(1 << 20, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
        ram = me.mmap(0, 1 << 20, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
        me.write(ram, b"\x5a" * 8192)
        pfn = me.pagemap(ram).pfn
        with pytest.raises(OSError) as ei:                       # still mapped: MF_FAILED
            host.corrupt_pfn(pfn)
        assert ei.value.errno == u.EBUSY
        assert host.kpageflags(pfn) & (1 << u.KPF_HWPOISON)
        assert me.pagemap(ram).present                           # host_unmap "none"
        me.madvise(ram, 4096, u.MADV_DONTNEED)
        data, sig = _read_or_sigbus(me, ram)
        if check:
            assert (data, sig) == (None, (u.BUS_MCEERR_AR, ram, 12))
        else:
            assert (data, sig) == (b"\x5a" * 4, None)
            assert me.pagemap(ram).present and me.pagemap(ram).pfn == pfn


def test_faults_check_false_leaves_other_memory_as_the_kernel_does(tmp_path):
    """faults_check is a guest_memfd decision: a shmem page still SIGBUSes."""
    pol = _policy(tmp_path, "faults_check = False")
    with emu.start(ram="64M", policy=pol) as host:
        me = emu.attach(host)
        fd = me.memfd_create("shm")
        me.ftruncate(fd, 1 << 20)
        ram = me.mmap(0, 1 << 20, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
        me.write(ram, b"\x5a" * 4096)
        pfn = me.pagemap(ram).pfn
        host.corrupt_pfn(pfn)
        me.munmap(ram, 1 << 20)                                  # drop the hwpoison entry
        ram = me.mmap(0, 1 << 20, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
        assert _read_or_sigbus(me, ram) == (None, (u.BUS_MCEERR_AR, ram, 12))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("check", [True, False])
def test_faults_check_on_a_host_fault_of_a_hugetlb_guest_memfd_page(tmp_path, check, split):
    """The same on a HugeTLB guest_memfd: a fresh mapping of the poisoned folio
    (hugetlb_no_page), or of the failed page of a split one (mapped 4K)."""
    body = "faults_check = %s\n" % check
    body += ('split_on_poison = True\nhost_unmap = "page"\n' if split else 'host_unmap = "none"\n')
    with emu.start(ram="256M", hugepages={"2M": 4}, policy=_policy(tmp_path, body)) as host:
        me, vm, gfd, hva = _gmem(host)
        head = me.pagemap(hva).pfn
        host.corrupt_pfn(head + 3)
        me.munmap(hva, 2 * MB2)
        hva = me.mmap(0, 2 * MB2, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
        data, sig = _read_or_sigbus(me, hva + 0x3000)
        if check:
            assert (data, sig) == (None, (u.BUS_MCEERR_AR, hva + 0x3000, 12 if split else 21))
        else:
            assert (data, sig) == (b"\x11" * 4, None)
            assert me.pagemap(hva + 0x3000).pfn == head + 3
