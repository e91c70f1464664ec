"""HugeTLB details where the emulator once departed from Linux 6.18 (fidelity audit 2:
D4, D8, D9, D15), as a user sees them.

- read(2) of a hugetlbfs file (fs/hugetlbfs/inode.c hugetlbfs_read_iter and
  adjust_range_hwpoison, 6.18): -EIO replaces the bytes already read when the next
  huge page is poisoned at its first raw page.
- unpoison of a HugeTLB folio (mm/memory-failure.c unpoison_memory with
  folio_free_raw_hwp(folio, false)): every raw page leaves num_poisoned_pages and
  the raw list is emptied.
- MADV_HWPOISON over huge pages (mm/madvise.c madvise_inject_error): `start += size`,
  size = page_size(compound_head(page)), keeps the offset into each huge page.
- has_extra_refcount for a HugeTLB folio (mm/memory-failure.c, me_huge_page): the page
  cache holds folio_nr_pages references (mm/filemap.c __filemap_add_folio
  folio_ref_add(folio, nr)), so one pin more is "still referenced by 1 users".

Default policy (v6.18 semantics for everything here); every test is forked (conftest).
"""
import errno
import signal

import pytest

import emu
from emu import uapi as u

PAGE = 4096
HPAGE = 2 << 20
RW = u.PROT_READ | u.PROT_WRITE
AR = u.BUS_MCEERR_AR
EHWPOISON = 133
HUGE2M = u.MFD_HUGETLB | u.MFD_HUGE_2MB
KPF_HWPOISON = 1 << u.KPF_HWPOISON


def setup(host):
    """Attach; SIGBUS handler that records and returns (the access or syscall goes on)."""
    me = emu.attach(host, name="t")
    got = []
    emu.sigaction(signal.SIGBUS, lambda s, i: got.append((i.si_code, i.si_addr, i.si_addr_lsb)))
    return me, got


def huge_file(me, length):
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, length)
    return fd, me.mmap(0, length, RW, u.MAP_SHARED, fd, 0)


def pattern(length, seed=1):
    """Each 4K page gets its own byte, so a misplaced page shows."""
    return b"".join(bytes([(seed + i) % 251 + 1]) * PAGE for i in range(length // PAGE))


def eio(me, fd, n, off):
    with pytest.raises(OSError) as ei:
        me.pread(fd, n, off)
    return ei.value.errno == errno.EIO


def hc(host):
    return host.meminfo()["HardwareCorrupted"]


def dmesg_count(host, text):
    return sum(text in line for line in host.dmesg())


# ------------------------------------------------------------------ D4: read(2)
def test_read_eio_when_the_next_huge_page_starts_poisoned(host_factory):
    """hugetlbfs_read_iter: adjust_range_hwpoison() == 0 for the next folio sets
    retval = -EIO, overwriting what was copied from the earlier ones."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd, a = huge_file(me, 2 * HPAGE)
    data = pattern(2 * HPAGE)
    me.write(a, data)
    me.madvise(a + HPAGE, PAGE, u.MADV_HWPOISON)          # raw page 0 of huge page 1
    assert got == [(AR, a + HPAGE, 21)]

    assert eio(me, fd, 2 * HPAGE, 0)                      # 2 MiB copied, then -EIO
    assert eio(me, fd, 2 * PAGE, HPAGE - PAGE)            # one page copied, then -EIO
    assert eio(me, fd, 16, HPAGE - 1)                     # one byte copied, then -EIO
    # a read that ends at the boundary never looks at the next folio
    assert me.pread(fd, HPAGE, 0) == data[:HPAGE]
    assert me.pread(fd, 100, HPAGE - 100) == data[HPAGE - 100:HPAGE]
    # the offset is in the poisoned raw page: -EIO; past it: the rest reads
    assert eio(me, fd, 16, HPAGE + 100)
    assert me.pread(fd, HPAGE, HPAGE + PAGE) == data[HPAGE + PAGE:]
    assert me.pread(fd, 2 * PAGE, HPAGE + PAGE + 7) == data[HPAGE + PAGE + 7:HPAGE + 3 * PAGE + 7]


def test_read_stops_with_bytes_at_a_later_raw_page(host_factory):
    """adjust_range_hwpoison counts the bytes from the read offset up to the first
    poisoned raw page at or after it: a poisoned raw page that is not the first of
    its folio ends the read with the bytes before it, in the first folio read or in
    a later one; a read starting past it in the same folio does not see it."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd, a = huge_file(me, 2 * HPAGE)
    data = pattern(2 * HPAGE)
    me.write(a, data)
    me.madvise(a + 5 * PAGE, PAGE, u.MADV_HWPOISON)             # raw 5 of huge page 0
    me.madvise(a + HPAGE + 3 * PAGE, PAGE, u.MADV_HWPOISON)     # raw 3 of huge page 1
    assert [g[1] for g in got] == [a + 5 * PAGE, a + HPAGE + 3 * PAGE]

    assert me.pread(fd, 2 * HPAGE, 0) == data[:5 * PAGE]
    assert me.pread(fd, 2 * HPAGE, 123) == data[123:5 * PAGE]
    # from past raw 5: the rest of folio 0, then folio 1 up to its raw 3
    assert me.pread(fd, 2 * HPAGE, 6 * PAGE) == data[6 * PAGE:HPAGE + 3 * PAGE]
    assert me.pread(fd, 2 * HPAGE, 6 * PAGE + 9) == data[6 * PAGE + 9:HPAGE + 3 * PAGE]
    assert eio(me, fd, 1, 5 * PAGE + PAGE - 1)
    assert me.pread(fd, 2 * HPAGE, HPAGE + 4 * PAGE) == data[HPAGE + 4 * PAGE:]


def test_read_eio_after_a_hole(host_factory):
    """A hole copies zeros (iov_iter_zero) and counts as read; the poisoned first
    raw page of the next folio still turns the whole read into -EIO."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd, a = huge_file(me, 2 * HPAGE)
    me.write(a + HPAGE, b"\x42" * 64)                     # huge page 0 stays a hole
    me.madvise(a + HPAGE, PAGE, u.MADV_HWPOISON)
    assert eio(me, fd, 2 * HPAGE, 0)
    assert me.pread(fd, HPAGE, 0) == bytes(HPAGE)


def test_shmem_read_keeps_the_bytes_before_a_poisoned_page(host_factory):
    """shmem_file_read_iter returns `retval ? retval : error`: unchanged by the
    hugetlbfs rule (a guard; it passed before the D4 fix too)."""
    host = host_factory(ram="128M")
    me, got = setup(host)
    fd = me.memfd_create("shm")
    me.ftruncate(fd, 4 * PAGE)
    a = me.mmap(0, 4 * PAGE, RW, u.MAP_SHARED, fd, 0)
    data = pattern(4 * PAGE)
    me.write(a, data)
    me.madvise(a + 2 * PAGE, PAGE, u.MADV_HWPOISON)
    assert me.pread(fd, 4 * PAGE, 0) == data[:2 * PAGE]
    assert me.pread(fd, 4 * PAGE, PAGE + 5) == data[PAGE + 5:2 * PAGE]
    assert eio(me, fd, 4 * PAGE, 2 * PAGE)


# ------------------------------------------------------------------ D8: unpoison
def test_unpoison_huge_folio_frees_every_raw_page(host_factory):
    """unpoison_memory(head) of a truncated HugeTLB folio: folio_free_raw_hwp(folio,
    false) subtracts each raw page from num_poisoned_pages and empties the raw list;
    the generic num_poisoned_pages_sub(pfn, 1) is skipped.  The folio goes back to
    the pool, and when it is reused only its new raw page counts."""
    host = host_factory(ram="256M", hugepages={"2M": 1})
    me, got = setup(host)
    hc0 = hc(host)
    fd, a = huge_file(me, HPAGE)
    data = pattern(HPAGE)
    me.write(a, data)
    head = me.pagemap(a).pfn
    me.madvise(a + 5 * PAGE, PAGE, u.MADV_HWPOISON)
    with pytest.raises(OSError) as ei:                    # a second raw page
        host.corrupt_pfn(head + 7)
    assert ei.value.errno == EHWPOISON
    assert hc(host) == hc0 + 8
    assert host.meminfo()["HugePages_Free"] == 0

    # while the page cache holds it: the page cache's references are "someone"
    with pytest.raises(OSError) as ei:
        host.unpoison_pfn(head)
    assert ei.value.errno == errno.EBUSY
    assert dmesg_count(host, "Unpoison: %#x: someone grabs the hwpoison page" % head) == 1

    me.munmap(a, HPAGE)
    me.ftruncate(fd, 0)
    # the flag is on the head only: a raw page reads as not poisoned
    with pytest.raises(OSError) as ei:
        host.unpoison_pfn(head + 5)
    assert ei.value.errno == errno.EBUSY
    assert dmesg_count(host, "Unpoison: %#x: page was already unpoisoned" % (head + 5)) == 1
    assert host.unpoison_pfn(head) == 0
    assert dmesg_count(host, "Unpoison: %#x: software-unpoisoned page" % head) == 1
    assert hc(host) == hc0                                # both raw pages left the count
    assert not host.kpageflags(head) & KPF_HWPOISON
    assert host.meminfo()["HugePages_Free"] == 1          # back in the pool

    # the same folio (the pool's only one) reused; a new raw page poisoned
    me.ftruncate(fd, HPAGE)
    b = me.mmap(0, HPAGE, RW, u.MAP_SHARED, fd, 0)
    me.write(b, data)
    assert me.pagemap(b).pfn == head
    me.madvise(b + 9 * PAGE, PAGE, u.MADV_HWPOISON)
    assert hc(host) == hc0 + 4
    assert me.pread(fd, HPAGE, 0) == data[:9 * PAGE]      # raw 5 and 7 are forgotten
    assert me.pread(fd, PAGE, 5 * PAGE) == data[5 * PAGE:6 * PAGE]
    assert host.check_invariants() == []


# ------------------------------------------------------------------ D9: MADV_HWPOISON loop
def test_madvise_hwpoison_keeps_the_offset_into_each_huge_page(host_factory):
    """madvise_inject_error: `for (; start < end; start += size)` with size the huge
    page size: [h + 4K, h + 4M) injects raw page 1 of each huge page."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd, a = huge_file(me, 2 * HPAGE)
    data = pattern(2 * HPAGE)
    me.write(a, data)
    h0, h1 = me.pagemap(a).pfn, me.pagemap(a + HPAGE).pfn
    hc0 = hc(host)

    me.madvise(a + PAGE, 2 * HPAGE - PAGE, u.MADV_HWPOISON)
    inj = [line for line in host.dmesg() if "Injecting memory failure for pfn" in line]
    assert [line.split("Injecting ")[1] for line in inj] == [
        "memory failure for pfn %#x at process virtual address %#x" % (h0 + 1, a + PAGE),
        "memory failure for pfn %#x at process virtual address %#x" % (h1 + 1, a + HPAGE + PAGE)]
    assert dmesg_count(host, "%#x: recovery action for huge page: Recovered" % (h1 + 1)) == 1
    assert hc(host) == hc0 + 8
    # the first AR is pending when the second is forced: legacy_queue drops it
    assert got == [(AR, a + PAGE, 21)]
    # raw page 0 of huge page 1 is healthy, raw page 1 is not
    assert me.pread(fd, 2 * PAGE, HPAGE) == data[HPAGE:HPAGE + PAGE]


def test_madvise_hwpoison_range_ending_inside_the_next_huge_page(host_factory):
    """[h + 4K, h + 2M + 4K): start + size = h + 2M + 4K is the end, so one injection;
    [h + 4K, h + 2M + 8K) reaches h + 2M + 4K (raw page 1 of the next huge page)."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd, a = huge_file(me, 2 * HPAGE)
    me.write(a, pattern(2 * HPAGE))
    h1 = me.pagemap(a + HPAGE).pfn
    hc0 = hc(host)
    me.madvise(a + PAGE, HPAGE, u.MADV_HWPOISON)
    assert dmesg_count(host, "Injecting memory failure for pfn") == 1
    assert hc(host) == hc0 + 4
    assert not host.kpageflags(h1) & KPF_HWPOISON          # the next huge page untouched

    fd2, b = huge_file(me, 2 * HPAGE)
    me.write(b, pattern(2 * HPAGE))
    g1 = me.pagemap(b + HPAGE).pfn
    me.madvise(b + PAGE, HPAGE + PAGE, u.MADV_HWPOISON)
    assert dmesg_count(host, "Injecting memory failure for pfn %#x at process virtual address %#x"
                       % (g1 + 1, b + HPAGE + PAGE)) == 1
    assert dmesg_count(host, "Injecting memory failure for pfn") == 3


# ------------------------------------------------------------------ D15: extra references
def _long_term_pin(monkeypatch):
    """A driver's pin_user_pages(FOLL_LONGTERM) on the folio at file offset 0 of
    every HugeTLB file (nothing in the emulator pins one for good, so the
    supervisor is patched before it forks, as test_invariants does)."""
    from emu.kernel.hugetlb import HugeTLB

    real = HugeTLB.get_folio

    def get_folio(self, inode, index, extra_flags=None):
        nr = 1 << inode.private["hstate"].order
        new = inode.pages.get(index - index % nr) is None
        head = real(self, inode, index) if extra_flags is None else \
            real(self, inode, index, extra_flags)
        if new and head is not None and index < nr:
            self.k.core.ref_add(head, 1)
        return head

    monkeypatch.setattr(HugeTLB, "get_folio", get_folio)


def test_extra_pin_on_a_huge_folio_is_reported(host_factory, monkeypatch):
    """me_huge_page -> has_extra_refcount(ps, p, true): page_count - 1 - folio_nr_pages
    leaves the pin: "huge page still referenced by 1 users", MF_FAILED, and
    MADV_HWPOISON fails with EBUSY (after the AR kill of the unmap)."""
    _long_term_pin(monkeypatch)
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd, a = huge_file(me, HPAGE)
    me.write(a, b"p" * 64)
    pfn = me.pagemap(a).pfn + 3
    st0 = host.mf_stats()
    with pytest.raises(OSError) as ei:
        me.madvise(a + 3 * PAGE, PAGE, u.MADV_HWPOISON)
    assert ei.value.errno == errno.EBUSY
    assert got == [(AR, a + 3 * PAGE, 21)]
    assert dmesg_count(host, "Memory failure: %#x: huge page still referenced by 1 users" % pfn) == 1
    assert dmesg_count(host, "Memory failure: %#x: recovery action for huge page: Failed" % pfn) == 1
    st = host.mf_stats()
    assert st["failed"] == st0["failed"] + 1 and st["recovered"] == st0["recovered"]


def test_mapped_twice_huge_folio_has_no_extra_reference(host_factory):
    """The ordinary references (the page cache's folio_nr_pages, one per mapping,
    memory_failure's own) are not "users": two processes and two mappings of the
    folio, all unmapped by the failure, give "huge page: Recovered"."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd, a = huge_file(me, HPAGE)
    a2 = me.mmap(0, HPAGE, RW, u.MAP_SHARED, fd, 0)
    me.write(a, b"q" * 64)
    assert me.read(a2, 1) == b"q"
    ch = me.fork(lambda t: t.idle(1.0), name="child")   # maps it too (fork copies the PTEs)
    pfn = me.pagemap(a).pfn + 2
    me.madvise(a + 2 * PAGE, PAGE, u.MADV_HWPOISON)
    assert dmesg_count(host, "still referenced by") == 0
    assert dmesg_count(host, "%#x: recovery action for huge page: Recovered" % pfn) == 1
    ch.join(10)


def test_extra_pin_on_a_hugetlb_guest_memfd_folio_is_reported(host_factory, monkeypatch):
    """The HugeTLB guest_memfd (out-of-tree series) adds its folios to the filemap
    the same way: under the MF_DELAYED fix a plain failure is "Delayed"; one pin more
    is "still referenced by 1 users" and MF_FAILED."""
    flags = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
             | u.GUEST_MEMFD_FLAG_HUGETLB | u.GUESTMEM_HUGETLB_FLAG_2MB)
    _long_term_pin(monkeypatch)
    host = host_factory(ram="256M", hugepages={"2M": 4}, policy="mf-delayed-fix")
    me, got = setup(host)
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(2 * HPAGE, flags)
    hva = me.mmap(0, 2 * HPAGE, RW, u.MAP_SHARED, gfd, 0)
    me.write(hva, b"g" * 64)
    me.write(hva + HPAGE, b"h" * 64)
    pinned, plain = me.pagemap(hva).pfn + 3, me.pagemap(hva + HPAGE).pfn + 3
    assert host.corrupt_pfn(plain) == 0
    assert dmesg_count(host, "%#x: recovery action for huge page: Delayed" % plain) == 1
    with pytest.raises(OSError) as ei:
        host.corrupt_pfn(pinned)
    assert ei.value.errno == errno.EBUSY
    assert dmesg_count(host, "%#x: huge page still referenced by 1 users" % pinned) == 1
    assert dmesg_count(host, "%#x: recovery action for huge page: Failed" % pinned) == 1
    assert dmesg_count(host, "still referenced by") == 1
