"""The supervisor: the emulated kernel behind a QMP-like JSON-lines unix socket.

One thread, one selector; after a request it polls for the next one a while
(supervisor.halt_poll_ns) before sleeping.  Each worker connection is one
emulated thread, identified by SO_PEERCRED; a connection that never attaches is
a control client (the CLI, a test's host handle).  Worker deaths are seen as EOF
and, as a backstop, by polling psutil.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import selectors
import signal
import socket
import struct
import time

from . import _core as C
from . import shm
from . import uapi as u
from .haltpoll import others_waiting
from .kernel import Kernel, Panic
from .kernel.page_alloc import POPULATE_AHEAD
from .kernel.syscalls import HOSTCALLS, SYSCALLS, after_panic_ok
from .procfs import death_signal, maps_segment, pid_alive
from .qmp import MAX_REQUEST, BadRequest, generic_error, one_line, parse_request

log = logging.getLogger("emu.daemon")
EVENT_WRITE = selectors.EVENT_WRITE

VERSION = "0.1.0"
SIG_GROUP_EXIT = signal.SIGRTMIN + 6        # worker doorbell: die like the rest of the group
SIG_SHUTDOWN = signal.SIGRTMIN + 7          # worker doorbell: the kernel shuts down (ESHUTDOWN)
SIG_PANIC = signal.SIGRTMIN + 8             # worker doorbell: the kernel panicked (KernelPanic)
GROUP_EXIT_GRACE = 1.0
# tasks whose liveness one _supervise tick checks, round robin: a death is seen at once
# as EOF on the task's socket, the sweep is the fallback, and a check costs ~50-100 us
# (psutil reads /proc/PID/stat), so checking every task every tick cost the serving
# thread O(tasks) per 100 ms (a third of it at 768 tasks)
SWEEP_BATCH = 32


class Conn:
    __slots__ = ("sock", "pid", "uid", "rbuf", "wbuf", "task", "closed")

    def __init__(self, sock, pid, uid):
        self.sock, self.pid, self.uid = sock, pid, uid
        self.rbuf = b""
        self.wbuf = b""          # reply bytes the peer has not taken yet
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
        self._sweep_at = 0              # where the next liveness sweep starts in kernel.tasks
        self._pidfd = None
        self.segs = None
        self.listener = None
        self.log_where = _log_where()
        self._spare_fd = None           # given up to accept-and-close when out of fds
        self._accept_warned = 0.0

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
        self.segs = shm.Segments.create(nframes, lim["tasks"], lim["mms"], npt,
                                        lim["inodes"], lim["vmas"])
        self.core = self.segs.core
        k = self.cfg["kernel"]
        self.kernel = Kernel(self.core, nframes, policy=k["policy"], sysctl=self.cfg["sysctl"],
                             madvise_action_required=k["madvise_action_required"],
                             hugepages=self.cfg["hugepages"], events=lim["events"])
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
        self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
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
            try:
                os.write(ready_fd, b"ready %s\n" % self.sock_path.encode())
            except BaseException:           # the owner went away while we booted
                self.shutdown()
                raise
            os.close(ready_fd)
        last_tick = 0.0
        poll_ns = self.cfg["supervisor"]["halt_poll_ns"]
        select, clock = self.sel.select, time.perf_counter_ns
        buddy = self.kernel.buddy
        polling_until = 0
        try:
            while not self.stopping:
                events = select(0 if polling_until else 0.1)
                for key, mask in events:
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        try:
                            os.read(self._wake_r, 512)
                        except BlockingIOError:
                            pass
                    elif mask & EVENT_WRITE:
                        self._writable(key.data)
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
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """An orderly shutdown, as init does at poweroff.  The kernel marks itself
        shutting down (workers' watchdogs then let their process live); the socket
        goes, so nothing new connects; every connection gets a SHUTDOWN event and
        EOF, so a pending or next call fails with ESHUTDOWN; every attached thread
        but the owner gets the shutdown doorbell, which raises ESHUTDOWN where it
        runs (idle or not) and retires the thread.  A process may then exit as it
        likes (status 0 if it handles the error).  One still attached, that is
        still mapping the machine, after supervisor.shutdown_grace_ms is
        SIGKILLed, as systemd follows SIGTERM with SIGKILL."""
        if self.segs is None:
            return
        self.core.set_shutdown()
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
        if self.listener is not None:
            try:
                self.sel.unregister(self.listener)
            except (KeyError, ValueError):
                pass
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.sock_path)
            except OSError:
                pass
        victims = []
        kernel = getattr(self, "kernel", None)
        panicked = kernel is not None and kernel.panicked is not None
        for t in list(kernel.tasks.values()) if kernel is not None else []:
            if t.alive and t.tid != self.owner_pid and t.tid != os.getpid():
                # after a panic the task table is frozen: only a worker that still
                # maps the machine is one (its pid may be gone, or another's by now)
                if not panicked or maps_segment(t.tid, self.segs.names[0]):
                    victims.append(t.tid)
        for c in list(self.conns.values()):
            self._send(c, {"event": "SHUTDOWN"})    # queued after any reply still unread
            self._close(c, dead=False)              # flushes, bounded by _flush's timeout
        for tid in victims:
            C.tgkill(tid, tid, int(SIG_SHUTDOWN))
        grace = self.cfg.get("supervisor", {}).get("shutdown_grace_ms", 5000) / 1000
        self._stop_pids(victims, self.segs.names[0], grace)
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
    def _stop_pids(pids, segment: str, grace: float) -> None:
        """Wait up to `grace` s for each pid to exit or to let go of the machine
        (unmap `segment`); SIGKILL the rest and wait for them to die."""
        end = time.monotonic() + grace
        pending = list(pids)
        while pending:
            pending = [p for p in pending if pid_alive(p) and maps_segment(p, segment)]
            if not pending or time.monotonic() >= end:
                break
            time.sleep(0.01)
        for pid in pending:
            log.warning("pid %d still attached %.1f s after shutdown: killed", pid, grace)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        end = time.monotonic() + 2
        while any(pid_alive(p) for p in pending) and time.monotonic() < end:   # zombies count as gone
            time.sleep(0.01)

    # ------------------------------------------------------------ connections
    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        except OSError as e:
            self._accept_failed(e)
            return
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            sock.close()
            return
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            log.warning("refusing uid %d (pid %d)", uid, pid)
            sock.close()
            return
        # non-blocking: a peer that does not read its replies must not stall the
        # one thread that runs the kernel (see _send)
        sock.setblocking(False)
        c = Conn(sock, pid, uid)
        self.conns[sock.fileno()] = c
        self.sel.register(sock, selectors.EVENT_READ, c)
        self._send(c, {"QMP": {"version": VERSION, "capabilities": [],
                               "halt_poll_ns": self.cfg["supervisor"]["halt_poll_ns"],
                               "max_request": MAX_REQUEST}})

    def _accept_failed(self, e: OSError) -> None:
        """accept() failed, typically EMFILE: the pending connection would keep the
        listener readable and the loop spinning.  Free the spare fd, accept it and
        close it at once (the peer sees EOF before the greeting), re-arm the spare."""
        now = time.monotonic()
        if now - self._accept_warned >= 1.0:
            self._accept_warned = now
            log.warning("accept: %s: refusing connections", e.strerror or e)
        if e.errno not in (u.EMFILE, errno.ENFILE) or self._spare_fd is None:
            return
        os.close(self._spare_fd)
        self._spare_fd = None
        try:
            self.listener.accept()[0].close()
        except OSError:
            pass
        try:
            self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass

    def _readable(self, c: Conn) -> None:
        try:
            data = c.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(c, dead=True)
            return
        if b"\n" not in data:                 # most of a long line: just keep it
            c.rbuf += data
            if len(c.rbuf) > MAX_REQUEST:
                self._too_long(c)
            return
        c.rbuf += data
        self._lines(c)

    def _lines(self, c: Conn) -> None:
        """Run the complete request lines buffered on c, in order, while its
        replies are being taken (a peer that stops reading stops being served)."""
        while not c.closed and not c.wbuf:
            line, sep, rest = c.rbuf.partition(b"\n")
            if not sep:
                if len(c.rbuf) > MAX_REQUEST:
                    self._too_long(c)
                return
            if len(line) > MAX_REQUEST:
                self._too_long(c)
                return
            c.rbuf = rest
            if line.strip():
                self._handle(c, line)

    def _too_long(self, c: Conn) -> None:
        log.warning("pid %d: request line over %d bytes: closing its connection",
                    c.pid, MAX_REQUEST)
        c.rbuf = b""
        self._send(c, {"id": None, "error": {
            "class": "GenericError", "errno": u.EMSGSIZE,
            "desc": "request line over %d bytes" % MAX_REQUEST}})
        self._close(c, dead=True)

    def _send(self, c: Conn, obj) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        if c.wbuf:
            c.wbuf += data
            return
        try:
            n = c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:                   # the peer is gone: EOF on its read side closes it
            return
        if n < len(data):                 # the peer's buffer is full: wait for POLLOUT,
            c.wbuf = data[n:]             # and read nothing more from it meanwhile
            self.sel.modify(c.sock, selectors.EVENT_WRITE, c)

    def _writable(self, c: Conn) -> None:
        try:
            n = c.sock.send(c.wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c, dead=True)
            return
        c.wbuf = c.wbuf[n:]
        if not c.wbuf:
            self.sel.modify(c.sock, selectors.EVENT_READ, c)
            self._lines(c)

    def _flush(self, c: Conn, timeout: float = 0.2) -> None:
        """Closing: give the peer a moment to take what it was sent."""
        if c.wbuf:
            try:
                c.sock.settimeout(timeout)
                c.sock.sendall(c.wbuf)
            except OSError:
                pass
            c.wbuf = b""

    def _close(self, c: Conn, dead: bool) -> None:
        if c.closed:
            return
        c.closed = True
        if not dead:
            self._flush(c)
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        self.conns.pop(c.sock.fileno(), None)
        c.sock.close()
        t = c.task
        if t is not None and t.alive and dead and self.segs is not None \
                and self.kernel.panicked is None:      # a panicked kernel changes nothing
            self._task_died(t)

    # ------------------------------------------------------------ requests
    def _handle(self, c: Conn, line: bytes) -> None:
        """One request.  Bad input (a line that is not a JSON object, an argument the
        kernel refused with OSError) gets an errno; any other exception is an
        emulator bug: reported as BUG() in dmesg and the log, the kernel tainted,
        and the caller told so, never given an errno it would take for bad input."""
        try:
            rid, name, args = parse_request(line)
        except BadRequest as e:                # the line is not a request: no kernel work
            self._send(c, generic_error(e.rid, e.strerror))
            return
        k = self.kernel
        if k.panicked is not None and not after_panic_ok(name, args):
            if name == "exit":                  # nothing to retire in a stopped kernel
                c.task = None
                self._send(c, {"id": rid, "return": 0})
            else:
                self._send(c, panic_error(rid, k.panicked))
            return
        try:
            fn = SYSCALLS.get(name)
            if fn is not None:
                t = c.task
                if t is None or not t.alive:
                    raise OSError(u.ESRCH, "%s: this connection is not an attached thread" % name)
                k.current, k.syscall = t, name
                try:
                    try:
                        ret = fn(k, t, args)
                    finally:
                        if t.mce_kill_me is not None and k.panicked is None:
                            k.mce.task_work_run(t)    # exit_to_user_mode, whatever fn returned
                finally:
                    k.current = k.syscall = None
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
                # a clean exit: retired now, so the caller may attach again at once.
                # thread=True: SYS_exit even for the main thread (pthread_exit), which
                # then leaves its process to the other threads
                thread = args.get("thread", False)
                if not isinstance(thread, bool):
                    raise OSError(u.EINVAL, "thread: expected true or false")
                t, c.task = c.task, None
                if t is not None and t.alive:
                    t.clean_exit = True
                    t.thread_exit = thread
                    t.conn = None
                    self._task_died(t)
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
        except Panic:
            # the call that panicked never returns: its caller hears of it first
            self._send(c, panic_error(rid, k.panicked))
            self._panicked(cause=c)
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
        except Panic:
            self._panicked(cause=None)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            where = self.kernel.report_bug(e, 0, "kworker/0:0")
            log.error("emulator bug in %s (kernel BUG at %s), kernel tainted", fn.__name__,
                      where, exc_info=e)

    def _panicked(self, cause: Conn | None) -> None:
        """The kernel called panic(): the machine stops.  Its state stays as the
        panic left it, readable by the host (after_panic_ok) as a crash dump is;
        everything else is refused with KernelPanic.  Every connection gets a PANIC
        event, and every attached thread the panic doorbell, which raises
        KernelPanic wherever it runs (a call, the fast path, idle, KVM_RUN) and
        retires it; the process that caused it has its answer already.  The
        supervisor itself runs on until an orderly shutdown (emu stop, close)."""
        k = self.kernel
        log.error("kernel panic - not syncing: %s (the machine is stopped; its state "
                  "stays readable until `emu stop`)", k.panicked)
        self.core.set_panic(k.panicked)
        self.kill_deadline.clear()
        for c in list(self.conns.values()):
            self._send(c, {"event": "PANIC", "reason": k.panicked})
        me = os.getpid()
        for t in list(k.tasks.values()):
            if t.alive and t.tid != me and (cause is None or t.tid != cause.pid):
                C.tgkill(t.tid, t.tid, int(SIG_PANIC))

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
                    "tainted" % (name, type(e).__name__, one_line(e), where, self.log_where)}}
        self._reply_sigs(c, rep)
        self._send(c, rep)

    def _attach(self, c: Conn, a: dict):
        if c.task is not None:
            raise OSError(u.EBUSY, "already attached")
        k = self.kernel
        kind = a.get("kind", "process")
        comm = a.get("comm") or "emu"
        parent = a.get("parent")
        if not isinstance(comm, str):
            raise OSError(u.EINVAL, "comm")
        if not isinstance(kind, str):
            raise OSError(u.EINVAL, "kind: process, clone or fork")
        if parent is not None and (not isinstance(parent, int) or isinstance(parent, bool)):
            raise OSError(u.EINVAL, "parent: expected a tid")
        if c.pid in k.tasks:
            raise OSError(u.EEXIST, "pid %d is already a task" % c.pid)
        if kind == "process":
            t = k.new_process(c.pid, comm)
        elif kind in ("clone", "fork"):
            parent = k.tasks.get(parent)
            if parent is None or not parent.alive:
                raise OSError(u.ESRCH, "parent task")
            t = (k.clone if kind == "clone" else k.fork)(parent, c.pid, comm)
        else:
            raise OSError(u.EINVAL, "kind: process, clone or fork")
        t.conn = c
        c.task = t
        return {"slot": t.slot, "tid": t.tid, "tgid": t.tgid, "pgd": t.process.mm.pgd,
                "segments": list(self.segs.names), "supervisor_pid": os.getpid(),
                "mce_flags": t.flags, "group_exit_sig": int(SIG_GROUP_EXIT),
                "shutdown_sig": int(SIG_SHUTDOWN), "panic_sig": int(SIG_PANIC)}

    def _reap(self, c: Conn, a: dict) -> int:
        """A parent is about to reap a worker that exited (it waited with WNOWAIT):
        settle the death now, while /proc still shows the zombie's exit status."""
        if self.kernel.panicked is not None:
            return 0                    # the frozen tables keep every task
        tid = a.get("tid")
        t = self.kernel.tasks.get(tid) if isinstance(tid, int) else None
        if t is None or c.task is None or not t.alive or pid_alive(tid):
            return 0                    # only a worker that has exited is settled here
        if t.conn is not None:
            self._close(t.conn, dead=True)
        else:
            self._task_died(t)
        return 0

    # ------------------------------------------------------------ supervision
    def _task_died(self, t) -> None:
        """A worker is gone.  A clean exit is a thread exit (the main thread's takes
        the group, unless it asked for a thread exit alone); a death by signal takes
        its thread group with it (exit_group), as Linux does."""
        k = self.kernel
        proc = t.process
        group = not t.clean_exit or (t.tid == proc.tgid and not t.thread_exit)
        sig = self.core.task_exit_sig(t.slot) or (0 if t.clean_exit else
                                                  death_signal(t.tid) or u.SIGKILL)
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

    def _sweep_batch(self, tasks: list) -> list:
        """The next SWEEP_BATCH tasks, round robin: every task is checked once per
        ceil(len(tasks) / SWEEP_BATCH) ticks, and a tick's cost does not grow with
        the number of tasks."""
        n = len(tasks)
        if n <= SWEEP_BATCH:
            self._sweep_at = 0
            return tasks
        start = self._sweep_at % n
        batch = tasks[start:start + SWEEP_BATCH]
        batch += tasks[:SWEEP_BATCH - len(batch)]
        self._sweep_at = start + SWEEP_BATCH
        return batch

    def _supervise(self) -> None:
        k = self.kernel
        if k.panicked is not None:            # a stopped machine: only its owner matters
            if self.owner_pid is not None and not pid_alive(self.owner_pid):
                self.stopping = True
            return
        now = time.monotonic()
        for t in self._sweep_batch(list(k.tasks.values())):
            if not pid_alive(t.tid):
                if t.conn is not None:
                    self._close(t.conn, dead=True)
                elif t.alive:
                    self._task_died(t)
        for tid, when in list(self.kill_deadline.items()):
            if not pid_alive(tid):
                del self.kill_deadline[tid]
            elif now >= when:
                try:
                    os.kill(tid, signal.SIGKILL)
                except OSError:
                    pass
                del self.kill_deadline[tid]
        if self.owner_pid is not None and not pid_alive(self.owner_pid):
            self.stopping = True
        k.tick()
        k.buddy.populate_ahead(POPULATE_AHEAD)


def panic_error(rid, reason: str) -> dict:
    """The answer to a call the panicked kernel will not run (KernelPanic)."""
    return {"id": rid, "error": {"class": "KernelPanic", "errno": u.EIO, "reason": reason,
                                 "desc": "Kernel panic - not syncing: %s" % reason}}


def _log_where() -> str:
    """Where this process's log (stderr) goes, for an error message."""
    try:
        path = os.readlink("/proc/self/fd/2")
    except OSError:
        return "the supervisor's stderr"
    return path if path.startswith("/") and os.path.isfile(path) else "the supervisor's stderr"


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
