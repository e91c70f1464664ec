"""`emu sweep` scaling: runs/s against workers for a fixed grid.

The grid: the stock scenario x 4 policies x vm.memory_failure_early_kill=0,1
(8 runs).  Each figure is the median over REPS sweeps of the whole grid.

Baseline, same run, same grid: the same runs one after another in a loop in one
process (run_one, no fork per run, no scheduler): the ideal 1-worker figure.
The ratio is the sweep's speedup over that loop; on this 2-core machine each run
is itself several busy processes (its supervisor, the VMM, its threads), so
more workers than cores only overlap the runs' waits.

`--ray`: the same grid as Ray tasks on a local Ray instance started once (its
start-up, ~5 s, is not counted).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import report  # noqa: E402

from emu import records  # noqa: E402
from emu import sweep as sw  # noqa: E402

REPS = 5
POLICIES = ["v6.18", "mf-delayed-fix", "minimum", "initial"]
CELLS = sw.grid(["stock"], POLICIES, sw.parse_sysctl_axes(["vm.memory_failure_early_kill=0,1"]))


def _loop() -> float:
    """The baseline: every run in one process, one after the other; runs/s."""
    def body(w):
        t0 = time.perf_counter()
        for c in CELLS:
            out = sw.run_one(c.scenario, c.policy, c.sysctls)
            assert out["error"] is None, out
        w.send(time.perf_counter() - t0)

    pid, r = records.fork(body)
    took = records.receive(r)[0]
    os.waitpid(pid, 0)
    return len(CELLS) / took


def _sweep(jobs: int, ray: str | None = None) -> float:
    t0 = time.perf_counter()
    outs = sw.sweep(CELLS, jobs=jobs, ray=ray)
    took = time.perf_counter() - t0
    assert not any(o["error"] for o in outs), [o["error"] for o in outs]   # [expect] may fail
    return len(CELLS) / took


def main(with_ray: bool = False, reps: int = REPS) -> list[dict]:
    print("emu sweep: %d runs (stock x %d policies x 2 sysctl values), median of %d, %d CPUs"
          % (len(CELLS), len(POLICIES), reps, os.cpu_count()), flush=True)
    figures: dict[str, list[float]] = {}
    engines = [("-j %d" % j, j, None) for j in (1, 2, 4)]
    if with_ray:
        import ray

        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        engines += [("--ray local -j %d" % j, j, "local") for j in (1, 2)]
    for _ in range(reps):                                  # interleaved: drift hits all alike
        figures.setdefault("loop", []).append(_loop())
        for name, j, address in engines:
            figures.setdefault(name, []).append(_sweep(j, address))
    if with_ray:
        ray.shutdown()
    base = statistics.median(figures["loop"])
    return [report("sweep %s" % name, statistics.median(figures[name]), "runs/s",
                   "same runs in a loop, 1 process", base) for name, _j, _r in engines]


if __name__ == "__main__":
    main(with_ray="--ray" in sys.argv,
         reps=int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else REPS)
