"""What the supervisor reads of other processes: alive or not, the signal a dead
worker died of, whether it still maps the machine (/proc, pidfds, psutil)."""
from __future__ import annotations

import os
import select
import time

import psutil


def death_signal(pid: int, wait: float = 0.2) -> int:
    """The signal a dead worker died of, read from its zombie's /proc/<pid>/stat
    (exit_code, field 52) before its parent reaps it; 0 if unknown.  EOF on the
    socket comes at exit_files(), a moment before the task turns zombie: wait for
    that on a pidfd, which turns readable when it does (a 2 ms polling step was
    most of the time from SIGKILL to the task retired)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0                                  # reaped already
    except OSError:
        fd = None                                 # no pidfd_open: poll /proc
    try:
        end = time.monotonic() + wait
        while True:
            try:
                with open("/proc/%d/stat" % pid) as f:
                    stat = f.read()
            except OSError:
                return 0
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] in ("Z", "X"):
                code = int(fields[49]) if len(fields) > 49 else 0
                return code & 0x7F
            left = end - time.monotonic()
            if left <= 0:
                return 0
            if fd is not None:
                select.select([fd], [], [], left)
            else:
                time.sleep(0.002)
    finally:
        if fd is not None:
            os.close(fd)


def maps_segment(pid: int, segment: str) -> bool:
    """Does pid still map the shm segment `segment` (/emu-<pid>-core)?"""
    try:
        with open("/proc/%d/maps" % pid) as f:
            return ("/dev/shm" + segment) in f.read()
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False
    except OSError:          # EMFILE and the like: cannot tell now, so not dead
        return True
