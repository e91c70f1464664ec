"""The `emu` command: daemon, status, inject, dmesg, cleanup, stop, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import config as cfgmod
from . import shm
from .user import KernelPanic


class CliError(Exception):
    """Printed as one line: `emu: <message>`."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CliError("%s: %s" % (self.prog.removeprefix("emu").strip() or "usage", message))


def _pfn(s: str) -> int:
    try:
        v = int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError("pfn: expected a number like 0x1234, got %r" % s) from None
    if v < 0:
        raise argparse.ArgumentTypeError("pfn: must be >= 0")
    return v


def _kv(s: str) -> tuple[str, int]:
    key, sep, val = s.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError("sysctl: expected name=value, got %r" % s)
    try:
        return key.strip(), int(val, 0)
    except ValueError:
        raise argparse.ArgumentTypeError("sysctl %s: expected an integer" % key) from None


def _hugepages(s: str) -> dict:
    out = {}
    for part in s.split(","):
        key, sep, val = part.partition("=")
        if not sep or not val.strip().isdigit():
            raise argparse.ArgumentTypeError("hugepages: expected 2M=N[,1G=M], got %r" % s)
        out[key.strip()] = int(val)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="emu", description="gmem-emu: emulated Linux memory failure for guest_memfd")
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)
    sub.required = True

    d = sub.add_parser("daemon", help="run the supervisor (the emulated kernel)")
    d.add_argument("--socket", help="control socket (default: the per-user runtime dir)")
    d.add_argument("--config", help="TOML file overriding the embedded defaults")
    d.add_argument("--ram", help="emulated RAM, e.g. 512M")
    d.add_argument("--hugepages", type=_hugepages, help="HugeTLB pools, e.g. 2M=64,1G=1")
    d.add_argument("--policy", help="preset (v6.18, mf-delayed-fix) or path/to/file.py:Class")
    d.add_argument("--sysctl", type=_kv, action="append", default=[], metavar="NAME=VALUE")
    d.add_argument("--pre-6.11-madvise", dest="legacy_madvise", action="store_true",
                   help="MADV_HWPOISON without MF_ACTION_REQUIRED (kernels before ~6.11)")
    d.add_argument("--background", action="store_true", help="detach once ready")
    d.add_argument("--print-config", action="store_true", help="print the effective config")

    for name, hlp in (("status", "show the emulated machine"), ("dmesg", "kernel log"),
                      ("stop", "shut the daemon down")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--socket")
        if name == "status":
            s.add_argument("--json", action="store_true")

    i = sub.add_parser("inject", help="inject or remove a memory error")
    i.add_argument("what", choices=["corrupt-pfn", "hw-poison", "hw-detect", "unpoison"])
    i.add_argument("pfn", type=_pfn)
    i.add_argument("--socket")

    t = sub.add_parser("trace", help="the kernel's event trace")
    t.add_argument("--socket")
    t.add_argument("--chrome", metavar="FILE", help="write Chrome/Perfetto trace JSON to FILE")

    sub.add_parser("cleanup", help="remove what dead supervisors left behind")
    _add_show(sub)

    c = sub.add_parser("compare", help="one scenario under several policies, side by side")
    c.add_argument("policies", nargs="*", help="presets or file.py:Class (default: the scenario's list)")
    c.add_argument("--scenario", help="a scenario file or library name (default: stock)")
    c.add_argument("--json", action="store_true")
    c.add_argument("--html", metavar="FILE", help="the policies' pictures side by side, as HTML")

    w = sub.add_parser("run-worker", help="a VMM worker on the running daemon, driven step by step",
                       add_help=False)
    w.add_argument("worker", choices=sorted(WORKERS))
    w.add_argument("rest", nargs=argparse.REMAINDER)

    r = sub.add_parser("run", help="run a scenario file: its timeline and outcome")
    r.add_argument("scenario", nargs="?", help="path/to/scenario.toml or a library name")
    r.add_argument("--policy", default=None)
    r.add_argument("--sysctl", type=_kv, action="append", default=[], metavar="NAME=VALUE")
    r.add_argument("--trace", metavar="FILE", help="write the run's Chrome/Perfetto trace to FILE")
    r.add_argument("--json", action="store_true", help="the outcome as JSON")
    r.add_argument("--picture", action="store_true",
                   help="draw the memory files as they were at the end of the steps")
    r.add_argument("--list", action="store_true", help="list the scenario library")

    _add_sweep(sub)

    m = sub.add_parser("demo", help="a QEMU-shaped process meets memory errors")
    m.add_argument("--policy", default=None)
    m.add_argument("--json", action="store_true", help="the timeline as JSON")
    return p


def _add_show(sub) -> None:
    s = sub.add_parser("show", help="a picture of guest_memfd/shmem/hugetlbfs pages")
    s.add_argument("--socket")
    sel = s.add_mutually_exclusive_group()
    sel.add_argument("--ino", type=_pfn, help="the file with this inode number")
    sel.add_argument("--vm", metavar="PID-FD", help="the guest_memfds of this VM")
    s.add_argument("--html", metavar="FILE", help="write one self-contained HTML page")
    s.add_argument("--json", action="store_true", help="the snapshot as JSON")


def cmd_show(args) -> int:
    from . import show

    host = _connect(args)
    try:
        if args.ino is not None:
            snap = show.snapshot(host, args.ino)
            title = "ino %d" % args.ino
        else:
            snap = show.snapshot_vm(host, args.vm)
            title = "vm %s" % args.vm if args.vm else "every guest_memfd"
    except OSError as e:
        raise CliError("show %s: %s" % ("--ino %d" % args.ino if args.ino is not None
                                        else "--vm %s" % args.vm,
                                        os.strerror(e.errno) if e.errno else e)) from None
    if args.vm and not snap["files"]:
        raise CliError("show --vm %s: no guest_memfd bound to that VM (names are PID-FD)"
                       % args.vm)
    if args.html:
        try:
            with open(args.html, "w") as f:
                f.write(show.render_html([(title, snap)]))
        except OSError as e:
            raise CliError("show --html %s: %s" % (args.html, e.strerror)) from None
    if args.json:
        print(json.dumps(snap, indent=1))
    elif not args.html:
        sys.stdout.write(show.render_text(snap))
    return 0


def _connect(args):
    from .user import connect

    try:
        return connect(args.socket)
    except OSError:
        raise CliError("no supervisor at %s (start one with `emu daemon`)"
                       % (args.socket or shm.default_socket())) from None


def cmd_daemon(args) -> int:
    from . import daemon

    try:
        cfg = cfgmod.build(file=args.config, ram=args.ram, hugepages=args.hugepages,
                           policy=args.policy, sysctl=dict(args.sysctl),
                           madvise_action_required=False if args.legacy_madvise else None)
        from .kernel.policies import load

        try:
            load(cfg["kernel"]["policy"])
        except ValueError:
            raise
        except Exception as e:          # the user's policy file failed to import
            raise CliError("policy: cannot load %s: %s: %s"
                           % (cfg["kernel"]["policy"], type(e).__name__, e)) from None
    except (cfgmod.ConfigError, ValueError) as e:
        raise CliError(str(e)) from None
    if args.print_config:
        print(json.dumps(cfg, indent=2))
        return 0
    sock = args.socket or shm.default_socket()
    pidfile = os.path.splitext(sock)[0] + ".pid"
    _check_socket_path(sock)
    import logging

    logging.basicConfig(level=logging.INFO, format="emu-daemon: %(message)s")
    if not args.background:
        try:
            daemon.run(cfg, sock, pidfile=pidfile)
        except SystemExit as e:
            if isinstance(e.code, str):
                raise CliError(e.code.removeprefix("emu daemon: ")) from None
            raise
        except OSError as e:
            raise CliError("daemon: %s" % _oserror_text(e)) from None
        return 0
    logpath = os.path.splitext(sock)[0] + ".log"
    try:
        logfd = os.open(logpath, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as e:
        raise CliError("daemon: cannot open %s: %s" % (logpath, e.strerror)) from None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(logfd, 1)                 # detach from the caller's terminal or pipes
        os.dup2(logfd, 2)
        try:
            daemon.run(cfg, sock, pidfile=pidfile, ready_fd=w)
            code = 0
        except SystemExit as e:
            os.write(w, ("error %s\n" % e.code).encode())
            code = 1
        except OSError as e:
            os.write(w, ("error daemon: %s\n" % _oserror_text(e)).replace("\n", " ").encode()
                     + b"\n")
            code = 1
        except BaseException as e:
            os.write(w, ("error %s: %s" % (type(e).__name__, e)).replace("\n", " ").encode()
                     + b"\n")
            code = 1
        os._exit(code)
    os.close(w)
    os.close(logfd)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        line = f.readline().strip()
    if not line.startswith("ready"):
        raise CliError(line.removeprefix("error ").removeprefix("emu daemon: ") or "daemon failed")
    print("emu daemon ready on %s" % sock)
    return 0


def _oserror_text(e: OSError) -> str:
    where = " (%s)" % e.filename if e.filename else ""
    return "%s%s" % (e.strerror or e, where)


def _check_socket_path(sock: str) -> None:
    """What bind(2) would refuse, said before anything is created."""
    if len(os.fsencode(sock)) >= 108:                       # sizeof(sun_path)
        raise CliError("--socket: path longer than 107 bytes: %s" % sock)
    d = os.path.dirname(os.path.abspath(sock))
    if not os.path.isdir(d):
        raise CliError("--socket: no such directory: %s" % d)


def cmd_status(args) -> int:
    h = _connect(args)
    st = h.status()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    mi, mf = st["meminfo"], st["mf_stats"]
    print("policy            %s%s" % (st["policy"], "" if st["madvise_action_required"]
                                       else "  (pre-6.11 MADV_HWPOISON)"))
    print("memory            %d kB total, %d kB free, HardwareCorrupted %d kB"
          % (mi["MemTotal"], mi["MemFree"], mi["HardwareCorrupted"]))
    if mi.get("HugePages_Total"):
        print("hugetlb           %d total, %d free (%d kB pages)"
              % (mi["HugePages_Total"], mi["HugePages_Free"], mi["Hugepagesize"]))
    print("memory_failure    total %(total)d  recovered %(recovered)d  delayed %(delayed)d  "
          "failed %(failed)d  ignored %(ignored)d" % mf)
    print("sysctl            " + "  ".join("%s=%s" % kv for kv in st["sysctl"].items()))
    print("kernel            %s (tainted=%d)%s" % (
        st["taint"], st["tainted"], "  emulator bug: see `emu dmesg`" if st["tainted"] else ""))
    if st.get("panic") is not None:
        print("panic             Kernel panic - not syncing: %s  (stopped; state kept "
              "for reading, see `emu dmesg`; `emu stop` ends it)" % st["panic"])
    print("limits            " + "  ".join("%s %d/%d" % (name, v["used"], v["max"])
                                           for name, v in st["limits"].items()))
    print()
    print("%-8s %-8s %-16s %-8s %s" % ("TGID", "TID", "COMM", "MCE_KILL", "VMAS/FDS"))
    for p in st["processes"]:
        for t in p["threads"]:
            extra = "%d/%d" % (p["vmas"], p["fds"]) if t["tid"] == p["tgid"] else ""
            print("%-8d %-8d %-16s %-8s %s" % (p["tgid"], t["tid"], t["comm"], t["mce_kill"], extra))
    if not st["processes"]:
        print("(no emulated processes)")
    return 0


def cmd_inject(args) -> int:
    h = _connect(args)
    fn = {"corrupt-pfn": h.corrupt_pfn, "hw-poison": h.hw_poison, "hw-detect": h.hw_detect,
          "unpoison": h.unpoison_pfn}[args.what]
    try:
        r = fn(args.pfn)
    except OSError as e:
        raise CliError("%s %#x: %s" % (args.what, args.pfn, e.strerror)) from None
    if args.what == "hw-detect":
        print("memory_failure(%#x, 0) = %d" % (args.pfn, r))
    return 0


def cmd_dmesg(args) -> int:
    for line in _connect(args).dmesg():
        print(line)
    return 0


def cmd_trace(args) -> int:
    from .trace import thread_names, to_chrome

    host = _connect(args)
    events = host.events()
    if args.chrome:
        names = thread_names(host.status())
        try:
            with open(args.chrome, "w") as f:
                json.dump(to_chrome(events, names), f)
        except OSError as e:
            raise CliError("trace --chrome %s: %s" % (args.chrome, e.strerror)) from None
        print("%d events written to %s (open in ui.perfetto.dev or chrome://tracing)"
              % (len(events), args.chrome))
        return 0
    for ev in events:
        rest = " ".join("%s=%s" % (k, hex(v) if k in ("pfn", "addr") and isinstance(v, int) else v)
                        for k, v in ev.items() if k not in ("seq", "ts_ns", "type"))
        print("%d %.6f %-16s %s" % (ev["seq"], ev["ts_ns"] / 1e9, ev["type"], rest))
    return 0


def cmd_stop(args) -> int:
    """Like `systemctl stop`: returns once the daemon has exited (its attached
    processes got ESHUTDOWN; stragglers are killed after its grace period)."""
    import select

    h = _connect(args)
    pid = h._call("segments")["pid"]
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        pidfd = None
    h._call("shutdown")
    if pidfd is not None:
        select.select([pidfd], [], [], 3600)
        os.close(pidfd)
    return 0


def cmd_cleanup(args) -> int:
    removed = shm.cleanup()
    for r in removed:
        print("removed %s" % r)
    if not removed:
        print("nothing to clean up")
    return 0


def cmd_compare(args) -> int:
    from .compare import main as compare_main

    try:
        return compare_main(args.policies, args.json, args.scenario, args.html)
    except ValueError as e:
        raise CliError(str(e)) from None


WORKERS = {"qemu-like": "workers.qemu_like", "firecracker-like": "workers.firecracker_like",
           "cloud-hypervisor-like": "workers.cloud_hypervisor_like", "recovering": "workers.recovering"}


def cmd_run_worker(args) -> int:
    """The worker's own command line (its --help) after the name."""
    import importlib

    mod = importlib.import_module(WORKERS[args.worker])
    try:
        return mod.main(args.rest)
    except ValueError as e:
        raise CliError(str(e)) from None
    except ConnectionError as e:
        raise CliError("run-worker: %s" % e) from None


def cmd_run(args) -> int:
    from . import scenario as scn
    from .kernel.policies import load

    if args.list:
        for name, path in scn.library().items():
            print("%-28s %s" % (name, scn.load(path).summary))
        return 0
    if not args.scenario:
        raise CliError("run: name a scenario file (or --list)")
    try:
        sc = scn.load(args.scenario)
        if args.policy:
            load(args.policy)
    except ValueError as e:
        raise CliError(str(e)) from None
    out = scn.run(sc, args.policy, dict(args.sysctl), trace=args.trace)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print("emu run: %s under %s: %s\n" % (sc.name, out.get("policy"), sc.summary))
        for e in out.get("timeline", []):
            print("%9.3f ms  %-8s %s" % (e["t_ms"], e["who"], e["what"]))
        if out.get("error"):
            print("\nerror: %s" % out["error"])
        print()
        for key, label in scn.ROWS:
            print("%-40s %s" % (label, scn.rows(out)[key]))
        exp = out.get("expect", {})
        if exp.get("ok") is not None:
            print("\nexpectations for %s: %s" % (out["policy"], "hold" if exp["ok"] else "FAIL"))
            for f in exp["failures"]:
                print("  " + f)
        if args.picture and out.get("picture"):
            from .show import render_text

            print("\n" + render_text(out["picture"]))
        if args.trace:
            print("\ntrace written to %s (open in ui.perfetto.dev)" % args.trace)
    return 1 if out.get("error") or out.get("expect", {}).get("ok") is False else 0


def _add_sweep(sub) -> None:
    w = sub.add_parser("sweep", help="scenarios x policies x sysctls, in parallel, into one table")
    w.add_argument("scenarios", nargs="*", help="scenarios (default: stock)")
    w.add_argument("-p", "--policy", action="append", default=[], metavar="P[,P...]",
                   help="policies (repeatable; default: all presets)")
    w.add_argument("--sysctl", action="append", default=[], metavar="NAME=V1[,V2...]",
                   help="a sysctl axis (repeatable: the cross product)")
    w.add_argument("-j", "--jobs", type=int, default=None, help="runs at once (default: the CPUs)")
    w.add_argument("--ray", metavar="ADDRESS", help="run the cells as Ray tasks (local, auto, host:port)")
    w.add_argument("--csv", metavar="FILE")
    w.add_argument("--json", metavar="FILE")
    w.add_argument("--timeout", type=float, default=600.0, help="seconds per run (default 600)")
    w.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def cmd_sweep(args) -> int:
    from .sweep import main as sweep_main

    if args.jobs is not None and args.jobs < 1:
        raise CliError("sweep: -j must be >= 1")
    policies = [p.strip() for arg in args.policy for p in arg.split(",") if p.strip()]
    try:
        return sweep_main(args.scenarios, policies, args.sysctl, args.jobs, args.ray, args.csv,
                          args.json, timeout=args.timeout or None, quiet=args.quiet)
    except (ValueError, RuntimeError) as e:
        raise CliError("sweep: %s" % e) from None


def cmd_demo(args) -> int:
    from .demo import run_demo

    try:
        return run_demo(policy=args.policy, as_json=args.json)
    except ValueError as e:
        raise CliError(str(e)) from None


COMMANDS = {"daemon": cmd_daemon, "status": cmd_status, "inject": cmd_inject,
            "dmesg": cmd_dmesg, "trace": cmd_trace, "stop": cmd_stop, "cleanup": cmd_cleanup,
            "demo": cmd_demo, "compare": cmd_compare, "run": cmd_run,
            "run-worker": cmd_run_worker, "show": cmd_show, "sweep": cmd_sweep}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.cmd](args)
    except CliError as e:
        print("emu: %s" % str(e).replace("\n", " "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:               # e.g. the supervisor went away mid-command
        print("emu: %s" % _oserror_text(e).replace("\n", " "), file=sys.stderr)
        return 1
    except KernelPanic as e:           # e.g. `emu inject` on a machine that panicked
        print("emu: the emulated kernel has panicked: %s (`emu dmesg` shows why, "
              "`emu stop` stops it)" % e.reason, file=sys.stderr)
        return 1
    except Exception as e:             # a bug in emu itself: still one line, unless asked
        if os.environ.get("EMU_DEBUG"):
            raise
        print("emu: internal error: %s: %s (EMU_DEBUG=1 shows the traceback)"
              % (type(e).__name__, str(e).replace("\n", " ")), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
