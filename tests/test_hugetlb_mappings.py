"""HugeTLB mappings as Linux 6.18 makes them (issue 17, item 2).

- MAP_PRIVATE of a hugetlbfs file is copy-on-write (mm/hugetlb.c hugetlb_no_page:
  a page-cache folio is mapped read-only, a missing one becomes a new anonymous
  folio; hugetlb_wp copies on write).  hugetlb_reserve_pages reserves the whole
  private range at mmap (chg = to - from), faults that allocate consume it, and
  hugetlb_vm_op_close gives the rest back (HugePages_Rsvd).
- MAP_ANONYMOUS|MAP_HUGETLB (mm/mmap.c ksys_mmap_pgoff: hstate_sizelog of the
  MAP_HUGE_SHIFT bits, hugetlb_file_setup) is a huge mapping; MAP_HUGETLB on a
  file that is not hugetlbfs is EINVAL.
- A poisoned private (anonymous) huge page (mm/memory-failure.c me_huge_page, no
  mapping branch): unmapped, the last put frees it and it is dissolved: the pool
  shrinks (HugePages_Total), the page cache is untouched.
- Beyond EOF (fs/hugetlbfs/inode.c hugetlbfs_file_mmap: a VM_WRITE mapping extends
  i_size to its end; hugetlb_no_page: an index past i_size is VM_FAULT_SIGBUS).
- fork (copy_hugetlb_page_range): a private huge page is shared write-protected;
  hugetlb_wp copies for the first writer and reuses it for the last one.
- __unmap_hugepage_range restores a zapped anonymous page's reservation; a COW copy
  that hits a latent error is VM_FAULT_HWPOISON_LARGE (copy_user_large_folio).

Upstream cases they enable: libhugetlbfs/LTP hugemmap "private", "fork-cow" and
"map_high_truncate" style tests, tools/testing/selftests/mm/map_hugetlb.c, mce-test
thugetlb (-A anonymous and -p/-pc private file mappings, fork_private_nocow/_cow),
tools/testing/selftests/mm/memory-failure.c anon_hugetlb,
tools/testing/selftests/mm/hugetlb-read-hwpoison.c (the file stays readable when a
private copy is poisoned).  The implementation is emu/kernel/hugetlb_fault.py.
"""
import errno
import signal
import struct

import pytest
from checks import Stop, record_sigbus, sigbus_of
from selftest_harness import Pipe

import emu
from emu import uapi as u

PAGE = 4096
HPAGE = 2 << 20
RW = u.PROT_READ | u.PROT_WRITE
HUGE2M = u.MFD_HUGETLB | u.MFD_HUGE_2MB
KPF_HUGE = 1 << u.KPF_HUGE
KPF_ANON = 1 << u.KPF_ANON
KPF_HWPOISON = 1 << u.KPF_HWPOISON
AR = u.BUS_MCEERR_AR


def setup(host):
    """Attach; the SIGBUS recorder stops an AR or BUS_ADRERR access (a handler that
    returned would re-run it: the fault again, forever)."""
    me = emu.attach(host, name="t")
    return me, record_sigbus((AR, u.BUS_ADRERR))


def hp(host):
    m = host.meminfo()
    return m["HugePages_Total"], m["HugePages_Free"], m["HugePages_Rsvd"]


def test_hugemmap_private_cow_does_not_reach_the_file(host_factory):
    """libhugetlbfs 'private' (LTP hugemmap): a private write is copied into a new
    huge page from the pool; the file and a shared mapping keep the old data."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, HPAGE)
    sh = me.mmap(0, HPAGE, RW, u.MAP_SHARED, fd, 0)
    assert hp(host) == (4, 4, 1)
    me.write(sh, b"A" * 64)
    assert hp(host) == (4, 3, 0)

    pv = me.mmap(0, HPAGE, RW, u.MAP_PRIVATE, fd, 0)
    assert hp(host) == (4, 3, 1)                     # the whole private range is reserved
    assert me.read(pv, 64) == b"A" * 64              # the page-cache folio, read-only
    assert hp(host) == (4, 3, 1)
    assert me.pagemap(pv).pfn == me.pagemap(sh).pfn

    me.write(pv, b"B" * 32)                          # hugetlb_wp: a copy
    assert me.read(pv, 64) == b"B" * 32 + b"A" * 32
    assert me.read(sh, 64) == b"A" * 64
    assert me.pread(fd, 64, 0) == b"A" * 64
    assert hp(host) == (4, 2, 0)                     # the reservation was consumed
    pfn = me.pagemap(pv).pfn
    assert pfn != me.pagemap(sh).pfn
    assert not me.pagemap(pv).file
    assert host.kpageflags(pfn) & (KPF_HUGE | KPF_ANON) == KPF_HUGE | KPF_ANON

    me.munmap(pv, HPAGE)
    assert hp(host) == (4, 3, 0)                     # the copy went back to the pool
    assert got == []
    assert host.check_invariants() == []


def test_hugemmap_private_hole_is_anonymous(host_factory):
    """hugetlb_no_page for a private mapping without a page-cache folio: a new
    anonymous huge page, never added to the file; an unfaulted private mapping gives
    its reservation back at munmap (hugetlb_vm_op_close)."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, 2 * HPAGE)
    pv = me.mmap(0, 2 * HPAGE, RW, u.MAP_PRIVATE, fd, 0)
    assert hp(host) == (4, 4, 2)
    me.write(pv, b"P" * 16)
    assert hp(host) == (4, 3, 1)
    assert me.pread(fd, 16, 0) == bytes(16)         # the file got nothing
    sh = me.mmap(0, HPAGE, u.PROT_READ, u.MAP_SHARED, fd, 0)
    assert me.read(sh, 16) == bytes(16)
    assert me.pagemap(sh).pfn != me.pagemap(pv).pfn
    me.munmap(pv, 2 * HPAGE)
    t, f, r = hp(host)
    assert (t, r) == (4, 0) and f == 3               # the shared one holds a page now
    assert got == []
    assert host.check_invariants() == []


def test_hugemmap_private_reservation_enomem(host_factory):
    """hugetlb_reserve_pages: a private mapping larger than the free pool fails
    with ENOMEM at mmap, changing nothing; MAP_NORESERVE maps and faults SIGBUS."""
    host = host_factory(ram="256M", hugepages={"2M": 2})
    me, got = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, 4 * HPAGE)
    with pytest.raises(OSError) as ei:
        me.mmap(0, 3 * HPAGE, RW, u.MAP_PRIVATE, fd, 0)
    assert ei.value.errno == errno.ENOMEM
    assert hp(host) == (2, 2, 0)
    a = me.mmap(0, 4 * HPAGE, RW, u.MAP_PRIVATE | u.MAP_NORESERVE, fd, 0)
    assert hp(host) == (2, 2, 0)
    out = sigbus_of(got, lambda: me.write_batch([a, a + HPAGE, a + 2 * HPAGE], 1, b"xyz"))
    assert out == [(u.BUS_ADRERR, a + 2 * HPAGE, 0)]
    assert hp(host) == (2, 0, 0)
    assert host.check_invariants() == []


def test_map_hugetlb_anonymous_shared(host_factory):
    """selftests/mm/map_hugetlb.c with MAP_SHARED: MAP_ANONYMOUS|MAP_HUGETLB is a
    huge mapping of an anonymous hugetlbfs file (reserved, one huge page per fault,
    gone with the mapping)."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    b = me.mmap(0, HPAGE + PAGE, RW, u.MAP_SHARED | u.MAP_ANONYMOUS | u.MAP_HUGETLB | u.MAP_HUGE_2MB,
                -1, 0)
    assert b % HPAGE == 0
    assert hp(host) == (4, 4, 2)                     # the length was rounded up
    me.write(b + HPAGE + 5 * PAGE, b"s")
    assert hp(host) == (4, 3, 1)
    e = me.pagemap(b + HPAGE + 5 * PAGE)
    assert e.present and (e.pfn - 5) % 512 == 0
    assert host.kpageflags(e.pfn) & KPF_HUGE
    me.munmap(b, 2 * HPAGE)
    assert hp(host) == (4, 4, 0)                     # the file went with the mapping
    assert got == []
    assert host.check_invariants() == []


def test_map_hugetlb_anonymous(host_factory):
    """selftests/mm/map_hugetlb.c: MAP_PRIVATE|MAP_ANONYMOUS|MAP_HUGETLB is a huge
    mapping (aligned, reserved, one huge page per fault, kpageflags HUGE|ANON)."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    a = me.mmap(0, HPAGE + PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_HUGETLB, -1, 0)
    assert a % HPAGE == 0
    assert hp(host) == (4, 4, 2)                     # the length was rounded up
    me.write(a + HPAGE + 5 * PAGE, b"z")
    assert hp(host) == (4, 3, 1)
    e = me.pagemap(a + HPAGE + 5 * PAGE)
    assert e.present and (e.pfn - 5) % 512 == 0
    assert host.kpageflags(e.pfn) & (KPF_HUGE | KPF_ANON) == KPF_HUGE | KPF_ANON
    me.munmap(a, 2 * HPAGE)
    assert hp(host) == (4, 4, 0)

    b = me.mmap(0, HPAGE, RW, u.MAP_SHARED | u.MAP_ANONYMOUS | u.MAP_HUGETLB | u.MAP_HUGE_2MB,
                -1, 0)
    assert hp(host) == (4, 4, 1)
    me.write(b, b"s")
    assert hp(host) == (4, 3, 0)
    me.munmap(b, HPAGE)
    assert hp(host) == (4, 4, 0)                     # the file went with the mapping
    assert got == []
    assert host.check_invariants() == []


def test_map_hugetlb_bad_sizes(host_factory):
    """ksys_mmap_pgoff: an unknown MAP_HUGE_* size is EINVAL; a 1G mapping with an
    empty 1G pool fails the reservation (ENOMEM); MAP_HUGETLB on a file that is not
    hugetlbfs is EINVAL."""
    host = host_factory(ram="256M", hugepages={"2M": 2})
    me, _ = setup(host)
    anon = u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_HUGETLB
    for flags, err in ((anon | (25 << u.MAP_HUGE_SHIFT), errno.EINVAL),
                       (anon ^ u.MAP_PRIVATE ^ u.MAP_SHARED | u.MAP_HUGE_1GB, errno.ENOMEM)):
        with pytest.raises(OSError) as ei:
            me.mmap(0, HPAGE, RW, flags, -1, 0)
        assert ei.value.errno == err
    fd = me.memfd_create("small", 0)
    me.ftruncate(fd, HPAGE)
    with pytest.raises(OSError) as ei:
        me.mmap(0, HPAGE, RW, u.MAP_SHARED | u.MAP_HUGETLB, fd, 0)
    assert ei.value.errno == errno.EINVAL
    assert hp(host) == (2, 2, 0)
    assert host.check_invariants() == []


def test_thugetlb_private_poisoned_page_dissolved(host_factory):
    """mce-test thugetlb on a private mapping (me_huge_page without a mapping): the
    anonymous huge page is unmapped, freed and dissolved; the pool shrinks by one,
    the file's page is untouched and stays readable."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, HPAGE)
    sh = me.mmap(0, HPAGE, RW, u.MAP_SHARED, fd, 0)  # hugetlbfs has no write(2)
    me.write(sh, b"F" * 64)
    pv = me.mmap(0, HPAGE, RW, u.MAP_PRIVATE, fd, 0)
    me.write(pv, b"C")
    pfn = me.pagemap(pv).pfn
    assert hp(host) == (4, 2, 0)

    out = sigbus_of(got, lambda: me.madvise(pv + 3 * PAGE, PAGE, u.MADV_HWPOISON))
    assert out == [(AR, pv + 3 * PAGE, 21)]
    assert any("recovery action for huge page: Recovered" in line for line in host.dmesg())
    assert hp(host) == (3, 2, 0)                     # dissolved: out of the pool
    assert host.kpageflags(pfn + 3) & KPF_HWPOISON
    assert not host.kpageflags(pfn) & KPF_HUGE
    assert me.pread(fd, 64, 0) == b"F" * 64          # the file's page is fine
    assert me.pagemap(pv).hwpoison or not me.pagemap(pv).present
    assert sigbus_of(got, lambda: me.read(pv, 1)) == [(AR, pv, 21)]   # the hwpoison entry
    assert host.check_invariants() == []


def test_hugemmap_beyond_eof(host_factory):
    """libhugetlbfs map_high_truncate / LTP hugemmap beyond-EOF cases
    (fs/hugetlbfs/inode.c hugetlbfs_file_mmap): a writable mapping (shared or
    private) extends i_size to its end; a read-only one does not, and a fault past
    EOF is SIGBUS (BUS_ADRERR, hugetlb_no_page's i_size check)."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    ro = me.mmap(0, HPAGE, u.PROT_READ, u.MAP_SHARED, fd, 0)
    assert sigbus_of(got, lambda: me.read(ro, 1)) == [(u.BUS_ADRERR, ro, 0)]
    pv = me.mmap(0, HPAGE, RW, u.MAP_PRIVATE, fd, 0)  # VM_WRITE: i_size = 2M
    assert me.read(ro, 1) == b"\0"
    me.write(pv, b"p")
    assert me.read(ro, 1) == b"\0"                   # private: not in the file
    rw = me.mmap(0, 2 * HPAGE, RW, u.MAP_SHARED, fd, 0)
    me.write(rw + HPAGE, b"q")
    assert me.pread(fd, 1, HPAGE) == b"q"
    ro2 = me.mmap(0, 3 * HPAGE, u.PROT_READ, u.MAP_SHARED | u.MAP_NORESERVE, fd, 0)
    assert sigbus_of(got, lambda: me.read(ro2 + 2 * HPAGE, 1)) == [(u.BUS_ADRERR, ro2 + 2 * HPAGE, 0)]
    assert got == []
    assert host.check_invariants() == []


def test_hugemmap_private_fork_cow(host_factory):
    """libhugetlbfs fork-cow (copy_hugetlb_page_range, hugetlb_wp): after fork a
    private huge page is shared read-only; the child's write copies it (the parent
    keeps its data), and the parent's later write reuses its page, now its alone.
    The child has no reservation (hugetlb_dup_vma_private): its copy comes from the
    unreserved free pages."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    a = me.mmap(0, HPAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_HUGETLB, -1, 0)
    me.write(a, b"parent")
    pfn = me.pagemap(a).pfn
    assert hp(host) == (4, 3, 0)
    out, go = Pipe(), Pipe()

    def child(task):
        emu.sigaction(signal.SIGBUS, signal.SIG_DFL)
        e = task.pagemap(a)
        shared = e.pfn == pfn and not e.exclusive
        seen = task.read(a, 6)
        task.write(a, b"child!")
        e = task.pagemap(a)
        out.put(struct.pack("<QQ6s", shared, e.pfn, seen))
        go.get(task)
        out.put(task.read(a, 6))
        return 0

    ch = me.fork(child, name="cow-child")
    shared, cpfn, seen = struct.unpack("<QQ6s", out.get_bytes(22))
    assert shared and seen == b"parent"
    assert cpfn != pfn and cpfn % 512 == 0
    assert me.read(a, 6) == b"parent"
    assert hp(host) == (4, 2, 0)
    assert not me.pagemap(a).exclusive or me.pagemap(a).pfn == pfn
    me.write(a, b"PARENT")                             # hugetlb_wp: mapcount 1, reused
    assert me.pagemap(a).pfn == pfn and me.pagemap(a).exclusive
    assert hp(host) == (4, 2, 0)
    go.put(b"g")
    assert out.get_bytes(6) == b"child!"
    assert ch.join(30) == 0
    assert hp(host) == (4, 3, 0)
    me.munmap(a, HPAGE)
    assert hp(host) == (4, 4, 0)
    assert got == []
    assert host.check_invariants() == []


def test_thugetlb_cow_shared_page_poisoned_before_write(host_factory):
    """mce-test thugetlb with a fork-shared private huge page (me_huge_page without a
    mapping): MADV_HWPOISON in the parent unmaps it from both processes (hwpoison
    entries), the page is freed and dissolved (HugePages_Total - 1); the parent gets
    BUS_MCEERR_AR at injection, the child on its next access (si_addr_lsb 21)."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    a = me.mmap(0, HPAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_HUGETLB, -1, 0)
    me.write(a, b"x")
    pfn = me.pagemap(a).pfn
    out, go = Pipe(), Pipe()

    def child(task):
        rec = record_sigbus((AR,))
        assert task.read(a, 1) == b"x"
        out.put(b"r")
        go.get(task)
        try:
            task.write(a + 5 * PAGE, b"y")
        except Stop:
            pass
        out.put(struct.pack("<QQQ", *rec[0]) if len(rec) == 1 else b"\0" * 24)
        return 0

    ch = me.fork(child, name="thugetlb-child")
    assert out.get_bytes(1) == b"r"
    assert sigbus_of(got, lambda: me.madvise(a + 2 * PAGE, PAGE, u.MADV_HWPOISON)) \
        == [(AR, a + 2 * PAGE, 21)]
    assert any("%#x: recovery action for huge page: Recovered" % (pfn + 2) in line
               for line in host.dmesg())
    assert hp(host) == (3, 3, 0)
    assert host.kpageflags(pfn + 2) & KPF_HWPOISON
    go.put(b"g")
    assert struct.unpack("<QQQ", out.get_bytes(24)) == (AR, a + 5 * PAGE, 21)
    assert ch.join(30) == 0
    assert sigbus_of(got, lambda: me.read(a, 1)) == [(AR, a, 21)]
    assert host.check_invariants() == []


def test_hugemmap_private_fork_child_write_then_parent_poisoned(host_factory):
    """After the child's COW the two copies are separate folios: poisoning the
    parent's leaves the child's copy (and its data) alone."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    a = me.mmap(0, HPAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_HUGETLB, -1, 0)
    me.write(a, b"p")
    out, go = Pipe(), Pipe()

    def child(task):
        task.write(a, b"c")
        out.put(b"w")
        go.get(task)
        out.put(task.read(a, 1))
        return 0

    ch = me.fork(child, name="cow-child")
    assert out.get_bytes(1) == b"w"
    assert sigbus_of(got, lambda: me.madvise(a, PAGE, u.MADV_HWPOISON)) == [(AR, a, 21)]
    assert hp(host) == (3, 2, 0)
    go.put(b"g")
    assert out.get_bytes(1) == b"c"
    assert ch.join(30) == 0
    assert host.check_invariants() == []


def test_hugemmap_private_dontneed_restores_reservation(host_factory):
    """LTP hugemmap (MADV_DONTNEED on a private huge mapping), mm/hugetlb.c
    __unmap_hugepage_range: zapping the anonymous page of a private mapping gives
    its reservation back (HugePages_Rsvd), and the refault zero-fills from it."""
    host = host_factory(ram="256M", hugepages={"2M": 2})
    me, got = setup(host)
    a = me.mmap(0, HPAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_HUGETLB, -1, 0)
    me.write(a, b"d")
    assert hp(host) == (2, 1, 0)
    me.madvise(a, HPAGE, u.MADV_DONTNEED)
    assert hp(host) == (2, 2, 1)
    b = me.mmap(0, HPAGE, RW, u.MAP_SHARED | u.MAP_ANONYMOUS | u.MAP_HUGETLB, -1, 0)
    me.write(b, b"s")                                  # takes the one unreserved page
    assert hp(host) == (2, 1, 1)
    assert me.read(a, 1) == b"\0"                     # the reserved page, zeroed
    assert hp(host) == (2, 0, 0)
    me.munmap(a, HPAGE)
    me.munmap(b, HPAGE)
    assert hp(host) == (2, 2, 0)
    assert got == []
    assert host.check_invariants() == []


def test_hugemmap_private_cow_of_a_page_with_a_latent_error(host_factory):
    """mce-test thugetlb with a latent error in the file's page (mm/hugetlb.c
    hugetlb_wp: copy_user_large_folio() is machine-check safe, failure is
    VM_FAULT_HWPOISON_LARGE; arch/x86/mm/fault.c do_sigbus: BUS_MCEERR_AR at the
    faulting address, lsb 21): the private write does not copy, the reservation
    is restored (restore_reserve_on_error), and the memory_failure() the copy queued
    poisons the page-cache huge page."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, HPAGE)
    sh = me.mmap(0, HPAGE, RW, u.MAP_SHARED, fd, 0)
    me.write(sh, b"F")
    head = me.pagemap(sh).pfn
    me.munmap(sh, HPAGE)
    pv = me.mmap(0, HPAGE, RW, u.MAP_PRIVATE, fd, 0)
    assert hp(host) == (4, 3, 1)
    host.hw_poison(head + 7)
    assert sigbus_of(got, lambda: me.write(pv + 9 * PAGE + 3, b"w")) == [(AR, pv + 9 * PAGE + 3, 21)]
    assert any("MCE: Killing" in line for line in host.dmesg())
    assert any("%#x: recovery action for huge page" % (head + 7) in line for line in host.dmesg())
    assert host.kpageflags(head + 7) & KPF_HWPOISON
    assert hp(host) == (4, 3, 1)                     # no copy kept, reservation back
    assert sigbus_of(got, lambda: me.read(pv, 1)) == [(AR, pv, 21)]
    assert host.check_invariants() == []


def test_hugemmap_private_populate_copies(host_factory):
    """MAP_POPULATE of a writable private mapping faults with FOLL_WRITE
    (populate_vma_page_range): each huge page is copied (hugetlb_no_page then
    hugetlb_wp) and the file keeps its data; munmap returns the copies."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, 2 * HPAGE)
    sh = me.mmap(0, 2 * HPAGE, RW, u.MAP_SHARED | u.MAP_POPULATE, fd, 0)
    me.write(sh + HPAGE, b"file")
    assert hp(host) == (4, 2, 0)
    pv = me.mmap(0, 2 * HPAGE, RW, u.MAP_PRIVATE | u.MAP_POPULATE, fd, 0)
    assert hp(host) == (4, 0, 0)
    assert me.pagemap(pv).present and not me.pagemap(pv).file
    assert me.read(pv + HPAGE, 4) == b"file"
    me.write(pv + HPAGE, b"priv")
    assert me.read(sh + HPAGE, 4) == b"file"
    me.munmap(pv, 2 * HPAGE)
    assert hp(host) == (4, 2, 0)
    assert got == []
    assert host.check_invariants() == []


def test_hugemmap_private_truncate_drops_the_copies(host_factory):
    """libhugetlbfs truncate / map_high_truncate (fs/hugetlbfs/inode.c
    hugetlb_vmdelete_list: truncation unmaps every VMA of the file, private copies
    included; __unmap_hugepage_range gives the private reservation back): after
    ftruncate(0) the private copy is gone, HugePages_Rsvd holds the mapping's
    reservation again, and an access is SIGBUS (past EOF)."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, HPAGE)
    pv = me.mmap(0, HPAGE, RW, u.MAP_PRIVATE, fd, 0)
    me.write(pv, b"copy")
    assert hp(host) == (4, 3, 0)
    me.ftruncate(fd, 0)
    assert hp(host) == (4, 4, 1)
    assert not me.pagemap(pv).present
    assert sigbus_of(got, lambda: me.read(pv, 1)) == [(u.BUS_ADRERR, pv, 0)]
    me.ftruncate(fd, HPAGE)
    assert me.read(pv, 4) == bytes(4)                  # a new anonymous page, reserved
    assert hp(host) == (4, 3, 0)
    me.munmap(pv, HPAGE)
    assert hp(host) == (4, 4, 0)
    assert host.check_invariants() == []
