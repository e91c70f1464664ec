"""Scenario files: a small declarative TOML format, read with the standard library.

    [scenario]   name, summary, description, policies (the default comparison), probe
    [machine]    ram, hugepages = {"2M" = N, "1G" = M}, sysctl = {name = value}
    [[process]]  name, vmm (none | qemu-like | firecracker-like | cloud-hypervisor-like |
                 recovering), mce_kill
                 (early | late | default | unset), sigbus (handle | default), fork_from,
                 threads = [{name, mce_kill}]
    [[memory]]   name, type (anon | memfd | hugetlb-memfd | guest_memfd), size, page
                 (4K | 2M | 1G), process, vm, mmap, shared, private = [[offset, length]],
                 mapped_by = [process names]
    [[vm]]       name, process, type (default | sw-protected), vcpus (count or names),
                 slots = [{memory, gpa, offset, size}]
    [[step]]     who, do (read | write | touch | pread | emulate | kvm-map-read |
                 vhost-copy | idle | inject | convert | punch | measure), memory + offset
                 [+ length] or gpa, error (deferred | latent | madvise), to (private |
                 shared), seconds, data
    [expect.<policy>]  measured values the run must give under that policy

Everything is checked before anything runs: a bad file is one line, `file:line:
key: what is wrong`, and nothing is started.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

SIZES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
PAGE = 4096
PAGE_SIZES = {"4K": PAGE, "2M": 2 << 20, "1G": 1 << 30}
VMMS = ("none", "qemu-like", "firecracker-like", "cloud-hypervisor-like", "recovering")
MCE_KILL = ("early", "late", "default", "unset")
MEMORY_TYPES = ("anon", "memfd", "hugetlb-memfd", "guest_memfd")
VM_TYPES = ("default", "sw-protected")
VERBS = ("read", "write", "touch", "pread", "emulate", "kvm-map-read", "vhost-copy", "idle", "inject",
         "convert", "punch", "measure")
ERRORS = ("deferred", "latent", "madvise")
MEASURED = ("signals", "exits", "host_unmapped", "s2_zapped", "hwpoison_running", "hwpoison_after",
            "hardware_corrupted_running", "hardware_corrupted_after", "pool_lost", "mces",
            "panic", "gmem_usable", "bad_memory", "guest", "processes", "recovery", "steps")


class ScenarioError(ValueError):
    """A bad scenario file, said in one line: `path:line: key: message`."""


@dataclass
class Thread:
    name: str
    mce_kill: str = "unset"


@dataclass
class Process:
    name: str
    vmm: str = "none"
    mce_kill: str = "unset"
    sigbus: str = "handle"
    fork_from: str | None = None
    threads: list[Thread] = field(default_factory=list)


@dataclass
class Memory:
    name: str
    type: str
    size: int
    page: int = PAGE
    process: str = ""
    vm: str | None = None
    mmap: bool = True
    shared: bool = True
    private: list[tuple[int, int]] = field(default_factory=list)
    mapped_by: list[str] = field(default_factory=list)

    @property
    def huge(self) -> bool:
        return self.page > PAGE


@dataclass
class Slot:
    memory: str
    gpa: int
    offset: int = 0
    size: int = 0


@dataclass
class Vm:
    name: str
    process: str
    type: str = "sw-protected"
    vcpus: list[str] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)


@dataclass
class Step:
    index: int
    line: int
    who: str | None
    do: str
    memory: str | None = None
    offset: int = 0
    length: int | None = None
    gpa: int | None = None
    vm: str | None = None
    error: str | None = None
    to: str | None = None
    seconds: float = 0.0
    data: int = 0x5A
    label: str | None = None


@dataclass
class Scenario:
    name: str
    path: str
    summary: str = ""
    description: str = ""
    policies: list[str] = field(default_factory=list)
    probe: bool = True
    ram: str = "256M"
    hugepages: dict = field(default_factory=dict)
    sysctl: dict = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    memories: list[Memory] = field(default_factory=list)
    vms: list[Vm] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    expect: dict = field(default_factory=dict)

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def memory(self, name: str) -> Memory:
        return next(m for m in self.memories if m.name == name)

    def vm(self, name: str) -> Vm:
        return next(v for v in self.vms if v.name == name)

    def vcpu_owner(self, vcpu: str) -> Vm | None:
        return next((v for v in self.vms if vcpu in v.vcpus), None)

    def actors(self) -> list[str]:
        """Every emulated thread a step may name: processes (their main thread),
        process.thread, and vCPUs."""
        out = []
        for p in self.processes:
            out.append(p.name)
            out += ["%s.%s" % (p.name, t.name) for t in p.threads]
        for v in self.vms:
            out += v.vcpus
        return out


# ---------------------------------------------------------------- line numbers
_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_SEG = re.compile(r"\"[^\"]*\"|'[^']*'|[^.\s]+")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_\-]+)\s*=""")


class _Lines:
    """Where each table and key of a TOML file starts: tomllib gives no positions,
    so the file is scanned for headers and `key =` lines (enough for one-line errors)."""

    def __init__(self, text: str):
        self.at: dict[str, int] = {}
        counts: dict[str, int] = {}
        table = ""
        for n, line in enumerate(text.splitlines(), 1):
            m = _HEADER.match(line)
            if m:
                name = ".".join(p.strip('"').strip("'") for p in _SEG.findall(m.group(2)))
                if m.group(1) == "[[":
                    i = counts.get(name, 0)
                    counts[name] = i + 1
                    table = "%s[%d]" % (name, i)
                else:
                    table = name
                self.at.setdefault(table, n)
                continue
            m = _KEY.match(line)
            if m:
                key = m.group(1).strip('"').strip("'")
                self.at.setdefault("%s.%s" % (table, key) if table else key, n)

    def line(self, path: str) -> int:
        while path:
            if path in self.at:
                return self.at[path]
            path = path.rpartition(".")[0] if "." in path else ""
        return 1


class _Reader:
    def __init__(self, path: str, lines: _Lines):
        self.path, self.lines = path, lines

    def fail(self, key: str, msg: str):
        raise ScenarioError("%s:%d: %s: %s" % (self.path, self.lines.line(key), key, msg))

    def table(self, d, key: str, allowed: tuple) -> dict:
        if not isinstance(d, dict):
            self.fail(key, "expected a table")
        for k in d:
            if k not in allowed:
                self.fail("%s.%s" % (key, k), "unknown key (expected one of: %s)" % ", ".join(allowed))
        return d

    def str(self, d: dict, key: str, where: str, choices=None, default=None, required=False):
        if key not in d:
            if required:
                self.fail(where, "missing key '%s'" % key)
            return default
        v = d[key]
        if not isinstance(v, str):
            self.fail("%s.%s" % (where, key), "expected a string, got %r" % (v,))
        if choices and v not in choices:
            self.fail("%s.%s" % (where, key), "%r is not one of: %s" % (v, ", ".join(choices)))
        return v

    def bool(self, d: dict, key: str, where: str, default: bool) -> bool:
        v = d.get(key, default)
        if not isinstance(v, bool):
            self.fail("%s.%s" % (where, key), "expected true or false, got %r" % (v,))
        return v

    def size(self, d: dict, key: str, where: str, default=None, required=False, align=1) -> int:
        if key not in d:
            if required:
                self.fail(where, "missing key '%s'" % key)
            return default
        v = d[key]
        n = parse_size(v)
        if n is None or n < 0:
            self.fail("%s.%s" % (where, key), "expected a size like 4096, 0x5000, \"2M\" or "
                      "\"3M+0x2000\", got %r" % (v,))
        if n % align:
            self.fail("%s.%s" % (where, key), "%#x is not a multiple of %#x" % (n, align))
        return n

    def name(self, d: dict, where: str, seen: set) -> str:
        n = self.str(d, "name", where, required=True)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", n):
            self.fail(where + ".name", "%r: letters, digits, '-' and '_', starting with a letter" % n)
        if n in seen:
            self.fail(where + ".name", "%r is defined twice" % n)
        seen.add(n)
        return n


def _human(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return "%d%s" % (n >> shift, unit)
    return str(n)


def parse_size(v) -> int | None:
    """4096, "4K", "2M", "0x5000", "3M+0x2000": sums of numbers with K/M/G/T suffixes."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if not isinstance(v, str) or not v.strip():
        return None
    total = 0
    for part in v.replace(" ", "").split("+"):
        m = re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)([KMGT]i?B?)?", part)
        if not m:
            return None
        total += int(m.group(1), 0) * (SIZES[m.group(2)[0]] if m.group(2) else 1)
    return total


# ---------------------------------------------------------------- loading
def load(source: str | Path) -> Scenario:
    """A scenario from a file path or a library name (see `library()`)."""
    path = Path(source)
    if not path.exists() and not path.suffix:
        lib = library()
        if str(source) in lib:
            path = lib[str(source)]
    try:
        text = path.read_text()
    except OSError as e:
        raise ScenarioError("%s: %s" % (source, e.strerror)) from None
    return loads(text, str(path))


def library() -> dict[str, Path]:
    """The scenarios shipped with emu, by name."""
    here = Path(__file__).resolve().parent.parent / "scenarios"
    return {p.stem: p for p in sorted(here.glob("*.toml"))}


def loads(text: str, path: str = "<scenario>") -> Scenario:
    lines = _Lines(text)
    r = _Reader(path, lines)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ScenarioError("%s:%s: %s" % (path, m.group(1) if m else "?",
                                           re.sub(r"\s*\(at line.*\)", "", str(e)))) from None
    r.table(doc, "", ("scenario", "machine", "process", "memory", "vm", "step", "expect"))
    head = r.table(doc.get("scenario", {}), "scenario",
                   ("name", "summary", "description", "policies", "probe"))
    sc = Scenario(name=r.str(head, "name", "scenario", default=Path(path).stem), path=path,
                  summary=r.str(head, "summary", "scenario", default=""),
                  description=r.str(head, "description", "scenario", default=""),
                  probe=r.bool(head, "probe", "scenario", True))
    pol = head.get("policies", [])
    if not isinstance(pol, list) or not all(isinstance(p, str) for p in pol):
        r.fail("scenario.policies", "expected a list of policy names")
    sc.policies = pol
    _machine(r, sc, doc.get("machine", {}))
    names: set = set()
    for i, d in enumerate(_array(r, doc, "process")):
        sc.processes.append(_process(r, d, "process[%d]" % i, names))
    if not sc.processes:
        r.fail("process", "a scenario needs at least one [[process]]")
    for i, d in enumerate(_array(r, doc, "vm")):
        sc.vms.append(_vm(r, sc, d, "vm[%d]" % i, names))
    for i, d in enumerate(_array(r, doc, "memory")):
        sc.memories.append(_memory(r, sc, d, "memory[%d]" % i, names))
    for i, v in enumerate(sc.vms):
        _slots(r, sc, v, "vm[%d]" % i, doc["vm"][i].get("slots", []))
    for i, d in enumerate(_array(r, doc, "step")):
        sc.steps.append(_step(r, sc, d, i, lines))
    _expect(r, sc, doc.get("expect", {}))
    return sc


def _array(r: _Reader, doc: dict, key: str) -> list:
    v = doc.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        r.fail(key, "expected [[%s]] tables" % key)
    return v


def _machine(r: _Reader, sc: Scenario, d) -> None:
    r.table(d, "machine", ("ram", "hugepages", "sysctl"))
    sc.ram = r.str(d, "ram", "machine", default=sc.ram)
    if parse_size(sc.ram) is None:
        r.fail("machine.ram", "expected a size like \"256M\", got %r" % sc.ram)
    hp = r.table(d.get("hugepages", {}), "machine.hugepages", tuple(("2M", "1G")))
    for k, v in hp.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            r.fail("machine.hugepages.%s" % k, "expected a page count, got %r" % (v,))
    sc.hugepages = dict(hp)
    need = sum(n * PAGE_SIZES[k] for k, n in hp.items())
    if need and need > parse_size(sc.ram) - (64 << 20):
        r.fail("machine.hugepages", "%s of huge pages do not fit in ram = %r: the first 64M stay "
               "with the buddy allocator" % (_human(need), sc.ram))
    sy = d.get("sysctl", {})
    if not isinstance(sy, dict):
        r.fail("machine.sysctl", "expected a table of name = value")
    for k, v in sy.items():
        if not isinstance(v, int) or isinstance(v, bool):
            r.fail("machine.sysctl.%s" % k, "expected an integer, got %r" % (v,))
    sc.sysctl = dict(sy)


def _process(r: _Reader, d: dict, where: str, names: set) -> Process:
    r.table(d, where, ("name", "vmm", "mce_kill", "sigbus", "fork_from", "threads"))
    p = Process(name=r.name(d, where, names), vmm=r.str(d, "vmm", where, VMMS, "none"),
                mce_kill=r.str(d, "mce_kill", where, MCE_KILL, "unset"),
                sigbus=r.str(d, "sigbus", where, ("handle", "default"), "handle"),
                fork_from=r.str(d, "fork_from", where))
    ths = d.get("threads", [])
    if not isinstance(ths, list):
        r.fail(where + ".threads", "expected a list of {name, mce_kill}")
    tn: set = set()
    for j, t in enumerate(ths):
        tw = "%s.threads[%d]" % (where, j)
        r.table(t, tw, ("name", "mce_kill"))
        p.threads.append(Thread(r.name(t, tw, tn), r.str(t, "mce_kill", tw, MCE_KILL, "unset")))
    return p


def _known(r: _Reader, sc: Scenario, key: str, name, kind: str) -> None:
    pool = {"process": [p.name for p in sc.processes], "vm": [v.name for v in sc.vms],
            "memory": [m.name for m in sc.memories]}[kind]
    if name not in pool:
        r.fail(key, "no %s named %r (have: %s)" % (kind, name, ", ".join(pool) or "none"))


def _vm(r: _Reader, sc: Scenario, d: dict, where: str, names: set) -> Vm:
    r.table(d, where, ("name", "process", "type", "vcpus", "slots"))
    v = Vm(name=r.name(d, where, names), process=r.str(d, "process", where, required=True),
           type=r.str(d, "type", where, VM_TYPES, "sw-protected"))
    _known(r, sc, where + ".process", v.process, "process")
    n = d.get("vcpus", 1)
    if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 64:
        taken = sum(len(x.vcpus) for x in sc.vms)
        v.vcpus = ["vcpu%d" % (taken + i) for i in range(n)]
    elif isinstance(n, list) and all(isinstance(x, str) for x in n):
        for x in n:
            if x in names:
                r.fail(where + ".vcpus", "%r is defined twice" % x)
            names.add(x)
        v.vcpus = list(n)
    else:
        r.fail(where + ".vcpus", "expected a count (0..64) or a list of names, got %r" % (n,))
    return v


def _slots(r: _Reader, sc: Scenario, v: Vm, where: str, slots) -> None:
    if not isinstance(slots, list):
        r.fail(where + ".slots", "expected a list of {memory, gpa}")
    for j, s in enumerate(slots):
        sw = "%s.slots" % where
        r.table(s, sw, ("memory", "gpa", "offset", "size"))
        mem = r.str(s, "memory", sw, required=True)
        _known(r, sc, sw + ".memory", mem, "memory")
        m = sc.memory(mem)
        slot = Slot(mem, r.size(s, "gpa", sw, required=True, align=PAGE),
                    r.size(s, "offset", sw, 0, align=PAGE))
        slot.size = r.size(s, "size", sw, m.size - slot.offset, align=PAGE)
        if slot.offset + slot.size > m.size or slot.size == 0:
            r.fail(sw + ".size", "slot %d runs past the end of memory %r" % (j, mem))
        if m.type == "guest_memfd" and m.vm not in (None, v.name):
            r.fail(sw + ".memory", "guest_memfd %r belongs to vm %r" % (mem, m.vm))
        if m.type == "guest_memfd":
            m.vm = v.name
        v.slots.append(slot)


def _memory(r: _Reader, sc: Scenario, d: dict, where: str, names: set) -> Memory:
    r.table(d, where, ("name", "type", "size", "page", "process", "vm", "mmap", "shared",
                       "private", "mapped_by"))
    m = Memory(name=r.name(d, where, names), type=r.str(d, "type", where, MEMORY_TYPES, required=True),
               size=0)
    page = r.str(d, "page", where, tuple(PAGE_SIZES), "2M" if m.type == "hugetlb-memfd" else "4K")
    m.page = PAGE_SIZES[page]
    if m.type in ("anon", "memfd") and m.huge:
        r.fail(where + ".page", "%s memory is 4K pages; use hugetlb-memfd" % m.type)
    if m.type == "hugetlb-memfd" and not m.huge:
        r.fail(where + ".page", "hugetlb-memfd needs page = \"2M\" or \"1G\"")
    m.size = r.size(d, "size", where, required=True, align=m.page)
    if m.size == 0:
        r.fail(where + ".size", "must be > 0")
    m.process = r.str(d, "process", where, default=sc.processes[0].name)
    _known(r, sc, where + ".process", m.process, "process")
    m.vm = r.str(d, "vm", where)
    if m.vm is not None:
        _known(r, sc, where + ".vm", m.vm, "vm")
    m.mmap = r.bool(d, "mmap", where, True)
    m.shared = r.bool(d, "shared", where, True)
    if m.type == "guest_memfd":
        vms = [v for v in sc.vms if v.process == m.process]
        if m.vm is None and len(vms) == 1:
            m.vm = vms[0].name
        if m.vm is None:
            r.fail(where + ".vm", "a guest_memfd is created on a VM of process %r: name it"
                   % m.process)
        if sc.vm(m.vm).type == "default":
            r.fail(where + ".vm", "guest_memfd needs a vm of type \"sw-protected\"")
    elif m.type == "anon" and not m.mmap:
        r.fail(where + ".mmap", "anonymous memory exists only as a mapping")
    priv = d.get("private", [])
    if not isinstance(priv, list):
        r.fail(where + ".private", "expected a list of [offset, length]")
    for rng in priv:
        if m.type != "guest_memfd":
            r.fail(where + ".private", "only guest_memfd has private memory")
        if not (isinstance(rng, list) and len(rng) == 2):
            r.fail(where + ".private", "expected [offset, length] pairs, got %r" % (rng,))
        off, ln = parse_size(rng[0]), parse_size(rng[1])
        if off is None or ln is None or off % PAGE or ln % PAGE or off + ln > m.size or ln == 0:
            r.fail(where + ".private", "bad range %r: page-aligned, inside the memory" % (rng,))
        m.private.append((off, ln))
    mb = d.get("mapped_by", [m.process] if m.mmap else [])
    if not isinstance(mb, list) or not all(isinstance(x, str) for x in mb):
        r.fail(where + ".mapped_by", "expected a list of process names")
    for x in mb:
        _known(r, sc, where + ".mapped_by", x, "process")
    if mb and not m.mmap:
        r.fail(where + ".mapped_by", "memory %r has mmap = false" % m.name)
    m.mapped_by = mb
    return m


_STEP_KEYS = ("who", "do", "memory", "offset", "length", "gpa", "vm", "error", "to", "seconds",
              "data", "label")


def _step(r: _Reader, sc: Scenario, d: dict, i: int, lines: _Lines) -> Step:
    where = "step[%d]" % i
    r.table(d, where, _STEP_KEYS)
    do = r.str(d, "do", where, VERBS, required=True)
    st = Step(index=i, line=lines.line(where), who=r.str(d, "who", where), do=do,
              memory=r.str(d, "memory", where), vm=r.str(d, "vm", where),
              error=r.str(d, "error", where, ERRORS), to=r.str(d, "to", where, ("private", "shared")),
              label=r.str(d, "label", where))
    actors = sc.actors()
    if st.who is not None and st.who != "host" and st.who not in actors:
        r.fail(where + ".who", "no thread named %r (have: host, %s)" % (st.who, ", ".join(actors)))
    if st.memory is not None:
        _known(r, sc, where + ".memory", st.memory, "memory")
    if st.vm is not None:
        _known(r, sc, where + ".vm", st.vm, "vm")
    st.offset = r.size(d, "offset", where, 0)
    st.length = r.size(d, "length", where)
    st.gpa = r.size(d, "gpa", where)
    sec = d.get("seconds", 0.0)
    if not isinstance(sec, int | float) or isinstance(sec, bool) or not 0 <= sec <= 10:
        r.fail(where + ".seconds", "expected 0..10 seconds, got %r" % (sec,))
    st.seconds = float(sec)
    data = d.get("data", 0x5A)
    if not isinstance(data, int) or isinstance(data, bool) or not 0 <= data <= 255:
        r.fail(where + ".data", "expected a byte value 0..255, got %r" % (data,))
    st.data = data
    vcpu = sc.vcpu_owner(st.who) if st.who else None
    needs_target = do in ("read", "write", "touch", "pread", "emulate", "kvm-map-read", "vhost-copy",
                          "inject", "convert", "punch")
    if needs_target and st.memory is None and st.gpa is None:
        r.fail(where, "'%s' needs memory (+ offset) or gpa" % do)
    if st.gpa is not None:
        if st.memory is not None:
            r.fail(where + ".gpa", "give memory + offset or gpa, not both")
        vm = sc.vm(st.vm) if st.vm else vcpu or (sc.vms[0] if len(sc.vms) == 1 else None)
        if vm is None:
            r.fail(where + ".vm", "which vm's gpa? name it")
        st.vm = vm.name
        hit = next(((s, st.gpa - s.gpa) for s in vm.slots if s.gpa <= st.gpa < s.gpa + s.size), None)
        if hit is None:
            r.fail(where + ".gpa", "%#x is in no memslot of vm %r" % (st.gpa, vm.name))
        st.memory, st.offset = hit[0].memory, hit[0].offset + hit[1]
    if st.memory is not None:
        m = sc.memory(st.memory)
        if st.offset >= m.size or st.offset + (st.length or 1) > m.size:
            r.fail(where + ".offset", "%#x (+%#x) is past the end of memory %r (%#x)"
                   % (st.offset, st.length or 0, m.name, m.size))
    _check_verb(r, sc, st, where, vcpu)
    return st


def _check_verb(r: _Reader, sc: Scenario, st: Step, where: str, vcpu) -> None:
    do, m = st.do, sc.memory(st.memory) if st.memory else None
    host_thread = st.who is not None and st.who != "host" and vcpu is None
    if do in ("read", "write", "touch"):
        if st.who in (None, "host"):
            r.fail(where + ".who", "'%s' is done by a thread or a vCPU" % do)
        if vcpu is not None:
            if not any(s.memory == m.name for s in vcpu.slots):
                r.fail(where + ".memory", "memory %r is in no memslot of %s's vm" % (m.name, st.who))
        elif st.who.split(".")[0] not in m.mapped_by:
            r.fail(where + ".memory", "process %r does not map memory %r (mapped_by)"
                   % (st.who.split(".")[0], m.name))
    elif do == "inject":
        if st.error is None:
            r.fail(where, "'inject' needs error = deferred | latent | madvise")
        if st.error == "madvise":
            if not host_thread:
                r.fail(where + ".who", "MADV_HWPOISON is done by a process's thread")
            if st.who.split(".")[0] not in m.mapped_by:
                r.fail(where + ".memory", "process %r does not map memory %r"
                       % (st.who.split(".")[0], m.name))
        elif st.who not in (None, "host"):
            r.fail(where + ".who", "a %s error is injected by the host" % st.error)
    elif do in ("emulate", "kvm-map-read"):
        if vcpu is None:
            r.fail(where + ".who", "'%s' is KVM reading guest memory for a vCPU: name one" % do)
        if not any(s.memory == m.name for s in vcpu.slots):
            r.fail(where + ".memory", "memory %r is in no memslot of %s's vm" % (m.name, st.who))
    elif do == "vhost-copy":
        if not host_thread or st.who.split(".")[0] not in m.mapped_by:
            r.fail(where + ".who", "a vhost worker copies from a process that maps %r" % m.name)
    elif do == "pread":
        if not host_thread:
            r.fail(where + ".who", "read(2) is done by a process's thread")
        if m.type == "anon":
            r.fail(where + ".memory", "anonymous memory has no file to read(2)")
    elif do in ("convert", "punch"):
        if m.type != "guest_memfd" and do == "convert":
            r.fail(where + ".memory", "only guest_memfd converts")
        if do == "convert" and st.to is None:
            r.fail(where, "'convert' needs to = private | shared")
        if st.length is None or st.length % PAGE or st.offset % PAGE:
            r.fail(where + ".length", "'%s' needs a page-aligned offset and length" % do)
        if not host_thread:
            r.fail(where + ".who", "'%s' is done by a process's thread" % do)
    elif do == "idle" and st.who not in (None, "host") and vcpu is None and not host_thread:
        r.fail(where + ".who", "unknown thread")


def _expect(r: _Reader, sc: Scenario, d) -> None:
    if not isinstance(d, dict):
        r.fail("expect", "expected [expect.<policy>] tables")
    for pol, vals in d.items():
        where = "expect.%s" % pol
        r.table(vals, where, MEASURED)
        sc.expect[pol] = dict(vals)
