"""Supervisor and worker lifetimes: every test starts its own supervisor and leaves
nothing behind (process, /dev/shm/emu-<pid>-*, its socket)."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
from conftest import leftovers

import emu
from emu import shm
from emu import uapi as u

PAGE = 4096
RW = u.PROT_READ | u.PROT_WRITE
ANON = u.MAP_PRIVATE | u.MAP_ANONYMOUS


# ------------------------------------------------------------------ helpers
def shm_of(pid):
    return sorted("/dev/shm/" + e for e in os.listdir("/dev/shm") if e.startswith(f"emu-{pid}-"))


def sock_of(pid):
    return os.path.join(shm.runtime_dir(), f"priv-{pid}.sock")


def proc_alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def poll(pred, timeout=15.0, step=0.05):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(step)


def wait_gone(pid, timeout=15.0):
    poll(lambda: not leftovers(pid), timeout)
    return leftovers(pid)


def tgids(host):
    return {p["tgid"] for p in host.status()["processes"]}


def works(host, name="probe"):
    """A fresh emulated process can attach, map, write and read (in a forked child so
    the test process stays unattached where that matters)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            me = emu.attach(host, name=name)
            a = me.mmap(0, 4 * PAGE, RW, ANON)
            me.write(a + PAGE, b"still works")
            code = 0 if me.read(a + PAGE, 11) == b"still works" else 2
            me.exit()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# Subprocesses run outside the source tree so that they import the installed
# package (with its compiled core), not the checkout's emu/ directory.
NEUTRAL_CWD = tempfile.gettempdir()


def run_py(script, **kw):
    kw.setdefault("cwd", NEUTRAL_CWD)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# ------------------------------------------------------------------ (a) start / close
def test_start_close_leaves_nothing():
    h = emu.start(ram="64M")
    pid = h.private_pid
    assert proc_alive(pid)
    assert len(shm_of(pid)) == 2
    assert os.path.exists(h.path) and h.path == sock_of(pid)
    assert h.status()["processes"] == []
    h.close()
    assert wait_gone(pid) == []
    assert not os.path.exists(h.path)


def test_context_manager_leaves_nothing_with_workers():
    with emu.start(ram="64M") as h:
        pid = h.private_pid
        me = emu.attach(h, name="main")
        a = me.mmap(0, 16 * PAGE, RW, ANON)
        me.write(a, b"x" * 16 * PAGE)

        def child(t):
            t.idle(60)

        th = me.clone(child, name="sleeper")
        assert poll(lambda: any(len(p["threads"]) == 2 for p in h.status()["processes"]))
    assert wait_gone(pid) == []
    # the clone()d thread got ESHUTDOWN in its idle(), did not handle it, and exited
    # (not left running)
    assert th.join(15) == 1


def test_close_is_idempotent():
    h = emu.start(ram="64M")
    pid = h.private_pid
    h.close()
    h.close()
    assert wait_gone(pid) == []


# ------------------------------------------------------------------ (b) a worker SIGKILLed
def test_worker_sigkilled_mid_operation():
    h = emu.start(ram="64M")
    pid = h.private_pid
    try:
        me = emu.attach(h, name="parent")
        base = h.meminfo()["MemFree"]
        npages = 512                               # 2 MiB of anonymous memory

        def hammer(t, n):
            a = t.mmap(0, n * PAGE, RW, ANON)
            chunk = b"\x5a" * (n * PAGE)
            i = 0
            while True:                            # writes until SIGKILLed
                t.write(a, chunk)
                i += 1
                t.write(a + (i % n) * PAGE, i.to_bytes(8, "little"))

        ch = me.fork(hammer, npages, name="victim")
        # its memory is in use, and it is busy writing
        assert poll(lambda: h.meminfo()["MemFree"] <= base - npages * 4)
        assert ch.pid in tgids(h)
        time.sleep(0.2)
        os.kill(ch.pid, signal.SIGKILL)
        assert ch.join(30) == -signal.SIGKILL
        # the task is gone and its memory freed
        assert poll(lambda: ch.pid not in tgids(h)), h.status()["processes"]
        assert poll(lambda: h.meminfo()["MemFree"] >= base - 64), (base, h.meminfo())
        assert tgids(h) == {me.tgid}
        # the host keeps serving: this process, a new fork and a fresh attach all work
        a = me.mmap(0, 8 * PAGE, RW, ANON)
        me.write(a, b"alive" * 100)
        assert me.read(a, 500) == b"alive" * 100

        def probe(t):
            b = t.mmap(0, 2 * PAGE, RW, ANON)
            t.write(b + 10, b"child ok")
            return t.read(b + 10, 8)

        ch2 = me.fork(probe, name="probe")
        assert ch2.join(30) == 0 and ch2.result == b"child ok"
        assert works(h) == 0
        assert poll(lambda: tgids(h) == {me.tgid})
    finally:
        h.close()
    assert wait_gone(pid) == []


def test_thread_sigkilled_takes_its_group_only():
    h = emu.start(ram="64M")
    pid = h.private_pid
    try:
        me = emu.attach(h, name="parent")

        def spin(t):
            b = t.mmap(0, 4 * PAGE, RW, ANON)
            while True:
                t.write(b, b"spin")

        def grp(t):
            th = t.clone(spin, name="spinner")
            t.idle(120)
            return th.join(1)

        child = me.fork(grp, name="grp")
        assert poll(lambda: any(p["tgid"] == child.pid and len(p["threads"]) == 2
                                for p in h.status()["processes"]))
        spinner = [th["tid"] for p in h.status()["processes"] if p["tgid"] == child.pid
                   for th in p["threads"] if th["tid"] != child.pid][0]
        os.kill(spinner, signal.SIGKILL)
        # a thread killed by a signal takes its whole thread group (exit_group)
        assert child.join(30) is not None
        assert poll(lambda: tgids(h) == {me.tgid})
        assert works(h) == 0
    finally:
        h.close()
    assert wait_gone(pid) == []


# ------------------------------------------------------------------ (c) the supervisor SIGKILLed
WORKER = """
    import os, sys, time
    import emu
    from emu import uapi as u
    h = emu.connect(sys.argv[1])
    me = emu.attach(h, name="orphan")
    a = me.mmap(0, 8 * 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"data" * 1024)
    print("ready", os.getpid(), flush=True)
    time.sleep(120)
    print("watchdog did not fire", flush=True)
"""


def _spawn_worker(path):
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WORKER), path],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=NEUTRAL_CWD)
    line = p.stdout.readline()
    assert line.startswith("ready"), (line, p.stderr.read() if p.poll() is not None else "")
    return p


def _kill_supervisor(h):
    pid = h.private_pid
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)             # the test's own child: reap it
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    h.private_pid = None                       # nothing left for close() to shut down
    return pid


def _cleanup_cmd():
    """`emu cleanup` if the CLI exists by now, else the library call."""
    try:
        import emu.cli  # noqa: F401
    except ImportError:
        return shm.cleanup()
    r = subprocess.run([sys.executable, "-m", "emu.cli", "cleanup"], capture_output=True,
                       text=True, timeout=60, cwd=NEUTRAL_CWD)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_supervisor_sigkilled_workers_die_cleanup_removes_leftovers():
    h = emu.start(ram="64M")
    path = h.path
    worker = _spawn_worker(path)
    try:
        assert poll(lambda: worker.pid in tgids(h))
        pid = _kill_supervisor(h)
        # a SIGKILLed supervisor cannot clean up after itself.  (Checked at once: any
        # supervisor booting concurrently, e.g. another test run, cleans up dead ones.)
        assert len(shm_of(pid)) == 2
        assert os.path.exists(sock_of(pid))
        # the worker's watchdog sees its kernel die and SIGKILLs it
        assert poll(lambda: worker.poll() is not None, timeout=30)
        assert worker.returncode == -signal.SIGKILL, worker.stderr.read()
        _cleanup_cmd()
        assert shm_of(pid) == []
        assert not os.path.exists(sock_of(pid))
        assert leftovers(pid) == []
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        h.close()


def test_supervisor_sigkilled_next_start_cleans_up():
    h = emu.start(ram="64M")
    worker = _spawn_worker(h.path)
    try:
        assert poll(lambda: worker.pid in tgids(h))
        pid = _kill_supervisor(h)
        assert len(shm_of(pid)) == 2 and os.path.exists(sock_of(pid))
        assert poll(lambda: worker.poll() is not None, timeout=30)
        assert worker.returncode == -signal.SIGKILL
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        h.close()
    # booting a new supervisor runs shm.cleanup() first
    h2 = emu.start(ram="64M")
    pid2 = h2.private_pid
    try:
        assert shm_of(pid) == []
        assert not os.path.exists(sock_of(pid))
        assert [e for e in os.listdir(shm.runtime_dir()) if str(pid) in e] == []
        assert works(h2) == 0
    finally:
        h2.close()
    assert wait_gone(pid2) == []


def test_cleanup_spares_a_live_supervisor():
    h = emu.start(ram="64M")
    pid = h.private_pid
    try:
        removed = shm.cleanup()
        assert not any(f"-{pid}-" in r or f"priv-{pid}." in r for r in removed)
        assert len(shm_of(pid)) == 2 and os.path.exists(sock_of(pid))
        assert works(h) == 0
    finally:
        h.close()
    assert wait_gone(pid) == []


def test_cli_cleanup_if_present():
    """`emu cleanup` (the console script) once the CLI exists; a no-op before."""
    try:
        import emu.cli  # noqa: F401
    except ImportError:
        return
    h = emu.start(ram="64M")
    pid = _kill_supervisor(h)
    h.close()
    assert len(shm_of(pid)) == 2
    exe = shutil.which("emu")
    cmd = [exe, "cleanup"] if exe else [sys.executable, "-m", "emu.cli", "cleanup"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=NEUTRAL_CWD)
    assert r.returncode == 0, r.stderr
    assert leftovers(pid) == []


# ------------------------------------------------------------------ (d) the owner dies
OWNER = """
    import os
    import emu
    h = emu.start(ram="64M")
    print(h.private_pid, h.path, flush=True)
    os._exit(0)
"""


def test_owner_death_shuts_private_supervisor_down():
    p = run_py(OWNER)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    spid, path = out.split()
    spid = int(spid)
    assert path == sock_of(spid)
    # the supervisor notices its owner is gone, shuts down and removes everything
    assert wait_gone(spid, timeout=30) == []
    assert not os.path.exists(path)


OWNER_WITH_WORKER = """
    import os, sys, time
    import emu
    from emu import uapi as u
    h = emu.start(ram="64M")
    me = emu.attach(h, name="owner")
    def child(t):
        b = t.mmap(0, 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
        t.write(b, b"x")
        t.idle(120)
    th = me.fork(child, name="kid")
    print(h.private_pid, th.pid, flush=True)
    os._exit(0)
"""


def test_owner_death_with_workers_kills_them_and_cleans_up():
    p = run_py(OWNER_WITH_WORKER)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    spid, kid = map(int, out.split())
    assert wait_gone(spid, timeout=30) == []
    assert poll(lambda: not proc_alive(kid), timeout=30)


# ------------------------------------------------------------------ (e) Task.exit retires at once
def _pidfds():
    """This process's open pidfds (the watchdog's is one)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                out.append(int(fd))
        except OSError:
            pass
    return out


def _watchdogs():
    import threading

    return [t for t in threading.enumerate() if t.name == "emu-watchdog"]


def test_exit_retires_the_thread_before_it_returns():
    with emu.start(ram="64M") as h:
        assert _pidfds() == [] and _watchdogs() == []
        me = emu.attach(h, name="first")
        a = me.mmap(0, 4 * PAGE, RW, ANON)
        me.write(a, b"before")
        assert len(_pidfds()) == 1 and len(_watchdogs()) == 1
        me.exit()
        # gone from the kernel at once, not at some later EOF
        assert h.status()["processes"] == []
        assert _pidfds() == [] and _watchdogs() == []
        # the old handle is a clean error, both its calls and its CPU
        for op in (lambda: me.mmap(0, PAGE, RW, ANON), lambda: me.read(a, 6),
                   lambda: me.write(a, b"x")):
            try:
                op()
            except OSError as e:
                assert e.errno == u.ESRCH, e
            else:
                raise AssertionError("a retired thread still works")
        me.exit()                                  # idempotent
        # the same process attaches again
        me2 = emu.attach(h, name="second")
        assert me2.tid == os.getpid() and tgids(h) == {os.getpid()}
        b = me2.mmap(0, PAGE, RW, ANON)
        me2.write(b, b"again")
        assert me2.read(b, 5) == b"again"
        me2.exit()
        assert h.status()["processes"] == []


def test_thread_exit_leaves_its_process_running():
    """exit() of a clone()d thread is a thread exit; the process keeps its other
    threads (the main thread's exit() would be exit_group)."""
    with emu.start(ram="64M") as h:
        me = emu.attach(h, name="main")
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()

        def thread(t):
            t.exit()
            os.write(w1, b"x")
            os.read(r2, 1)                         # until the parent has looked
            return "done"

        th = me.clone(thread, name="leaver")
        assert os.read(r1, 1) == b"x"
        procs = h.status()["processes"]
        assert [p["tgid"] for p in procs] == [me.tgid]
        assert [x["tid"] for x in procs[0]["threads"]] == [me.tid]
        assert proc_alive(th.pid)                  # the real process lives on
        os.write(w2, b"x")
        assert th.join(30) == 0 and th.result == "done"
        a = me.mmap(0, PAGE, RW, ANON)             # the process is intact
        me.write(a, b"ok")
        assert me.read(a, 2) == b"ok"


# ------------------------------------------------------------------ (f) a closed host is unmapped
def _emu_maps():
    """The emulated machines' segments this process maps (one line each, however
    many VMAs the read-only tables split a mapping into)."""
    with open("/proc/self/maps") as f:
        return sorted({ln.split()[-1] for ln in f if "/dev/shm/emu-" in ln})


def test_closed_host_is_unmapped_from_the_caller():
    assert _emu_maps() == []
    kept = []
    for i in range(4):
        with emu.start(ram="64M") as h:
            me = emu.attach(h, name="cycle%d" % i)
            a = me.mmap(0, 16 * PAGE, RW, ANON)
            me.write(a, b"y" * 16 * PAGE)
            assert len(_emu_maps()) == 2
            if i % 2:
                me.exit()                           # or let close() retire it
            kvm = me.open_kvm() if not i % 2 else None
            kept.append((me, a, kvm))
        assert _emu_maps() == [], _emu_maps()
    # the handles that outlived their machine are clean errors, never a segfault
    for me, a, _ in kept:
        for fn, args in ((me.read, (a, 4)), (me.write, (a, b"z")), (me.read_batch, ([a], 4)),
                         (lambda *x: me._core.access_read(*x), (0, 0, a, bytearray(4))),  # noqa: B023
                         (me.mmap, (0, PAGE, RW, ANON))):
            try:
                fn(*args)
            except OSError as e:
                assert e.errno in (u.ESHUTDOWN, u.ESRCH), e
            else:
                raise AssertionError("an unmapped machine still works")
    me, a, kvm = kept[0]
    try:
        kvm.create_vm()
    except OSError as e:
        assert e.errno == u.ESHUTDOWN
    else:
        raise AssertionError("create_vm on a stopped machine")


# ------------------------------------------------------------------ (g) no inherited fds
def test_private_supervisor_holds_none_of_the_callers_fds():
    r, w = os.pipe()                               # non-inheritable, as Python makes them
    r2, w2 = os.pipe()
    os.set_inheritable(w2, True)                   # passed on, as exec would
    h = emu.start(ram="64M")
    try:
        held = []
        for fd in os.listdir(f"/proc/{h.private_pid}/fd"):
            try:
                held.append(os.readlink(f"/proc/{h.private_pid}/fd/{fd}"))
            except OSError:
                pass
        assert f"pipe:[{os.fstat(w).st_ino}]" not in held, held
        assert f"pipe:[{os.fstat(r).st_ino}]" not in held, held
        assert f"pipe:[{os.fstat(w2).st_ino}]" in held, held
        assert len(held) < 16, held                # its own: stdio, socket, selector, wakeup
        os.close(r2)
        os.close(w2)
        # a parent waiting for EOF on the pipe gets it at once, not at supervisor exit
        os.close(w)
        import select as sel
        assert sel.select([r], [], [], 5)[0] == [r]
        assert os.read(r, 1) == b""
        assert works(h) == 0
    finally:
        os.close(r)
        h.close()


# ------------------------------------------------------------------ (h) orderly shutdown
POLITE = """
    import errno, os, sys
    import emu
    from emu import uapi as u
    h = emu.connect(sys.argv[1])
    me = emu.attach(h, name="polite")
    a = me.mmap(0, 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"x")
    print("ready", flush=True)
    for what, op in (("idle", lambda: me.idle(60)),
                     ("next", lambda: me.mmap(0, 4096, u.PROT_READ, u.MAP_PRIVATE | u.MAP_ANONYMOUS)),
                     ("cpu", lambda: me.read(a, 1)), ("host", h.status)):
        try:
            op()
            print(what, "returned", flush=True)
        except OSError as e:
            print(what, errno.errorcode[e.errno], flush=True)
    print("maps", sum("/dev/shm/emu-" in ln for ln in open("/proc/self/maps")), flush=True)
    sys.exit(0)
"""

CARELESS = """
    import sys, time
    import emu
    h = emu.connect(sys.argv[1])
    me = emu.attach(h, name="careless")
    print("ready", flush=True)
    time.sleep(60)                 # no handler: the error ends the process
"""

DEAF = """
    import signal, sys, time
    import emu
    h = emu.connect(sys.argv[1])
    me = emu.attach(h, name="deaf")
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN + 7])   # shuts its ears
    print("ready", flush=True)
    time.sleep(60)
"""


def _attached(script, sock):
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), sock],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=NEUTRAL_CWD)
    line = p.stdout.readline()
    assert line.startswith("ready"), (line, p.stderr.read() if p.poll() is not None else "")
    return p


def test_emu_stop_is_an_orderly_shutdown(tmp_path, monkeypatch):
    from test_cli import emu_cmd

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))    # its log stays ours to read

    sock = os.path.join(shm.runtime_dir(), "stop-test-%d.sock" % os.getpid())
    cfg = tmp_path / "emu.toml"
    cfg.write_text("[supervisor]\nshutdown_grace_ms = 1500\n")
    r = emu_cmd("daemon", "--background", "--socket", sock, "--ram", "32M", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    with open(sock[:-5] + ".pid") as f:
        dpid = int(f.read())
    procs = []
    try:
        procs = [_attached(s, sock) for s in (POLITE, CARELESS, DEAF)]
        t0 = time.monotonic()
        r = emu_cmd("stop", "--socket", sock)
        assert r.returncode == 0, r.stderr
        assert not proc_alive(dpid)                # emu stop returns once it is done
        polite, careless, deaf = procs
        out, err = polite.communicate(timeout=30)
        # a clear error everywhere, and a normal exit for the process that handles it
        assert polite.returncode == 0, err
        assert out.split("\n")[:5] == ["idle ESHUTDOWN", "next ESHUTDOWN", "cpu ESHUTDOWN",
                                       "host ESHUTDOWN", "maps 0"], out + err
        _, err = careless.communicate(timeout=30)
        assert careless.returncode == 1 and "[Errno 108]" in err, err
        assert "the emulated kernel has shut down" in err
        # one that does not listen is killed after the grace period, not left hanging
        deaf.wait(30)
        assert deaf.returncode == -signal.SIGKILL
        assert time.monotonic() - t0 >= 1.4
        assert poll(lambda: not proc_alive(dpid), timeout=30)
        assert not os.path.exists(sock)
        assert shm_of(dpid) == []
        with open(sock[:-5] + ".log") as f:
            log = f.read()
        assert "still attached 1.5 s after shutdown: killed" in log and str(deaf.pid) in log
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if proc_alive(dpid):
            os.kill(dpid, signal.SIGKILL)
        for ext in (".log", ".log.1"):
            if os.path.exists(sock[:-5] + ext):
                os.unlink(sock[:-5] + ext)


def test_start_close_is_an_orderly_shutdown_for_workers():
    h = emu.start(ram="64M")
    pid = h.private_pid
    me = emu.attach(h, name="owner")
    a = me.mmap(0, PAGE, RW, ANON)
    me.write(a, b"owner")

    def worker(t):
        got = []
        try:
            t.idle(60)
        except OSError as e:
            got.append(e.errno)
        try:
            t.mmap(0, PAGE, RW, ANON)
        except OSError as e:
            got.append(e.errno)
        return got

    th = me.fork(worker, name="worker")
    assert poll(lambda: th.pid in tgids(h))
    h.close()
    assert wait_gone(pid) == []
    assert th.join(30) == 0                        # it handled the error and exited normally
    assert th.result == [u.ESHUTDOWN, u.ESHUTDOWN]
    try:
        me.read(a, 5)
    except OSError as e:
        assert e.errno == u.ESHUTDOWN
    else:
        raise AssertionError("the owner's thread outlived its machine")


# ------------------------------------------------------------------ (i) logs and cleanup
def test_crashed_daemon_log_survives_later_starts(tmp_path, monkeypatch):
    """A.11: a SIGKILLed daemon's log is rotated by the next boots' cleanup, not deleted."""
    from test_cli import emu_cmd

    # a runtime directory of its own: a concurrent run of an older emu would delete the log
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))

    base = os.path.join(shm.runtime_dir(), "crash-test-%d" % os.getpid())
    sock = base + ".sock"
    r = emu_cmd("daemon", "--background", "--socket", sock, "--ram", "32M")
    assert r.returncode == 0, r.stderr
    try:
        with open(base + ".pid") as f:
            dpid = int(f.read())
        with open(base + ".log", "a") as f:
            f.write("Traceback (most recent call last): the last words\n")
        os.kill(dpid, signal.SIGKILL)
        assert poll(lambda: not proc_alive(dpid))
        for _ in range(2):
            with emu.start(ram="32M"):
                pass
        assert not os.path.exists(base + ".pid") and not os.path.exists(sock)
        assert shm_of(dpid) == []
        with open(base + ".log.1") as f:
            assert "the last words" in f.read()
    finally:
        for ext in (".log", ".log.1", ".log.2", ".pid", ".sock"):
            if os.path.exists(base + ext):
                os.unlink(base + ext)


def test_cleanup_keeps_a_few_rotated_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    rd = shm.runtime_dir()
    for i in range(5):
        with open(os.path.join(rd, "emu.log"), "w") as f:
            f.write("run %d\n" % i)
        shm.cleanup()
    names = sorted(os.listdir(rd))
    assert names == ["emu.log.1", "emu.log.2", "emu.log.3"], names
    for n, want in (("emu.log.1", "run 4"), ("emu.log.2", "run 3"), ("emu.log.3", "run 2")):
        with open(os.path.join(rd, n)) as f:
            assert f.read().strip() == want


def _dead_pids(n):
    """Pids no process has: above pid_max."""
    with open("/proc/sys/kernel/pid_max") as f:
        top = int(f.read())
    return [top + 1 + i for i in range(n)]


def test_concurrent_cleanups_of_the_same_dead_entries(tmp_path, monkeypatch):
    """Supervisors booting at once clean the same dead entries; none fails."""
    import posix_ipc

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    rd = shm.runtime_dir()
    dead = _dead_pids(40)
    for p in dead:
        for n in shm.segment_names(p):
            posix_ipc.SharedMemory(n, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
        for ext in (".pid", ".sock", ".log"):
            with open(os.path.join(rd, "d%d%s" % (p, ext)), "w") as f:
                f.write("log of %d\n" % p if ext == ".log" else "")
        open(os.path.join(rd, "priv-%d.sock" % p), "w").close()
    go_r, go_w = os.pipe()
    kids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.read(go_r, 1)
                shm.cleanup()
                code = 0
            finally:
                os._exit(code)
        kids.append(pid)
    os.write(go_w, b"xxxx")
    codes = [os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids]
    assert codes == [0, 0, 0, 0]
    assert [p for p in dead if shm_of(p)] == []
    names = sorted(os.listdir(rd))
    assert names == sorted("d%d.log.1" % p for p in dead), names   # rotated once, not lost


# ------------------------------------------------------------------ (j) the supervisor SIGKILLed
STATES = """
    import os, sys, time
    import emu
    from emu import uapi as u
    h = emu.connect(sys.argv[1])
    me = emu.attach(h, name=sys.argv[2])
    a = me.mmap(0, 8 * 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"data" * 8192)
    print("ready", os.getpid(), flush=True)
    mode = sys.argv[2]
    try:
        if mode == "blocked":                 # in a call the stopped supervisor never answers
            sys.stdin.readline()
            me.mmap(0, 4096, u.PROT_READ, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
        elif mode == "idle":
            me.idle(120)
        else:                                 # the fast path: no call to the kernel at all
            while True:
                me.write(a, b"spin")
                me.read(a, 4)
    except OSError as e:
        print("error", e.errno, e.strerror, flush=True)
        sys.exit(3)
    print("no notice", flush=True)
"""


def test_supervisor_sigkilled_every_worker_notices():
    """Blocked in a call, idle, spinning in the fast path: each one exits or gets a
    clear error (the time to notice is measured in benchmarks/bench_supervisor_death.py)."""
    h = emu.start(ram="64M")
    spid = h.private_pid
    workers = {}
    try:
        for mode in ("blocked", "idle", "spin"):
            p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(STATES), h.path, mode],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=NEUTRAL_CWD)
            line = p.stdout.readline()
            assert line.startswith("ready"), (line, p.stderr.read())
            workers[mode] = p
        os.kill(spid, signal.SIGSTOP)
        workers["blocked"].stdin.write("go\n")
        workers["blocked"].stdin.flush()
        time.sleep(0.3)                            # its request sits unanswered
        assert workers["blocked"].poll() is None
        t0 = time.monotonic()
        _kill_supervisor(h)
        for mode, p in workers.items():
            out, err = p.communicate(timeout=10)   # generous: the figure is ~ms
            # its threads die with their kernel (the blocked one sees EOF first, then
            # waits for the pidfd: the same end whichever comes first)
            assert p.returncode == -signal.SIGKILL, (mode, p.returncode, out, err)
            assert "no notice" not in out and "error" not in out
            assert "the supervisor (pid %d) died; its threads die with it" % spid in err, err
        assert time.monotonic() - t0 < 10
        # what the dead one left is gone at the next `emu cleanup`: nothing in
        # /dev/shm, nothing in the runtime directory
        _cleanup_cmd()
        assert leftovers(spid) == []
        assert [e for e in os.listdir(shm.runtime_dir()) if str(spid) in e] == []
    finally:
        for p in workers.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        h.close()
