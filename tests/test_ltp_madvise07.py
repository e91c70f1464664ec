"""Port of LTP testcases/kernel/syscalls/madvise/madvise07.c (Richard Palethorpe):
"Check that accessing a page marked with MADV_HWPOISON results in SIGBUS."

run() forks a child that maps a private anonymous page, memsets it to 'L', calls
madvise(MADV_HWPOISON) (-1 would be TCONF for EINVAL, TFAIL otherwise), writes 'd'
and would report "Did not receive SIGBUS"; the parent passes when waitpid says
WIFSIGNALED && WTERMSIG == SIGBUS.  The child keeps SIGBUS at SIG_DFL.  Since 6.11
MADV_HWPOISON passes MF_ACTION_REQUIRED, so the child dies in madvise (a forced
BUS_MCEERR_AR); before, it died at the write.  Both pass; the port checks which.
"""
import signal

import pytest
from selftest_harness import MADVISE, PAGE, RW, Pipe, attach

import emu
from emu import uapi as u


def run_child(task, progress):
    emu.sigaction(signal.SIGBUS, signal.SIG_DFL)
    mem = task.mmap(0, PAGE, RW, u.MAP_ANONYMOUS | u.MAP_PRIVATE)
    task.write(mem, b"L" * PAGE)                          # memset(mem, 'L', msize)
    progress.put(b"i")
    task.madvise(mem, PAGE, u.MADV_HWPOISON)              # -1 -> exit(0): TCONF / TFAIL
    progress.put(b"I")
    task.write(mem, b"d")
    progress.put(b"A")                                    # "Did not receive SIGBUS ..."
    return 0


@pytest.mark.parametrize("kernel", list(MADVISE))
def test_madvise07(host_factory, kernel):
    """madvise07.c run(): the child is killed by SIGBUS (TPASS); on 6.18 inside
    madvise, before 6.11 at the write that follows."""
    h = host_factory(madvise_action_required=MADVISE[kernel])
    me, rec = attach(h, name="madvise07")
    progress = Pipe()
    child = me.fork(run_child, progress, name="madvise07-child")
    assert child.join(30) == -signal.SIGBUS               # WIFSIGNALED && WTERMSIG == SIGBUS
    assert progress.drain() == (b"i" if kernel == "6.18" else b"iI")
    assert rec.take() == []                               # the parent saw nothing
