"""Files, inodes and the page cache (include/linux/fs.h, mm/filemap.c, mm/truncate.c).

An inode's `ops` is its file system: shmem (memfd), guest_memfd, ... Each one
supplies the address_space and file operations the generic code calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import _core as C
from .. import uapi as u
from . import hugetlb_fault
from .mm import PAGE_SHIFT, PAGE_SIZE
from .page_alloc import PG_dirty, PG_hwpoison

# include/linux/fs.h
MAX_LFS_FILESIZE = (1 << 63) - 1
MAX_RW_COUNT = (1 << 31) - 4096        # rw_verify_area: INT_MAX & PAGE_MASK


@dataclass(eq=False, slots=True)
class Inode:
    ino: int
    ops: FileOps
    name: str
    size: int = 0
    flags: int = 0
    pages: dict[int, int] = field(default_factory=dict)   # index -> folio head pfn
    i_mmap: list = field(default_factory=list)    # VMAs mapping this file, vm_pgoff order
    nlink: int = 0                                        # open files + bindings
    private: dict = field(default_factory=dict)           # per-fs data
    slot: int = -1                                        # row in the core's inode table

    huge_order: int = 0       # HugeTLB files: `pages` keeps one entry per folio (its base)
    wb_err: int = 0           # mapping->wb_err (an errseq_t, lib/errseq.c)
    as_eio: bool = False      # AS_EIO in mapping->flags

    def find(self, core, index: int) -> int | None:
        """filemap_get_folio + folio_page: the pfn of the page at index, or None.
        A HugeTLB file is indexed by folio; a page of a split folio that left the
        cache is seen through its frame (no longer owned by this inode)."""
        if not self.huge_order:
            return self.pages.get(index)
        off = index & ((1 << self.huge_order) - 1)
        base = self.pages.get(index - off)
        if base is None:
            return None
        pfn = base + off
        return pfn if core.mapping(pfn) == self.ino else None

    @property
    def nrpages(self) -> int:
        return len(self.pages) << self.huge_order


@dataclass(eq=False)
class File:
    """struct file: shared by dup and fork, so is its position (f_pos)."""
    inode: Inode
    refs: int = 1
    flags: int = u.O_RDWR     # f_flags: the access mode, O_APPEND
    pos: int = 0              # f_pos
    wb_err: int = 0           # f_wb_err: the mapping's errseq as this file last saw it

    @property
    def readable(self) -> bool:           # FMODE_READ
        return self.flags & u.O_ACCMODE in (u.O_RDONLY, u.O_RDWR)

    @property
    def writable(self) -> bool:           # FMODE_WRITE
        return self.flags & u.O_ACCMODE in (u.O_WRONLY, u.O_RDWR)

    def get(self) -> File:
        self.refs += 1
        return self

    def put(self, k) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.inode.ops.release(k, self.inode)


class FileOps:
    """Defaults: what a file system that does not implement an operation returns."""

    name = "file"
    writeback = False         # mapping_can_writeback()
    shmem = False             # shmem_mapping()
    huge = False              # hugetlbfs: huge folios, huge mappings
    map_pages = False         # vm_ops->map_pages: read faults map neighbours (fault-around)
    gmem = False              # guest_memfd: where the policy's gmem decisions apply
    # read(2) reaching a folio whose first page to read is poisoned fails with -EIO even
    # after earlier folios were copied (hugetlbfs_read_iter); otherwise the bytes
    # already read are returned (shmem_file_read_iter, filemap_read: retval ?: error)
    read_eio_at_folio_start = False
    # f_op entries the VFS looks at before calling the file system (fs/read_write.c):
    # read_iter/write_iter (FMODE_CAN_READ/WRITE: else -EINVAL), FMODE_PREAD (set by
    # do_dentry_open and memfd_create, not by alloc_file_pseudo: else -ESPIPE), the
    # llseek (None: no FMODE_LSEEK, -ESPIPE; see read_write.LLSEEK) and fsync (None:
    # -EINVAL).  The defaults are an anonymous inode's (kvm_vm_fops: noop_llseek).
    has_read = False
    has_write = False
    fmode_pread = False
    llseek: str | None = "noop"
    fsync: str | None = None
    # fstat/fstatfs (fs/stat.c generic_fillattr, fs/statfs.c): anon_inode_fs_type
    maxbytes = (1 << 63) - 1             # sb->s_maxbytes: MAX_LFS_FILESIZE
    statfs_magic = 0x09041934            # ANON_INODE_FS_MAGIC
    st_mode = 0o600                      # alloc_anon_inode: S_IRUSR | S_IWUSR, no type

    def stat_blocks(self, k, inode: Inode) -> int:
        """i_blocks (512-byte units): page cache filesystems count what they allocated."""
        return 0

    st_rdev = 0

    def st_nlink(self, inode: Inode) -> int:
        return 1

    def blksize(self, inode: Inode) -> int:
        """st_blksize: 1 << i_blkbits."""
        return PAGE_SIZE

    def do_fsync(self, k, file: File, start: int, end: int, datasync: bool) -> int:
        """f_op->fsync when `fsync` is "fs"; "noop" is noop_fsync (0)."""
        return 0

    def release(self, k, inode: Inode) -> None:
        inode.nlink -= 1
        if inode.nlink <= 0:
            truncate_inode_pages_range(k, inode, 0, None)
            k.inode_release(inode)

    def mmap_check(self, k, file: File, shared: bool, prot: int) -> None:
        raise OSError(u.ENODEV, "%s: no mmap" % self.name)   # no f_op->mmap

    def mmap_done(self, k, inode: Inode, end: int, prot: int) -> None:
        """After the mapping of file bytes [.., end) is in place (f_op->mmap's tail)."""
        return None

    def map_ok(self, inode: Inode, index: int) -> bool:
        return True

    def fault(self, k, inode: Inode, index: int) -> tuple[int, int]:
        raise OSError(u.ENODEV, "no fault handler")

    def read(self, k, inode: Inode, n: int, off: int) -> bytes:
        raise OSError(u.EINVAL, "read")

    def write(self, k, inode: Inode, data: bytes, off: int) -> int:
        raise OSError(u.EINVAL, "write")

    def fallocate(self, k, inode: Inode, mode: int, off: int, length: int) -> None:
        raise OSError(u.EOPNOTSUPP, "fallocate")

    def truncate(self, k, inode: Inode, length: int) -> None:
        raise OSError(u.EINVAL, "ftruncate")

    def error_remove_folio(self, k, inode: Inode, head: int) -> int:
        """a_ops->error_remove_folio; None means the fs has none (mapping_evict_folio)."""
        return None

    def remove_folio(self, k, inode: Inode, head: int) -> None:
        filemap_remove_folio(k, inode, head)

    def read_folio(self, k, inode: Inode, index: int) -> int | None:
        """A page not in the cache: a_ops->read_folio brings it in from the disk;
        None for memory filesystems (a hole reads as zeros)."""
        return None

    def page_poisoned(self, k, pfn: int) -> bool:
        """Is this 4K page of the page cache known to be poisoned (reads stop there)?"""
        return bool(k.core.flags(pfn) & PG_hwpoison)


def filemap_add_folio(k, inode: Inode, index: int, order: int, flags: int) -> int:
    """The page cache holds folio_nr_pages references (__filemap_add_folio)."""
    head = k.mm.folio_alloc(order, flags, inode.ino, index)
    if order:
        k.core.ref_add(head, (1 << order) - 1)
    for i in range(1 << order):
        inode.pages[index + i] = head + i
    k.inode_sync(inode)
    return head


def filemap_remove_folio(k, inode: Inode, head: int) -> None:
    core = k.core
    index = core.index(head)
    if inode.huge_order:
        if core.order(head):                  # a whole huge folio
            inode.pages.pop(index, None)
        # a page of a split folio: its frame says it left (find() checks the mapping)
    else:
        for i in range(1 << core.order(head)):
            inode.pages.pop(index + i, None)
    nr = 1 << core.order(head)
    core.set_mapping(head, 0, 0)
    core.test_clear_flag(head, PG_dirty)
    k.mm.folio_put(head, nr)           # the page cache's (filemap_free_folio: folio_nr_pages)
    k.inode_sync(inode)


def unmap_mapping_range(k, inode: Inode, start: int, end: int | None, even_cows: bool) -> None:
    """Zap the PTEs of [start, end) page indices in every mapping.  Hwpoison entries
    stay unless even_cows (truncate): punching a hole does not clear them."""
    core = k.core
    for vma in list(inode.i_mmap):
        npages = (vma.end - vma.start) >> PAGE_SHIFT
        lo = max(start, vma.pgoff)
        hi = vma.pgoff + npages if end is None else min(end, vma.pgoff + npages)
        if lo >= hi:
            continue
        for va, e, level in core.pt_scan(vma.mm.pgd, vma.addr_of(lo), vma.addr_of(hi)):
            if e & C.PTE_PRESENT or (e & C.PTE_HWPOISON and even_cows):
                if level > 1:                     # hugetlb_vmdelete_list: __unmap_hugepage_range
                    hugetlb_fault.restore_reserve_on_unmap(k, vma, va, e)
                k.mm.zap_pte(vma.mm, va, False, level)


def truncate_inode_pages_range(k, inode: Inode, start: int, end: int | None,
                               even_cows: bool = True) -> None:
    """Drop page-cache folios wholly in [start, end) (indices); a partial folio at
    either edge has its bytes zeroed instead, as the kernel does."""
    core = k.core
    unmap_mapping_range(k, inode, start, end, even_cows)
    if inode.huge_order:
        nr = 1 << inode.huge_order
        heads = []
        for base, pfn in sorted(inode.pages.items()):
            if base + nr <= start or (end is not None and base >= end):
                continue
            if core.order(pfn):
                heads.append(pfn)
            else:                             # a split folio: the pages still cached
                lo = max(start, base)
                hi = base + nr if end is None else min(end, base + nr)
                heads += [pfn + i - base for i in range(lo, hi)
                          if core.mapping(pfn + i - base) == inode.ino]
                if lo == base and hi == base + nr:
                    del inode.pages[base]
    else:
        heads = sorted({core.head(p) for i, p in inode.pages.items()
                        if i >= start and (end is None or i < end)})
    for head in heads:
        index, n = core.index(head), 1 << core.order(head)
        if index >= start and (end is None or index + n <= end):
            inode.ops.remove_folio(k, inode, head)
        else:
            lo, hi = max(start, index), min(end if end is not None else index + n, index + n)
            core.phys_zero(head + (lo - index), hi - lo)


READ_ITER = {"shmem": "shmem_file_read_iter", "hugetlbfs": "hugetlbfs_read_iter"}


def filemap_read(k, inode: Inode, n: int, off: int) -> bytes:
    """Generic read through the page cache; holes read as zeros.  A page known to
    be poisoned ends the read there: -EIO if nothing was read, or (hugetlbfs) if it
    is the first page read from its folio.  A latent error the copy to user
    consumes panics the machine."""
    core = k.core
    if n < 0 or off < 0:
        raise OSError(u.EINVAL, "read")
    end = min(off + n, inode.size)
    out = bytearray()
    pos = off
    while pos < end:
        index, po = pos >> PAGE_SHIFT, pos & (PAGE_SIZE - 1)
        chunk = min(PAGE_SIZE - po, end - pos)
        pfn = inode.find(core, index)
        if pfn is None:
            pfn = inode.ops.read_folio(k, inode, index)
        if pfn is not None:
            if inode.ops.page_poisoned(k, pfn):
                if out and not (inode.ops.read_eio_at_folio_start
                                and pos % (PAGE_SIZE << inode.huge_order) == 0):
                    break
                raise OSError(u.EIO, "read")
            if core.hwerr(pfn):
                # copy_to_user() from the page cache is a kernel-mode load from a
                # kernel address: not machine-check safe (severity.c error_context():
                # IN_KERNEL), "Data load in unrecoverable area of kernel": panic
                k.mce.kernel_load(k.current, pfn, (pfn << PAGE_SHIFT) | po, False,
                                  ("copy_user_generic", "_copy_to_iter",
                                   READ_ITER.get(inode.ops.name, "filemap_read"), "vfs_read",
                                   k.syscall_entry(), "do_syscall_64"))
            out += core.phys_read(pfn, po, chunk)
        else:
            out += bytes(chunk)
        pos += chunk
    return bytes(out)
