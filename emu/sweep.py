"""`emu sweep`: scenarios x policies x sysctl sets, each run on its own private
supervisor, in parallel, into one table.

Every run (a *cell* of the grid) is independent: it runs `run_one` in a forked
child of its own, which starts its own private supervisor, so runs share nothing
and a run that dies (of SIGBUS, a bug, a timeout) becomes a row with its error
instead of taking the sweep down.  Locally, the sweep forks up to `jobs` cell
processes at once; with `ray=ADDRESS` each cell is a Ray task that forks the same
child inside its Ray worker (an existing engine for a sweep larger than one machine).

A cell process is a process group of its own (Ctrl-C reaches the sweep alone,
which then kills the cells and waits for their supervisors to go) and dies with
the process that forked it (PR_SET_PDEATHSIG); a private supervisor stops on its
own once its owner is gone, unlinking its /dev/shm segments and socket.
"""
from __future__ import annotations

import csv
import ctypes
import itertools
import json
import os
import selectors
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from . import records, shm

KILL_WAIT = 15.0          # seconds to wait for a killed cell's supervisor to stop on its own
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""
    scenario: str
    policy: str
    sysctl: tuple = field(default=())          # ((name, value), ...), sorted by name

    @property
    def sysctls(self) -> dict:
        return dict(self.sysctl)

    def label(self) -> str:
        return " ".join(x for x in (self.scenario, self.policy, sysctl_text(self.sysctls)) if x)


# ------------------------------------------------------------------ the unit of work
def run_one(scenario: str, policy: str, sysctl: dict) -> dict:
    """One run: `scenario` (a file or a library name) under `policy` with `sysctl`, on
    a private supervisor of its own (emu.scenario.run).  Returns the outcome:
    {"scenario", "policy", "sysctl", "rows" {key: text}, "measured" {name: number},
    "expect" {"ok", "failures"}, "error" (None or one line)}.

    The only place that knows what a scenario is."""
    from . import scenario as scen

    sc = scen.load(scenario)
    out = scen.run(sc, policy=policy, sysctl=sysctl or None)
    err = out.get("error")
    measured = {k: v for k, v in out.items()
                if isinstance(v, int | float) and not isinstance(v, bool)}
    return {"scenario": scenario, "policy": policy, "sysctl": dict(out.get("sysctl") or sysctl),
            "rows": {} if err else scen.rows(out), "measured": measured,
            "expect": out.get("expect") or {"ok": not err, "failures": []},
            "error": " ".join(str(err).split()) if err else None}


def preload() -> None:
    """Import what run_one needs, once, in the process that forks the cells: each
    forked run then inherits the modules (~0.4 s of imports per run otherwise)."""
    from . import daemon, scenario, show  # noqa: F401


def error_outcome(cell: Cell, error: str, seconds: float | None = None) -> dict:
    """The row of a run that did not produce an outcome."""
    return {"scenario": cell.scenario, "policy": cell.policy, "sysctl": cell.sysctls, "rows": {},
            "measured": {}, "expect": {"ok": False, "failures": []},
            "error": " ".join(str(error).split()), "seconds": seconds}


def run_cell(cell: Cell) -> dict:
    """run_one with its wall time in "seconds"; an exception becomes the outcome's error."""
    t0 = time.monotonic()
    try:
        out = dict(run_one(cell.scenario, cell.policy, cell.sysctls))
    except BaseException as e:
        out = error_outcome(cell, "%s: %s" % (type(e).__name__, e))
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


# ------------------------------------------------------------------ one cell in a forked child
_RESET = [signal.SIGBUS, signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
          signal.SIGALRM, *range(signal.SIGRTMIN, signal.SIGRTMAX + 1)]


def _fresh_signals() -> None:
    """A cell child starts with the signal state of a freshly exec'd Python: nothing
    blocked, the emulator's signals at SIG_DFL.  Its parent may be a Ray worker or a
    test runner with handlers, an ignored SIGCHLD or a blocked mask of its own, which
    would turn the emulator's forced SIGBUS into a kill or break waitpid."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for s in _RESET:
        try:
            signal.signal(s, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _pdeathsig(sig: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def fork_cell(cell: Cell) -> tuple[int, Connection]:
    """Fork the process of one cell; it sends one outcome on the returned connection
    and exits.  It is a process group of its own and is SIGKILLed if the forking
    thread dies (when that is the main thread: PR_SET_PDEATHSIG follows threads)."""
    main = threading.current_thread() is threading.main_thread()
    parent = os.getpid()

    def setup() -> None:
        os.setpgid(0, 0)
        if main:
            _pdeathsig(signal.SIGKILL)
            if os.getppid() != parent:            # the parent died before prctl
                os._exit(1)
        _fresh_signals()

    return records.fork(lambda w: w.send(run_cell(cell)), setup=setup)


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return "the run died of %s" % name
    return "the run exited %d without an outcome" % os.waitstatus_to_exitcode(status)


def run_forked(cell: Cell, timeout: float | None = None) -> dict:
    """One cell in a forked child, waited for here (the body of a Ray task)."""
    t0 = time.monotonic()
    pid, conn = fork_cell(cell)
    runner = _Running(cell, pid, conn, t0, timeout)
    try:
        with selectors.DefaultSelector() as sel:
            for fd in runner.fds():
                sel.register(fd, selectors.EVENT_READ)
            while runner.result is None:
                for key, _ in sel.select(0.5):
                    if runner.on_ready(key.fd):
                        sel.unregister(key.fd)
                runner.check_timeout()
    except BaseException:
        runner.kill()
        raise
    finally:
        runner.close()
    return runner.result


class _Running:
    """A cell process being watched: its outcome pipe and its pidfd."""

    def __init__(self, cell: Cell, pid: int, conn: Connection, t0: float, timeout: float | None):
        self.cell, self.pid, self.conn, self.t0, self.timeout = cell, pid, conn, t0, timeout
        self.pidfd = os.pidfd_open(pid)
        self.outcome: dict | None = None
        self.result: dict | None = None          # set once the process is reaped
        self.killed: str | None = None
        self.descendants: list = []

    def fds(self) -> list[int]:
        return [self.conn.fileno(), self.pidfd]

    def on_ready(self, fd: int) -> bool:
        """Returns True when fd is done with (unregister it)."""
        if fd == self.conn.fileno():
            try:
                self.outcome = self.conn.recv()
            except (EOFError, OSError):
                pass
            return True
        _, status = os.waitpid(self.pid, 0)
        if self.outcome is None and self.conn.poll(0):
            try:
                self.outcome = self.conn.recv()
            except (EOFError, OSError):
                pass
        took = round(time.monotonic() - self.t0, 3)
        if self.outcome is not None:
            self.result = self.outcome
        else:
            self.result = error_outcome(self.cell, self.killed or _status_text(status), took)
        return True

    def check_timeout(self) -> None:
        if (self.timeout and self.killed is None and self.result is None
                and time.monotonic() - self.t0 > self.timeout):
            self.kill("timed out after %g s" % self.timeout)

    def kill(self, why: str = "interrupted") -> None:
        """SIGKILL the cell's process group; its supervisor (another group) stops on its
        own when it sees its owner gone.  Remember the supervisor to wait for it."""
        if self.result is not None or self.killed is not None:
            return
        self.killed = why
        try:
            import psutil

            self.descendants = psutil.Process(self.pid).children(recursive=True)
        except Exception:
            self.descendants = []
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass

    def close(self) -> None:
        self.conn.close()
        os.close(self.pidfd)


def _wait_gone(procs: list, timeout: float = KILL_WAIT) -> None:
    """Wait for the killed cells' descendants (their supervisors) to exit on their own;
    SIGKILL what is still there, then remove what a killed supervisor left."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    if alive:
        psutil.wait_procs(alive, timeout=5)
    shm.cleanup()          # a supervisor killed (or whose owner died) while it booted


# ------------------------------------------------------------------ the grid
def parse_sysctl_axes(specs: list[str]) -> list[dict]:
    """['vm.a=0,1', 'vm.b=1'] -> the cross product [{'vm.a': 0, 'vm.b': 1}, {'vm.a': 1, ...}].
    No spec: one empty set (the configured defaults)."""
    axes = []
    for spec in specs:
        name, sep, vals = spec.partition("=")
        name = name.strip()
        if not sep or not name or not vals.strip():
            raise ValueError("sysctl: expected name=v1[,v2...], got %r" % spec)
        try:
            values = [int(v, 0) for v in vals.split(",")]
        except ValueError:
            raise ValueError("sysctl %s: expected integers, got %r" % (name, vals)) from None
        axes.append([(name, v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)]


def grid(scenarios: list[str], policies: list[str], sysctls: list[dict] | None = None) -> list[Cell]:
    """Every (scenario, policy, sysctl set), scenario-major."""
    sets = sysctls or [{}]
    return [Cell(s, p, tuple(sorted(d.items()))) for s in scenarios for p in policies for d in sets]


def sysctl_text(d: dict) -> str:
    return " ".join("%s=%s" % kv for kv in sorted(d.items()))


# ------------------------------------------------------------------ progress
class Progress:
    """A one-line bar on a tty (redrawn in place), else one line per finished run."""

    def __init__(self, total: int, stream=None, tty: bool | None = None, enabled: bool = True):
        self.total, self.stream, self.enabled = total, stream or sys.stderr, enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self.done = self.failed = self.running = 0
        self.t0 = time.monotonic()

    def started(self) -> None:
        self.running += 1
        self.draw()

    def finished(self, cell: Cell, out: dict) -> None:
        self.running = max(0, self.running - 1)
        self.done += 1
        bad = failed(out)
        self.failed += bad
        if not self.enabled:
            return
        if self.tty:
            self.draw()
        else:
            what = ("ERROR %s" % out["error"]) if out.get("error") else (
                "FAIL" if bad else "ok")
            self.stream.write("sweep: [%d/%d] %s: %s (%.1f s)\n"
                              % (self.done, self.total, cell.label(), what, out.get("seconds") or 0))
            self.stream.flush()

    def draw(self) -> None:
        if not (self.enabled and self.tty):
            return
        width = 30
        fill = int(width * self.done / max(1, self.total))
        el = time.monotonic() - self.t0
        eta = "" if not self.done or self.done == self.total else \
            ", ~%ds left" % (el / self.done * (self.total - self.done))
        self.stream.write("\r\x1b[Ksweep [%s%s] %d/%d, %d running%s, %ds%s"
                          % ("#" * fill, "." * (width - fill), self.done, self.total, self.running,
                             ", %d failed" % self.failed if self.failed else "", el, eta))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.draw()
            self.stream.write("\n")
            self.stream.flush()


def failed(out: dict) -> bool:
    return bool(out.get("error")) or not out.get("expect", {}).get("ok", False)


# ------------------------------------------------------------------ engines
def _run_local(cells: list[Cell], jobs: int, progress: Progress, timeout: float | None) -> list[dict]:
    results: list[dict | None] = [None] * len(cells)
    todo = list(enumerate(cells))[::-1]
    running: dict[int, tuple[int, _Running]] = {}        # fd -> (index, runner)
    sel = selectors.DefaultSelector()
    try:
        while todo or running:
            while todo and len({id(r) for _, r in running.values()}) < jobs:
                i, cell = todo.pop()
                pid, conn = fork_cell(cell)
                runner = _Running(cell, pid, conn, time.monotonic(), timeout)
                for fd in runner.fds():
                    sel.register(fd, selectors.EVENT_READ)
                    running[fd] = (i, runner)
                progress.started()
            for key, _ in sel.select(0.5):
                i, runner = running[key.fd]
                if runner.on_ready(key.fd):
                    sel.unregister(key.fd)
                    del running[key.fd]
                if runner.result is not None and results[i] is None:
                    results[i] = runner.result
                    for fd in runner.fds():
                        if fd in running:
                            sel.unregister(fd)
                            del running[fd]
                    runner.close()
                    progress.finished(runner.cell, runner.result)
            for _, runner in list(running.values()):
                runner.check_timeout()
            progress.draw()
    except BaseException:
        left = {id(r): r for _, r in running.values()}.values()
        for runner in left:
            runner.kill()
        procs = []
        for runner in left:
            try:
                os.waitpid(runner.pid, 0)
            except ChildProcessError:
                pass
            runner.close()
            procs += runner.descendants
        _wait_gone(procs)
        raise
    finally:
        sel.close()
    return results


def _ray_cell(cell: Cell, timeout: float | None) -> dict:
    preload()                                     # once per Ray worker: it runs many cells
    return run_forked(cell, timeout)


def _run_ray(cells: list[Cell], address: str, jobs: int | None, progress: Progress,
             timeout: float | None) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray needs Ray: pip install 'gmem-emu[ray]'") from None
    owned = not ray.is_initialized()
    if owned:
        # "local": always a new local instance (ray.init() without an address would join
        # the cluster a `ray start` left in /tmp/ray/ray_current_cluster, even a dead one)
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        if not jobs:
            jobs = max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1, max_retries=0)(_ray_cell)
        results: list[dict | None] = [None] * len(cells)
        todo = list(enumerate(cells))[::-1]
        pending: dict = {}
        try:
            while todo or pending:
                while todo and len(pending) < jobs:
                    i, cell = todo.pop()
                    pending[task.remote(cell, timeout)] = i
                    progress.started()
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        out = ray.get(ref)
                    except Exception as e:            # the Ray worker died or Ray failed it
                        out = error_outcome(cells[i], "ray: %s: %s"
                                            % (type(e).__name__, str(e).splitlines()[0] if str(e) else ""))
                    results[i] = out
                    progress.finished(cells[i], out)
                progress.draw()
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)        # kills the Ray worker: its cell dies with it
            raise
        return results
    finally:
        if owned:
            ray.shutdown()


def sweep(cells: list[Cell], jobs: int | None = None, ray: str | None = None,
          progress: Progress | None = None, timeout: float | None = None) -> list[dict]:
    """Run every cell, each in its own process on its own private supervisor, at most
    `jobs` at once (default: the CPUs here, or the Ray cluster's with `ray`).  Returns
    the outcomes in the cells' order, each with "seconds"; a run that fails is an
    outcome with its "error", never an exception."""
    progress = progress or Progress(len(cells), enabled=False)
    try:
        if not ray:
            preload()
        if ray:
            return _run_ray(cells, ray, jobs, progress, timeout)
        return _run_local(cells, max(1, jobs or os.cpu_count() or 1), progress, timeout)
    finally:
        progress.close()


# ------------------------------------------------------------------ output
def _keys(outs: list[dict], part: str) -> list[str]:
    seen: dict[str, None] = {}
    for o in outs:
        for k in o.get(part) or {}:
            seen.setdefault(k)
    return list(seen)


def write_csv(outs: list[dict], path: str) -> None:
    """One line per run: scenario, policy, sysctl, seconds, ok, failures (JSON), error,
    then row:KEY and measured:NAME columns."""
    rows, meas = _keys(outs, "rows"), _keys(outs, "measured")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scenario", "policy", "sysctl", "seconds", "ok", "failures", "error"]
                   + ["row:" + k for k in rows] + ["measured:" + k for k in meas])
        for o in outs:
            w.writerow([o["scenario"], o["policy"], sysctl_text(o.get("sysctl") or {}),
                        "" if o.get("seconds") is None else o["seconds"],
                        int(bool(o.get("expect", {}).get("ok"))),
                        json.dumps(o.get("expect", {}).get("failures", [])), o.get("error") or ""]
                       + [o.get("rows", {}).get(k, "") for k in rows]
                       + [o.get("measured", {}).get(k, "") for k in meas])


def _number(s: str):
    if s == "":
        return None
    try:
        return int(s)
    except ValueError:
        return float(s)


def read_csv(path: str) -> list[dict]:
    """The outcomes back from write_csv's file (an empty row or measured cell: absent)."""
    outs = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            sysctl = {}
            for part in r["sysctl"].split():
                k, _, v = part.partition("=")
                sysctl[k] = int(v, 0)
            outs.append({
                "scenario": r["scenario"], "policy": r["policy"], "sysctl": sysctl,
                "rows": {k[4:]: v for k, v in r.items() if k.startswith("row:") and v != ""},
                "measured": {k[9:]: _number(v) for k, v in r.items()
                             if k.startswith("measured:") and v != ""},
                "expect": {"ok": r["ok"] == "1", "failures": json.loads(r["failures"] or "[]")},
                "error": r["error"] or None, "seconds": _number(r["seconds"])})
    return outs


def write_json(outs: list[dict], path: str, meta: dict | None = None) -> None:
    with open(path, "w") as f:
        json.dump({**(meta or {}), "runs": outs}, f, indent=2)
        f.write("\n")


def read_json(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["runs"]


def _short(d: dict) -> str:
    return " ".join("%s=%s" % (k.rsplit(".", 1)[-1], v) for k, v in sorted(d.items())) or "-"


def render(outs: list[dict], width: int = 100) -> str:
    """The readable summary: one line per run, then, per scenario, each row whose text
    differs between its runs with the runs grouped by that text."""
    import textwrap

    ok = [o for o in outs if not o.get("error")]
    meas = [k for k in _keys(outs, "measured")           # the figures that differ between runs
            if len(ok) == 1 or len({o.get("measured", {}).get(k) for o in ok}) > 1]
    head = ["scenario", "policy", "sysctls", *meas, "expect", "s"]
    table = [head]
    for o in outs:
        status = "ERROR" if o.get("error") else ("ok" if o.get("expect", {}).get("ok") else "FAIL")
        table.append([o["scenario"], o["policy"], _short(o.get("sysctl") or {}),
                      *[str(o.get("measured", {}).get(k, "-")) for k in meas], status,
                      "%.1f" % o["seconds"] if o.get("seconds") is not None else "-"])
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "-" * len(lines[0]))
    for o in outs:
        if o.get("error"):
            lines.append("  %s %s %s: %s" % (o["scenario"], o["policy"], _short(o.get("sysctl") or {}),
                                             o["error"]))
        for f in o.get("expect", {}).get("failures", []) or []:
            lines.extend(textwrap.wrap("%s %s %s: expect: %s" % (o["scenario"], o["policy"],
                                                                 _short(o.get("sysctl") or {}), f),
                                       width - 2, initial_indent="  ", subsequent_indent="      "))
    for scen in dict.fromkeys(o["scenario"] for o in outs):
        runs = [o for o in outs if o["scenario"] == scen and o.get("rows")]
        keys = [k for k in _keys(runs, "rows")
                if len(runs) == 1 or len({o["rows"].get(k) for o in runs}) > 1]
        if not keys:
            continue
        lines.append("")
        lines.append("%s: %s" % (scen, "the rows" if len(runs) == 1 else "rows that differ between runs"))
        for k in keys:
            lines.append("  %s" % k)
            groups: dict[str, list[str]] = {}
            for o in runs:
                groups.setdefault(o["rows"].get(k, "-"), []).append(
                    " ".join(x for x in (o["policy"], _short(o.get("sysctl") or {})) if x != "-"))
            for text, who in groups.items():
                lines.extend(textwrap.wrap(text, width - 6, initial_indent="    = ",
                                           subsequent_indent="      "))
                lines.extend(textwrap.wrap(", ".join(who), width - 8, initial_indent="      for ",
                                           subsequent_indent="          "))
    return "\n".join(lines)


def main(scenarios: list[str], policies: list[str], sysctl_specs: list[str], jobs: int | None,
         ray: str | None, csv_path: str | None, json_path: str | None,
         timeout: float | None = None, quiet: bool = False) -> int:
    """`emu sweep`: 0 if every run produced an outcome and met its expectations, else 1."""
    if not policies:
        from .kernel.policies import PRESETS

        policies = list(PRESETS)
    cells = grid(scenarios or ["stock"], policies, parse_sysctl_axes(sysctl_specs))
    jobs_used = jobs or (None if ray else os.cpu_count())
    progress = Progress(len(cells), enabled=not quiet)
    t0 = time.monotonic()
    outs = sweep(cells, jobs=jobs_used, ray=ray, progress=progress, timeout=timeout)
    elapsed = time.monotonic() - t0
    meta = {"runs_total": len(cells), "engine": "ray" if ray else "local", "jobs": jobs_used,
            "elapsed": round(elapsed, 3)}
    if csv_path:
        write_csv(outs, csv_path)
    if json_path:
        write_json(outs, json_path, meta)
    bad = sum(failed(o) for o in outs)
    print("emu sweep: %d runs (%d scenario%s x %d polic%s x %d sysctl set%s) in %.1f s on %s%s, %d failed\n"
          % (len(cells), len(set(c.scenario for c in cells)), "" if len({c.scenario for c in cells}) == 1
             else "s", len(policies), "y" if len(policies) == 1 else "ies",
             len({c.sysctl for c in cells}), "" if len({c.sysctl for c in cells}) == 1 else "s",
             elapsed, "ray" if ray else "%d workers" % jobs_used,
             "" if not ray else " (%s)" % ray, bad))
    print(render(outs))
    return 1 if bad else 0
