"""A run's outcome: figures read from the machine's snapshots and from what each
thread saw, the rows `emu compare` prints, the timeline, and the scenario's
expectations checked against the figures."""
from __future__ import annotations

import json

from ..demo import _describe

ROWS = [
    ("signals", "signals (thread: si_code lsb)"),
    ("exits", "KVM_RUN errors seen by the VMM"),
    ("host_unmapped", "unmapped from host page tables"),
    ("s2_zapped", "zapped from stage-2"),
    ("offline", "memory taken offline (HWPoison)"),
    ("pool_lost", "HugeTLB pages lost to the pool"),
    ("mces", "machine checks consumed"),
    ("recovery", "memory_failure() results"),
    ("gmem_usable", "guest_memfd still usable (tried)"),
    ("bad_memory", "another process touching the bad page"),
    ("guest", "guest accesses"),
    ("processes", "processes at the end"),
    ("panic", "host panic"),
]


def fmt_bytes(n) -> str:
    if n is None:
        return "?"
    mb = 1 << 20
    if n >= mb and n % mb == 0:
        return "%d MiB" % (n // mb)
    if n >= 1024:
        return "%d KiB" % (n // 1024)
    return "%d B" % n


def _alive(before: set, owners: set) -> set:
    """The pages of `before` whose owner (process or VM) still exists at the end: a
    process that died lost its mappings by exit_mmap, not by memory failure."""
    return {(o, a) for o, a in before if o in owners}


def _unmapped(before: dict, series: list, key: str) -> int:
    """Bytes that left the page tables (or stage-2) from one snapshot to the next,
    summed from the first injected error on, for owners still alive: a page
    refaulted in between is not counted twice, a process that died is not counted."""
    n, prev = 0, before
    for cur in series:
        n += len(_alive(prev[key], cur["owners"]) - cur[key])
        prev = cur
    return n * 4096


def measure(run, start_mi: dict, usable, reach: dict, events: list) -> dict:
    """Every figure from the machine: snapshots taken before the first injected
    error, at the end of the steps, and after the processes exited."""
    b, e, a = run.snaps["before"], run.snaps["end"], run.snaps["after"]
    guest: dict = {}
    first = next((s["index"] for s in run.steps if s["do"] == "inject"), None)
    for s in run.steps:
        vm = run.sc.vcpu_owner(s["who"])
        if vm is not None and s["do"] in ("read", "write", "touch") and first is not None \
                and s["index"] > first:              # the guest's accesses after the first error
            guest.setdefault(s["who"], []).append("%s: %s" % (s["label"] or s["what"], s["result"]))
    procs = {}
    exited = {ev["tid"]: ev for ev in events if ev["type"] == "exit"}
    for p in run.sc.processes:
        tid = next((t for t, n in run.tids.items() if n == p.name), None)
        ev = exited.get(tid)
        words = [(w, who) for who, w in run.words.items() if run._process_of(who) == p.name]
        if words:
            procs[p.name] = "%s (%s)" % words[0]
        elif ev is not None and ev["sig"] and not ev["clean"]:
            import signal

            procs[p.name] = "killed by %s" % signal.Signals(ev["sig"]).name
        elif run.panicked:
            procs[p.name] = "stopped with the machine"
        else:
            procs[p.name] = "ran to the end" if p.name not in run.dead else "died"
    return {
        "signals": ["%s: %s lsb %d" % (who, code, lsb) for t, who, code, _addr, lsb in
                    sorted(run.signals) if run.t_end is None or t < run.t_end],
        "exits": ["%s: %s" % (who, x) for who, xs in run.exits.items() for x in xs],
        "host_unmapped": _unmapped(b, run.series, "host"),
        "s2_zapped": _unmapped(b, run.series, "s2"),
        "hwpoison_running": e["hwpoison"],
        "hwpoison_after": a["hwpoison"],
        "hardware_corrupted_running": e["meminfo"]["HardwareCorrupted"],
        "hardware_corrupted_after": a["meminfo"]["HardwareCorrupted"],
        "pool_lost": start_mi["HugePages_Free"] - a["meminfo"]["HugePages_Free"],
        "mces": e["mces"],
        "panic": a["panic"],
        "gmem_usable": usable,
        "bad_memory": reach,
        "guest": guest,
        "processes": procs,
        "recovery": ["%s: %s" % (ev["page"], ev["result"]) for ev in events
                     if ev["type"] == "mf_result"],
        "steps": {s["label"]: s["result"] for s in run.steps if s["label"]},
    }


def rows(out: dict) -> dict:
    """The outcome as the text `emu compare` prints, one cell per row."""
    if out.get("error") and "signals" not in out:
        return {k: "error: %s" % out["error"] for k, _ in ROWS}
    return {
        "signals": ", ".join(out["signals"]) or "none",
        "exits": ", ".join(out["exits"]) or "none",
        "host_unmapped": fmt_bytes(out["host_unmapped"]),
        "s2_zapped": fmt_bytes(out["s2_zapped"]),
        "offline": "%s while running, %s after" % (fmt_bytes(out["hwpoison_running"]),
                                                   fmt_bytes(out["hwpoison_after"])),
        "pool_lost": str(out["pool_lost"]),
        "mces": str(out["mces"]),
        "recovery": ", ".join(out["recovery"]) or "none",
        "gmem_usable": out["gmem_usable"] or "-",
        "bad_memory": ", ".join("%s: %s" % kv for kv in out["bad_memory"].items()) or "-",
        "guest": "; ".join("%s %s" % (v, ", ".join(rs)) for v, rs in out["guest"].items()) or "-",
        "processes": ", ".join("%s %s" % kv for kv in out["processes"].items()),
        "panic": out["panic"] or "no",
    }


def timeline(run, events: list) -> list:
    names = {t: n for t, n in run.tids.items()}
    tl = [(t, who, text) for t, who, text in run.journal]
    for s in run.steps:
        tl.append((s["t"], "step", "#%d %s: %s -> %s" % (s["index"], s["who"], s["what"],
                                                         s["result"])))
    for ev in events:
        text = _describe(ev, names)
        if text:
            tl.append((ev["ts_ns"], "kernel", text))
    tl.sort(key=lambda x: x[0])
    t0 = tl[0][0] if tl else 0
    return [{"t_ms": round((t - t0) / 1e6, 3), "who": who, "what": what} for t, who, what in tl]


def write_trace(path: str, events: list, tids: dict) -> None:
    from ..trace import to_chrome

    try:
        doc = to_chrome(events, names=tids)
    except TypeError:                      # an older to_chrome without thread names
        doc = to_chrome(events)
    with open(path, "w") as f:
        json.dump(doc, f)


def check(sc, out: dict) -> dict:
    """The scenario's [expect.<policy>] against the figures: exact equality."""
    want = sc.expect.get(out.get("policy") or "")
    if want is None:
        return {"ok": None, "failures": []}
    if out.get("error"):
        return {"ok": False, "failures": ["the run failed: %s" % out["error"]]}
    fails = []
    for key, val in want.items():
        got = out.get(key)
        if got != val:
            fails.append("%s: expected %s, got %s" % (key, json.dumps(val), json.dumps(got)))
    return {"ok": not fails, "failures": fails}
