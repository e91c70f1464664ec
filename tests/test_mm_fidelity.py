"""Memory management details a user sees, held against Linux 6.18 (fidelity audit 2:
D3, D7, D10, D11, D14, D16, D17 and D18's "unhandlable page").

- A frame freed a moment ago is a free buddy page to memory_failure():
  get_hwpoison_page() runs zone_pcp_disable(), which drains the per-CPU lists
  (mm/memory-failure.c, mm/page_alloc.c take_page_off_buddy).
- A refcount-0 page that is neither free nor on the LRU: get_any_page()'s
  "unhandlable page." and "get hwpoison page: Ignored".
- unpoison_memory() of an invalid pfn: -ENXIO; /proc/kpageflags ends at max_pfn
  (fs/proc/page.c kpageflags_read).
- task_early_kill(): a process whose group leader exited (pthread_exit) has no mm on
  its leader and is skipped by collect_procs.
- The shared zero page (mm/memory.c do_anonymous_page, wp_page_copy) and what
  MADV_HWPOISON of never-written anonymous memory does to it (mm/madvise.c
  madvise_inject_error: get_user_pages_fast(start, 1, 0, ...), a read fault).
- fork copies page tables only where vma_needs_copy() says (mm/memory.c).
- pagemap (fs/proc/task_mmu.c pte_to_pagemap_entry, pagemap_hugetlb_range) and
  kpageflags (fs/proc/page.c stable_page_flags) encodings.
"""
import errno
import signal
import time

import pytest
from checks import Event, Stop, dmesg_has

import emu
from emu import uapi as u

pytestmark = pytest.mark.both_backends      # conftest: on the Cython core and the reference CPU

PAGE = 4096
HPAGE = 2 << 20
RW = u.PROT_READ | u.PROT_WRITE
ANON = u.MAP_PRIVATE | u.MAP_ANONYMOUS
EHWPOISON = 133
AR, AO = u.BUS_MCEERR_AR, u.BUS_MCEERR_AO
KPF = {name: 1 << getattr(u, "KPF_" + name) for name in (
    "BUDDY", "COMPOUND_HEAD", "COMPOUND_TAIL", "HWPOISON", "MMAP", "SWAPBACKED", "ZERO_PAGE",
    "ANON", "LRU", "UNEVICTABLE", "HUGE", "NOPAGE")}
KPF_RESERVED = 1 << 32
WAIT = 5.0
GRACE = 0.3


def setup(h, name="t"):
    me = emu.attach(h, name=name)
    got = []

    def handler(signum, info):
        got.append((info.si_code, info.si_addr, info.si_addr_lsb))
        if info.si_code == AR and getattr(handler, "stop", False):
            raise Stop()

    emu.sigaction(signal.SIGBUS, handler)
    return me, got, handler


def sigbus_of(handler, got, fn):
    """The SIGBUS records fn() raised; the AR one stops the access."""
    got.clear()
    handler.stop = True
    try:
        with pytest.raises(Stop):
            fn()
    finally:
        handler.stop = False
    out = list(got)
    got.clear()
    return out


def hc(h):
    return h.meminfo()["HardwareCorrupted"]


def zero_pfn(me):
    """The pfn a read of untouched private anonymous memory maps."""
    a = me.mmap(0, PAGE, RW, ANON)
    assert me.read(a, 8) == bytes(8)
    e = me.pagemap(a)
    assert e.present
    return e.pfn


# ====================================================================== D3
def test_just_freed_frame_is_a_free_buddy_page(host):
    """munmap frees the frame; memory_failure() drains the per-CPU lists first
    (zone_pcp_disable), so the frame is a free buddy page: taken off buddy,
    "free buddy page: Recovered", 0, counted, and unpoison gives it back."""
    me, got, _h = setup(host)
    a = me.mmap(0, PAGE, RW, ANON)
    me.write(a, b"x" * PAGE)
    pfn = me.pagemap(a).pfn
    me.munmap(a, PAGE)
    hc0, st0 = hc(host), host.mf_stats()

    assert host.corrupt_pfn(pfn) == 0
    assert dmesg_has(host, "Memory failure: %#x: recovery action for free buddy page: Recovered"
                     % pfn)
    assert not dmesg_has(host, "high-order kernel page")
    assert hc(host) == hc0 + 4
    st = host.mf_stats()
    assert st["recovered"] == st0["recovered"] + 1 and st["total"] == st0["total"] + 1
    assert host.kpageflags(pfn) & KPF["HWPOISON"]
    assert host.check_invariants() == []          # not lost: counted, off every free list
    assert got == []

    assert host.unpoison_pfn(pfn) == 0
    assert hc(host) == hc0
    assert not host.kpageflags(pfn) & KPF["HWPOISON"]
    assert host.check_invariants() == []


def test_just_freed_frame_hw_detect(host):
    """The same for a deferred hardware report (patrol scrub / UCNA)."""
    me, _got, _h = setup(host)
    a = me.mmap(0, 2 * PAGE, RW, ANON)
    me.write(a, b"y" * 2 * PAGE)
    pfn = me.pagemap(a + PAGE).pfn
    me.munmap(a, 2 * PAGE)
    hc0 = hc(host)
    assert host.hw_detect(pfn) == 0
    assert dmesg_has(host, "Memory failure: %#x: recovery action for free buddy page: Recovered"
                     % pfn)
    assert hc(host) == hc0 + 4
    assert host.check_invariants() == []


def test_dissolved_hugetlb_subpage_is_a_free_buddy_page(host_factory):
    """A free huge page poisoned at one raw page is dissolved; its healthy subpages
    go to the page allocator, so a failure on one of them right afterwards is a
    free buddy page too."""
    host = host_factory(ram="128M", hugepages={"2M": 2})
    nframes = host.meminfo()["MemTotal"] // 4
    heads = [p for p in range(nframes - 512, 0, -512)
             if host.kpageflags(p) & (KPF["HUGE"] | KPF["COMPOUND_HEAD"])
             == KPF["HUGE"] | KPF["COMPOUND_HEAD"]]
    head = heads[0]
    assert host.corrupt_pfn(head + 3) == 0
    assert dmesg_has(host, "%#x: recovery action for free huge page: Recovered" % (head + 3))
    hc0 = hc(host)
    assert host.corrupt_pfn(head + 5) == 0
    assert dmesg_has(host, "Memory failure: %#x: recovery action for free buddy page: Recovered"
                     % (head + 5))
    assert hc(host) == hc0 + 4
    assert host.check_invariants() == []


def _ram():
    from emu import shm

    return shm.Segments.create(4096, 8, 8, 64, 16, 16)


def test_grace_period_frames_taken_off_and_put_back_safely():
    """The grace period is for lock-free readers (a CPU that walked the old PTE may
    still copy through it): a frame in it can be retired at once (it is never handed
    out), and one given back by unpoison waits for the readers like any freed frame."""
    from emu.kernel.page_alloc import BuddyAllocator

    segs = _ram()
    core = segs.core
    try:
        b = BuddyAllocator(core, 4096)
        pfn = b.alloc(2)
        core.task_set(0, "rcu_epoch", core.epoch)         # a CPU inside an access
        b.free(pfn, 2)
        b.reclaim()
        free0 = b.nr_free
        assert b.is_free_buddy_page(pfn + 1) and b.free_block_of(pfn + 1) is None
        assert b.take_page_off_buddy(pfn + 1)
        assert not b.is_free_buddy_page(pfn + 1)
        assert b.is_free_buddy_page(pfn) and b.is_free_buddy_page(pfn + 3)
        assert core.head(pfn) == pfn and core.head(pfn + 3) == pfn + 2   # the halves left
        core.task_set(0, "rcu_epoch", 0)                  # the access is over
        b.reclaim()
        assert b.nr_free == free0 + 3                     # the other three frames
        assert b.free_block_of(pfn + 1) is None           # the taken one stays out
        core.task_set(0, "rcu_epoch", core.epoch)
        b.put_back(pfn + 1)
        assert b.nr_free == free0 + 3                     # not while a reader may see it
        core.task_set(0, "rcu_epoch", 0)
        b.reclaim()
        assert b.nr_free == free0 + 4
        assert b.free_block_of(pfn + 1) is not None
    finally:
        segs.unlink()


# ====================================================================== D18
def test_refcount_zero_page_not_free_nor_lru_is_unhandlable():
    """get_any_page(): a page with no reference that is neither a free buddy page
    nor on the LRU (e.g. a tail of a non-compound high-order kernel allocation) is
    not HWPoisonHandlable: "unhandlable page.", then "get hwpoison page: Ignored"."""
    from emu.kernel import Kernel

    segs = _ram()
    try:
        k = Kernel(segs.core, 4096)
        pfn = k.buddy.alloc(1) + 1                        # a kernel allocation's second page
        assert k.memory_failure.memory_failure(pfn, u.MF_SW_SIMULATED) == -errno.EBUSY
        log = k.dmesg()
        assert any("Memory failure: %#x: unhandlable page." % pfn in line for line in log)
        assert any("Memory failure: %#x: recovery action for get hwpoison page: Ignored" % pfn
                   in line for line in log)
        assert not any("high-order kernel page" in line for line in log)
    finally:
        segs.unlink()


# ====================================================================== D7
def test_unpoison_invalid_pfn_enxio(host):
    """unpoison_memory(): if (!pfn_valid(pfn)) return -ENXIO."""
    nframes = host.meminfo()["MemTotal"] // 4
    for pfn in (nframes, 1 << 40):
        with pytest.raises(OSError) as ei:
            host.unpoison_pfn(pfn)
        assert ei.value.errno == errno.ENXIO


def test_kpageflags_past_max_pfn_is_end_of_file(host):
    """kpageflags_read(): a read at or past max_pfn returns 0 bytes (EOF); a negative
    file position is EINVAL."""
    nframes = host.meminfo()["MemTotal"] // 4
    assert host.kpageflags(nframes - 1) is not None
    assert host.kpageflags(nframes) is None
    assert host.kpageflags(1 << 40) is None
    with pytest.raises(OSError) as ei:
        host.kpageflags(-1)
    assert ei.value.errno == errno.EINVAL


# ====================================================================== D10


def _early_thread(task, va, ready, go):
    """An EARLY thread: report the SIGBUS it receives while the leader is gone."""
    got = []
    emu.sigaction(signal.SIGBUS, lambda s, i: got.append((i.si_code, i.si_addr, i.si_addr_lsb)))
    task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
    ready.set()
    assert go.wait(task)
    task.idle(GRACE)
    return got


def shared_memfd(me, size, name, flags=0):
    """A memfd of `size` bytes (memfd_create flags), mapped MAP_SHARED: its address."""
    fd = me.memfd_create(name, flags) if flags else me.memfd_create(name)
    me.ftruncate(fd, size)
    return me.mmap(0, size, RW, u.MAP_SHARED, fd, 0)


def _qemu_with_early_thread(host):
    """A process with a dirty shared memfd page and an EARLY thread, started and
    waiting for `go`; returns (me, va, pfn, thread, go)."""
    me, _got, _h = setup(host, "qemu")
    va = shared_memfd(me, PAGE, "ram")
    me.write(va, b"d" * 64)
    pfn = me.pagemap(va).pfn
    ready, go = Event(), Event()
    th = me.clone(_early_thread, va, ready, go, name="vcpu0")
    assert ready.wait(me)
    return me, va, pfn, th, go


def test_zombie_leader_process_gets_no_early_kill(host):
    """The main thread exits alone (pthread_exit) while an EARLY thread runs: its
    leader has no mm, task_early_kill() returns NULL, the process hears nothing of
    a deferred error in its pages."""
    me, va, pfn, th, go = _qemu_with_early_thread(host)
    me.pthread_exit()
    assert host.hw_detect(pfn) == 0
    time.sleep(GRACE)
    go.set()
    assert th.join(15) == 0
    assert th.result == []
    assert dmesg_has(host, "Memory failure: %#x: recovery action for dirty LRU page" % pfn)
    assert not dmesg_has(host, "Sending SIGBUS")


def test_early_kill_reaches_thread_while_leader_lives(host):
    """The same with the leader alive: the EARLY thread gets the AO (the baseline)."""
    me, va, pfn, th, go = _qemu_with_early_thread(host)
    assert host.hw_detect(pfn) == 0
    go.set()
    assert th.join(15) == 0
    assert th.result == [(AO, va, 12)]


def _madvise_in_zombie_group(task, va, ready, go):
    """With the leader gone: MADV_HWPOISON of a dirty anonymous page.  No force_early
    AR at injection (the process is skipped); the next access faults on the
    hwpoison entry: AR at the faulting byte."""
    got = []

    def handler(s, i):
        got.append((i.si_code, i.si_addr, i.si_addr_lsb))
        if i.si_code == AR:
            raise Stop()

    emu.sigaction(signal.SIGBUS, handler)
    ready.set()
    assert go.wait(task)
    task.madvise(va, PAGE, u.MADV_HWPOISON)
    at_injection = list(got)
    try:
        task.read(va + 0x10, 1)
    except Stop:
        pass
    return at_injection, got[len(at_injection):]


def test_zombie_leader_no_force_early_ar(host):
    me, _got, _h = setup(host, "qemu")
    va = me.mmap(0, PAGE, RW, ANON)
    me.write(va, b"a" * PAGE)
    ready, go = Event(), Event()
    th = me.clone(_madvise_in_zombie_group, va, ready, go, name="vcpu0")
    assert ready.wait(me)
    me.pthread_exit()
    go.set()
    assert th.join(15) == 0
    at_injection, later = th.result
    assert at_injection == []
    assert later == [(AR, va + 0x10, 12)]


def test_pthread_exit_last_thread_takes_the_process(host):
    """The leader's pthread_exit leaves the process to its other threads; the last
    one to exit takes the mm with it."""
    me, _got, _h = setup(host, "qemu")
    tgid = me.tgid
    ready, go = Event(), Event()
    th = me.clone(_early_thread, 0, ready, go, name="t1")
    assert ready.wait(me)
    me.pthread_exit()
    procs = {p["tgid"]: p for p in host.status()["processes"]}
    assert tgid in procs and [t["comm"] for t in procs[tgid]["threads"]] == ["t1"]
    go.set()
    assert th.join(15) == 0
    end = time.monotonic() + WAIT
    while any(p["tgid"] == tgid for p in host.status()["processes"]):
        assert time.monotonic() < end
        time.sleep(0.02)
    assert host.check_invariants() == []


# ====================================================================== D11
def test_read_fault_maps_the_zero_page(host):
    """do_anonymous_page(): a read of untouched private anonymous memory maps the
    shared zero page (no allocation); a write then copies-on-write to a new frame."""
    me, _got, _h = setup(host)
    a = me.mmap(0, 4 * PAGE, RW, ANON)
    free0 = host.meminfo()["MemFree"]
    assert me.read(a, 4 * PAGE) == bytes(4 * PAGE)
    zp = me.pagemap(a).pfn
    assert all(me.pagemap(a + i * PAGE).pfn == zp for i in range(4))
    e = me.pagemap(a)
    assert e.present and not e.file and not e.exclusive      # vm_normal_page() is NULL
    assert host.meminfo()["MemFree"] == free0
    f = host.kpageflags(zp)
    assert f & KPF["ZERO_PAGE"] and f & KPF_RESERVED
    assert not f & (KPF["MMAP"] | KPF["ANON"] | KPF["LRU"])

    me.write(a + PAGE + 5, b"w")
    e = me.pagemap(a + PAGE)
    assert e.present and e.pfn != zp and e.exclusive
    assert me.read(a + PAGE, 8) == b"\0\0\0\0\0w\0\0"
    assert me.pagemap(a).pfn == zp and me.read(a, 8) == bytes(8)
    assert host.kpageflags(e.pfn) & (KPF["ANON"] | KPF["MMAP"]) == KPF["ANON"] | KPF["MMAP"]
    assert host.check_invariants() == []
    me.munmap(a, 4 * PAGE)
    assert host.check_invariants() == []


def test_madv_hwpoison_untouched_anon_hits_the_zero_page(host):
    """madvise_inject_error()'s get_user_pages_fast(start, 1, 0, ...) is a read: on
    never-written anonymous memory it maps and returns the zero page, PG_reserved:
    "reserved kernel page: Ignored", -EBUSY, no signal, counted."""
    me, got, _h = setup(host)
    a = me.mmap(0, 2 * PAGE, RW, ANON)
    hc0, st0 = hc(host), host.mf_stats()
    with pytest.raises(OSError) as ei:
        me.madvise(a, PAGE, u.MADV_HWPOISON)
    assert ei.value.errno == errno.EBUSY
    zp = me.pagemap(a).pfn
    assert me.pagemap(a).present
    assert dmesg_has(host, "Injecting memory failure for pfn %#x at process virtual address %#x"
                     % (zp, a))
    assert dmesg_has(host, "Memory failure: %#x: recovery action for reserved kernel page: Ignored"
                     % zp)
    assert got == []
    assert hc(host) == hc0 + 4
    st = host.mf_stats()
    assert st["ignored"] == st0["ignored"] + 1
    assert host.kpageflags(zp) & (KPF["ZERO_PAGE"] | KPF["HWPOISON"]) \
        == KPF["ZERO_PAGE"] | KPF["HWPOISON"]
    # GUP's reference is kept (me_kernel): unpoison finds it grabbed
    with pytest.raises(OSError) as ei:
        host.unpoison_pfn(zp)
    assert ei.value.errno == errno.EBUSY
    assert dmesg_has(host, "Unpoison: %#x: someone grabs the hwpoison page" % zp)
    # reads still see zeros; a write copies to a fresh frame
    assert me.read(a, 8) == bytes(8)
    me.write(a, b"ok")
    assert me.read(a, 2) == b"ok" and me.pagemap(a).pfn != zp


def test_madv_hwpoison_zero_page_twice_kills_the_accessing_mapping(host):
    """The zero page is already poisoned: MF_ACTION_REQUIRED -> kill_accessing_process()
    finds current's first mapping of it: AR there, -EHWPOISON."""
    me, got, _h = setup(host)
    a = me.mmap(0, 2 * PAGE, RW, ANON)
    with pytest.raises(OSError):
        me.madvise(a, PAGE, u.MADV_HWPOISON)
    hc0 = hc(host)
    with pytest.raises(OSError) as ei:
        me.madvise(a + PAGE, PAGE, u.MADV_HWPOISON)
    assert ei.value.errno == EHWPOISON
    assert got == [(AR, a, 12)]
    assert hc(host) == hc0


def test_zero_page_write_fault_both_backends(host):
    """Every CPU store to a zero-page PTE faults (read-only entry) and gets its own
    frame; loads keep reading zeros through the shared entry."""
    me, _got, _h = setup(host)
    n = 16
    a = me.mmap(0, n * PAGE, RW, ANON)
    assert me.read_batch([a + i * PAGE for i in range(n)], 8) == bytes(8 * n)
    zp = me.pagemap(a).pfn
    me.write_batch([a + i * PAGE for i in range(0, n, 2)], 1, bytes(range(1, n // 2 + 1)))
    pfns = [me.pagemap(a + i * PAGE).pfn for i in range(n)]
    assert all(pfns[i] == zp for i in range(1, n, 2))
    assert len({pfns[i] for i in range(0, n, 2)} | {zp}) == n // 2 + 1
    assert me.read_batch([a + i * PAGE for i in range(n)], 1) == \
        bytes(x for i in range(n // 2) for x in (i + 1, 0))
    assert host.check_invariants() == []


def test_populate_read_only_maps_zero_page(host):
    """MAP_POPULATE of a read-only private mapping faults with reads (no FOLL_WRITE
    in populate_vma_page_range): the zero page."""
    me, _got, _h = setup(host)
    zp = zero_pfn(me)
    a = me.mmap(0, 2 * PAGE, u.PROT_READ, ANON | u.MAP_POPULATE)
    assert me.pagemap(a).pfn == zp and me.pagemap(a + PAGE).pfn == zp


def test_guest_read_of_untouched_anon_memslot_then_write(host):
    """KVM faults an ordinary memslot read through the host: the zero page, mapped
    read-only in stage-2 (hva_to_pfn: not writable); the guest's store then faults
    again and gets the host's copy-on-write frame."""
    me, _got, _h = setup(host, "qemu")
    hva = me.mmap(0, 2 * PAGE, RW, ANON)
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gpa = 1 << 32
    vm.set_user_memory_region2(0, 0, gpa, 2 * PAGE, hva, -1, 0)
    zp = zero_pfn(me)

    def guest(g):
        v = yield g.read(gpa, 8)
        yield g.sync(v)
        yield g.write(gpa, b"guest!!!")
        v = yield g.read(gpa, 8)
        yield g.sync(v)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    vcpu.run()
    assert vcpu.ucall() == (u.UCALL_SYNC, (bytes(8),))
    s2 = vm.gpa_to_pfn(gpa)
    assert s2["mapped"] and s2["pfn"] == zp
    vcpu.run()
    assert vcpu.ucall() == (u.UCALL_SYNC, (b"guest!!!",))
    assert me.pagemap(hva).pfn != zp
    assert me.read(hva, 8) == b"guest!!!"
    assert vm.gpa_to_pfn(gpa)["pfn"] == me.pagemap(hva).pfn
    vcpu.run()
    assert vcpu.ucall()[0] == u.UCALL_DONE
    assert host.check_invariants() == []


# ====================================================================== D14
def _child_pagemap(task, addrs):
    return [task.pagemap(a).raw for a in addrs]


def test_fork_does_not_copy_shared_file_ptes(host):
    """vma_needs_copy(): a MAP_SHARED file mapping has no anon_vma: fork copies none of
    its entries, present or hwpoison; the child faults them in (a poisoned page then
    gives SIGBUS from the fault)."""
    me, got, h = setup(host)
    a = shared_memfd(me, 2 * PAGE, "shm")
    me.write(a, b"s" * 2 * PAGE)
    pfn0 = me.pagemap(a).pfn
    me.madvise(a + PAGE, PAGE, u.MADV_HWPOISON)
    assert me.pagemap(a + PAGE).hwpoison
    got.clear()

    ch = me.fork(_child_pagemap, [a, a + PAGE], name="child")
    assert ch.join(10) == 0
    assert ch.result == [0, 0]

    def child(task):
        pm0 = task.pagemap(a)
        data = task.read(a, 2)
        pm1 = task.pagemap(a)
        seen = []

        def hd(s, i):
            seen.append((i.si_code, i.si_addr, i.si_addr_lsb))
            raise Stop()

        emu.sigaction(signal.SIGBUS, hd)
        try:
            task.read(a + PAGE + 7, 1)
        except Stop:
            pass
        return pm0.raw, data, pm1.pfn, seen

    ch = me.fork(child, name="child2")
    assert ch.join(10) == 0
    raw0, data, pfn_after, seen = ch.result
    assert raw0 == 0 and data == b"ss" and pfn_after == pfn0
    assert seen == [(AR, a + PAGE + 7, 12)]


def test_fork_copies_private_anon_with_anon_vma_but_not_zero_page_only(host):
    """An anonymous VMA that only ever mapped the zero page has no anon_vma: not copied.
    One with a written page is copied (present, zero-page and hwpoison entries)."""
    me, _got, _h = setup(host)
    zp = zero_pfn(me)
    ro = me.mmap(0, PAGE, RW, ANON)
    assert me.read(ro, 1) == b"\0"
    rw = me.mmap(0, 3 * PAGE, RW, ANON)
    me.write(rw, b"w")
    assert me.read(rw + PAGE, 1) == b"\0"
    me.write(rw + 2 * PAGE, b"p")
    me.madvise(rw + 2 * PAGE, PAGE, u.MADV_HWPOISON)
    _got.clear()

    ch = me.fork(_child_pagemap, [ro, rw, rw + PAGE, rw + 2 * PAGE], name="child")
    assert ch.join(10) == 0
    raw_ro, raw_w, raw_z, raw_p = ch.result
    assert raw_ro == 0
    assert raw_w & u.PM_PRESENT
    assert raw_z & u.PM_PRESENT and raw_z & u.PM_PFRAME_MASK == zp
    assert raw_p & u.PM_SWAP


def test_fork_leaves_only_the_child_mapping_unmapped(host):
    """folio_mapped(): after fork the child has no PTE for the shared page; once the
    parent unmaps, the page is mapped nowhere and memory_failure() kills nobody (the
    early !folio_mapped return of hwpoison_user_mappings)."""
    me, _got, _h = setup(host)
    a = shared_memfd(me, PAGE, "shm")
    me.write(a, b"q" * 64)
    pfn = me.pagemap(a).pfn
    ready, go = Event(), Event()

    def child(task):
        task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
        seen = []
        emu.sigaction(signal.SIGBUS, lambda s, i: seen.append((i.si_code, i.si_addr)))
        ready.set()
        assert go.wait(task)
        task.idle(GRACE)
        return seen

    ch = me.fork(child, name="child")
    assert ready.wait(me)
    me.munmap(a, PAGE)
    assert host.kpageflags(pfn) & KPF["MMAP"] == 0
    host.hw_detect(pfn)
    go.set()
    assert ch.join(10) == 0
    # collect_procs_file still lists the child's covering VMA, but forcekill needs the
    # folio mapped: nothing is sent
    assert ch.result == []


# ====================================================================== D16
def test_pagemap_file_hwpoison_entry_has_pm_file(host):
    """pte_to_pagemap_entry(): a hwpoison entry is a pfn swap entry; its folio is not
    anonymous, so PM_FILE is set (PM_SWAP, the swap type and the pfn as offset)."""
    me, _got, _h = setup(host)
    a = shared_memfd(me, PAGE, "shm")
    me.write(a, b"f")
    pfn = me.pagemap(a).pfn
    me.madvise(a, PAGE, u.MADV_HWPOISON)
    e = me.pagemap(a)
    assert e.hwpoison and e.pfn == pfn and e.file and not e.present and not e.exclusive
    b = me.mmap(0, PAGE, RW, ANON)
    me.write(b, b"a")
    me.madvise(b, PAGE, u.MADV_HWPOISON)
    e = me.pagemap(b)
    assert e.hwpoison and not e.file


def test_pagemap_hugetlb_hwpoison_entry_reads_zero(host_factory):
    """pagemap_hugetlb_range(): a non-present huge entry reports no PM_SWAP, no pfn
    (only uffd-wp is looked at)."""
    host = host_factory(ram="128M", hugepages={"2M": 2})
    me, _got, _h = setup(host)
    a = shared_memfd(me, HPAGE, "huge", u.MFD_HUGETLB | u.MFD_HUGE_2MB)
    me.write(a, b"h")
    e = me.pagemap(a + 5 * PAGE)
    assert e.present and e.file
    me.madvise(a + 5 * PAGE, PAGE, u.MADV_HWPOISON)
    for off in (0, 5 * PAGE, HPAGE - PAGE):
        assert me.pagemap(a + off).raw == 0


# ====================================================================== D17
def test_kpageflags_free_block_is_buddy_not_compound(host):
    """stable_page_flags(): a free block of order > 0 is not a compound page; every
    page in it is KPF_BUDDY (PageBuddy on the first, is_free_buddy_page on the rest)."""
    nframes = host.meminfo()["MemTotal"] // 4
    pfn = nframes - 1024 + 7                     # inside the last order-10 free block
    for p in (nframes - 1024, pfn, nframes - 1):
        f = host.kpageflags(p)
        assert f & KPF["BUDDY"], hex(p)
        assert not f & (KPF["COMPOUND_HEAD"] | KPF["COMPOUND_TAIL"]), hex(p)


def test_kpageflags_guest_memfd_not_swapbacked(host):
    """Only shmem sets PG_swapbacked on its page-cache folios; guest_memfd's are on
    the unevictable LRU, not swap-backed."""
    me, _got, _h = setup(host)
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(PAGE, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    g = me.mmap(0, PAGE, RW, u.MAP_SHARED, gfd, 0)
    me.write(g, b"g")
    f = host.kpageflags(me.pagemap(g).pfn)
    assert f & KPF["UNEVICTABLE"] and f & KPF["LRU"] and not f & KPF["SWAPBACKED"]
    s = shared_memfd(me, PAGE, "shm")
    me.write(s, b"s")
    assert host.kpageflags(me.pagemap(s).pfn) & KPF["SWAPBACKED"]


def test_kpageflags_hugetlb_tail_pages_report_the_folio(host_factory):
    """stable_page_flags(): KPF_MMAP is page_mapped() = folio_mapped(), and for a
    HugeTLB folio KPF_HWPOISON comes from the folio's flags: every page of a mapped
    or poisoned huge page shows it, not only the head."""
    host = host_factory(ram="128M", hugepages={"2M": 2})
    me, got, _h = setup(host)
    a = shared_memfd(me, HPAGE, "huge", u.MFD_HUGETLB | u.MFD_HUGE_2MB)
    me.write(a, b"h")
    head = me.pagemap(a).pfn
    for p in (head, head + 7, head + 511):
        f = host.kpageflags(p)
        assert f & (KPF["HUGE"] | KPF["MMAP"]) == KPF["HUGE"] | KPF["MMAP"], hex(p)
        assert not f & KPF["HWPOISON"]
    assert host.kpageflags(head + 7) & KPF["COMPOUND_TAIL"]
    with pytest.raises(Stop):
        got.clear()
        _h.stop = True
        me.madvise(a + 5 * PAGE, PAGE, u.MADV_HWPOISON)
    _h.stop = False
    for p in (head, head + 5, head + 7, head + 511):
        assert host.kpageflags(p) & KPF["HWPOISON"], hex(p)


def test_shared_anonymous_mapping_is_shmem(host):
    """mmap_region(): MAP_SHARED|MAP_ANONYMOUS is shmem_zero_setup(), a shmem file
    ("dev/zero"): a read fault gets a real page (no zero page), pagemap says PM_FILE
    ("file-page or shared-anon"), kpageflags swap-backed, not anonymous, and a forked
    child shares the pages both ways."""
    me, _got, _h = setup(host)
    a = me.mmap(0, 2 * PAGE, RW, u.MAP_SHARED | u.MAP_ANONYMOUS)
    assert me.read(a + PAGE, 4) == bytes(4)
    me.write(a, b"parent")
    e = me.pagemap(a + PAGE)
    assert e.present and e.file and e.pfn != zero_pfn(me)
    f = host.kpageflags(me.pagemap(a).pfn)
    assert f & KPF["SWAPBACKED"] and not f & KPF["ANON"]

    def child(task):
        seen = task.read(a, 6)
        task.write(a + PAGE, b"child")
        return seen

    ch = me.fork(child, name="child")
    assert ch.join(10) == 0
    assert ch.result == b"parent"
    assert me.read(a + PAGE, 5) == b"child"
    me.munmap(a, 2 * PAGE)
    assert host.check_invariants() == []


def test_populate_shared_writable_does_not_dirty(host):
    """populate_vma_page_range(): FOLL_WRITE only for private writable mappings ("shared
    mappings ... don't COW and we would not want to dirty them for nothing"): a
    MAP_SHARED|MAP_POPULATE mapping is faulted in with reads, its pages stay clean."""
    me, _got, _h = setup(host)
    fd = me.memfd_create("shm")
    me.ftruncate(fd, 2 * PAGE)
    a = me.mmap(0, 2 * PAGE, RW, u.MAP_SHARED | u.MAP_POPULATE, fd, 0)
    for off in (0, PAGE):
        e = me.pagemap(a + off)
        assert e.present
        assert not host.kpageflags(e.pfn) & (1 << u.KPF_DIRTY)
    b = me.mmap(0, PAGE, RW, ANON | u.MAP_POPULATE)
    e = me.pagemap(b)                             # private writable: a write fault
    assert e.present and e.pfn != zero_pfn(me)
