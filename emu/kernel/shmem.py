"""tmpfs / memfd (mm/shmem.c, mm/memfd.c)."""
from __future__ import annotations

from .. import uapi as u
from .fs import File, FileOps, Inode, filemap_add_folio, filemap_read, truncate_inode_pages_range
from .mm import PAGE_SHIFT, PAGE_SIZE, VM_FAULT_OK, VM_FAULT_SIGBUS
from .page_alloc import PG_dirty, PG_hwpoison, PG_lru, PG_swapbacked, PG_unevictable, PG_uptodate

MFD_ALL_FLAGS = (u.MFD_CLOEXEC | u.MFD_ALLOW_SEALING | u.MFD_HUGETLB | u.MFD_NOEXEC_SEAL
                 | u.MFD_EXEC | (u.MFD_HUGE_MASK << u.MFD_HUGE_SHIFT))
MFD_NAME_MAX_LEN = 249


class ShmemOps(FileOps):
    name = "shmem"
    shmem = True
    map_pages = True          # shmem_vm_ops.map_pages = filemap_map_pages
    # shmem_file_operations; memfd_create sets FMODE_LSEEK | FMODE_PREAD | FMODE_PWRITE
    has_read = has_write = fmode_pread = True
    llseek = "shmem"
    fsync = "noop"
    statfs_magic = u.TMPFS_MAGIC
    st_mode = u.S_IFREG | 0o777             # __shmem_file_setup: S_IFREG | S_IRWXUGO

    def st_nlink(self, inode: Inode) -> int:
        return 0                            # clear_nlink(): "It is unlinked"

    def stat_blocks(self, k, inode: Inode) -> int:
        return inode.nrpages * (PAGE_SIZE >> 9)     # shmem_recalc_inode: BLOCKS_PER_PAGE

    def _get_folio(self, k, inode: Inode, index: int) -> int:
        pfn = inode.pages.get(index)
        if pfn is None:
            # an unevictable mapping (SHM_LOCK's shmem_lock) puts new folios on the
            # unevictable LRU (lru_add: !folio_evictable)
            lru = PG_lru | (PG_unevictable if inode.private.get("unevictable") else 0)
            pfn = filemap_add_folio(k, inode, index, 0, lru | PG_swapbacked | PG_uptodate)
        return pfn

    def mmap_check(self, k, file: File, shared: bool, prot: int) -> None:
        return None

    def fault(self, k, inode: Inode, index: int):
        if index >= (inode.size + PAGE_SIZE - 1) >> PAGE_SHIFT:
            return VM_FAULT_SIGBUS, 0
        return VM_FAULT_OK, self._get_folio(k, inode, index)

    def read(self, k, inode: Inode, n: int, off: int) -> bytes:
        return filemap_read(k, inode, n, off)

    def write(self, k, inode: Inode, data: bytes, off: int) -> int:
        if off < 0:
            raise OSError(u.EINVAL, "write")
        core = k.core
        pos, i = off, 0
        while i < len(data):
            index, po = pos >> PAGE_SHIFT, pos & (PAGE_SIZE - 1)
            chunk = min(PAGE_SIZE - po, len(data) - i)
            pfn = self._get_folio(k, inode, index)
            if core.flags(pfn) & PG_hwpoison:   # shmem_write_begin: -EIO
                if i:
                    break
                raise OSError(u.EIO, "write")
            core.phys_write(pfn, po, data[i:i + chunk])
            core.test_set_flag(core.head(pfn), PG_dirty)
            pos += chunk
            i += chunk
        inode.size = max(inode.size, pos)
        k.inode_sync(inode)
        return i

    def fallocate(self, k, inode: Inode, mode: int, off: int, length: int) -> None:
        if mode & ~(u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE):
            raise OSError(u.EOPNOTSUPP, "fallocate")
        if off < 0 or length <= 0:
            raise OSError(u.EINVAL, "fallocate")
        if mode & u.FALLOC_FL_PUNCH_HOLE:
            if not mode & u.FALLOC_FL_KEEP_SIZE:
                raise OSError(u.EOPNOTSUPP, "fallocate")
            start = (off + PAGE_SIZE - 1) >> PAGE_SHIFT
            end = (off + length) >> PAGE_SHIFT
            # partial pages at the edges are zeroed in place
            self._zero_partial(k, inode, off, min(off + length, start << PAGE_SHIFT))
            self._zero_partial(k, inode, max(off, end << PAGE_SHIFT), off + length)
            if start < end:
                truncate_inode_pages_range(k, inode, start, end, even_cows=False)
            return
        added = []
        try:
            for index in range(off >> PAGE_SHIFT, (off + length + PAGE_SIZE - 1) >> PAGE_SHIFT):
                if index not in inode.pages:
                    added.append(index)
                self._get_folio(k, inode, index)
        except MemoryError:
            # shmem_fallocate: "Remove the !uptodate folios we added", then -ENOMEM
            for index in added:
                pfn = inode.pages.get(index)
                if pfn is not None:
                    self.remove_folio(k, inode, pfn)
            raise OSError(u.ENOMEM, "fallocate: out of memory") from None
        if not mode & u.FALLOC_FL_KEEP_SIZE:
            inode.size = max(inode.size, off + length)
            k.inode_sync(inode)

    def _zero_partial(self, k, inode: Inode, lo: int, hi: int) -> None:
        if lo < hi:
            pfn = inode.pages.get(lo >> PAGE_SHIFT)
            if pfn is not None:
                k.core.phys_write(pfn, lo & (PAGE_SIZE - 1), bytes(hi - lo))

    def truncate(self, k, inode: Inode, length: int) -> None:
        if length < 0:
            raise OSError(u.EINVAL, "ftruncate")
        if length < inode.size:
            start = (length + PAGE_SIZE - 1) >> PAGE_SHIFT
            self._zero_partial(k, inode, length, min(inode.size, start << PAGE_SHIFT))
            truncate_inode_pages_range(k, inode, start, None, even_cows=True)
        inode.size = length
        k.inode_sync(inode)

    def error_remove_folio(self, k, inode: Inode, head: int) -> int:
        """shmem_error_remove_folio: keep the folio in the page cache.  Returns 0 in
        v6.18; the MF_DELAYED series makes it MF_DELAYED (a policy decision)."""
        return k.policy.shmem_error_remove_folio_result


def memfd_create(k, proc, name: str, flags: int) -> int:
    if flags & ~MFD_ALL_FLAGS:
        raise OSError(u.EINVAL, "memfd_create")
    if flags & (u.MFD_HUGE_MASK << u.MFD_HUGE_SHIFT) and not flags & u.MFD_HUGETLB:
        raise OSError(u.EINVAL, "memfd_create")
    if len(name.encode()) > MFD_NAME_MAX_LEN:
        raise OSError(u.EINVAL, "memfd_create")
    if flags & u.MFD_HUGETLB:
        if k.hugetlb is None:
            raise OSError(u.EINVAL, "memfd_create: no HugeTLB pool")
        return k.hugetlb.memfd_create(proc, name, flags)
    inode = k.new_inode(SHMEM_OPS, "memfd:" + name)
    return proc.fd_install(File(inode))


def shmem_zero_setup(k, size: int) -> File:
    """shmem_zero_setup(): the shmem file behind a MAP_SHARED|MAP_ANONYMOUS mapping,
    of the mapping's size, open by that mapping only."""
    inode = k.new_inode(SHMEM_OPS, "dev/zero")
    inode.size = size
    k.inode_sync(inode)
    return File(inode)


SHMEM_OPS = ShmemOps()
