"""The supervisor: the emulated kernel behind a QMP-like JSON-lines unix socket.

One thread, one selector; after a request it polls for the next one a while
(supervisor.halt_poll_ns) before sleeping.  Each worker connection is one
emulated thread, identified by SO_PEERCRED; a connection that never attaches is
a control client (the CLI, a test's host handle).  Worker deaths are seen as EOF
and, as a backstop, by polling psutil.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import selectors
import signal
import socket
import struct
import time

import psutil

from . import _core as C
from . import config as cfgmod
from . import shm
from . import uapi as u
from .haltpoll import others_waiting
from .kernel import Kernel, KernelPanic
from .kernel.page_alloc import POPULATE_AHEAD
from .kernel.syscalls import HOSTCALLS, SYSCALLS

log = logging.getLogger("emu.daemon")

VERSION = "0.1.0"
SIG_GROUP_EXIT = signal.SIGRTMIN + 6        # worker doorbell: die like the rest of the group
GROUP_EXIT_GRACE = 1.0


class Conn:
    __slots__ = ("sock", "pid", "uid", "rbuf", "task", "closed")

    def __init__(self, sock, pid, uid):
        self.sock, self.pid, self.uid = sock, pid, uid
        self.rbuf = b""
        self.task = None
        self.closed = False


# socket.recv(n) allocates n bytes first: a 1 MiB buffer costs an mmap/munmap
# pair per request (~15-25 us here); a longer line just arrives in pieces.
RECV_SIZE = 65536


class Supervisor:
    def __init__(self, cfg: dict, sock_path: str, owner_pid: int | None = None,
                 pidfile: str | None = None):
        self.cfg = cfg
        self.sock_path = sock_path
        self.owner_pid = owner_pid
        self.pidfile = pidfile
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}
        self.stopping = False
        self.kill_deadline: dict[int, float] = {}
        self._pidfd = None
        self.segs = None
        self.listener = None
        self.log_where = _log_where()

    # ------------------------------------------------------------ lifecycle
    def boot(self) -> None:
        if self.pidfile:
            self._pidfd = os.open(self.pidfile, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._pidfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise SystemExit("emu daemon: already running (pid file %s is locked)"
                                 % self.pidfile) from None
            os.ftruncate(self._pidfd, 0)
            os.write(self._pidfd, b"%d\n" % os.getpid())
        shm.cleanup()                                   # leftovers of dead supervisors
        ram = self.cfg["memory"]["ram_bytes"]
        nframes = ram >> 12
        lim = self.cfg["limits"]
        # enough to map all of RAM once at 4K, plus a PGD/PUD/PMD/PTE chain per process
        npt = (lim["page_tables"] + 1 if lim["page_tables"]       # (page 0 is never used)
               else 4096 + nframes // 512 + 4 * lim["mms"])
        self.segs = shm.Segments.create(nframes, lim["tasks"], lim["mms"], npt, lim["events"],
                                        lim["inodes"], lim["vmas"])
        self.core = self.segs.core
        k = self.cfg["kernel"]
        self.kernel = Kernel(self.core, nframes, policy=k["policy"], sysctl=self.cfg["sysctl"],
                             madvise_action_required=k["madvise_action_required"],
                             hugepages=self.cfg["hugepages"])
        self.kernel.buddy.populate_ahead(POPULATE_AHEAD)
        if os.path.exists(self.sock_path):
            os.unlink(self.sock_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.listener.bind(self.sock_path)
        finally:
            os.umask(old)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    def _on_signal(self, signum, frame):
        self.stopping = True

    def serve_forever(self, ready_fd: int | None = None) -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"ready %s\n" % self.sock_path.encode())
            os.close(ready_fd)
        last_tick = 0.0
        poll_ns = self.cfg["supervisor"]["halt_poll_ns"]
        select, clock = self.sel.select, time.perf_counter_ns
        buddy = self.kernel.buddy
        polling_until = 0
        try:
            while not self.stopping:
                events = select(0 if polling_until else 0.1)
                for key, _ in events:
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        try:
                            os.read(self._wake_r, 512)
                        except BlockingIOError:
                            pass
                    else:
                        self._guarded(self._readable, key.data)
                        if poll_ns:
                            polling_until = clock() + poll_ns
                if not events and polling_until:
                    # halt polling: a thread that just made a call is likely to make
                    # another; waking this CPU from halt costs more than the call
                    if clock() < polling_until and not others_waiting():
                        if not buddy.populate_ahead():    # idle work first
                            os.sched_yield()
                    else:
                        polling_until = 0
                now = time.monotonic()
                if now - last_tick >= 0.1:
                    last_tick = now
                    self._guarded(self._supervise)
        except KernelPanic as e:
            log.error("kernel panic: %s", e)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        if self.segs is None:
            return
        self.core.set_shutdown()
        victims = []
        kernel = getattr(self, "kernel", None)
        for t in list(kernel.tasks.values()) if kernel is not None else []:
            if t.tid != self.owner_pid and t.tid != os.getpid():
                victims.append(t.tid)
        self._stop_pids(victims)
        for c in list(self.conns.values()):
            self._close(c, dead=False)
        if self.listener is not None:
            try:
                self.listener.close()
                os.unlink(self.sock_path)
            except OSError:
                pass
        self.segs.unlink()
        self.segs = None
        if self.pidfile:
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass

    @staticmethod
    def _stop_pids(pids) -> None:
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        end = time.monotonic() + 2
        while any(_pid_alive(p) for p in pids) and time.monotonic() < end:   # zombies count as gone
            time.sleep(0.01)

    # ------------------------------------------------------------ connections
    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            log.warning("refusing uid %d (pid %d)", uid, pid)
            sock.close()
            return
        sock.setblocking(True)
        c = Conn(sock, pid, uid)
        self.conns[sock.fileno()] = c
        self.sel.register(sock, selectors.EVENT_READ, c)
        self._send(c, {"QMP": {"version": VERSION, "capabilities": [],
                               "halt_poll_ns": self.cfg["supervisor"]["halt_poll_ns"]}})

    def _readable(self, c: Conn) -> None:
        try:
            data = c.sock.recv(RECV_SIZE)
        except OSError:
            data = b""
        if not data:
            self._close(c, dead=True)
            return
        c.rbuf += data
        while b"\n" in c.rbuf and not c.closed:
            line, c.rbuf = c.rbuf.split(b"\n", 1)
            if line.strip():
                self._handle(c, line)

    def _send(self, c: Conn, obj) -> None:
        try:
            c.sock.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        except OSError:
            pass

    def _close(self, c: Conn, dead: bool) -> None:
        if c.closed:
            return
        c.closed = True
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        self.conns.pop(c.sock.fileno(), None)
        c.sock.close()
        t = c.task
        if t is not None and t.alive and dead and self.segs is not None:
            self._task_died(t)

    # ------------------------------------------------------------ requests
    def _handle(self, c: Conn, line: bytes) -> None:
        """One request.  Bad input (a line that is not a JSON object, an argument the
        kernel refused with OSError) gets an errno; any other exception is an
        emulator bug: reported as BUG() in dmesg and the log, the kernel tainted,
        and the caller told so, never given an errno it would take for bad input."""
        try:
            req = json.loads(line)
        except Exception as e:                 # ValueError, RecursionError from a hostile line
            self._send(c, _generic(None, "request: not JSON: %s" % _one_line(e)))
            return
        if not isinstance(req, dict):
            self._send(c, _generic(None, "request: expected an object"))
            return
        rid = req.get("id")
        name = req.get("execute")
        args = req.get("arguments")
        if args is None:
            args = {}
        if not isinstance(name, str):
            self._send(c, _generic(rid, "execute: expected a command name"))
            return
        if not isinstance(args, dict):
            self._send(c, _generic(rid, "arguments: expected an object"))
            return
        k = self.kernel
        try:
            fn = SYSCALLS.get(name)
            if fn is not None:
                t = c.task
                if t is None or not t.alive:
                    raise OSError(u.ESRCH, "%s: this connection is not an attached thread" % name)
                k.current = t
                try:
                    ret = fn(k, t, args)
                finally:
                    k.current = None
                sigs = t.reply_sigs
                if sigs:
                    t.reply_sigs = []
                    self._send(c, {"id": rid, "return": ret, "sigs": sigs})
                else:
                    self._send(c, {"id": rid, "return": ret})
                return
            fn = HOSTCALLS.get(name)
            if fn is not None:
                ret = fn(k, args)
            elif name == "attach":
                ret = self._attach(c, args)
            elif name == "exit":
                if c.task is not None:
                    c.task.clean_exit = True
                ret = 0
            elif name == "reap":
                ret = self._reap(c, args)
            elif name == "shutdown":
                self.stopping = True
                ret = 0
            elif name == "segments":
                ret = {"names": list(self.segs.names), "pid": os.getpid()}
            else:
                raise OSError(u.ENOSYS, "unknown command %r" % (name,))
            self._send(c, {"id": rid, "return": ret})
        except KernelPanic:
            raise
        except OSError as e:
            err = e.errno if isinstance(e.errno, int) and e.errno > 0 else None
            if err is None:                     # an OSError without an errno: not validation
                self._bug(c, rid, name, e)
                return
            rep = {"id": rid, "error": {"class": "OSError", "errno": err,
                                        "desc": e.strerror or os.strerror(err)}}
            self._reply_sigs(c, rep)
            self._send(c, rep)
        except MemoryError as e:
            # frames or page tables ran out where Linux would fail the allocation
            # (-ENOMEM, VM_FAULT_OOM) before installing anything
            rep = {"id": rid, "error": {"class": "OSError", "errno": u.ENOMEM,
                                        "desc": str(e) or "out of memory"}}
            self._reply_sigs(c, rep)
            self._send(c, rep)
        except Exception as e:
            self._bug(c, rid, name, e)

    def _guarded(self, fn, *args) -> None:
        """Kernel work outside a request (a task's teardown on EOF, housekeeping): an
        unexpected exception is an emulator bug too, reported, and the kernel serves on."""
        try:
            fn(*args)
        except (KernelPanic, KeyboardInterrupt):
            raise
        except Exception as e:
            where = self.kernel.report_bug(e, 0, "kworker/0:0")
            log.error("emulator bug in %s (kernel BUG at %s), kernel tainted", fn.__name__,
                      where, exc_info=e)

    def _reply_sigs(self, c: Conn, rep: dict) -> None:
        if c.task is not None and c.task.reply_sigs:
            # signals queued on current are delivered on return to user
            # whatever the system call returns
            rep["sigs"], c.task.reply_sigs = c.task.reply_sigs, []

    def _bug(self, c: Conn, rid, name: str, e: BaseException) -> None:
        """An emulator bug: BUG() in dmesg, the traceback in the daemon log, the kernel
        tainted; the caller gets EmulatorBug, and the supervisor serves on."""
        t = c.task
        where = self.kernel.report_bug(e, t.tid if t else c.pid, t.comm if t else "emu-host")
        log.error("emulator bug in %r (kernel BUG at %s), kernel tainted", name, where,
                  exc_info=e)
        rep = {"id": rid, "error": {
            "class": "EmulatorBug", "errno": u.EIO, "where": where,
            "desc": "emulator bug in %s: %s: %s at %s; the traceback is in dmesg "
                    "(host.dmesg(), `emu dmesg`) and in the daemon log (%s); the kernel is "
                    "tainted" % (name, type(e).__name__, _one_line(e), where, self.log_where)}}
        self._reply_sigs(c, rep)
        self._send(c, rep)

    def _attach(self, c: Conn, a: dict):
        if c.task is not None:
            raise OSError(u.EBUSY, "already attached")
        k = self.kernel
        kind = a.get("kind", "process")
        comm = a.get("comm") or "emu"
        if not isinstance(comm, str):
            raise OSError(u.EINVAL, "comm")
        if not isinstance(kind, str):
            raise OSError(u.EINVAL, "kind: process, clone or fork")
        if c.pid in k.tasks:
            raise OSError(u.EEXIST, "pid %d is already a task" % c.pid)
        if kind == "process":
            t = k.new_process(c.pid, comm)
        elif kind in ("clone", "fork"):
            pid = a.get("parent")
            parent = k.tasks.get(pid) if isinstance(pid, int) else None
            if parent is None or not parent.alive:
                raise OSError(u.ESRCH, "parent task")
            t = (k.clone if kind == "clone" else k.fork)(parent, c.pid, comm)
        else:
            raise OSError(u.EINVAL, "kind: process, clone or fork")
        t.conn = c
        c.task = t
        return {"slot": t.slot, "tid": t.tid, "tgid": t.tgid, "pgd": t.process.mm.pgd,
                "segments": list(self.segs.names), "supervisor_pid": os.getpid(),
                "mce_flags": t.flags, "group_exit_sig": int(SIG_GROUP_EXIT)}

    def _reap(self, c: Conn, a: dict) -> int:
        """A parent is about to reap a worker that exited (it waited with WNOWAIT):
        settle the death now, while /proc still shows the zombie's exit status."""
        tid = a.get("tid")
        t = self.kernel.tasks.get(tid) if isinstance(tid, int) else None
        if t is None or c.task is None or not t.alive or _pid_alive(tid):
            return 0                    # only a worker that has exited is settled here
        if t.conn is not None:
            self._close(t.conn, dead=True)
        else:
            self._task_died(t)
        return 0

    # ------------------------------------------------------------ supervision
    def _task_died(self, t) -> None:
        """A worker is gone.  A clean exit is a thread exit; a death by signal takes
        its thread group with it (exit_group), as Linux does."""
        k = self.kernel
        proc = t.process
        group = not t.clean_exit or t.tid == proc.tgid
        sig = self.core.task_exit_sig(t.slot) or (0 if t.clean_exit else
                                                  _death_signal(t.tid) or u.SIGKILL)
        k.exit_task(t)
        k.trace("exit", tid=t.tid, sig=sig, clean=t.clean_exit)
        if group:
            for th in proc.threads:
                if th.alive and th.tid not in self.kill_deadline:
                    gsig = sig or u.SIGKILL
                    self.core.task_set(th.slot, "group_exit_sig", gsig)
                    C.tgkill(th.tid, th.tid, int(SIG_GROUP_EXIT))
                    self.kill_deadline[th.tid] = time.monotonic() + GROUP_EXIT_GRACE
        k.tick()

    def _supervise(self) -> None:
        k = self.kernel
        now = time.monotonic()
        for t in list(k.tasks.values()):
            if not _pid_alive(t.tid):
                if t.conn is not None:
                    self._close(t.conn, dead=True)
                elif t.alive:
                    self._task_died(t)
        for tid, when in list(self.kill_deadline.items()):
            if not _pid_alive(tid):
                del self.kill_deadline[tid]
            elif now >= when:
                try:
                    os.kill(tid, signal.SIGKILL)
                except OSError:
                    pass
                del self.kill_deadline[tid]
        if self.owner_pid is not None and not _pid_alive(self.owner_pid):
            self.stopping = True
        k.tick()
        k.buddy.populate_ahead(POPULATE_AHEAD)


def _generic(rid, desc: str) -> dict:
    """A protocol-level error: the line was not a request."""
    return {"id": rid, "error": {"class": "GenericError", "errno": u.EINVAL, "desc": desc}}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _log_where() -> str:
    """Where this process's log (stderr) goes, for an error message."""
    try:
        path = os.readlink("/proc/self/fd/2")
    except OSError:
        return "the supervisor's stderr"
    return path if path.startswith("/") and os.path.isfile(path) else "the supervisor's stderr"


def _death_signal(pid: int, wait: float = 0.2) -> int:
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


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run(cfg: dict, sock_path: str, owner_pid: int | None = None, pidfile: str | None = None,
        ready_fd: int | None = None) -> None:
    sup = Supervisor(cfg, sock_path, owner_pid, pidfile)
    try:
        sup.boot()
    except BaseException:
        sup.shutdown()
        raise
    prof = os.environ.get("EMU_PROFILE")          # developers: cProfile the kernel
    if prof:
        import cProfile

        cProfile.runctx("sup.serve_forever(ready_fd)", globals(), locals(),
                        "%s.%d" % (prof, os.getpid()))
    else:
        sup.serve_forever(ready_fd)


def spawn_private(cfg: dict) -> tuple[int, str]:
    """Fork a private supervisor owned by this process; returns (pid, socket)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # the supervisor
        try:
            os.close(r)
            os.setpgid(0, 0)
            for s in (signal.SIGBUS, signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(s, signal.SIG_DFL)
            path = os.path.join(shm.runtime_dir(), "priv-%d.sock" % os.getpid())
            run(cfg, path, owner_pid=os.getppid(), ready_fd=w)
            code = 0
        except SystemExit as e:
            os.write(w, ("error %s\n" % e).encode())
            code = 1
        except BaseException as e:
            try:
                os.write(w, ("error %s: %s\n" % (type(e).__name__, e)).encode())
            except OSError:
                pass
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        line = f.readline().decode().strip()
    if not line.startswith("ready "):
        os.waitpid(pid, 0)
        raise RuntimeError("supervisor failed to start: %s" % (line or "no output"))
    return pid, line[6:]


def config_from(**kw) -> dict:
    return cfgmod.build(**kw)
