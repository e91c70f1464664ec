"""File I/O system calls (fs/read_write.c, fs/open.c) and the kernel's copies from
this process's memory (a write(2) from a buffer, a vhost worker's copy): mixed into
Task.  A bad buffer is EFAULT or a short count here, never a signal."""
from __future__ import annotations

import base64


class FileCalls:
    def pread(self, fd: int, n: int, offset: int = 0) -> bytes:
        return base64.b64decode(self._call("pread", fd=fd, n=n, offset=offset))

    def pwrite(self, fd: int, data: bytes, offset: int = 0) -> int:
        # one request line is at most ch.max_request bytes: write in pieces that fit
        # (base64 is 4/3 of the data), as write(2) returns what it wrote so far
        data = bytes(data)
        step = max(4096, (self.ch.max_request - 4096) // 4 * 3)
        done = 0
        while True:
            chunk = data[done:done + step]
            try:
                n = self._call("pwrite", fd=fd, data=base64.b64encode(chunk).decode(),
                               offset=offset + done if isinstance(offset, int) else offset)
            except OSError:
                if done:
                    return done
                raise
            done += n
            if done >= len(data) or n < len(chunk):
                return done

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
