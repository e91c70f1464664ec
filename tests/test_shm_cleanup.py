"""shm.cleanup() (run by every supervisor start and `emu cleanup`) races with other
supervisors starting and stopping: an entry listed a moment ago may be gone."""
import os

from emu import shm


def test_cleanup_skips_entries_that_vanish_meanwhile(monkeypatch):
    gone = "emu-999999999-core"                   # listed, then unlinked by someone else
    real_listdir = os.listdir

    def listdir(path):
        names = real_listdir(path)
        return names + [gone] if path == "/dev/shm" else names

    monkeypatch.setattr(os, "listdir", listdir)
    assert "/dev/shm/" + gone not in shm.cleanup()


def test_concurrent_starts_all_boot():
    """Supervisors started at once from several processes all boot (each start's
    cleanup sees the others' segments appear and stale names vanish)."""
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                import emu

                for _ in range(3):
                    emu.start(ram="64M").close()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids] == [0] * 4
