"""mlock(2), mlock2(2), munlock(2), MAP_LOCKED (mm/mlock.c, mm/mmap.c do_mmap) and
MAP_SHARED|MAP_ANONYMOUS across fork (mm/shmem.c shmem_zero_setup), as the
memory-failure tests see them: the pages are faulted in (for a private writable
mapping with write faults, so they are dirty), PG_mlocked and PG_unevictable
(kpageflags KPF_MLOCKED, KPF_UNEVICTABLE); memory_failure()'s unmap munlocks them,
so it names them by the plain LRU entries of error_states[] ("dirty LRU page")."""
import signal
import struct

import pytest
from selftest_harness import AO, AR, PAGE, RW, Pipe, attach, dmesg_has

import emu
from emu import uapi as u

MLOCKED = 1 << u.KPF_MLOCKED
UNEVICTABLE = 1 << u.KPF_UNEVICTABLE
DIRTY = 1 << u.KPF_DIRTY


def _flags(h, me, addr):
    return h.kpageflags(me.pagemap(addr).pfn)


def _locked(h, me, addr):
    """smaps "Locked:" of the VMA holding addr (bytes)."""
    return next(v for v in h.smaps(me.tgid) if v["start"] <= addr < v["end"])["Locked"]


def test_tinjpage_mlocked_anonymous_state(host_factory):
    """mce-test tinjpage.c `mlocked anonymous`: MAP_PRIVATE|MAP_ANONYMOUS|MAP_LOCKED,
    then madvise(MADV_HWPOISON) and a write.  MAP_LOCKED populates the page at mmap
    (vm_mmap_pgoff -> mm_populate, FOLL_WRITE for a private writable VMA:
    populate_vma_page_range), so it is present, dirty, mlocked and unevictable
    before any access.  The hwpoison unmap munlocks it (try_to_unmap_one:
    folio_remove_rmap_pte -> munlock_vma_folio, drained by mlock_drain_local and
    hwpoison_user_mappings' `if (mlocked) shake_folio()`), so identify_page_state's
    first look at the current flags finds "dirty LRU page: Recovered", not the
    saved "dirty mlocked LRU page" (an anonymous folio is MF_RECOVERED in
    me_pagecache_clean)."""
    h = host_factory()
    me, rec = attach(h, name="tinjpage")
    page = me.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_LOCKED)
    pm = me.pagemap(page)
    assert pm.present and not pm.file
    fl = h.kpageflags(pm.pfn)
    assert fl & MLOCKED and fl & UNEVICTABLE
    assert _locked(h, me, page) == PAGE
    assert rec.run(me.madvise, page, PAGE, u.MADV_HWPOISON) == ("jump", (AR, page, 12))
    assert dmesg_has(h, "%#x: recovery action for dirty LRU page: Recovered" % pm.pfn)
    assert not h.kpageflags(pm.pfn) & (MLOCKED | UNEVICTABLE)
    assert rec.run(me.write, page, b"\x02") == ("jump", (AR, page, 12))


def test_mlock_populates_and_munlock_releases(host_factory):
    """mlock(2) of part of a private anonymous mapping: the VMA is split, the range
    is faulted in for write and mlocked (mm/mlock.c do_mlock -> __mm_populate);
    munlock(2) clears PG_mlocked and PG_unevictable (munlock_folio), the pages stay
    mapped.  len is rounded with the offset in the page (start &= PAGE_MASK)."""
    h = host_factory()
    me, _rec = attach(h, name="mlock")
    base = me.mmap(0, 4 * PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    assert me.mlock(base + PAGE + 100, PAGE) == 0          # pages 1 and 2
    assert not me.pagemap(base).present
    assert not me.pagemap(base + 3 * PAGE).present
    for a in (base + PAGE, base + 2 * PAGE):
        fl = _flags(h, me, a)
        assert fl & MLOCKED and fl & UNEVICTABLE
    vmas = [(v["start"], v["end"], v["Locked"]) for v in h.smaps(me.tgid)]
    assert (base + PAGE, base + 3 * PAGE, 2 * PAGE) in vmas
    assert me.munlock(base + PAGE, 2 * PAGE) == 0
    for a in (base + PAGE, base + 2 * PAGE):
        assert me.pagemap(a).present
        assert not _flags(h, me, a) & (MLOCKED | UNEVICTABLE)
    assert all(v["Locked"] == 0 for v in h.smaps(me.tgid))


def test_mlock2_onfault_locks_at_fault(host_factory):
    """mlock2(MLOCK_ONFAULT): VM_LOCKONFAULT, nothing populated
    (populate_vma_page_range returns at once); a later fault mlocks the page."""
    h = host_factory()
    me, _rec = attach(h, name="mlock")
    a = me.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    assert me.mlock2(a, PAGE, u.MLOCK_ONFAULT) == 0
    assert not me.pagemap(a).present
    me.write(a, b"x")
    assert _flags(h, me, a) & MLOCKED


def test_mlock_errors_change_nothing(host_factory):
    """EINVAL for mlock2 flags other than MLOCK_ONFAULT and for a range that wraps;
    ENOMEM for a range with a hole (apply_vma_lock_flags); len 0 is a no-op."""
    h = host_factory()
    me, _rec = attach(h, name="mlock")
    a = me.mmap(0, 2 * PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.munmap(a + PAGE, PAGE)
    with pytest.raises(OSError) as e:
        me.mlock2(a, PAGE, 2)
    assert e.value.errno == u.EINVAL
    with pytest.raises(OSError) as e:
        me.mlock(a, 2 * PAGE)
    assert e.value.errno == u.ENOMEM
    with pytest.raises(OSError) as e:
        me.munlock(a, 2 * PAGE)
    assert e.value.errno == u.ENOMEM
    with pytest.raises(OSError) as e:
        me.mlock(a, (1 << 64) - PAGE)
    assert e.value.errno == u.EINVAL
    assert me.mlock(a, 0) == 0
    assert not me.pagemap(a).present
    assert all(v["Locked"] == 0 for v in h.smaps(me.tgid))


def test_mlock_of_poisoned_page_is_ehwpoison(host_factory):
    """mlock over a hwpoison entry: the VMA is locked, then __mm_populate's fault
    gets VM_FAULT_HWPOISON (faultin_page: -EHWPOISON), which mlock returns
    (__mlock_posix_error_return maps only EFAULT and ENOMEM); no signal."""
    h = host_factory(madvise_action_required=False)
    me, rec = attach(h, name="mlock")
    a = me.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"x")
    me.madvise(a, PAGE, u.MADV_HWPOISON)
    with pytest.raises(OSError) as e:
        me.mlock(a, PAGE)
    assert e.value.errno == u.EHWPOISON
    assert rec.take() == []


def test_mlock_not_inherited_across_fork(host_factory):
    """Memory locks are not inherited by fork (dup_mmap clears VM_LOCKED_MASK):
    the child's VMA is not locked, its private copy not mlocked."""
    h = host_factory()
    me, _rec = attach(h, name="mlock")
    a = me.mmap(0, PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_LOCKED)
    go, done = Pipe(), Pipe()

    def child(task):
        done.put(struct.pack("<Q", task.tgid))
        go.get(task)
        return 0

    ch = me.fork(child, name="mlock-child")
    tgid = struct.unpack("<Q", done.get_bytes(8))[0]
    (v,) = [v for v in h.smaps(tgid) if v["start"] == a]
    assert v["Locked"] == 0
    go.put(b"g")
    assert ch.join(30) == 0
    assert _locked(h, me, a) == PAGE


def test_shared_anonymous_is_shared_with_fork_child(host_factory):
    """tinjpage.c `mmap shared` / selftests mm/memory-failure.c style: a
    MAP_SHARED|MAP_ANONYMOUS mapping (no MAP_POPULATE) written before fork is the
    same shmem page in the child (same pfn, its stores seen by the parent), and the
    child's MADV_HWPOISON reaches the parent, early kill, with BUS_MCEERR_AO."""
    h = host_factory()
    me, rec = attach(h, name="shared")
    h.sysctl("vm.memory_failure_early_kill", 1)
    a = me.mmap(0, PAGE, RW, u.MAP_SHARED | u.MAP_ANONYMOUS)
    me.write(a, b"p")
    pfn = me.pagemap(a).pfn
    out = Pipe()

    def child(task):
        emu.sigaction(signal.SIGBUS, signal.SIG_DFL)
        assert task.read(a, 1) == b"p"              # dup_mmap copied no PTE: a fault
        out.put(struct.pack("<Q", task.pagemap(a).pfn))
        task.write(a, b"c")
        task.madvise(a, PAGE, u.MADV_HWPOISON)
        return 0

    ch = me.fork(child, name="shared-child")
    assert struct.unpack("<Q", out.get_bytes(8))[0] == pfn
    assert ch.join(30) == -signal.SIGBUS           # 6.18: AR in madvise, SIG_DFL
    rec.wait(me)
    assert rec.take() == [(AO, a, 12)]
    assert dmesg_has(h, "%#x: recovery action for dirty LRU page" % pfn)


@pytest.mark.parametrize("advice", ["MADV_DONTNEED", "MADV_FREE", "MADV_REMOVE"])
def test_madvise_zap_of_locked_vma_is_einval(host_factory, advice):
    """MADV_DONTNEED/MADV_FREE on a VM_LOCKED VMA (madvise_dontneed_free_valid_vma
    forbids VM_LOCKED) and MADV_REMOVE (madvise_remove) fail with EINVAL; the page
    stays mapped and mlocked."""
    h = host_factory()
    me, _rec = attach(h, name="mlock")
    flags = u.MAP_SHARED if advice == "MADV_REMOVE" else u.MAP_PRIVATE
    a = me.mmap(0, PAGE, RW, flags | u.MAP_ANONYMOUS | u.MAP_LOCKED)
    me.write(a, b"x")
    with pytest.raises(OSError) as e:
        me.madvise(a, PAGE, getattr(u, advice))
    assert e.value.errno == u.EINVAL
    assert me.pagemap(a).present and _flags(h, me, a) & MLOCKED


def test_shared_anonymous_locked_page(host_factory):
    """MAP_SHARED|MAP_ANONYMOUS|MAP_LOCKED: the shmem page is populated by a read
    fault (FOLL_WRITE only for private writable VMAs), mlocked; written, then
    poisoned, it is a "dirty LRU page" to memory_failure(): the hwpoison unmap
    munlocked it (see test_tinjpage_mlocked_anonymous_state)."""
    h = host_factory(madvise_action_required=False)
    me, _rec = attach(h, name="mlock")
    a = me.mmap(0, PAGE, RW, u.MAP_SHARED | u.MAP_ANONYMOUS | u.MAP_LOCKED)
    pm = me.pagemap(a)
    assert pm.present and pm.file
    fl = h.kpageflags(pm.pfn)
    assert fl & MLOCKED and fl & UNEVICTABLE and not fl & DIRTY
    me.write(a, b"x")
    me.madvise(a, PAGE, u.MADV_HWPOISON)
    assert dmesg_has(h, "%#x: recovery action for dirty LRU page" % pm.pfn)
    assert not h.kpageflags(pm.pfn) & (MLOCKED | UNEVICTABLE)


def test_munmap_munlocks_page_cache_folio(host_factory):
    """Unmapping a VM_LOCKED VMA munlocks what it mapped (folio_remove_rmap ->
    munlock_vma_folio): a memfd page stays in the page cache, no longer mlocked or
    unevictable, unless another VM_LOCKED VMA still maps it."""
    h = host_factory()
    me, _rec = attach(h, name="mlock")
    fd = me.memfd_create("locked")
    me.ftruncate(fd, PAGE)
    a = me.mmap(0, PAGE, RW, u.MAP_SHARED | u.MAP_LOCKED, fd, 0)
    b = me.mmap(0, PAGE, RW, u.MAP_SHARED | u.MAP_LOCKED, fd, 0)
    pfn = me.pagemap(a).pfn
    assert me.pagemap(b).pfn == pfn
    me.munmap(a, PAGE)
    assert h.kpageflags(pfn) & MLOCKED                   # b still locks it
    me.munmap(b, PAGE)
    fl = h.kpageflags(pfn)
    assert not fl & (MLOCKED | UNEVICTABLE) and fl & (1 << u.KPF_LRU)
