"""The core's table mechanisms the kernel path leans on: zapping one page-table entry
(try_to_unmap_one's table half) and posting a siginfo with its doorbell.  No policy
here: the tests drive the core directly on a private pair of segments."""
import faulthandler
import os
import signal
import time

import pytest

from emu import _core as C
from emu import shm
from emu import uapi as u
from emu.kernel.page_alloc import PG_dirty, PG_lru

VA = 0x7F0000001000
PFN = 100


@pytest.fixture
def core():
    segs = shm.Segments.create(1024, 4, 2, 64, 8, 8)
    try:
        yield segs.core
    finally:
        segs.unlink()


def mapped(core, dirty: bool):
    """One order-0 folio mapped once: refcount 2 (page cache + the mapping), mapcount 1."""
    pgd = core.pt_alloc()
    core.set_folio(PFN, 0, PG_lru, 2, 7, 3)
    e = (PFN << 12) | C.PTE_PRESENT | C.PTE_RW | C.PTE_USER | C.PTE_ACCESSED
    core.pte_set(pgd, VA, e | (C.PTE_DIRTY if dirty else 0))
    core.map_add(PFN, 1)
    return pgd, e


@pytest.mark.parametrize("dirty", [True, False])
def test_pte_zap_leaves_a_hwpoison_entry_and_drops_the_page(core, dirty):
    pgd, e = mapped(core, dirty)
    poison = (PFN << 12) | C.PTE_HWPOISON                  # make_hwpoison_entry(page)
    old, head, refs = core.pte_zap(pgd, VA, True)
    assert old == e | (C.PTE_DIRTY if dirty else 0)
    assert (head, refs) == (PFN, 1)
    assert core.pte_get(pgd, VA) == poison
    assert core.mapcount(PFN) == 0 and core.refcount(PFN) == 1
    assert bool(core.flags(PFN) & PG_dirty) is dirty        # the PTE's dirty bit moved


def test_pte_zap_without_poison_clears(core):
    pgd, e = mapped(core, False)
    assert core.pte_zap(pgd, VA, False) == (e, PFN, 1)
    assert core.pte_get(pgd, VA) == 0 and core.mapcount(PFN) == 0


def test_pte_zap_of_a_non_present_entry_changes_no_page(core):
    pgd, _ = mapped(core, True)
    poison = (PFN << 12) | C.PTE_HWPOISON
    core.pte_zap(pgd, VA, True)
    before = core.frame(PFN)
    assert core.pte_zap(pgd, VA, True) == (poison, -1, 0)  # no page: nothing to poison
    assert core.pte_get(pgd, VA) == 0
    assert core.frame(PFN) == before
    assert core.pte_zap(pgd, VA + (1 << 30), False) == (0, -1, 0)   # no table there at all


def test_sig_post_queues_the_record_and_rings_the_doorbell(core):
    r, w = os.pipe()
    child = os.fork()
    if child == 0:                              # SIGBUS at its default action: dies of it
        faulthandler.disable()
        signal.signal(signal.SIGBUS, signal.SIG_DFL)
        os.write(w, b"r")
        while True:
            signal.pause()
    assert os.read(r, 1) == b"r"
    core.task_init(0, child, child, 0, b"vcpu")
    before = time.monotonic_ns()
    rung, err = core.sig_post(0, child, signal.SIGBUS, u.BUS_MCEERR_AO, VA, 12, 0, 1)
    assert err == 0 and before <= rung <= time.monotonic_ns()
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS
    t = core.task(0)
    assert (t["mb_head"], t["mb_tail"]) == (1, 0) and core.sig_pending(0)


def test_sig_post_reports_a_dead_thread_and_a_full_mailbox(core):
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)                        # reaped: its tid is gone
    core.task_init(0, child, child, 0, b"gone")
    for seq in range(C.MB_RING):
        _, err = core.sig_post(0, child, signal.SIGBUS, u.BUS_MCEERR_AO, VA, 12, 0, seq)
        assert err == -u.ESRCH
    assert core.sig_post(0, child, signal.SIGBUS, u.BUS_MCEERR_AO, VA, 12, 0, 99) is None
    assert core.task(0)["mb_head"] == C.MB_RING               # the refused one is not queued


# ------------------------------------------------------------------ rmap over i_mmap
INO, ISLOT = 7, 3


def two_mappings(core):
    """The file INO mapped by two mms: mm 0 maps pages 0-3 at VA (pgoff 0), mm 1 maps
    pages 2-3 at VA2 (pgoff 2); i_mmap in vm_pgoff order.  Page 3 is PFN, mapped
    (present) in both; page 2 is mapped in neither."""
    core.inode_set(ISLOT, INO, 1, 4 * 4096, 0, 4, 1, b"f")
    pgds = [core.pt_alloc(), core.pt_alloc()]
    for mm, pgd in enumerate(pgds):
        core.mm_init(mm, pgd)
    va2 = 0x7E0000000000
    core.vma_set(5, 0, VA, VA + 4 * 4096, 3, True, INO, 0)
    core.vma_set(2, 1, va2, va2 + 2 * 4096, 3, True, INO, 2)
    core.i_mmap_set(ISLOT, [5, 2])
    core.set_folio(PFN, 0, PG_lru | PG_dirty, 3, INO, 3)
    e = (PFN << 12) | C.PTE_PRESENT | C.PTE_RW | C.PTE_USER | C.PTE_ACCESSED
    for pgd, va in ((pgds[0], VA + 3 * 4096), (pgds[1], va2 + 4096)):
        core.pte_set(pgd, va, e)
        core.map_add(PFN, 1)
    return pgds, va2


def test_vma_address_and_rmap_file_walk_i_mmap_in_order(core):
    pgds, va2 = two_mappings(core)
    assert core.vma_address(ISLOT, 3) == [(0, VA + 3 * 4096), (1, va2 + 4096)]
    assert core.vma_address(ISLOT, 2) == [(0, VA + 2 * 4096), (1, va2)]   # covered, unmapped
    assert core.vma_address(ISLOT, 4) == []
    assert core.rmap_file(ISLOT, PFN, 3, 1, 1) == [(5, VA + 3 * 4096, PFN), (2, va2 + 4096, PFN)]
    assert core.rmap_file(ISLOT, PFN - 1, 2, 1, 1) == []                  # no PTE maps it
    core.i_mmap_set(ISLOT, [2])                                           # one VMA left
    assert core.rmap_file(ISLOT, PFN, 3, 1, 1) == [(2, va2 + 4096, PFN)]
    core.i_mmap_set(ISLOT, [])
    assert core.vma_address(ISLOT, 3) == [] and core.rmap_file(ISLOT, PFN, 3, 1, 1) == []


@pytest.mark.parametrize("hwpoison", [True, False])
def test_unmap_file_zaps_every_mapping_then_sends(core, hwpoison):
    pgds, va2 = two_mappings(core)
    core.test_set_flag(PFN, C.PG_HWPOISON)
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)                                  # a reaped tid: tgkill says ESRCH
    core.task_init(0, child, child, 0, b"gone")
    core.task_init(1, child, child, 1, b"pending")
    core.sig_post(1, child, signal.SIGBUS, u.BUS_MCEERR_AO, VA, 12, 0, 1)
    sends = [(0, child, signal.SIGBUS, u.BUS_MCEERR_AO, VA + 3 * 4096, 12, 0, 100),
             (0, child, signal.SIGBUS, u.BUS_MCEERR_AO, VA + 3 * 4096, 12, 0, 101),
             (1, child, signal.SIGBUS, u.BUS_MCEERR_AO, va2 + 4096, 12, 0, 102)]
    before = time.monotonic_ns()
    zapped, done, sent = core.unmap_file(ISLOT, PFN, 3, 1, 1, hwpoison, sends)
    assert zapped == [(5, VA + 3 * 4096, PFN, hwpoison, 2), (2, va2 + 4096, PFN, hwpoison, 1)]
    entry = (PFN << 12) | C.PTE_HWPOISON if hwpoison else 0
    assert core.pte_get(pgds[0], VA + 3 * 4096) == core.pte_get(pgds[1], va2 + 4096) == entry
    assert core.mapcount(PFN) == 0 and core.refcount(PFN) == 1
    assert before <= done <= sent[0][1]                   # every zap before the first doorbell
    assert sent == [(C.SEND_POSTED, sent[0][1], -u.ESRCH),
                    (C.SEND_PENDING, 0, 0),               # legacy_queue: the first is pending
                    (C.SEND_PENDING, 0, 0)]
    assert core.task(0)["mb_head"] == 1 and core.task(1)["mb_head"] == 1
    again, _, none = core.unmap_file(ISLOT, PFN, 3, 1, 1, hwpoison)
    assert again == [] and none == []                     # nothing is mapped any more


def test_sig_send_drops_while_one_is_pending(core):
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    core.task_init(0, child, child, 0, b"gone")
    status, rung, err = core.sig_send(0, child, signal.SIGBUS, u.BUS_MCEERR_AO, VA, 12, 0, 1)
    assert (status, err) == (C.SEND_POSTED, -u.ESRCH) and rung > 0
    assert core.sig_send(0, child, signal.SIGBUS, u.BUS_MCEERR_AO, VA, 12, 0, 2) == (
        C.SEND_PENDING, 0, 0)
    assert core.task(0)["mb_head"] == 1                   # the dropped one is not queued


def test_legacy_queue_is_the_one_drop_rule(core):
    """legacy_queue(): one definition of "a SIGBUS already pending drops the new
    one".  sig_send (other threads) applies it to the mailbox; the kernel's path for
    current asks it too, with current's reply-carried signals as pending_elsewhere."""
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    core.task_init(0, child, child, 0, b"gone")
    assert not core.legacy_queue(0) and core.legacy_queue(0, True)
    core.sig_send(0, child, signal.SIGBUS, u.BUS_MCEERR_AO, VA, 12, 0, 1)
    assert core.legacy_queue(0) and core.legacy_queue(0, False)
    assert core.sig_send(0, child, signal.SIGBUS, u.BUS_MCEERR_AO, VA, 12, 0, 2)[0] == \
        C.SEND_PENDING
