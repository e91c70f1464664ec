"""host.check_invariants(): the emulated kernel's CONFIG_DEBUG_VM-style self-check.

It holds after ordinary scenarios, and it reports a state broken on purpose (the
supervisor is patched before it forks, as test_signals patches it)."""
import signal

import pytest

import emu
from emu import uapi as u

PAGE = 4096
MB2 = 2 << 20
RW = u.PROT_READ | u.PROT_WRITE
GPA = 1 << 32
ANON = u.MAP_PRIVATE | u.MAP_ANONYMOUS


def attach(h):
    me = emu.attach(h, name="t")
    got = []
    emu.sigaction(signal.SIGBUS, lambda s, i: got.append((i.si_code, i.si_addr, i.si_addr_lsb)))
    return me, got


def shmem(me, pages):
    fd = me.memfd_create("shm")
    me.ftruncate(fd, pages * PAGE)
    return fd, me.mmap(0, pages * PAGE, RW, u.MAP_SHARED, fd, 0)


def free_pfn(h, start=20000):
    """A frame on the buddy free lists."""
    pfn = start
    while not h.kpageflags(pfn) & (1 << u.KPF_BUDDY):
        pfn += 1
    return pfn


def test_fresh_kernel_holds(host_factory):
    h = host_factory(ram="128M", hugepages={"2M": 4})
    assert h.check_invariants() == []


def test_holds_through_ordinary_scenarios(host_factory):
    """mmap/write/fork/munmap, MADV_HWPOISON of anon and shmem pages, a free page
    injected and unpoisoned, punch hole, HugeTLB fault and poison, a guest's accesses."""
    h = host_factory(ram="128M", hugepages={"2M": 4})
    me, got = attach(h)
    fd, a = shmem(me, 8)
    me.write(a, b"s" * 8 * PAGE)
    b = me.mmap(0, 4 * PAGE, RW, ANON)
    me.write(b, b"a" * 4 * PAGE)
    assert h.check_invariants() == []

    ch = me.fork(lambda t: t.read(a, 4) + t.read(b, 4), name="child")
    assert ch.join(10) == 0 and ch.result == b"ssssaaaa"
    assert h.check_invariants() == []

    me.madvise(a + PAGE, PAGE, u.MADV_HWPOISON)
    me.madvise(b + PAGE, PAGE, u.MADV_HWPOISON)
    assert [g[0] for g in got] == [u.BUS_MCEERR_AR] * 2
    assert h.meminfo()["HardwareCorrupted"] == 8
    assert h.check_invariants() == []

    me.fallocate(fd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 2 * PAGE, 2 * PAGE)
    me.madvise(b + 2 * PAGE, PAGE, u.MADV_DONTNEED)
    me.munmap(b, 4 * PAGE)
    assert h.check_invariants() == []

    free = free_pfn(h)
    assert h.corrupt_pfn(free) == 0
    assert h.check_invariants() == []
    assert h.unpoison_pfn(free) == 0
    assert h.check_invariants() == []

    hf = me.memfd_create("huge", u.MFD_HUGETLB)
    me.ftruncate(hf, 2 * MB2)
    c = me.mmap(0, 2 * MB2, RW, u.MAP_SHARED, hf, 0)
    me.write(c, b"h" * 16)
    me.write(c + MB2, b"h" * 16)
    assert h.check_invariants() == []
    me.madvise(c + MB2 + PAGE, PAGE, u.MADV_HWPOISON)
    assert got[-1] == (u.BUS_MCEERR_AR, c + MB2 + PAGE, 21)
    assert h.check_invariants() == []
    me.munmap(c, 2 * MB2)
    me.close(hf)
    assert h.check_invariants() == []

    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(1 << 20, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    hva = me.mmap(0, 1 << 20, RW, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, 1 << 20, hva, gfd, 0)
    me.write(hva, b"g" * 8)

    def guest(g):
        v = yield g.read(GPA, 8)
        yield g.write(GPA + PAGE, v)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    vcpu.run()
    assert me.read(hva + PAGE, 8) == b"g" * 8
    assert h.check_invariants() == []
    pfn = me.pagemap(hva).pfn
    assert h.hw_detect(pfn) == 0
    assert h.check_invariants() == []
    me.fallocate(gfd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 0, PAGE)
    assert h.check_invariants() == []


def _anon_pages(me, n=4):
    b = me.mmap(0, n * PAGE, RW, ANON)
    me.write(b, b"x" * n * PAGE)
    return b


def _leak(monkeypatch):
    from emu.kernel.mm import MM

    real = MM.folio_free

    def folio_free(self, head):
        if self.core.flags(head) & (1 << 15):        # PG_anon: forget it instead
            self.anon_rmap.pop(head, None)
            return
        real(self, head)

    monkeypatch.setattr(MM, "folio_free", folio_free)

    def run(h, me):
        me.munmap(_anon_pages(me), 4 * PAGE)
    return run


def _uncounted(monkeypatch):
    from emu.kernel.memory_failure import MemoryFailure

    real = MemoryFailure.action_result

    def action_result(self, pfn, type_, result):
        n = self.num_poisoned_pages
        r = real(self, pfn, type_, result)
        self.num_poisoned_pages = n                     # HardwareCorrupted never rises
        return r

    monkeypatch.setattr(MemoryFailure, "action_result", action_result)

    def run(h, me):
        me.madvise(_anon_pages(me), PAGE, u.MADV_HWPOISON)
    return run


def _poison_left_free(monkeypatch):
    from emu.kernel.page_alloc import BuddyAllocator

    monkeypatch.setattr(BuddyAllocator, "take_page_off_buddy", lambda self, pfn: True)

    def run(h, me):
        assert h.corrupt_pfn(free_pfn(h)) == 0
    return run


def _stale_pte(monkeypatch):
    from emu.kernel.mm import MM

    def zap_range(self, mm, start, end):            # frees the folios, keeps the PTEs
        for _va, e, _level in self.core.pt_scan(mm.pgd, start, end):
            head = self.core.head((e & 0x000FFFFFFFFFF000) >> 12)
            self.core.ref_add(head, -self.core.refcount(head))
            self.folio_free(head)
        return 0

    monkeypatch.setattr(MM, "zap_range", zap_range)

    def run(h, me):
        b = _anon_pages(me, 1)
        me.madvise(b, PAGE, u.MADV_DONTNEED)
    return run


def _pool_twice(monkeypatch):
    from emu.kernel.hugetlb import HugeTLB

    def dequeue(self, h):                          # hands a page out, leaves it listed
        return h.free[0] if h.free else None

    monkeypatch.setattr(HugeTLB, "dequeue", dequeue)

    def run(h, me):
        hf = me.memfd_create("huge", u.MFD_HUGETLB)
        me.ftruncate(hf, MB2)
        c = me.mmap(0, MB2, RW, u.MAP_SHARED, hf, 0)
        me.write(c, b"h")
    return run


def _unmapped_count(monkeypatch):
    from emu.kernel.mm import MM

    real = MM.set_pte

    def set_pte(self, mm, va, pfn, writable, dirty, level=1):
        real(self, mm, va, pfn, writable, dirty, level)
        self.core.map_add(pfn, 1)                   # one mapping counted twice

    monkeypatch.setattr(MM, "set_pte", set_pte)

    def run(h, me):
        _anon_pages(me, 1)
    return run


BREAKS = {
    "leaked frames": (_leak, "frames: "),
    "HardwareCorrupted not counted": (_uncounted, "hwpoison: HardwareCorrupted"),
    "poisoned frame left free": (_poison_left_free, "hwpoison: poisoned pfn"),
    "PTE maps a freed frame": (_stale_pte, "pte: "),
    "HugeTLB page in the pool and in use": (_pool_twice, "hugetlb: "),
    "mapcount above the mappings": (_unmapped_count, "mapcount: "),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_detects_a_broken_state(host_factory, monkeypatch, name):
    breaker, prefix = BREAKS[name]
    run = breaker(monkeypatch)
    h = host_factory(ram="128M", hugepages={"2M": 2})   # forked now: the supervisor has the patch
    me, _got = attach(h)
    assert h.check_invariants() == []
    run(h, me)
    bad = h.check_invariants()
    assert any(line.startswith(prefix) for line in bad), bad
    assert all("\n" not in line for line in bad)


def test_conversion_split_keeps_the_raw_page_poisoned(host_factory):
    """A conversion that cuts a poisoned HugeTLB guest_memfd folio splits it: the
    HWPoison flag moves to the raw page (as folio_clear_hugetlb_hwpoison does), so
    the page stays poisoned for kpageflags, HardwareCorrupted and the guest.  (Found
    by the soak: the split dropped the flag, and the folio later merged clean.)"""
    h = host_factory(ram="128M", hugepages={"2M": 2})
    me, got = attach(h)
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    flags = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
             | u.GUESTMEM_HUGETLB_FLAG_2MB)
    gfd = vm.create_guest_memfd(MB2, flags)
    hva = me.mmap(0, MB2, RW, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, MB2, hva, gfd, 0)
    me.write(hva + 2 * PAGE, b"d" * 8)
    raw = me.pagemap(hva + 2 * PAGE).pfn
    assert h.corrupt_pfn(raw) == 0
    assert h.meminfo()["HardwareCorrupted"] == 4
    me.gmem_convert(gfd, 4 * PAGE, 2 * PAGE, True)          # cuts the folio: split
    assert h.kpageflags(raw) & (1 << u.KPF_HWPOISON)
    assert not h.kpageflags(raw + 1) & (1 << u.KPF_HWPOISON)
    assert h.meminfo()["HardwareCorrupted"] == 4
    assert h.check_invariants() == []

    def guest(g):
        v = yield g.read(GPA + 2 * PAGE, 8, False)
        yield g.sync(v)

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    with pytest.raises(OSError) as ei:
        vcpu.run()
    assert ei.value.errno == u.EHWPOISON
    me.gmem_convert(gfd, 4 * PAGE, 2 * PAGE, False)         # uniform again: merged
    me.munmap(hva, MB2)
    me.close(gfd)
    assert h.meminfo()["HardwareCorrupted"] == 4
    assert h.check_invariants() == []


@pytest.mark.parametrize("huge", [False, True], ids=["4k", "hugetlb-split"])
def test_soft_offline_of_guest_memfd_page_is_ebusy(host_factory, huge):
    """guest_memfd folios are unmovable (kvm_gmem_migrate_folio() returns -EINVAL), so
    MADV_SOFT_OFFLINE of one fails with EBUSY and changes nothing.  (Found by the soak:
    the page of a split HugeTLB folio was migrated to a buddy page and recorded at a
    4K index of the huge-indexed page cache; truncation then freed unrelated frames
    twice.)"""
    h = host_factory(ram="128M", hugepages={"2M": 2})
    me, _got = attach(h)
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    flags = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
    if huge:
        flags |= u.GUEST_MEMFD_FLAG_HUGETLB | u.GUESTMEM_HUGETLB_FLAG_2MB
    gfd = vm.create_guest_memfd(MB2, flags)
    hva = me.mmap(0, MB2, RW, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, MB2, hva, gfd, 0)
    me.write(hva + 4 * PAGE, b"keep" * 4)
    if huge:
        me.gmem_convert(gfd, 12 * PAGE, 4 * PAGE, True)     # cuts the folio: split
    pfn = me.pagemap(hva + 4 * PAGE).pfn
    with pytest.raises(OSError) as ei:
        me.madvise(hva + 4 * PAGE, PAGE, u.MADV_SOFT_OFFLINE)
    assert ei.value.errno == u.EBUSY
    assert me.pagemap(hva + 4 * PAGE).pfn == pfn
    assert me.read(hva + 4 * PAGE, 16) == b"keep" * 4
    assert h.meminfo()["HardwareCorrupted"] == 0
    assert any("migration failed" in line for line in h.dmesg())
    assert h.check_invariants() == []
    me.munmap(hva, MB2)
    me.close(gfd)
    assert h.check_invariants() == []
