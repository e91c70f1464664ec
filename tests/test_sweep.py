"""`emu sweep`: the grid, one row per run, CSV/JSON, exit status, nothing left behind
(even on Ctrl-C), and the same cells as Ray tasks."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from conftest import leftovers

from emu import records, shm
from emu import sweep as sw

POLICIES = ["v6.18", "mf-delayed-fix"]
SYSCTL = "vm.memory_failure_early_kill=0,1"


def _ours(before: set[str]) -> list[str]:
    """/dev/shm segments and private sockets that appeared since `before` and whose
    supervisor is gone (a supervisor of a concurrent test run is alive: not ours)."""
    out = []
    rd = shm.runtime_dir()
    now = {"/dev/shm/" + e for e in os.listdir("/dev/shm") if e.startswith("emu-")}
    now |= {os.path.join(rd, e) for e in os.listdir(rd) if e.startswith("priv-")}
    for path in sorted(now - before):
        name = os.path.basename(path)
        pid = name.split("-")[1].split(".")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            out.append(path)
    return out


def _snapshot() -> set[str]:
    rd = shm.runtime_dir()
    return ({"/dev/shm/" + e for e in os.listdir("/dev/shm") if e.startswith("emu-")}
            | {os.path.join(rd, e) for e in os.listdir(rd) if e.startswith("priv-")})


def _session(sid: int) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (OSError, psutil.Error):
            pass
    return out


def _wait_empty(sid: int, timeout: float = 20.0) -> list[int]:
    end = time.monotonic() + timeout
    while (left := _session(sid)) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def _emu(*args, **kw):
    """`python -m emu ...` as a user runs it, from outside the source tree (there,
    `emu` would be the tree's package without its built core)."""
    kw.setdefault("cwd", tempfile.gettempdir())
    return subprocess.Popen([sys.executable, "-m", "emu", *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _communicate(p, timeout: float):
    """p.communicate, killing everything in p's session if it hangs."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _session(p.pid):
            os.kill(pid, signal.SIGKILL)
        p.communicate()
        raise


def _direct(policy: str, sysctl: dict) -> dict:
    """The same cell run directly (run_one in a child, no sweep machinery)."""
    pid, r = records.fork(lambda w: w.send(sw.run_one("stock", policy, sysctl)))
    out = records.receive(r)
    os.waitpid(pid, 0)
    return out[0]


def test_grid_is_the_cross_product():
    sets = sw.parse_sysctl_axes(["vm.a=0,1", "vm.b=1,0x2"])
    assert sets == [{"vm.a": 0, "vm.b": 1}, {"vm.a": 0, "vm.b": 2},
                    {"vm.a": 1, "vm.b": 1}, {"vm.a": 1, "vm.b": 2}]
    assert sw.parse_sysctl_axes([]) == [{}]
    cells = sw.grid(["stock"], POLICIES, sets)
    assert len(cells) == 8 and cells[0] == sw.Cell("stock", "v6.18", (("vm.a", 0), ("vm.b", 1)))
    for bad in ("vm.a", "vm.a=", "vm.a=x"):
        with pytest.raises(ValueError):
            sw.parse_sysctl_axes([bad])


def test_sweep_cells_equal_direct_runs_csv_json_exit(tmp_path):
    before = _snapshot()
    csv_path, json_path = tmp_path / "s.csv", tmp_path / "s.json"
    p = _emu("sweep", "stock", "-p", ",".join(POLICIES), "--sysctl", SYSCTL, "-j", "2",
             "--csv", str(csv_path), "--json", str(json_path))
    out, err = _communicate(p, 300)
    # the stock scenario's [expect] is written for early_kill=0: early_kill=1 fails it
    assert p.returncode == 1, err + out
    assert _wait_empty(p.pid) == []
    assert _ours(before) == []
    runs = sw.read_json(str(json_path))
    cells = [(r["policy"], r["sysctl"]) for r in runs]
    assert cells == [(pol, {"vm.memory_failure_early_kill": v}) for pol in POLICIES for v in (0, 1)]
    for r in runs:
        early = r["sysctl"]["vm.memory_failure_early_kill"]
        assert r["error"] is None and r["seconds"] > 0
        assert r["expect"]["ok"] == (early == 0), r["expect"]
        assert early == 0 or any(f.startswith("signals:") for f in r["expect"]["failures"])
        d = _direct(r["policy"], r["sysctl"])
        assert (r["rows"], r["measured"]) == (d["rows"], d["measured"]), r["policy"]
    # the sysctl reached the kernel: early kill sends AO to the second process too
    sig = {(r["policy"], r["sysctl"]["vm.memory_failure_early_kill"]): r["rows"]["signals"] for r in runs}
    assert "second: AO" not in sig[("v6.18", 0)] and "second: AO" in sig[("v6.18", 1)]
    assert sw.read_csv(str(csv_path)) == runs                        # CSV round-trips
    meta = json.loads(json_path.read_text())
    assert meta["runs_total"] == 4 and meta["engine"] == "local" and meta["jobs"] == 2
    # the summary: one line per run, then the rows that differ
    lines = out.splitlines()
    assert lines[0].startswith("emu sweep: 4 runs (1 scenario x 2 policies x 2 sysctl sets)")
    assert [ln.split()[-2] for ln in lines if ln.startswith("stock ")] == ["ok", "FAIL"] * 2
    assert "expect: signals: expected" in out
    assert "rows that differ between runs" in out and "  signals" in out
    # not a tty: one plain line per finished run on stderr
    assert sum(1 for ln in err.splitlines() if ln.startswith("sweep: [")) == 4


def test_failing_cells_are_rows_and_exit_1(tmp_path):
    before = _snapshot()
    json_path = tmp_path / "s.json"
    p = _emu("sweep", "-p", "v6.18,no-such-policy", "--sysctl", "vm.no_such_sysctl=1", "-j", "2",
             "--json", str(json_path), "nope")
    out, err = _communicate(p, 300)
    assert p.returncode == 1, err + out
    runs = sw.read_json(str(json_path))
    assert [(r["scenario"], r["policy"]) for r in runs] == [("nope", "v6.18"), ("nope", "no-such-policy")]
    assert all(r["error"] and not r["expect"]["ok"] for r in runs)
    assert "nope" in runs[0]["error"] and "ERROR" in out
    assert _wait_empty(p.pid) == [] and _ours(before) == []


def test_a_run_that_raises_or_dies_is_a_row(monkeypatch):
    """In-process API: run_one raising, or the cell process dying, gives an error row;
    the other cells are unaffected."""
    real = sw.run_one

    def flaky(scenario, policy, sysctl):
        if policy == "raise":
            raise RuntimeError("boom")
        if policy == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(scenario, policy, sysctl)

    monkeypatch.setattr(sw, "run_one", flaky)
    before = _snapshot()
    cells = sw.grid(["stock"], ["raise", "die", "v6.18"])
    outs = sw.sweep(cells, jobs=2)
    assert outs[0]["error"] == "RuntimeError: boom"
    assert outs[1]["error"] == "the run died of SIGKILL"
    assert outs[2]["error"] is None and outs[2]["measured"]["mces"] == 1
    assert [sw.failed(o) for o in outs] == [True, True, False]
    assert psutil.Process().children(recursive=True) == []
    assert _ours(before) == []


def test_timeout_kills_the_run_and_its_supervisor(monkeypatch):
    real = sw.run_one

    def slow(scenario, policy, sysctl):
        import emu

        with emu.start(ram="64M"):
            time.sleep(60)
        return real(scenario, policy, sysctl)

    monkeypatch.setattr(sw, "run_one", slow)
    before = _snapshot()
    t0 = time.monotonic()
    outs = sw.sweep(sw.grid(["stock"], ["v6.18"]), jobs=1, timeout=1.5)
    assert outs[0]["error"] == "timed out after 1.5 s" and time.monotonic() - t0 < 20
    assert psutil.Process().children(recursive=True) == []
    assert _ours(before) == []


@pytest.mark.parametrize("after", [0.0, 0.3, 1.0])
def test_ctrl_c_leaves_nothing(after):
    """SIGINT to the sweep's process group (what the tty's Ctrl-C does) at several
    moments: while supervisors boot, while runs run, between runs."""
    before = _snapshot()
    p = _emu("sweep", "-p", "v6.18,mf-delayed-fix,minimum,initial", "-j", "2")
    end = time.monotonic() + 30
    while len(_session(p.pid)) < 4 and time.monotonic() < end:     # cells and supervisors exist
        time.sleep(0.01)
    time.sleep(after)
    os.killpg(p.pid, signal.SIGINT)
    out, err = _communicate(p, 60)
    assert p.returncode in (130, 0), err        # 0: it finished before the signal landed
    assert _wait_empty(p.pid) == [], "processes left in the sweep's session"
    assert _ours(before) == []


def test_owner_gone_while_supervisor_boots_leaves_nothing():
    """A private supervisor whose owner went away before it said "ready" (the ready
    pipe is broken) shuts down orderly instead of leaving its segments and socket."""
    from emu import config, daemon

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            r, w = os.pipe()
            os.close(r)
            path = os.path.join(shm.runtime_dir(), "priv-%d.sock" % os.getpid())
            daemon.run(config.build(ram="64M"), path, owner_pid=os.getppid(), ready_fd=w)
        except BrokenPipeError:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    left = leftovers(pid)
    shm.cleanup()
    assert left == []


def _ray_available():
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _ray_available(), reason="ray is not installed (pip install 'gmem-emu[ray]')")
@pytest.mark.timeout(600)
def test_ray_local_same_results(tmp_path):
    """The same cells as Ray tasks on a local Ray instance: each forks its cell inside
    the Ray worker; the figures are those of the local sweep."""
    before = _snapshot()
    json_path = tmp_path / "r.json"
    p = _emu("sweep", "-p", ",".join(POLICIES), "--sysctl", SYSCTL, "--ray", "local",
             "--json", str(json_path), env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    out, err = _communicate(p, 500)
    assert p.returncode == 1, err[-3000:] + out          # early_kill=1 fails stock's [expect]
    runs = sw.read_json(str(json_path))
    assert json.loads(json_path.read_text())["engine"] == "ray"
    assert len(runs) == 4 and all(r["error"] is None for r in runs)
    for r in runs:
        d = _direct(r["policy"], r["sysctl"])
        assert (r["rows"], r["measured"]) == (d["rows"], d["measured"]), r["policy"]
    assert sum(1 for ln in err.splitlines() if ln.startswith("sweep: [")) == 4
    assert _wait_empty(p.pid, 60) == [], "Ray or emu processes left in the sweep's session"
    assert _ours(before) == []


@pytest.mark.skipif(not _ray_available(), reason="ray is not installed (pip install 'gmem-emu[ray]')")
@pytest.mark.timeout(600)
def test_ray_head_address():
    """`ray start --head` (its own session, token authentication on), then
    `emu sweep --ray HOST:PORT` connects to it as a client."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    head = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head",
                             "--block", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard=false", "--node-ip-address", "127.0.0.1"],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    before = _snapshot()
    try:
        p = _emu("sweep", "-p", ",".join(POLICIES), "--ray", "127.0.0.1:%d" % port, env=env)
        out, err = _communicate(p, 300)
        assert p.returncode == 0, err[-3000:] + out
        assert "on ray (127.0.0.1:%d), 0 failed" % port in out
        assert sum(1 for ln in err.splitlines() if ln.startswith("sweep: [")) == 2
        assert _wait_empty(p.pid) == []
    finally:
        head.send_signal(signal.SIGTERM)           # `ray start --block` stops its cluster
        try:
            head.wait(60)
        finally:
            for pid in _wait_empty(head.pid, 30):
                os.kill(pid, signal.SIGKILL)
            # `ray start` names its cluster there for later `ray.init()`s: not a dead one
            cur = "/tmp/ray/ray_current_cluster"
            if os.path.exists(cur) and open(cur).read().strip().endswith(":%d" % port):
                os.unlink(cur)
    assert _ours(before) == []


@pytest.mark.skipif(not _ray_available(), reason="ray is not installed (pip install 'gmem-emu[ray]')")
@pytest.mark.timeout(300)
def test_ray_ctrl_c_leaves_nothing():
    """Ctrl-C while Ray tasks run: they are cancelled (their workers killed, the cells
    die with them), Ray is shut down, the supervisors stop."""
    before = _snapshot()
    p = _emu("sweep", "-p", "v6.18,mf-delayed-fix,minimum,initial", "-j", "2", "--ray", "local",
             env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    end = time.monotonic() + 120
    ours: list = []
    while not ours and time.monotonic() < end:          # one of this sweep's runs booted
        time.sleep(0.01)                                 # (not a concurrent test's supervisor)
        ours = _descendant_supervisors(p.pid, before)
    os.killpg(p.pid, signal.SIGINT)
    out, err = _communicate(p, 120)
    assert p.returncode in (130, 0), err[-3000:]
    assert ours, "no supervisor of this sweep was seen"
    assert _wait_empty(p.pid, 60) == []
    end = time.monotonic() + 20
    while [q for q in ours if psutil.pid_exists(q)] and time.monotonic() < end:
        time.sleep(0.05)
    assert [q for q in ours if psutil.pid_exists(q)] == [] and _ours(before) == []


def _descendant_supervisors(root: int, before: set[str]) -> list[int]:
    """Supervisors booted since `before` that descend from root (through Ray's raylet
    and workers, here), not those of a concurrent test run."""
    out = []
    for e in _snapshot() - before:
        pid = int(os.path.basename(e).split("-")[1].split(".")[0])
        try:
            if root in [a.pid for a in psutil.Process(pid).parents()]:
                out.append(pid)
        except psutil.Error:
            pass
    return sorted(set(out))
