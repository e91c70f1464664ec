"""System V shared memory system calls (ipc/shm.c): mixed into Task.  A segment
outlives the processes that use it until shmctl(IPC_RMID) and its last detach."""
from __future__ import annotations


class IpcCalls:
    def shmget(self, key: int, size: int, shmflg: int = 0) -> int:
        """The id of the segment for `key` (IPC_PRIVATE: always a new one), created
        with IPC_CREAT (mode: the low 9 bits; SHM_HUGETLB [| SHM_HUGE_2MB/1GB]: huge
        pages, reserved now).  EINVAL (size < 1 or > kernel.shmmax, an existing
        segment smaller than size, an unknown huge page size), EEXIST
        (IPC_CREAT|IPC_EXCL on an existing key), ENOENT (no segment, no IPC_CREAT),
        ENOSPC (kernel.shmmni segments, kernel.shmall pages), ENOMEM (SHM_HUGETLB:
        the pool cannot reserve the huge pages)."""
        return self._call("shmget", key=key, size=size, shmflg=shmflg)

    def shmat(self, shmid: int, shmaddr: int = 0, shmflg: int = 0) -> int:
        """Map the whole segment MAP_SHARED (read-only with SHM_RDONLY) at shmaddr
        (0: the kernel chooses; SHM_RND rounds down to SHMLBA; SHM_REMAP replaces
        what is mapped there); returns the address.  EINVAL: a bad or removed id, an
        unaligned address without SHM_RND, a mapped range without SHM_REMAP,
        SHM_REMAP without an address."""
        return self._call("shmat", shmid=shmid, shmaddr=shmaddr, shmflg=shmflg)

    def shmdt(self, shmaddr: int) -> int:
        """Unmap the attach that starts at shmaddr; EINVAL when none does."""
        return self._call("shmdt", shmaddr=shmaddr)

    def shmctl(self, shmid: int, cmd: int, buf: dict | None = None):
        """IPC_STAT: the shmid64_ds as a dict (shm_perm {key, uid, gid, cuid, cgid,
        mode (with SHM_DEST, SHM_LOCKED), seq}, shm_segsz, shm_atime, shm_dtime,
        shm_ctime, shm_cpid, shm_lpid, shm_nattch); IPC_SET (buf={"mode": m}),
        IPC_RMID, SHM_LOCK, SHM_UNLOCK: 0.  EINVAL: a bad id, another command."""
        return self._call("shmctl", shmid=shmid, cmd=cmd, buf=buf)
