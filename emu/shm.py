"""Shared-memory segments, the runtime directory, and cleaning up after a dead supervisor."""
from __future__ import annotations

import fcntl
import os
import stat

import posix_ipc
import psutil

from . import _core

PREFIX = "/emu-"


def runtime_dir() -> str:
    """Per-user 0700 directory for sockets and pid files."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "emu") if base else "/tmp/emu-%d" % os.getuid()
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError("runtime directory %s is not ours" % path)
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def default_socket() -> str:
    return os.path.join(runtime_dir(), "emu.sock")


def segment_names(pid: int) -> tuple[str, str]:
    return ("%s%d-core" % (PREFIX, pid), "%s%d-phys" % (PREFIX, pid))


class Segments:
    """The two segments of one supervisor.  Created 0600, never shrunk while
    mapped; the creator unlinks them on exit."""

    def __init__(self, core: _core.Core, names: tuple[str, str], owner: bool):
        self.core = core
        self.names = names
        self.owner = owner

    @classmethod
    def create(cls, nframes: int, ntasks: int, nmms: int, npt: int,
               ninodes: int = 1024, nvmas: int = 4096) -> Segments:
        pid = os.getpid()
        lay = _core.layout(nframes, ntasks, nmms, npt, ninodes, nvmas)
        names = segment_names(pid)
        for n in names:                                   # a stale one from a reused pid
            try:
                posix_ipc.unlink_shared_memory(n)
            except posix_ipc.ExistentialError:
                pass
        a = posix_ipc.SharedMemory(names[0], posix_ipc.O_CREX, mode=0o600, size=lay["core_size"])
        b = posix_ipc.SharedMemory(names[1], posix_ipc.O_CREX, mode=0o600, size=lay["phys_size"])
        try:
            core = _core.Core(a.fd, lay["core_size"], b.fd, lay["phys_size"])
        finally:
            a.close_fd()
            b.close_fd()
        core.format(nframes, ntasks, nmms, npt, pid, ninodes, nvmas)
        return cls(core, names, True)

    @classmethod
    def open(cls, names: tuple[str, str], protect: bool = True) -> Segments:
        """A worker's mapping of a live machine; `protect`: the kernel's tables
        read-only (benchmarks map them read-write too, to measure what that costs)."""
        # reopen with size=0: passing a size would ftruncate the live segment
        a = posix_ipc.SharedMemory(names[0])
        b = posix_ipc.SharedMemory(names[1])
        try:
            core = _core.Core(a.fd, a.size, b.fd, b.size)
        finally:
            a.close_fd()
            b.close_fd()
        core.attach()
        if protect:
            core.protect_worker()         # kernel tables read-only in a worker
        return cls(core, names, False)

    def unlink(self) -> None:
        for n in self.names:
            try:
                posix_ipc.unlink_shared_memory(n)
            except posix_ipc.ExistentialError:
                pass


def _alive_supervisor(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and p.uids().real == os.getuid()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


LOG_KEEP = 3                     # rotated logs of dead daemons kept: X.log.1 .. X.log.3


def cleanup() -> list[str]:
    """Remove segments, sockets and pid files whose supervisor is gone; rotate
    (never delete) a gone daemon's log, so its last words survive.  Supervisors
    booting at once serialize on a lock of the runtime directory, and an entry
    someone else removed meanwhile is simply gone."""
    rd = runtime_dir()
    lock = os.open(rd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _cleanup(rd)
    finally:
        os.close(lock)


def _unlink(path: str, removed: list[str]) -> None:
    try:
        os.unlink(path)
        removed.append(path)
    except FileNotFoundError:
        pass


def _cleanup(rd: str) -> list[str]:
    removed: list[str] = []
    try:
        entries = os.listdir("/dev/shm")
    except OSError:
        entries = []
    for ent in entries:
        if not ent.startswith(PREFIX[1:]):
            continue
        parts = ent.split("-")
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        try:
            if os.stat(os.path.join("/dev/shm", ent)).st_uid != os.getuid():
                continue
        except FileNotFoundError:
            continue
        if not _alive_supervisor(int(parts[1])):
            try:
                posix_ipc.unlink_shared_memory("/" + ent)
                removed.append("/dev/shm/" + ent)
            except posix_ipc.ExistentialError:
                pass
    for ent in os.listdir(rd):
        path = os.path.join(rd, ent)
        if ent.endswith(".pid"):
            if not _pidfile_locked(path):
                _unlink(path, removed)
                _unlink(path[:-4] + ".sock", removed)
        elif ent.endswith(".log") and not os.path.exists(path[:-4] + ".pid"):
            rotate_log(path)
        elif ent.startswith("priv-") and ent.endswith(".sock"):
            pid = ent[5:-5]
            if pid.isdigit() and not _alive_supervisor(int(pid)):
                _unlink(path, removed)
    return removed


def rotate_log(path: str, keep: int = LOG_KEEP) -> str | None:
    """path -> path.1 -> ... -> path.<keep> (the oldest dropped), as logrotate
    does; an empty log is just removed.  Returns the new name, or None."""
    try:
        if os.path.getsize(path) == 0:
            os.unlink(path)
            return None
        for i in range(keep - 1, 0, -1):
            src = "%s.%d" % (path, i)
            if os.path.exists(src):
                os.replace(src, "%s.%d" % (path, i + 1))
        os.replace(path, path + ".1")
    except FileNotFoundError:
        return None
    return path + ".1"


def _pidfile_locked(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
