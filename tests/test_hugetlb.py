"""HugeTLB memfds and HugeTLB hwpoison, as a user sees them.

Kernel sources: mm/memory-failure.c (try_memory_failure_hugetlb, the raw-page list,
hwpoison_user_mappings: the whole huge page unmapped, si_addr_lsb 21/30),
mm/hugetlb.c (dissolve_free_hugetlb_folio, hugetlb_no_page), fs/hugetlbfs/inode.c
(hugetlbfs_read_iter, hugetlbfs_fallocate), mm/mmap.c ksys_mmap_pgoff.  The ports of
hugetlb-read-hwpoison.c and of mce-test's thugetlb are in
tests/test_selftest_hugetlb_read_hwpoison.py and tests/test_mce_test.py.

Default policy; every test is forked (conftest) and boots its own supervisor.
"""
import errno
import time

import pytest
from checks import Event, Stop, dmesg_has, record_sigbus, sigbus_of, wait_for

import emu
from emu import uapi as u

pytestmark = pytest.mark.both_backends      # conftest: on the Cython core and the reference CPU

PAGE = 4096
HPAGE = 2 << 20
GPAGE = 1 << 30
RW = u.PROT_READ | u.PROT_WRITE
AR, AO = u.BUS_MCEERR_AR, u.BUS_MCEERR_AO
EHWPOISON = 133
MAP_NORESERVE = 0x4000            # include/uapi/asm-generic/mman-common.h
KPF_HWPOISON = 1 << u.KPF_HWPOISON
KPF_HUGE = 1 << u.KPF_HUGE
KPF_HEAD = 1 << u.KPF_COMPOUND_HEAD
WAIT = 5.0
GRACE = 0.3
HUGE2M = u.MFD_HUGETLB | u.MFD_HUGE_2MB


RAISE_ON = (AR, u.BUS_ADRERR)      # the SIGBUS recorders stop an AR or BUS_ADRERR access


def poll(fn, want, timeout=WAIT):
    end = time.monotonic() + timeout
    while (v := fn()) != want and time.monotonic() < end:
        time.sleep(0.02)
    return v


def mi(h, key):
    return h.meminfo()[key]


def setup(host, name="t"):
    me = emu.attach(host, name=name)
    return me, record_sigbus(RAISE_ON)


def huge_file(me, length, flags=HUGE2M, mflags=u.MAP_SHARED):
    fd = me.memfd_create("huge", flags)
    me.ftruncate(fd, length)
    a = me.mmap(0, length, RW, mflags, fd, 0)
    return fd, a


def pattern(length, seed=1):
    """Each 4K page gets its own byte, so a misplaced page shows."""
    return b"".join(bytes([(seed + i) % 251 + 1]) * PAGE for i in range(length // PAGE))


def patterned_file(host_factory, nhuge, pool=8):
    """A supervisor with 256M of RAM and `pool` 2M huge pages, this process attached
    (setup), and a 2M HugeTLB memfd of `nhuge` huge pages mapped MAP_SHARED and
    written with pattern().  Returns (host, me, got, fd, a)."""
    host = host_factory(ram="256M", hugepages={"2M": pool})
    me, got = setup(host)
    length = nhuge * HPAGE
    fd, a = huge_file(me, length)
    me.write(a, pattern(length))
    return host, me, got, fd, a


def poison_ar(me, got, va):
    """MADV_HWPOISON passes MF_ACTION_REQUIRED: the caller gets AR right at injection."""
    got.clear()
    with pytest.raises(Stop):
        me.madvise(va, PAGE, u.MADV_HWPOISON)
    out = list(got)
    got.clear()
    return out


def free_huge_heads(h, order=9):
    """Heads of the huge pages of the pool (kpageflags: KPF_HUGE on a compound head)."""
    nframes = h.meminfo()["MemTotal"] // 4
    step = 1 << order
    return [p for p in range(nframes - step, 0, -step)
            if h.kpageflags(p) & (KPF_HUGE | KPF_HEAD) == KPF_HUGE | KPF_HEAD][:64]


# ------------------------------------------------------------------ 1. meminfo
def test_meminfo_boot_and_faults(host_factory):
    host = host_factory(ram="256M", hugepages={"2M": 8})
    m = host.meminfo()
    assert m["HugePages_Total"] == 8 and m["HugePages_Free"] == 8
    assert m["HugePages_Surp"] == 0
    assert m["Hugepagesize"] == 2048
    assert m["Hugetlb"] == 8 * 2048
    assert m["MemFree"] <= m["MemTotal"] - 8 * 2048        # the pool is not free memory

    me, _got = setup(host)
    fd, a = huge_file(me, 4 * HPAGE)
    assert mi(host, "HugePages_Free") == 8                 # nothing faulted yet
    me.write(a + 5, b"x")
    assert mi(host, "HugePages_Free") == 7
    me.write(a + HPAGE - 1, b"y")                          # same huge page
    me.read(a + 12345, 8)
    assert mi(host, "HugePages_Free") == 7
    assert me.read(a + 2 * HPAGE + 7, 4) == b"\0" * 4       # a read fault allocates too
    assert mi(host, "HugePages_Free") == 6
    me.write(a + 3 * HPAGE, b"z")
    m = host.meminfo()
    assert m["HugePages_Free"] == 5
    assert m["HugePages_Total"] == 8 and m["Hugetlb"] == 8 * 2048
    # one huge page, physically contiguous
    p0 = me.pagemap(a).pfn
    assert me.pagemap(a + HPAGE - PAGE).pfn == p0 + 511
    assert p0 % 512 == 0
    me.munmap(a, 4 * HPAGE)
    assert mi(host, "HugePages_Free") == 5                 # still in the page cache
    me.close(fd)
    m = host.meminfo()
    assert m["HugePages_Free"] == 8 and m["HugePages_Total"] == 8


def test_meminfo_reservations(host_factory):
    """mm/hugetlb.c hugetlb_reserve_pages (called from hugetlbfs_file_mmap for a
    MAP_SHARED mapping without MAP_NORESERVE): HugePages_Rsvd counts the pages
    promised to the mapping; faults consume reservations; a mapping the free pool
    cannot cover fails with ENOMEM at mmap time (Documentation/admin-guide/mm/
    hugetlbpage.rst: HugePages_Rsvd is "the number of huge pages for which a
    commitment to allocate from the pool has been made, but no allocation has yet
    been made")."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, _got = setup(host)
    fd, a = huge_file(me, 3 * HPAGE)
    m = host.meminfo()
    assert (m["HugePages_Free"], m["HugePages_Rsvd"]) == (4, 3)
    me.write(a, b"x")
    m = host.meminfo()
    assert (m["HugePages_Free"], m["HugePages_Rsvd"]) == (3, 2)
    fd2 = me.memfd_create("more", HUGE2M)
    me.ftruncate(fd2, 2 * HPAGE)
    with pytest.raises(OSError) as ei:                     # 3 free, 2 reserved: 1 left
        me.mmap(0, 2 * HPAGE, RW, u.MAP_SHARED, fd2, 0)
    assert ei.value.errno == errno.ENOMEM


def test_meminfo_1g_pool(host_factory):
    """A 1G pool is in Hugetlb but not in HugePages_* (those are for the default
    size, 2M).  Faults in a poisoned 1G page: lsb 30.  The emulator carves naturally
    aligned huge pages above its first 64 MiB, so one 1G page needs 2 GiB of RAM."""
    host = host_factory(ram="2048M", hugepages={"1G": 1, "2M": 2})
    m = host.meminfo()
    assert m["HugePages_Total"] == 2 and m["HugePages_Free"] == 2
    assert m["Hugepagesize"] == 2048
    assert m["Hugetlb"] == 1024 * 1024 + 2 * 2048

    me, got = setup(host)
    fd, a = huge_file(me, GPAGE, u.MFD_HUGETLB | u.MFD_HUGE_1GB)
    assert a % GPAGE == 0
    me.write(a, b"head")
    me.write(a + GPAGE - 4, b"tail")
    p0 = me.pagemap(a).pfn
    assert p0 % (1 << 18) == 0
    assert me.pagemap(a + (300 << 20)).pfn == p0 + (300 << 8)
    raw = a + (300 << 20) + 3 * PAGE
    assert poison_ar(me, got, raw) == [(AR, raw, 30)]
    for off in (0, 7, (300 << 20) + 3 * PAGE + 9, GPAGE - 1):
        assert sigbus_of(got, lambda off=off: me.read(a + off, 1)) == [(AR, a + off, 30)]
    assert sigbus_of(got, lambda: me.write(a + 4096, b"w")) == [(AR, a + 4096, 30)]
    assert mi(host, "HugePages_Free") == 2                 # the 2M pool is untouched
    assert mi(host, "HardwareCorrupted") == 4
    assert dmesg_has(host, "%#x: recovery action for huge page: Recovered" % (p0 + (300 << 8) + 3))


# hugetlb-read-hwpoison.c: tests/test_selftest_hugetlb_read_hwpoison.py


# ------------------------------------------------------------------ 3. faults in a poisoned huge page
def test_fault_anywhere_in_poisoned_huge_page(host_factory):
    length = 4 * HPAGE
    host, me, got, fd, a = patterned_file(host_factory, 4)
    data = pattern(length)
    h1 = a + HPAGE
    raw = h1 + 5 * PAGE
    assert poison_ar(me, got, raw) == [(AR, raw, 21)]

    # every byte of the huge page is gone: AR at the exact faulting address, lsb 21
    for off in (0, 1, 5 * PAGE, 5 * PAGE + 77, 6 * PAGE, 0x12345, HPAGE - 1):
        va = h1 + off
        assert sigbus_of(got, lambda va=va: me.read(va, 1)) == [(AR, va, 21)]
    for off in (3, 5 * PAGE + 8, HPAGE - 8):
        va = h1 + off
        assert sigbus_of(got, lambda va=va: me.write(va, b"\xff" * 8)) == [(AR, va, 21)]
    # a read that starts in a healthy huge page and runs into the poisoned one
    va = h1 - 16
    assert sigbus_of(got, lambda: me.read(va, 64)) == [(AR, h1, 21)]

    # pagemap_hugetlb_range(): a non-present (hwpoison) huge entry reads as 0
    assert me.pagemap(h1).raw == 0
    assert me.pagemap(h1 + HPAGE - PAGE).raw == 0

    # the other huge pages of the mapping stay usable
    for i in (0, 2, 3):
        base = a + i * HPAGE
        assert me.read(base, HPAGE) == data[i * HPAGE:(i + 1) * HPAGE]
        me.write(base + 100, b"still fine")
        assert me.read(base + 100, 10) == b"still fine"
        assert me.pagemap(base).present
    assert got == []
    # and the whole huge page keeps faulting (no recovery by itself)
    assert sigbus_of(got, lambda: me.read(h1 + 9, 1)) == [(AR, h1 + 9, 21)]


def test_fault_from_second_mapping_and_after_remap(host_factory):
    """Another mapping of the same file (never faulted) and a fresh mmap after munmap
    find the poisoned folio in the page cache: hugetlb_no_page -> VM_FAULT_HWPOISON_LARGE,
    lsb 21, at the faulting address."""
    host, me, got, fd, a = patterned_file(host_factory, 2)
    raw = a + 17 * PAGE
    assert poison_ar(me, got, raw) == [(AR, raw, 21)]
    b = me.mmap(0, 2 * HPAGE, RW, u.MAP_SHARED, fd, 0)
    assert sigbus_of(got, lambda: me.read(b + 3, 1)) == [(AR, b + 3, 21)]
    assert me.read(b + HPAGE, 4) == pattern(2 * HPAGE)[HPAGE:HPAGE + 4]
    me.munmap(a, 2 * HPAGE)
    me.munmap(b, 2 * HPAGE)
    c = me.mmap(0, HPAGE, RW, u.MAP_SHARED, fd, 0)
    assert sigbus_of(got, lambda: me.read(c + HPAGE - 1, 1)) == [(AR, c + HPAGE - 1, 21)]
    # mapping only the second huge page (offset 2M): fine
    d = me.mmap(0, HPAGE, RW, u.MAP_SHARED, fd, HPAGE)
    assert me.read(d, 4) == pattern(2 * HPAGE)[HPAGE:HPAGE + 4]


# ------------------------------------------------------------------ 4. kill at injection
def test_madvise_ar_to_current_raw_page_va(host_factory):
    """kill_proc: AR to current, si_addr = page_address_in_vma of the raw page,
    si_addr_lsb = huge_page_shift."""
    host, me, got, fd, a = patterned_file(host_factory, 2)
    for raw in (a + HPAGE + 9 * PAGE,):
        assert poison_ar(me, got, raw) == [(AR, raw, 21)]
    me.idle(GRACE)
    assert got == []                                   # exactly one


def test_madvise_head_page(host_factory):
    """thugetlb's "head" case: the raw page is the head of the folio."""
    host, me, got, fd, a = patterned_file(host_factory, 2)
    pfn = me.pagemap(a + HPAGE).pfn
    assert poison_ar(me, got, a + HPAGE) == [(AR, a + HPAGE, 21)]
    assert dmesg_has(host, "Memory failure: %#x: recovery action for huge page: Recovered" % pfn)
    assert sigbus_of(got, lambda: me.read(a + HPAGE + 0x1001, 1)) == [(AR, a + HPAGE + 0x1001, 21)]
    assert me.read(a, 4) == pattern(2 * HPAGE)[:4]


def _other_process(me, policy, touch=None):
    """A forked process mapping the file with PR_MCE_KILL `policy`, ready once this
    returns (ch, done); after done.set() it reports (its signals, those from reading
    `touch`)."""
    ready, done = Event(), Event()

    def body(t):
        ogot = record_sigbus(RAISE_ON)
        t.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, policy)
        ready.set()
        if policy == u.PR_MCE_KILL_EARLY:
            wait_for(t, ogot)
        assert done.wait(t)
        t.idle(GRACE)
        before = list(ogot)
        ogot.clear()
        after = []
        if touch is not None:
            try:
                t.read(touch, 1)
            except Stop:
                pass
            after = list(ogot)
        return before, after

    ch = me.fork(body, name="other")
    assert ready.wait(me)
    return ch, done


@pytest.mark.parametrize("inject", ["hw_detect", "corrupt_pfn"])
def test_deferred_error_early_process_gets_ao(host_factory, inject):
    """A deferred error (no AR) on a dirty hugetlb folio: the EARLY process mapping the
    same file gets AO with the raw page's VA and lsb 21; the injecting (DEFAULT,
    sysctl 0) process gets nothing until it touches the huge page."""
    host, me, got, fd, a = patterned_file(host_factory, 2)
    raw = a + HPAGE + 3 * PAGE
    pfn = me.pagemap(raw).pfn
    ch, done = _other_process(me, u.PR_MCE_KILL_EARLY)
    assert getattr(host, inject)(pfn) == 0
    done.set()
    assert ch.join(15) == 0
    before, _ = ch.result
    assert before == [(AO, raw, 21)]
    me.idle(GRACE)
    assert got == []
    assert sigbus_of(got, lambda: me.read(raw + 100, 1)) == [(AR, raw + 100, 21)]
    assert sigbus_of(got, lambda: me.read(a + HPAGE, 1)) == [(AR, a + HPAGE, 21)]


def test_deferred_error_late_process_gets_nothing_until_touch(host_factory):
    host, me, got, fd, a = patterned_file(host_factory, 2)
    raw = a + HPAGE + 3 * PAGE
    pfn = me.pagemap(raw).pfn
    touch = a + HPAGE + 0x1abc
    ch, done = _other_process(me, u.PR_MCE_KILL_LATE, touch=touch)
    assert host.hw_detect(pfn) == 0
    done.set()
    assert ch.join(15) == 0
    before, after = ch.result
    assert before == []
    assert after == [(AR, touch, 21)]


def test_madvise_ar_current_and_ao_to_early_process(host_factory):
    """§11 check 3 on hugetlb: current gets AR, the EARLY sharer AO, both lsb 21 and the
    raw page's VA."""
    host, me, got, fd, a = patterned_file(host_factory, 2)
    raw = a + 200 * PAGE
    ch, done = _other_process(me, u.PR_MCE_KILL_EARLY)
    assert poison_ar(me, got, raw) == [(AR, raw, 21)]
    done.set()
    assert ch.join(15) == 0
    assert ch.result[0] == [(AO, raw, 21)]


# ------------------------------------------------------------------ 5. second raw page
def test_second_raw_page_same_folio(host_factory):
    length = 2 * HPAGE
    host, me, got, fd, a = patterned_file(host_factory, 2)
    data = pattern(length)
    raw1 = a + HPAGE + 5 * PAGE
    pfn1 = me.pagemap(raw1).pfn
    head = pfn1 - 5
    hc0, st0 = mi(host, "HardwareCorrupted"), host.mf_stats()

    assert poison_ar(me, got, raw1) == [(AR, raw1, 21)]
    assert dmesg_has(host, "Memory failure: %#x: recovery action for huge page: Recovered" % pfn1)
    assert mi(host, "HardwareCorrupted") == hc0 + 4
    st1 = host.mf_stats()
    assert st1["recovered"] == st0["recovered"] + 1 and st1["total"] == st0["total"] + 1

    # a second, distinct raw page: counted, -EHWPOISON, stats unchanged
    pfn2 = head + 7
    with pytest.raises(OSError) as ei:
        host.corrupt_pfn(pfn2)
    assert ei.value.errno == EHWPOISON
    assert mi(host, "HardwareCorrupted") == hc0 + 8
    assert host.mf_stats() == st1
    assert dmesg_has(host, "Memory failure: %#x: recovery action for already poisoned page: Failed"
                     % pfn2)
    me.idle(GRACE)
    assert got == []                                   # not AR: nobody is signalled

    # the same raw page again: -EHWPOISON, not counted twice
    with pytest.raises(OSError) as ei:
        host.corrupt_pfn(pfn1)
    assert ei.value.errno == EHWPOISON
    assert mi(host, "HardwareCorrupted") == hc0 + 8
    assert host.mf_stats() == st1

    # read() stops at each poisoned raw page
    off1 = HPAGE + 5 * PAGE
    assert me.pread(fd, length, 0) == data[:off1]
    assert me.pread(fd, length, off1 + PAGE) == data[off1 + PAGE:off1 + 2 * PAGE]
    assert me.pread(fd, length, HPAGE + 8 * PAGE) == data[HPAGE + 8 * PAGE:]
    # faults still give lsb 21 for the whole huge page
    assert sigbus_of(got, lambda: me.read(a + HPAGE + 7 * PAGE, 1)) == \
        [(AR, a + HPAGE + 7 * PAGE, 21)]


def test_second_raw_page_consumed_ar(host_factory):
    """A consumed #MC (AR) on another raw page of an already poisoned, unmapped folio:
    the huge PTE is a hwpoison entry, so no translation reaches the frame and the
    access takes the fault path: AR, lsb 21, nothing counted."""
    host, me, got, fd, a = patterned_file(host_factory, 1)
    head = me.pagemap(a).pfn
    assert poison_ar(me, got, a + PAGE) == [(AR, a + PAGE, 21)]
    hc0, st0 = mi(host, "HardwareCorrupted"), host.mf_stats()
    host.hw_poison(head + 9)
    assert sigbus_of(got, lambda: me.read(a + 9 * PAGE + 1, 1)) == [(AR, a + 9 * PAGE + 1, 21)]
    assert host.mf_stats() == st0 and mi(host, "HardwareCorrupted") == hc0


# ------------------------------------------------------------------ 6. a free huge page
def test_free_huge_page_dissolved(host_factory):
    host = host_factory(ram="256M", hugepages={"2M": 8})
    heads = free_huge_heads(host)
    assert len(heads) == 8
    victim = heads[3]
    pfn = victim + 17
    m0, st0 = host.meminfo(), host.mf_stats()
    assert not host.kpageflags(pfn) & KPF_HWPOISON

    assert host.corrupt_pfn(pfn) == 0
    assert dmesg_has(host, "Memory failure: %#x: recovery action for free huge page: Recovered"
                     % pfn)
    m = host.meminfo()
    assert m["HugePages_Total"] == m0["HugePages_Total"] - 1
    assert m["HugePages_Free"] == m0["HugePages_Free"] - 1
    assert m["Hugetlb"] == m0["Hugetlb"] - 2048
    # the healthy subpages go back to the page allocator (the emulator frees them after
    # a grace period, so poll briefly)
    assert poll(lambda: host.meminfo()["MemFree"] - m0["MemFree"], 2048 - 4) == 2048 - 4
    assert m["HardwareCorrupted"] == m0["HardwareCorrupted"] + 4
    st = host.mf_stats()
    assert st["recovered"] == st0["recovered"] + 1 and st["total"] == st0["total"] + 1

    assert host.kpageflags(pfn) & KPF_HWPOISON
    for p in (victim, victim + 16, victim + 18, victim + 511):
        f = host.kpageflags(p)
        assert not f & KPF_HWPOISON and not f & KPF_HUGE    # no longer a huge page
    assert free_huge_heads(host) == [p for p in heads if p != victim]

    # the pool hands out the 7 others, never the dissolved one
    me, got = setup(host)
    fd, a = huge_file(me, 7 * HPAGE)
    me.write_batch([a + i * HPAGE for i in range(7)], 1, b"x" * 7)
    got_heads = {me.pagemap(a + i * HPAGE).pfn for i in range(7)}
    assert got_heads == set(heads) - {victim}
    assert mi(host, "HugePages_Free") == 0

    # poisoning it again: already poisoned
    with pytest.raises(OSError) as ei:
        host.corrupt_pfn(pfn)
    assert ei.value.errno == EHWPOISON


# ------------------------------------------------------------------ 7. never handed out again
def test_poisoned_in_use_page_lost_to_pool(host_factory):
    """memory_failure keeps its reference on an in-use poisoned hugetlb folio, so it
    is never freed: after munmap + close it is neither free nor reused."""
    host = host_factory(ram="256M", hugepages={"2M": 3})
    me, got = setup(host)
    fd, a = huge_file(me, HPAGE)
    me.write(a, b"\x5a" * HPAGE)
    bad = me.pagemap(a).pfn
    assert poison_ar(me, got, a + 3 * PAGE) == [(AR, a + 3 * PAGE, 21)]
    hc = mi(host, "HardwareCorrupted")
    me.munmap(a, HPAGE)
    me.close(fd)
    m = host.meminfo()
    assert m["HugePages_Free"] == 2                       # lost to the pool
    assert m["HugePages_Total"] == 3                      # still a huge page (not freed)
    assert m["HardwareCorrupted"] == hc

    # new files get the two other huge pages
    fd2, b = huge_file(me, 2 * HPAGE)
    me.write(b, b"1")
    me.write(b + HPAGE, b"2")
    heads = [me.pagemap(b).pfn, me.pagemap(b + HPAGE).pfn]
    assert bad not in heads and len(set(heads)) == 2
    for h in heads:
        assert not bad <= h < bad + 512
    assert mi(host, "HugePages_Free") == 0
    # and with nothing left, a new huge page is not the poisoned one: SIGBUS
    fd3 = me.memfd_create("more", HUGE2M)
    me.ftruncate(fd3, HPAGE)
    c = me.mmap(0, HPAGE, RW, u.MAP_SHARED | MAP_NORESERVE, fd3, 0)
    assert sigbus_of(got, lambda: me.write(c + 8, b"x")) == [(u.BUS_ADRERR, c + 8, 0)]

    # releasing the good ones puts them back; the poisoned one stays out
    me.munmap(b, 2 * HPAGE)
    me.close(fd2)
    assert mi(host, "HugePages_Free") == 2
    fd4, d = huge_file(me, 2 * HPAGE)
    me.write(d, b"a")
    me.write(d + HPAGE, b"b")
    assert {me.pagemap(d).pfn, me.pagemap(d + HPAGE).pfn} == set(heads)


def test_poisoned_page_truncated_not_reused(host_factory):
    """ftruncate(0) of a file holding a poisoned huge page: the page is not reused by
    the next faults of the same file."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, got = setup(host)
    fd, a = huge_file(me, HPAGE)
    me.write(a, b"q" * 64)
    bad = me.pagemap(a).pfn
    assert poison_ar(me, got, a) == [(AR, a, 21)]
    me.munmap(a, HPAGE)
    me.ftruncate(fd, 0)
    me.ftruncate(fd, HPAGE)
    b = me.mmap(0, HPAGE, RW, u.MAP_SHARED, fd, 0)
    assert me.read(b, 64) == b"\0" * 64                  # a fresh, zeroed huge page
    assert me.pagemap(b).pfn != bad
    assert mi(host, "HugePages_Free") == 2


# ------------------------------------------------------------------ 8. errors
def test_ftruncate_not_huge_multiple(host_factory):
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, _ = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    for length in (PAGE, HPAGE + PAGE, HPAGE // 2):
        with pytest.raises(OSError) as ei:
            me.ftruncate(fd, length)
        assert ei.value.errno == errno.EINVAL
    me.ftruncate(fd, 2 * HPAGE)


def test_mmap_offset_not_huge_multiple(host_factory):
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, _ = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, 2 * HPAGE)
    for off in (PAGE, HPAGE // 2, HPAGE + PAGE):
        with pytest.raises(OSError) as ei:
            me.mmap(0, HPAGE, RW, u.MAP_SHARED, fd, off)
        assert ei.value.errno == errno.EINVAL


def test_mmap_length_rounded_up(host_factory):
    """mm/mmap.c ksys_mmap_pgoff: for a hugetlbfs file, `len = ALIGN(len,
    huge_page_size(hstate_file(file)))`; man 2 mmap, "Huge page (Huge TLB) mappings":
    "The system automatically aligns length to be a multiple of the underlying huge
    page size"."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, _ = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, 2 * HPAGE)
    a = me.mmap(0, HPAGE + PAGE, RW, u.MAP_SHARED, fd, 0)
    assert a % HPAGE == 0
    me.write(a + 2 * HPAGE - 1, b"!")                    # the whole second huge page is mapped
    assert me.pread(fd, 1, 2 * HPAGE - 1) == b"!"
    me.munmap(a, 2 * HPAGE)


def test_munmap_unaligned_einval(host_factory):
    """man 2 mmap: "For munmap(), addr, and length must both be a multiple of the
    underlying huge page size" (hugetlb_vm_op_split refuses the split: EINVAL)."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, _ = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, 2 * HPAGE)
    a = me.mmap(0, 2 * HPAGE, RW, u.MAP_SHARED, fd, 0)
    me.write(a, pattern(2 * HPAGE))
    for addr, length in ((a, PAGE), (a + PAGE, HPAGE), (a + HPAGE, PAGE), (a, HPAGE + PAGE)):
        with pytest.raises(OSError) as ei:
            me.munmap(addr, length)
        assert ei.value.errno == errno.EINVAL, (hex(addr - a), length)
    assert me.read(a, 2 * HPAGE) == pattern(2 * HPAGE)  # nothing was unmapped
    # whole huge pages can go one by one
    me.munmap(a, HPAGE)
    assert me.read(a + HPAGE, 4) == pattern(2 * HPAGE)[HPAGE:HPAGE + 4]
    assert not me.pagemap(a).present


def test_memfd_create_bad_huge_size(host_factory):
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, _ = setup(host)
    for flags in (u.MFD_HUGETLB | (16 << u.MFD_HUGE_SHIFT),     # 64K: no such hstate on x86
                  u.MFD_HUGETLB | (12 << u.MFD_HUGE_SHIFT),
                  u.MFD_HUGE_2MB):                              # a size without MFD_HUGETLB
        with pytest.raises(OSError) as ei:
            me.memfd_create("bad", flags)
        assert ei.value.errno == errno.EINVAL, hex(flags)


def test_pool_exhausted_sigbus_adrerr(host_factory):
    """hugetlb_no_page: alloc_hugetlb_folio fails (-ENOSPC) -> VM_FAULT_SIGBUS:
    SIGBUS BUS_ADRERR at the faulting address (x86 do_sigbus).  MAP_NORESERVE, so no
    reservation is taken at mmap time."""
    host = host_factory(ram="256M", hugepages={"2M": 2})
    me, got = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, 3 * HPAGE)
    a = me.mmap(0, 3 * HPAGE, RW, u.MAP_SHARED | MAP_NORESERVE, fd, 0)
    me.write(a, b"0")
    me.write(a + HPAGE, b"1")
    assert mi(host, "HugePages_Free") == 0
    va = a + 2 * HPAGE + 0x321
    assert sigbus_of(got, lambda: me.read(va, 1)) == [(u.BUS_ADRERR, va, 0)]
    assert sigbus_of(got, lambda: me.write(va, b"x")) == [(u.BUS_ADRERR, va, 0)]
    # the two allocated ones are fine; a freed page makes the third work
    assert me.read(a, 1) == b"0" and me.read(a + HPAGE, 1) == b"1"
    me.fallocate(fd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 0, HPAGE)
    me.write(va, b"x")
    assert me.read(va, 1) == b"x"


def test_pwrite_einval(host_factory):
    """hugetlbfs has no write_iter: vfs_write returns -EINVAL."""
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, _ = setup(host)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, HPAGE)
    with pytest.raises(OSError) as ei:
        me.pwrite(fd, b"data", 0)
    assert ei.value.errno == errno.EINVAL
    assert me.pread(fd, 4, 0) == b"\0" * 4


def test_punch_hole_whole_huge_pages(host_factory):
    length = 3 * HPAGE
    host, me, _, fd, a = patterned_file(host_factory, 3)
    data = pattern(length)
    assert mi(host, "HugePages_Free") == 5
    me.fallocate(fd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, HPAGE, HPAGE)
    assert mi(host, "HugePages_Free") == 6
    assert me.pread(fd, HPAGE, HPAGE) == b"\0" * HPAGE          # a hole reads zeros
    assert me.pread(fd, HPAGE, 0) == data[:HPAGE]
    assert me.pread(fd, HPAGE, 2 * HPAGE) == data[2 * HPAGE:]
    assert not me.pagemap(a + HPAGE).present                    # unmapped
    assert me.read(a + HPAGE, HPAGE) == b"\0" * HPAGE           # a new, zeroed huge page
    assert mi(host, "HugePages_Free") == 5
    assert me.read(a, 8) == data[:8]
    # the whole file
    me.fallocate(fd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 0, length)
    assert mi(host, "HugePages_Free") == 8
    assert me.pread(fd, length, 0) == b"\0" * length


def test_punch_hole_partial_zeroes(host_factory):
    """fs/hugetlbfs/inode.c hugetlbfs_punch_hole (since 6.2): whole huge pages in the
    range are removed, the partial pieces at either end are zeroed in place
    (hugetlbfs_zero_partial_page)."""
    length = 3 * HPAGE
    host, me, _, fd, a = patterned_file(host_factory, 3)
    data = pattern(length)
    start, end = HPAGE // 2, 2 * HPAGE + PAGE
    me.fallocate(fd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, start, end - start)
    assert mi(host, "HugePages_Free") == 6                # only the middle one went
    want = data[:start] + b"\0" * (end - start) + data[end:]
    assert me.pread(fd, length, 0) == want
    assert me.read(a, length) == want


def test_punch_hole_over_poisoned_page(host_factory):
    """Punching out a poisoned huge page: the range is usable again (a fresh zeroed
    page, never the poisoned one), and the poisoned page does not come back to the
    pool (memory_failure's reference)."""
    host, me, got, fd, a = patterned_file(host_factory, 2, pool=4)
    bad = me.pagemap(a).pfn
    assert poison_ar(me, got, a + PAGE) == [(AR, a + PAGE, 21)]
    assert mi(host, "HugePages_Free") == 2
    me.fallocate(fd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 0, HPAGE)
    assert mi(host, "HugePages_Free") == 2
    assert me.pread(fd, 16, 0) == b"\0" * 16
    assert me.read(a + PAGE, 16) == b"\0" * 16
    assert me.pagemap(a).pfn != bad
    assert mi(host, "HugePages_Free") == 1
