"""`emu trace --chrome`: a Trace Event Format file Perfetto opens.  Checked against
the format's document (docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h4I0nSsKchNAR7U):
every event has name, ph, pid, tid; all but metadata a ts in microseconds; "X" a
dur; "i" a scope s of g/p/t; "M" thread_name/process_name an args.name."""
import json
import signal

from checks import Stop, sigbus_recorder

import emu
from emu import uapi as u
from emu.trace import thread_names, to_chrome

PAGE = 4096


def _consume(task, addr):
    """A vCPU-like thread that loads from a page with a latent error."""
    got = sigbus_recorder()
    try:
        task.read(addr, 8)
    except Stop:
        pass
    return got


def _check_format(doc):
    for ev in doc["traceEvents"]:
        assert {"name", "ph", "pid", "tid"} <= set(ev), ev
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        if ev["ph"] == "M":
            assert ev["name"] in ("process_name", "thread_name", "thread_sort_index")
            if ev["name"] != "thread_sort_index":
                assert isinstance(ev["args"]["name"], str) and ev["args"]["name"]
            continue
        assert isinstance(ev["ts"], (int, float)) and ev["ts"] > 0
        assert ev["ph"] in ("X", "i"), ev
        if ev["ph"] == "X":
            assert isinstance(ev["dur"], (int, float)) and ev["dur"] >= 0
        else:
            assert ev["s"] in ("g", "p", "t")


def test_chrome_trace_tracks_instants_and_memory_failure_slices(host):
    me = emu.attach(host, name="qemu")
    host.sysctl("vm.memory_failure_early_kill", 1)
    me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
    got = []
    emu.sigaction(signal.SIGBUS, lambda s, i: got.append((i.si_code, i.si_addr)))
    fd = me.memfd_create("ram")
    me.ftruncate(fd, 2 * PAGE)
    a = me.mmap(0, 2 * PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
    me.write(a, b"\x11" * 8)
    me.write(a + PAGE, b"\x22" * 8)
    pfn0, pfn1 = me.pagemap(a).pfn, me.pagemap(a + PAGE).pfn

    host.hw_detect(pfn0)                         # deferred: memory_failure by the kernel
    me.idle(0.2)
    assert (u.BUS_MCEERR_AO, a) in got
    host.hw_poison(pfn1)                         # latent: consumed by a load on "vcpu0"
    th = me.clone(_consume, a + PAGE, name="vcpu0")
    assert th.join(15) == 0
    assert th.result == [(u.BUS_MCEERR_AR, a + PAGE, 12)]

    doc = json.loads(json.dumps(to_chrome(host.events(), thread_names(host.status()))))
    _check_format(doc)
    evs = doc["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    # one track per thread: exactly one thread_name per tid, for every tid with events
    assert len([e for e in evs if e["ph"] == "M" and e["name"] == "thread_name"]) == len(names)
    assert {e["tid"] for e in evs if e["ph"] != "M"} <= set(names)
    assert names[me.tid] == "qemu" and names[th.tid] == "vcpu0" and names[0] == "kernel"

    sigs = [e for e in evs if e["name"] == "signal"]
    assert all(e["ph"] == "i" and e["s"] == "t" for e in sigs)
    ao = next(e for e in sigs if e["args"]["code"] == u.BUS_MCEERR_AO)
    ar = next(e for e in sigs if e["args"]["code"] == u.BUS_MCEERR_AR)
    assert (ao["tid"], ar["tid"]) == (me.tid, th.tid)
    mce = next(e for e in evs if e["name"] == "mce")
    assert (mce["ph"], mce["s"], mce["tid"], mce["args"]["pfn"]) == ("i", "t", th.tid, hex(pfn1))

    slices = [e for e in evs if e["name"] == "memory_failure"]
    assert all(e["ph"] == "X" for e in slices)
    deferred = next(e for e in slices if e["args"]["pfn"] == hex(pfn0))
    consumed = next(e for e in slices if e["args"]["pfn"] == hex(pfn1))
    assert deferred["tid"] == 0 and consumed["tid"] == th.tid   # the kernel's own; on vcpu0's behalf
    assert "unfinished" not in deferred["args"] and "unfinished" not in consumed["args"]
    for sl, sig in ((deferred, ao), (consumed, ar)):
        assert sl["ts"] <= sig["ts"] <= sl["ts"] + sl["dur"], (sl, sig)
    assert mce["ts"] <= consumed["ts"]


def test_names_are_optional_and_unfinished_slices_close_at_the_end():
    evs = [{"type": "task_new", "tid": 7, "comm": "w", "seq": 1, "ts_ns": 1000},
           {"type": "memory_failure", "tid": 7, "pfn": 1, "flags": 0, "seq": 2, "ts_ns": 2000},
           {"type": "signal", "tid": 8, "code": 4, "seq": 3, "ts_ns": 5000}]
    doc = to_chrome(evs)
    _check_format(doc)
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert names == {0: "kernel", 7: "w", 8: "tid 8"}
    sl = next(e for e in doc["traceEvents"] if e["name"] == "memory_failure")
    assert (sl["ts"], sl["dur"], sl["args"]["unfinished"]) == (2.0, 3.0, True)
    given = to_chrome(evs, {"8": "vcpu"})["traceEvents"]
    assert {e["tid"]: e["args"]["name"] for e in given if e["name"] == "thread_name"}[8] == "vcpu"
