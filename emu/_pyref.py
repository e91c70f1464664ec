"""A pure-Python reference of the fast path (the CPU and MMU), for tests that run
the same cases against the Cython core, and as the benchmarks' Python baseline.

It reads the same shared memory through memoryviews and follows fastpath.h step
by step: walk the four levels, check present/RW and, for a guest access through
stage-2, the private/shared view (`priv`), consume latent poison (loads only),
set A/D, copy.
(A/D updates here are plain read-modify-writes: fine for a reference.)
"""
from __future__ import annotations

import struct

from . import _core as C

ACC_OK, ACC_FAULT, ACC_MCE, ACC_BADPFN = C.ACC_OK, C.ACC_FAULT, C.ACC_MCE, C.ACC_BADPFN
_PFN = C.PTE_PFN_MASK


class PyCore:
    def __init__(self, core):
        self.core = core
        info = core.info()
        cv, pv = core.views()
        self.cv, self.pv = cv, pv
        self.pt = cv[info["off_pt"]:].cast("Q")
        self.hwerr = cv[info["off_hwerr"]:info["off_hwerr"] + info["nframes"]]
        self.nframes, self.npt = info["nframes"], info["npt"]
        self.info = info

    def walk(self, pgd: int, va: int):
        """(index of the deciding entry in self.pt, level) or (None, 0)."""
        if pgd == 0 or pgd >= self.npt:
            return None, 0
        tbl = pgd * 512
        shift = 39
        for level in (4, 3, 2, 1):
            i = tbl + ((va >> shift) & 511)
            if level == 1:
                return i, 1
            e = self.pt[i]
            if not e & C.PTE_PRESENT or e & C.PTE_PSE:
                return i, level
            idx = (e & _PFN) >> 12
            if idx == 0 or idx >= self.npt:
                return None, 0
            tbl = idx * 512
            shift -= 9
        return None, 0

    def _enter(self, slot):
        off = self.info["off_tasks"] + slot * self.info["sizeof_task"] + self.info["off_task_rcu_epoch"]
        epoch = struct.unpack_from("Q", self.cv, self.info["off_epoch"])[0]
        struct.pack_into("Q", self.cv, off, epoch)
        return off

    def access(self, slot: int, pgd: int, va: int, buf, write: bool, priv: int = -1):
        """Same contract as Core.access_read/access_write: (done, status, xva, xpfn).
        `priv`: -1 for host accesses, else the guest's private (1) / shared (0) view,
        which a stage-2 entry of the other kind does not satisfy."""
        mv = memoryview(buf).cast("B")
        if len(mv) == 0:
            return 0, ACC_OK, 0, 0
        off = self._enter(slot)
        try:
            return self._access(pgd, va, mv, write, priv)
        finally:
            struct.pack_into("Q", self.cv, off, 0)

    def _access(self, pgd, va, buf, write, priv=-1):
        n, done = len(buf), 0
        want = C.PTE_ACCESSED | (C.PTE_DIRTY if write else 0)
        pt, pv = self.pt, self.pv
        while done < n:
            cur = va + done
            i, level = self.walk(pgd, cur)
            e = pt[i] if i is not None else 0
            if not e & C.PTE_PRESENT or (write and not e & C.PTE_RW) \
                    or (priv >= 0 and bool(e & C.PTE_S2_PRIVATE) != bool(priv)):
                return done, ACC_FAULT, cur, 0
            pshift = 12 if level == 1 else (21 if level == 2 else 30)
            pfn = ((e & _PFN) >> 12) + ((cur >> 12) & ((1 << (pshift - 12)) - 1))
            if pfn >= self.nframes:
                return done, ACC_BADPFN, cur, pfn
            if not write and self.hwerr[pfn]:     # a store does not consume poison
                return done, ACC_MCE, cur, pfn
            if e & want != want:
                pt[i] = e | want
            po = cur & 4095
            chunk = min(4096 - po, n - done)
            base = (pfn << 12) + po
            if write:
                pv[base:base + chunk] = buf[done:done + chunk]
            else:
                buf[done:done + chunk] = pv[base:base + chunk]
            done += chunk
        return done, ACC_OK, 0, 0

    def access_batch(self, slot, pgd, addrs, start, size, buf, write, priv=-1):
        """Same contract as Core.access_batch: (next_index, status, xva, xpfn, partial)."""
        mv = memoryview(buf).cast("B")
        m = len(addrs)
        if m == 0 or start >= m:
            return m, ACC_OK, 0, 0, 0
        if len(mv) < m * size:
            raise ValueError("buffer too small")
        off = self._enter(slot)
        try:
            for i in range(start, m):
                d, st, xva, xpfn = self._access(pgd, addrs[i], mv[i * size:(i + 1) * size], write,
                                                priv)
                if st != ACC_OK:
                    return i, st, xva, xpfn, d
            return len(addrs), ACC_OK, 0, 0, 0
        finally:
            struct.pack_into("Q", self.cv, off, 0)
