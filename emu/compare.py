"""`emu compare`: one scenario under several memory-failure policies, side by side.

Each policy runs the scenario on its own private supervisor (emu.scenario.run);
every cell is read from that machine after the run: page tables, stage-2,
kpageflags, meminfo, the kernel's trace, and what each thread saw.  With no
scenario named, the library's "stock" one runs.
"""
from __future__ import annotations

import json

from . import scenario as scn
from .scenario.outcome import ROWS


def compare(policies: list[str], scenario: str = "stock", sysctl: dict | None = None) -> list[dict]:
    """One column per policy: the rows as text, plus "policy", "measured" (the
    figures) and "expect" (the scenario's expectations for that policy)."""
    sc = scn.load(scenario)
    cols = []
    for p in policies:
        out = scn.run(sc, p, sysctl=sysctl)
        col = dict(scn.rows(out), policy=p)
        col["measured"] = {k: v for k, v in out.items() if k not in ("timeline", "dmesg", "picture")}
        col["picture"] = out.get("picture")
        col["expect"] = out.get("expect")
        if out.get("error"):
            col["error"] = out["error"]
        cols.append(col)
    return cols


def render(cols: list[dict], title: str = "") -> str:
    import textwrap

    width = 30
    lines = [title] if title else []
    head = "%-38s" % "" + "".join("%-*s" % (width + 2, c["policy"]) for c in cols)
    lines.append(head.rstrip())
    lines.append("-" * len(head.rstrip()))
    for key, label in ROWS:
        cells = [textwrap.wrap(c.get(key) or "-", width) or ["-"] for c in cols]
        depth = max(len(x) for x in cells)
        for i in range(depth):
            row = "%-38s" % (label if i == 0 else "")
            row += "".join("%-*s" % (width + 2, x[i] if i < len(x) else "") for x in cells)
            lines.append(row.rstrip())
    if any(c.get("expect", {}).get("ok") is not None for c in cols):
        row = "%-38s" % "the scenario's expectations"
        row += "".join("%-*s" % (width + 2, {True: "hold", False: "FAIL"}.get(c["expect"]["ok"], "-"))
                       for c in cols)
        lines.append(row.rstrip())
        for c in cols:
            for f in c["expect"]["failures"]:
                lines.append("  %s: %s" % (c["policy"], f))
    return "\n".join(lines)


def main(policies: list[str] | None, as_json: bool, scenario: str | None = None,
         html: str | None = None) -> int:
    from .kernel.policies import load

    sc = scn.load(scenario or "stock")                 # ScenarioError names a bad file
    policies = policies or sc.policies or ["v6.18", "mf-delayed-fix", "minimum", "initial", "eventual"]
    for p in policies:
        load(p)                                       # ValueError names a bad one
    cols = compare(policies, scenario or "stock")
    if as_json:
        print(json.dumps([{k: v for k, v in c.items() if k != "picture"} for c in cols], indent=2))
    else:
        print(render(cols, "emu compare: scenario %r under %d policies: %s\n" % (
            sc.name, len(cols), sc.summary)))
    if html:
        from . import show

        with open(html, "w") as f:
            f.write(show.render_html([(c["policy"], c["picture"]) for c in cols if c.get("picture")]))
        print("\npictures written to %s" % html)
    return 1 if any(c["expect"] and c["expect"]["ok"] is False for c in cols) or \
        any(c.get("error") for c in cols) else 0
