"""System V shared memory (ipc/shm.c): shmget, shmat, shmdt, shmctl, and memory
failure on segment pages, as mce-test's tinjpage (`ipv shared`) and thugetlb (-S)
and LTP's shmget/shmat/shmdt/shmctl tests use them.

Each test names the upstream case it enables; all need Task.shmget and friends,
which did not exist before (AttributeError)."""
import signal
import time

import pytest
from checks import raises_errno
from selftest_harness import AO, AR, HPAGE, PAGE, QUIET, WAIT, Pipe, attach, dmesg_has

import emu
from emu import uapi as u

RW = u.PROT_READ | u.PROT_WRITE
SIGBUS = signal.SIGBUS


def _host(host_factory, huge=False, **kw):
    kw.setdefault("policy", "v6.18")
    if huge:
        kw.update(ram="128M", hugepages={"2M": 2})
    return host_factory(**kw)


def _huge(h) -> dict:
    return {k: v for k, v in h.meminfo().items() if k.startswith("HugePages_")}


# ------------------------------------------------------------------ shmget
def test_shmget_errors_and_ids(host_factory):
    """LTP shmget02 (EINVAL size 0 and > SHMMAX, EEXIST, ENOENT, EINVAL for an
    existing segment smaller than size), shmget03 (ENOSPC past kernel.shmmni), and
    ipc/util.c ipc_idr_alloc: ids are seq << 15 | idx, idx cyclic from 0.  Bad input
    creates nothing (/proc/sysvipc/shm shows only what succeeded)."""
    import errno

    h = _host(host_factory)
    me = emu.attach(h, name="shmget02")
    key = 0x5eed
    raises_errno(errno.EINVAL, me.shmget, key, 0, u.IPC_CREAT | 0o600)
    raises_errno(errno.EINVAL, me.shmget, key, (1 << 64) - (1 << 24), u.IPC_CREAT | 0o600)
    raises_errno(errno.ENOENT, me.shmget, key, PAGE, 0o600)
    assert me.shmget(key, PAGE, u.IPC_CREAT | u.IPC_EXCL | 0o600) == 0
    raises_errno(errno.EEXIST, me.shmget, key, PAGE, u.IPC_CREAT | u.IPC_EXCL | 0o600)
    assert me.shmget(key, PAGE, u.IPC_CREAT | 0o600) == 0          # the same segment
    assert me.shmget(key, 0, 0) == 0                               # size 0 finds it
    raises_errno(errno.EINVAL, me.shmget, key, 2 * PAGE, 0o600)    # shm_more_checks
    assert me.shmget(u.IPC_PRIVATE, PAGE, 0o600) == 1              # IPC_PRIVATE: always new
    assert me.shmget(u.IPC_PRIVATE, PAGE, u.IPC_CREAT | u.IPC_EXCL) == 2
    raises_errno(errno.EINVAL, me.shmget, u.IPC_PRIVATE, PAGE, u.SHM_HUGETLB | (12 << 26))
    h.write_file("/proc/sys/kernel/shmmni", "3")
    assert h.read_file("/proc/sys/kernel/shmmni") == "3\n"
    raises_errno(errno.ENOSPC, me.shmget, u.IPC_PRIVATE, PAGE, 0o600)
    me.shmctl(1, u.IPC_RMID)
    assert me.shmget(u.IPC_PRIVATE, PAGE, 0o600) == 3              # cyclic: not idx 1 again
    lines = h.read_file("/proc/sysvipc/shm").splitlines()
    assert lines[0].split()[:4] == ["key", "shmid", "perms", "size"]
    rows = [ln.split() for ln in lines[1:]]
    assert [(int(r[0]), int(r[1]), r[2], int(r[3])) for r in rows] == [
        (key, 0, "600", PAGE), (0, 2, "0", PAGE), (0, 3, "600", PAGE)]


def test_shmget_hugetlb_reserves(host_factory):
    """mce-test thugetlb -S (hugepage.h alloc_shm_hugepage: shmget(key, size,
    SHM_HUGETLB|IPC_CREAT|SHM_R|SHM_W), shmat(id, 0, 0), free_shm_hugepage: shmdt
    then IPC_RMID); LTP hugeshmget02 (ENOMEM past the pool).  hugetlb_file_setup
    rounds the size up to the huge page and reserves it (HugePages_Rsvd); a fault
    takes a reserved page; the last detach after IPC_RMID gives everything back."""
    import errno

    h = _host(host_factory, huge=True)
    me = emu.attach(h, name="thugetlb")
    flags = u.SHM_HUGETLB | u.IPC_CREAT | u.SHM_R | u.SHM_W
    raises_errno(errno.ENOMEM, me.shmget, u.IPC_PRIVATE, 3 * HPAGE, flags)
    raises_errno(errno.ENOMEM, me.shmget, u.IPC_PRIVATE, HPAGE, flags | u.SHM_HUGE_1GB)
    assert _huge(h) == {"HugePages_Total": 2, "HugePages_Free": 2, "HugePages_Rsvd": 0,
                        "HugePages_Surp": 0}
    sid = me.shmget(u.IPC_PRIVATE, HPAGE + 1, flags | u.SHM_HUGE_2MB)
    assert _huge(h)["HugePages_Rsvd"] == 2 and _huge(h)["HugePages_Free"] == 2
    raises_errno(errno.ENOMEM, me.shmget, u.IPC_PRIVATE, PAGE, flags)   # all promised
    assert me.shmctl(sid, u.IPC_STAT)["shm_segsz"] == HPAGE + 1
    addr = me.shmat(sid, 0, 0)
    assert addr % HPAGE == 0
    raises_errno(errno.EINVAL, me.shmat, sid, addr + PAGE, u.SHM_REMAP)  # not huge-aligned
    me.write(addr, b"a" * 64)
    me.write(addr + HPAGE + 5, b"b")                                # the whole 4 MB is mapped
    assert _huge(h)["HugePages_Rsvd"] == 0 and _huge(h)["HugePages_Free"] == 0
    assert me.pagemap(addr).present
    assert me.shmdt(addr) == 0
    assert _huge(h)["HugePages_Free"] == 0                          # the segment keeps its pages
    assert me.shmctl(sid, u.IPC_RMID) == 0
    assert _huge(h) == {"HugePages_Total": 2, "HugePages_Free": 2, "HugePages_Rsvd": 0,
                        "HugePages_Surp": 0}
    sid = me.shmget(u.IPC_PRIVATE, HPAGE, flags | u.SHM_NORESERVE)
    assert _huge(h)["HugePages_Rsvd"] == 0
    me.shmctl(sid, u.IPC_RMID)
    assert h.check_invariants() == []


# ------------------------------------------------------------------ shmat / shmdt
def test_shmat_shmdt_errors(host_factory):
    """LTP shmat01 (SHM_RND rounds down to SHMLBA, SHM_RDONLY maps read-only,
    SHM_REMAP replaces a mapping), shmat02 (EINVAL: a bad id, an unaligned address
    without SHM_RND), shmdt02 (EINVAL when nothing is attached there), and
    do_shmat's EINVAL for a mapped range without SHM_REMAP or SHM_REMAP without an
    address."""
    import errno

    h = _host(host_factory)
    me = emu.attach(h, name="shmat01")
    sid = me.shmget(u.IPC_PRIVATE, 3 * PAGE, 0o600)
    raises_errno(errno.EINVAL, me.shmat, -1, 0, 0)
    raises_errno(errno.EINVAL, me.shmat, sid + 1, 0, 0)
    raises_errno(errno.EINVAL, me.shmat, sid + (1 << 15), 0, 0)      # another sequence
    raises_errno(errno.EINVAL, me.shmat, sid, 0, u.SHM_REMAP)
    base = me.mmap(0, 8 * PAGE, u.PROT_NONE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    raises_errno(errno.EINVAL, me.shmat, sid, base + 8 * PAGE + 1, 0)
    raises_errno(errno.EINVAL, me.shmat, sid, base, 0)               # mapped, no SHM_REMAP
    assert me.shmat(sid, base + 2 * PAGE + 123, u.SHM_RND | u.SHM_REMAP) == base + 2 * PAGE
    ro = me.shmat(sid, 0, u.SHM_RDONLY)
    maps = {m["start"]: m for m in h.status()["processes"][0]["maps"]}
    assert maps[base + 2 * PAGE]["prot"] == RW and maps[base + 2 * PAGE]["shared"]
    assert maps[ro]["prot"] == u.PROT_READ and maps[ro]["end"] - ro == 3 * PAGE
    me.write(base + 2 * PAGE, b"shared")
    assert me.read(ro, 6) == b"shared"
    assert me.shmctl(sid, u.IPC_STAT)["shm_nattch"] == 2
    raises_errno(errno.EINVAL, me.shmdt, ro + 1)
    raises_errno(errno.EINVAL, me.shmdt, ro + PAGE)                  # no attach starts there
    raises_errno(errno.EINVAL, me.shmdt, base)                       # an anonymous mapping
    assert me.shmdt(ro) == 0
    raises_errno(errno.EINVAL, me.shmdt, ro)
    assert me.shmctl(sid, u.IPC_STAT)["shm_nattch"] == 1
    me.munmap(base + 3 * PAGE, PAGE)          # a hole: the attach is two VMAs (vm_ops->open)
    assert me.shmctl(sid, u.IPC_STAT)["shm_nattch"] == 2
    assert me.shmdt(base + 2 * PAGE) == 0     # both fragments of the attach go
    assert me.shmctl(sid, u.IPC_STAT)["shm_nattch"] == 0


# ------------------------------------------------------------------ attach counts and lifetime
def _fork_child(task, go, done, addr):
    """The fork child: its inherited attach counts; it detaches, then exits."""
    assert go.get(task) == b"1"
    assert task.read(addr, 5) == b"hello"
    task.shmdt(addr)
    done.put(b"d")
    assert go.get(task) == b"2"
    return 0


def test_fork_attach_count(host_factory):
    """LTP shmctl01 (shm_nattch, shm_cpid, shm_lpid after a fork child attaches and
    detaches): fork copies the attach (shm_open from vm_ops->open, nattch + 1),
    shmdt and exit each drop one (shm_close)."""
    h = _host(host_factory)
    me = emu.attach(h, name="shmctl01")
    sid = me.shmget(0x1001, PAGE, u.IPC_CREAT | 0o600)
    addr = me.shmat(sid)
    me.write(addr, b"hello")
    st = me.shmctl(sid, u.IPC_STAT)
    assert (st["shm_nattch"], st["shm_cpid"], st["shm_lpid"]) == (1, me.tgid, me.tgid)
    assert st["shm_atime"] >= st["shm_ctime"] and st["shm_dtime"] == 0
    go, done = Pipe(), Pipe()
    ch = me.fork(_fork_child, go, done, addr, name="shmctl01-child")
    assert me.shmctl(sid, u.IPC_STAT)["shm_nattch"] == 2
    go.put(b"1")
    assert done.get(me) == b"d"
    st = me.shmctl(sid, u.IPC_STAT)
    assert (st["shm_nattch"], st["shm_lpid"]) == (1, ch.tid) and st["shm_dtime"] > 0
    go.put(b"2")
    assert ch.join(30) == 0
    assert me.shmctl(sid, u.IPC_STAT)["shm_nattch"] == 1
    ch2 = me.fork(lambda task: 0, name="shmctl01-child2")
    assert ch2.join(30) == 0                                        # exit detaches
    st = me.shmctl(sid, u.IPC_STAT)
    assert (st["shm_nattch"], st["shm_lpid"]) == (1, ch2.tid)


def _creator(task, key):
    """Creates a segment, attaches it, writes, and exits without IPC_RMID."""
    sid = task.shmget(key, 2 * PAGE, u.IPC_CREAT | 0o666)
    addr = task.shmat(sid)
    task.write(addr + PAGE, b"left behind")
    return sid


def test_ipc_rmid_lifecycle(host_factory):
    """LTP shmctl02/shmat01 IPC_RMID semantics: a segment outlives the process that
    made it (no shm_rmid_forced); IPC_RMID of an attached segment sets SHM_DEST and
    makes its key private (shmget of the key: ENOENT) while it stays mapped and
    attachable by id (Linux only); the last detach destroys it (IPC_STAT: EINVAL)
    and its memory returns (MemFree)."""
    import errno

    h = _host(host_factory)
    me = emu.attach(h, name="shmctl02")
    free0 = h.meminfo()["MemFree"]
    ch = me.fork(_creator, 0x2002, name="creator")
    assert ch.join(30) == 0
    sid = ch.result
    assert me.shmget(0x2002, 0, 0) == sid
    st = me.shmctl(sid, u.IPC_STAT)
    assert st["shm_nattch"] == 0 and st["shm_cpid"] == ch.tid
    assert h.meminfo()["MemFree"] == free0 - 4                     # one page in the segment
    addr = me.shmat(sid)
    assert me.read(addr + PAGE, 11) == b"left behind"
    assert me.shmctl(sid, u.IPC_RMID) == 0
    st = me.shmctl(sid, u.IPC_STAT)
    assert st["shm_perm"]["mode"] == u.SHM_DEST | 0o666 and st["shm_perm"]["key"] == u.IPC_PRIVATE
    raises_errno(errno.ENOENT, me.shmget, 0x2002, 0, 0)
    again = me.shmat(sid)                                           # still attachable by id
    me.write(again, b"x")
    assert me.read(addr, 1) == b"x"
    assert me.shmctl(sid, u.IPC_STAT)["shm_nattch"] == 2
    me.shmdt(again)
    assert me.read(addr + PAGE, 11) == b"left behind"               # still there
    me.shmdt(addr)
    raises_errno(errno.EINVAL, me.shmctl, sid, u.IPC_STAT)
    raises_errno(errno.EINVAL, me.shmat, sid, 0, 0)
    deadline = time.monotonic() + WAIT
    while h.meminfo()["MemFree"] != free0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert h.meminfo()["MemFree"] == free0
    assert me.shmget(0x2002, PAGE, u.IPC_CREAT | u.IPC_EXCL | 0o600) >= 0   # the key is free
    assert h.check_invariants() == []


# ------------------------------------------------------------------ memory failure
def _ipv_child(task, sid, go, early):
    """tinjpage do_shared(IPV_SHARED), the child: shmat, memset 'a', (early: wait for
    the parent's semaphore), testmem("ipv shared page", MWRITE): madvise then write;
    shmdt; _exit.  -> (its address, its pfn, what injection did, what the write did)."""
    from selftest_harness import SigJmp

    rec = SigJmp()
    emu.sigaction(SIGBUS, rec)
    page = task.shmat(sid, 0, 0)
    task.write(page, b"aaa")
    pfn = task.pagemap(page).pfn
    # early: the semaphore; late: tinjpage has none, and its parent's shmat+memset win
    # the race with the child's poison in practice; an emulated fork may lose it (the
    # parent's write would then meet the poison outside recover() and re-fault for ever)
    assert go.get(task) == b"g"
    at_inject = rec.run(task.madvise, page, PAGE, u.MADV_HWPOISON)
    at_write = rec.run(task.write, page, b"\x02")
    task.shmdt(page)
    return page, pfn, at_inject, at_write


@pytest.mark.parametrize("mode", ["late", "early"])
def test_tinjpage_ipv_shared(host_factory, mode):
    """mce-test tinjpage.c `ipv shared` (do_shared(IPV_SHARED)), as the program
    expects it (pre-6.11 madvise, no MF_ACTION_REQUIRED): shmget(IPC_PRIVATE, PS,
    0666|IPC_CREAT), fork, both shmat(id, NULL, 0) and memset; the child poisons the
    page and writes it.  A shmem page: "dirty LRU page: Recovered", unmapped from
    both.  Early kill: the parent gets BUS_MCEERR_AO at its own address of the page
    while it sleeps; late: its write after the child exited gets BUS_MCEERR_AR.  The
    child: AO at injection when early, then AR at its write; si_addr_lsb 12."""
    early = mode == "early"
    h = _host(host_factory, madvise_action_required=False)
    me, rec = attach(h, name="tinjpage")
    h.sysctl("vm.memory_failure_early_kill", 1 if early else 0)
    sid = me.shmget(u.IPC_PRIVATE, PAGE, 0o666 | u.IPC_CREAT)
    go = Pipe()
    ch = me.fork(_ipv_child, sid, go, early, name="tinjpage-child")
    page = me.shmat(sid, 0, 0)
    me.write(page, b"aaa")
    if not early:
        go.put(b"g")                                # the parent wrote first (_ipv_child)
    if early:
        def wait_for_sigbus():
            go.put(b"g")
            end = time.monotonic() + 10
            while time.monotonic() < end:
                me.idle(0.05)
            return "timeout: child process does not send signal"
        assert rec.run(wait_for_sigbus) == ("jump", (AO, page, 12))
    assert ch.join(30) == 0
    cpage, pfn, at_inject, at_write = ch.result
    assert at_inject == (("jump", (AO, cpage, 12)) if early else ("ok", None))
    assert at_write == ("jump", (AR, cpage, 12))
    assert dmesg_has(h, "Memory failure: %#x: recovery action for dirty LRU page: Recovered" % pfn)
    if not early:
        assert rec.run(me.write, page, b"\x02") == ("jump", (AR, page, 12))
    assert me.shmctl(sid, u.IPC_STAT)["shm_nattch"] == 1
    me.shmdt(page)
    assert me.shmctl(sid, u.IPC_RMID) == 0
    me.idle(QUIET)
    assert rec.take() == []


def _early_mapper(task, ready, addr):
    """A fork child that inherited the SHM_HUGETLB attach, PR_MCE_KILL_EARLY: waits
    for the AO memory_failure sends to early-kill mappers."""
    from selftest_harness import SigJmp

    rec = SigJmp()
    emu.sigaction(SIGBUS, rec)
    task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
    ready.put(b"r")
    rec.wait(task, 1, timeout=10)
    return rec.take()


def test_thugetlb_shm_poison(host_factory):
    """mce-test thugetlb -x -S -F -e (run-huge-test.sh's "shm" cases): a SHM_HUGETLB
    segment of two huge pages, written through, a fork child attached and early
    kill; an error in a tail page of the second huge page (debugfs corrupt-pfn,
    memory_failure without MF_ACTION_REQUIRED): "huge page: Recovered", the child
    gets BUS_MCEERR_AO (si_addr_lsb 21), the late parent nothing until it touches
    the huge page: BUS_MCEERR_AR at the address it touched, lsb 21; the first huge
    page still reads back."""
    h = _host(host_factory, huge=True)
    me, rec = attach(h, name="thugetlb")
    sid = me.shmget(u.IPC_PRIVATE, 2 * HPAGE, u.SHM_HUGETLB | u.IPC_CREAT | u.SHM_R | u.SHM_W)
    addr = me.shmat(sid, 0, 0)
    me.write(addr, b"a" * 4096)
    me.write(addr + HPAGE, b"b" * 4096)
    ready = Pipe()
    ch = me.fork(_early_mapper, ready, addr, name="thugetlb-child")
    assert ready.get(me) == b"r"
    assert me.shmctl(sid, u.IPC_STAT)["shm_nattch"] == 2
    head = me.pagemap(addr + HPAGE).pfn
    assert h.corrupt_pfn(head + 1) == 0
    assert ch.join(30) == 0
    got = ch.result
    assert len(got) == 1 and got[0][0] == AO and got[0][2] == 21
    assert addr + HPAGE <= got[0][1] < addr + 2 * HPAGE
    assert dmesg_has(h, "Memory failure: %#x: recovery action for huge page: Recovered" % (head + 1))
    assert rec.take() == []                                         # late: nothing yet
    assert rec.run(me.read, addr + HPAGE + 8, 8) == ("jump", (AR, addr + HPAGE + 8, 21))
    assert me.read(addr, 4) == b"aaaa"
    me.shmdt(addr)
    me.shmctl(sid, u.IPC_RMID)
    assert _huge(h)["HugePages_Rsvd"] == 0


def test_shm_lock_unevictable(host_factory):
    """LTP shmctl04/shmctl05-style SHM_LOCK: shmem_lock() makes the segment's mapping
    unevictable, so pages it gets from then on sit on the unevictable LRU
    (KPF_UNEVICTABLE) and memory_failure reports a "dirty unevictable LRU page";
    SHM_UNLOCK moves them back; shm_perm.mode shows SHM_LOCKED meanwhile."""
    h = _host(host_factory)
    me = emu.attach(h, name="shmctl04")
    sid = me.shmget(u.IPC_PRIVATE, 2 * PAGE, 0o600)
    addr = me.shmat(sid)
    assert me.shmctl(sid, u.SHM_LOCK) == 0
    assert me.shmctl(sid, u.IPC_STAT)["shm_perm"]["mode"] == u.SHM_LOCKED | 0o600
    me.write(addr, b"locked")
    me.write(addr + PAGE, b"locked too")
    pfn, pfn2 = me.pagemap(addr).pfn, me.pagemap(addr + PAGE).pfn
    assert h.kpageflags(pfn) & (1 << u.KPF_UNEVICTABLE)
    assert h.corrupt_pfn(pfn) == 0
    assert dmesg_has(h, "Memory failure: %#x: recovery action for dirty unevictable LRU page: "
                        "Recovered" % pfn)
    me.mlock(addr + PAGE, PAGE)
    me.munlock(addr + PAGE, PAGE)            # __munlock_folio: the mapping is still unevictable
    assert h.kpageflags(pfn2) & (1 << u.KPF_UNEVICTABLE)
    assert me.shmctl(sid, u.SHM_UNLOCK) == 0
    assert me.shmctl(sid, u.IPC_STAT)["shm_perm"]["mode"] == 0o600
    assert not h.kpageflags(pfn2) & (1 << u.KPF_UNEVICTABLE)
    me.shmdt(addr)
    me.shmctl(sid, u.IPC_RMID)


# ------------------------------------------------------------------ tinjpage `shared memory hugepage`
def _expected_at_injection(kernel, early, page, lsb):
    """madvise(MADV_HWPOISON) by the process itself: 6.18 passes MF_ACTION_REQUIRED
    (AR to current at injection); before 6.11 the caller is any mapper (AO when it
    is early kill, else nothing)."""
    if kernel == "6.18":
        return ("jump", (AR, page, lsb))
    return ("jump", (AO, page, lsb)) if early else ("ok", None)


@pytest.mark.parametrize("kernel", ["pre-6.11", "6.18"])
@pytest.mark.parametrize("mode", ["late", "early"])
def test_tinjpage_shm_hugepage(host_factory, mode, kernel):
    """mce-test tinjpage.c `shared memory hugepage` (shm_hugepage()): hugepage.h
    alloc_shm_hugepage(&tmpcount, HPS): shmget(key, HPS, SHM_HUGETLB|IPC_CREAT|SHM_R|
    SHM_W) and shmat(id, 0, 0); page[0] = 'a'; testmem(MWRITE): madvise then
    `*page = 2`; free_shm_hugepage: shmdt, IPC_RMID.  The huge page: "huge page:
    Recovered"; the write gets BUS_MCEERR_AR with si_addr_lsb 21 (the whole 2 MB is
    lost); at injection AR (6.18), AO (pre-6.11, early) or nothing (late)."""
    from selftest_harness import MADVISE

    early = mode == "early"
    h = _host(host_factory, huge=True, madvise_action_required=MADVISE[kernel])
    me, rec = attach(h, name="tinjpage")
    h.sysctl("vm.memory_failure_early_kill", 1 if early else 0)
    tmpcount = 7
    sid = me.shmget(tmpcount, HPAGE, u.SHM_HUGETLB | u.IPC_CREAT | u.SHM_R | u.SHM_W)
    page = me.shmat(sid, 0, 0)
    me.write(page, b"a")                                            # prefault
    pfn = me.pagemap(page).pfn
    assert rec.run(me.madvise, page, PAGE, u.MADV_HWPOISON) == \
        _expected_at_injection(kernel, early, page, 21)
    assert dmesg_has(h, "Memory failure: %#x: recovery action for huge page: Recovered" % pfn)
    assert rec.run(me.write, page, b"\x02") == ("jump", (AR, page, 21))
    assert me.shmdt(page) == 0
    assert me.shmctl(sid, u.IPC_RMID) == 0
    assert rec.take() == []
    # me_huge_page() keeps get_huge_page_for_hwpoison()'s reference on a page-cache
    # folio ("The page is kept in page cache"): the segment's end does not free it
    assert _huge(h) == {"HugePages_Total": 2, "HugePages_Free": 1, "HugePages_Rsvd": 0,
                        "HugePages_Surp": 0}


# ------------------------------------------------------------------ thugetlb -S / run-huge-test.sh
@pytest.mark.parametrize("kernel", ["pre-6.11", "6.18"])
@pytest.mark.parametrize("ptype", ["early", "late_touch", "late_avoid"])
@pytest.mark.parametrize("target", ["head", "tail"])
def test_thugetlb_shm_fork_shared(host_factory, target, ptype, kernel):
    """run-huge-test.sh `exec_testcase 2 1 <head|tail> <early|late_touch|late_avoid>
    "shm" "fork_shared"` (thugetlb -S -F): test_mce_test's thugetlb port with
    alloc_shm_hugepage (a SHM_HUGETLB segment, shmat) and the same outcomes
    (check_thugetlb: with fork_shared the early child dies too).  A thugetlb killed
    before its cleanout leaves the segment behind (no free_shm_hugepage's IPC_RMID):
    it outlives both processes, and it is still there, unattached, with its huge
    pages; one that finishes removes it."""
    import errno

    from selftest_harness import MADVISE
    from test_mce_test import check_thugetlb, run_thugetlb

    h = _host(host_factory, huge=True, madvise_action_required=MADVISE[kernel])
    me = emu.attach(h, name="run-huge-test")
    code, result, out = run_thugetlb(me, "shm", "fork_shared", target, ptype)
    sid, _, out = out.partition(b" ")
    check_thugetlb(h, kernel, "fork_shared", ptype, code, result, out)
    if code == -SIGBUS:                                  # killed: no free_shm_hugepage
        st = me.shmctl(int(sid), u.IPC_STAT)
        assert st["shm_nattch"] == 0 and st["shm_segsz"] == 2 * HPAGE
        me.shmctl(int(sid), u.IPC_RMID)
    else:
        raises_errno(errno.EINVAL, me.shmctl, int(sid), u.IPC_STAT)
    # the good huge page is back; the poisoned one keeps me_huge_page()'s reference
    assert _huge(h) == {"HugePages_Total": 2, "HugePages_Free": 1, "HugePages_Rsvd": 0,
                        "HugePages_Surp": 0}
    assert h.check_invariants() == []


def _make_two(task, attach_one):
    """Creates two segments, attaches the second (and leaves it attached), exits."""
    a = task.shmget(u.IPC_PRIVATE, PAGE, 0o600)
    b = task.shmget(u.IPC_PRIVATE, PAGE, 0o600)
    if attach_one:
        task.shmat(b)
    return a, b


def test_shm_rmid_forced(host_factory):
    """Documentation/admin-guide/sysctl/kernel.rst shm_rmid_forced (ipc/shm.c
    exit_shm, shm_may_destroy, shm_destroy_orphaned): 0 keeps a dead creator's
    segments; setting 1 destroys the orphans nobody attaches; with 1, a creator's
    exit destroys its unattached segments and the last detach any segment."""
    import errno

    h = _host(host_factory)
    me = emu.attach(h, name="rmid_forced")
    ch = me.fork(_make_two, False, name="creator")
    assert ch.join(30) == 0
    a, b = ch.result
    assert me.shmctl(a, u.IPC_STAT)["shm_nattch"] == 0              # kept (default 0)
    keep = me.shmat(a)                                              # attached: not an orphan to drop
    h.write_file("/proc/sys/kernel/shm_rmid_forced", "1")
    raises_errno(errno.EINVAL, me.shmctl, b, u.IPC_STAT)            # orphan, unattached: gone
    assert me.shmctl(a, u.IPC_STAT)["shm_nattch"] == 1
    me.shmdt(keep)                                                  # the last detach destroys it
    raises_errno(errno.EINVAL, me.shmctl, a, u.IPC_STAT)
    ch = me.fork(_make_two, True, name="creator2")
    assert ch.join(30) == 0
    a, b = ch.result
    raises_errno(errno.EINVAL, me.shmctl, a, u.IPC_STAT)            # exit_shm
    raises_errno(errno.EINVAL, me.shmctl, b, u.IPC_STAT)            # exit_mm's shm_close
    assert h.read_file("/proc/sysvipc/shm").count("\n") == 1       # the header only
