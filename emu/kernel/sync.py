"""fsync(2), fdatasync(2) (fs/sync.c) and msync(2) (mm/msync.c)."""
from __future__ import annotations

from .. import uapi as u
from .mm import PAGE_SHIFT, PAGE_SIZE
from .sysargs import _int, _u64

LLONG_MAX = (1 << 63) - 1


def vfs_fsync_range(k, f, start: int, end: int, datasync: bool) -> int:
    """A file without f_op->fsync (guest_memfd, KVM's) is -EINVAL; shmem and
    hugetlbfs have noop_fsync; ext2 writes back and reports its writeback error."""
    how = f.inode.ops.fsync
    if how is None:
        return -u.EINVAL
    if how == "noop":
        return 0
    return f.inode.ops.do_fsync(k, f, start, end, datasync)


def _fsync(k, t, a, datasync: bool) -> int:
    f = t.process.fget(_int(a, "fd"))
    ret = vfs_fsync_range(k, f, 0, LLONG_MAX, datasync)
    if ret:
        raise OSError(-ret, "fdatasync" if datasync else "fsync")
    return 0


def sys_fsync(k, t, a):
    return _fsync(k, t, a, False)


def sys_fdatasync(k, t, a):
    return _fsync(k, t, a, True)


def sys_msync(k, t, a):
    """mm/msync.c: MS_SYNC fsyncs (datasync) the file of each shared file mapping in
    the range, through the struct file the mapping holds (its f_wb_err); MS_ASYNC
    does nothing; an unmapped hole is -ENOMEM once the rest is done."""
    start, length, flags = _u64(a, "addr"), _u64(a, "length"), _int(a, "flags")
    if flags & ~(u.MS_ASYNC | u.MS_INVALIDATE | u.MS_SYNC) or start % PAGE_SIZE:
        raise OSError(u.EINVAL, "msync")
    if flags & u.MS_ASYNC and flags & u.MS_SYNC:
        raise OSError(u.EINVAL, "msync: MS_ASYNC and MS_SYNC")
    end = start + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
    if end >= 1 << 64:
        raise OSError(u.ENOMEM, "msync: wraps")
    if end == start:
        return 0
    mm = t.process.mm
    unmapped = 0
    while True:
        vma = next((v for v in mm.vmas if v.end > start), None)   # find_vma
        if vma is None:
            raise OSError(u.ENOMEM, "msync: unmapped range")
        if start < vma.start:
            if flags == u.MS_ASYNC:
                raise OSError(u.ENOMEM, "msync: unmapped range")
            start = vma.start
            if start >= end:
                raise OSError(u.ENOMEM, "msync: unmapped range")
            unmapped = u.ENOMEM
        if flags & u.MS_INVALIDATE and vma.locked:
            raise OSError(u.EBUSY, "msync: MS_INVALIDATE on VM_LOCKED")
        fstart = (start - vma.start) + (vma.pgoff << PAGE_SHIFT)
        fend = fstart + (min(end, vma.end) - start) - 1
        start = vma.end
        if flags & u.MS_SYNC and vma.file is not None and vma.shared:
            err = vfs_fsync_range(k, vma.file, fstart, fend, True)
            if err:
                raise OSError(-err, "msync")
            if start >= end:
                break
        elif start >= end:
            break
    if unmapped:
        raise OSError(unmapped, "msync: unmapped range")
    return 0


SYSCALLS = {"fsync": sys_fsync, "fdatasync": sys_fdatasync, "msync": sys_msync}
