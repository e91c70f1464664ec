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
