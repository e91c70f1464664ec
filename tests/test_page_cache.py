"""Regular files with a page cache (emu/kernel/ext2.py) and memory_failure() of their
pages, held against Linux 6.18:

- mm/memory-failure.c me_pagecache_clean / me_pagecache_dirty / truncate_error_folio
  (ext2's a_ops->error_remove_folio = generic_error_remove_folio, mm/truncate.c): the
  folio leaves the page cache, "clean LRU page: Recovered" / "dirty LRU page: Recovered";
  a clean page's data is read again from the disk, a dirty page's is lost.
- hwpoison_user_mappings(): a mapped clean page of a mapping that can write back is
  "dropped without side effects" (folio_mkclean finds no dirty PTE, no kill).
- me_pagecache_dirty's mapping_set_error(mapping, -EIO) (include/linux/pagemap.h) and
  lib/errseq.c: fsync (fs/sync.c -> ext2_fsync -> file_write_and_wait_range ->
  file_check_and_advance_wb_err, mm/filemap.c) returns -EIO once per open file that had
  not seen the error, then 0; errseq_sample() at open gives a file opened after an error
  nobody has seen yet that error too.  msync(MS_SYNC) (mm/msync.c) fsyncs through the
  mapping's file.
- mm/memory.c wp_page_shared (vma_wants_writenotify: mapping_can_writeback): a store
  through a shared mapping dirties the folio; writeback write-protects it again.
"""
import pytest
from checks import dmesg_has
from selftest_harness import AO, AR, KPF_HWPOISON, PAGE, QUIET, RW, WAIT, attach, hardware_corrupted

from emu import uapi as u

pytestmark = pytest.mark.both_backends      # conftest: on the Cython core and the reference CPU

KPF_DIRTY = 1 << u.KPF_DIRTY
CREAT_RW = u.O_CREAT | u.O_RDWR


def _pfn(me, addr):
    pm = me.pagemap(addr)
    assert pm.present
    return pm.pfn


def _cached_pfn(h, me, fd, index=0):
    """The page cache page of the file at `index` (emu show's file_pages)."""
    ino = me.fstat(fd)["st_ino"]
    for r in h.file_pages(ino, runs=True)["runs"]:
        if r["index"] <= index < r["index"] + r["count"] and r["pfn"] is not None:
            return r["pfn"] + index - r["index"]
    return None


def _eio(fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


# ------------------------------------------------------------------ read(2) and the disk
def test_clean_page_cache_is_read_again_from_disk(host):
    """A clean page cache page that no one maps (written, fsync'd): memory_failure()
    truncates it, "clean LRU page: Recovered"; the next read(2) brings the data back
    from the disk into a new frame.  (mce-test tinjpage `under io clean`'s pread, the
    point of me_pagecache_clean.)"""
    me, rec = attach(host, "t")
    fd = me.open("/data", CREAT_RW, 0o644)
    assert me.write_fd(fd, b"disk" * 2048) == 8192
    me.fsync(fd)
    pfn = _cached_pfn(host, me, fd)
    assert not host.kpageflags(pfn) & KPF_DIRTY
    assert host.corrupt_pfn(pfn) == 0
    assert dmesg_has(host, "Memory failure: %#x: recovery action for clean LRU page: Recovered" % pfn)
    assert host.kpageflags(pfn) & KPF_HWPOISON
    assert _cached_pfn(host, me, fd) is None                # truncated from the cache
    assert me.pread(fd, 8192, 0) == b"disk" * 2048
    assert _cached_pfn(host, me, fd) not in (None, pfn)
    me.fsync(fd)                                            # a clean page: no error
    assert rec.take() == []


def test_dirty_page_cache_loses_data_and_fsync_reports_eio_once(host):
    """A dirty page (write(2), not synced): "dirty LRU page: Recovered", its data is gone
    (the disk's older bytes come back), fsync -EIO once ("EXT2-fs (..): error:
    ext2_fsync: detected IO error when writing metadata buffers"), then 0.
    (xfstests generic/441's fsync-reports-once contract; tinjpage `file dirty`.)"""
    me, rec = attach(host, "t")
    fd = me.open("/data", CREAT_RW, 0o600)
    me.write_fd(fd, b"old!" * 1024)
    me.fsync(fd)
    assert me.pwrite(fd, b"new!" * 1024, 0) == PAGE
    pfn = _cached_pfn(host, me, fd)
    assert host.kpageflags(pfn) & KPF_DIRTY
    assert host.corrupt_pfn(pfn) == 0
    assert dmesg_has(host, "Memory failure: %#x: recovery action for dirty LRU page: Recovered" % pfn)
    assert me.pread(fd, PAGE, 0) == b"old!" * 1024         # the write is lost
    assert _eio(me.fsync, fd) == u.EIO
    assert dmesg_has(host, "EXT2-fs (emu0): error: ext2_fsync: detected IO error when "
                           "writing metadata buffers")
    me.fsync(fd)                                            # reported once
    me.fdatasync(fd)
    assert rec.take() == []


def test_errseq_each_open_file_sees_the_error_once(host):
    """lib/errseq.c: every file open before the error sees -EIO at its next fsync; a
    file opened after the error but before anyone saw it sees it too (errseq_sample:
    "If nobody has seen this error yet, then we can be the first"); one opened after
    it was seen does not.  A second error is reported again to all.  (xfstests
    generic/441, generic/442: fsync on several fds of one file.)"""
    me, _rec = attach(host, "t")
    a = me.open("/f", CREAT_RW)
    b = me.open("/f", u.O_RDWR)
    me.write_fd(a, b"x" * PAGE)
    assert host.corrupt_pfn(_cached_pfn(host, me, a)) == 0
    c = me.open("/f", u.O_RDONLY)                  # after the error, nobody saw it yet
    assert _eio(me.fsync, a) == u.EIO
    d = me.open("/f", u.O_WRONLY)                  # after a was told
    assert _eio(me.fsync, b) == u.EIO
    assert _eio(me.fsync, c) == u.EIO
    me.fsync(d)
    for fd in (a, b, c, d):
        me.fsync(fd)
    me.pwrite(d, b"y" * PAGE, 0)                   # a second lost page
    assert host.corrupt_pfn(_cached_pfn(host, me, d)) == 0
    for fd in (a, b, c, d):
        assert _eio(me.fdatasync, fd) == u.EIO
        me.fdatasync(fd)


def test_writeback_makes_the_page_clean_and_the_disk_current(host):
    """fsync writes the dirty page to the disk: the page is clean again, and after
    memory_failure() of it the read returns what was written."""
    me, _rec = attach(host, "t")
    fd = me.creat("/w", 0o644)
    me.write_fd(fd, b"synced")
    me.fsync(fd)
    pfn = _cached_pfn(host, me, fd)
    assert not host.kpageflags(pfn) & KPF_DIRTY
    assert host.corrupt_pfn(pfn) == 0
    me.fsync(fd)
    rd = me.open("/w", u.O_RDONLY)
    assert me.read_fd(rd, 100) == b"synced"


# ------------------------------------------------------------------ mapped pages
def test_shared_store_dirties_and_msync_writes_back(host):
    """wp_page_shared: a store through MAP_SHARED dirties the folio (the PTE starts
    read-only, vma_wants_writenotify); msync(MS_SYNC) writes it back (clean) and the
    next store faults and dirties it again; after losing the clean page the data
    comes back from the disk through the mapping."""
    me, rec = attach(host, "t")
    fd = me.open("/m", CREAT_RW)
    me.ftruncate(fd, 2 * PAGE)
    va = me.mmap(0, 2 * PAGE, RW, u.MAP_SHARED, fd, 0)
    assert me.read(va, 4) == bytes(4)
    pfn = _pfn(me, va)
    assert not host.kpageflags(pfn) & KPF_DIRTY
    me.write(va, b"stored")
    assert host.kpageflags(pfn) & KPF_DIRTY
    me.msync(va, 2 * PAGE, u.MS_SYNC)
    assert not host.kpageflags(pfn) & KPF_DIRTY
    assert host.corrupt_pfn(pfn) == 0
    assert dmesg_has(host, "Memory failure: %#x: corrupted page was clean: dropped without "
                           "side effects" % pfn)
    assert dmesg_has(host, "Memory failure: %#x: recovery action for clean LRU page: Recovered" % pfn)
    assert me.read(va, 6) == b"stored"                      # refaulted from the disk
    assert _pfn(me, va) != pfn
    me.write(va + 6, b"!")
    assert host.kpageflags(_pfn(me, va)) & KPF_DIRTY
    assert rec.take() == []
    assert host.check_invariants() == []


def test_dirty_mapped_page_kills_early_and_msync_reports_eio(host):
    """A dirty mapped page: forcekill, so an early-kill process gets BUS_MCEERR_AO at the
    page (collect_procs_file); the PTE becomes a hwpoison entry (AR on access);
    msync(MS_SYNC) of the mapping returns -EIO once (its file's f_wb_err)."""
    me, rec = attach(host, "t")
    me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
    fd = me.open("/d", CREAT_RW)
    me.ftruncate(fd, PAGE)
    va = me.mmap(0, PAGE, RW, u.MAP_SHARED, fd, 0)
    me.close(fd)                                            # the mapping keeps its file
    me.write(va, b"dirty")
    pfn = _pfn(me, va)
    assert host.corrupt_pfn(pfn) == 0
    rec.wait(me, 1, WAIT)
    assert rec.take() == [(AO, va, 12)]
    assert dmesg_has(host, "Memory failure: %#x: recovery action for dirty LRU page: Recovered" % pfn)
    assert me.pagemap(va).swapped
    assert _eio(me.msync, va, PAGE, u.MS_SYNC) == u.EIO
    me.msync(va, PAGE, u.MS_SYNC)
    assert rec.run(me.read, va, 1) == ("jump", (AR, va, 12))


# ------------------------------------------------------------------ upstream ports
def _fixture(host):
    me, rec = attach(host, "selftest")
    return me, rec


@pytest.mark.parametrize("variant", ["madv_hard", "madv_soft"])
@pytest.mark.parametrize("dirty", [False, True], ids=["clean_pagecache", "dirty_pagecache"])
def test_selftest_memory_failure_pagecache(host, variant, dirty):
    """tools/testing/selftests/mm/memory-failure.c TEST_F(memory_failure, clean_pagecache)
    and (dirty_pagecache), variants madv_hard and madv_soft: prepare_file (open
    O_RDWR|O_CREAT 0664, unlink, ftruncate), skip if fstatfs says tmpfs, MAP_SHARED,
    memset 0xce, fsync (clean_pagecache only), inject, FORCE_READ.  check():
    MADV_HARD_CLEAN, MADV_SOFT_*: no SIGBUS, same content on a new pfn;
    MADV_HARD_DIRTY: SIGBUS BUS_MCEERR_AR at the page, lsb 12, a hwpoison entry.
    HardwareCorrupted + 4 kB and KPF_HWPOISON; cleanup() unpoisons."""
    me, rec = _fixture(host)
    fd = me.open("./%s-page-cache-test-file" % ("dirty" if dirty else "clean"), CREAT_RW, 0o664)
    me.unlink("./%s-page-cache-test-file" % ("dirty" if dirty else "clean"))
    me.ftruncate(fd, PAGE)
    assert me.fstatfs(fd)["f_type"] not in (0, u.TMPFS_MAGIC)     # not skipped
    addr = me.mmap(0, PAGE, RW, u.MAP_SHARED, fd, 0)
    me.write(addr, b"\xce" * PAGE)
    if not dirty:
        me.fsync(fd)
    pfn = _pfn(me, addr)
    hc0 = hardware_corrupted(host)
    advice = u.MADV_HWPOISON if variant == "madv_hard" else u.MADV_SOFT_OFFLINE

    def body():
        me.madvise(addr, PAGE, advice)
        me.read(addr, 1)

    how, info = rec.run(body)
    if variant == "madv_hard" and dirty:
        assert (how, info) == ("jump", (AR, addr, 12))
        assert me.pagemap(addr).swapped
    else:
        assert how == "ok"
        assert me.read(addr, PAGE) == b"\xce" * PAGE
        assert _pfn(me, addr) != pfn
    assert hardware_corrupted(host) == hc0 + 4
    assert host.kpageflags(pfn) & KPF_HWPOISON
    assert host.unpoison_pfn(pfn) == 0                      # cleanup()
    assert not host.kpageflags(pfn) & KPF_HWPOISON
    assert hardware_corrupted(host) == hc0
    me.munmap(addr, PAGE)
    me.close(fd)
    assert rec.take() == []


@pytest.mark.parametrize("kernel", ["6.18", "pre-6.11"])
@pytest.mark.parametrize("mode", ["late", "early"])
def test_tinjpage_file_clean(host_factory, mode, kernel):
    """mce-test tinjpage.c `file clean` (do_file_clean(0)): open O_RDWR|O_TRUNC|O_CREAT,
    write 4 bytes, MAP_SHARED RW, fsync, close; testmem(MREAD_OK), a read (the page is
    read again from the disk), testmem(MWRITE_OK).  A clean page: no signal at all,
    in either loop and on either kernel (hwpoison_user_mappings: no kill)."""
    h = host_factory(madvise_action_required=kernel == "6.18")
    me, rec = attach(h, "tinjpage")
    h.sysctl("vm.memory_failure_early_kill", 1 if mode == "early" else 0)
    fd = me.open("./~test0", u.O_RDWR | u.O_TRUNC | u.O_CREAT)
    me.write_fd(fd, b"./~t")
    page = me.mmap(0, PAGE, RW, u.MAP_SHARED, fd, 0)
    me.fsync(fd)
    me.close(fd)
    assert rec.run(me.madvise, page, PAGE, u.MADV_HWPOISON) == ("ok", None)   # MREAD_OK
    assert rec.run(me.read, page, 1) == ("ok", b".")
    assert me.read(page, 4) == b"./~t"                                      # reread from disk
    assert rec.run(me.madvise, page, PAGE, u.MADV_HWPOISON) == ("ok", None)   # MWRITE_OK
    assert rec.run(me.write, page, b"\x04") == ("ok", None)
    me.idle(QUIET)
    assert rec.take() == []


@pytest.mark.parametrize("kernel", ["6.18", "pre-6.11"])
@pytest.mark.parametrize("mode", ["late", "early"])
def test_tinjpage_file_dirty(host_factory, mode, kernel):
    """mce-test tinjpage.c `file dirty` (do_file_dirty(0)): playfile (5 pages written,
    not synced, lseek 0), MAP_SHARED|MAP_POPULATE PROT_READ; testmem(MREAD): pre-6.11
    late: nothing at injection, AR at the read; early: AO at injection; 6.18: AR at
    injection (MF_ACTION_REQUIRED).  expecterr(msync(MS_SYNC)): -EIO.  Reopened
    O_RDONLY, populated and faulted mappings read fine (the page comes from the disk).
    Reopened O_RDWR: read and write succeed and fsync is 0 (tinjpage's optionalerr:
    "the earlier close has eaten the error": msync saw it)."""
    h = host_factory(madvise_action_required=kernel == "6.18")
    me, rec = attach(h, "tinjpage")
    early = mode == "early"
    h.sysctl("vm.memory_failure_early_kill", 1 if early else 0)
    fn = "./~poison0"
    fd = me.open(fn, u.O_CREAT | u.O_RDWR | u.O_TRUNC, 0o600)
    me.write_fd(fd, bytes(i & 0xFF for i in range(5 * PAGE)))
    assert me.lseek(fd, 0, u.SEEK_SET) == 0
    page = me.mmap(0, PAGE, u.PROT_READ, u.MAP_SHARED | u.MAP_POPULATE, fd, 0)
    got = rec.run(me.madvise, page, PAGE, u.MADV_HWPOISON)
    if kernel == "6.18":
        assert got == ("jump", (AR, page, 12))
    elif early:
        assert got == ("jump", (AO, page, 12))
    else:
        assert got == ("ok", None)
    assert rec.run(me.read, page, 1) == ("jump", (AR, page, 12))          # recover(MREAD)
    assert _eio(me.msync, page, PAGE, u.MS_SYNC) == u.EIO               # expecterr
    me.close(fd)
    me.munmap(page, PAGE)
    for flags in (u.MAP_SHARED | u.MAP_POPULATE, u.MAP_SHARED):          # populated, fault
        fd = me.open(fn, u.O_RDONLY)
        page = me.mmap(0, PAGE, u.PROT_READ, flags, fd, 0)
        assert rec.run(me.read, page, 1)[0] == "ok"                      # MREAD_OK
        me.close(fd)
        me.munmap(page, PAGE)
    fd = me.open(fn, u.O_RDWR)
    assert len(me.read_fd(fd, 128)) == 128
    assert me.write_fd(fd, b"foobar") == 6
    me.fsync(fd)
    me.close(fd)
    me.unlink(fn)
    assert rec.take() == []


@pytest.mark.parametrize("kernel", ["6.18", "pre-6.11"])
def test_tinjpage_file_hole(host_factory, kernel):
    """mce-test tinjpage.c `file hole`: tempfd (created, unlinked), ftruncate(PS),
    MAP_SHARED RW, *page = 1 (a page of a hole, dirtied through the mapping),
    testmem(MREAD) (late loop: AR at injection on 6.18, else at the read); then
    fsync and msync, optional errors upstream ("hole error reporting doesn't work"):
    on 6.18 fsync reports -EIO (me_pagecache_dirty's mapping_set_error) and msync,
    through the same file, then sees nothing."""
    h = host_factory(madvise_action_required=kernel == "6.18")
    me, rec = attach(h, "tinjpage")
    h.sysctl("vm.memory_failure_early_kill", 0)
    fd = me.open("./~poison0", u.O_CREAT | u.O_RDWR, 0o600)
    me.unlink("./~poison0")
    me.ftruncate(fd, PAGE)
    page = me.mmap(0, PAGE, RW, u.MAP_SHARED, fd, 0)
    me.write(page, b"\x01")
    got = rec.run(me.madvise, page, PAGE, u.MADV_HWPOISON)
    assert got == (("jump", (AR, page, 12)) if kernel == "6.18" else ("ok", None))
    assert rec.run(me.read, page, 1) == ("jump", (AR, page, 12))
    assert _eio(me.fsync, fd) == u.EIO
    me.msync(page, PAGE, u.MS_SYNC)
    me.close(fd)
    assert rec.take() == []


def test_soft_offline_invalidates_a_clean_unmapped_page(host):
    """soft_offline_in_use_page(): a clean page cache folio nobody maps is dropped
    (mapping_evict_folio, "Soft offline: %#lx: invalidated") rather than migrated; the
    data is read again from the disk.  A dirty one is migrated with its data."""
    me, rec = attach(host, "t")
    fd = me.open("/so", CREAT_RW)
    me.write_fd(fd, b"clean" + bytes(PAGE - 5) + b"dirty")
    me.fsync(fd)
    me.pwrite(fd, b"DIRTY", PAGE)
    clean, dirty = _cached_pfn(host, me, fd, 0), _cached_pfn(host, me, fd, 1)
    assert host.soft_offline_page(clean << 12) == 0
    assert dmesg_has(host, "Soft offline: %#x: invalidated" % clean)
    assert host.soft_offline_page(dirty << 12) == 0
    assert _cached_pfn(host, me, fd, 1) not in (None, dirty)
    assert host.kpageflags(clean) & KPF_HWPOISON and host.kpageflags(dirty) & KPF_HWPOISON
    assert me.pread(fd, 5, 0) == b"clean" and me.pread(fd, 5, PAGE) == b"DIRTY"
    me.fsync(fd)                                            # nothing was lost
    assert rec.take() == []


def test_o_sync_write_is_on_disk_when_write_returns(host):
    """generic_write_sync(): a write(2) on an O_SYNC (or O_DSYNC) file is written back
    before it returns, so the page is clean and losing it loses nothing; a writeback
    error found there is the write's error (-EIO), reported once."""
    me, _rec = attach(host, "t")
    fd = me.open("/sync", CREAT_RW | u.O_SYNC)
    assert me.write_fd(fd, b"durable") == 7
    pfn = _cached_pfn(host, me, fd)
    assert not host.kpageflags(pfn) & KPF_DIRTY
    assert host.corrupt_pfn(pfn) == 0
    assert me.pread(fd, 7, 0) == b"durable"
    plain = me.open("/sync", u.O_RDWR)
    me.pwrite(plain, b"lost", PAGE)
    assert host.corrupt_pfn(_cached_pfn(host, me, plain, 1)) == 0
    assert _eio(me.write_fd, fd, b"!") == u.EIO
    assert me.write_fd(fd, b"?") == 1
