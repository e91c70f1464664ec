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
    wait SECONDS           idle, letting asynchronous signals arrive
    quit
"""
from __future__ import annotations

import os
import select
import sys
import time

HELP = __doc__.split("\n\n")[2]


def _int(s: str) -> int:
    return int(s, 0)


class Console:
    def __init__(self, q, out=sys.stdout):
        self.q, self.out = q, out
        self.t0 = time.monotonic_ns()
        self.shown = 0

    def say(self, who: str, text: str) -> None:
        self.out.write("%9.3f ms  %-7s %s\n" % ((time.monotonic_ns() - self.t0) / 1e6, who, text))
        self.out.flush()

    def flush(self) -> None:
        """The worker's journal since the last flush, in order."""
        self.q.deliver_pending_ao()
        for t, who, text in sorted(self.q.journal):
            self.out.write("%9.3f ms  %-7s %s\n" % ((t - self.t0) / 1e6, who, text))
        self.q.journal.clear()
        self.out.flush()

    def banner(self) -> None:
        q = self.q
        ram = q.ram
        self.say("vmm", "%s: tgid %d, %d vCPUs, guest RAM %d KiB at GPA %#x (hva %#x)" % (
            type(q).__name__, q.me.tgid, len(q.vcpus), ram.size >> 10, ram.gpa_base, ram.hva))
        self.say("vmm", "commands: read VCPU GPA | write VCPU GPA [BYTE] | host-read GPA | pfn GPA | "
                        "wait S | quit; inject from another terminal with `emu inject`")

    def command(self, line: str) -> bool:
        """One command; False at quit."""
        words = line.split()
        if not words or words[0].startswith("#"):
            return True
        op, args = words[0], words[1:]
        q = self.q
        try:
            if op == "quit":
                return False
            if op == "read":
                r = q.vcpu(_int(args[0]), "read", _int(args[1]), n=8)
                self.flush()
                self.say("vcpu%s" % args[0], "result: %r" % (r,))
            elif op == "write":
                byte = _int(args[2]) if len(args) > 2 else 0x5A
                r = q.vcpu(_int(args[0]), "write", _int(args[1]), data=bytes([byte]) * 8)
                self.flush()
                self.say("vcpu%s" % args[0], "result: %r" % (r,))
            elif op == "host-read":
                gpa = _int(args[0])
                data = q.me.read(q.ram.hva + gpa - q.ram.gpa_base, 8)
                self.say("main", "QEMU read %s at GPA %#x" % (data.hex(), gpa))
            elif op == "pfn":
                gpa = _int(args[0])
                st = q.ram.vm.gpa_to_pfn(gpa)
                pfn = st.get("backing_pfn") if st.get("backing_pfn") is not None else st.get("pfn")
                self.say("vmm", "GPA %#x is pfn %s%s" % (gpa, "%#x" % pfn if pfn is not None else
                                                        "- (not populated yet)",
                                                        " (private)" if st.get("private") else ""))
            elif op == "wait":
                q.me.idle(float(args[0]))
                self.flush()
            elif op in ("help", "?"):
                self.out.write(HELP + "\n")
            else:
                self.say("vmm", "unknown command %r (help lists them)" % op)
        except (IndexError, ValueError):
            self.say("vmm", "bad arguments for %r (help lists them)" % op)
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
                self.q.me.idle(0.01)
                self.flush()
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                if buf.strip():
                    self.command(buf.decode(errors="replace"))
                break
            buf += chunk
        self.flush()


def main(argv=None) -> int:
    """`emu run-worker qemu-like ...`: attach to the daemon, boot, take commands."""
    import argparse
    import errno

    import emu

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ValueError("run-worker qemu-like: %s" % message)

    ap = Parser(prog="emu run-worker qemu-like",
                description="a QEMU-shaped VMM on a running emu daemon")
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
    c = Console(q)
    c.banner()
    c.flush()
    try:
        if args.script:
            with open(args.script, "rb") as f:
                c.loop(f.fileno())
        else:
            c.loop(sys.stdin.fileno())
    except KeyboardInterrupt:
        pass
    except OSError as e:                      # `emu stop`: the host went away under the VM
        if e.errno != errno.ESHUTDOWN:
            raise
        c.say("vmm", "%s; exiting" % e.strerror)
    q.stop()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        sys.exit("emu: %s" % e)
