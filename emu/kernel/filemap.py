"""Writeback errors and writeback (lib/errseq.c, include/linux/pagemap.h, mm/filemap.c,
mm/page-writeback.c) for file systems whose mapping can write back (ext2).

A writeback error is kept twice, as the kernel keeps it: AS_EIO in the mapping's
flags (the legacy check) and an errseq_t in mapping->wb_err, which each struct file
samples at open (f_wb_err) and which fsync reports once per file.
"""
from __future__ import annotations

from .. import uapi as u
from .page_alloc import PAGE_SHIFT, PG_dirty, PG_hwpoison

# lib/errseq.c: the low 12 bits are the errno, then the "seen" flag, then a counter
MAX_ERRNO = 4095
ERRSEQ_SEEN = 1 << 12
ERRSEQ_CTR_INC = 1 << 13
ERRSEQ_MASK = (1 << 32) - 1


def errseq_set(eseq: int, err: int) -> int:
    """errseq_set(): the new value; the counter moves only if the last error was seen."""
    new = (eseq & ~(MAX_ERRNO | ERRSEQ_SEEN)) | (-err & MAX_ERRNO)
    if eseq & ERRSEQ_SEEN:
        new += ERRSEQ_CTR_INC
    return new & ERRSEQ_MASK


def errseq_sample(eseq: int) -> int:
    """errseq_sample(): "If nobody has seen this error yet, then we can be the first":
    a file opened after an unseen error still reports it."""
    return eseq if eseq & ERRSEQ_SEEN else 0


def mapping_set_error(inode, error: int) -> None:
    """include/linux/pagemap.h mapping_set_error(): wb_err and AS_EIO (the superblock's
    s_wb_err, read only by syncfs, is not kept)."""
    if not error:
        return
    inode.wb_err = errseq_set(inode.wb_err, error)
    inode.as_eio = True


def file_check_and_advance_wb_err(file) -> int:
    """mm/filemap.c: report the mapping's error once to this file
    (errseq_check_and_advance), and clear AS_EIO as filemap_check_errors would."""
    inode = file.inode
    err = 0
    old = inode.wb_err
    if old != file.wb_err:
        new = old | ERRSEQ_SEEN
        inode.wb_err = new
        file.wb_err = new
        err = -(new & MAX_ERRNO)
    inode.as_eio = False
    return err


def folio_clear_dirty_for_io(k, head: int) -> bool:
    """mm/page-writeback.c: folio_mkclean (write-protect and clean every PTE), then
    test and clear PG_dirty.  True if the folio (or a PTE) was dirty."""
    dirty = k.mm.folio_mkclean(head)
    return bool(k.core.test_clear_flag(head, PG_dirty)) or dirty


def filemap_write_and_wait_range(k, inode, start: int, end: int) -> int:
    """__filemap_fdatawrite_range(WB_SYNC_ALL) + wait: every dirty folio of byte range
    [start, end] goes to the disk (a_ops->writepages).  A poisoned folio still in the
    cache is not written (its dirty state went with memory_failure's folio_cancel_dirty)."""
    core = k.core
    if end < start:
        return 0
    first, last = start >> PAGE_SHIFT, end >> PAGE_SHIFT
    for index in sorted(i for i in inode.pages if first <= i <= last):
        pfn = inode.pages.get(index)
        if pfn is None or core.flags(pfn) & PG_hwpoison:
            continue
        if folio_clear_dirty_for_io(k, core.head(pfn)):
            inode.ops.writepage(k, inode, index, pfn)
    return 0


def file_write_and_wait_range(k, file, start: int, end: int) -> int:
    """mm/filemap.c file_write_and_wait_range(): write back, then this file's error."""
    if end < start:
        return 0
    err = filemap_write_and_wait_range(k, file.inode, start, end)
    err2 = file_check_and_advance_wb_err(file)
    return err or err2


def mapping_seek_hole_data(k, inode, start: int, end: int, whence: int) -> int:
    """mm/filemap.c mapping_seek_hole_data(): a page in the cache is data, a missing one
    a hole; the end of the file is a hole.  -ENXIO for SEEK_DATA past the last data.
    Walks the cached pages, not the range: a sparse file may be huge."""
    if start >= end:
        return -u.ENXIO
    first, nr = start >> PAGE_SHIFT, 1 << inode.huge_order
    cached = sorted(i for base in inode.pages if base + nr > first
                    for i in range(max(base, first), base + nr)
                    if inode.find(k.core, i) is not None)
    if whence == u.SEEK_DATA:
        if not cached:
            return -u.ENXIO
        pos = max(start, cached[0] << PAGE_SHIFT)
        return pos if pos < end else -u.ENXIO
    index = first                                  # SEEK_HOLE: the end of the first run
    for i in cached:
        if i != index:
            break
        index += 1
    return min(max(start, index << PAGE_SHIFT), end)
