"""The kernel's structured trace as Chrome/Perfetto trace-event JSON."""
from __future__ import annotations


def to_chrome(events: list[dict]) -> dict:
    """Instant events on one track per emulated thread (the kernel's own on tid 0)."""
    out = []
    for ev in events:
        tid = ev.get("tid") or 0
        args = {k: (hex(v) if k in ("pfn", "addr") and isinstance(v, int) else v)
                for k, v in ev.items() if k not in ("ts_ns", "type")}
        out.append({"name": ev["type"], "ph": "i", "s": "t", "ts": ev["ts_ns"] / 1000.0,
                    "pid": 1, "tid": tid, "cat": "emu", "args": args})
    out.append({"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "gmem-emu kernel"}})
    return {"traceEvents": out, "displayTimeUnit": "ns"}
