"""Ports of mce-test (andikleen/mce-test, cases/function/hwpoison/ and tsrc/):
tinjpage.c, tprctl.c, and thugetlb.c as run by run-huge-test.sh.

These programs were written before Linux 6.11, when madvise(MADV_HWPOISON) did not
pass MF_ACTION_REQUIRED: the caller was treated like any other process mapping the
page (AO at injection if it is an early-kill process, else nothing until it touches
the page).  Since 6.11 the caller is `current` of an action-required failure and
gets BUS_MCEERR_AR at injection whatever its policy, which tinjpage's handler takes
for an access fault and tprctl reports as "late mode set, but early kill".  Each
port therefore runs under both: "pre-6.11" (the emulator's madvise_action_required
= False, what the programs assert) and "6.18" (what the kernel does now).

Of run-huge-test.sh's 42 thugetlb cases, the 36 file (-f) and anonymous (-A) ones,
shared (-F) and private (-Fp, -Fpc), are test_thugetlb; the SysV shm cases (tinjpage
`ipv shared`, `shared memory hugepage`, the 6 thugetlb -S) are in tests/test_sysv_shm.py,
tinjpage's disk file cases in tests/test_page_cache.py.  The cases not ported
(tinjpage `nonlinear` and the `--sniper` ones) and the setups that differ (a memfd for a hugetlbfs
file, the huge page pool, a pipe for thugetlb's semaphore) are listed in
docs/deviations.md, "Upstream test suites: cases not ported".
"""
import signal
import struct
import time
from types import SimpleNamespace

import pytest
from selftest_harness import (
    AO,
    AR,
    HPAGE,
    MADVISE,
    PAGE,
    QUIET,
    RW,
    WAIT,
    Pipe,
    attach,
    dmesg_has,
    hardware_corrupted,
)

import emu
from emu import uapi as u

SIGBUS = signal.SIGBUS


def host_for(host_factory, kernel, huge=False):
    """kernel: "6.18" / "pre-6.11" madvise, or "mce-inject" (the SRAO injector, whose
    memory_failure(pfn, 0) has no MF_ACTION_REQUIRED either way)."""
    kw = {"madvise_action_required": MADVISE.get(kernel, True)}
    if huge:
        kw.update(ram="128M", hugepages={"2M": 2})
    return host_factory(**kw)


# =================================================================== tprctl.c
def _tprctl_test(me, rec, early):
    """tprctl.c test(early): a MAP_PRIVATE|MAP_ANONYMOUS|MAP_POPULATE page, injection,
    seq++, then *ptr = 1.  -> (seq when the handler jumped, siginfo)."""
    ptr = me.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_POPULATE)
    seq = [0]

    def body():
        me.madvise(ptr, PAGE, u.MADV_HWPOISON)            # early kill should kill here
        seq[0] += 1
        me.write(ptr, b"\x01")                            # late kill should kill here

    how, info = rec.run(body)
    assert how == "jump", "no SIGBUS at all"
    return ptr, seq[0], info


@pytest.mark.parametrize("kernel", list(MADVISE))
def test_tprctl(host_factory, kernel):
    """tsrc/tprctl.c main(): PR_MCE_KILL_GET starts at DEFAULT; with LATE the SIGBUS
    comes at the access (seq 1), with EARLY at the injection (seq 0); GET returns
    EARLY; CLEAR makes it DEFAULT again.  pre-6.11: as tprctl asserts (AR at the
    write, AO at the injection).  6.18: AR at the injection in both modes, so tprctl
    itself fails there ("late mode set, but early kill")."""
    h = host_for(host_factory, kernel)
    me, rec = attach(h, name="tprctl")
    assert me.prctl(u.PR_MCE_KILL_GET) == u.PR_MCE_KILL_DEFAULT
    assert me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_LATE) == 0
    late = _tprctl_test(me, rec, False)
    assert me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY) == 0
    early = _tprctl_test(me, rec, True)
    assert me.prctl(u.PR_MCE_KILL_GET) == u.PR_MCE_KILL_EARLY
    assert me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_CLEAR, 0) == 0
    assert me.prctl(u.PR_MCE_KILL_GET) == u.PR_MCE_KILL_DEFAULT

    (lptr, lseq, linfo), (eptr, eseq, einfo) = late, early
    if kernel == "pre-6.11":
        assert (lseq, linfo) == (1, (AR, lptr, 12))
        assert (eseq, einfo) == (0, (AO, eptr, 12))
    else:
        assert (lseq, linfo) == (0, (AR, lptr, 12))
        assert (eseq, einfo) == (0, (AR, eptr, 12))
    assert rec.take() == []


# =================================================================== tinjpage.c
class Case:
    """A tinjpage test case: the page it maps (and dirties), the si_addr_lsb the
    handler expects (ilog2(PS) or ilog2(HPS)), and what it does afterwards."""

    huge = False
    lsb = 12

    def __init__(self, me):
        self.me = me

    def after(self):
        pass


class DirtyAnonymous(Case):
    """dirty_anonymous(): MAP_PRIVATE|MAP_ANONYMOUS|MAP_POPULATE (populated for write)."""

    def map(self):
        self.page = self.me.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_POPULATE)
        return self.page


class DirtyAnonymousUnmap(DirtyAnonymous):
    """dirty_anonymous_unmap(): the same, then munmap_reserve(): munmap and a PROT_NONE
    MAP_FIXED mapping in its place."""

    def after(self):
        self.me.munmap(self.page, PAGE)
        assert self.me.mmap(self.page, PAGE, u.PROT_NONE,
                            u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_FIXED) == self.page


class MlockedAnonymous(Case):
    """mlocked_anonymous(): MAP_PRIVATE|MAP_ANONYMOUS|MAP_LOCKED (populated for write
    and mlocked at mmap; the hwpoison unmap munlocks it, so memory_failure() reports a
    "dirty LRU page", as 6.18 does)."""

    def map(self):
        self.page = self.me.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_LOCKED)
        return self.page


class FileBackedHugepage(Case):
    """file_backed_hugepage(): alloc_filebacked_hugepage(HPS, private=0), a MAP_SHARED
    hugetlbfs file (memfd_create(MFD_HUGETLB) is a file of the same file system),
    prefaulted with page[0] = 'a' (no ftruncate: the writable mapping extends i_size,
    see test_alloc_filebacked_hugepage_prefault)."""

    huge = True
    lsb = 21

    def map(self):
        self.fd = self.me.memfd_create("test0", u.MFD_HUGETLB)
        self.page = self.me.mmap(0, HPAGE, RW, u.MAP_SHARED, self.fd, 0)
        self.me.write(self.page, b"a")                      # prefault
        return self.page

    def after(self):
        self.me.munmap(self.page, HPAGE)
        self.me.close(self.fd)


class AnonymousHugepage(Case):
    """anonymous_hugepage(): alloc_anonymous_hugepage(HPS, private=1), i.e.
    MAP_PRIVATE|MAP_ANONYMOUS|MAP_HUGETLB, prefaulted with page[0] = 'a'; the poisoned
    anonymous huge page is dissolved (me_huge_page), the write after it meets the
    huge hwpoison entry."""

    huge = True
    lsb = 21

    def map(self):
        self.page = self.me.mmap(0, HPAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_HUGETLB)
        self.me.write(self.page, b"a")                      # prefault
        return self.page

    def after(self):
        self.me.munmap(self.page, HPAGE)


CASES = {"dirty_anonymous": DirtyAnonymous, "dirty_anonymous_unmap": DirtyAnonymousUnmap,
         "mlocked_anonymous": MlockedAnonymous, "file_backed_hugepage": FileBackedHugepage,
         "anonymous_hugepage": AnonymousHugepage}
INJECTORS = ["6.18", "pre-6.11", "mce-inject"]


def _expected_at_injection(kernel, early, case):
    if kernel == "6.18":
        return "jump", (AR, case.page, case.lsb)             # MF_ACTION_REQUIRED: current
    if early:
        return "jump", (AO, case.page, case.lsb)
    return "ok", None


def _mce_inject(me, h, page, wait):
    """inject_mce_inject(): an SRAO machine check ("UNCORRECTED SRAO 0xc0") for the
    page's pfn; memory_failure(pfn, 0) runs outside the process, its AO arrives
    asynchronously."""
    assert h.hw_detect(me.pagemap(page).pfn) == 0
    end = time.monotonic() + wait
    while time.monotonic() < end:
        me.idle(0.05)


@pytest.mark.parametrize("kernel", INJECTORS)
@pytest.mark.parametrize("mode", ["late", "early"])
@pytest.mark.parametrize("case", list(CASES))
def test_tinjpage(host_factory, case, mode, kernel):
    """tinjpage.c: one case of the late kill loop (vm.memory_failure_early_kill=0) or of
    the early kill loop (=1), with the SA_SIGINFO handler; testmem(MWRITE) is
    poison() then recover() with `*page = 2`.  The handler checks si_addr == page
    (and reports lsb != ilog2(PS or HPS) as LATER; the port asserts it).
    pre-6.11 madvise or --mce-inject: late: nothing at injection, AR at the write;
    early: AO at injection ("recovered"), then AR at the write.  6.18 madvise: AR
    at injection in both loops (tinjpage's handler would siglongjmp to a stale
    recover_ctx), then AR at the write."""
    early = mode == "early"
    c = CASES[case]
    h = host_for(host_factory, kernel, huge=c.huge)
    me, rec = attach(h, name="tinjpage")
    h.sysctl("vm.memory_failure_early_kill", 1 if early else 0)
    tc = c(me)
    page = tc.map()
    hc0 = hardware_corrupted(h)

    if kernel == "mce-inject":
        got = rec.run(_mce_inject, me, h, page, WAIT if early else QUIET)
    else:
        got = rec.run(me.madvise, page, PAGE, u.MADV_HWPOISON)     # inject_madvise
    assert got[0] == _expected_at_injection(kernel, early, tc)[0]
    assert got[1] == _expected_at_injection(kernel, early, tc)[1]
    assert rec.run(me.write, page, b"\x02") == ("jump", (AR, page, tc.lsb))
    assert hardware_corrupted(h) == hc0 + 4
    tc.after()
    if kernel == "mce-inject":
        me.idle(QUIET)                                  # nothing else comes asynchronously
    assert rec.take() == []


def _inject_then_write(task, kernel, progress, req, ack, page):
    """The suicide loops' body: poison the page (madvise, or ask the parent for an
    mce-inject SRAO), then write it; progress marks how far the task got."""
    progress.put(b"i")
    if kernel == "mce-inject":
        req.put(struct.pack("<Q", task.pagemap(page).pfn))
        ack.get(task)
    else:
        task.madvise(page, PAGE, u.MADV_HWPOISON)
    progress.put(b"I")
    task.write(page, b"\x02")
    progress.put(b"A")


def _suicide_child(task, case, kernel, progress, req, ack):
    """tinjpage.c "suicide version": signal(SIGBUS, SIG_DFL), then the case."""
    emu.sigaction(SIGBUS, signal.SIG_DFL)
    tc = CASES[case](task)
    page = tc.map()
    _inject_then_write(task, kernel, progress, req, ack, page)
    tc.after()
    return "didn't kill itself?"


@pytest.mark.parametrize("kernel", INJECTORS)
@pytest.mark.parametrize("case", list(CASES))
def test_tinjpage_suicide(host_factory, case, kernel):
    """tinjpage.c "suicide version" (after the late loop, so early kill is 0): each
    case in a forked child with SIGBUS at SIG_DFL; none of these cases is
    survivable, so waitid must report CLD_KILLED by SIGBUS.  pre-6.11 or mce-inject:
    the child survives the injection and dies at the write; 6.18: it dies in
    madvise (a forced AR)."""
    c = CASES[case]
    h = host_for(host_factory, kernel, huge=c.huge)
    me, _rec = attach(h, name="tinjpage")
    h.sysctl("vm.memory_failure_early_kill", 0)
    progress, req, ack = Pipe(), Pipe(), Pipe()
    ch = me.fork(_suicide_child, case, kernel, progress, req, ack, name="tinjpage-child")
    if kernel == "mce-inject":
        pfn = struct.unpack("<Q", req.get_bytes(8))[0]
        assert h.hw_detect(pfn) == 0
        ack.put(b"x")
    assert ch.join(30) == -SIGBUS
    assert progress.drain() == (b"i" if kernel == "6.18" else b"iI")


# ------------------------------------------------------------------- mmap shared
# do_shared's late and suicide loops have no semaphore: the parent's memset(shared_page,
# 'a', 3) after fork races the child's poison, and a C parent wins it (the child has to
# start first).  An emulated fork starts a process, so either may win; the loser's
# write would meet the poison outside any recover() context (tinjpage's handler would
# see an unexpected SIGBUS; here the handler returns and the write re-faults for ever).
# PARENT_WRITES_FIRST: the ports make the C parent's win certain: the child waits for
# the parent's write.


def _shared_child(task, rec, kernel, early, go, req, ack, page):
    """do_shared(MMAP_SHARED), the child: memset(shared_page, 'a', 3); in early kill
    get_semaphore (wait for the parent); testmem(MWRITE): poison() then recover()
    (`*page = 2`); _exit(failure).  -> (what injection did, what the write did,
    signals left over)."""
    task.write(page, b"aaa")
    assert go.get(task) == b"g"      # early: get_semaphore; late: PARENT_WRITES_FIRST
    if kernel == "mce-inject":
        def inject():
            req.put(struct.pack("<Q", task.pagemap(page).pfn))
            ack.get(task)
            end = time.monotonic() + (WAIT if early else QUIET)
            while time.monotonic() < end:
                task.idle(0.05)
        at_inject = rec.run(inject)
    else:
        at_inject = rec.run(task.madvise, page, PAGE, u.MADV_HWPOISON)
    at_write = rec.run(task.write, page, b"\x02")
    return at_inject, at_write, rec.take()


def _serve_mce_inject(h, req, ack):
    """The test's side of the child's inject_mce_inject(): the SRAO for its pfn."""
    pfn = struct.unpack("<Q", req.get_bytes(8))[0]
    assert h.hw_detect(pfn) == 0
    ack.put(b"x")


@pytest.mark.parametrize("kernel", INJECTORS)
@pytest.mark.parametrize("mode", ["late", "early"])
def test_tinjpage_mmap_shared(host_factory, mode, kernel):
    """tinjpage.c `mmap shared` (do_shared(MMAP_SHARED)): a MAP_SHARED|MAP_ANONYMOUS|
    MAP_POPULATE page (shmem, mm/shmem.c shmem_zero_setup) shared with a fork
    child; the child poisons it and writes it (testmem(MWRITE)).
    Late kill loop: the child survives through its handler and exits 0 (the parent
    asserts CLD_EXITED), then the parent's write gets AR at the same address.
    Early kill loop: the parent holds a semaphore, forks, releases it and sleeps(10)
    waiting for the AO that the child's injection sends it (the parent maps the
    page and is early kill); the child exits 0.  The child sees what
    test_tinjpage's dirty_anonymous does: 6.18 madvise: AR at injection (current,
    MF_ACTION_REQUIRED), pre-6.11 madvise / mce-inject: AO at injection when early,
    nothing when late; then AR at the write.  si_addr is the page, si_addr_lsb 12."""
    early = mode == "early"
    h = host_for(host_factory, kernel)
    me, rec = attach(h, name="tinjpage")
    h.sysctl("vm.memory_failure_early_kill", 1 if early else 0)
    page = me.mmap(0, PAGE, RW, u.MAP_SHARED | u.MAP_ANONYMOUS | u.MAP_POPULATE)
    hc0 = hardware_corrupted(h)
    go, req, ack = Pipe(), Pipe(), Pipe()
    ch = me.fork(_shared_child, rec, kernel, early, go, req, ack, page, name="tinjpage-child")
    me.write(page, b"aaa")
    if not early:
        go.put(b"g")                                     # PARENT_WRITES_FIRST

    if early:
        def wait_for_sigbus():
            go.put(b"g")                                 # put_semaphore
            if kernel == "mce-inject":
                _serve_mce_inject(h, req, ack)
            end = time.monotonic() + 10                  # sleep(10)
            while time.monotonic() < end:
                me.idle(0.05)
            return "timeout: child process does not send signal"
        assert rec.run(wait_for_sigbus) == ("jump", (AO, page, 12))
    elif kernel == "mce-inject":
        _serve_mce_inject(h, req, ack)
    assert ch.join(30) == 0                              # CLD_EXITED
    at_inject, at_write, left = ch.result
    assert at_inject == _expected_at_injection(kernel, early, SimpleNamespace(page=page, lsb=12))
    assert at_write == ("jump", (AR, page, 12))
    assert left == []
    if not early:                                        # recover("... (parent)", MWRITE)
        assert rec.run(me.write, page, b"\x02") == ("jump", (AR, page, 12))
    assert hardware_corrupted(h) == hc0 + 4
    me.munmap(page, PAGE)                                # munmap_reserve()
    assert me.mmap(page, PAGE, u.PROT_NONE,
                   u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_FIXED) == page
    if kernel == "mce-inject":
        me.idle(QUIET)
    assert rec.take() == []


def _shared_grandchild(task, kernel, progress, req, ack, go, page):
    """do_shared's child in the suicide loop: SIGBUS is SIG_DFL (inherited)."""
    task.write(page, b"aaa")
    assert go.get(task) == b"g"                  # PARENT_WRITES_FIRST
    _inject_then_write(task, kernel, progress, req, ack, page)
    return 0


def _shared_suicide_child(task, kernel, progress, req, ack):
    """tinjpage.c "suicide version" of `mmap shared`: signal(SIGBUS, SIG_DFL), then
    do_shared(MMAP_SHARED) with early_kill 0: fork, waitid (the handler is SIG_DFL,
    so the child must be CLD_KILLED), then recover(): the write to the shared page."""
    emu.sigaction(SIGBUS, signal.SIG_DFL)
    page = task.mmap(0, PAGE, RW, u.MAP_SHARED | u.MAP_ANONYMOUS | u.MAP_POPULATE)
    go = Pipe()
    gc = task.fork(_shared_grandchild, kernel, progress, req, ack, go, page, name="tinjpage-gchild")
    task.write(page, b"aaa")
    go.put(b"g")
    progress.put(b"k" if gc.join(30) == -SIGBUS else b"e")
    task.write(page, b"\x02")
    progress.put(b"W")
    return "didn't kill itself?"


@pytest.mark.parametrize("kernel", INJECTORS)
def test_tinjpage_mmap_shared_suicide(host_factory, kernel):
    """tinjpage.c `mmap shared` in the suicide loop: do_shared's child dies of SIGBUS
    (6.18: the forced AR in madvise; pre-6.11 / mce-inject: the AR at its write),
    the parent (the suicide child) sees CLD_KILLED, then dies of the AR at its own
    write to the shared page: waitid reports CLD_KILLED by SIGBUS."""
    h = host_for(host_factory, kernel)
    me, _rec = attach(h, name="tinjpage")
    h.sysctl("vm.memory_failure_early_kill", 0)
    progress, req, ack = Pipe(), Pipe(), Pipe()
    ch = me.fork(_shared_suicide_child, kernel, progress, req, ack, name="tinjpage-child")
    if kernel == "mce-inject":
        _serve_mce_inject(h, req, ack)
    assert ch.join(30) == -SIGBUS
    assert progress.drain() == (b"ik" if kernel == "6.18" else b"iIk")


def test_alloc_filebacked_hugepage_prefault(host_factory):
    """hugepage.h alloc_filebacked_hugepage() opens a new hugetlbfs file and maps it
    MAP_SHARED without ftruncate; tinjpage and thugetlb then write to it.
    fs/hugetlbfs/inode.c hugetlbfs_file_mmap: `if (vma->vm_flags & VM_WRITE &&
    inode->i_size < len) i_size_write(inode, len);`, so the write faults in a huge
    page (no SIGBUS) and the file is HPS long."""
    h = host_for(host_factory, "6.18", huge=True)
    me, rec = attach(h, name="tinjpage")
    fd = me.memfd_create("test0", u.MFD_HUGETLB)
    page = me.mmap(0, HPAGE, RW, u.MAP_SHARED, fd, 0)
    assert rec.run(me.write, page, b"a") == ("ok", None)
    assert len(me.pread(fd, 2 * HPAGE, 0)) == HPAGE


# =================================================================== thugetlb.c / run-huge-test.sh
def _write_hugepage(task, addr, nr, avoid):
    """hugepage.h write_hugepage(): byte j of huge page i is 'a' + (i + j) % 26,
    skipping the huge page at avoid_addr."""
    for i in range(nr):
        if addr + i * HPAGE == avoid:
            continue
        task.write(addr + i * HPAGE, _hugepage_data(i))


def _read_hugepage(task, addr, nr, avoid):
    for i in range(nr):
        if addr + i * HPAGE == avoid:
            continue
        assert task.read(addr + i * HPAGE, HPAGE) == _hugepage_data(i), "Mismatch"


def _hugepage_data(i):
    return bytes(ord("a") + (i + j) % 26 for j in range(26)) * (HPAGE // 26) \
        + bytes(ord("a") + (i + j) % 26 for j in range(HPAGE % 26))


def _thugetlb_child(task, ready, madvised, progress, cow_addr=None):
    """The fork child: with -c, write_hugepage and read_hugepage first (its own copies
    of the private huge pages), then put_semaphore (ready), wait until the parent's
    madvise is done (or the parent died: the semaphore's SEM_UNDO, here EOF), exit 0."""
    madvised.close_write()
    if cow_addr is not None:
        _write_hugepage(task, cow_addr, 2, None)
        _read_hugepage(task, cow_addr, 2, None)
    ready.put(b"r")
    madvised.get(task)
    progress.put(b"c")
    return 0


def _alloc_file(task, size, private, progress):
    """hugepage.h alloc_filebacked_hugepage(path, size, private, &fd): open(O_CREAT|O_RDWR)
    of a new hugetlbfs file, mmap MAP_SHARED or MAP_PRIVATE; free_filebacked_hugepage:
    munmap, close (and unlink)."""
    fd = task.memfd_create("test1", u.MFD_HUGETLB)
    addr = task.mmap(0, size, RW, u.MAP_PRIVATE if private else u.MAP_SHARED, fd, 0)

    def free():
        task.munmap(addr, size)
        task.close(fd)
    return addr, free


def _alloc_anonymous(task, size, private, progress):
    """hugepage.h alloc_anonymous_hugepage(size, private): MAP_ANONYMOUS|MAP_HUGETLB with
    MAP_PRIVATE or MAP_SHARED; free_anonymous_hugepage: munmap."""
    flags = u.MAP_ANONYMOUS | u.MAP_HUGETLB | (u.MAP_PRIVATE if private else u.MAP_SHARED)
    addr = task.mmap(0, size, RW, flags, -1, 0)
    return addr, lambda: task.munmap(addr, size)


def _alloc_shm(task, size, private, progress):
    """hugepage.h alloc_shm_hugepage(&key, size): shmget(key, size, SHM_HUGETLB|IPC_CREAT|
    SHM_R|SHM_W), shmat(id, 0, 0); free_shm_hugepage: shmdt, IPC_RMID.  The id goes to
    `progress` first ("<id> "): the test removes a segment a killed thugetlb left."""
    sid = task.shmget(u.IPC_PRIVATE, size, u.SHM_HUGETLB | u.IPC_CREAT | u.SHM_R | u.SHM_W)
    addr = task.shmat(sid, 0, 0)
    progress.put(b"%d " % sid)

    def free():
        task.shmdt(addr)
        task.shmctl(sid, u.IPC_RMID)
    return addr, free


THUGETLB_ALLOC = {"file": _alloc_file, "anonymous": _alloc_anonymous, "shm": _alloc_shm}


def _thugetlb(task, corrupt_page, ptype, mapping, share, ready, madvised, progress):
    """thugetlb -x -m 2 -o <corrupt_page> [-e|-a] <-f n|-A|-S> <-F|-Fp|-Fpc> <dir>
    (run-huge-test.sh's exec_testcase): main() from the allocation to cleanout."""
    emu.sigaction(SIGBUS, signal.SIG_DFL)                # no handler in thugetlb
    file_size = 2
    addr, free = THUGETLB_ALLOC[mapping](task, file_size * HPAGE, share != "fork_shared",
                                         progress)
    expected = addr + corrupt_page // 512 * HPAGE if ptype == "late_avoid" else None
    _write_hugepage(task, addr, file_size, None)
    _read_hugepage(task, addr, file_size, None)
    if ptype == "early":
        task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
    cow = addr if share == "fork_private_cow" else None
    child = task.fork(_thugetlb_child, ready, madvised, progress, cow, name="thugetlb-child")
    assert ready.get(task) == b"r"                       # wait for COW
    progress.put(b"m")
    task.madvise(addr + corrupt_page * PAGE, PAGE, u.MADV_HWPOISON)
    progress.put(b"M")
    madvised.put(b"x")
    _write_hugepage(task, addr, file_size, expected)
    _read_hugepage(task, addr, file_size, expected)
    progress.put(b"W")
    code = child.join(30)                                # wait(&i)
    free()
    return code


def run_thugetlb(me, mapping, share, target, ptype) -> tuple:
    """exec_testcase 2 1 <target> <ptype> <mapping> <share>: thugetlb in a child of
    the script `me`; -> (its exit code, the child's status, the progress bytes)."""
    corrupt = 1 * 512 + (0 if target == "head" else 1)
    ready, madvised, progress = Pipe(), Pipe(), Pipe()
    parent = me.fork(_thugetlb, corrupt, ptype, mapping, share, ready, madvised, progress,
                     name="thugetlb")
    madvised.close_write()                   # the parent and the child hold the others
    code = parent.join(60)
    return code, parent.result, progress.drain()


def check_thugetlb(h, kernel, share, ptype, code, result, out) -> None:
    """What the kernel does with thugetlb (the script checks nothing):
    pre-6.11: early: thugetlb dies of the AO in madvise; late_touch: it dies at its
    write to the poisoned huge page (the whole 2 MB is gone); late_avoid: it skips
    that huge page, everything else reads back, it and its child exit 0.
    6.18: thugetlb dies of the forced AR in madvise in all three.
    The child (which inherits PR_MCE_KILL_EARLY) dies of an AO only when early and it
    still maps the poisoned folio: always with fork_shared and fork_private_nocow
    (the folio fork shares write-protected), never with fork_private_cow (its write
    copied both huge pages before the injection)."""
    early = ptype == "early"
    if kernel == "6.18" or early:
        assert code == -SIGBUS
        assert out.replace(b"c", b"") == b"m"
    elif ptype == "late_touch":
        assert code == -SIGBUS
        assert out.replace(b"c", b"") == b"mM"
    else:
        assert code == 0 and result == 0                 # the child's status too
        assert out.replace(b"c", b"") == b"mMW"
    child_killed = early and share != "fork_private_cow"
    assert (b"c" in out) == (not child_killed)
    assert dmesg_has(h, "Sending SIGBUS to thugetlb-child:") == child_killed
    assert dmesg_has(h, ": recovery action for huge page: Recovered")


THUGETLB_POOL = 6            # run-huge-test.sh: nr_hugepages 1000; -pc needs 2 + 2 + 1


def _huge_pool(h) -> tuple:
    m = h.meminfo()
    return m["HugePages_Total"], m["HugePages_Free"], m["HugePages_Rsvd"]


@pytest.mark.parametrize("kernel", list(MADVISE))
@pytest.mark.parametrize("ptype", ["early", "late_touch", "late_avoid"])
@pytest.mark.parametrize("target", ["head", "tail"])
@pytest.mark.parametrize("share", ["fork_shared", "fork_private_nocow", "fork_private_cow"])
@pytest.mark.parametrize("mapping", ["file", "anonymous"])
def test_thugetlb(host_factory, mapping, share, target, ptype, kernel):
    """run-huge-test.sh `exec_testcase 2 1 <head|tail> <early|late_touch|late_avoid>
    <"file"|"anonymous"> <"fork_shared"|"fork_private_nocow"|"fork_private_cow">`:
    thugetlb maps 2 huge pages (-f: a hugetlbfs file; -A: MAP_ANONYMOUS|MAP_HUGETLB;
    -p: MAP_PRIVATE, else MAP_SHARED), writes and checks them, forks a child (-c: the
    child writes and checks them too, copying them), and MADV_HWPOISONs page 512
    (head) or 513 (tail), in the second huge page; SIGBUS is at SIG_DFL.  Outcomes:
    check_thugetlb.  The page: a shared mapping's is a page-cache folio, kept poisoned
    (me_huge_page: "The page is kept in page cache") when the file goes; a private
    mapping's is an anonymous folio (hugetlb_no_page without a page-cache folio, also
    for -f -p), unmapped from every process that maps it, freed and dissolved
    (HugePages_Total - 1).  Either way every other huge page goes back to the pool."""
    h = host_factory(ram="128M", hugepages={"2M": THUGETLB_POOL},
                     madvise_action_required=MADVISE[kernel])
    me = emu.attach(h, name="run-huge-test")
    check_thugetlb(h, kernel, share, ptype, *run_thugetlb(me, mapping, share, target, ptype))
    n = THUGETLB_POOL
    if share == "fork_shared":
        assert _huge_pool(h) == (n, n - 1, 0)
    else:
        assert _huge_pool(h) == (n - 1, n - 1, 0)
    assert h.check_invariants() == []
