"""Records from a forked child to its parent: length-prefixed pickles over a pipe.

The demo and `emu compare` run each QEMU-shaped process in a child of its own, so
a process that dies of SIGBUS, as QEMU may, cannot take the caller with it.
"""
from __future__ import annotations

import os
import pickle
import struct
import traceback


def send(fd: int, obj) -> None:
    data = pickle.dumps(obj)
    data = struct.pack("I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def receive(fd: int) -> list:
    """Every record until EOF; closes fd."""
    out = []
    with os.fdopen(fd, "rb") as f:
        while len(hdr := f.read(4)) == 4:
            out.append(pickle.loads(f.read(struct.unpack("I", hdr)[0])))
    return out


def fork(fn) -> tuple[int, int]:
    """Run fn(write_fd) in a forked child that exits 0, or 1 after printing its
    traceback; returns (pid, read_fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            fn(w)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r
