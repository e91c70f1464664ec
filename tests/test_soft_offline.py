"""Soft offline (mm/memory-failure.c soft_offline_page / soft_offline_in_use_page),
reached from madvise(MADV_SOFT_OFFLINE) (mm/madvise.c madvise_inject_error) and from
/sys/devices/system/memory/soft_offline_page (drivers/base/memory.c
soft_offline_page_store), as Linux 6.18 does it:

- the checks in soft_offline_page()'s order: pfn_valid (ENXIO), then
  vm.enable_soft_offline as a bitmask (SOFT_OFFLINE_ENABLED, SOFT_OFFLINE_SKIP_HUGETLB:
  EOPNOTSUPP with a pr_info_once), then an already poisoned page (0);
- an in-use page is migrated: try_to_migrate() fires the MMU notifier, so KVM zaps
  the stage-2 entries of an ordinary (hva-backed) memslot and the guest refaults onto
  the new page; a guest_memfd folio cannot move (mapping_inaccessible):
  "page migration failed 1", EBUSY;
- a HugeTLB page is isolated (isolate_hugetlb), migrated to another huge page (from
  the pool, else a temporary one from the buddy allocator, none for a gigantic page:
  ENOMEM), then page_handle_poison(huge) dissolves the old folio
  (tools/testing/selftests/mm/hugetlb-soft-offline.c);
- a free page is taken off the buddy lists; a free huge page is dissolved
  (dissolve_free_hugetlb_folio); a clean unmapped page-cache page is invalidated;
- failure texts print the page flags as %pGp does (lib/vsprintf.c format_page_flags
  over include/trace/events/mmflags.h).
"""
import errno
import re
import signal

import pytest
from gmem_harness import Recorder

import emu
from emu import uapi as u

PAGE = 4096
HPAGE = 2 << 20
GPAGE = 1 << 30
GPA = 1 << 32
RW = u.PROT_READ | u.PROT_WRITE
KPF_HWPOISON = 1 << u.KPF_HWPOISON
HUGE2M = u.MFD_HUGETLB | u.MFD_HUGE_2MB

# include/linux/page-flags.h (6.18, x86_64): the bits %pGp shows below
PGF = {"locked": 0, "writeback": 1, "referenced": 2, "uptodate": 3, "dirty": 4, "lru": 5,
       "head": 6, "active": 8, "reserved": 13, "swapbacked": 17, "unevictable": 18,
       "mlocked": 20, "hwpoison": 21}


def attach(h, name="qemu"):
    me = emu.attach(h, name=name)
    rec = Recorder()
    emu.sigaction(signal.SIGBUS, rec)
    return me, rec


def dmesg_count(h, text):
    return sum(text in line for line in h.dmesg())


def dmesg_has(h, text):
    return dmesg_count(h, text) > 0


def mi(h, field):
    return h.meminfo()[field]


def errno_of(fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


def sync_value(vcpu):
    assert vcpu.run() == 0
    assert vcpu.kvm_run.exit_reason == u.KVM_EXIT_IO
    cmd, args = vcpu.ucall()
    assert cmd == u.UCALL_SYNC, (cmd, args)
    return args[0] if len(args) == 1 else args


def pgp(names, pfn):
    """What %pGp prints for a page with these flags at this pfn, on the config the
    emulator models (node 0; ZONE_DMA below 16 MiB, ZONE_DMA32 below 4 GiB;
    lastcpupid reset: 0x1fffff in bits 30..50, zone at 51, node at 54)."""
    zone = 0 if pfn < (16 << 20) >> 12 else 1 if pfn < (4 << 30) >> 12 else 2
    word = (zone << 51) | (0x1FFFFF << 30)
    for n in names:
        word |= 1 << PGF[n]
    return "%#x(%s)" % (word, "|".join(list(names) + ["node=0", "zone=%d" % zone,
                                                      "lastcpupid=0x1fffff"]))


# ====================================================================== 1. KVM: D1
@pytest.mark.both_backends
@pytest.mark.parametrize("backing", ["anon", "memfd", "hugetlb"])
def test_soft_offline_behind_ordinary_memslot_guest_follows(host_factory, backing):
    """try_to_migrate_one() calls mmu_notifier_invalidate_range_start() before it
    replaces the PTE (for a HugeTLB folio: over the whole huge page): KVM
    (kvm_mmu_notifier_invalidate_range_start) zaps the stage-2 entries of the
    hva-backed memslot and the guest refaults through the host page tables onto
    the new page.  MADV_SOFT_OFFLINE returns 0, the host pfn changes, stage-2 no
    longer maps the old frames, and what the host writes after the migration is
    what the guest reads (and the other way round)."""
    host = host_factory(ram="128M", hugepages={"2M": 4})
    me, rec = attach(host)
    size = HPAGE
    if backing == "anon":
        hva = me.mmap(0, size, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    else:
        fd = me.memfd_create("guest-ram", HUGE2M if backing == "hugetlb" else 0)
        me.ftruncate(fd, size)
        hva = me.mmap(0, size, RW, u.MAP_SHARED, fd, 0)
    me.write(hva + 2 * PAGE, b"host-v1")
    me.write(hva + 9 * PAGE, b"other")
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    vm.set_user_memory_region2(1, 0, GPA, size, hva)

    def guest(g):
        v = yield g.read(GPA + 2 * PAGE, 7)
        w = yield g.read(GPA + 9 * PAGE, 5)
        yield g.sync((v, w))
        v = yield g.read(GPA + 2 * PAGE, 7)
        w = yield g.read(GPA + 9 * PAGE, 5)
        yield g.sync((v, w))
        yield g.write(GPA + 2 * PAGE, b"guest-3")
        yield g.sync("w")
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert sync_value(vcpu) == (b"host-v1", b"other")
    old = me.pagemap(hva + 2 * PAGE).pfn
    old9 = me.pagemap(hva + 9 * PAGE).pfn
    s2 = vm.gpa_to_pfn(GPA + 2 * PAGE)
    assert s2["mapped"] and s2["pfn"] == old
    me.madvise(hva + 2 * PAGE, PAGE, u.MADV_SOFT_OFFLINE)            # returns 0
    new = me.pagemap(hva + 2 * PAGE).pfn
    assert new != old
    assert host.kpageflags(old) & KPF_HWPOISON
    moved = [(2 * PAGE, old)] + ([(9 * PAGE, old9)] if backing == "hugetlb" else [])
    for off, pfn in moved:                                # the whole old folio moved
        s2 = vm.gpa_to_pfn(GPA + off)
        assert not (s2["mapped"] and s2["pfn"] == pfn)    # stage-2 let go of the old frames
    if backing == "hugetlb":
        assert me.pagemap(hva + 9 * PAGE).pfn == new + 7
    assert me.read(hva + 2 * PAGE, 7) == b"host-v1"       # content kept
    me.write(hva + 2 * PAGE, b"host-v2")
    assert sync_value(vcpu) == (b"host-v2", b"other")
    s2 = vm.gpa_to_pfn(GPA + 2 * PAGE)
    assert s2["mapped"] and s2["pfn"] == new
    assert sync_value(vcpu) == "w"
    assert me.read(hva + 2 * PAGE, 7) == b"guest-3"
    assert mi(host, "HardwareCorrupted") == 4
    assert dmesg_has(host, "Soft offlining pfn %#x at process virtual address %#x"
                     % (old, hva + 2 * PAGE))
    assert rec.got == []
    assert host.check_invariants() == []


@pytest.mark.both_backends
def test_soft_offline_guest_memfd_refuses_and_changes_nothing(host):
    """A guest_memfd folio cannot migrate: move_to_new_folio() returns -EOPNOTSUPP
    for a mapping_inaccessible() mapping (kvm_gmem_migrate_folio is not reached),
    migrate_pages() reports 1 folio not migrated, soft_offline_in_use_page() logs
    "%#lx: page migration failed %ld, type %pGp" and turns 1 into -EBUSY.  The page,
    the host mapping and stage-2 stay as they were; no warning, no taint."""
    me, rec = attach(host)
    size = 4 * PAGE
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    hva = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, hva, gfd, 0)
    me.write(hva + PAGE, b"keep")

    def guest(g):
        v = yield g.read(GPA + PAGE, 4)
        yield g.sync(v)
        v = yield g.read(GPA + PAGE, 4)
        yield g.sync(v)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert sync_value(vcpu) == b"keep"
    pfn = me.pagemap(hva + PAGE).pfn
    assert errno_of(me.madvise, hva + PAGE, PAGE, u.MADV_SOFT_OFFLINE) == errno.EBUSY
    lines = [ln for ln in host.dmesg() if "page migration failed" in ln]
    assert len(lines) == 1
    m = re.search(r"Soft offline: (0x[0-9a-f]+): page migration failed 1, type (0x[0-9a-f]+)"
                  r"\(([a-z_0-9|=]+)\)$", lines[0])
    assert m and int(m.group(1), 16) == pfn, lines[0]
    names = [n for n in m.group(3).split("|") if "=" not in n]
    assert {"uptodate", "lru", "unevictable"} <= set(names)
    assert m.group(2) + "(" + m.group(3) + ")" == pgp(names, pfn)
    assert me.pagemap(hva + PAGE).pfn == pfn
    assert vm.gpa_to_pfn(GPA + PAGE)["pfn"] == pfn
    assert sync_value(vcpu) == b"keep"
    assert not host.kpageflags(pfn) & KPF_HWPOISON
    assert mi(host, "HardwareCorrupted") == 0
    assert host.tainted() == 0
    assert rec.got == []


# ====================================================================== 2. vm.enable_soft_offline: D6
def _anon_page(me, data=b"anon"):
    a = me.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, data)
    return a


def _huge_file(me, length=2 * HPAGE, flags=HUGE2M):
    fd = me.memfd_create("hugetlb_tmp", flags)
    me.ftruncate(fd, length)
    a = me.mmap(0, length, RW, u.MAP_SHARED | u.MAP_POPULATE, fd, 0)
    return fd, a


@pytest.mark.parametrize("value", [0, 2])
def test_enable_soft_offline_without_bit0_is_disabled(host_factory, value):
    """soft_offline_page(): `if (!(sysctl_enable_soft_offline & SOFT_OFFLINE_ENABLED))`
    -> pr_info_once("disabled by /proc/sys/vm/enable_soft_offline"), -EOPNOTSUPP, for
    every page type: 2 (SKIP_HUGETLB alone) disables soft offline as 0 does.  The
    message is printed once per boot."""
    h = host_factory(ram="128M", hugepages={"2M": 4})
    me, _rec = attach(h)
    h.sysctl("vm.enable_soft_offline", value)
    a = _anon_page(me)
    pfn = me.pagemap(a).pfn
    for _ in range(2):
        assert errno_of(me.madvise, a, PAGE, u.MADV_SOFT_OFFLINE) == errno.EOPNOTSUPP
    _fd, ha = _huge_file(me)
    assert errno_of(me.madvise, ha, PAGE, u.MADV_SOFT_OFFLINE) == errno.EOPNOTSUPP
    assert me.pagemap(a).pfn == pfn
    assert mi(h, "HardwareCorrupted") == 0 and mi(h, "HugePages_Total") == 4
    assert dmesg_count(h, "Soft offline: disabled by /proc/sys/vm/enable_soft_offline") == 1


def test_enable_soft_offline_3_skips_only_hugetlb(host_factory):
    """SOFT_OFFLINE_ENABLED | SOFT_OFFLINE_SKIP_HUGETLB: an ordinary page is still
    soft-offlined (migrated); a HugeTLB page gets
    pr_info_once("disabled for HugeTLB pages by /proc/sys/vm/enable_soft_offline")
    and -EOPNOTSUPP, the pool intact (Kyle Meyer, "mm/memory-failure: Support
    disabling soft offline for HugeTLB pages")."""
    h = host_factory(ram="128M", hugepages={"2M": 4})
    me, _rec = attach(h)
    h.sysctl("vm.enable_soft_offline", 3)
    a = _anon_page(me)
    pfn = me.pagemap(a).pfn
    me.madvise(a, PAGE, u.MADV_SOFT_OFFLINE)
    assert me.pagemap(a).pfn != pfn and me.read(a, 4) == b"anon"
    _fd, ha = _huge_file(me)
    for _ in range(2):
        assert errno_of(me.madvise, ha + HPAGE, PAGE, u.MADV_SOFT_OFFLINE) == errno.EOPNOTSUPP
    assert mi(h, "HugePages_Total") == 4 and mi(h, "HardwareCorrupted") == 4
    assert dmesg_count(h, "Soft offline: disabled for HugeTLB pages by "
                          "/proc/sys/vm/enable_soft_offline") == 1
    assert not dmesg_has(h, "Soft offline: disabled by /proc")


def test_enable_soft_offline_order_of_checks(host_factory):
    """soft_offline_page() checks pfn_valid (-ENXIO) before the sysctl, and the
    sysctl before PageHWPoison (an already poisoned page: 0 only while enabled)."""
    h = host_factory(ram="64M")
    nframes = mi(h, "MemTotal") // 4
    h.sysctl("vm.enable_soft_offline", 0)
    assert errno_of(h.soft_offline_page, nframes << 12) == errno.ENXIO
    free = nframes - 8
    assert h.corrupt_pfn(free) == 0
    assert errno_of(h.soft_offline_page, free << 12) == errno.EOPNOTSUPP
    h.sysctl("vm.enable_soft_offline", 1)
    assert h.soft_offline_page(free << 12) == 0
    assert dmesg_has(h, "Soft offline: %#x: page already poisoned" % free)


# ====================================================================== 3. HugeTLB: D5
def _soft_offline_common(h, me, enable_soft_offline):
    """tools/testing/selftests/mm/hugetlb-soft-offline.c test_soft_offline_common():
    set enable_soft_offline, read nr_hugepages, do_soft_offline() on a 2-huge-page
    MFD_HUGETLB memfd (ftruncate, mmap MAP_SHARED|MAP_POPULATE, memset 0xab,
    MADV_SOFT_OFFLINE of the 4K page at len/2, munmap, ftruncate 0), read
    nr_hugepages again.  Expected: errno 0 and one huge page fewer when bit 0 is set
    and bit 1 is not; EOPNOTSUPP and the same count otherwise."""
    expect = 0
    if not enable_soft_offline & u.SOFT_OFFLINE_ENABLED or \
            enable_soft_offline & u.SOFT_OFFLINE_SKIP_HUGETLB:
        expect = errno.EOPNOTSUPP
    h.sysctl("vm.enable_soft_offline", enable_soft_offline)
    before = mi(h, "HugePages_Total")
    length = 2 * HPAGE
    fd = me.memfd_create("hugetlb_tmp", u.MFD_HUGETLB)
    me.ftruncate(fd, length)
    a = me.mmap(0, length, RW, u.MAP_SHARED | u.MAP_POPULATE, fd, 0)
    me.write(a, b"\xab" * length)
    hwp = a + length // 2
    got = 0
    try:
        me.madvise(hwp, PAGE, u.MADV_SOFT_OFFLINE)
    except OSError as e:
        got = e.errno
    assert got == expect
    me.munmap(a, length)
    me.ftruncate(fd, 0)
    after = mi(h, "HugePages_Total")
    me.close(fd)
    assert after == (before - 1 if expect == 0 else before)


def test_hugetlb_soft_offline_selftest(host_factory):
    """hugetlb-soft-offline.c main(): test_soft_offline_common(3), (1), (0) in that
    order on one machine with 8 default-size huge pages ("make sure more than 2
    hugepages of default_hugepagesz are allocated")."""
    h = host_factory(ram="128M", hugepages={"2M": 8})
    me, rec = attach(h)
    _soft_offline_common(h, me, 3)
    _soft_offline_common(h, me, 1)
    _soft_offline_common(h, me, 0)
    assert mi(h, "HugePages_Total") == 7 and mi(h, "HugePages_Free") == 7
    assert mi(h, "HardwareCorrupted") == 4
    assert rec.got == []
    assert h.check_invariants() == []


def test_hugetlb_soft_offline_migrates_and_dissolves(host_factory):
    """soft_offline_in_use_page() on an in-use HugeTLB page: isolate_hugetlb(),
    migrate_pages() to a free huge page of the pool (alloc_hugetlb_folio_nodemask),
    the mapping now points at the new huge page with the content kept; then
    page_handle_poison(page, true, false) dissolves the old folio
    (dissolve_free_hugetlb_folio) and takes the raw page off the buddy lists: it
    alone is HWPoison, HardwareCorrupted +4 kB, HugePages_Total -1, the other 511
    pages go back to the page allocator.  No signal; the mf stats do not move."""
    h = host_factory(ram="128M", hugepages={"2M": 4})
    me, rec = attach(h)
    fd, a = _huge_file(me)
    me.write(a + HPAGE, b"first")
    me.write(a + 2 * HPAGE - 4, b"last")
    old = me.pagemap(a + HPAGE).pfn
    raw = old + 5
    stats = h.mf_stats()
    free_before = mi(h, "MemFree")
    me.madvise(a + HPAGE + 5 * PAGE, PAGE, u.MADV_SOFT_OFFLINE)
    new = me.pagemap(a + HPAGE).pfn
    assert new != old and new % 512 == 0
    assert me.pagemap(a + HPAGE + 5 * PAGE).pfn == new + 5
    assert me.read(a + HPAGE, 5) == b"first" and me.read(a + 2 * HPAGE - 4, 4) == b"last"
    assert h.kpageflags(raw) & KPF_HWPOISON
    assert not h.kpageflags(old) & KPF_HWPOISON
    m = h.meminfo()
    assert (m["HugePages_Total"], m["HugePages_Free"]) == (3, 1)
    assert m["HardwareCorrupted"] == 4
    assert m["MemFree"] >= free_before + 511 * 4 - 64     # the rest went to buddy
    assert h.mf_stats() == stats
    assert dmesg_has(h, "Soft offlining pfn %#x at process virtual address %#x"
                     % (raw, a + HPAGE + 5 * PAGE))
    me.write(a + HPAGE, b"again")                       # the new huge page is in use
    assert me.read(a + HPAGE, 5) == b"again"
    assert rec.got == []
    assert h.check_invariants() == []
    me.munmap(a, 2 * HPAGE)
    me.close(fd)
    assert mi(h, "HugePages_Free") == 3
    assert h.check_invariants() == []


def test_hugetlb_soft_offline_empty_pool_uses_a_temporary_huge_page(host_factory):
    """No free huge page in the pool: alloc_hugetlb_folio_nodemask() falls back to
    alloc_migrate_hugetlb_folio(), a fresh 2 MB folio from the buddy allocator
    marked temporary; move_hugetlb_state() hands the temporary state to the old
    folio, which free_huge_folio() then returns to the buddy allocator.  The call
    succeeds, the raw page is taken off, and the pool keeps its size."""
    h = host_factory(ram="128M", hugepages={"2M": 2})
    me, rec = attach(h)
    fd, a = _huge_file(me)
    me.write(a, b"data")
    old = me.pagemap(a).pfn
    assert mi(h, "HugePages_Free") == 0
    me.madvise(a + 3 * PAGE, PAGE, u.MADV_SOFT_OFFLINE)
    new = me.pagemap(a).pfn
    assert new != old and me.read(a, 4) == b"data"
    assert h.kpageflags(old + 3) & KPF_HWPOISON
    m = h.meminfo()
    assert (m["HugePages_Total"], m["HugePages_Free"]) == (2, 0)
    assert m["HardwareCorrupted"] == 4
    assert h.check_invariants() == []
    me.munmap(a, 2 * HPAGE)
    me.close(fd)
    assert mi(h, "HugePages_Free") == 2
    assert h.check_invariants() == []
    assert rec.got == []


def test_hugetlb_soft_offline_gigantic_without_target_is_enomem(host_factory):
    """A 1 GB page with no free 1 GB page in the pool: alloc_migrate_hugetlb_folio()
    does not allocate gigantic pages, unmap_and_move_huge_page() returns -ENOMEM,
    migrate_hugetlbs() passes it up, and soft_offline_in_use_page() logs
    "%#lx: hugepage migration failed -12, type %pGp" and returns it unchanged
    (only a positive count becomes -EBUSY): madvise fails with ENOMEM, nothing
    moves."""
    h = host_factory(ram="2048M", hugepages={"1G": 1})
    me, rec = attach(h)
    fd, a = _huge_file(me, GPAGE, u.MFD_HUGETLB | u.MFD_HUGE_1GB)
    me.write(a + 7 * PAGE, b"giga")
    head = me.pagemap(a).pfn
    assert errno_of(me.madvise, a + 7 * PAGE, PAGE, u.MADV_SOFT_OFFLINE) == errno.ENOMEM
    assert dmesg_has(h, "Soft offline: %#x: hugepage migration failed -12, type %s"
                     % (head + 7, pgp([], head + 7)))
    assert me.pagemap(a).pfn == head and me.read(a + 7 * PAGE, 4) == b"giga"
    assert mi(h, "Hugetlb") == 1 << 20 and mi(h, "HardwareCorrupted") == 0
    assert not h.kpageflags(head + 7) & KPF_HWPOISON
    assert rec.got == []
    assert h.check_invariants() == []


def test_hugetlb_soft_offline_head_page_flags_in_failure_text(host_factory):
    """%pGp of a HugeTLB head page: hugetlb is a page type, not a page flag; the
    head of a hugetlbfs folio in use shows uptodate|dirty|head
    (hugetlb_add_to_page_cache marks it dirty)."""
    h = host_factory(ram="2048M", hugepages={"1G": 1})
    me, _rec = attach(h)
    _fd, a = _huge_file(me, GPAGE, u.MFD_HUGETLB | u.MFD_HUGE_1GB)
    me.write(a, b"x")
    head = me.pagemap(a).pfn
    assert errno_of(me.madvise, a, PAGE, u.MADV_SOFT_OFFLINE) == errno.ENOMEM
    assert dmesg_has(h, "Soft offline: %#x: hugepage migration failed -12, type %s"
                     % (head, pgp(["uptodate", "dirty", "head"], head)))


# ====================================================================== 4. sysfs soft_offline_page
def test_sysfs_soft_offline_free_huge_page_is_dissolved(host_factory):
    """soft_offline_page() on a free huge page: get_hwpoison_page() finds it freed
    (0), page_handle_poison(page, true, false) dissolves it
    (dissolve_free_hugetlb_folio) and takes the raw page off the buddy lists:
    return 0, HugePages_Total and _Free -1, HardwareCorrupted +4 kB."""
    h = host_factory(ram="128M", hugepages={"2M": 3})
    me, _rec = attach(h)
    fd, a = _huge_file(me, HPAGE)
    head = me.pagemap(a).pfn
    me.munmap(a, HPAGE)
    me.ftruncate(fd, 0)                                  # back to the pool, free
    assert mi(h, "HugePages_Free") == 3
    assert h.soft_offline_page(((head + 9) << 12) + 123) == 0
    m = h.meminfo()
    assert (m["HugePages_Total"], m["HugePages_Free"]) == (2, 2)
    assert m["HardwareCorrupted"] == 4
    assert h.kpageflags(head + 9) & KPF_HWPOISON
    assert not h.kpageflags(head) & KPF_HWPOISON
    assert h.check_invariants() == []


def test_sysfs_soft_offline_reserved_free_huge_page_is_ebusy(host_factory):
    """dissolve_free_hugetlb_folio() refuses when no huge page is available beyond
    the reservations (!available_huge_pages(h)): page_handle_poison() fails, the
    retry fails the same way, soft_offline_page() returns -EBUSY; nothing changes."""
    h = host_factory(ram="128M", hugepages={"2M": 1})
    me, _rec = attach(h)
    fd = me.memfd_create("resv", HUGE2M)
    me.ftruncate(fd, HPAGE)
    me.mmap(0, HPAGE, RW, u.MAP_SHARED, fd, 0)           # reserves the only page
    m = h.meminfo()
    assert (m["HugePages_Free"], m["HugePages_Rsvd"]) == (1, 1)
    nframes = m["MemTotal"] // 4
    head = nframes - 512                                 # the pool sits at the top of RAM
    assert h.kpageflags(head) & (1 << u.KPF_HUGE)
    assert errno_of(h.soft_offline_page, head << 12) == errno.EBUSY
    m = h.meminfo()
    assert (m["HugePages_Total"], m["HugePages_Free"], m["HardwareCorrupted"]) == (1, 1, 0)
    assert h.check_invariants() == []


def test_sysfs_soft_offline_free_buddy_page(host):
    """A free page: page_handle_poison(page, true, false) takes it off the buddy
    lists: 0, HWPoison, HardwareCorrupted +4 kB, MemFree -4 kB; the mf stats do not
    count soft offline."""
    nframes = mi(host, "MemTotal") // 4
    pfn = nframes - 3
    stats = host.mf_stats()
    free = mi(host, "MemFree")
    assert host.soft_offline_page(pfn << 12) == 0
    assert host.kpageflags(pfn) & KPF_HWPOISON
    assert mi(host, "HardwareCorrupted") == 4 and mi(host, "MemFree") == free - 4
    assert host.mf_stats() == stats
    assert host.check_invariants() == []


def test_sysfs_soft_offline_clean_unmapped_pagecache_is_invalidated(host):
    """soft_offline_in_use_page() first tries mapping_evict_folio() on an LRU
    page-cache folio: a clean, unmapped one is dropped from the page cache
    ("%#lx: invalidated") and poisoned, without migration.  The file then reads
    that range as a hole."""
    me, _rec = attach(host)
    fd = me.memfd_create("f")
    me.ftruncate(fd, 2 * PAGE)
    a = me.mmap(0, 2 * PAGE, RW, u.MAP_SHARED, fd, 0)
    assert me.read(a + PAGE, 4) == bytes(4)              # a read fault: clean
    pfn = me.pagemap(a + PAGE).pfn
    me.munmap(a, 2 * PAGE)
    assert host.soft_offline_page(pfn << 12) == 0
    assert dmesg_has(host, "Soft offline: %#x: invalidated" % pfn)
    assert host.kpageflags(pfn) & KPF_HWPOISON
    assert mi(host, "HardwareCorrupted") == 4
    a = me.mmap(0, 2 * PAGE, RW, u.MAP_SHARED, fd, 0)
    assert me.read(a + PAGE, 4) == bytes(4)
    assert me.pagemap(a + PAGE).pfn != pfn
    assert host.check_invariants() == []


def test_sysfs_soft_offline_dirty_unmapped_pagecache_migrates(host):
    """A dirty page-cache page is not evicted (mapping_evict_folio refuses dirty
    folios): it is isolated and migrated, the file keeps its data in a new page."""
    me, _rec = attach(host)
    fd = me.memfd_create("f")
    me.ftruncate(fd, PAGE)
    me.pwrite(fd, b"dirty data", 0)
    a = me.mmap(0, PAGE, RW, u.MAP_SHARED, fd, 0)
    assert me.read(a, 10) == b"dirty data"
    pfn = me.pagemap(a).pfn
    me.munmap(a, PAGE)
    assert host.soft_offline_page(pfn << 12) == 0
    assert not dmesg_has(host, "invalidated")
    assert host.kpageflags(pfn) & KPF_HWPOISON
    assert me.pread(fd, 10, 0) == b"dirty data"
    a = me.mmap(0, PAGE, RW, u.MAP_SHARED, fd, 0)
    assert me.pagemap(a).pfn != pfn and me.read(a, 10) == b"dirty data"
    assert host.check_invariants() == []


def test_sysfs_soft_offline_kernel_page_is_unhandlable(host):
    """A reserved (kernel) page is neither on the LRU nor free: get_any_page()
    gives up with pr_err("%#lx: unhandlable page.") under the "Memory failure: "
    prefix and -EIO, which soft_offline_page() returns."""
    assert errno_of(host.soft_offline_page, 3 << 12) == errno.EIO
    assert dmesg_has(host, "Memory failure: %#x: unhandlable page." % 3)
    assert not host.kpageflags(3) & KPF_HWPOISON
    assert mi(host, "HardwareCorrupted") == 0


@pytest.mark.parametrize("addr", [-1, 1 << 64, "0x1000", True, 1.5])
def test_sysfs_soft_offline_bad_input_is_einval(host, addr):
    """soft_offline_page_store(): kstrtoull() failing is -EINVAL (not -ERANGE as the
    debugfs u64 attributes say)."""
    assert errno_of(host.soft_offline_page, addr) == errno.EINVAL
    assert mi(host, "HardwareCorrupted") == 0
