"""`emu compare`: one scenario under several memory-failure policies, side by side.

The stock scenario: a QEMU-shaped process (main thread PR_MCE_KILL_EARLY, a vCPU
thread LATE) on a 4 MiB HugeTLB guest_memfd (two 2 MiB folios; the last MiB is
private), a second process mapping the shared range, a deferred error on a
dirty shared page, a consumed error in the guest on a private page, then the
guest touching the rest of the folios and the file.  Each policy runs on its
own private supervisor; the figures come from the kernel's trace, meminfo, kpageflags and
what each thread saw.
"""
from __future__ import annotations

import json
import os
import signal
from multiprocessing.connection import Connection

from . import records
from . import uapi as u
from .runtime import start

MB = 1 << 20
GPA = 1 << 32
SIZE = 4 * MB
FLAGS = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
         | u.GUESTMEM_HUGETLB_FLAG_2MB)
SHARED_BAD = 0x5000                  # deferred error: dirty, shared, folio 0
PRIVATE_BAD = 3 * MB + 0x2000        # consumed error: private, folio 1
TOUCH = [("same folio, shared", 2 * MB + 0x1000, None), ("same folio, private", 3 * MB + 0x10000, True),
         ("other folio", 0x40000, None)]
CODES = {u.BUS_MCEERR_AO: "AO", u.BUS_MCEERR_AR: "AR", u.SI_KERNEL: "SI_KERNEL",
         u.BUS_ADRERR: "ADRERR"}
ROWS = [
    ("signals", "signals (thread: si_code)"),
    ("exits", "KVM exits seen by the VMM"),
    ("host_unmapped", "unmapped from host (all processes)"),
    ("s2_unmapped", "zapped from stage-2"),
    ("offline", "memory taken offline"),
    ("pool_lost", "HugeTLB pages lost to the pool"),
    ("gmem_usable", "guest_memfd still usable"),
    ("mces", "machine checks consumed"),
    ("second_process", "second process reaching the bad page"),
    ("guest", "guest outcome"),
]


def _fmt_bytes(n: int) -> str:
    if n >= MB and n % MB == 0:
        return "%d MiB" % (n // MB)
    if n >= 1024:
        return "%d KiB" % (n // 1024)
    return "%d B" % n


def _vcpu(task, vm, w: int, shared_first: bool):
    """The vCPU thread: runs the guest, handles exits the way a simple VMM does."""
    task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_LATE)
    seen, exits = [], []
    emu_sigaction(lambda s, i: seen.append(("vcpu", CODES.get(i.si_code, i.si_code))))
    vc = vm.create_vcpu(0)

    def access(gpa, private, tries=3):
        def guest(g):
            v = yield g.read(GPA + gpa, 8, private)
            yield g.sync(v)

        vc.set_guest(guest)
        for _ in range(tries):
            try:
                vc.run()
                return "ok"
            except OSError as e:
                if e.errno == u.EINTR:
                    exits.append("EINTR")
                    continue
                mf = vc.kvm_run.memory_fault
                name = {u.EHWPOISON: "EHWPOISON", u.EFAULT: "EFAULT"}.get(e.errno, str(e.errno))
                exits.append("%s%s" % (name, " (private)" if mf.flags & u.KVM_MEMORY_EXIT_FLAG_PRIVATE
                                       else ""))
                return name
        return "retrying"

    results = {}
    # populate stage-2 (and dirty the pages) the guest uses
    for gpa, private in ((SHARED_BAD, None), (PRIVATE_BAD, True), (0x40000, None),
                         (2 * MB + 0x1000, None), (3 * MB + 0x10000, True)):
        access(gpa, private)
    os.write(w, b"p")
    os.read(READY_R[0], 1)                       # the host injected the errors
    results["consume"] = access(PRIVATE_BAD, True)
    for name, gpa, private in TOUCH:
        results[name] = access(gpa, private)
    return results, seen, exits


READY_R = [None]


def emu_sigaction(h):
    import emu

    emu.sigaction(signal.SIGBUS, h)


def run_scenario(policy: str) -> dict:
    """One run under `policy`; returns the table's column for it."""
    import emu

    with start(policy=policy, ram="256M", hugepages={"2M": 8}) as host:
        total0 = host.meminfo()["HugePages_Total"]
        sync = _Sync()
        pid, r = records.fork(lambda w: w.send(_qemu(emu, host, sync)))
        heads = sync.parent_wait()                 # the VM ran; the VMM still holds it
        running = _hwpoison_bytes(host, heads)
        sync.parent_release()
        out = (records.receive(r) or [{}])[0]
        _, status = os.waitpid(pid, 0)
        qemu_status = os.waitstatus_to_exitcode(status)
        _settle(host)                              # the exited VMM's teardown is done
        events = host.events()
        mi = host.meminfo()
        after = _hwpoison_bytes(host, heads)
    return _column(policy, out, events, mi, total0, qemu_status, (running, after))


def _settle(host, timeout: float = 10.0) -> None:
    """Wait until two snapshots of the machine's status agree: the supervisor tears
    an exited process down (and frees its files) after the process is gone."""
    import time

    end = time.monotonic() + timeout
    prev = host.status()
    while time.monotonic() < end:
        time.sleep(0.05)
        cur = host.status()
        if cur == prev:
            return
        prev = cur


class _Sync:
    """Two pipes: the VMM says "measure now" with the guest_memfd's folio heads and
    waits until the supervisor's state has been read from outside."""

    def __init__(self):
        self.m_r, self.m_w = os.pipe()
        self.a_r, self.a_w = os.pipe()

    def child_wait(self, heads: list[int]) -> None:
        os.write(self.m_w, json.dumps(heads).encode() + b"\n")
        os.read(self.a_r, 1)

    def parent_wait(self) -> list[int] | None:
        os.close(self.m_w)                         # a VMM that dies gives EOF, not a hang
        os.close(self.a_r)
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(self.m_r, 4096)
            if not chunk:
                return None
            data += chunk
        return json.loads(data)

    def parent_release(self) -> None:
        os.write(self.a_w, b"g")
        os.close(self.a_w)
        os.close(self.m_r)


def _hwpoison_bytes(host, heads: list[int] | None) -> int | None:
    """Bytes of the guest_memfd's frames that /proc/kpageflags shows KPF_HWPOISON:
    what the kernel has taken offline (a flagged HugeTLB folio shows on every page)."""
    if heads is None:
        return None
    bit = 1 << u.KPF_HWPOISON
    return sum(4096 for h in heads for pfn in range(h, h + 512)
               if (host.kpageflags(pfn) or 0) & bit)


def _qemu(emu, host, sync: _Sync) -> dict:
    me = emu.attach(host, name="qemu")
    me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
    seen = []
    emu.sigaction(signal.SIGBUS, lambda s, i: seen.append(("main", CODES.get(i.si_code, i.si_code))))
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(SIZE, FLAGS)
    hva = me.mmap(0, SIZE, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, SIZE, hva, gfd, 0)
    me.write(hva, b"\x5a" * (2 * MB))                          # folio 0: dirty, host-mapped
    me.write(hva + 2 * MB, b"\x5b" * MB)                       # folio 1's shared half
    me.gmem_convert(gfd, 3 * MB, MB, private=True)
    tids = {me.tid: "main"}
    # the second process maps the shared range and touches the page that will fail
    c_r, c_w = os.pipe()
    d_r, d_w = os.pipe()

    class Unwind(Exception):
        pass

    def second(t):
        got = []

        def h(s, i):
            got.append(CODES.get(i.si_code, i.si_code))
            if i.si_code != u.BUS_MCEERR_AO:
                raise Unwind

        t.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_DEFAULT)
        emu.sigaction(signal.SIGBUS, h)
        t.read(hva + SHARED_BAD, 8)
        os.write(d_w, b"m")
        os.read(c_r, 1)
        try:
            t.read(hva + SHARED_BAD, 8)
            reach = "yes: reads it"
        except Unwind:
            reach = "SIGBUS %s" % got[-1]
        return reach, got

    ch = me.fork(second, name="second")
    os.read(d_r, 1)
    tids[ch.pid] = "second"
    p_r, p_w = os.pipe()
    READY_R[0], ready_w = os.pipe()
    th = me.clone(_vcpu, vm, p_w, True, name="vcpu0")
    tids[th.pid] = "vcpu0"
    os.read(p_r, 1)
    shared_pfn = vm.gpa_to_pfn(GPA + SHARED_BAD)["backing_pfn"]
    private_pfn = vm.gpa_to_pfn(GPA + PRIVATE_BAD)["backing_pfn"]
    heads = [vm.gpa_to_pfn(GPA + off)["backing_pfn"] & ~511 for off in (0, 2 * MB)]
    host.hw_detect(shared_pfn)
    me.idle(0.2)
    host.hw_poison(private_pfn)
    os.write(ready_w, b"g")
    vcpu_status = th.join(30)
    vcpu_res = th.result or ({}, [], [])
    os.write(c_w, b"t")
    second_status = ch.join(30)
    second_res = ch.result or ("died (%s)" % second_status, [])
    me.idle(0.1)
    sync.child_wait(heads)
    return {"tids": tids, "main_seen": seen, "vcpu_status": vcpu_status, "vcpu": vcpu_res,
            "second_status": second_status, "second": second_res}


def _column(policy: str, out: dict, events: list, mi: dict, total0: int, qemu_status,
            offline_bytes: tuple) -> dict:
    tids = {int(k): v for k, v in out.get("tids", {}).items()}
    sigs = []
    for ev in events:
        if ev["type"] == "signal":
            who = tids.get(ev["tid"], str(ev["tid"]))
            sigs.append("%s: %s lsb %d" % (who, CODES.get(ev["code"], ev["code"]), ev["lsb"]))
    host_unmapped = 0
    s2 = 0
    end = next((ev["seq"] for ev in events if ev["type"] == "task_exit"
                and tids.get(ev["tid"]) == "vcpu0"), None)
    for ev in events:
        if end is not None and ev["seq"] > end:
            break                                  # what the VM's teardown unmaps is not counted
        if ev["type"] == "unmap":
            host_unmapped += 2 * MB if ev.get("level", 1) > 1 else 4096
        elif ev["type"] == "unmap_file":
            host_unmapped = max(host_unmapped, SIZE)
        elif ev["type"] == "kvm_zap":
            s2 += ev["zapped"] * 4096
    mces = sum(1 for ev in events if ev["type"] == "mce")
    vres, _vseen, exits = out.get("vcpu", ({}, [], []))
    touched = [vres.get(name) for name, _g, _p in TOUCH]
    usable = "yes" if all(t == "ok" for t in touched) else (
        "no" if all(t != "ok" for t in touched) else
        "partly (%s)" % ", ".join("%s %s" % (n, "ok" if t == "ok" else "fails")
                                   for (n, _g, _p), t in zip(TOUCH, touched, strict=True)))
    # read from the machine: the guest_memfd frames kpageflags shows HWPoison, once
    # while the VMM still held the VM and once after it exited
    running, after = offline_bytes
    offline = "%s while running, %s after" % (
        "?" if running is None else _fmt_bytes(running), "?" if after is None else _fmt_bytes(after))
    consume = vres.get("consume")
    guest = {"ok": "the consuming access completed", "EHWPOISON": "EHWPOISON exit on the bad page",
             "retrying": "keeps taking machine checks", None: "vCPU died"}.get(consume, consume)
    if out.get("vcpu_status") not in (0, None):
        guest = "vCPU died (exit %s)" % out.get("vcpu_status")
    if qemu_status not in (0, None):
        guest += "; VMM exit %s" % qemu_status
    reach = out.get("second", ("?", []))[0]
    second_tid = next((t for t, n in tids.items() if n == "second"), None)
    if any(ev["type"] == "mce" and ev["tid"] == second_tid for ev in events):
        reach = "yes: consumes the poison (machine check)"
    elif reach.startswith("SIGBUS"):
        reach = "no: unmapped, %s on access" % reach
    return {
        "policy": policy,
        "signals": ", ".join(sigs) or "none",
        "exits": ", ".join(exits) or "none",
        "host_unmapped": _fmt_bytes(host_unmapped),
        "s2_unmapped": _fmt_bytes(s2),
        "offline": offline,
        "pool_lost": str(total0 - mi.get("HugePages_Free", 0)),
        "gmem_usable": usable,
        "mces": str(mces),
        "second_process": reach,
        "guest": guest,
    }


def _run_into(w: Connection, policy: str) -> None:
    try:
        col = run_scenario(policy)
    except BaseException as e:
        col = {"policy": policy, "error": "%s: %s" % (type(e).__name__, e)}
    w.send(col)


def compare(policies: list[str]) -> list[dict]:
    cols = []
    for p in policies:
        pid, r = records.fork(lambda w, p=p: _run_into(w, p))   # each run in its own process
        col = (records.receive(r) or [{"policy": p, "error": "the run died"}])[0]
        os.waitpid(pid, 0)
        cols.append(col)
    return cols


def render(cols: list[dict]) -> str:
    import textwrap

    width = 30
    lines = []
    head = "%-38s" % "" + "".join("%-*s" % (width + 2, c["policy"]) for c in cols)
    lines.append(head.rstrip())
    lines.append("-" * len(head.rstrip()))
    for key, label in ROWS:
        cells = [textwrap.wrap(c.get(key, c.get("error", "")) or "-", width) or ["-"] for c in cols]
        depth = max(len(x) for x in cells)
        for i in range(depth):
            row = "%-38s" % (label if i == 0 else "")
            row += "".join("%-*s" % (width + 2, x[i] if i < len(x) else "") for x in cells)
            lines.append(row.rstrip())
    return "\n".join(lines)


def main(policies: list[str] | None, as_json: bool) -> int:
    from .kernel.policies import PRESETS, load

    policies = policies or list(PRESETS)
    for p in policies:
        load(p)                                  # ValueError names a bad one
    cols = compare(policies)
    if as_json:
        print(json.dumps(cols, indent=2))
    else:
        print("emu compare: the stock scenario under %d policies\n" % len(cols))
        print(render(cols))
    return 0
