"""`emu demo`: a QEMU-shaped process on guest_memfd meets memory errors.

A private supervisor with the embedded defaults; a QEMU-like process (main
thread PR_MCE_KILL_EARLY, two vCPU threads LATE running guest programs) with
2 MiB of guest RAM in a guest_memfd (MMAP | INIT_SHARED), one page converted
to private.  Four errors:
 1. patrol scrub finds an error on a shared page vcpu0 dirtied (deferred: AO to
    main, QEMU injects an AO #MC into the guest);
 2. vcpu1's guest consumes a latent error on a dirty shared page (machine check
    in guest mode: SIGBUS AR to vcpu1, QEMU injects an AR #MC);
 3. an error on the private page: KVM_RUN fails with EHWPOISON;
 4. vcpu0's guest consumes a latent error on a shared page QEMU never mapped.
The timeline merges the kernel's trace with what each QEMU thread did.
"""
from __future__ import annotations

import json
import os
import signal
from multiprocessing.connection import Connection

from . import records
from . import uapi as u
from .user import start

PAGE = 4096
GPA_A, GPA_B, GPA_C, GPA_P = 0x10000, 0x20000, 0x30000, 0x100000


def _qemu_process(host, w: Connection) -> None:
    """Runs in a child: the QEMU-shaped process (it may die of SIGBUS)."""
    from workers.qemu_like import QemuLike

    q = QemuLike(host, ram_size=2 << 20, nvcpus=2, recover=True)
    j = q.journal
    tids = {q.me.tid: "main"}
    for i, (th, _) in enumerate(q.vcpus):
        tids[th.pid] = "vcpu%d" % i
    w.send([("tids", tids), ("hva", q.ram.hva)])

    def flush():
        w.send(list(j))
        j.clear()

    def pfn_of(gpa):
        return q.ram.vm.gpa_to_pfn(gpa)["pfn"]

    q.vcpu(0, "write", GPA_A, data=b"\xaa" * PAGE)
    q.vcpu(1, "write", GPA_B, data=b"\xbb" * PAGE)
    q.vcpu(0, "read", GPA_C, n=8)
    q.vcpu(1, "write", GPA_P, data=b"\xcc" * 64, private=True)
    j.add("main", "QEMU reads guest pages %#x and %#x through its mapping (device emulation)"
          % (GPA_A, GPA_B))
    q.me.read(q.ram.hva + GPA_A, 8)
    q.me.read(q.ram.hva + GPA_B, 8)
    flush()

    j.add("host", "patrol scrub finds an uncorrected error in pfn %#x (GPA %#x, shared, "
          "mapped by QEMU): deferred memory_failure()" % (pfn_of(GPA_A), GPA_A))
    host.hw_detect(pfn_of(GPA_A))
    for _ in range(200):                       # the AO reaches main asynchronously
        if q.pending_ao is not None:
            break
        q.me.idle(0.01)
    q.deliver_pending_ao()
    flush()

    j.add("host", "latent error in pfn %#x (GPA %#x, shared, mapped by QEMU); vcpu1's guest "
          "reads it" % (pfn_of(GPA_B), GPA_B))
    host.hw_poison(pfn_of(GPA_B))
    q.vcpu(1, "read", GPA_B + 0x40, n=8)
    flush()

    j.add("host", "patrol scrub finds an error in pfn %#x (GPA %#x, private)"
          % (pfn_of(GPA_P), GPA_P))
    host.hw_detect(pfn_of(GPA_P))
    q.vcpu(1, "read", GPA_P, n=8, private=True)
    flush()

    j.add("host", "latent error in pfn %#x (GPA %#x, shared, never mapped by QEMU); vcpu0's "
          "guest reads it" % (pfn_of(GPA_C), GPA_C))
    host.hw_poison(pfn_of(GPA_C))
    flush()
    q.vcpu(0, "read", GPA_C + 0x8, n=8)
    flush()
    q.stop()
    w.send([("done", None)])


SIGNAME = {u.BUS_MCEERR_AO: "BUS_MCEERR_AO", u.BUS_MCEERR_AR: "BUS_MCEERR_AR",
           u.BUS_ADRERR: "BUS_ADRERR", u.SI_KERNEL: "SI_KERNEL"}


def run_demo(policy: str | None = None, as_json: bool = False) -> int:
    with start(policy=policy, ram="64M") as host:
        pid, r = records.fork(lambda w: _qemu_process(host, w))
        entries, meta = [], {}
        for batch in records.receive(r):
            for item in batch:
                if isinstance(item[0], str):
                    meta[item[0]] = item[1]
                else:
                    entries.append(item)
        _, status = os.waitpid(pid, 0)
        exitcode = os.waitstatus_to_exitcode(status)
        events = host.events()
        dmesg = host.dmesg()
        stats = host.mf_stats()
        hc = host.meminfo()["HardwareCorrupted"]
        pol = host.policy()["name"]
    tids = meta.get("tids", {})
    timeline = list(entries)
    for ev in events:
        text = _describe(ev, tids)
        if text:
            timeline.append((ev["ts_ns"], "kernel", text))
    timeline.sort(key=lambda e: e[0])
    outcome = ("qemu exited normally" if exitcode == 0 else
               "qemu was killed by %s" % signal.Signals(-exitcode).name if exitcode < 0 else
               "qemu exited with status %d" % exitcode)
    if as_json:
        print(json.dumps({"policy": pol, "timeline": [
            {"t_ms": (t - timeline[0][0]) / 1e6, "who": who, "what": what}
            for t, who, what in timeline], "outcome": outcome, "mf_stats": stats,
            "HardwareCorrupted_kB": hc, "dmesg": dmesg}, indent=2))
        return 0
    print("gmem-emu demo: policy %s, 64 MiB of emulated RAM" % pol)
    names = ", ".join("%s tid %s" % (n, t) for t, n in sorted(tids.items(), key=lambda x: x[1]))
    print("QEMU-shaped process: %s; main is PR_MCE_KILL_EARLY, the vCPUs LATE" % names)
    print("guest RAM: 2 MiB guest_memfd (MMAP|INIT_SHARED) at hva %#x = GPA 0, "
          "GPA %#x converted to private\n" % (meta.get("hva", 0), GPA_P))
    t0 = timeline[0][0] if timeline else 0
    for t, who, what in timeline:
        print("%9.3f ms  %-7s %s" % ((t - t0) / 1e6, who, what))
    print("\n%s." % outcome)
    print("memory_failure stats: %s; HardwareCorrupted: %d kB" %
          (", ".join("%s %d" % kv for kv in stats.items()), hc))
    print("\nkernel log:")
    for line in dmesg[1:]:
        print("  " + line)
    return 0


def _describe(ev: dict, tids: dict) -> str | None:
    name = lambda tid: "%s(%s)" % (tids.get(tid, tids.get(str(tid), "tid")), tid)  # noqa: E731
    t = ev["type"]
    if t == "memory_failure":
        who = (" on behalf of %s" % name(ev["tid"])) if ev.get("tid") else ""
        return "memory_failure(%#x, flags %#x)%s" % (ev["pfn"], ev["flags"], who)
    if t == "mce":
        return "machine check: %s consumed poison in pfn %#x at %#x" % (
            name(ev["tid"]), ev["pfn"], ev["addr"])
    if t == "signal":
        return "SIGBUS %s to %s addr %#x lsb %d  [%s]" % (
            SIGNAME.get(ev["code"], ev["code"]), name(ev["tid"]), ev["addr"], ev["lsb"], ev["why"])
    if t == "signal_dropped":
        return "SIGBUS %s to %s dropped: %s (SIGBUS does not queue)  [%s]" % (
            SIGNAME.get(ev["code"], ev["code"]), name(ev["tid"]), ev["reason"], ev["why"])
    if t == "mf_result":
        return "%#x: recovery action for %s: %s" % (ev["pfn"], ev["page"], ev["result"])
    if t == "unmap":
        return "unmapped %#x%s" % (ev["addr"], " (hwpoison entry)" if ev.get("hwpoison") else "")
    return None
