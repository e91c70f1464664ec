"""The worker runtime: this process as an emulated thread.

A worker maps the core segments and is its own CPU: loads and stores go through
the Cython fast path with no IPC.  Faults, machine checks and system calls go to
the supervisor over the worker's own connection; signals the kernel sends come
back as real SIGBUS (raised on itself for current, a doorbell plus a mailbox
record otherwise).
"""
from __future__ import annotations

import array
import base64
import ctypes
import errno
import json
import os
import pickle
import select
import signal
import socket
import threading
import time
import traceback
import weakref
from collections import namedtuple

from .. import _core as C
from .. import shm
from .. import uapi as u
from ..haltpoll import others_waiting

# ------------------------------------------------------------------ errors


class EmulatorBug(RuntimeError):
    """The emulated kernel hit an unexpected exception (its BUG()): not an errno, not
    bad input.  The message says where; the traceback is in dmesg and the daemon log."""

    def __init__(self, desc: str, where: str | None = None):
        super().__init__(desc)
        self.where = where


class KernelPanic(Exception):
    """The emulated kernel panicked (kernel/panic.c panic()): the machine has stopped.
    `reason` is the panic string ("Fatal machine check", ...).  Every attached thread
    gets it, at its next call or at once wherever it runs (a doorbell), and is retired;
    the host can still read the machine (dmesg, status, meminfo, ...: a crash dump)
    until it is stopped, and gets this for anything that would change it."""

    def __init__(self, reason: str | None):
        super().__init__("Kernel panic - not syncing: %s" % reason)
        self.reason = reason


def _oserror(err: dict, path: str | None = None) -> Exception:
    """The exception an error reply from the supervisor at `path` stands for:
    OSError(errno), EmulatorBug or KernelPanic (this process's emulated thread on
    that machine is then retired)."""
    if err.get("class") == "EmulatorBug":
        return EmulatorBug(err.get("desc") or "emulator bug", err.get("where"))
    if err.get("class") == "KernelPanic":
        return _panicked(err.get("reason"), path)
    e = err.get("errno", u.EINVAL)
    desc = err.get("desc") or os.strerror(e)
    return OSError(e, desc)


class KernelGone(OSError):
    """The emulated kernel is no longer there for this thread: ESHUTDOWN after an
    orderly shutdown (`emu stop`, Host.close), ESRCH if the supervisor died or the
    thread exited.  (A subclass, so OSError(ESHUTDOWN) does not turn into
    BrokenPipeError; `e.errno` is what to test.)"""


SHUTDOWN_MSG = "the emulated kernel has shut down"
DIED_MSG = "the supervisor has gone away"
EXITED_MSG = "this emulated thread has exited"


class _Gone:
    """Stands in for the channel and the CPU of a retired thread: any use is a
    clean OSError (KernelPanic after a panic), and nothing can reach the memory
    that was unmapped."""
    __slots__ = ("errno", "why", "panic")

    def __init__(self, err: int, why: str, panic: str | None = None):
        self.errno, self.why, self.panic = err, why, panic

    def _error(self) -> Exception:
        if self.panic is not None:
            return KernelPanic(self.panic)
        return KernelGone(self.errno, self.why)

    def __getattr__(self, name):
        raise self._error()

    def __call__(self, *a, **k):
        raise self._error()

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ the channel
GREETING_TIMEOUT = 30.0     # seconds for the supervisor to say hello after connect()
_channels: weakref.WeakSet = weakref.WeakSet()


class Channel:
    """One QMP-like connection.  Replies carry the request id; replies to calls a
    signal handler abandoned are discarded, so a handler may raise anywhere."""

    def __init__(self, path: str):
        self.path = path
        self.pid = os.getpid()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            err = e.errno if e.errno is not None else u.ENAMETOOLONG   # sun_path overflow
            raise OSError(err, "cannot reach the supervisor at %s: %s"
                          % (path, e.strerror or os.strerror(err))) from None
        except TypeError:
            self.sock.close()
            raise TypeError("socket path: expected str, bytes or os.PathLike, got %s"
                            % type(path).__name__) from None
        self.rfile = self.sock.makefile("rb")
        self.seq = 0
        self.outstanding: set[int] = set()
        self.stash: dict[int, dict] = {}
        self.sock.settimeout(GREETING_TIMEOUT)       # a stopped or wedged supervisor
        try:
            greeting = self.rfile.readline()
        except TimeoutError:
            self.close()
            raise OSError(errno.ETIMEDOUT, "no greeting from the supervisor at %s within %g s"
                          % (path, GREETING_TIMEOUT)) from None
        except OSError as e:
            self.close()
            raise OSError(e.errno or errno.ECONNRESET, "the supervisor at %s: %s"
                          % (path, e.strerror)) from None
        self.sock.settimeout(None)
        if not greeting:
            self.close()
            raise OSError(errno.ECONNREFUSED, "the supervisor at %s closed the connection "
                          "(another user's, or out of file descriptors)" % path)
        try:
            qmp = json.loads(greeting)["QMP"]
            self.halt_poll_ns = int(qmp.get("halt_poll_ns", 0))
            self.max_request = int(qmp.get("max_request", 1 << 20))
        except (ValueError, TypeError, KeyError, AttributeError):
            self.halt_poll_ns, self.max_request = 0, 1 << 20
        self.spin_ns = 0                      # an emulated thread's channel spins (attach)
        self.shutdown = False                 # the supervisor announced an orderly shutdown
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)
        _channels.add(self)

    def close(self) -> None:
        try:
            self.rfile.close()
        except RuntimeError:
            # a doorbell handler closing the channel it interrupted a read of: the
            # reader goes with the unwind; the peer sees EOF now
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def request(self, name: str, args: dict | None = None) -> dict:
        if os.getpid() != self.pid:
            raise OSError(u.EBADF, "this connection belongs to another process")
        self.seq += 1
        rid = self.seq
        msg = json.dumps({"execute": name, "arguments": args or {}, "id": rid},
                         separators=(",", ":")).encode() + b"\n"
        self.outstanding.add(rid)
        try:
            try:
                if len(msg) > 65536:
                    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGBUS})
                    try:
                        self.sock.sendall(msg)
                    finally:
                        signal.pthread_sigmask(signal.SIG_SETMASK, old)
                else:
                    self.sock.sendall(msg)
            except (BrokenPipeError, ConnectionResetError):
                pass                        # closed: read what it said last, then EOF
            while rid not in self.stash:
                if self.spin_ns:            # (a line already buffered only costs the spin)
                    self._spin()
                try:
                    line = self.rfile.readline()
                except (ConnectionResetError, ValueError):     # reset, or closed here
                    line = b""
                if not line.endswith(b"\n"):     # EOF, or a last line cut short
                    raise self.gone()
                rep = json.loads(line)
                if rep.get("id") in self.outstanding:
                    self.stash[rep["id"]] = rep
                elif rep.get("event") == "SHUTDOWN":
                    self.shutdown = True
                # (a PANIC event needs nothing here: the calls that follow get
                # KernelPanic, and the doorbell reaches an attached thread)
            return self.stash.pop(rid)
        finally:
            self.outstanding.discard(rid)
            self.stash.pop(rid, None)

    def gone(self) -> KernelGone:
        """The error for a connection the supervisor closed."""
        if self.shutdown:
            return KernelGone(u.ESHUTDOWN, SHUTDOWN_MSG)
        return KernelGone(u.ESRCH, DIED_MSG)

    def _spin(self) -> None:
        """A thread in a system call keeps its CPU, as it would running the kernel:
        poll for the reply a while before sleeping in recv (the supervisor polls
        as long for the next call), unless another task waits for a CPU."""
        poll, clock = self._poll.poll, time.perf_counter_ns
        end = clock() + self.spin_ns
        while not poll(0) and clock() < end and not others_waiting():
            os.sched_yield()

    def call(self, _cmd: str, **args):
        rep = self.request(_cmd, args)
        if "error" in rep:
            raise _oserror(rep["error"], self.path)
        return rep.get("return")


def _after_fork_child() -> None:
    # A forked child must not hold its parent's connections: the supervisor sees a
    # thread's death as EOF on its socket.
    for ch in list(_channels):
        if ch.pid != os.getpid():
            try:
                os.close(ch.sock.detach())
            except OSError:
                pass
    C.unbind_self()
    global _self
    if _self is not None and _self._wd is not None:
        _self._wd.forget()              # its thread did not survive the fork; its fds did
    _self = None


os.register_at_fork(after_in_child=_after_fork_child)


def expand_runs(runs: list[dict]) -> list[dict]:
    """The per-page records of a `file_pages` run list (its compression undone):
    in a run of `count` pages, page j has pfn, host addresses and gpas + j pages
    (and, for order-0 pages, its own head)."""
    out = []
    for r in runs:
        for j in range(r["count"]):
            rec = {key: v for key, v in r.items() if key != "count"}
            rec["index"] = r["index"] + j
            if r["pfn"] is not None:
                rec["pfn"] = r["pfn"] + j
                if r["order"] == 0:
                    rec["head"] = rec["pfn"]
            rec["host"] = [{**m, "addr": m["addr"] + (j << 12)} for m in r["host"]]
            rec["stage2"] = [{**m, "gpa": m["gpa"] + (j << 12)} for m in r["stage2"]]
            out.append(rec)
    return out


# ------------------------------------------------------------------ host handle
class Host:
    """The emulated machine: debugfs, /proc and sysctl views, and its lifetime."""

    def __init__(self, path: str, pid: int | None = None):
        self.path = path
        self.private_pid = pid
        self._ch: Channel | None = None
        self._ch_pid = None
        self._segments: set[tuple] = set()    # the cores this process mapped through it
        self._closed = False

    @property
    def ch(self) -> Channel:
        if self._closed:
            raise OSError(errno.EBADF, "this host handle is closed")
        if self._ch is None or self._ch_pid != os.getpid():
            self._ch = Channel(self.path)
            self._ch_pid = os.getpid()
        return self._ch

    def _call(self, _cmd, **a):
        return self.ch.call(_cmd, **a)

    def _errno_call(self, _cmd, **a) -> int:
        r = self._call(_cmd, **a)
        if isinstance(r, int) and r < 0:
            raise OSError(-r, os.strerror(-r))
        return r

    def sysctl(self, name: str, value=None):
        return self._call("sysctl", name=name, value=value)

    def corrupt_pfn(self, pfn: int) -> int:
        return self._errno_call("corrupt_pfn", pfn=pfn)

    def unpoison_pfn(self, pfn: int) -> int:
        return self._errno_call("unpoison_pfn", pfn=pfn)

    def soft_offline_page(self, phys_addr: int) -> int:
        """/sys/devices/system/memory/soft_offline_page: soft-offline the page at a
        physical address (not a pfn; the low 12 bits are ignored).  0, or OSError."""
        return self._errno_call("soft_offline_page", addr=phys_addr)

    def hw_poison(self, pfn: int, addr_lsb: int = 0) -> int:
        """A latent uncorrected error in pfn, consumed by the next load (SRAR).
        `addr_lsb`: the address granularity the machine check will report (0: the
        byte); above 12 the address is not usable and the consumer gets SIGBUS
        (SI_KERNEL) with no memory_failure() (kill_me_now)."""
        return self._errno_call("hw_poison", pfn=pfn, addr_lsb=addr_lsb)

    def hw_detect(self, pfn: int) -> int:
        """A deferred error: returns memory_failure()'s return value (0, -EBUSY, ...)."""
        r = self._call("hw_detect", pfn=pfn)
        if r == -u.ENXIO:
            raise OSError(u.ENXIO, os.strerror(u.ENXIO))
        return r

    def meminfo(self) -> dict:
        return self._call("meminfo")

    def mf_stats(self) -> dict:
        return self._call("mf_stats")

    def kpageflags(self, pfn: int, count: int | None = None):
        """The /proc/kpageflags entry of pfn (KPF_* bits); None at or past max_pfn,
        where a read(2) of the file returns 0 bytes.  With `count`: the list of up to
        `count` entries from pfn on, as one pread(2) of count * 8 bytes reads them."""
        if count is None:
            return self._call("kpageflags", pfn=pfn)
        return self._call("kpageflags", pfn=pfn, count=count)

    def smaps(self, pid: int) -> list[dict]:
        """/proc/PID/smaps of an emulated process: per VMA start, end, prot, shared,
        ino, pgoff, Rss (bytes, from the page tables), `present` ([addr, bytes,
        level] runs of mapped leaves) and `hwpoison` (addresses of hwpoison entries,
        as pagemap shows them).  ESRCH for an unknown pid."""
        return self._call("smaps", pid=pid)

    def kvm_stat(self) -> list[dict]:
        """KVM's per-VM stage-2 stats (debugfs kvm/<pid>-<fd>/pages_4k, pages_2m,
        pages_1g) for every VM, with `present`: the mapped [gpa, bytes, level] runs."""
        return self._call("kvm_stat")

    def dmesg(self) -> list[str]:
        return self._call("dmesg")

    def events(self, since: int = 0) -> list[dict]:
        return self._call("events", since=since)

    def status(self) -> dict:
        return self._call("status")

    def file_pages(self, ino: int, runs: bool = False) -> dict:
        """One memory file's pages (guest_memfd, shmem/memfd, hugetlbfs): {"ino",
        "kind", "name", "size", "flags", "npages", "vm", "pages"}, one record per
        page index in [0, i_size) (see docs/api.md).  `runs=True`: "runs" instead of
        "pages", consecutive pages with the same facts one page apart as one record
        with "count" (exact; what the wire carries).  OSError(ENOENT) for no such
        inode, OSError(EINVAL) for one that is not a memory file."""
        r = self._call("file_pages", ino=ino)
        if not runs:
            r["pages"] = expand_runs(r.pop("runs"))
        return r

    def tainted(self) -> int:
        """The kernel's taint mask, as /proc/sys/kernel/tainted (uapi.TAINT_* bits)."""
        return self._call("tainted")

    def policy(self) -> dict:
        return self._call("policy")

    def panicked(self) -> str | None:
        """None while the emulated kernel runs; the panic reason once it panicked
        (then only reads of the machine and close() are served)."""
        return self._call("panicked")

    def check_invariants(self) -> list[str]:
        """The emulated kernel's CONFIG_DEBUG_VM-style self-check: one line per broken
        invariant (frames conserved, HardwareCorrupted, HugeTLB pools, no mapping of a
        freed frame, mapcounts), empty when all hold."""
        return self._call("check_invariants")

    def close(self) -> None:
        """Stop a private supervisor (its owner only), then let go of the machine:
        this process's emulated thread on it is retired (an orderly shutdown for
        a private host, a clean exit for a connect()ed daemon) and its memory is
        unmapped from this process."""
        stopped = False
        if self.private_pid is not None and os.getpid() == self._owner_pid:
            try:
                self._call("shutdown")
            except (KernelGone, ConnectionRefusedError, FileNotFoundError):
                pass                        # it died or stopped already: reap it below
            try:
                os.waitpid(self.private_pid, 0)
            except ChildProcessError:
                pass
            self.private_pid = None
            stopped = True
        if self._ch is not None and self._ch_pid == os.getpid():
            self._ch.close()
        self._ch = None
        t = _self
        if t is not None and t.host is self and t.alive:
            if stopped:
                t._retire(u.ESHUTDOWN, SHUTDOWN_MSG)
            else:
                t.exit()
        for key in self._segments:
            _release_core(key)
        self._segments.clear()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start(policy=None, ram=None, hugepages=None, config=None, sysctl=None,
          madvise_action_required=None) -> Host:
    """A private supervisor owned by this process; use as a context manager."""
    from .. import config as cfgmod
    from ..daemon import spawn_private

    try:
        cfg = cfgmod.build(file=config, ram=ram, hugepages=hugepages, policy=policy,
                           sysctl=sysctl, madvise_action_required=madvise_action_required)
    except cfgmod.ConfigError as e:
        raise ValueError(str(e)) from None
    if policy is not None and not isinstance(policy, str):
        raise ValueError("policy: pass a preset name or 'path/to/file.py:Class'")
    from ..kernel.policies import load

    load(cfg["kernel"]["policy"])              # a bad policy is a ValueError here, not at boot
    pid, path = spawn_private(cfg)
    h = Host(path, pid)
    h._owner_pid = os.getpid()
    return h


def connect(path: str | None = None) -> Host:
    """Attach to a running `emu daemon` (default: the per-user socket)."""
    h = Host(path or os.environ.get("EMU_SOCKET") or shm.default_socket())
    h._owner_pid = None
    h.ch  # noqa: B018  (connect now, so a missing daemon is reported here)
    return h


# ------------------------------------------------------------------ signals
SigInfo = namedtuple("SigInfo", "si_signo si_code si_errno si_pid si_addr si_addr_lsb ts_ns")
_handlers: dict[int, object] = {}
_self: Task | None = None
_new_tuple = tuple.__new__


def _dispatch(signum, frame):
    global _sig_count
    while True:
        rec = C.pop_siginfo()
        if rec is None:
            return
        _sig_count += 1
        info = _new_tuple(SigInfo, rec)         # SigInfo(*rec), minus a Python-level __new__
        h = _handlers.get(signum)
        try:
            if callable(h):
                h(signum, info)
        finally:
            if _self is not None and _self._core is not None:
                _self._core.note_handled(_self.slot)


def sigaction(sig: int, handler):
    """Install `handler(signum, info)` with SA_SIGINFO semantics: info carries
    si_code, si_addr, si_addr_lsb, si_pid as the kernel filled them.  SIG_DFL and
    SIG_IGN work as in sigaction(2).  Returns the previous handler."""
    if sig != signal.SIGBUS:
        raise OSError(u.EINVAL, "emu.sigaction handles SIGBUS; use signal.signal for others")
    prev = _handlers.get(sig, signal.getsignal(sig))
    if handler in (signal.SIG_DFL, signal.SIG_IGN):
        _handlers.pop(sig, None)
        signal.signal(sig, handler)
        return prev
    if not callable(handler):
        raise OSError(u.EINVAL, "handler must be callable, SIG_DFL or SIG_IGN")
    _handlers[sig] = handler
    signal.signal(sig, _dispatch)
    C.install_sigbus()
    return prev


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
PR_SET_PDEATHSIG = 1


def _real_prctl(*a) -> int:
    a = list(a) + [0] * (5 - len(a))
    r = _libc.prctl(*a)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


class _Watchdog:
    """A thread that waits on the supervisor's pidfd: if the kernel dies (not an
    orderly shutdown, which comes as ESHUTDOWN and a doorbell), this process dies
    with it at once, whatever its main thread is doing (blocked in a call, idle,
    or spinning in the fast path).  stop() ends it and closes its fds."""

    def __init__(self, sup_pid: int, core):
        self._stop_r, self._stop_w = os.pipe()
        self._sup_pid = sup_pid
        try:
            self._pidfd = os.pidfd_open(sup_pid)
        except OSError:
            self._pidfd = -1                  # already gone: fire at once
        self._thread = threading.Thread(target=self._run, args=(sup_pid, core), daemon=True,
                                        name="emu-watchdog")
        self._thread.start()

    def _run(self, sup_pid: int, core) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        if self._pidfd >= 0:
            r, _, _ = select.select([self._pidfd, self._stop_r], [], [])
            if self._stop_r in r:
                return
        if core.shutdown:
            return
        self.die()

    def dead(self, timeout: float) -> bool:
        """Has the supervisor died (waiting up to `timeout` s: a connection sees
        EOF at exit_files(), a moment before the pidfd fires)?"""
        if self._pidfd < 0:
            return True
        return bool(select.select([self._pidfd], [], [], timeout)[0])

    def die(self) -> None:
        """The kernel died: so does this thread, at once, as its other threads."""
        try:
            os.write(2, b"emu: pid %d: the supervisor (pid %d) died; its threads die with it\n"
                     % (os.getpid(), self._sup_pid))
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    def stop(self) -> None:
        if self._stop_w < 0:
            return
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join()
        self.forget()

    def forget(self) -> None:
        """Close the fds (after a fork the thread is not ours to stop)."""
        for fd in (self._pidfd, self._stop_r, self._stop_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._pidfd = self._stop_r = self._stop_w = -1


_cores: dict[tuple, object] = {}


def _backend(core):
    """The CPU, for host (priv -1) and guest (stage-2) accesses: the Cython fast
    path, or with EMU_FASTPATH=python the pure-Python reference (same contract), so
    the suite can run against both."""
    if os.environ.get("EMU_FASTPATH") == "python":
        from .._pyref import PyCore

        py = PyCore(core)
        return (lambda s, p, va, b, priv=-1: py.access(s, p, va, b, False, priv),
                lambda s, p, va, b, priv=-1: py.access(s, p, va, b, True, priv),
                py.access_batch)
    return core.access_read, core.access_write, core.access_batch


def _core_for(names) -> object:
    """The segments of one supervisor, mapped once per process (a forked child
    reuses the mapping it inherited)."""
    key = tuple(names)
    if key not in _cores:
        _cores[key] = shm.Segments.open(key).core
    return _cores[key]


def _release_core(key: tuple) -> None:
    """Forget a supervisor's segments: the mapping goes with the last reference
    (Core.__dealloc__ unmaps), so nothing can touch unmapped memory."""
    _cores.pop(key, None)


def _panicked(reason: str | None, path: str | None = None) -> KernelPanic:
    """This process heard that the machine at `path` panicked: its emulated thread
    there is retired at once (its CPU stops: memory unmapped, every later use
    KernelPanic), so a later doorbell finds nothing to do.  Returns the error."""
    t = _self
    if t is not None and t.alive and (path is None or t.host.path == path):
        t._retire(u.EIO, "the emulated kernel panicked", panic=reason)
    return KernelPanic(reason)


def _on_panic(signum, frame):
    """The supervisor's panic doorbell: whatever this thread is doing (a call, the
    fast path, idle, KVM_RUN) ends with KernelPanic."""
    t = _self
    if t is None or not t.alive:
        return
    reason = t._core.panic_reason
    if reason is not None:                  # (a stale doorbell of another machine: ignore)
        raise _panicked(reason)


def _on_shutdown(signum, frame):
    """The supervisor's shutdown doorbell: the emulated thread is retired and
    the interrupted code gets ESHUTDOWN (a handler is Python's siglongjmp)."""
    t = _self
    if t is not None and t.alive:
        t._retire(u.ESHUTDOWN, SHUTDOWN_MSG)
        raise KernelGone(u.ESHUTDOWN, SHUTDOWN_MSG + " (emu stop)")


# ------------------------------------------------------------------ the emulated thread
PagemapEntry = namedtuple("PagemapEntry", "raw pfn present swapped hwpoison file exclusive")


class Task:
    """This process as one emulated thread (`me` in the docs)."""

    def __init__(self, host: Host, kind: str = "process", parent: int | None = None,
                 name: str = "emu"):
        global _self
        if _self is not None and _self.alive:
            raise OSError(u.EBUSY, "this process is already an emulated thread")
        self.host = host
        self.alive = False
        self._wd = None
        self._pid = os.getpid()
        self.ch = Channel(host.path)
        try:
            info = self.ch.call("attach", kind=kind, parent=parent, comm=name)
        except BaseException:
            self.ch.close()
            raise
        self.ch.spin_ns = self.ch.halt_poll_ns
        self.tid, self.tgid, self.slot, self.pgd = info["tid"], info["tgid"], info["slot"], info["pgd"]
        self.name = name
        self._names = tuple(info["segments"])
        host._segments.add(self._names)
        self._core = _core_for(self._names)
        self._core.bind_self(self.slot)
        self._rd, self._wr, self._bt = _backend(self._core)
        C.install_group_exit(info["group_exit_sig"])
        self._group_exit_sig = info["group_exit_sig"]
        for key, fn in (("shutdown_sig", _on_shutdown), ("panic_sig", _on_panic)):
            sig = info.get(key)
            if sig:
                try:
                    signal.signal(sig, fn)
                except ValueError:          # not the main thread: the grace period's kill
                    pass
        self._wd = _Watchdog(info["supervisor_pid"], self._core)
        self.alive = True
        _self = self

    def __repr__(self):
        return "<emu.Task %s tid=%d tgid=%d>" % (self.name, self.tid, self.tgid)

    # ---- system calls ----
    def _call(self, _cmd: str, **args):
        try:
            rep = self.ch.request(_cmd, args)
        except KernelGone as e:
            raise self._gone(e) from None
        sigs = rep.get("sigs")
        if sigs:
            self._deliver(sigs)
        if "error" in rep:
            raise _oserror(rep["error"], self.host.path)
        return rep.get("return")

    def _deliver(self, sigs) -> None:
        """Signals the kernel sent to current, delivered on 'return to user'."""
        for signo, code, addr, lsb, force, queued in sigs:
            if force:
                blocked = signo in signal.pthread_sigmask(signal.SIG_BLOCK, [])
                ignored = signal.getsignal(signo) == signal.SIG_IGN
                if blocked or ignored:                # force_sig_info_to_task
                    _handlers.pop(signo, None)
                    self._core.set_exit_sig(self.slot, signo)
                    signal.signal(signo, signal.SIG_DFL)
                    if blocked:                       # a pending one may kill us right here
                        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signo])
            if not queued:                            # dropped: an identical one is pending
                continue
            if signal.getsignal(signo) == signal.SIG_DFL:
                self._core.set_exit_sig(self.slot, signo)
            C.raise_self(signo, code, addr, lsb)

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
        try:
            return self._call("prctl", option=option, arg2=arg2, arg3=arg3, arg4=arg4, arg5=arg5)
        finally:
            if option == u.PR_MCE_KILL:
                # the real thread gets it too, quirks included (a SET with a bad
                # arg3 sets PF_MCE_PROCESS before it fails)
                try:
                    _real_prctl(option, arg2, arg3, arg4, arg5)
                except OSError:
                    pass

    def memfd_create(self, name: str, flags: int = 0) -> int:
        return self._call("memfd_create", name=name, flags=flags)

    def mmap(self, addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
        return self._call("mmap", addr=addr, length=length, prot=prot, flags=flags, fd=fd,
                          offset=offset)

    def munmap(self, addr: int, length: int) -> None:
        self._call("munmap", addr=addr, length=length)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        self._call("madvise", addr=addr, length=length, advice=advice)

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

    def pagemap(self, addr: int) -> PagemapEntry:
        v = self._call("pagemap", addr=addr)
        present = bool(v & u.PM_PRESENT)
        swapped = bool(v & u.PM_SWAP)
        swp_type = v & ((1 << u.PM_SWAP_TYPE_BITS) - 1)
        hwpoison = swapped and swp_type == u.SWP_HWPOISON
        pfn = (v & u.PM_PFRAME_MASK) if present else (
            (v & u.PM_PFRAME_MASK) >> u.PM_SWAP_TYPE_BITS if hwpoison else 0)
        return PagemapEntry(v, pfn, present, swapped, hwpoison, bool(v & u.PM_FILE),
                            bool(v & u.PM_MMAP_EXCLUSIVE))

    # ---- the CPU: loads and stores ----
    def read(self, addr: int, n: int) -> bytes:
        return self._load(addr, n, False)

    def _load(self, addr: int, n: int, fetch: bool) -> bytes:
        buf = bytearray(n)
        mv = memoryview(buf)
        off = 0
        rd = self._rd
        while True:
            done, st, xva, xpfn = rd(self.slot, self.pgd, addr + off, mv[off:])
            off += done
            if st == C.ACC_OK:
                return bytes(buf)
            self._trap(st, xva, xpfn, False, fetch=fetch)

    def write(self, addr: int, data) -> None:
        mv = memoryview(data).cast("B")
        off = 0
        wr = self._wr
        while True:
            done, st, xva, xpfn = wr(self.slot, self.pgd, addr + off, mv[off:])
            off += done
            if st == C.ACC_OK:
                return
            self._trap(st, xva, xpfn, True)

    def fetch(self, addr: int, n: int) -> bytes:
        """An instruction fetch of n bytes at addr: a read() whose consumption of a
        latent error is an instruction-fetch machine check, which cannot be
        restarted (MCG_STATUS.RIPV clear: memory_failure() gets MF_MUST_KILL).  The
        emulated MMU has no NX bit: whatever read() may read, fetch() may."""
        return self._load(addr, n, True)

    def read_batch(self, addrs, size: int) -> bytearray:
        """`size` bytes at each address, in one fast-path call (traps resume in place)."""
        if not isinstance(addrs, array.array):
            addrs = array.array("Q", addrs)
        buf = bytearray(len(addrs) * size)
        self._batch(addrs, size, buf, False)
        return buf

    def write_batch(self, addrs, size: int, data) -> None:
        if not isinstance(addrs, array.array):
            addrs = array.array("Q", addrs)
        if len(data) != len(addrs) * size:
            raise OSError(u.EINVAL, "write_batch: data must be len(addrs) * size bytes")
        self._batch(addrs, size, data, True)

    def _batch(self, addrs, size, buf, write) -> None:
        i = 0
        bt = self._bt
        while True:
            i, st, xva, xpfn, _partial = bt(self.slot, self.pgd, addrs, i, size, buf, write)
            if st == C.ACC_OK:
                return
            self._trap(st, xva, xpfn, write)

    def _trap(self, st: int, va: int, pfn: int, write: bool, fetch: bool = False) -> None:
        if st == C.ACC_FAULT:
            self._call("fault", addr=va, write=write)
        elif st == C.ACC_MCE:
            self._call("mce", addr=va, pfn=pfn, fetch=fetch)
        else:
            raise OSError(u.EFAULT, "bad frame in a page-table entry")

    def idle(self, timeout: float) -> None:
        """Sleep, running signal handlers as they arrive (a handler may raise)."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    # ---- threads and processes ----
    def clone(self, fn, *args, name: str | None = None) -> Thread:
        """A new thread of this process (a forked worker sharing the mm)."""
        return _spawn(self, "clone", fn, args, name or "%s-thread" % self.name)

    def fork(self, fn, *args, name: str | None = None) -> Thread:
        """A new process with a copy of this one's mappings and fd table."""
        return _spawn(self, "fork", fn, args, name or self.name)

    # ---- KVM ----
    def open_kvm(self) -> Kvm:
        return Kvm(self, self._call("open_kvm"))

    def gmem_convert(self, fd: int, offset: int, size: int, private: bool) -> None:
        """In-place conversion of a guest_memfd range (KVM_GMEM_CONVERT_PRIVATE/_SHARED)."""
        self._call("gmem_convert", fd=fd, offset=offset, size=size, private=private)

    def exit(self) -> None:
        """A clean thread exit: the kernel retires this thread before exit()
        returns (as a thread's exit; the main thread's takes its process with
        it, exit_group).  This process may attach again afterwards."""
        if not self.alive:
            return
        if os.getpid() != self._pid:
            raise OSError(u.EBADF, "this emulated thread belongs to another process")
        try:
            self.ch.call("exit")
        except KernelGone as e:
            self._gone(e)                   # the kernel is gone: so is this thread
        finally:
            self._retire(u.ESRCH, EXITED_MSG)

    def pthread_exit(self) -> None:
        """This thread exits alone, the main thread too (SYS_exit, as glibc's
        pthread_exit does): a main thread that leaves others running stays a zombie
        group leader with no mm until the last of them exits (memory failure then
        skips the process: task_early_kill's !tsk->mm).  Its pid stays taken, so
        this process cannot attach again while the group lives."""
        if not self.alive:
            return
        if os.getpid() != self._pid:
            raise OSError(u.EBADF, "this emulated thread belongs to another process")
        try:
            self.ch.call("exit", thread=True)
        except KernelGone as e:
            self._gone(e)
        finally:
            self._retire(u.ESRCH, EXITED_MSG)

    def _gone(self, e: KernelGone) -> KernelGone:
        """The supervisor closed this thread's connection: retire it here too.
        If the supervisor died, this thread dies with it, as the watchdog would
        make it a moment later (whatever the race, the same outcome)."""
        if e.errno == u.ESRCH and self.alive:
            if self._core.shutdown:
                e = KernelGone(u.ESHUTDOWN, SHUTDOWN_MSG)
            elif self._wd is not None and self._wd.dead(1.0):
                self._wd.die()
            else:
                e = KernelGone(u.ESRCH, "the supervisor closed this thread's connection")
        if self.alive:
            self._retire(e.errno, e.strerror)
        return e

    def _retire(self, err: int, why: str, panic: str | None = None) -> None:
        """Forget the kernel's thread in this process: the watchdog stops and its
        fds close, signals no longer reach the old slot, the channel closes, and
        the memory is unmapped once nothing refers to it; later use of this
        handle is a clean OSError(err), or KernelPanic(panic) after a panic."""
        global _self
        if not self.alive:
            return
        self.alive = False
        if _self is self:
            _self = None
            C.unbind_self()
            try:                            # a late group-exit doorbell: no longer ours
                signal.signal(self._group_exit_sig, signal.SIG_IGN)
            except ValueError:
                pass
        wd, self._wd = self._wd, None
        if wd is not None:
            wd.stop()
        ch, self.ch = self.ch, _Gone(err, why, panic)
        ch.close()
        self._core = self._rd = self._wr = self._bt = _Gone(err, why, panic)
        _release_core(self._names)


class Kvm:
    def __init__(self, task: Task, fd: int):
        self.task, self.fd = task, fd

    def create_vm(self, vm_type: int = u.KVM_X86_DEFAULT_VM) -> Vm:
        return Vm(self.task, self.task._call("create_vm", fd=self.fd, type=vm_type), vm_type)


class Vm:
    def __init__(self, task: Task, fd: int, vm_type: int):
        self.task, self.fd, self.type = task, fd, vm_type

    def _t(self) -> Task:
        """The calling thread (a VM handle may be used from any thread of the process)."""
        return _self if _self is not None and _self.alive else self.task

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        return self._t()._call("create_guest_memfd", vmfd=self.fd, size=size, flags=flags)

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int,
                                memory_size: int, userspace_addr: int = 0, guest_memfd: int = -1,
                                guest_memfd_offset: int = 0) -> int:
        """KVM_SET_USER_MEMORY_REGION2."""
        return self._t()._call("set_user_memory_region2", vmfd=self.fd, slot=slot, flags=flags,
                               guest_phys_addr=guest_phys_addr, memory_size=memory_size,
                               userspace_addr=userspace_addr, guest_memfd=guest_memfd,
                               guest_memfd_offset=guest_memfd_offset)

    def set_memory_attributes(self, gpa: int, size: int, attributes: int, flags: int = 0) -> int:
        """KVM_SET_MEMORY_ATTRIBUTES."""
        return self._t()._call("set_memory_attributes", vmfd=self.fd, address=gpa, size=size,
                               attributes=attributes, flags=flags)

    def gpa_to_pfn(self, gpa: int) -> dict:
        """Debug view: is gpa mapped in stage-2, to which pfn, at which level, backed by what."""
        return self._t()._call("gpa_to_pfn", vmfd=self.fd, gpa=gpa)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU; the calling thread owns the vCPU and must be the one to run it."""
        t = self._t()
        info = t._call("create_vcpu", vmfd=self.fd, id=vcpu_id)
        return Vcpu(t, self, vcpu_id, info["fd"], info["s2_root"])


class MemoryFault:
    __slots__ = ("flags", "gpa", "size")

    def __init__(self):
        self.flags = self.gpa = self.size = 0

    def __repr__(self):
        return "memory_fault(flags=%#x, gpa=%#x, size=%d)" % (self.flags, self.gpa, self.size)


class Internal:
    """kvm_run.internal (KVM_EXIT_INTERNAL_ERROR)."""
    __slots__ = ("ndata", "suberror", "flags", "insn_size")

    def __init__(self):
        self.suberror = self.ndata = self.flags = self.insn_size = 0

    def __repr__(self):
        return "internal(suberror=%d, ndata=%d, flags=%#x, insn_size=%d)" % (
            self.suberror, self.ndata, self.flags, self.insn_size)


class KvmRun:
    """The parts of struct kvm_run a VMM reads after KVM_RUN."""

    def __init__(self):
        self.exit_reason = u.KVM_EXIT_UNKNOWN
        self.memory_fault = MemoryFault()
        self.internal = Internal()

    def __repr__(self):
        return "kvm_run(exit_reason=%d, %r)" % (self.exit_reason, self.memory_fault)


_sig_count = 0           # SIGBUS deliveries handled in this thread (KVM_RUN's signal_pending)
_FAULT_AHEAD = 512       # pages a stage-2 fault request may resolve in one round trip


class Vcpu:
    def __init__(self, task: Task, vm: Vm, vcpu_id: int, fd: int, s2_root: int):
        self.task, self.vm, self.id, self.fd, self.s2 = task, vm, vcpu_id, fd, s2_root
        self.owner = os.getpid()
        self.kvm_run = KvmRun()
        self._gen = None
        self._fn = None
        self._op = None
        self._pos = 0
        self._value = None
        self._ucall = (u.UCALL_NONE, ())
        from ..guest import GuestKernel

        self.guest_kernel = GuestKernel()
        self.fault_requests = 0          # stage-2 fault round trips to the kernel (statistics)
        self._pending_mce: list[dict] = []
        self._in_mc: list[tuple] = []    # #MC handlers running guest code: interrupted programs
        self._shutdown = False

    # ---- machine checks for the guest (QEMU: kvm_mce_inject) ----
    def setup_mce(self, mcg_cap: int) -> int:
        """KVM_X86_SETUP_MCE."""
        return self.task._call("setup_mce", vcpu=self.fd, mcg_cap=mcg_cap)

    def set_mce(self, mce) -> int:
        """KVM_X86_SET_MCE with a uapi.KvmX86Mce.  Call it from the vCPU's own thread,
        as QEMU does with run_on_cpu()."""
        if os.getpid() != self.owner:
            raise OSError(u.EPERM, "KVM_X86_SET_MCE from a thread that does not own vCPU %d" % self.id)
        r = self.task._call("set_mce", vcpu=self.fd, status=mce.status, addr=mce.addr, misc=mce.misc,
                            mcg_status=mce.mcg_status, bank=mce.bank)
        if r.get("triple_fault"):
            self._shutdown = True
        elif r.get("inject"):
            self._pending_mce.append(r["inject"])
        return 0

    def _deliver_mce(self) -> int | None:
        """The queued #MC reaches the guest kernel before its next instruction."""
        ev = self._pending_mce.pop(0)
        gk = self.guest_kernel
        outcome = gk.handler(gk, ev)
        if callable(outcome):
            # a handler that runs guest code (a guest program fn(g, ev) returning the
            # outcome) before it returns: MCG_STATUS.MCIP stays set meanwhile
            from ..guest import G

            self._in_mc.append((ev, self._gen, self._op, self._pos, self._value))
            self._gen, self._op, self._pos, self._value = outcome(G, ev), None, 0, None
            return None
        return self._mce_done(ev, outcome)

    def _mce_done(self, ev: dict, outcome: str) -> int | None:
        """The guest's #MC handler returned with `outcome`."""
        from ..guest import GuestTaskKilled

        if outcome == "panic":
            return u.KVM_EXIT_HLT
        # the handler clears MCi_STATUS and MCG_STATUS.MCIP (mce_clear_state, mce_wrmsrl)
        self.task._call("guest_state", vcpu=self.fd, mcg_status=0, clear_bank=ev["bank"])
        if outcome == "killed":
            self._value, self._pos = None, 0
            try:
                self._op = self._gen.throw(GuestTaskKilled(ev["addr"]))
            except (StopIteration, GuestTaskKilled):
                self._gen, self._op = None, None
                return u.KVM_EXIT_HLT
        return None

    def reset(self) -> None:
        """The VMM resets the vCPU at a system reset (QEMU: x86_cpu_reset_hold, then
        KVM_SET_SREGS/KVM_SET_MSRS in kvm_arch_put_registers): CR4 and MCG_STATUS
        cleared, no triple fault or #MC pending, a guest kernel that has not booted.
        Call set_guest() next."""
        if os.getpid() != self.owner:
            raise OSError(u.EPERM, "reset from a thread that does not own vCPU %d" % self.id)
        from ..guest import GuestKernel

        self.task._call("guest_state", vcpu=self.fd, cr4_mce=False, mcg_status=0)
        self._shutdown = False
        self._pending_mce.clear()
        self._in_mc.clear()
        self.guest_kernel = GuestKernel()
        self._fn = self._gen = self._op = None

    def set_guest(self, fn, *args) -> None:
        """The guest program: a generator function fn(g, *args).  Set while the
        guest's #MC handler runs guest code, it runs inside that handler: MCIP stays
        set until the handler's own program returns."""
        from ..guest import G

        self._fn, self._gen, self._op, self._pos, self._value = fn, fn(G, *args), None, 0, None

    def ucall(self):
        """(cmd, args) of the last KVM_EXIT_IO ucall."""
        return self._ucall

    def run(self) -> int:
        """KVM_RUN: 0 on an exit (see kvm_run.exit_reason); OSError(errno) for -1."""
        if os.getpid() != self.owner:
            raise OSError(u.EPERM, "KVM_RUN from a thread that does not own vCPU %d" % self.id)
        if self._fn is None:
            raise OSError(u.ENOEXEC, "no guest program (vcpu.set_guest)")
        kr = self.kvm_run
        kr.exit_reason = u.KVM_EXIT_UNKNOWN
        sig0 = _sig_count
        while True:
            if _sig_count != sig0:
                kr.exit_reason = u.KVM_EXIT_INTR
                raise OSError(u.EINTR, "KVM_RUN interrupted by a signal")
            if self._shutdown:                       # triple fault: the VM needs a reset
                kr.exit_reason = u.KVM_EXIT_SHUTDOWN
                return 0
            if self.guest_kernel.panicked:
                kr.exit_reason = u.KVM_EXIT_HLT
                return 0
            if self._pending_mce:
                reason = self._deliver_mce()
                if reason is not None:
                    kr.exit_reason = reason
                    return 0
                continue
            if self._gen is None:
                kr.exit_reason = u.KVM_EXIT_HLT
                return 0
            if self._op is None:
                try:
                    self._op = self._gen.send(self._value)
                except StopIteration as e:
                    if self._in_mc:              # the #MC handler returns
                        ev, self._gen, self._op, self._pos, self._value = self._in_mc.pop()
                        reason = self._mce_done(ev, e.value or "recovered")
                        if reason is not None:
                            kr.exit_reason = reason
                            return 0
                        continue
                    self._gen = None
                    kr.exit_reason = u.KVM_EXIT_HLT
                    return 0
                self._value, self._pos = None, 0
            op = self._op
            kind = op[0]
            if kind == "ucall":
                self._ucall = (op[1], op[2])
                self._op = None
                kr.exit_reason = u.KVM_EXIT_IO
                return 0
            if kind == "hlt":
                self._op = None
                kr.exit_reason = u.KVM_EXIT_HLT
                return 0
            if kind == "cr4_mce":
                self.task._call("guest_state", vcpu=self.fd, cr4_mce=op[1])
                self.guest_kernel.cr4_mce = op[1]
                self._op = None
                continue
            if kind == "mode":
                self.guest_kernel.mode = op[1]
                self._op = None
                continue
            if kind in ("emulate", "kvm_map_read"):
                reason = self._kvm_read(op)
                if reason is not None:
                    kr.exit_reason = reason
                    return 0
                continue
            exit_ = self._access(op)
            if exit_ is None:
                continue
            return exit_

    def _kvm_read(self, op) -> int | None:
        """KVM itself reads guest memory for this vCPU: an instruction it emulates
        (a copy from user: an error is an emulation failure) or a page it maps into
        the kernel (a plain load).  The exit reason to return, or None to go on."""
        from ..guest import GuestTaskKilled

        kind, gpa, n = op
        gk = self.guest_kernel
        r = self.task._call("kvm_guest_read", vcpu=self.fd, gpa=gpa, n=n,
                            how="emulate" if kind == "emulate" else "map",
                            cpl=3 if gk.mode == "user" else 0)
        if r.get("exit"):                   # the instruction stays where it was
            ex, internal = r["exit"], self.kvm_run.internal
            internal.suberror = ex["suberror"]
            internal.ndata, internal.flags = ex.get("ndata", 0), ex.get("flags", 0)
            internal.insn_size = ex.get("insn_size", 0)
            return r["exit"]["reason"]
        self._op, self._pos = None, 0
        if r.get("ud"):                     # #UD at CPL 3: the guest kernel kills the task
            gk.log.append("traps: guest-task trap invalid opcode ip:%x" % gpa)
            gk.killed += 1
            try:
                self._op = self._gen.throw(GuestTaskKilled(gpa))
            except (StopIteration, GuestTaskKilled):
                self._gen = None
                return u.KVM_EXIT_HLT
            self._value = None
            return None
        self._value = None if r["data"] is None else base64.b64decode(r["data"])
        return None

    def _access(self, op):
        """Run one memory op through stage-2; None when it completed."""
        t = self.task
        rd, wr, bt = t._rd, t._wr, t._bt           # the CPU: Cython core or the reference
        kind, priv = op[0], op[3]
        cpriv = -1 if priv is None else int(bool(priv))
        while True:
            if kind in ("read", "write"):
                gpa, n = op[1], (op[2] if kind == "read" else len(op[2]))
                if self._value is None and kind == "read":
                    self._value = bytearray(n)
                buf = self._value if kind == "read" else op[2]
                mv = memoryview(buf)[self._pos:]
                if kind == "read":
                    done, st, xva, xpfn = rd(t.slot, self.s2, gpa + self._pos, mv, cpriv)
                else:
                    done, st, xva, xpfn = wr(t.slot, self.s2, gpa + self._pos, mv, cpriv)
                self._pos += done
                if st == C.ACC_FAULT:
                    ahead = list(range(xva & ~0xFFF, min(gpa + n, (xva & ~0xFFF) + _FAULT_AHEAD * 4096),
                                       4096))
            else:
                gpas, size = op[1], op[2]
                if self._value is None:
                    self._value = bytearray(len(gpas) * size) if kind == "read_batch" else op[4]
                self._pos, st, xva, xpfn, _p = bt(
                    t.slot, self.s2, gpas, self._pos, size, self._value, kind == "write_batch", cpriv)
                if st == C.ACC_FAULT:
                    ahead = _pages_ahead(gpas, self._pos, size)
            if st == C.ACC_OK:
                self._op = None
                if kind in ("read", "read_batch"):
                    self._value = bytes(self._value)
                else:
                    self._value = None
                return None
            if st == C.ACC_MCE:
                # a machine check in guest mode: handled on this thread (current)
                t._call("mce", addr=xva, pfn=xpfn, guest=True)
                return self._check_signal_or_retry()
            if st != C.ACC_FAULT:
                raise OSError(u.EFAULT, "bad frame in a stage-2 entry")
            self.fault_requests += 1
            rep = t._call("kvm_fault", vcpu=self.fd, gpas=ahead, write=kind.startswith("write"),
                          private=priv)
            ex = rep["exit"]
            if ex is None:
                continue
            kr = self.kvm_run
            if ex["reason"] is not None:
                kr.exit_reason = ex["reason"]
            if ex["reason"] == u.KVM_EXIT_MEMORY_FAULT:
                mf = kr.memory_fault
                mf.gpa, mf.size, mf.flags = ex["gpa"], ex["size"], ex["flags"]
            if ex["errno"] == u.EINTR or ex["reason"] is None and ex["errno"] == 0:
                return self._check_signal_or_retry()
            if ex["errno"]:
                raise OSError(ex["errno"], os.strerror(ex["errno"]))
            return 0

    def _check_signal_or_retry(self):
        """After the kernel ran on this thread: a handled signal ends KVM_RUN with
        -EINTR (the access stays pending); otherwise the access retries."""
        return None


def _pages_ahead(gpas, start, size):
    out, seen = [], set()
    for i in range(start, min(len(gpas), start + _FAULT_AHEAD * 4)):
        for p in (gpas[i] & ~0xFFF, (gpas[i] + size - 1) & ~0xFFF):
            if p not in seen:
                seen.add(p)
                out.append(p)
        if len(out) >= _FAULT_AHEAD:
            break
    return out


class Thread:
    """Handle of a clone()d thread or fork()ed process: join() gives the exit status
    as multiprocessing does (0, n, -signum); .result is fn's return value."""

    def __init__(self, pid: int, rfd: int, name: str, kind: str, parent: Task | None = None):
        self.pid, self.name, self.kind = pid, name, kind
        self._parent = parent
        self._rfd = rfd
        self._buf = b""
        self.exitcode = None
        self.result = None

    @property
    def tid(self) -> int:
        return self.pid

    def _drain(self, timeout):
        while self._rfd is not None:
            r, _, _ = select.select([self._rfd], [], [], timeout)
            if not r:
                return False
            chunk = os.read(self._rfd, 65536)
            if not chunk:
                os.close(self._rfd)
                self._rfd = None
                break
            self._buf += chunk
        return True

    def _reap(self) -> None:
        """The child has exited (seen with WNOWAIT): let the kernel settle its death
        from the zombie's status first, then reap it."""
        p = self._parent
        if p is not None and p.alive and _self is p:
            try:
                p.ch.call("reap", tid=self.pid)
            except OSError:
                pass
        _, status = os.waitpid(self.pid, 0)
        self.exitcode = os.waitstatus_to_exitcode(status)
        self._drain(0)
        if self._buf:
            try:
                self.result = pickle.loads(self._buf)
            except Exception:
                self.result = None

    def join(self, timeout: float | None = None):
        if self.exitcode is not None:
            return self.exitcode
        if not self._drain(timeout):
            return None
        os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        self._reap()
        return self.exitcode

    def is_alive(self) -> bool:
        if self.exitcode is not None:
            return False
        if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
            return True
        self._reap()
        return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)


def _spawn(parent: Task, kind: str, fn, args, name: str) -> Thread:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            import faulthandler

            if faulthandler.is_enabled():   # dying of SIGBUS/SIGSEGV is this worker's job here
                faulthandler.disable()      # (this restores the handlers saved at enable():
                if _handlers.get(signal.SIGBUS):    # put back the inherited SIGBUS recorder)
                    signal.signal(signal.SIGBUS, _dispatch)
                    C.install_sigbus()
            if kind == "clone":
                _real_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            t = Task(parent.host, kind=kind, parent=parent.tid, name=name)
            os.write(w, b"R")
            res = fn(t, *args)
            code = 0
            try:
                payload = pickle.dumps(res)
            except Exception:
                payload = pickle.dumps(None)
            t.exit()
            try:
                _write_all(w, payload)
            except BrokenPipeError:
                pass                        # the parent is gone: nobody reads the result
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if _self is not None:
                _self.exit()
        except KernelGone as e:             # the kernel stopped under it: one line, no traceback
            os.write(2, ("emu: %s (pid %d): %s\n" % (name, os.getpid(), e.strerror)).encode())
            code = 1
        except KernelPanic as e:            # the same, for a kernel that panicked
            os.write(2, ("emu: %s (pid %d): %s\n" % (name, os.getpid(), e)).encode())
            code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
            if _self is not None:
                _self.exit()
        os._exit(code)
    os.close(w)
    ready = os.read(r, 1)
    th = Thread(pid, r, name, kind, parent)
    if ready != b"R":
        th.join()
        raise OSError(u.ECHILD, "%s: the new %s died before it attached (exit %s)"
                      % (name, "thread" if kind == "clone" else "process", th.exitcode))
    return th


def _write_all(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def attach(host: Host, name: str = "emu") -> Task:
    """This process becomes the main thread of a new emulated process."""
    return Task(host, "process", None, name)
