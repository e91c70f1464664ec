"""Pictures of memory files: which pages are shared or private, poisoned, mapped by
which process and which VM (`emu show`, `emu compare --html`).

A snapshot is plain JSON built from `host.file_pages()` (exact, run-compressed)
and `host.status()`; the renderers only read it, so a snapshot saved with
`emu show --json` draws the same later.
"""
from __future__ import annotations

import html
import os
import sys

PAGE = 4096
COLS = 64                 # cells per row
MAX_CELLS = 2048          # above this a cell stands for several pages

# One character per cell, most important first: a cell of several pages shows the
# first of these any of its pages has.
CELLS = (
    ("X", "poisoned page (PG_hwpoison)", "#d62728", "1;97;41"),
    ("E", "latent hardware error, not yet found", "#ff7f0e", "1;30;43"),
    ("T", "failure recorded, flag deferred (policy)", "#e377c2", "1;97;45"),
    ("x", "in a poisoned folio", "#f4a6a6", "31"),
    ("!", "private, yet mapped by the host", "#8c564b", "1;97;40"),
    ("P", "private, mapped in stage-2", "#1f3fbf", "1;34"),
    ("B", "shared, mapped by host and stage-2", "#2ca02c", "1;32"),
    ("G", "shared, mapped in stage-2 only", "#17becf", "36"),
    ("H", "shared, mapped by the host only", "#98df8a", "32"),
    ("p", "private, not mapped", "#aec7e8", "34"),
    ("o", "shared, not mapped", "#dddddd", "37"),
    (".", "hole: not in the page cache", "#ffffff", "2"),
)
RANK = {c[0]: i for i, c in enumerate(CELLS)}
FILL = {c[0]: c[2] for c in CELLS}
ANSI = {c[0]: c[3] for c in CELLS}
LEGEND = {c[0]: c[1] for c in CELLS}


# ------------------------------------------------------------------ snapshots
def _files_of(host, status: dict, ino: int | None = None, vm: str | None = None) -> list[dict]:
    if ino is not None:
        return [host.file_pages(ino, runs=True)]
    out = []
    for f in status["files"]:
        if f["kind"] != "guest_memfd":
            continue
        fp = host.file_pages(f["ino"], runs=True)
        if vm is None or fp.get("vm") == vm:
            out.append(fp)
    return out


def _wrap(status: dict, files: list[dict]) -> dict:
    return {"policy": status.get("policy"),
            "processes": {str(p["tgid"]): p["comm"] for p in status["processes"]},
            "hardware_corrupted_kb": status["meminfo"].get("HardwareCorrupted", 0),
            "files": files}


def snapshot(host, ino: int) -> dict:
    """One file (by inode number): {"policy", "processes": {pid: comm},
    "hardware_corrupted_kb", "files": [host.file_pages(ino, runs=True)]}."""
    st = host.status()
    return _wrap(st, _files_of(host, st, ino=ino))


def snapshot_files(host) -> dict:
    """Every memory file of the machine (guest_memfd, shmem/memfd, hugetlbfs) and the
    page cache of every disk file (ext2)."""
    st = host.status()
    return _wrap(st, [host.file_pages(f["ino"], runs=True) for f in st["files"]
                      if f["kind"] in ("guest_memfd", "shmem", "hugetlbfs", "ext2")])


def snapshot_vm(host, vm: str | None = None) -> dict:
    """The guest_memfds of one VM ("<vmm pid>-<vm fd>", as KVM's debugfs names it),
    or of every VM with vm=None; same shape as snapshot()."""
    st = host.status()
    return _wrap(st, _files_of(host, st, vm=vm))


# ------------------------------------------------------------------ cells
def _page_char(r: dict) -> str:
    if r["hwpoison"]:
        return "X"
    if r["latent"]:
        return "E"
    if r.get("tracked"):
        return "T"
    if r["folio_hwpoison"]:
        return "x"
    if r["pfn"] is None:
        return "."
    host = any(m["entry"] == "present" for m in r["host"])
    s2 = bool(r["stage2"])
    if r["private"]:
        return "!" if host else "P" if s2 else "p"
    return "B" if host and s2 else "G" if s2 else "H" if host else "o"


def _per_page(f: dict) -> list[str]:
    """One character per page index (runs share their character)."""
    out: list[str] = []
    for r in f["runs"]:
        out += _page_char(r) * r["count"]
    return out


def _cell_pages(npages: int) -> int:
    n = 1
    while npages > MAX_CELLS * n:
        n *= 2
    return n


def _cells(f: dict) -> tuple[int, list[str]]:
    chars = _per_page(f)
    n = _cell_pages(len(chars))
    return n, [min(chars[i:i + n], key=RANK.__getitem__) for i in range(0, len(chars), n)]


def _folio_at(f: dict) -> list[tuple]:
    """(head, order) per page index (None for a hole)."""
    out: list[tuple] = []
    for r in f["runs"]:
        if r["order"] == 0 and r["head"] is not None:       # order-0 pages: each its own folio
            out += [(r["head"] + j, 0) for j in range(r["count"])]
        else:
            out += [(r["head"], r["order"])] * r["count"]
    return out


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return "%d %s" % (n >> shift, unit)
    return "%d B" % n


def _ranges(idx: list[int]) -> str:
    """0,1,2,5 -> "0-2,5"."""
    out, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else "%d-%d" % (idx[i], idx[j]))
        i = j + 1
    return ",".join(out)


def facts(f: dict) -> list[str]:
    """The file's facts as sentences (under the picture, text and HTML alike)."""
    lines = []
    folios: dict = {}
    for head, order in _folio_at(f):
        if head is not None:
            folios.setdefault(head, order)
    by_order: dict = {}
    for order in folios.values():
        by_order[order] = by_order.get(order, 0) + 1
    lines.append("folios: " + (", ".join("%d x order %d (%s)" % (n, o, _size(PAGE << o))
                                           for o, n in sorted(by_order.items())) or "none"))
    priv = sum(r["count"] for r in f["runs"] if r["private"])
    if f["kind"] == "guest_memfd":
        lines.append("private pages: %d of %d" % (priv, f["npages"]))
    for key, what in (("hwpoison", "poisoned pages"), ("latent", "latent errors"),
                      ("tracked", "deferred failures")):
        idx = [r["index"] + j for r in f["runs"] if r.get(key) for j in range(r["count"])]
        if idx:
            pfns = [r["pfn"] + j for r in f["runs"] if r.get(key) for j in range(r["count"])]
            lines.append("%s: %d (index %s, pfn %s)" % (what, len(idx), _ranges(idx),
                                                       ",".join("%#x" % p for p in pfns[:8])
                                                       + ("..." if len(pfns) > 8 else "")))
    fol = sorted({r["head"] for r in f["runs"] if r["folio_hwpoison"]})
    if fol:
        lines.append("poisoned folios: %s" % ", ".join("%#x" % h for h in fol))
    hosts: dict = {}
    for r in f["runs"]:
        for m in r["host"]:
            key = (m["pid"], m["comm"], m["entry"], m["level"])
            h = hosts.setdefault(key, [0, m["addr"]])
            h[0] += r["count"]
            h[1] = min(h[1], m["addr"])
    for (pid, comm, entry, level), (n, lo) in sorted(hosts.items()):
        lines.append("host: pid %d (%s) %s %d pages, lowest at %#x (%s)"
                     % (pid, comm, "maps" if entry == "present" else "has hwpoison entries for",
                        n, lo, {1: "PTE", 2: "PMD", 3: "PUD"}.get(level, level)))
    s2: dict = {}
    for r in f["runs"]:
        for m in r["stage2"]:
            key = (m["vm"], m["private"], m["level"])
            h = s2.setdefault(key, [0, m["gpa"]])
            h[0] += r["count"]
            h[1] = min(h[1], m["gpa"])
    for (vm, private, level), (n, lo) in sorted(s2.items()):
        lines.append("stage-2: vm %s maps %d %s pages, lowest at gpa %#x (level %d)"
                     % (vm, n, "private" if private else "shared", lo, level))
    if not s2:
        lines.append("stage-2: no VM maps this file")
    for b in f.get("bindings", []):
        lines.append("memslot %d of vm %s: gpa %#x-%#x -> file offset %#x"
                     % (b["slot"], b["vm"], b["gpa"], b["gpa"] + b["size"], b["offset"]))
    return lines


def _title(f: dict) -> str:
    return "%s ino %d %s, %s%s" % (f["kind"], f["ino"], f["name"], _size(f["size"]),
                                   ", vm %s" % f["vm"] if f.get("vm") else "")


# ------------------------------------------------------------------ text
def render_text(snap: dict, color: bool | None = None) -> str:
    """A terminal picture: per file a grid of cells (64 a row, a cell per page, or per
    N pages for big files), each row labelled with its first index and its folio,
    then the facts and a legend.  ANSI colour only when stdout is a tty (or asked)."""
    if color is None:
        color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
    out = ["policy %s" % snap.get("policy")]
    used: set = set()
    for f in snap["files"]:
        out.append("")
        out.append(_title(f))
        n, cells = _cells(f)
        folio = _folio_at(f)
        if n > 1:
            out.append("(one cell = %d pages, %s)" % (n, _size(n * PAGE)))
        for row in range(0, len(cells), COLS):
            first = row * n
            head, order = folio[first] if first < len(folio) else (None, None)
            label = "%6d  %s" % (first, "(hole)" if head is None else "4K pages %#x" % head
                                 if order == 0 else "folio %#x o%d" % (head, order))
            line = cells[row:row + COLS]
            used.update(line)
            if color:
                body = "".join("\x1b[%sm%s\x1b[0m" % (ANSI[c], c) for c in line)
            else:
                body = "".join(line)
            out.append("%-26s |%s|" % (label, body))
        out += ["  " + s for s in facts(f)]
    if not snap["files"]:
        out.append("(no file)")
    out.append("")
    out.append("legend: " + "  ".join("%s %s" % (c, LEGEND[c]) for c, *_ in CELLS if c in used))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ SVG / HTML
CELL = 10


def _svg_file(f: dict, y0: int, parts: list) -> int:
    n, cells = _cells(f)
    folio = _folio_at(f)
    e = html.escape
    parts.append('<text x="0" y="%d" class="t">%s</text>' % (y0 + 12, e(_title(f))))
    y0 += 18
    if n > 1:
        parts.append('<text x="0" y="%d" class="s">one cell = %d pages</text>' % (y0 + 10, n))
        y0 += 14
    for i, c in enumerate(cells):
        x, y = 60 + (i % COLS) * CELL, y0 + (i // COLS) * CELL
        if i % COLS == 0:
            parts.append('<text x="0" y="%d" class="s">%d</text>' % (y + 9, i * n))
        first = i * n
        head, order = folio[first]
        tip = "index %d%s: %s" % (first, "-%d" % (first + n - 1) if n > 1 else "", LEGEND[c])
        if head is not None:
            tip += " (folio %#x order %d)" % (head, order)
        parts.append('<rect x="%d" y="%d" width="%d" height="%d" fill="%s" class="c" data-c="%s">'
                     '<title>%s</title></rect>' % (x, y, CELL, CELL, FILL[c], e(c), e(tip)))
    # folio boundaries: a line where the folio changes within a row, or starts a row
    for i in range(len(cells)):
        first = i * n
        if i and folio[first] != folio[first - n] and folio[first][0] is not None:
            x, y = 60 + (i % COLS) * CELL, y0 + (i // COLS) * CELL
            parts.append('<line x1="%d" y1="%d" x2="%d" y2="%d" class="f"/>' % (x, y, x, y + CELL))
    rows = (len(cells) + COLS - 1) // COLS
    y0 += rows * CELL + 6
    for s in facts(f):
        parts.append('<text x="0" y="%d" class="s">%s</text>' % (y0 + 10, e(s)))
        y0 += 14
    return y0 + 10


def render_svg(snap: dict) -> str:
    """One self-contained <svg> for a snapshot: the grid per file, folio boundaries,
    a tooltip per cell, the facts, the legend."""
    parts: list = []
    y = 0
    parts.append('<text x="0" y="12" class="t">policy %s</text>' % html.escape(str(snap.get("policy"))))
    y = 20
    for f in snap["files"]:
        y = _svg_file(f, y, parts)
    for c, what, fill, _ in CELLS:
        parts.append('<rect x="0" y="%d" width="%d" height="%d" fill="%s" class="c"/>'
                     '<text x="16" y="%d" class="s">%s %s</text>'
                     % (y, CELL, CELL, fill, y + 9, html.escape(c), html.escape(what)))
        y += 14
    width = 60 + COLS * CELL + 10
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d">'
            '<style>.t{font:bold 12px monospace}.s{font:10px monospace}'
            '.c{stroke:#999;stroke-width:0.5}.f{stroke:#000;stroke-width:2}</style>%s</svg>'
            % (width, y, width, y, "".join(parts)))


def render_html(panels: list[tuple[str, dict]]) -> str:
    """ONE self-contained HTML page: the panels side by side, a title each (e.g. one
    per policy from `emu compare --html`), inline SVG, no scripts, no fonts."""
    body = "".join('<div class="panel"><h2>%s</h2>%s</div>' % (html.escape(title), render_svg(snap))
                   for title, snap in panels)
    return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>gmem-emu</title>'
            '<style>body{font-family:monospace;margin:1em}.panels{display:flex;gap:2em;'
            'align-items:flex-start;overflow-x:auto}h2{font-size:14px}</style></head>'
            '<body><div class="panels">%s</div></body></html>\n' % body)
