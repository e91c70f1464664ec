"""System V shared memory (ipc/shm.c, with the id allocation of ipc/util.c).

A segment is a file the kernel keeps open: a shmem inode (shmem_kernel_file_setup)
or, with SHM_HUGETLB, a hugetlbfs inode whose huge pages are reserved at shmget
(hugetlb_file_setup).  shmat maps it MAP_SHARED through a file of its own per
attach (do_shmat's alloc_file_clone): faults, rmap, memory_failure and early kill
see an ordinary shared file mapping.  shm_nattch counts the VMAs of those files:
the attach file's get/put are shm_vm_ops' open (fork, a VMA split) and close
(munmap, shmdt, exit).  A segment outlives its processes until IPC_RMID, and an
IPC_RMID of an attached segment only marks it SHM_DEST and makes its key private.

Every emulated task is taken as root (CAP_IPC_OWNER, CAP_IPC_LOCK): the emulator
has no credentials, so ipcperms() never refuses (docs/deviations.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import uapi as u
from .fs import File
from .mm import PAGE_SHIFT, PAGE_SIZE
from .sysargs import _int, _u64

# include/uapi/linux/shm.h, ipc/util.h
SHMMIN = 1
SHMMNI = 4096
SHMMAX = (1 << 64) - 1 - (1 << 24)
SHMALL = SHMMAX
IPCMNI_SHIFT = 15                       # ipcmni_seq_shift() without ipcmni_extend
IPCMNI = 1 << IPCMNI_SHIFT
IPCID_SEQ_MAX = 0x7FFFFFFF >> IPCMNI_SHIFT
IPC_MIN_CYCLE = 64                      # RADIX_TREE_MAP_SIZE
S_IRWXUGO = 0o777
SHM_DEST = 0o1000                       # ipc/shm.c: destroyed on the last detach
SHM_LOCKED = 0o2000

SYSCTLS = {"kernel.shmmax": (SHMMAX, 0, (1 << 64) - 1),
           "kernel.shmall": (SHMALL, 0, (1 << 64) - 1),
           "kernel.shmmni": (SHMMNI, 0, IPCMNI),
           "kernel.shm_rmid_forced": (0, 0, 1)}


def _s32(v: int) -> int:
    """A C `int` argument: the low 32 bits of the register, signed."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


@dataclass(eq=False)
class Segment:
    """struct shmid_kernel."""

    key: int
    mode: int
    segsz: int
    file: File                      # shp->shm_file: the segment's own reference
    id: int = -1
    seq: int = 0
    nattch: int = 0
    cpid: int = 0
    lpid: int = 0
    atime: int = 0
    dtime: int = 0
    ctime: int = 0
    creator: object = None          # shm_creator: the task, None once it exited
    deleted: bool = False

    @property
    def idx(self) -> int:
        return self.id & (IPCMNI - 1)

    @property
    def huge(self) -> bool:
        return self.file.inode.ops.huge


@dataclass(eq=False)
class ShmFile(File):
    """The file of one attach (shm_file_operations): every VMA mapping it holds a
    reference, and taking or dropping one is shm_open / shm_close."""

    seg: Segment | None = None
    ns: IpcNamespace | None = None

    def get(self) -> File:
        self.refs += 1
        self.ns.shm_open(self.seg)
        return self

    def put(self, k) -> None:
        self.refs -= 1              # shm_release drops sfd->file: the segment keeps its own
        self.ns.shm_close(self.seg)


@dataclass(eq=False)
class IpcNamespace:
    """The kernel's (init) IPC namespace, the shm part: shm_ids and shm_tot."""

    k: object
    segs: dict = field(default_factory=dict)      # idx -> Segment (ids->ipcs_idr)
    keys: dict = field(default_factory=dict)      # key -> Segment (ids->key_ht)
    seq: int = 0
    last_idx: int = -1
    idr_next: int = 0
    shm_tot: int = 0
    cur_tgid: int = 0               # current's tgid where the kernel runs without one (fork, exit)

    # ---------------------------------------------------------------- ipc/util.c
    def _tgid(self) -> int:
        cur = self.k.current
        return cur.tgid if cur is not None else self.cur_tgid

    def _alloc_idx(self) -> int:
        """ipc_idr_alloc: idr_alloc_cyclic over [0, max(in_use * 3 / 2, 64)) capped at
        ipc_mni; the sequence number goes up when the index wraps (idx <= last_idx)."""
        end = min(max(len(self.segs) * 3 // 2, IPC_MIN_CYCLE), IPCMNI)
        start = self.idr_next
        for lo in ((start, 0) if start > 0 else (0,)):
            idx = next((i for i in range(lo, end) if i not in self.segs), None)
            if idx is not None:
                return idx
        raise OSError(u.ENOSPC, "shmget: no free id")

    def _obtain_check(self, shmid: int) -> Segment:
        """ipc_obtain_object_check: the index must be in use and the sequence match."""
        seg = self.segs.get(shmid & (IPCMNI - 1))
        if seg is None or shmid >> IPCMNI_SHIFT != seg.seq:
            raise OSError(u.EINVAL, "invalid shmid %d" % shmid)
        return seg

    # ---------------------------------------------------------------- segments
    def shmget(self, task, key: int, size: int, shmflg: int) -> int:
        """ksys_shmget -> ipcget: IPC_PRIVATE always creates; a key names the existing
        segment (EEXIST with IPC_CREAT|IPC_EXCL, EINVAL if smaller than size) or,
        with IPC_CREAT, a new one; ENOENT without."""
        if key != u.IPC_PRIVATE:
            seg = self.keys.get(key)
            if seg is not None:
                if shmflg & u.IPC_CREAT and shmflg & u.IPC_EXCL:
                    raise OSError(u.EEXIST, "shmget: key %#x exists" % key)
                if seg.segsz < size:                      # shm_more_checks
                    raise OSError(u.EINVAL, "shmget: segment smaller than size")
                return seg.id                             # ipcperms: root
            if not shmflg & u.IPC_CREAT:
                raise OSError(u.ENOENT, "shmget: no segment for key %#x" % key)
        return self.newseg(task, key, size, shmflg)

    def newseg(self, task, key: int, size: int, shmflg: int) -> int:
        """newseg: the checks, then the file, then the id (ipc_addid)."""
        k = self.k
        numpages = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
        if size < SHMMIN or size > k.sysctl["kernel.shmmax"]:
            raise OSError(u.EINVAL, "shmget: size out of [SHMMIN, shmmax]")
        if (numpages << PAGE_SHIFT) & ((1 << 64) - 1) < size:
            raise OSError(u.ENOSPC, "shmget: size overflows")
        if self.shm_tot + numpages > k.sysctl["kernel.shmall"]:
            raise OSError(u.ENOSPC, "shmget: shmall exceeded")
        hname = None
        if shmflg & u.SHM_HUGETLB:
            from .hugetlb import hstate_name

            hname = hstate_name((shmflg >> u.SHM_HUGE_SHIFT) & u.SHM_HUGE_MASK)
            if hname is None:                             # hstate_sizelog() is NULL
                raise OSError(u.EINVAL, "shmget: no such huge page size")
        name = "SYSV%08x" % (key & 0xFFFFFFFF)
        if hname is not None:
            f = self._hugetlb_file_setup(name, size, hname, bool(shmflg & u.SHM_NORESERVE))
        else:
            from .shmem import SHMEM_OPS

            inode = k.new_inode(SHMEM_OPS, name)          # shmem_kernel_file_setup
            inode.size = size
            k.inode_sync(inode)
            f = File(inode)
        if len(self.segs) >= min(k.sysctl["kernel.shmmni"], IPCMNI):   # ipc_addid
            f.put(k)                                      # no_id: fput(file)
            raise OSError(u.ENOSPC, "shmget: shmmni segments in use")
        idx = self._alloc_idx()
        if idx <= self.last_idx:
            self.seq = self.seq + 1 if self.seq + 1 < IPCID_SEQ_MAX else 0
        self.last_idx = idx
        self.idr_next = idx + 1
        seg = Segment(key, shmflg & S_IRWXUGO, size, f, id=(self.seq << IPCMNI_SHIFT) + idx,
                      seq=self.seq, cpid=task.tgid, ctime=int(time.time()), creator=task)
        self.segs[idx] = seg
        if key != u.IPC_PRIVATE:
            self.keys[key] = seg
        self.shm_tot += numpages
        k.trace("shmget", id=seg.id, key=key, size=size, ino=f.inode.ino)
        return seg.id

    def _hugetlb_file_setup(self, name: str, size: int, hname: str, noreserve: bool) -> File:
        """hugetlb_file_setup: a hugetlbfs inode of the size rounded up to the huge
        page, its pages reserved now (HugePages_Rsvd) unless SHM_NORESERVE; ENOMEM
        when the pool cannot promise them (a machine without a pool has an empty one)."""
        from .hugetlb import HSTATE_ORDER, HUGETLBFS_OPS, HState

        k = self.k
        if k.hugetlb is None:
            raise OSError(u.ENOMEM, "shmget: no free huge pages to reserve")
        h = k.hugetlb.hstates.get(hname) or HState(hname, HSTATE_ORDER[hname])
        hsize = PAGE_SIZE << h.order
        inode = k.new_inode(HUGETLBFS_OPS, name)
        inode.private["hstate"] = h
        inode.huge_order = h.order
        inode.size = (size + hsize - 1) // hsize * hsize
        f = File(inode)
        if not noreserve:
            try:
                HUGETLBFS_OPS.reserve(k, inode, 0, inode.size)
            except OSError:
                f.put(k)                                  # iput(): nothing stays
                raise
        k.inode_sync(inode)
        return f

    def may_destroy(self, seg: Segment) -> bool:
        return seg.nattch == 0 and (bool(self.k.sysctl["kernel.shm_rmid_forced"])
                                    or bool(seg.mode & SHM_DEST))

    def destroy(self, seg: Segment) -> None:
        """shm_destroy: the id goes (ipc_rmid), then the segment's file: its pages
        return to the allocator or the HugeTLB pool, its reservation is released."""
        self.shm_tot -= (seg.segsz + PAGE_SIZE - 1) >> PAGE_SHIFT
        del self.segs[seg.idx]
        if self.keys.get(seg.key) is seg:
            del self.keys[seg.key]
        seg.deleted = True
        self.k.trace("shm_destroy", id=seg.id, ino=seg.file.inode.ino)
        seg.file.put(self.k)

    def shm_open(self, seg: Segment) -> None:
        """__shm_open (shm_mmap, and vm_ops->open on fork or a split)."""
        seg.atime = int(time.time())
        seg.lpid = self._tgid()
        seg.nattch += 1

    def shm_close(self, seg: Segment) -> None:
        """shm_close (vm_ops->close) and do_shmat's own drop: destroyed when the last
        attach of a SHM_DEST segment goes (or of any, with shm_rmid_forced)."""
        seg.lpid = self._tgid()
        seg.dtime = int(time.time())
        seg.nattch -= 1
        if self.may_destroy(seg):
            self.destroy(seg)

    # ---------------------------------------------------------------- attach
    def shmat(self, task, shmid: int, addr: int, shmflg: int) -> int:
        """do_shmat: check the address, take an attach (nattch + 1 while mapping),
        do_mmap(MAP_SHARED [| MAP_FIXED]) of the segment's whole i_size, drop it."""
        if shmid < 0:
            raise OSError(u.EINVAL, "shmat: negative shmid")
        flags = u.MAP_SHARED
        if addr:
            if addr & (u.SHMLBA - 1):
                if not shmflg & u.SHM_RND:
                    raise OSError(u.EINVAL, "shmat: address not SHMLBA-aligned")
                addr &= ~(u.SHMLBA - 1)
                if not addr and shmflg & u.SHM_REMAP:
                    raise OSError(u.EINVAL, "shmat: SHM_RND rounded the address to 0")
            flags |= u.MAP_FIXED
        elif shmflg & u.SHM_REMAP:
            raise OSError(u.EINVAL, "shmat: SHM_REMAP needs an address")
        prot = u.PROT_READ if shmflg & u.SHM_RDONLY else u.PROT_READ | u.PROT_WRITE
        if shmflg & u.SHM_EXEC:
            prot |= u.PROT_EXEC
        seg = self._obtain_check(shmid)
        size = seg.file.inode.size
        mm = task.process.mm
        if addr and not shmflg & u.SHM_REMAP:
            if addr + size >= 1 << 64 or mm.overlapping(addr, addr + size):
                raise OSError(u.EINVAL, "shmat: the range is mapped (no SHM_REMAP)")
        seg.nattch += 1
        f = ShmFile(seg.file.inode, seg=seg, ns=self)     # alloc_file_clone
        try:
            addr = self.k.mm.mmap(task.process, addr, size, prot, flags, f, 0)
        finally:
            f.refs -= 1                                   # fput(file), then out_nattch:
            seg.nattch -= 1                               # no shm_close (times, lprid)
            if self.may_destroy(seg):
                self.destroy(seg)
        self.k.trace("shmat", id=seg.id, addr=addr, size=size)
        return addr

    def shmdt(self, task, addr: int) -> int:
        """ksys_shmdt: unmap the shm VMA that maps the segment from `addr` on (vm_pgoff
        == its distance from addr), then the other fragments of the same attach
        within the segment's size; EINVAL when none starts there."""
        if addr & (PAGE_SIZE - 1):
            raise OSError(u.EINVAL, "shmdt: unaligned address")
        mm = task.process.mm
        vmas = [v for v in mm.vmas if v.end > addr]       # find_vma(mm, addr) onwards
        found, size = None, 0
        for i, v in enumerate(vmas):
            if isinstance(v.file, ShmFile) and v.start >= addr \
                    and (v.start - addr) // PAGE_SIZE == v.pgoff:
                found, size = v.file, v.file.inode.size
                self.k.mm.munmap(task.process, v.start, v.end - v.start)
                vmas = vmas[i + 1:]
                break
        if found is None:
            raise OSError(u.EINVAL, "shmdt: no segment attached at %#x" % addr)
        size = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        for v in vmas:
            if v.end - addr > size:
                break
            if v.file is found and (v.start - addr) // PAGE_SIZE == v.pgoff:
                self.k.mm.munmap(task.process, v.start, v.end - v.start)
        return 0

    # ---------------------------------------------------------------- control
    def shmctl(self, task, shmid: int, cmd: int, buf) -> object:
        """ksys_shmctl: IPC_STAT (the shmid64_ds, as a dict), IPC_SET (the mode's
        permission bits), IPC_RMID, SHM_LOCK / SHM_UNLOCK."""
        if cmd < 0 or shmid < 0:
            raise OSError(u.EINVAL, "shmctl: negative shmid or cmd")
        if cmd == u.IPC_STAT:
            return self.stat(self._obtain_check(shmid))
        if cmd == u.IPC_RMID:
            self.rmid(self._obtain_check(shmid))
            return 0
        if cmd == u.IPC_SET:
            if not isinstance(buf, dict) or not isinstance(buf.get("mode"), int) \
                    or isinstance(buf.get("mode"), bool):
                raise OSError(u.EFAULT, "shmctl: IPC_SET needs buf={'mode': ...}")
            seg = self._obtain_check(shmid)
            seg.mode = (seg.mode & ~S_IRWXUGO) | (buf["mode"] & S_IRWXUGO)   # ipc_update_perm
            seg.ctime = int(time.time())
            return 0
        if cmd in (u.SHM_LOCK, u.SHM_UNLOCK):
            self.do_lock(self._obtain_check(shmid), cmd == u.SHM_LOCK)
            return 0
        raise OSError(u.EINVAL, "shmctl: command not emulated")

    def rmid(self, seg: Segment) -> None:
        """do_shm_rmid: an attached segment is marked SHM_DEST and its key made
        private (no shmget finds it); an unattached one is destroyed now."""
        if seg.nattch:
            seg.mode |= SHM_DEST
            if self.keys.get(seg.key) is seg:
                del self.keys[seg.key]
            seg.key = u.IPC_PRIVATE
        else:
            self.destroy(seg)

    @staticmethod
    def stat(seg: Segment) -> dict:
        """shmctl_stat's shmid64_ds (uids: root, see the module docstring)."""
        return {"shm_perm": {"key": seg.key, "uid": 0, "gid": 0, "cuid": 0, "cgid": 0,
                             "mode": seg.mode, "seq": seg.seq},
                "shm_segsz": seg.segsz, "shm_atime": seg.atime, "shm_dtime": seg.dtime,
                "shm_ctime": seg.ctime, "shm_cpid": seg.cpid, "shm_lpid": seg.lpid,
                "shm_nattch": seg.nattch}

    def do_lock(self, seg: Segment, lock: bool) -> None:
        """shmctl_do_lock: nothing for a HugeTLB segment; else shmem_lock() makes the
        mapping unevictable (folios added to the LRU from now on are PG_unevictable,
        memory_failure's "unevictable LRU page"), and SHM_UNLOCK's
        shmem_unlock_mapping() moves its folios back (check_move_unevictable_folios)."""
        if seg.huge:
            return
        from .page_alloc import PG_mlocked, PG_unevictable

        inode = seg.file.inode
        if lock:
            inode.private["unevictable"] = True
            seg.mode |= SHM_LOCKED
            return
        if not seg.mode & SHM_LOCKED:
            return
        inode.private.pop("unevictable", None)
        seg.mode &= ~SHM_LOCKED
        core = self.k.core
        for pfn in set(inode.pages.values()):
            fl = core.flags(pfn)
            if fl & PG_unevictable and not fl & PG_mlocked:
                core.set_flags(pfn, fl & ~PG_unevictable)

    # ---------------------------------------------------------------- exit, /proc
    def exit_shm(self, task) -> None:
        """exit_shm: the segments this task created lose their creator; with
        shm_rmid_forced those nobody attaches are destroyed."""
        forced = self.k.sysctl["kernel.shm_rmid_forced"]
        for seg in list(self.segs.values()):
            if seg.creator is task:
                seg.creator = None
                if forced and self.may_destroy(seg):
                    self.destroy(seg)

    def destroy_orphaned(self) -> None:
        """shm_destroy_orphaned (kernel.shm_rmid_forced set to 1): segments whose
        creator exited and that nobody attaches go now."""
        for seg in list(self.segs.values()):
            if seg.creator is None and self.may_destroy(seg):
                self.destroy(seg)

    def sysvipc_shm(self) -> str:
        """/proc/sysvipc/shm (sysvipc_shm_proc_show, 64-bit columns), by index."""
        out = ["       key      shmid perms                  size  cpid  lpid nattch   uid"
               "   gid  cuid  cgid      atime      dtime      ctime                   rss"
               "                  swap\n"]
        for idx in sorted(self.segs):
            s = self.segs[idx]
            inode = s.file.inode
            rss = inode.nrpages * PAGE_SIZE
            out.append("%10d %10d  %4o %21u %5u %5u  %5u %5u %5u %5u %5u %10u %10u %10u %21u %21u\n"
                       % (_s32(s.key), s.id, s.mode, s.segsz, s.cpid, s.lpid, s.nattch, 0, 0,
                          0, 0, s.atime, s.dtime, s.ctime, rss, 0))
        return "".join(out)


# ------------------------------------------------------------------ system calls
def sys_shmget(k, t, a):
    return k.ipc.shmget(t, _s32(_int(a, "key")), _u64(a, "size"), _s32(_int(a, "shmflg", 0)))


def sys_shmat(k, t, a):
    return k.ipc.shmat(t, _s32(_int(a, "shmid")), _u64(a, "shmaddr", 0), _s32(_int(a, "shmflg", 0)))


def sys_shmdt(k, t, a):
    return k.ipc.shmdt(t, _u64(a, "shmaddr"))


def sys_shmctl(k, t, a):
    return k.ipc.shmctl(t, _s32(_int(a, "shmid")), _s32(_int(a, "cmd")), a.get("buf"))


def host_sysvipc_shm(k, a):
    return k.ipc.sysvipc_shm()


SYSCALLS = {"shmget": sys_shmget, "shmat": sys_shmat, "shmdt": sys_shmdt, "shmctl": sys_shmctl}
HOSTCALLS = {"sysvipc_shm": host_sysvipc_shm}
