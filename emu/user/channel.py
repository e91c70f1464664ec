"""The connection to the emulated kernel: one QMP-like socket per thread (and one per
Host handle), JSON lines, replies matched to requests by id.  A system call is a
request on the calling thread's channel (what `syscall` is to a real thread)."""
from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import time
import weakref

from .. import uapi as u
from ..haltpoll import others_waiting
from .errors import DIED_MSG, SHUTDOWN_MSG, KernelGone, from_reply

GREETING_TIMEOUT = 30.0     # seconds for the supervisor to say hello after connect()
channels: weakref.WeakSet = weakref.WeakSet()   # every open one: a forked child closes them


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
        channels.add(self)

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
            raise from_reply(rep["error"], self.path)
        return rep.get("return")

