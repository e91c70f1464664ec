"""Drive a VMM worker step by step against a running daemon: `emu run-worker`.

The worker attaches to the daemon, boots its vCPUs and waits for commands on
stdin (or a --script file), one per line, printing a timeline as `emu demo`
does: what each of its threads did and saw, with the time since it started.
Errors are injected from another terminal with `emu inject` while it runs; `pfn`
tells which frame backs a guest address.

    read VCPU GPA          the guest on vCPU VCPU loads 8 bytes at GPA
    write VCPU GPA [BYTE]  the guest stores at GPA
    host-read GPA          QEMU's main thread reads guest RAM (device emulation)
    pfn GPA                the frame behind GPA (for `emu inject hw-poison PFN`)
    private GPA            convert the page at GPA to private (guest_memfd RAM)
    wait SECONDS           idle, letting asynchronous signals arrive
    quit

One Console drives two worker APIs through an adapter: QemuTarget (QemuLike,
threads per vCPU, a journal) and VmmTarget (workers.vmm_base.Vmm: one vCPU, a
log written to a file descriptor as it happens).  A Vmm worker may end its
process on its own (Firecracker's _exit(149) on SIGBUS, cloud-hypervisor killed
by SIGBUS): it runs in a child of `emu run-worker`, whose output goes through a
pipe to the parent; the parent prints the timeline, so the dying worker's last
log lines still appear, and then exits with the worker's status.
"""
from __future__ import annotations

import os
import select
import sys
import time

HELP = __doc__.split("\n\n")[2]


def _int(s: str) -> int:
    return int(s, 0)


class QemuTarget:
    """The Console's view of a QemuLike: vCPU threads, QEMU's own RAM access, a journal."""

    announce = False                      # the journal says what a vCPU does
    vmm_commands = "read VCPU GPA | write VCPU GPA [BYTE] | host-read GPA | pfn GPA | wait S | quit"

    def __init__(self, q):
        self.q = q

    def title(self) -> str:
        q, ram = self.q, self.q.ram
        return "%s: tgid %d, %d vCPUs, guest RAM %d KiB at GPA %#x (hva %#x)" % (
            type(q).__name__, q.me.tgid, len(q.vcpus), ram.size >> 10, ram.gpa_base, ram.hva)

    def access(self, vcpu: int, op: str, gpa: int, data: bytes | None):
        if op == "read":
            return self.q.vcpu(vcpu, "read", gpa, n=8)
        return self.q.vcpu(vcpu, "write", gpa, data=data)

    def host_read(self, gpa: int) -> tuple[str, str]:
        q = self.q
        data = q.me.read(q.ram.hva + gpa - q.ram.gpa_base, 8)
        return "main", "QEMU read %s at GPA %#x" % (data.hex(), gpa)

    def pfn(self, gpa: int) -> tuple[int | None, bool]:
        st = self.q.ram.vm.gpa_to_pfn(gpa)
        pfn = st.get("backing_pfn") if st.get("backing_pfn") is not None else st.get("pfn")
        return pfn, bool(st.get("private"))

    def make_private(self, gpa: int) -> None:
        raise ValueError("private: not a command of qemu-like")

    def idle(self, seconds: float) -> None:
        self.q.me.idle(seconds)

    def drain(self) -> list[tuple[int, str, str]]:
        """The journal since the last drain, in order."""
        self.q.deliver_pending_ao()
        out = sorted(self.q.journal)
        self.q.journal.clear()
        return out

    def stop(self) -> None:
        self.q.stop()


class VmmTarget:
    """The Console's view of a workers.vmm_base.Vmm (public API only): one vCPU, the
    device model's read, guest RAM; its log goes straight to its log_fd."""

    announce = True

    def __init__(self, vmm, ram: str):
        self.vmm, self.ram = vmm, ram
        self.private: set[int] = set()
        self.vmm_commands = ("read 0 GPA | write 0 GPA [BYTE] | host-read GPA | pfn GPA | "
                             + ("private GPA | " if ram == "gmem" else "") + "wait S | quit")

    def title(self) -> str:
        v = self.vmm
        return "%s: tgid %d, 1 vCPU, guest RAM (%s) %d KiB at GPA 0 (hva %#x)" % (
            type(v).__name__, v.task.tgid, self.ram, v.ram.size >> 10, v.ram.hva)

    def access(self, vcpu: int, op: str, gpa: int, data: bytes | None):
        if vcpu != 0:
            raise ValueError("%s has one vCPU: 0" % self.vmm.name)
        private = True if (gpa & ~0xFFF) in self.private else None
        if op == "read":
            return self.vmm.guest_read(gpa, 8, private)
        return self.vmm.guest_write(gpa, data, private)

    def host_read(self, gpa: int) -> tuple[str, str]:
        # the recovering VMM's device model recovers from an AR; the others just read
        read = getattr(self.vmm, "device_read", self.vmm.host_read)
        data = read(gpa, 8)
        if not isinstance(data, bytes):
            return "vmm", "device model read at GPA %#x: %s" % (gpa, data)
        return "vmm", "device model read %s at GPA %#x" % (data.hex(), gpa)

    def pfn(self, gpa: int) -> tuple[int | None, bool]:
        return self.vmm.ram.pfn(gpa), (gpa & ~0xFFF) in self.private

    def make_private(self, gpa: int) -> None:
        if self.ram != "gmem":
            raise ValueError("private: needs --ram gmem")
        self.vmm.ram.make_private(gpa & ~0xFFF)
        self.private.add(gpa & ~0xFFF)

    def idle(self, seconds: float) -> None:
        self.vmm.task.idle(seconds)

    def drain(self) -> list[tuple[int, str, str]]:
        return []

    def stop(self) -> None:
        self.vmm.close()
        self.vmm.task.exit()


class Console:
    def __init__(self, target, out=sys.stdout, t0: int | None = None):
        self.target, self.out = target, out
        self.t0 = time.monotonic_ns() if t0 is None else t0

    def line(self, t: int, who: str, text: str) -> None:
        self.out.write("%9.3f ms  %-7s %s\n" % ((t - self.t0) / 1e6, who, text))

    def say(self, who: str, text: str) -> None:
        self.line(time.monotonic_ns(), who, text)
        self.out.flush()

    def verbatim(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def flush(self) -> None:
        """The worker's journal since the last flush, in order."""
        for t, who, text in self.target.drain():
            self.line(t, who, text)
        self.out.flush()

    def banner(self) -> None:
        self.say("vmm", self.target.title())
        self.say("vmm", "commands: %s; inject from another terminal with `emu inject`"
                 % self.target.vmm_commands)

    def command(self, line: str) -> bool:
        """One command; False at quit."""
        words = line.split()
        if not words or words[0].startswith("#"):
            return True
        op, args = words[0], words[1:]
        tg = self.target
        try:
            if op == "quit":
                return False
            if op in ("read", "write"):
                data = None
                if op == "write":
                    data = bytes([_int(args[2]) if len(args) > 2 else 0x5A]) * 8
                vcpu, gpa = _int(args[0]), _int(args[1])
                if tg.announce:
                    self.say("vcpu%d" % vcpu, "guest %s 8 bytes at GPA %#x" % (
                        "reads" if op == "read" else "writes", gpa))
                r = tg.access(vcpu, op, gpa, data)
                self.flush()
                self.say("vcpu%s" % args[0], "result: %r" % (r,))
            elif op == "host-read":
                self.say(*tg.host_read(_int(args[0])))
            elif op == "pfn":
                gpa = _int(args[0])
                pfn, private = tg.pfn(gpa)
                self.say("vmm", "GPA %#x is pfn %s%s" % (gpa, "%#x" % pfn if pfn is not None else
                                                        "- (not populated yet)",
                                                        " (private)" if private else ""))
            elif op == "private":
                gpa = _int(args[0])
                tg.make_private(gpa)
                self.say("vmm", "GPA %#x converted to private" % gpa)
            elif op == "wait":
                tg.idle(float(args[0]))
                self.flush()
            elif op in ("help", "?"):
                self.verbatim(HELP)
            else:
                self.say("vmm", "unknown command %r (help lists them)" % op)
        except (IndexError, ValueError) as e:
            why = str(e) if isinstance(e, ValueError) and not str(e).startswith("invalid") else ""
            self.say("vmm", "bad arguments for %r%s (help lists them)"
                     % (op, ": " + why if why else ""))
        except OSError as e:
            self.flush()
            self.say("vmm", "%s: %s" % (op, e.strerror or e))
        return True

    def loop(self, fd: int) -> None:
        """Commands from fd, a line each; between them the journal keeps flowing
        (an AO signal arrives whenever the kernel sends it)."""
        buf = b""
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not self.command(line.decode(errors="replace")):
                    self.flush()
                    return
            r, _, _ = select.select([fd], [], [], 0.25)
            if not r:
                self.target.idle(0.01)
                self.flush()
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                if buf.strip():
                    self.command(buf.decode(errors="replace"))
                break
            buf += chunk
        self.flush()


class _Parser:
    """argparse whose errors are ValueError (`emu` prints them as one line)."""

    @staticmethod
    def make(prog: str, description: str):
        import argparse

        class Parser(argparse.ArgumentParser):
            def error(self, message):
                raise ValueError("%s: %s" % (prog.replace("emu ", "", 1), message))

        return Parser(prog=prog, description=description)


def _drive(c: Console, script: str | None) -> None:
    """Read commands until quit/EOF; `emu stop` (ESHUTDOWN) ends it quietly."""
    import errno

    try:
        if script:
            with open(script, "rb") as f:
                c.loop(f.fileno())
        else:
            c.loop(sys.stdin.fileno())
    except KeyboardInterrupt:
        pass
    except OSError as e:                      # `emu stop`: the host went away under the VM
        if e.errno != errno.ESHUTDOWN:
            raise
        c.say("vmm", "%s; exiting" % e.strerror)


def main(argv=None) -> int:
    """`emu run-worker qemu-like ...`: attach to the daemon, boot, take commands."""
    import emu

    ap = _Parser.make("emu run-worker qemu-like", "a QEMU-shaped VMM on a running emu daemon")
    ap.add_argument("--socket")
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--ram", default="2M", help="guest RAM (a guest_memfd), e.g. 2M")
    ap.add_argument("--recover", action="store_true",
                    help="punch a hole over a page KVM_RUN reports with EHWPOISON, and re-enter")
    ap.add_argument("--script", help="commands from this file instead of stdin")
    args = ap.parse_args(argv)
    from emu.config import ConfigError, parse_size
    from workers.qemu_like import QemuLike

    try:
        ram = parse_size("--ram", args.ram)
    except ConfigError as e:
        ap.error(str(e))
    if args.vcpus < 1 or ram % 4096:
        ap.error("--vcpus: at least 1; --ram: a multiple of 4K")
    host = emu.connect(args.socket)
    q = QemuLike(host, ram_size=ram, nvcpus=args.vcpus, recover=args.recover)
    c = Console(QemuTarget(q))
    c.banner()
    c.flush()
    _drive(c, args.script)
    q.stop()
    return 0


# ---- the Vmm workers (firecracker-like, cloud-hypervisor-like, recovering) ----

_REC = b"\x1e"       # a Console line through the pipe: RS ns TAB who TAB text


class _RecordOut:
    """The child's Console output: records for the parent to format."""

    def __init__(self, fd: int):
        self.fd, self.buf = fd, ""

    def write(self, s: str) -> None:
        self.buf += s

    def flush(self) -> None:
        if self.buf:
            os.write(self.fd, self.buf.encode())
            self.buf = ""


class _ChildConsole(Console):
    def line(self, t: int, who: str, text: str) -> None:
        self.out.write("\x1e%d\t%s\t%s\n" % (t, who, text))

    def verbatim(self, text: str) -> None:
        self.out.write("".join("\x1d%s\n" % x for x in text.split("\n")))
        self.out.flush()


def _relay(fd: int, who: str, t0: int, out=None) -> int:
    """The parent's half: print the child's records, and the worker's own log lines
    (raw, written as they happen) in the timeline under the worker's name.  How
    many lines it printed.

    A raw line carries no time: it gets the time it was read, or the next record's
    if that is earlier (the line was written first), so it waits for that record
    up to 50 ms; the times stay in order."""
    out = out or sys.stdout
    buf, n = b"", 0
    pending: list[tuple[int, str]] = []            # (read at, raw line)

    def emit(t: int, w: str, text: str) -> None:
        out.write("%9.3f ms  %-7s %s\n" % ((t - t0) / 1e6, w, text))

    def release(limit: int | None) -> None:
        for t, text in pending:
            emit(t if limit is None else min(t, limit), who, text)
        pending.clear()

    while True:
        r, _, _ = select.select([fd], [], [], 0.05 if pending else None)
        if not r:
            release(None)
            out.flush()
            continue
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        now = time.monotonic_ns()
        for raw in lines:
            s = raw.decode(errors="replace")
            n += 1
            if raw.startswith(_REC):
                ts, w, text = s[1:].split("\t", 2)
                release(int(ts))
                emit(int(ts), w, text)
            elif raw.startswith(b"\x1d"):          # verbatim (help text)
                release(None)
                out.write(s[1:] + "\n")
            else:
                pending.append((now, s))
        out.flush()
    release(None)
    if buf:
        out.write(buf.decode(errors="replace") + "\n")
    out.flush()
    return n


def vmm_main(kind: str, argv=None) -> int:
    """`emu run-worker KIND ...` for a workers.vmm_base.Vmm: the worker runs in a
    child process (the emulated VMM); this process prints its timeline and exits
    with its status (a worker killed by a signal: killed by the same signal)."""
    import signal

    from emu.config import ConfigError, parse_size

    spec = VMM_WORKERS[kind]
    ap = _Parser.make("emu run-worker %s" % kind, spec["help"])
    ap.add_argument("--socket")
    ap.add_argument("--ram", default="anon", choices=("anon", "gmem"),
                    help="guest RAM: private anonymous memory or one guest_memfd")
    ap.add_argument("--size", default="64K", help="guest RAM size, e.g. 64K")
    if kind == "recovering":
        ap.add_argument("--pattern", required=True, choices=_recovering_patterns(),
                        help="what the VMM does about a memory error")
    ap.add_argument("--script", help="commands from this file instead of stdin")
    args = ap.parse_args(argv)
    try:
        size = parse_size("--size", args.size)
    except ConfigError as e:
        ap.error(str(e))
    if size < 4096 or size % 4096:
        ap.error("--size: a multiple of 4K")

    t0 = time.monotonic_ns()
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:                                  # never returns into the caller
        code = 2
        try:
            os.close(r)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = _vmm_child(kind, args, size, w, t0)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the worker's to handle
    shown = 0
    try:
        shown = _relay(r, spec["who"], t0)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
        signal.signal(signal.SIGINT, old)
    code = os.waitstatus_to_exitcode(status)
    if code and shown:                            # (not when it could not even attach)
        sys.stdout.write("%9.3f ms  %-7s %s\n" % ((time.monotonic_ns() - t0) / 1e6, "vmm",
                         "the worker exited with status %d" % code if code > 0 else
                         "the worker was killed by %s" % signal.Signals(-code).name))
        sys.stdout.flush()
    if code < 0:                                  # as a shell sees it: 128 + the signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _recovering_patterns():
    from workers.recovering import PATTERNS
    return PATTERNS


def _vmm_child(kind: str, args, size: int, w: int, t0: int) -> int:
    """The emulated VMM process: attach, build the VM, take commands."""
    import importlib

    import emu

    out = _RecordOut(w)
    try:
        host = emu.connect(args.socket)
        task = emu.attach(host, name=VMM_WORKERS[kind]["who"])
        mod, cls = VMM_WORKERS[kind]["cls"].split(":")
        cls = getattr(importlib.import_module(mod), cls)
        kw = dict(ram=args.ram, ram_size=size, log_fd=w)
        vmm = cls(task, args.pattern, **kw) if kind == "recovering" else cls(task, **kw)
    except (ConnectionError, OSError, ValueError) as e:
        os.write(2, ("emu: run-worker: %s\n" % (getattr(e, "strerror", None) or e)).encode())
        return 1
    c = _ChildConsole(VmmTarget(vmm, args.ram), out=out, t0=t0)
    c.banner()
    try:
        _drive(c, args.script)
        c.target.stop()
    except OSError:
        pass                                       # the host went away: nothing to tear down
    c.flush()
    return 0


VMM_WORKERS = {
    "firecracker-like": {"cls": "workers.firecracker_like:FirecrackerLike", "who": "firecracker",
                         "help": "a Firecracker-shaped VMM (SIGBUS: log, _exit(149))"},
    "cloud-hypervisor-like": {"cls": "workers.cloud_hypervisor_like:CloudHypervisorLike",
                              "who": "cloud-hypervisor",
                              "help": "a cloud-hypervisor-shaped VMM (no SIGBUS handler)"},
    "recovering": {"cls": "workers.recovering:RecoveringVmm", "who": "recovering",
                   "help": "a VMM that recovers from memory errors with one pattern"},
}


def script(main) -> None:
    """`python -m workers.NAME`: run main(), a bad argument as one line."""
    try:
        sys.exit(main())
    except ValueError as e:
        sys.exit("emu: %s" % e)


if __name__ == "__main__":
    script(main)
