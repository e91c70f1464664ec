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
    segs = shm.Segments.create(1024, 4, 2, 64, 64, 8, 8)
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
