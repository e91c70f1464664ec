"""The kernel's structured trace as a Trace Event Format file (Chrome JSON) that
opens in Perfetto (ui.perfetto.dev) and chrome://tracing.

One track per emulated thread (thread_name metadata; the kernel's own work, with
no thread behind it, on tid 0 "kernel"), memory_failure() as a complete ("X")
slice from its "memory_failure" event to its "memory_failure_end", signals and
machine checks as instant events ("i") on the thread they concern, everything
else as thread-scoped instants.  Timestamps are CLOCK_MONOTONIC in microseconds.
"""
from __future__ import annotations

PID = 1                               # one trace process: the emulated machine
KERNEL_TID = 0
SLICES = {"memory_failure": "memory_failure_end"}
HARDWARE = {"hw_poison", "hw_detect"}          # the machine's own events: global scope
CATEGORY = {"signal": "signal", "signal_dropped": "signal", "mce": "mce", "kvm_mce": "mce",
            "memory_failure": "memory_failure", "hw_poison": "hardware", "hw_detect": "hardware"}


def _args(ev: dict) -> dict:
    return {k: (hex(v) if k in ("pfn", "addr", "gpa") and isinstance(v, int) else v)
            for k, v in ev.items() if k not in ("ts_ns", "type")}


def to_chrome(events: list[dict], names: dict | None = None) -> dict:
    """Trace Event Format for `events` (host.events()).  `names`: {tid: thread
    name} for the thread_name metadata (keys int or str); otherwise the comm of
    the thread's "task_new" event, else "tid N"."""
    given = {int(k): v for k, v in (names or {}).items()}
    names = {ev["tid"]: ev["comm"] for ev in events if ev["type"] == "task_new" and ev.get("comm")}
    names.update(given)
    out: list[dict] = []
    tids = {KERNEL_TID}
    open_: dict[int, list] = {}
    last_ts = max((ev["ts_ns"] for ev in events), default=0)
    for ev in events:
        tid = ev.get("tid") or KERNEL_TID
        tids.add(tid)
        ts = ev["ts_ns"] / 1000.0
        t = ev["type"]
        if t in SLICES:
            rec = {"name": t, "ph": "X", "ts": ts, "dur": 0.0, "pid": PID, "tid": tid,
                   "cat": CATEGORY.get(t, "emu"), "args": _args(ev)}
            open_.setdefault(tid, []).append((ev["type"], ev["ts_ns"], rec))
            out.append(rec)
            continue
        begin = next((b for b, e in SLICES.items() if e == t), None)
        if begin is not None:
            stack = open_.get(tid) or []
            for i in range(len(stack) - 1, -1, -1):
                if stack[i][0] == begin:
                    _name, start, rec = stack.pop(i)
                    rec["dur"] = (ev["ts_ns"] - start) / 1000.0
                    rec["args"]["ret"] = ev.get("ret")
                    break
            continue
        out.append({"name": t, "ph": "i", "s": "g" if t in HARDWARE else "t", "ts": ts,
                    "pid": PID, "tid": tid, "cat": CATEGORY.get(t, "emu"), "args": _args(ev)})
    for stack in open_.values():                  # never ended (a panic, or the ring lost it)
        for _name, start, rec in stack:
            rec["dur"] = (last_ts - start) / 1000.0
            rec["args"]["unfinished"] = True
    meta = [{"name": "process_name", "ph": "M", "pid": PID, "tid": KERNEL_TID,
             "args": {"name": "gmem-emu"}}]
    for tid in sorted(tids | set(names)):
        name = "kernel" if tid == KERNEL_TID and tid not in names else names.get(tid, "tid %d" % tid)
        meta.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid,
                     "args": {"name": name}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid,
                     "args": {"sort_index": -1 if tid == KERNEL_TID else tid}})
    return {"traceEvents": meta + out, "displayTimeUnit": "ns"}


def thread_names(status: dict) -> dict[int, str]:
    """{tid: "comm"} for every live emulated thread in host.status()."""
    return {t["tid"]: t["comm"] for p in status["processes"] for t in p["threads"]}
