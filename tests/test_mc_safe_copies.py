"""Kernel copies of a whole frame that are machine-check safe in Linux 6.18.

Kernel: include/linux/highmem.h copy_mc_highpage() / copy_mc_user_highpage() (a #MC
in the source is an IN_KERNEL_RECOV load: the exception fixup ends the copy, and
both helpers queue memory_failure(pfn, 0) for the source page since "mm: move
memory_failure_queue() into copy_mc_[user]_highpage()", 6.12); mm/util.c
folio_mc_copy() (-EHWPOISON); mm/migrate.c __migrate_folio() /
fs/hugetlbfs/inode.c hugetlbfs_migrate_folio() (the move fails, the source keeps
its mappings: remove_migration_ptes(src, src)), migrate_folios_move() /
migrate_hugetlbs() (another errno: one folio failed); mm/memory-failure.c
soft_offline_in_use_page() ("%#lx: %s migration failed %ld, type %pGp", -EBUSY);
mm/memory.c wp_page_copy() / do_cow_fault() (VM_FAULT_HWPOISON) and
arch/x86/mm/fault.c do_sigbus() (BUS_MCEERR_AR, lsb PAGE_SHIFT).
"""
import errno
import signal

import pytest
from checks import Stop, lines_in_order

import emu
from emu import uapi as u

PAGE = 4096
HPAGE = 2 << 20
RW = u.PROT_READ | u.PROT_WRITE
ANON = u.MAP_PRIVATE | u.MAP_ANONYMOUS
AR = u.BUS_MCEERR_AR
KPF_HWPOISON = 1 << u.KPF_HWPOISON
HUGE2M = u.MFD_HUGETLB | u.MFD_HUGE_2MB


def attach(h, name="t"):
    me = emu.attach(h, name=name)
    got = []

    def handler(signum, info):
        got.append((info.si_code, info.si_addr, info.si_addr_lsb))
        raise Stop

    emu.sigaction(signal.SIGBUS, handler)
    return me, got


def access(fn, *args):
    try:
        return fn(*args)
    except Stop:
        return None


def errno_of(fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno




# ------------------------------------------------------------------ soft offline
def test_soft_offline_of_a_page_with_a_latent_error_fails_and_queues_memory_failure(host):
    """folio_mc_copy() consumes the error (IN_KERNEL_RECOV: fixup, no panic, no
    task work) and returns -EHWPOISON; the folio goes back mapped where it was;
    migrate_pages() counts one failure: "page migration failed 1", EBUSY.
    copy_mc_highpage() queued memory_failure(pfn, 0), which runs after soft offline
    (mf_mutex): the page is poisoned and unmapped, no signal (late kill); the next
    access faults on the hwpoison entry."""
    me, got = attach(host)
    a = me.mmap(0, PAGE, RW, ANON)
    me.write(a, b"anon data")
    pfn = me.pagemap(a).pfn
    host.hw_poison(pfn)
    free = host.meminfo()["MemFree"]
    assert errno_of(host.soft_offline_page, pfn << 12) == errno.EBUSY
    d = host.dmesg()
    assert lines_in_order(d, ["Soft offline: %#x: page migration failed 1, type " % pfn,
                        "Memory failure: %#x: recovery action for dirty LRU page: Recovered"
                        % pfn])
    assert not any("Fatal machine check" in ln for ln in d)
    assert host.tainted() & (1 << u.TAINT_MACHINE_CHECK)
    assert host.kpageflags(pfn) & KPF_HWPOISON
    assert host.meminfo()["HardwareCorrupted"] == 4
    assert host.meminfo()["MemFree"] >= free - 16          # no target page kept
    assert me.pagemap(a).hwpoison
    assert got == []
    access(me.read, a + 3, 1)
    assert got == [(AR, a + 3, 12)]
    assert host.check_invariants() == []


def test_soft_offline_of_a_clean_page_still_migrates(host):
    """Without a latent error the copy succeeds: 0, the mapping follows the data."""
    me, got = attach(host)
    a = me.mmap(0, PAGE, RW, ANON)
    me.write(a, b"anon data")
    pfn = me.pagemap(a).pfn
    assert host.soft_offline_page(pfn << 12) == 0
    assert me.pagemap(a).pfn != pfn and me.read(a, 9) == b"anon data"
    assert host.kpageflags(pfn) & KPF_HWPOISON and got == []


def test_hugetlb_soft_offline_with_a_latent_error_fails_and_returns_the_target(host_factory):
    """hugetlbfs_migrate_folio() copies with folio_mc_copy() too: the huge page
    stays mapped, the target goes back to the pool, "hugepage migration failed 1",
    EBUSY; the queued memory_failure() then handles the raw page."""
    h = host_factory(ram="128M", hugepages={"2M": 4})
    me, got = attach(h)
    fd = me.memfd_create("huge", HUGE2M)
    me.ftruncate(fd, HPAGE)
    a = me.mmap(0, HPAGE, RW, u.MAP_SHARED | u.MAP_POPULATE, fd, 0)
    me.write(a, b"huge data")
    head = me.pagemap(a).pfn
    raw = head + 5
    h.hw_poison(raw)
    assert h.meminfo()["HugePages_Free"] == 3
    assert errno_of(h.soft_offline_page, raw << 12) == errno.EBUSY
    d = h.dmesg()
    assert lines_in_order(d, ["Soft offline: %#x: hugepage migration failed 1, type " % raw,
                        "Memory failure: %#x: recovery action for huge page" % raw])
    assert h.kpageflags(raw) & KPF_HWPOISON
    m = h.meminfo()
    assert m["HugePages_Total"] == 4 and m["HugePages_Free"] == 3
    assert got == []
    assert h.check_invariants() == []


# ------------------------------------------------------------------ COW of a file page
def _memfd_page(me, data=b"file data"):
    fd = me.memfd_create("f")
    me.pwrite(fd, data.ljust(PAGE, b"."), 0)
    s = me.mmap(0, PAGE, u.PROT_READ, u.MAP_SHARED, fd, 0)
    me.read(s, 1)
    pfn = me.pagemap(s).pfn
    me.munmap(s, PAGE)
    return fd, pfn


def test_write_fault_copying_a_mapped_file_page_with_a_latent_error_is_sigbus(host):
    """wp_page_copy(): __wp_page_copy_user() -> copy_mc_user_highpage() fails:
    -EHWPOISON -> VM_FAULT_HWPOISON, the read-only entry stays; do_sigbus():
    "MCE: Killing ...", SIGBUS BUS_MCEERR_AR at the faulting address, lsb 12; the
    queued memory_failure() poisons the page-cache page.  No panic."""
    me, got = attach(host)
    fd, pfn = _memfd_page(me)
    a = me.mmap(0, PAGE, RW, u.MAP_PRIVATE, fd, 0)
    assert me.read(a, 9) == b"file data"
    host.hw_poison(pfn)
    access(me.write, a + 8, b"X")
    assert got == [(AR, a + 8, 12)]
    d = host.dmesg()
    assert lines_in_order(d, ["MCE: Killing %s:%d due to hardware memory corruption fault at %x"
                        % (me.name, me.tid, a + 8),
                        "Memory failure: %#x: recovery action for " % pfn])
    assert not any("Fatal machine check" in ln for ln in d)
    assert host.kpageflags(pfn) & KPF_HWPOISON
    assert host.tainted() & (1 << u.TAINT_MACHINE_CHECK)
    assert host.check_invariants() == []


def test_first_write_fault_on_a_private_file_page_with_a_latent_error_is_sigbus(host):
    """do_cow_fault(): copy_mc_user_highpage() fails -> VM_FAULT_HWPOISON, nothing
    mapped; SIGBUS BUS_MCEERR_AR, lsb 12; memory_failure() of the source page."""
    me, got = attach(host)
    fd, pfn = _memfd_page(me)
    a = me.mmap(0, PAGE, RW, u.MAP_PRIVATE, fd, 0)
    host.hw_poison(pfn)
    access(me.write, a + 16, b"Y")
    assert got == [(AR, a + 16, 12)]
    assert host.kpageflags(pfn) & KPF_HWPOISON
    assert lines_in_order(host.dmesg(), ["MCE: Killing", "Memory failure: %#x: recovery action for "
                                   % pfn])
    assert host.check_invariants() == []


def test_write_fault_on_a_private_file_page_without_error_copies(host):
    me, got = attach(host)
    fd, pfn = _memfd_page(me)
    a = me.mmap(0, PAGE, RW, u.MAP_PRIVATE, fd, 0)
    me.write(a, b"Z")
    assert me.read(a, 9) == b"Zile data" and me.pagemap(a).pfn != pfn
    assert me.pread(fd, 9, 0) == b"file data" and got == []


# ------------------------------------------------------------------ fork
def _child_reads(task, addr):
    got = []

    def h(signum, info):
        got.append((info.si_code, info.si_addr, info.si_addr_lsb))
        raise Stop

    emu.sigaction(signal.SIGBUS, h)
    try:
        task.read(addr, 1)
    except Stop:
        pass
    return got


def test_fork_child_copy_of_a_page_with_a_latent_error_carries_it(host):
    """Linux shares the private page copy-on-write: the child's first load consumes
    the error (#MC in user mode, kill_me_maybe, BUS_MCEERR_AR).  The emulator copies
    at fork; the copy carries the latent error, so the child sees the same."""
    me, got = attach(host)
    a = me.mmap(0, PAGE, RW, ANON)
    me.write(a, b"private")
    host.hw_poison(me.pagemap(a).pfn)
    ch = me.fork(_child_reads, a + 2, name="child")
    assert ch.join(10) == 0
    # kill_me_maybe() -> memory_failure(MF_ACTION_REQUIRED): kill_proc() reports the
    # page's address in the VMA (page aligned), lsb PAGE_SHIFT
    assert ch.result == [(AR, a, 12)]
    assert got == []


def test_fork_copy_freed_unconsumed_leaves_no_bad_frame(host):
    """The copied error stands for the one frame Linux would share: a child that
    exits without touching it frees its copy as a good frame."""
    me, got = attach(host)
    a = me.mmap(0, PAGE, RW, ANON)
    me.write(a, b"private")
    pfn = me.pagemap(a).pfn
    host.hw_poison(pfn)

    def child(task):
        return task.pagemap(a).pfn

    ch = me.fork(child, name="child")
    assert ch.join(10) == 0
    copy = ch.result
    assert copy != pfn
    assert host.meminfo()["HardwareCorrupted"] == 0
    # the freed copy goes back to the allocator: whoever gets it reads it fine
    n = 256
    b = me.mmap(0, n * PAGE, RW, ANON)
    for i in range(n):
        me.write(b + i * PAGE, b"x")
        if me.pagemap(b + i * PAGE).pfn == copy:
            assert me.read(b + i * PAGE, 1) == b"x"
            break
    else:
        pytest.fail("the copy's frame was not reallocated")
    assert got == []
    # the parent still consumes its own error
    access(me.read, a, 1)
    assert got == [(AR, a, 12)]
    assert host.check_invariants() == []
