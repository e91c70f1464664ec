"""Run a scenario on a private supervisor and read its outcome from the machine.

One run: start the emulated machine, build the scenario's processes, threads,
memory and VMs, play the steps in order (each by the thread it names), then probe
(does guest_memfd still work for the guest, does another process still reach the
bad memory) and tear everything down.  Snapshots of the page tables (smaps),
stage-2 (KVM's pages_4k/2m/1g), kpageflags and meminfo are taken just before the
first error is injected, at the end of the steps, and after the processes exited,
and the outcome is computed from them and from what each thread saw.  Nothing in
the outcome is derived from the policy's name.
"""
from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from multiprocessing.connection import Connection

from workers.models import errname

from .. import records
from .. import uapi as u
from .actors import MainActor, _inherited
from .spec import PAGE, Scenario

KPF_HWPOISON = 1 << u.KPF_HWPOISON
STEP_TIMEOUT = 30                        # seconds a thread may take over one step


class Run:
    """The runner's side of one run (in its own process: see `run`)."""

    def __init__(self, sc: Scenario, host, sock_path: str, srv: socket.socket):
        self.sc, self.host, self.path, self.srv = sc, host, sock_path, srv
        self.conns: dict[str, Connection] = {}
        self.tids: dict[int, str] = {}
        self.dead: dict[str, str] = {}          # actor -> how it ended
        self.journal: list = []
        self.signals: list = []
        self.exits: dict[str, list] = {}
        self.words: dict[str, str] = {}
        self.steps: list = []
        self.bad: list = []                      # (memory, offset) errors were injected at
        self.snaps: dict[str, dict] = {}
        self.series: list[dict] = []             # mappings after each step from the first error
        self.root_pid = 0
        self.t_end = None                        # the steps are over: probes from here
        self.panicked = None                     # the panic's reason, once the machine stopped

    # ---- talking to threads
    def accept(self, name: str) -> None:
        self.srv.settimeout(30)
        try:
            s, _ = self.srv.accept()
        except TimeoutError:
            raise SetupError("%s: did not start within 30 s" % name) from None
        conn = Connection(s.detach())
        hello = conn.recv() if conn.poll(30) else {}
        if hello.get("name") != name:
            conn.close()
            raise SetupError("%s: did not start (got %r)" % (name, hello))
        self.conns[name] = conn
        self.tids[hello["tid"]] = name

    def ask(self, who: str, op: str, **args):
        """One request to a thread; None-ish "dead" if it is (or dies) gone."""
        conn = self.conns.get(who)
        if conn is None:
            return "dead"
        try:
            conn.send(dict(args, op=op))
            while True:
                if not conn.poll(STEP_TIMEOUT):
                    return self._hung(who)
                rep = conn.recv()
                self._take(who, rep)
                if not rep.get("async"):
                    break
        except (EOFError, OSError):
            self._gone(who)
            return "died"
        for req in rep.get("requests", ()):
            self._request(req)
        return rep["result"]

    def _hung(self, who: str) -> str:
        """A thread that does not answer within STEP_TIMEOUT (a guest looping on
        machine checks, say) is killed, as a watchdog would."""
        tid = next((t for t, n in self.tids.items() if n == who), None)
        if tid is not None:
            try:
                os.kill(tid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._gone(who)
        return "no answer in %ds: killed" % STEP_TIMEOUT

    def _take(self, who: str, rep: dict) -> None:
        self.journal += rep.get("journal", [])
        self.signals += rep.get("signals", [])
        self.exits.setdefault(who, []).extend(rep.get("exits", []))
        if rep.get("words"):
            self.words[who] = rep["words"]

    def _gone(self, who: str) -> None:
        conn = self.conns.pop(who, None)
        if conn is not None:
            try:
                while conn.poll(5):               # its last words, if it sent any
                    self._take(who, conn.recv())
            except (EOFError, OSError):
                pass
            conn.close()
        self.dead[who] = "dead"
        # a death by signal takes the thread group: its other threads go too
        proc = who.split(".")[0]
        if proc in [p.name for p in self.sc.processes]:
            for other in list(self.conns):
                if self._process_of(other) == proc:
                    self._gone(other)

    def _process_of(self, actor: str) -> str:
        vm = self.sc.vcpu_owner(actor)
        return vm.process if vm else actor.split(".")[0]

    def _request(self, req) -> None:
        if req[0] == "inject_mce":                # run_on_cpu(first_cpu, ...)
            _, vm, code, gpa = req
            first = next((v for v in self.sc.vm(vm).vcpus if v in self.conns), None)
            if first:
                self.ask(first, "inject_mce", code=code, gpa=gpa)

    def poll(self) -> None:
        """Let every live thread hand over what arrived asynchronously (AO signals
        and what its handler asked for)."""
        for who in list(self.conns):
            self.ask(who, "poll")

    # ---- building the machine
    def setup(self) -> None:
        sc = self.sc
        root = sc.processes[0]
        self.root_pid = _fork_root(self)
        self.accept(root.name)
        self.ask_ok(root.name, "init")
        for p in sc.processes[1:]:
            parent = p.fork_from or root.name
            self.ask_ok(parent, "spawn", kind="fork", name=p.name)
            self.accept(p.name)
            self.ask_ok(p.name, "init")
        for p in sc.processes:
            for t in p.threads:
                name = "%s.%s" % (p.name, t.name)
                self.ask_ok(p.name, "spawn", kind="thread", name=name, arg=t.mce_kill)
                self.accept(name)
        for vm in sc.vms:
            for v in vm.vcpus:
                self.ask_ok(vm.process, "spawn", kind="vcpu", name=v, arg=vm.name)
                self.accept(v)

    def ask_ok(self, who: str, op: str, **args):
        r = self.ask(who, op, **args)
        if isinstance(r, str) and (r.startswith("error") or r in ("died", "dead")):
            raise SetupError("%s: %s: %s" % (who, op, r))
        return r

    # ---- the steps
    def play(self) -> None:
        for st in self.sc.steps:
            if self.panicked:
                break                                # the machine has stopped
            if st.do == "inject" and "before" not in self.snaps:
                self.snaps["before"] = self.snapshot()
            t0, dead = time.monotonic_ns(), len(self.dead)
            result = self.step(st)
            self.steps.append({"index": st.index, "line": st.line, "who": st.who or "host",
                               "do": st.do, "what": _what(st), "result": result,
                               "label": st.label, "t": t0})
            self.panicked = self.host.panicked()
            if self.panicked:
                continue
            self.poll()
            if len(self.dead) > dead:
                settle(self.host)                    # a dead process's teardown is not memory failure's
            if "before" in self.snaps:               # what each step unmapped, counted
                self.series.append(self.snapshot(full=False))
        self.snaps.setdefault("before", self.snapshot())

    def step(self, st):
        h = self.host
        if st.do == "measure":
            self.snaps[st.label or "step%d" % st.index] = self.snapshot()
            return "measured"
        if st.do == "idle":
            if st.who in (None, "host"):
                time.sleep(st.seconds)
                return "ok"
            return self.ask(st.who, "idle", seconds=st.seconds)
        if st.do == "inject":
            self.bad.append((st.memory, st.offset & ~(PAGE - 1)))
            if st.error == "madvise":
                return self.ask(st.who, "madvise", memory=st.memory, offset=st.offset)
            owner = self.sc.memory(st.memory).process
            pfn = self.ask(owner, "pfn", memory=st.memory, offset=st.offset)
            if not isinstance(pfn, int):
                return "not populated: no frame to fail (%s)" % pfn
            self.journal.append((time.monotonic_ns(), "host", "%s error in pfn %#x (%s+%#x)" % (
                st.error, pfn, st.memory, st.offset)))
            if st.error == "latent":
                h.hw_poison(pfn)
                return "pfn %#x" % pfn
            r = h.hw_detect(pfn)
            return "pfn %#x: memory_failure() = %s" % (pfn, _ret(r))
        args = {"memory": st.memory, "offset": st.offset, "length": st.length, "data": st.data,
                "to": st.to}
        return self.ask(st.who, st.do, **args)

    # ---- reading the machine
    def snapshot(self, full: bool = True) -> dict:
        """What the machine shows now: each process's mapped pages of the scenario's
        memory, each VM's stage-2, kpageflags' HWPoison frames, meminfo, #MCs."""
        h = self.host
        st = h.status()
        inos = {f["ino"] for f in st["files"] if f["kind"] in ("guest_memfd", "shmem", "hugetlbfs")}
        host_pages = set()
        for p in st["processes"]:
            try:
                vmas = h.smaps(p["tgid"])
            except OSError:
                continue
            for v in vmas:
                if v["ino"] in inos or not v["ino"]:
                    for addr, size, _lvl in v["present"]:
                        host_pages.update((p["tgid"], a) for a in range(addr, addr + size, PAGE))
        s2 = set()
        owners = {p["tgid"] for p in st["processes"]}
        for vm in h.kvm_stat():
            owners.add(vm["name"])
            for gpa, size, _lvl in vm["present"]:
                s2.update((vm["name"], a) for a in range(gpa, gpa + size, PAGE))
        if not full:
            return {"host": host_pages, "s2": s2, "owners": owners}
        nframes = h.meminfo()["MemTotal"] // 4
        flags = h.kpageflags(0, nframes)
        hwpoison = sum(1 for f in flags if f & KPF_HWPOISON) * PAGE
        mces = sum(1 for ev in h.events() if ev["type"] == "mce")
        return {"host": host_pages, "s2": s2, "owners": owners, "hwpoison": hwpoison, "meminfo": h.meminfo(),
                "mces": mces, "panic": h.panicked()}

    # ---- probes
    def probe(self) -> tuple:
        usable = None
        sc = self.sc
        for mem in sc.memories:
            if mem.type != "guest_memfd" or mem.vm is None:
                continue
            vm = sc.vm(mem.vm)
            vcpu = next((v for v in vm.vcpus if v in self.conns), None)
            slot = next((s for s in vm.slots if s.memory == mem.name), None)
            if slot is None:
                continue
            if vcpu is None:
                usable = "- (no vCPU left to try it)"
                continue
            bad = {o for m, o in self.bad if m == mem.name}
            gpas = []
            for folio in range(slot.offset, slot.offset + slot.size, mem.page):
                off = next((o for o in range(folio, folio + min(mem.page, 64 * PAGE), PAGE)
                            if o not in bad), None)
                if off is not None:
                    gpas.append(slot.gpa + off - slot.offset)
            res = self.ask(vcpu, "probe", gpas=gpas)
            if not isinstance(res, list):
                usable = "unknown: %s" % res
                continue
            ok = sum(1 for r in res if r == "ok")
            usable = "yes" if ok == len(res) else "no" if ok == 0 else "partly (%d of %d %s ranges)" % (
                ok, len(res), _size(mem.page))
        reach = {}
        for mem_name, off in dict.fromkeys(self.bad):
            mem = sc.memory(mem_name)
            for p in sc.processes:
                if p.vmm != "none" or p.name not in mem.mapped_by:
                    continue
                if p.name not in self.conns:
                    reach["%s %s+%#x" % (p.name, mem_name, off)] = "dead"
                    continue
                tid = next(t for t, n in self.tids.items() if n == p.name)
                before = sum(1 for ev in self.host.events() if ev["type"] == "mce" and ev["tid"] == tid)
                r = self.ask(p.name, "read", memory=mem_name, offset=off)
                mce = sum(1 for ev in self.host.events() if ev["type"] == "mce" and ev["tid"] == tid)
                reach["%s %s+%#x" % (p.name, mem_name, off)] = (
                    "died" if r in ("died", "dead") else "machine check" if mce > before else
                    "reads it" if r == "ok" else r)
        return usable, reach

    def teardown(self) -> None:
        order = [v for vm in self.sc.vms for v in vm.vcpus]
        order += ["%s.%s" % (p.name, t.name) for p in self.sc.processes for t in p.threads]
        order += [p.name for p in reversed(self.sc.processes)]
        for who in order:
            if who in self.conns:
                self.ask(who, "exit")
                conn = self.conns.pop(who, None)
                if conn is not None:
                    conn.close()
        _, status = os.waitpid(self.root_pid, 0)
        self.root_status = os.waitstatus_to_exitcode(status)
        settle(self.host)


class SetupError(RuntimeError):
    """The scenario could not be built on this machine (the emulated kernel refused)."""


def _fork_root(run: Run) -> int:
    """The scenario's first process, in a child of the runner."""
    import emu

    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            run.srv.close()
            name = run.sc.processes[0].name
            me = emu.attach(run.host, name=name)
            a = MainActor(me, name, run.sc, name, run.path)
            from .actors import connect

            a.serve(connect(run.path, {"name": name, "tid": me.tid}))
            me.exit()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def settle(host, timeout: float = 10.0) -> None:
    """Until two snapshots of the machine's status agree: the supervisor tears an
    exited process down (and frees its files) after the process is gone."""
    end = time.monotonic() + timeout
    prev = host.status()
    while time.monotonic() < end:
        time.sleep(0.05)
        cur = host.status()
        if cur == prev:
            return
        prev = cur


def _size(n: int) -> str:
    return {4096: "4K", 2 << 20: "2M", 1 << 30: "1G"}.get(n, str(n))


def _ret(r: int) -> str:
    return "%d" % r if r >= 0 else "-" + errname(-r)


def _what(st) -> str:
    if st.do == "measure":
        return "measure %s" % (st.label or "")
    if st.do == "idle":
        return "idle %gs" % st.seconds
    where = "%s+%#x" % (st.memory, st.offset) if st.memory else ""
    if st.length:
        where += "..+%#x" % (st.offset + st.length)
    if st.do == "inject":
        return "%s error at %s" % (st.error, where)
    if st.do == "convert":
        return "convert %s to %s" % (where, st.to)
    return "%s %s" % (st.do, where)


def run(sc: Scenario, policy: str | None = None, sysctl: dict | None = None,
        trace: str | None = None) -> dict:
    """One run of `sc` under `policy` (default: the machine's default) in a child
    process of its own; returns the outcome (see `emu.scenario.outcome`)."""
    pid, r = records.fork(lambda w: w.send(_run_here(sc, policy, sysctl or {}, trace)))
    got = records.receive(r)
    _, status = os.waitpid(pid, 0)
    if got:
        return got[0]
    return {"scenario": sc.name, "policy": policy, "sysctl": sysctl or {},
            "error": "the run died (status %s)" % os.waitstatus_to_exitcode(status)}


def _run_here(sc: Scenario, policy, sysctl: dict, trace) -> dict:
    from .. import show
    from ..user import start
    from . import outcome

    sy = dict(sc.sysctl, **sysctl)
    out = {"scenario": sc.name, "policy": policy, "sysctl": sy, "error": None}
    d = tempfile.mkdtemp(prefix="emu-scenario-")
    path = os.path.join(d, "runner.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    try:
        with start(policy=policy, ram=sc.ram, hugepages=sc.hugepages or None, sysctl=sy) as host:
            out["policy"] = host.policy()["name"]
            run = Run(sc, host, path, srv)
            start_mi = host.meminfo()
            picture = None
            try:
                run.setup()
                run.play()
                run.snaps["end"] = run.snapshot()
                run.t_end = time.monotonic_ns()
                picture = show.snapshot_files(host)
                usable, reach = run.probe() if sc.probe and not run.panicked else (None, {})
            except SetupError as e:
                out["error"] = "setup: %s" % e
            finally:
                run.teardown()
            events, dmesg = host.events(), host.dmesg()
            if out["error"] is None:
                run.snaps["after"] = run.snapshot()
                out.update(outcome.measure(run, start_mi, usable, reach, events))
            out["timeline"] = outcome.timeline(run, events)
            out["picture"] = picture
            out["dmesg"] = dmesg
            if run.panicked and out["error"]:
                out["error"] += " (the machine panicked: %s)" % run.panicked
            if trace:
                outcome.write_trace(trace, events, run.tids)
    finally:
        srv.close()
        os.unlink(path)
        os.rmdir(d)
        for c in _inherited:
            c.close()
    out["expect"] = outcome.check(sc, out)
    return out
