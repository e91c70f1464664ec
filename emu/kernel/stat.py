"""fstat(2) (fs/stat.c generic_fillattr) and fstatfs(2) (fs/statfs.c, each file
system's ->statfs) on every kind of file descriptor."""
from __future__ import annotations

from .sysargs import _int

NAME_MAX = 255
EMU_DEV = {"ext2": 0x800001}      # st_dev: one block device for the disk file system


def sys_fstat(k, t, a):
    """generic_fillattr: st_mode from the inode (a memfd is S_IFREG|0777 and unlinked,
    st_nlink 0; guest_memfd S_IFREG|0600; an anonymous inode 0600 with no type)."""
    f = t.process.fget(_int(a, "fd"))
    inode, ops = f.inode, f.inode.ops
    mode = inode.private.get("mode", ops.st_mode)
    return {"st_dev": EMU_DEV.get(ops.name, 0), "st_ino": inode.ino, "st_mode": mode,
            "st_nlink": ops.st_nlink(inode), "st_uid": 0, "st_gid": 0,
            "st_rdev": ops.st_rdev, "st_size": inode.size,
            "st_blksize": ops.blksize(inode), "st_blocks": ops.stat_blocks(k, inode)}


def sys_fstatfs(k, t, a):
    """vfs_statfs -> the file system's statfs: f_type is its magic (EXT2_SUPER_MAGIC,
    TMPFS_MAGIC, HUGETLBFS_MAGIC, GUEST_MEMFD_MAGIC, ANON_INODE_FS_MAGIC)."""
    f = t.process.fget(_int(a, "fd"))
    ops = f.inode.ops
    bsize = ops.blksize(f.inode)
    return {"f_type": ops.statfs_magic, "f_bsize": bsize, "f_frsize": bsize,
            "f_namelen": NAME_MAX}


SYSCALLS = {"fstat": sys_fstat, "fstatfs": sys_fstatfs}
