"""The page allocator's fresh frames: host memory populated ahead of the allocator
(residency read with mincore(2) on the physmem segment), contents untouched."""
import ctypes
import mmap

import posix_ipc
import pytest

from emu import shm
from emu.kernel.page_alloc import NR_RESERVED, POPULATE_AHEAD, BuddyAllocator

PAGE = 4096
NFRAMES = 4096                         # 16 MiB

_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def ram():
    segs = shm.Segments.create(NFRAMES, 8, 8, 64, 16, 16)
    seg = posix_ipc.SharedMemory(segs.names[1])
    view = mmap.mmap(seg.fd, NFRAMES * PAGE)
    seg.close_fd()
    try:
        yield segs.core, view
    finally:
        view.close()
        segs.unlink()


def resident(view, lo, hi):
    """mincore(2) of frames [lo, hi): is the host page behind each in memory?"""
    buf = (ctypes.c_char * len(view)).from_buffer(view)
    vec = (ctypes.c_ubyte * (hi - lo))()
    rc = _libc.mincore(ctypes.c_void_p(ctypes.addressof(buf) + lo * PAGE),
                       ctypes.c_size_t((hi - lo) * PAGE), vec)
    del buf
    assert rc == 0, ctypes.get_errno()
    return [v & 1 for v in vec]


def test_populate_ahead_of_the_allocator(ram):
    core, view = ram
    b = BuddyAllocator(core, NFRAMES)
    h0 = b.hiwater
    assert h0 == NR_RESERVED
    assert resident(view, h0, h0 + POPULATE_AHEAD + 8) == [0] * (POPULATE_AHEAD + 8)

    assert b.populate_ahead(POPULATE_AHEAD)
    assert resident(view, h0, h0 + POPULATE_AHEAD) == [1] * POPULATE_AHEAD
    assert resident(view, h0 + POPULATE_AHEAD, h0 + POPULATE_AHEAD + 8) == [0] * 8
    assert not b.populate_ahead()                     # the reserve is full

    # fresh RAM goes out bottom-up: exactly the frames that were populated
    got = [b.alloc(0) for _ in range(10)]
    assert got == list(range(h0, h0 + 10))
    assert b.hiwater == h0 + 10
    assert b.populate_ahead(3)                        # an idle loop tops up a few at a time
    assert resident(view, h0, h0 + POPULATE_AHEAD + 3) == [1] * (POPULATE_AHEAD + 3)
    assert resident(view, h0 + POPULATE_AHEAD + 3, h0 + POPULATE_AHEAD + 4) == [0]


def test_populate_ahead_stops_at_the_end_of_ram(ram):
    core, view = ram
    b = BuddyAllocator(core, NFRAMES)
    while True:                                       # take every frame
        try:
            b.alloc(0)
        except MemoryError:
            break
    assert b.hiwater == NFRAMES
    assert not b.populate_ahead(POPULATE_AHEAD)


def test_phys_populate_keeps_contents(ram):
    core, view = ram
    data = bytes(range(256)) * 16
    core.phys_write(100, 0, data)
    core.phys_populate(96, 16)
    assert core.phys_read(100, 0, PAGE) == data
    assert core.phys_read(101, 0, PAGE) == bytes(PAGE)
    assert view[100 * PAGE:101 * PAGE] == data
    with pytest.raises(ValueError):
        core.phys_populate(NFRAMES - 1, 2)
