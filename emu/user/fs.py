"""File I/O system calls (fs/read_write.c, fs/open.c) and the kernel's copies from
this process's memory (a write(2) from a buffer, a vhost worker's copy): mixed into
Task.  A bad buffer is EFAULT or a short count here, never a signal."""
from __future__ import annotations

import base64


class FileCalls:
    def pread(self, fd: int, n: int, offset: int = 0) -> bytes:
        return base64.b64decode(self._call("pread", fd=fd, n=n, offset=offset))

    def pwrite(self, fd: int, data: bytes, offset: int = 0) -> int:
        return self._write_chunks("pwrite", fd, data, offset)

    def _write_chunks(self, call: str, fd: int, data: bytes, offset) -> int:
        # one request line is at most ch.max_request bytes: write in pieces that fit
        # (base64 is 4/3 of the data), as write(2) returns what it wrote so far
        data = bytes(data)
        step = max(4096, (self.ch.max_request - 4096) // 4 * 3)
        done = 0
        while True:
            chunk = data[done:done + step]
            args = {"fd": fd, "data": base64.b64encode(chunk).decode()}
            if call == "pwrite":
                args["offset"] = offset + done if isinstance(offset, int) else offset
            try:
                n = self._call(call, **args)
            except OSError:
                if done:
                    return done
                raise
            done += n
            if done >= len(data) or n < len(chunk):
                return done

    # ---- files with a position (fs/open.c, fs/read_write.c, fs/sync.c, fs/stat.c) ----
    def open(self, path: str, flags: int = 0, mode: int = 0o666) -> int:
        """open(2) on the emulated disk file system (ext2): every path names a file of
        its one directory.  ENOENT without O_CREAT, EEXIST with O_CREAT|O_EXCL,
        EISDIR for "/" (or a trailing slash) opened to write, ENAMETOOLONG."""
        return self._call("open", path=path, flags=flags, mode=mode)

    def creat(self, path: str, mode: int = 0o666) -> int:
        """open(path, O_CREAT | O_WRONLY | O_TRUNC, mode)."""
        return self._call("creat", path=path, mode=mode)

    def unlink(self, path: str) -> None:
        """The data lives on while a descriptor or mapping holds the file."""
        self._call("unlink", path=path)

    def read_fd(self, fd: int, n: int) -> bytes:
        """read(2) (named read_fd: `read` is a load from this thread's memory) at the
        file position (shared by fork), which it advances.
        EBADF (not open for reading), EINVAL (a file with no read: guest_memfd,
        KVM), EIO (a poisoned page of the page cache, nothing read before it)."""
        return base64.b64decode(self._call("read", fd=fd, n=n))

    def write_fd(self, fd: int, data: bytes) -> int:
        """write(2) (named write_fd: `write` is a store to this thread's memory) at the
        file position (at the end with O_APPEND).  EBADF, EINVAL
        (hugetlbfs, guest_memfd and KVM files have no write), EFBIG."""
        return self._write_chunks("write", fd, data, None)

    def lseek(self, fd: int, offset: int, whence: int) -> int:
        """SEEK_SET/CUR/END/DATA/HOLE.  EINVAL (bad whence, negative result), ENXIO
        (DATA/HOLE past the end), ESPIPE (guest_memfd has no llseek)."""
        return self._call("lseek", fd=fd, offset=offset, whence=whence)

    def fsync(self, fd: int) -> None:
        """Write the file's dirty pages to the disk; EIO once per open file after a
        writeback error (a dirty page lost to memory_failure()), EINVAL for a file
        with no fsync (guest_memfd, KVM)."""
        self._call("fsync", fd=fd)

    def fdatasync(self, fd: int) -> None:
        self._call("fdatasync", fd=fd)

    def msync(self, addr: int, length: int, flags: int) -> None:
        """msync(2): MS_SYNC fsyncs each shared file mapping in the range, through
        the file the mapping holds.  EINVAL (flags, unaligned addr), ENOMEM (an
        unmapped hole), EBUSY (MS_INVALIDATE on locked memory), the fsync's error."""
        self._call("msync", addr=addr, length=length, flags=flags)

    def fstat(self, fd: int) -> dict:
        """st_dev, st_ino, st_mode, st_nlink, st_uid, st_gid, st_rdev, st_size,
        st_blksize, st_blocks."""
        return self._call("fstat", fd=fd)

    def fstatfs(self, fd: int) -> dict:
        """f_type (the file system's magic), f_bsize, f_frsize, f_namelen."""
        return self._call("fstatfs", fd=fd)

    def pwrite_from(self, fd: int, addr: int, count: int, offset: int = 0) -> int:
        """write(2) whose buffer is this process's memory at `addr`: the kernel copies
        it from user (faulting pages in), so a bad buffer is EFAULT, or a short
        write of what came before it; a latent error there is a recoverable #MC in
        the kernel (no signal; memory_failure() of the page afterwards)."""
        return self._call("pwrite", fd=fd, addr=addr, count=count, offset=offset)

    def vhost_copy(self, addr: int, n: int) -> bytes:
        """A vhost worker of this process copying `n` bytes of a guest buffer at this
        process's address `addr` (vhost-net's copy_from_iter() from the vhost_task):
        a kernel copy from user, so a bad buffer or a latent error is EFAULT, never
        a signal; the error's memory_failure() runs after the copy."""
        return base64.b64decode(self._call("vhost_copy", addr=addr, n=n))

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        self._call("fallocate", fd=fd, mode=mode, offset=offset, length=length)

    def ftruncate(self, fd: int, length: int) -> None:
        self._call("ftruncate", fd=fd, length=length)

    def close(self, fd: int) -> None:
        self._call("close", fd=fd)
