"""The memory and system calls of issue 17, each beside the host doing the same work.

(a) read(2) of 4 KiB at the file position, page cached (ext2): `read_fd` against
    the host's os.read of a cached file (the physical baseline: the real kernel's
    filemap_read) and, for scale, the emulated getpid round trip (the floor of
    any emulated system call).
(b) write(2) of 64 KiB then fsync(2) (16 dirty pages written back): against the
    host's os.write + os.fsync of a real file in the same directory kind (/var/tmp;
    the host's fsync also flushes a device, the emulated disk is memory).
(c) The clean page-cache error: MADV_HWPOISON of a mapped clean page, which drops
    it ("clean LRU page: Recovered", no signal), then the next load re-reads it
    from disk.  Baseline: a load of the same kind of page that faults it in from
    the page cache (MADV_DONTNEED then load), so the ratio is what the error adds.
(d) The write fault that copies a private HugeTLB page (hugetlb_wp: 2 MiB copied)
    against the host copying 2 MiB with memmove (the hardware doing the copy), and
    into memory the host has not backed yet (what the emulated frames cost on
    their first use: the host's page faults on the shm segment).
(e) A SysV segment's life: shmget, shmat, a store, shmdt, IPC_RMID, against the
    host's own SysV IPC doing the same through libc (ctypes).

Medians over the runs; these machines have two cores and are noisy.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import report  # noqa: E402

import emu  # noqa: E402
from emu import records  # noqa: E402
from emu import uapi as u  # noqa: E402

PAGE = 4096
HPAGE = 2 << 20
N = 300
RW = u.PROT_READ | u.PROT_WRITE


def _each(fn, n: int = N) -> float:
    """Median ns of fn() over n calls."""
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t)
    return statistics.median(out)


def read_cached(host) -> list[dict]:
    me = emu.attach(host, name="bench-read")
    fd = me.open("/bench-read", u.O_RDWR | u.O_CREAT)
    me.write_fd(fd, b"\xab" * (64 * PAGE))

    def emu_read():
        if me.lseek(fd, 0, u.SEEK_CUR) >= 64 * PAGE:
            me.lseek(fd, 0, u.SEEK_SET)
        me.read_fd(fd, PAGE)
    emu_read()
    with tempfile.TemporaryFile(dir="/var/tmp") as f:
        f.write(b"\xab" * (64 * PAGE))
        f.flush()
        hfd = f.fileno()

        def host_read():
            if os.lseek(hfd, 0, os.SEEK_CUR) >= 64 * PAGE:
                os.lseek(hfd, 0, os.SEEK_SET)
            os.read(hfd, PAGE)
        host_read()
        # lseek is in both loops: the same two system calls on each side
        e, h = _each(emu_read), _each(host_read)
    g = _each(lambda: me._call("getpid"))      # the bare system-call round trip
    return [report("read(2) 4 KiB, page cached (+lseek check)", e / 1e3, "us",
                   "host os.read, cached (+lseek)", h / 1e3),
            report("  the same, against the emulated syscall floor", e / 1e3, "us",
                   "emulated getpid x2", 2 * g / 1e3)]


def write_fsync(host) -> dict:
    me = emu.attach(host, name="bench-fsync")
    fd = me.open("/bench-fsync", u.O_RDWR | u.O_CREAT)
    data = b"\xcd" * (16 * PAGE)

    def emu_wf():
        me.write_fd(fd, data)
        me.lseek(fd, 0, u.SEEK_SET)
        me.fsync(fd)
    with tempfile.TemporaryFile(dir="/var/tmp") as f:
        hfd = f.fileno()

        def host_wf():
            os.write(hfd, data)
            os.lseek(hfd, 0, os.SEEK_SET)
            os.fsync(hfd)
        e, h = _each(emu_wf, 100), _each(host_wf, 100)
    return report("write 64 KiB + fsync (16 pages back)", e / 1e3, "us",
                  "host write + fsync (/var/tmp)", h / 1e3)


def clean_page_error(host) -> dict:
    me = emu.attach(host, name="bench-clean")
    n = 100
    fd = me.open("/bench-clean", u.O_RDWR | u.O_CREAT)
    me.write_fd(fd, b"\xee" * (2 * n * PAGE))
    me.fsync(fd)                                  # clean: on disk
    addr = me.mmap(0, 2 * n * PAGE, u.PROT_READ, u.MAP_SHARED, fd, 0)
    for i in range(2 * n):
        me.read(addr + i * PAGE, 8)
    base, err = [], []
    for i in range(n):
        good, bad = addr + 2 * i * PAGE, addr + (2 * i + 1) * PAGE
        t = time.perf_counter_ns()
        me.madvise(good, PAGE, u.MADV_DONTNEED)
        assert me.read(good, 8) == b"\xee" * 8
        base.append(time.perf_counter_ns() - t)
        t = time.perf_counter_ns()
        me.madvise(bad, PAGE, u.MADV_HWPOISON)    # clean: dropped, no signal
        assert me.read(bad, 8) == b"\xee" * 8     # re-read from the disk
        err.append(time.perf_counter_ns() - t)
    return report("poison a clean cached page, load it again", statistics.median(err) / 1e3,
                  "us", "zap + load from the page cache", statistics.median(base) / 1e3)


def huge_cow(host) -> dict:
    me = emu.attach(host, name="bench-cow")
    n = 8
    addr = me.mmap(0, n * HPAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS | u.MAP_HUGETLB)
    for i in range(n):
        me.write(addr + i * HPAGE, b"p")
    out = []

    def child(task):
        times = []
        for i in range(n):                        # the pages are shared, write-protected
            t = time.perf_counter_ns()
            task.write(addr + i * HPAGE, b"c")    # hugetlb_wp: copy 2 MiB
            times.append(time.perf_counter_ns() - t)
        return times
    for _ in range(3):
        ch = me.fork(child, name="bench-cow-child")
        assert ch.join(60) == 0
        out += ch.result
    src = ctypes.create_string_buffer(HPAGE)
    dst = ctypes.create_string_buffer(HPAGE)
    h = _each(lambda: ctypes.memmove(dst, src, HPAGE), 50)

    def fresh():
        """The copy into memory the host has not backed yet, as the emulated pool's
        frames are (a shm segment the host backs on first touch; Linux's pool pages
        are allocated when the pool is sized)."""
        m = mmap.mmap(-1, HPAGE)
        t = time.perf_counter_ns()
        ctypes.memmove(ctypes.addressof(ctypes.c_char.from_buffer(m)), src, HPAGE)
        dt = time.perf_counter_ns() - t
        m.close()
        return dt
    f = statistics.median(fresh() for _ in range(50))
    med = statistics.median(out) / 1e3
    return [report("private HugeTLB write fault (2 MiB COW)", med, "us",
                   "host memmove 2 MiB", h / 1e3),
            report("  the same, against a first-touch copy", med, "us",
                   "host memmove 2 MiB to fresh memory", f / 1e3)]


def sysv_cycle(host) -> dict:
    me = emu.attach(host, name="bench-shm")

    def emu_cycle():
        sid = me.shmget(u.IPC_PRIVATE, PAGE, 0o600 | u.IPC_CREAT)
        a = me.shmat(sid, 0, 0)
        me.write(a, b"x")
        me.shmdt(a)
        me.shmctl(sid, u.IPC_RMID)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    libc.shmdt.argtypes = [ctypes.c_void_p]
    libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]

    def host_cycle():
        sid = libc.shmget(u.IPC_PRIVATE, PAGE, 0o600 | u.IPC_CREAT)
        assert sid >= 0, os.strerror(ctypes.get_errno())
        a = libc.shmat(sid, None, 0)
        ctypes.memset(a, 0x78, 1)
        libc.shmdt(a)
        libc.shmctl(sid, u.IPC_RMID, None)
    e, h = _each(emu_cycle, 200), _each(host_cycle, 200)
    return report("SysV shmget/shmat/store/shmdt/IPC_RMID", e / 1e3, "us",
                  "host SysV IPC via libc", h / 1e3)


def _in_child(fn, host):
    """Each measurement is its own emulated process (a process attaches once)."""
    pid, r = records.fork(lambda w: w.send(fn(host)))
    out = records.receive(r)
    os.waitpid(pid, 0)
    return out[0]


def main() -> list:
    assert mmap.PAGESIZE == PAGE
    out = []
    with emu.start(ram="512M", hugepages={"2M": 32}) as host:
        for fn in (read_cached, write_fsync, clean_page_error, huge_cow, sysv_cycle):
            r = _in_child(fn, host)
            out += r if isinstance(r, list) else [r]
    return out


if __name__ == "__main__":
    main()
