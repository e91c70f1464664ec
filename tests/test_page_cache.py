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

Ports: selftests/mm/memory-failure.c clean_pagecache / dirty_pagecache, and mce-test
tinjpage.c's disk file cases (`file clean`, `file dirty`, `file hole`, `file clean
mlocked`, `file dirty mlocked`) in its late, early and suicide loops.  Not ported
(`nonlinear`, the `--sniper` cases): docs/deviations.md, "Upstream test suites: cases
not ported".
"""
import signal

import pytest
from checks import dmesg_has
from selftest_harness import (
    AO,
    AR,
    KPF_HWPOISON,
    PAGE,
    QUIET,
    RW,
    WAIT,
    Pipe,
    attach,
    hardware_corrupted,
)

import emu
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


# ------------------------------------------------------------------ mce-test tinjpage.c
# The disk file cases of tinjpage.c (TMPDIR "./", an ext2 file here), as the program
# runs them: once in the late kill loop (vm.memory_failure_early_kill=0, the
# SA_SIGINFO handler), once in the "suicide version" (each case in a forked child
# with SIGBUS at SIG_DFL; waitid must say CLD_EXITED for a survivable case, else
# CLD_KILLED by SIGBUS) and once in the early kill loop (=1).  One flow per case,
# played through tinjpage's poison()/recover()/testmem() of the loop (Tinjpage or
# Suicide).  Like the other tinjpage ports (tests/test_mce_test.py), each runs with
# madvise as before 6.11 (no MF_ACTION_REQUIRED: what tinjpage asserts) and as in 6.18.
MREAD, MWRITE, MREAD_OK, MWRITE_OK = 0, 1, 2, 3          # enum rmode
KPF_MLOCKED = 1 << u.KPF_MLOCKED


class Tinjpage:
    """poison()/recover() of the late or early kill loop, asserting what the handler
    sees.  MREAD/MWRITE: pre-6.11 madvise: AO at injection in the early loop,
    nothing in the late one; 6.18: AR at injection (MF_ACTION_REQUIRED: current)
    in both; then AR at the access.  MREAD_OK/MWRITE_OK: no signal anywhere.
    si_addr is the page, si_addr_lsb 12."""

    def __init__(self, me, rec, kernel, early):
        self.me, self.rec, self.kernel, self.early = me, rec, kernel, early

    def poison(self, page, mode):
        got = self.rec.run(self.me.madvise, page, PAGE, u.MADV_HWPOISON)
        if mode in (MREAD_OK, MWRITE_OK) or (self.kernel != "6.18" and not self.early):
            assert got == ("ok", None)
        elif self.kernel == "6.18":
            assert got == ("jump", (AR, page, 12))
        else:
            assert got == ("jump", (AO, page, 12))                 # "recovered"

    def recover(self, page, mode):
        if mode in (MREAD, MREAD_OK):
            got = self.rec.run(self.me.read, page, 1)
        else:
            got = self.rec.run(self.me.write, page, b"\x02" if mode == MWRITE else b"\x04")
        if mode in (MREAD_OK, MWRITE_OK):
            assert got[0] == "ok"                                  # not "killed"
        else:
            assert got == ("jump", (AR, page, 12))

    def testmem(self, page, mode):
        self.poison(page, mode)
        self.recover(page, mode)

    def ok(self, fn, *args):
        """An access tinjpage does outside recover(): no signal may come."""
        how, res = self.rec.run(fn, *args)
        assert how == "ok"
        return res


class Suicide(Tinjpage):
    """The suicide loop's child: no handler, a SIGBUS kills.  progress marks how far
    it got: i (injecting), I (injected), A (accessed)."""

    def __init__(self, me, progress):
        self.me, self.progress = me, progress

    def poison(self, page, mode):
        self.progress.put(b"i")
        self.me.madvise(page, PAGE, u.MADV_HWPOISON)
        self.progress.put(b"I")

    def recover(self, page, mode):
        if mode in (MREAD, MREAD_OK):
            self.me.read(page, 1)
        else:
            self.me.write(page, b"\x02" if mode == MWRITE else b"\x04")
        self.progress.put(b"A")

    def ok(self, fn, *args):
        return fn(*args)


def do_file_clean(me, t, flags):
    """do_file_clean(flags): open O_RDWR|O_TRUNC|O_CREAT 0664, write 4 bytes (of the
    name), MAP_SHARED RW (|MAP_LOCKED: `file clean mlocked`), fsync, close;
    testmem(MREAD_OK), a read ("reread page from disk"), testmem(MWRITE_OK).  A clean
    page of a mapping that can write back: "dropped without side effects", no kill
    (hwpoison_user_mappings), the data comes back from the disk."""
    fd = me.open("./~test0", u.O_RDWR | u.O_TRUNC | u.O_CREAT, 0o664)
    me.write_fd(fd, b"./~t")
    page = me.mmap(0, PAGE, RW, u.MAP_SHARED | flags, fd, 0)
    me.fsync(fd)
    me.close(fd)
    t.testmem(page, MREAD_OK)
    assert t.ok(me.read, page, 4) == b"./~t"                    # reread page from disk
    t.testmem(page, MWRITE_OK)


def do_file_dirty(me, t, flags):
    """do_file_dirty(flags): playfile (5 pages written, not synced, lseek 0),
    MAP_SHARED|MAP_POPULATE PROT_READ (|MAP_LOCKED: `file dirty mlocked`);
    testmem(MREAD); expecterr(msync(MS_SYNC)): -EIO.  Reopened O_RDONLY, populated
    and faulted mappings read fine (recover MREAD_OK: the page comes from the
    disk).  Reopened O_RDWR: read and write succeed and fsync is 0 (tinjpage's
    optionalerr: "the earlier close has eaten the error": msync saw it)."""
    fn = "./~poison0"
    fd = me.open(fn, u.O_CREAT | u.O_RDWR | u.O_TRUNC, 0o600)
    me.write_fd(fd, bytes(i & 0xFF for i in range(5 * PAGE)))
    assert me.lseek(fd, 0, u.SEEK_SET) == 0
    page = me.mmap(0, PAGE, u.PROT_READ, u.MAP_SHARED | u.MAP_POPULATE | flags, fd, 0)
    t.testmem(page, MREAD)
    assert _eio(me.msync, page, PAGE, u.MS_SYNC) == u.EIO               # expecterr
    me.close(fd)
    me.munmap(page, PAGE)
    for populate in (u.MAP_POPULATE, 0):                                # populated, fault
        fd = me.open(fn, u.O_RDONLY)
        page = me.mmap(0, PAGE, u.PROT_READ, u.MAP_SHARED | populate | flags, fd, 0)
        t.recover(page, MREAD_OK)
        me.close(fd)
        me.munmap(page, PAGE)
    fd = me.open(fn, u.O_RDWR)
    assert len(me.read_fd(fd, 128)) == 128
    assert me.write_fd(fd, b"foobar") == 6
    me.fsync(fd)
    me.close(fd)
    me.unlink(fn)


def file_hole(me, t, flags=0):
    """file_hole(): tempfd (created, unlinked), ftruncate(PS), MAP_SHARED RW,
    *page = 1 (a page of a hole, dirtied through the mapping), testmem(MREAD); then
    fsync and msync, optional errors upstream ("hole error reporting doesn't work"):
    fsync reports -EIO (me_pagecache_dirty's mapping_set_error) and msync, through
    the same file, then sees nothing."""
    fd = me.open("./~poison0", u.O_CREAT | u.O_RDWR, 0o600)
    me.unlink("./~poison0")
    me.ftruncate(fd, PAGE)
    page = me.mmap(0, PAGE, RW, u.MAP_SHARED, fd, 0)
    me.write(page, b"\x01")
    t.testmem(page, MREAD)
    assert _eio(me.fsync, fd) == u.EIO
    me.msync(page, PAGE, u.MS_SYNC)
    me.close(fd)


# cases[]: the flow, its flags, survivable
FILE_CASES = {"file clean": (do_file_clean, 0, True),
              "file dirty": (do_file_dirty, 0, False),
              "file hole": (file_hole, 0, False),
              "file clean mlocked": (do_file_clean, u.MAP_LOCKED, True),
              "file dirty mlocked": (do_file_dirty, u.MAP_LOCKED, False)}


def _injected(h) -> list[int]:
    """The pfns madvise(MADV_HWPOISON) poisoned, in order (madvise_inject_error's
    "Injecting memory failure for pfn %#lx at process virtual address %#lx")."""
    return [int(line.split(" for pfn ")[1].split()[0], 16) for line in h.dmesg()
            if "Injecting memory failure for pfn " in line]


def _tinjpage_loop(host_factory, case, mode, kernel):
    """One case of the late or early kill loop: -> (host, pfns poisoned)."""
    h = host_factory(madvise_action_required=kernel == "6.18")
    me, rec = attach(h, "tinjpage")
    h.sysctl("vm.memory_failure_early_kill", 1 if mode == "early" else 0)
    flow, flags, _survivable = FILE_CASES[case]
    t = Tinjpage(me, rec, kernel, mode == "early")
    flow(me, t, flags)
    me.idle(QUIET)
    assert rec.take() == []
    return h, _injected(h)


@pytest.mark.parametrize("kernel", ["6.18", "pre-6.11"])
@pytest.mark.parametrize("mode", ["late", "early"])
@pytest.mark.parametrize("case", ["file clean", "file clean mlocked"])
def test_tinjpage_file_clean(host_factory, case, mode, kernel):
    """mce-test tinjpage.c `file clean` and `file clean mlocked` (do_file_clean(0) /
    (MAP_LOCKED)) in the late and early kill loops: no signal at all, on either
    kernel.  Each poisoned page was "dropped without side effects" and is a "clean
    LRU page: Recovered"; MAP_LOCKED populated and mlocked the page, the hwpoison
    unmap munlocked it (folio_remove_rmap -> munlock_vma_folio, drained by
    try_to_unmap_one's mlock_drain_local and hwpoison_user_mappings' shake_folio),
    so identify_page_state's first look at the flags finds an LRU page, not a
    "clean mlocked LRU page"."""
    h, pfns = _tinjpage_loop(host_factory, case, mode, kernel)
    assert len(pfns) == 2
    for pfn in pfns:
        assert dmesg_has(h, "Memory failure: %#x: corrupted page was clean: dropped without "
                            "side effects" % pfn)
        assert dmesg_has(h, "Memory failure: %#x: recovery action for clean LRU page: "
                            "Recovered" % pfn)
        assert not h.kpageflags(pfn) & KPF_MLOCKED
    assert not dmesg_has(h, "mlocked LRU page")


@pytest.mark.parametrize("kernel", ["6.18", "pre-6.11"])
@pytest.mark.parametrize("mode", ["late", "early"])
@pytest.mark.parametrize("case", ["file dirty", "file dirty mlocked"])
def test_tinjpage_file_dirty(host_factory, case, mode, kernel):
    """mce-test tinjpage.c `file dirty` and `file dirty mlocked` (do_file_dirty(0) /
    (MAP_LOCKED)) in the late and early kill loops: testmem(MREAD): pre-6.11 late:
    nothing at injection, AR at the read; early: AO at injection; 6.18: AR at
    injection; then msync -EIO.  The page is a "dirty LRU page: Recovered" (the
    mlocked one munlocked by its unmap, as in test_tinjpage_file_clean)."""
    h, (pfn,) = _tinjpage_loop(host_factory, case, mode, kernel)
    assert dmesg_has(h, "Memory failure: %#x: recovery action for dirty LRU page: Recovered" % pfn)
    assert not h.kpageflags(pfn) & KPF_MLOCKED


@pytest.mark.parametrize("kernel", ["6.18", "pre-6.11"])
@pytest.mark.parametrize("mode", ["late", "early"])
def test_tinjpage_file_hole(host_factory, mode, kernel):
    """mce-test tinjpage.c `file hole` in the late and early kill loops: as `file
    dirty` (AR at injection on 6.18; pre-6.11 AO at injection when early, nothing
    when late; AR at the read), then fsync -EIO and msync 0 (file_hole)."""
    h, (pfn,) = _tinjpage_loop(host_factory, "file hole", mode, kernel)
    assert dmesg_has(h, "Memory failure: %#x: recovery action for dirty LRU page: Recovered" % pfn)


def _suicide_child(task, case, progress):
    """tinjpage.c "suicide version": signal(SIGBUS, SIG_DFL), the case, then
    _exit(2) if it is survivable, else "didn't kill itself?" and _exit(1)."""
    emu.sigaction(signal.SIGBUS, signal.SIG_DFL)
    flow, flags, survivable = FILE_CASES[case]
    flow(task, Suicide(task, progress), flags)
    if survivable:
        raise SystemExit(2)
    return "didn't kill itself?"


@pytest.mark.parametrize("kernel", ["6.18", "pre-6.11"])
@pytest.mark.parametrize("case", list(FILE_CASES))
def test_tinjpage_file_suicide(host_factory, case, kernel):
    """mce-test tinjpage.c "suicide version" (after the late loop: early kill 0) of
    `file clean`, `file dirty`, `file hole`, `file clean mlocked` and `file dirty
    mlocked`: each in a forked child with SIGBUS at SIG_DFL.  The clean ones are
    survivable (cases[].survivable = 1): no signal, the child exits 2 (CLD_EXITED).
    The others must be CLD_KILLED by SIGBUS: pre-6.11 at the read after the
    injection (testmem(MREAD)), 6.18 in madvise (the forced AR)."""
    h = host_factory(madvise_action_required=kernel == "6.18")
    me, _rec = attach(h, "tinjpage")
    h.sysctl("vm.memory_failure_early_kill", 0)
    progress = Pipe()
    ch = me.fork(_suicide_child, case, progress, name="tinjpage-child")
    code = ch.join(30)
    out = progress.drain()
    if FILE_CASES[case][2]:
        assert (code, out) == (2, b"iIAiIA")
    else:
        assert (code, out) == (-signal.SIGBUS, b"i" if kernel == "6.18" else b"iI")


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
