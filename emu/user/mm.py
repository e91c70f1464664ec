"""The process's memory as the worker sees it: the address-space system calls
(mm/mmap.c, mm/madvise.c, mm/memfd.c, fs/proc/task_mmu.c's pagemap) and the CPU's
loads and stores through the emulated MMU.  A load or store runs in this process
(the fast path over the shared-memory page tables); a fault or a machine check
stops it and goes to the kernel on this thread, then the access resumes."""
from __future__ import annotations

import array
import os
from collections import namedtuple

from .. import _core as C
from .. import shm
from .. import uapi as u

cores: dict[tuple, object] = {}     # supervisor segments -> the Core mapped in this process


def backend(core):
    """The CPU, for host (priv -1) and guest (stage-2) accesses: the Cython fast
    path, or with EMU_FASTPATH=python the pure-Python reference (same contract), so
    the suite can run against both."""
    if os.environ.get("EMU_FASTPATH") == "python":
        from .._pyref import PyCore

        py = PyCore(core)
        return (lambda s, p, va, b, priv=-1: py.access(s, p, va, b, False, priv),
                lambda s, p, va, b, priv=-1: py.access(s, p, va, b, True, priv),
                py.access_batch)
    return core.access_read, core.access_write, core.access_batch


def core_for(names) -> object:
    """The segments of one supervisor, mapped once per process (a forked child
    reuses the mapping it inherited)."""
    key = tuple(names)
    if key not in cores:
        cores[key] = shm.Segments.open(key).core
    return cores[key]


def release_core(key: tuple) -> None:
    """Forget a supervisor's segments: the mapping goes with the last reference
    (Core.__dealloc__ unmaps), so nothing can touch unmapped memory."""
    cores.pop(key, None)


PagemapEntry = namedtuple("PagemapEntry", "raw pfn present swapped hwpoison file exclusive")


class MmCalls:
    """Task's memory system calls and its CPU (mixed into Task; `self._call` is the
    system call, `self._rd`/`_wr`/`_bt` the CPU from backend())."""

    # ---- system calls ----
    def memfd_create(self, name: str, flags: int = 0) -> int:
        return self._call("memfd_create", name=name, flags=flags)

    def mmap(self, addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
        return self._call("mmap", addr=addr, length=length, prot=prot, flags=flags, fd=fd,
                          offset=offset)

    def munmap(self, addr: int, length: int) -> None:
        self._call("munmap", addr=addr, length=length)

    def mlock(self, addr: int, length: int) -> int:
        """Lock and fault in the pages of [addr, addr + length) (VM_LOCKED)."""
        return self._call("mlock", addr=addr, length=length)

    def mlock2(self, addr: int, length: int, flags: int = 0) -> int:
        """mlock with MLOCK_ONFAULT: lock the pages as they are faulted in."""
        return self._call("mlock2", addr=addr, length=length, flags=flags)

    def munlock(self, addr: int, length: int) -> int:
        return self._call("munlock", addr=addr, length=length)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        self._call("madvise", addr=addr, length=length, advice=advice)

    def pagemap(self, addr: int) -> PagemapEntry:
        v = self._call("pagemap", addr=addr)
        present = bool(v & u.PM_PRESENT)
        swapped = bool(v & u.PM_SWAP)
        swp_type = v & ((1 << u.PM_SWAP_TYPE_BITS) - 1)
        hwpoison = swapped and swp_type == u.SWP_HWPOISON
        pfn = (v & u.PM_PFRAME_MASK) if present else (
            (v & u.PM_PFRAME_MASK) >> u.PM_SWAP_TYPE_BITS if hwpoison else 0)
        return PagemapEntry(v, pfn, present, swapped, hwpoison, bool(v & u.PM_FILE),
                            bool(v & u.PM_MMAP_EXCLUSIVE))

    # ---- the CPU: loads and stores ----
    def read(self, addr: int, n: int) -> bytes:
        return self._load(addr, n, False)

    def _load(self, addr: int, n: int, fetch: bool) -> bytes:
        buf = bytearray(n)
        mv = memoryview(buf)
        off = 0
        rd = self._rd
        while True:
            done, st, xva, xpfn = rd(self.slot, self.pgd, addr + off, mv[off:])
            off += done
            if st == C.ACC_OK:
                return bytes(buf)
            self._trap(st, xva, xpfn, False, fetch=fetch)

    def write(self, addr: int, data) -> None:
        mv = memoryview(data).cast("B")
        off = 0
        wr = self._wr
        while True:
            done, st, xva, xpfn = wr(self.slot, self.pgd, addr + off, mv[off:])
            off += done
            if st == C.ACC_OK:
                return
            self._trap(st, xva, xpfn, True)

    def fetch(self, addr: int, n: int) -> bytes:
        """An instruction fetch of n bytes at addr: a read() whose consumption of a
        latent error is an instruction-fetch machine check, which cannot be
        restarted (MCG_STATUS.RIPV clear: memory_failure() gets MF_MUST_KILL).  The
        emulated MMU has no NX bit: whatever read() may read, fetch() may."""
        return self._load(addr, n, True)

    def read_batch(self, addrs, size: int) -> bytearray:
        """`size` bytes at each address, in one fast-path call (traps resume in place)."""
        if not isinstance(addrs, array.array):
            addrs = array.array("Q", addrs)
        buf = bytearray(len(addrs) * size)
        self._batch(addrs, size, buf, False)
        return buf

    def write_batch(self, addrs, size: int, data) -> None:
        if not isinstance(addrs, array.array):
            addrs = array.array("Q", addrs)
        if len(data) != len(addrs) * size:
            raise OSError(u.EINVAL, "write_batch: data must be len(addrs) * size bytes")
        self._batch(addrs, size, data, True)

    def _batch(self, addrs, size, buf, write) -> None:
        i = 0
        bt = self._bt
        while True:
            i, st, xva, xpfn, _partial = bt(self.slot, self.pgd, addrs, i, size, buf, write)
            if st == C.ACC_OK:
                return
            self._trap(st, xva, xpfn, write)

    def _trap(self, st: int, va: int, pfn: int, write: bool, fetch: bool = False) -> None:
        if st == C.ACC_FAULT:
            self._call("fault", addr=va, write=write)
        elif st == C.ACC_MCE:
            self._call("mce", addr=va, pfn=pfn, fetch=fetch)
        else:
            raise OSError(u.EFAULT, "bad frame in a page-table entry")
