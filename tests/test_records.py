"""emu.records: what a forked child sends arrives whole, even if it then dies."""
import os

from emu import records


def test_records_arrive_and_a_failing_child_exits_1():
    def child(w):
        w.send({"a": 1})
        w.send(list(range(100_000)))       # larger than a pipe buffer
        raise RuntimeError("the child fails after sending")

    pid, r = records.fork(child)
    got = records.receive(r)
    _, status = os.waitpid(pid, 0)
    assert got == [{"a": 1}, list(range(100_000))]
    assert os.waitstatus_to_exitcode(status) == 1


def test_a_child_that_sends_nothing_gives_no_records():
    pid, r = records.fork(lambda w: None)
    assert records.receive(r) == []
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
