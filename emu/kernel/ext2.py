"""A disk file system with a page cache (fs/ext2, fs/open.c, fs/namei.c).

The emulated machine has one ext2 file system holding every path: its "disk" is the
supervisor's own memory (each file's bytes in `inode.private["data"]`), apart from
the frames.  Reads and writes go through the page cache (frames in shm): a page
read from the disk is clean, a write(2) or a store through a shared mapping dirties
it, and writeback (fsync, fdatasync, msync MS_SYNC) copies dirty pages to the disk.
So memory_failure() of a clean page loses nothing (the next read re-reads the disk)
and of a dirty page loses the data and leaves -EIO for fsync (mapping_set_error).
"""
from __future__ import annotations

import posixpath

from .. import uapi as u
from .filemap import errseq_sample, file_write_and_wait_range
from .fs import (
    MAX_LFS_FILESIZE,
    File,
    FileOps,
    Inode,
    filemap_add_folio,
    filemap_read,
    filemap_remove_folio,
    truncate_inode_pages_range,
    unmap_mapping_range,
)
from .mm import PAGE_SHIFT, PAGE_SIZE, VM_FAULT_OK, VM_FAULT_SIGBUS
from .page_alloc import PG_dirty, PG_lru, PG_uptodate
from .sysargs import _int

EXT2_BLOCK_SIZE = PAGE_SIZE
PATH_MAX = 4096
NAME_MAX = 255
S_DEV = "emu0"                   # sb->s_id, in ext2_error()'s messages
UMASK = 0o022                    # the emulated processes' umask


def ext2_max_size(bits: int) -> int:
    """fs/ext2/super.c ext2_max_size(): the largest file whose data and indirect
    blocks fit in i_blocks (2^32 - 1 sectors); s_maxbytes for this block size."""
    ndir, ppb = 12, 1 << (bits - 2)
    upper = ((1 << 32) - 1) >> (bits - 9)
    res = ndir + ppb + ppb ** 2 + ppb ** 3
    meta = 1 + (1 + ppb) + (1 + ppb + ppb * ppb)
    if res + meta > upper:
        res = upper
        upper -= ndir
        meta = 1
        upper -= ppb
        if upper < ppb * ppb:
            meta += 1 + -(-upper // ppb)
        else:
            meta += 1 + ppb
            upper -= ppb * ppb
            meta += 1 + -(-upper // ppb) + -(-upper // (ppb * ppb))
        res -= meta
    return min(res << bits, MAX_LFS_FILESIZE)


S_MAXBYTES = ext2_max_size(12)


class Ext2Ops(FileOps):
    """ext2_file_operations / ext2_aops (no DAX): generic_file_read_iter and
    write_iter, generic_file_llseek, ext2_fsync, generic_file_mmap (filemap_fault,
    filemap_map_pages, filemap_page_mkwrite), generic_error_remove_folio."""

    name = "ext2"
    writeback = True          # mapping_can_writeback(): shared writable PTEs start read-only
    map_pages = True
    has_read = has_write = fmode_pread = True
    llseek = "generic"
    fsync = "fs"
    statfs_magic = u.EXT2_SUPER_MAGIC
    maxbytes = S_MAXBYTES

    st_mode = u.S_IFREG | 0o644              # each inode keeps its own: private["mode"]

    def st_nlink(self, inode: Inode) -> int:
        return 1 if inode.private.get("path") else 0

    def stat_blocks(self, k, inode: Inode) -> int:
        """i_blocks: the data blocks ext2_get_block allocated (indirect blocks not
        counted), in 512-byte sectors."""
        return len(inode.private["blocks"]) * (EXT2_BLOCK_SIZE >> 9)

    def mmap_check(self, k, file: File, shared: bool, prot: int) -> None:
        return None

    # ---- the page cache ----
    def read_folio(self, k, inode: Inode, index: int) -> int | None:
        """filemap_read_folio -> ext2 read_folio (mpage_read_folio): a new clean,
        up-to-date folio on the LRU, filled from the disk."""
        if index << PAGE_SHIFT >= inode.size:
            return None
        try:
            pfn = filemap_add_folio(k, inode, index, 0, PG_lru | PG_uptodate)
        except MemoryError:
            raise OSError(u.ENOMEM, "page cache: out of memory") from None
        data = inode.private["data"]
        chunk = bytes(data[index << PAGE_SHIFT:(index + 1) << PAGE_SHIFT])
        if chunk:
            k.core.phys_write(pfn, 0, chunk)
        return pfn

    def fault(self, k, inode: Inode, index: int):
        """filemap_fault: past EOF is SIGBUS; else the cached folio or one read in."""
        if index >= (inode.size + PAGE_SIZE - 1) >> PAGE_SHIFT:
            return VM_FAULT_SIGBUS, 0
        pfn = inode.pages.get(index)
        if pfn is None:
            pfn = self.read_folio(k, inode, index)
        return VM_FAULT_OK, pfn

    def read(self, k, inode: Inode, n: int, off: int) -> bytes:
        return filemap_read(k, inode, n, off)

    def write(self, k, inode: Inode, data: bytes, off: int) -> int:
        """generic_perform_write: write_begin (block_write_begin allocates the block
        and reads a partly written page that holds file data), copy, mark dirty."""
        if off < 0:
            raise OSError(u.EINVAL, "write")
        if off >= self.maxbytes:                     # generic_write_check_limits
            raise OSError(u.EFBIG, "write: beyond s_maxbytes")
        data = data[:self.maxbytes - off]
        core = k.core
        pos, i = off, 0
        while i < len(data):
            index, po = pos >> PAGE_SHIFT, pos & (PAGE_SIZE - 1)
            chunk = min(PAGE_SIZE - po, len(data) - i)
            pfn = inode.pages.get(index)
            if pfn is None:
                if chunk < PAGE_SIZE and index << PAGE_SHIFT < inode.size:
                    pfn = self.read_folio(k, inode, index)
                else:
                    try:
                        pfn = filemap_add_folio(k, inode, index, 0, PG_lru | PG_uptodate)
                    except MemoryError:
                        if i:
                            break
                        raise OSError(u.ENOMEM, "page cache: out of memory") from None
            core.phys_write(pfn, po, data[i:i + chunk])
            k.mm.folio_mark_dirty(core.head(pfn))
            inode.private["blocks"].add(index)
            pos += chunk
            i += chunk
            inode.size = max(inode.size, pos)
        k.inode_sync(inode)
        return i

    def writepage(self, k, inode: Inode, index: int, pfn: int) -> None:
        """ext2_writepages: the folio's bytes below i_size go to the disk."""
        n = min(PAGE_SIZE, inode.size - (index << PAGE_SHIFT))
        if n <= 0:
            return
        data = inode.private["data"]
        off = index << PAGE_SHIFT
        if len(data) < off:
            data.extend(bytes(off - len(data)))
        data[off:off + n] = k.core.phys_read(pfn, 0, n)

    def truncate(self, k, inode: Inode, length: int) -> None:
        """ext2_setsize: truncate_setsize (the partial page zeroed past the new end,
        whole pages after it dropped) and the blocks past it freed."""
        if length > self.maxbytes:
            raise OSError(u.EFBIG, "truncate: beyond s_maxbytes")
        if length < inode.size:
            start = (length + PAGE_SIZE - 1) >> PAGE_SHIFT
            pfn = inode.pages.get(length >> PAGE_SHIFT)
            if length & (PAGE_SIZE - 1) and pfn is not None:
                po = length & (PAGE_SIZE - 1)
                k.core.phys_write(pfn, po, bytes(PAGE_SIZE - po))
            truncate_inode_pages_range(k, inode, start, None, even_cows=True)
            del inode.private["data"][length:]
            inode.private["blocks"] = {b for b in inode.private["blocks"] if b < start}
        inode.size = length
        k.inode_sync(inode)

    def error_remove_folio(self, k, inode: Inode, head: int) -> int:
        """generic_error_remove_folio -> truncate_inode_folio: unmap what is left,
        cancel the dirty state, remove the folio from the page cache; 0."""
        index = k.core.index(head)
        if k.mm.folio_mapped(head):
            unmap_mapping_range(k, inode, index, index + 1, even_cows=False)
        k.core.test_clear_flag(head, PG_dirty)       # folio_cancel_dirty
        filemap_remove_folio(k, inode, head)
        return 0

    def do_fsync(self, k, file: File, start: int, end: int, datasync: bool) -> int:
        """ext2_fsync -> generic_buffers_fsync: write back and wait, this file's
        error once (file_check_and_advance_wb_err); -EIO is logged by ext2_error."""
        err = file_write_and_wait_range(k, file, start, end)
        if err == -u.EIO:
            ext2_error(k, "ext2_fsync", "detected IO error when writing metadata buffers")
        return err


EXT2_OPS = Ext2Ops()


def ext2_error(k, function: str, msg: str) -> None:
    """fs/ext2/super.c ext2_error() (errors=continue, mke2fs's default): KERN_CRIT."""
    k.log("EXT2-fs (%s): error: %s: %s", S_DEV, function, msg)


# ------------------------------------------------------------------ the name space
def lookup_path(path) -> str:
    """getname + path_lookupat, for the one directory the emulator has: a path names
    a file of the root file system; "/" (and a trailing slash) is the directory."""
    if not isinstance(path, str):
        raise OSError(u.EFAULT, "path")
    if not path:
        raise OSError(u.ENOENT, "empty path")
    if len(path.encode()) >= PATH_MAX:
        raise OSError(u.ENAMETOOLONG, "path")
    if "\0" in path:
        raise OSError(u.EINVAL, "path: embedded NUL")
    if any(len(c.encode()) > NAME_MAX for c in path.split("/")):
        raise OSError(u.ENAMETOOLONG, "path component")
    return "/" + posixpath.normpath("/" + path).lstrip("/")


def do_sys_open(k, proc, path, flags: int, mode: int) -> int:
    """open(2): O_CREAT (O_EXCL), O_TRUNC (even with O_RDONLY, as Linux does),
    O_APPEND; the file's f_wb_err is sampled from the mapping (errseq_sample)."""
    if flags & u.O_PATH or flags & u.O_TMPFILE == u.O_TMPFILE:
        raise OSError(u.EINVAL, "open: O_PATH and O_TMPFILE are not emulated")
    if flags & u.O_ACCMODE == 3:                  # build_open_flags: no access mode
        raise OSError(u.EINVAL, "open: access mode 3")
    name = lookup_path(path)
    dir_ = name == "/" or path.endswith("/")
    ns = k.ext2_files
    inode = None if dir_ else ns.get(name)
    if dir_:
        if flags & u.O_CREAT or flags & u.O_ACCMODE != u.O_RDONLY or flags & u.O_TRUNC:
            raise OSError(u.EISDIR, "open: a directory")
        raise OSError(u.EINVAL, "open: directories are not emulated")
    if inode is None:
        if not flags & u.O_CREAT:
            raise OSError(u.ENOENT, "open: %s" % name)
        inode = k.new_inode(EXT2_OPS, name)       # the name space's reference
        inode.private.update(data=bytearray(), blocks=set(), path=name,
                             mode=u.S_IFREG | (mode & 0o7777 & ~UMASK))
        ns[name] = inode
    elif flags & u.O_CREAT and flags & u.O_EXCL:
        raise OSError(u.EEXIST, "open: %s exists" % name)
    elif flags & u.O_DIRECTORY:
        raise OSError(u.ENOTDIR, "open: not a directory")
    if flags & u.O_TRUNC and inode.size:
        inode.ops.truncate(k, inode, 0)
    inode.nlink += 1
    f = File(inode, flags=flags & ~(u.O_CREAT | u.O_EXCL | u.O_TRUNC | u.O_NOCTTY),
             wb_err=errseq_sample(inode.wb_err))
    return proc.fd_install(f)


def do_unlinkat(k, path) -> int:
    name = lookup_path(path)
    if name == "/":
        raise OSError(u.EISDIR, "unlink: a directory")
    ns = k.ext2_files
    inode = ns.pop(name, None)
    if inode is None:
        raise OSError(u.ENOENT, "unlink: %s" % name)
    inode.private["path"] = None
    inode.ops.release(k, inode)                   # the name space's reference
    return 0


def sys_open(k, t, a):
    return do_sys_open(k, t.process, a.get("path"), _int(a, "flags", 0), _int(a, "mode", 0))


def sys_creat(k, t, a):
    return do_sys_open(k, t.process, a.get("path"), u.O_CREAT | u.O_WRONLY | u.O_TRUNC,
                       _int(a, "mode", 0))


def sys_unlink(k, t, a):
    return do_unlinkat(k, a.get("path"))


SYSCALLS = {"open": sys_open, "creat": sys_creat, "unlink": sys_unlink}
