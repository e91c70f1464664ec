"""Costs that must not grow with the number of tasks, pinned by counting operations
(not by timing): see benchmarks/bench_scaling.py for the curves."""
import math
import types

from emu import daemon

N = 700                                   # tasks attached (the default limit is 1024)
BOUND = 64                                # liveness checks one tick may make


def _supervisor(monkeypatch, dead=()):
    checked = []
    monkeypatch.setattr(daemon, "pid_alive",
                        lambda pid: checked.append(pid) or pid not in dead)
    sup = daemon.Supervisor({"supervisor": {}}, "/nonexistent/emu.sock")
    tasks = {tid: types.SimpleNamespace(tid=tid, conn=None, alive=True)
             for tid in range(10_000, 10_000 + N)}
    sup.kernel = types.SimpleNamespace(
        panicked=None, tasks=tasks, tick=lambda: None,
        buddy=types.SimpleNamespace(populate_ahead=lambda *a: False))
    died = []
    monkeypatch.setattr(sup, "_task_died", lambda t: died.append(t.tid))
    return sup, checked, died


def test_supervise_tick_checks_a_bounded_number_of_tasks(monkeypatch):
    """_supervise runs every 100 ms on the thread that serves system calls: its
    liveness sweep must not cost O(tasks) per tick (the kernel polls nothing)."""
    sup, checked, _ = _supervisor(monkeypatch)
    sup._supervise()
    assert 0 < len(checked) <= BOUND


def test_supervise_sweep_reaches_every_task(monkeypatch):
    """Round robin: within ceil(tasks / batch) ticks every task was checked, and a
    task dead without an EOF (its socket kept open elsewhere) is found."""
    victim = 10_000 + N - 3
    sup, checked, died = _supervisor(monkeypatch, dead={victim})
    ticks = math.ceil(N / daemon.SWEEP_BATCH)
    for _ in range(ticks):
        sup._supervise()
    assert set(checked) == set(sup.kernel.tasks)
    assert died == [victim]
