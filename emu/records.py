"""Records from a forked child to its parent over a pipe: the standard library's
multiprocessing Connection (length-prefixed pickles).

The demo and `emu compare` run each QEMU-shaped process in a child of its own, so
a process that dies of SIGBUS, as QEMU may, cannot take the caller with it.
"""
from __future__ import annotations

import os
import traceback
from multiprocessing.connection import Connection


def receive(conn: Connection) -> list:
    """Every record until the child's end closes; closes conn."""
    out = []
    with conn:
        while True:
            try:
                out.append(conn.recv())
            except EOFError:
                return out


def fork(fn, setup=None) -> tuple[int, Connection]:
    """Run fn(conn) in a forked child, which sends records with conn.send(); the
    child exits 0, or 1 after printing its traceback.  `setup()`, if given, runs in
    the child first (a process group, signal dispositions).  Returns (pid, the
    parent's end for `receive`)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            if setup is not None:
                setup()
            fn(Connection(w, readable=False))
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(w)
    return pid, Connection(r, writable=False)
