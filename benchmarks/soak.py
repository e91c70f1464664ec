"""Soak: many random operation sequences on both CPU backends, invariants after
every step, and the two backends compared outcome for outcome.

    python benchmarks/soak.py [--sequences 10000] [--seed 1] [--min-ops 5] [--max-ops 20]
    python benchmarks/soak.py --crash [--kills 1000] [--seed S] ...   # benchmarks/soak_crash.py

With --crash, the other arguments go to the crash-at-any-point soak
(benchmarks/soak_crash.py): workers SIGKILLed at random points, then the same
invariants, leaks and supervisor RSS/fds checked.

Sequence i is drawn from random.Random((seed, i)) with the op grammar of
emu._oracle (the property tests' own).  Each backend (the Cython core, the
pure-Python reference) runs every sequence in a fresh worker process, in its own
runner process with its own supervisor; a supervisor serves `--batch` sequences and
is then replaced (the next one boots with the next policy preset), so poisoned
frames and shrunk HugeTLB pools do not pile up (each
worker's exit tears down its mappings, files and VM; check_invariants also runs
after that teardown).  Both runners see the same sequences in the same order, so
their supervisors have the same history.

Printed: sequences and ops run, invariant violations, backend disagreements, hung
or crashed workers, and each backend's throughput beside a baseline measured in the
same runner: a bare host round trip (Host.policy()) per op, as a ratio.  The first
disagreements and violations are printed with their sequence, to replay with
--only I.  Exit status 1 when anything broke.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import report  # noqa: E402

import emu  # noqa: E402
from emu import _oracle as O  # noqa: E402

POLICIES = ("mf-delayed-fix", "v6.18", "minimum", "initial", "eventual")
RAM, HUGEPAGES = O.RAM, O.HUGEPAGES
BASELINE_CALLS = 2000


def sequence(seed: int, i: int, lo: int, hi: int) -> list[tuple]:
    rng = random.Random("%d/%d" % (seed, i))
    return O.gen_ops(lambda a, b: rng.randint(a, b), rng.randint(lo, hi))


def policy_of(args, n: int) -> str:
    """The policy preset batch n // batch runs under: the presets in turn."""
    return args.policies[(n // args.batch) % len(args.policies)]


def round_trip_rate(h) -> float:
    """Baseline: bare host round trips per second (the least an op costs)."""
    t = time.perf_counter()
    for _ in range(BASELINE_CALLS):
        h.policy()
    return BASELINE_CALLS / (time.perf_counter() - t)


def runner(backend: str, args, which: list[int], out) -> None:
    """One backend: every sequence in `which`, a fresh supervisor per batch."""
    h = None
    ops_run = 0
    t0 = time.perf_counter()
    base = []
    try:
        for n, i in enumerate(which):
            if n % args.batch == 0:
                if h is not None:
                    h.close()
                h = emu.start(ram=RAM, hugepages=HUGEPAGES, policy=policy_of(args, n))
                if n % (args.batch * 10) == 0:
                    t = time.perf_counter()
                    base.append(round_trip_rate(h))
                    t0 += time.perf_counter() - t          # not counted in the soak's time
            ops = sequence(args.seed, i, args.min_ops, args.max_ops)
            try:
                r = O.run_sequence(h, ops, backend)
            except (OSError, RuntimeError) as e:      # the supervisor died: an emulator bug
                r = {"steps": [], "exit": None, "hung": False, "bad": [],
                     "error": ["supervisor: %r" % e]}
                try:
                    h.close()
                except OSError:
                    pass
                h = emu.start(ram=RAM, hugepages=HUGEPAGES, policy=policy_of(args, n))
            ops_run += len(ops)
            rec = {"i": i, "digest": hashlib.sha1(json.dumps(O.outcome(r)).encode()).hexdigest(),
                   "bad": r["bad"], "hung": r["hung"], "error": r["error"], "steps": len(r["steps"]),
                   "exit": r["exit"]}
            out.write(json.dumps(rec) + "\n")
            if backend == "cython" and (n + 1) % args.progress == 0:
                print("  ... %d sequences (%.0f s)" % (n + 1, time.perf_counter() - t0),
                      file=sys.stderr, flush=True)
    finally:
        if h is not None:
            h.close()
    out.write(json.dumps({"done": True, "ops": ops_run, "time": time.perf_counter() - t0,
                          "baseline": sorted(base)[len(base) // 2] if base else 0}) + "\n")
    out.flush()


def spawn(backend: str, args, which: list[int]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        os.close(r)
        try:
            with os.fdopen(w, "w", buffering=1) as out:
                runner(backend, args, which, out)
        except BaseException as e:
            print("soak runner %s: %r" % (backend, e), file=sys.stderr)
            code = 1
        os._exit(code)
    os.close(w)
    return pid, os.fdopen(r)


def _lines(files: dict):
    """(name, line) from several pipes as they come (a runner whose pipe is not
    drained would stall on a full pipe)."""
    bufs = {f.fileno(): [name, b""] for name, f in files.items()}
    while bufs:
        ready, _, _ = select.select(list(bufs), [], [])
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            name, buf = bufs[fd]
            if not chunk:
                del bufs[fd]
                continue
            *lines, rest = (buf + chunk).split(b"\n")
            bufs[fd][1] = rest
            for line in lines:
                yield name, line.decode()


def replay(args, i: int) -> None:
    """Run one sequence on both backends in this process and show the outcomes."""
    ops = sequence(args.seed, i, args.min_ops, args.max_ops)
    policy = policy_of(args, i)
    print("sequence %d (policy %s): %s" % (i, policy, ops))
    res = {}
    for backend in ("cython", "python"):
        h = emu.start(ram=RAM, hugepages=HUGEPAGES, policy=policy)
        try:
            res[backend] = O.run_sequence(h, ops, backend)
        finally:
            h.close()
        for s in res[backend]["steps"]:
            print("  %-6s %s -> %s %s %s" % (backend, s["op"], s["out"], s["sigs"], s.get("bad") or ""))
        print("  %-6s exit %s, after exit: %s" % (backend, res[backend]["exit"],
                                                  [b for b in res[backend]["bad"] if b[0] < 0]))
    print("disagreement:", O.diff(res["cython"], res["python"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-ops", type=int, default=5)
    ap.add_argument("--max-ops", type=int, default=20)
    ap.add_argument("--batch", type=int, default=250, help="sequences per supervisor")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="policy presets, one per batch in turn (default: all)")
    ap.add_argument("--progress", type=int, default=500, help="report every N sequences")
    ap.add_argument("--only", type=int, default=None, help="replay sequence I and show it")
    args = ap.parse_args(argv)
    if args.sequences < 1 or args.min_ops < 1 or args.max_ops < args.min_ops or args.batch < 1:
        ap.error("--sequences, --min-ops, --batch must be positive and --max-ops >= --min-ops")
    args.policies = [p for p in args.policies.split(",") if p]
    if not args.policies:
        ap.error("--policies: at least one preset")
    if args.only is not None:
        replay(args, args.only)
        return 0
    which = list(range(args.sequences))
    print("soak: %d sequences of %d-%d ops, seed %d, policies %s (one per batch of %d), "
          "both backends in parallel" % (args.sequences, args.min_ops, args.max_ops, args.seed,
                                         ",".join(args.policies), args.batch), flush=True)
    runners = {b: spawn(b, args, which) for b in ("cython", "python")}
    got: dict[str, dict] = {b: {} for b in runners}
    summary: dict[str, dict] = {}
    for b, line in _lines({b: f for b, (_pid, f) in runners.items()}):   # both at once
        rec = json.loads(line)
        if rec.get("done"):
            summary[b] = rec
        else:
            got[b][rec["i"]] = rec
    for b, (pid, f) in runners.items():
        f.close()
        _, status = os.waitpid(pid, 0)
        if status:
            print("runner %s failed: status %d" % (b, status))
    violations = [(b, i, step, line) for b in got for i, r in sorted(got[b].items())
                  for step, line in r["bad"]]
    broken = [(b, i, r["hung"], r["error"]) for b in got for i, r in sorted(got[b].items())
              if r["hung"] or r["error"]]
    missing = [(b, i) for b in got for i in which if i not in got[b]]
    disagree = [i for i in which if i in got["cython"] and i in got["python"]
                and got["cython"][i]["digest"] != got["python"][i]["digest"]]
    ops = {b: summary.get(b, {}).get("ops", 0) for b in runners}
    steps = sum(r["steps"] for b in got for r in got[b].values())
    deaths = sum(1 for b in got for r in got[b].values() if r["exit"] != 0)
    print("sequences run: %d per backend (%d in all), ops: %s, steps completed: %d, "
          "workers killed by a signal: %d"
          % (len(got["cython"]), sum(len(g) for g in got.values()),
             ", ".join("%s %d" % kv for kv in ops.items()), steps, deaths))
    print("invariant violations: %d (in %d sequences)" % (len(violations),
                                                         len({(b, i) for b, i, _s, _l in violations})))
    print("backend disagreements: %d sequences" % len(disagree))
    print("hung or crashed workers: %d, sequences missing: %d" % (len(broken), len(missing)))
    for b, i, step, line in violations[:10]:
        print("  violation: %s sequence %d step %d: %s" % (b, i, step, line))
    for i in disagree[:10]:
        print("  disagreement: sequence %d (replay: --seed %d --only %d)" % (i, args.seed, i))
    for b, i, hung, err in broken[:10]:
        print("  %s sequence %d: hung=%s %s" % (b, i, hung, err))
    for b, s in summary.items():
        if s["time"] > 0 and s["baseline"]:
            report("soak ops/s, %s CPU (invariants every step)" % b, s["ops"] / s["time"], "op/s",
                   "bare host round trips/s", s["baseline"])
            report("soak sequences/s, %s CPU" % b, len(got[b]) / s["time"], "seq/s",
                   "bare host round trips/s / ops per seq",
                   s["baseline"] / (s["ops"] / max(len(got[b]), 1)))
    return 1 if violations or disagree or broken or missing else 0


if __name__ == "__main__":
    if "--crash" in sys.argv[1:]:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import soak_crash

        sys.exit(soak_crash.main([a for a in sys.argv[1:] if a != "--crash"]))
    sys.exit(main())
