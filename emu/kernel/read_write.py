"""read(2), write(2), pread64, pwrite64 and lseek(2) (fs/read_write.c).

Each open file (struct file, shared by fork) has a position, f_pos, that read and
write advance and lseek moves.  What a file type supports is what its f_op has
(FileOps.has_read, has_write, fmode_pread, llseek); the VFS checks these before the
file system sees the call, in this order: FMODE_READ/WRITE (-EBADF), FMODE_CAN_READ
/WRITE (-EINVAL), rw_verify_area (-EINVAL), and for pread/pwrite FMODE_PREAD (-ESPIPE).
"""
from __future__ import annotations

import base64
import binascii

from .. import uapi as u
from .filemap import mapping_seek_hole_data
from .fs import MAX_LFS_FILESIZE, MAX_RW_COUNT
from .sync import vfs_fsync_range
from .sysargs import _int, _u64
from .uaccess import copy_from_user


def rw_verify_area(count: int, pos: int | None) -> None:
    """rw_verify_area(): a negative count or position (none of these files has
    FMODE_UNSIGNED_OFFSET) is -EINVAL."""
    if count < 0:
        raise OSError(u.EINVAL, "count")
    if pos is not None and (pos < 0 or pos + count > MAX_LFS_FILESIZE):
        raise OSError(u.EINVAL, "file position")


def vfs_read(k, f, count: int, pos: int) -> bytes:
    if not f.readable:
        raise OSError(u.EBADF, "read: file not open for reading")
    if not f.inode.ops.has_read:
        raise OSError(u.EINVAL, "read: the file has no read_iter")
    rw_verify_area(count, pos)
    return f.inode.ops.read(k, f.inode, min(count, MAX_RW_COUNT), pos)


def _user_buffer(k, t, a) -> tuple[bytes | None, int, int | None]:
    """The write's data: (bytes, count, None) from the request, or (None, count, addr)
    to be copied from this thread's memory."""
    if "addr" in a:
        addr, count = _u64(a, "addr"), _int(a, "count")
        if count < 0:
            raise OSError(u.EINVAL, "write: negative count")
        return None, count, addr
    data = a.get("data")
    if not isinstance(data, str):
        raise OSError(u.EFAULT, "data")
    try:
        buf = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise OSError(u.EFAULT, "data: not base64") from None
    return buf, len(buf), None


def vfs_write(k, t, f, a, pos: int) -> tuple[int, int]:
    """vfs_write: (bytes written, the position after them).  O_APPEND writes at
    i_size, pwrite too (generic_write_checks: IOCB_APPEND wins over the offset)."""
    buf, count, addr = _user_buffer(k, t, a)
    if not f.writable:
        raise OSError(u.EBADF, "write: file not open for writing")
    if not f.inode.ops.has_write:
        raise OSError(u.EINVAL, "write: the file has no write_iter")
    rw_verify_area(count, pos)
    if f.flags & u.O_APPEND:
        pos = f.inode.size
    if pos + count > MAX_LFS_FILESIZE:
        raise OSError(u.EFBIG, "write: beyond the maximum file size")
    if addr is not None:
        buf = copy_from_user(k, t, addr, min(count, MAX_RW_COUNT))
        if not buf and count:
            raise OSError(u.EFAULT, "write: bad user buffer")
    n = f.inode.ops.write(k, f.inode, buf[:MAX_RW_COUNT], pos)
    if n > 0 and f.flags & u.O_DSYNC:
        # generic_write_sync(): O_DSYNC (and O_SYNC, which includes it) writes the
        # range back before returning; its error replaces the count
        err = vfs_fsync_range(k, f, pos, pos + n - 1, f.flags & u.O_SYNC != u.O_SYNC)
        if err:
            raise OSError(-err, "write: O_SYNC writeback")
    return n, pos + n


def sys_read(k, t, a):
    f = t.process.fget(_int(a, "fd"))
    data = vfs_read(k, f, _int(a, "n"), f.pos)
    f.pos += len(data)
    return base64.b64encode(data).decode()


def sys_write(k, t, a):
    f = t.process.fget(_int(a, "fd"))
    n, f.pos = vfs_write(k, t, f, a, f.pos)
    return n


def sys_pread(k, t, a):
    """ksys_pread64: a negative offset is -EINVAL before the descriptor is looked
    at; a file without FMODE_PREAD (an anonymous inode) is -ESPIPE."""
    pos = _int(a, "offset", 0)
    if pos < 0:
        raise OSError(u.EINVAL, "pread: negative offset")
    f = t.process.fget(_int(a, "fd"))
    if not f.inode.ops.fmode_pread:
        raise OSError(u.ESPIPE, "pread: not seekable")
    return base64.b64encode(vfs_read(k, f, _int(a, "n"), pos)).decode()


def sys_pwrite(k, t, a):
    """pwrite64.  The data comes with the request, or, with `addr` and `count`, from
    this thread's memory: copied from user as the kernel does, so a bad buffer is
    -EFAULT after what was copied before it (a short write)."""
    pos = _int(a, "offset", 0)
    if pos < 0:
        raise OSError(u.EINVAL, "pwrite: negative offset")
    f = t.process.fget(_int(a, "fd"))
    if not f.inode.ops.fmode_pread:
        raise OSError(u.ESPIPE, "pwrite: not seekable")
    return vfs_write(k, t, f, a, pos)[0]


# ------------------------------------------------------------------ lseek
def vfs_setpos(f, offset: int, maxsize: int) -> int:
    if offset < 0 or offset > maxsize:
        raise OSError(u.EINVAL, "lseek: position out of range")
    f.pos = offset
    return offset


def generic_file_llseek_size(k, f, offset: int, whence: int, maxsize: int, eof: int) -> int:
    if whence == u.SEEK_END:
        offset += eof
    elif whence == u.SEEK_CUR:
        if offset == 0:
            return f.pos
        offset += f.pos
    elif whence in (u.SEEK_DATA, u.SEEK_HOLE):
        if offset < 0 or offset >= eof:          # (unsigned long long)offset >= eof
            raise OSError(u.ENXIO, "lseek: past the end of the file")
        if whence == u.SEEK_HOLE:
            offset = eof
    return vfs_setpos(f, offset, maxsize)


def generic_file_llseek(k, f, offset: int, whence: int) -> int:
    return generic_file_llseek_size(k, f, offset, whence, f.inode.ops.maxbytes, f.inode.size)


def shmem_file_llseek(k, f, offset: int, whence: int) -> int:
    """mm/shmem.c: SEEK_DATA/SEEK_HOLE by the pages in the page cache."""
    if whence not in (u.SEEK_DATA, u.SEEK_HOLE):
        return generic_file_llseek_size(k, f, offset, whence, MAX_LFS_FILESIZE, f.inode.size)
    if offset < 0:
        raise OSError(u.ENXIO, "lseek: negative offset")
    pos = mapping_seek_hole_data(k, f.inode, offset, f.inode.size, whence)
    if pos < 0:
        raise OSError(-pos, "lseek: no more data")
    return vfs_setpos(f, pos, MAX_LFS_FILESIZE)


def default_llseek(k, f, offset: int, whence: int) -> int:
    """fs/read_write.c default_llseek (hugetlbfs): no upper bound but the sign."""
    size = f.inode.size
    if whence == u.SEEK_END:
        offset += size
    elif whence == u.SEEK_CUR:
        if offset == 0:
            return f.pos
        offset += f.pos
    elif whence == u.SEEK_DATA:
        if offset >= size:
            raise OSError(u.ENXIO, "lseek: past the end of the file")
    elif whence == u.SEEK_HOLE:
        if offset >= size:
            raise OSError(u.ENXIO, "lseek: past the end of the file")
        offset = size
    if offset < 0 or offset > MAX_LFS_FILESIZE:
        raise OSError(u.EINVAL, "lseek: negative position")
    f.pos = offset
    return offset


def noop_llseek(k, f, offset: int, whence: int) -> int:
    """KVM's file operations: the position stays where it is (0)."""
    return f.pos


LLSEEK = {"generic": generic_file_llseek, "shmem": shmem_file_llseek,
          "default": default_llseek, "noop": noop_llseek}


def sys_lseek(k, t, a):
    """ksys_lseek: a bad whence is -EINVAL before vfs_llseek's -ESPIPE for a file
    without llseek (guest_memfd's kvm_gmem_fops has none)."""
    f = t.process.fget(_int(a, "fd"))
    offset, whence = _int(a, "offset"), _int(a, "whence")
    if offset >= 1 << 63:
        offset -= 1 << 64                           # off_t
    if not 0 <= whence <= u.SEEK_MAX:
        raise OSError(u.EINVAL, "lseek: whence")
    if f.inode.ops.llseek is None:
        raise OSError(u.ESPIPE, "lseek: the file has no llseek")
    return LLSEEK[f.inode.ops.llseek](k, f, offset, whence)


SYSCALLS = {"read": sys_read, "write": sys_write, "pread": sys_pread, "pwrite": sys_pwrite,
            "lseek": sys_lseek}
