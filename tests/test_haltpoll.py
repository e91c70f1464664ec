"""Halt polling's guard (runnable tasks vs CPUs, from /proc/loadavg) and the
host's event window that benchmarks and tools poll with `since`."""
import os

import emu
import emu.haltpoll as hp
from emu import uapi as u


def test_others_waiting_counts_runnable_tasks_against_cpus(monkeypatch):
    monkeypatch.setattr(hp, "_ncpus", 0)           # we are runnable ourselves
    assert hp.others_waiting()
    monkeypatch.setattr(hp, "_ncpus", 1 << 20)
    assert not hp.others_waiting()


def test_others_waiting_without_proc_does_not_poll(monkeypatch):
    def refuse(*a, **kw):
        raise FileNotFoundError(2, "no /proc")

    monkeypatch.setattr(hp, "_fd", -1)
    monkeypatch.setattr(hp.os, "open", refuse)
    assert hp.others_waiting()


def test_others_waiting_survives_its_fd_being_closed():
    hp.others_waiting()
    os.close(hp._fd)                               # a worker closed every fd it had
    assert hp.others_waiting()                     # no polling this once, no error
    assert hp._fd == -1
    hp.others_waiting()                            # then it reopens
    assert hp._fd >= 0


def test_events_since_is_a_window(host):
    me = emu.attach(host, name="t")
    a = me.mmap(0, 4 * 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"x")
    me.madvise(a, 4096, u.MADV_DONTNEED)
    every = host.events()
    seqs = [e["seq"] for e in every]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    last = seqs[-1]
    assert host.events(since=last) == []
    assert [e["seq"] for e in host.events(since=last - 2)] == [last - 1, last]
    assert host.events(since=-5) == every
    assert host.events(since=1 << 40) == []
