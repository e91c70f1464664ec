"""The host's reads of the machine that `emu compare` and scenarios count from:
/proc/PID/smaps (Rss and the mapped runs), KVM's pages_4k/2m/1g, and a bulk
/proc/kpageflags read."""
import errno

import pytest

import emu
from emu import uapi as u

MB = 1 << 20
GPA = 1 << 32


def test_smaps_kvm_stat_and_bulk_kpageflags_follow_the_tables(host_factory):
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me = emu.attach(host, name="vmm")
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(4 * MB, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
                                | u.GUEST_MEMFD_FLAG_HUGETLB | u.GUESTMEM_HUGETLB_FLAG_2MB)
    hva = me.mmap(0, 4 * MB, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, 4 * MB, hva, gfd, 0)
    (v,) = host.smaps(me.tgid)
    assert (v["start"], v["end"], v["Rss"], v["present"]) == (hva, hva + 4 * MB, 0, [])
    me.write(hva, b"x")
    (v,) = host.smaps(me.tgid)
    assert v["Rss"] == 2 * MB and v["present"] == [[hva, 2 * MB, 2]] and v["hwpoison"] == []

    def guest(g):
        yield g.read(GPA + 0x1000, 8)
        yield g.sync(0)

    vc = vm.create_vcpu(0)
    vc.set_guest(guest)
    vc.run()
    (s2,) = host.kvm_stat()
    assert s2["name"] == "%d-%d" % (me.tgid, vm.fd)
    assert (s2["pages_4k"], s2["pages_2m"], s2["pages_1g"]) == (0, 1, 0)
    pfn = vm.gpa_to_pfn(GPA + 0x1000)["backing_pfn"]
    host.hw_detect(pfn)
    (v,) = host.smaps(me.tgid)
    assert v["Rss"] == 0 and v["hwpoison"] == [hva]      # the huge entry became a hwpoison entry
    assert host.kvm_stat()[0]["pages_2m"] == 0
    flags = host.kpageflags(pfn - 1, 3)
    assert flags == [host.kpageflags(p) for p in (pfn - 1, pfn, pfn + 1)]
    assert all(f & 1 << u.KPF_HWPOISON for f in flags)   # the folio's flag, on every page
    nframes = host.meminfo()["MemTotal"] // 4
    assert len(host.kpageflags(nframes - 2, 10)) == 2    # a read stops at max_pfn
    with pytest.raises(OSError) as e:
        host.smaps(999999999)
    assert e.value.errno == errno.ESRCH
    with pytest.raises(OSError) as e:
        host.kpageflags(0, -1)
    assert e.value.errno == errno.EINVAL


def test_fault_around_maps_neighbours_for_shmem_only(host_factory):
    """do_fault_around runs only where vm_ops->map_pages exists (should_fault_around):
    shmem has filemap_map_pages, guest_memfd's kvm_gmem_vm_ops only .fault.  So a
    host read of one guest_memfd page maps that page alone, even with its neighbours
    in the page cache (put there by the guest); a memfd read maps them too."""
    host = host_factory(ram="64M")
    me = emu.attach(host, name="vmm")
    mfd = me.memfd_create("m")
    me.ftruncate(mfd, 16 * 4096)
    me.pwrite(mfd, b"x", 2 * 4096)                       # in the page cache, not mapped
    a = me.mmap(0, 16 * 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, mfd, 0)
    me.read(a + 5 * 4096, 8)
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(16 * 4096, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, 16 * 4096, 0, gfd, 0)

    def guest(g):
        yield g.write(GPA + 2 * 4096, b"y")
        yield g.sync(0)

    vc = vm.create_vcpu(0)
    vc.set_guest(guest)
    vc.run()
    g = me.mmap(0, 16 * 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
    me.read(g + 5 * 4096, 8)
    maps = {v["start"]: v for v in host.smaps(me.tgid)}
    assert [a + 2 * 4096, 4096, 1] in maps[a]["present"]          # fault-around
    assert maps[g]["present"] == [[g + 5 * 4096, 4096, 1]]        # the faulting page alone
