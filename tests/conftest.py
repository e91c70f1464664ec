"""Test harness: forked tests with real signals, one private supervisor each."""
import os
import time

import psutil
import pytest

import emu

# pytest 9.2 stores TestReport._id as a NodeId that marshal (pytest-forked's report
# transport) rejects; every forked test would fail.  The pin in pyproject avoids 9.2,
# and this shim keeps a user's newer pytest working too.
try:
    import pytest_forked

    _orig_serialize = pytest_forked.serialize_report

    def _serialize(rep):
        d = _orig_serialize(rep)
        if "_id" in d:
            d["nodeid"] = str(d.pop("_id"))
        return d

    pytest_forked.serialize_report = _serialize
except ImportError:  # pragma: no cover
    pass


def leftovers(sup_pid: int) -> list[str]:
    """What a supervisor left behind: its process, shm segments, its socket."""
    out = []
    if psutil.pid_exists(sup_pid):
        try:
            if psutil.Process(sup_pid).status() != psutil.STATUS_ZOMBIE:
                out.append("process %d" % sup_pid)
        except psutil.NoSuchProcess:
            pass
    for ent in os.listdir("/dev/shm"):
        if ent.startswith("emu-%d-" % sup_pid):
            out.append("/dev/shm/" + ent)
    from emu.shm import runtime_dir

    sock = os.path.join(runtime_dir(), "priv-%d.sock" % sup_pid)
    if os.path.exists(sock):
        out.append(sock)
    return out


def wait_gone(sup_pid: int, timeout: float = 5.0) -> list[str]:
    end = time.monotonic() + timeout
    while True:
        left = leftovers(sup_pid)
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.02)


@pytest.fixture
def host():
    """A private supervisor (64 MiB of RAM); checks it left nothing behind."""
    h = emu.start(ram="64M")
    pid = h.private_pid
    try:
        yield h
    finally:
        h.close()
    assert wait_gone(pid) == []


@pytest.fixture
def host_factory():
    made = []

    def make(**kw):
        kw.setdefault("ram", "64M")
        h = emu.start(**kw)
        made.append((h, h.private_pid))
        return h

    yield make
    for h, pid in made:
        h.close()
        assert wait_gone(pid) == []


# ------------------------------------------------------------------ two CPU backends
# As uvloop runs its suite on uvloop and on asyncio, the emulated CPU (the fast path
# every load and store of a worker or vCPU takes) has two implementations: the Cython
# core and the pure-Python reference emu._pyref.  `--fastpath=python` (or the
# environment variable EMU_FASTPATH=python) runs every test on the reference; test
# modules marked `pytestmark = pytest.mark.both_backends` run each test on both.
BACKENDS = ("cython", "python")


def pytest_addoption(parser):
    parser.addoption("--fastpath", choices=BACKENDS, default=None,
                     help="the CPU backend for tests not parametrized over both "
                          "(default: $EMU_FASTPATH, else cython)")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("both_backends") is not None:
        metafunc.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture(autouse=True)
def backend(request, monkeypatch):
    """The CPU backend this test runs on ("cython" or "python"): EMU_FASTPATH, which
    emu.attach() reads (_backend), set for the test's first attach (and restored)."""
    name = getattr(request, "param", None) or request.config.getoption("--fastpath") \
        or ("python" if os.environ.get("EMU_FASTPATH") == "python" else "cython")
    if name == "python":
        monkeypatch.setenv("EMU_FASTPATH", "python")
    else:
        monkeypatch.delenv("EMU_FASTPATH", raising=False)
    return name


def pytest_report_header(config):
    name = config.getoption("--fastpath") or os.environ.get("EMU_FASTPATH") or "cython"
    return "emu CPU backend: %s (modules marked both_backends: cython and python)" % name


def pytest_collection_modifyitems(config, items):
    """Every test runs in its own forked child: tests attach the test process as an
    emulated thread and install signal handlers, none of which may leak."""
    for item in items:
        if item.get_closest_marker("forked") is None and item.get_closest_marker("noforked") is None:
            item.add_marker(pytest.mark.forked)


def pytest_configure(config):
    config.addinivalue_line("markers", "noforked: run in the pytest process itself")
    config.addinivalue_line("markers", "both_backends: run each test on the Cython core and "
                                       "on the pure-Python reference CPU")
