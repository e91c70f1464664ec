"""Bad input from every side: the Python API, the `emu` command, the raw control
socket and other users.  Each gets a clear error (OSError with the errno Linux
would give, ValueError naming the config field, a one-line CLI message, a JSON
error reply) and changes nothing: `emu status` and meminfo are the same after,
and the supervisor still answers.  (test_errors.py has the syscall arguments.)"""
import ctypes
import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import posix_ipc
import psutil
import pytest
from checks import raises_errno, settled

import emu
from emu import uapi as u
from emu.shm import runtime_dir
from emu.user import channel

PAGE = 4096
NOBODY = 65534


# ------------------------------------------------------------------ helpers

class Raw:
    """A control-socket client that speaks bytes."""

    def __init__(self, path, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.f = self.sock.makefile("rb")
        self.greeting = json.loads(self.f.readline())

    def send(self, data: bytes) -> dict:
        self.sock.sendall(data + b"\n")
        line = self.f.readline()
        assert line, "no reply: the supervisor closed the connection"
        assert line.endswith(b"\n")
        return json.loads(line)

    def close(self):
        self.f.close()
        self.sock.close()


def hung_up(raw) -> bool:
    """The supervisor closed this connection (with our unread bytes: a reset)."""
    try:
        return raw.f.readline() == b""
    except ConnectionResetError:
        return True


def serves(host):
    """The supervisor is alive and answers a new client."""
    r = Raw(host.path)
    rep = r.send(b'{"execute": "meminfo", "id": "ping"}')
    r.close()
    assert rep["id"] == "ping" and rep["return"]["MemTotal"] == 64 * 1024
    return True


def unchanged(host, before):
    assert settled(host) == before
    assert host.meminfo() == before["meminfo"]
    assert serves(host)



def _emu_files():
    """Segments and private sockets of every supervisor on the machine (other test
    runs share /dev/shm and the runtime dir)."""
    return set(e for e in os.listdir("/dev/shm") if e.startswith("emu-")) | set(
        e for e in os.listdir(runtime_dir()) if e.startswith("priv-"))


def _left_behind(files0):
    """New files of a supervisor this test started: ours are children of this
    process, or gone; another run's are alive and not ours."""
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    out = []
    for e in _emu_files() - files0:
        pid = int(e.replace("priv-", "emu-").split("-")[1].split(".")[0])
        if pid in mine or not psutil.pid_exists(pid):
            out.append(e)
    return out


def sup_log(host) -> str:
    """What the supervisor wrote to its stderr (its log), read through /proc (under
    pytest that is a capture file)."""
    path = "/proc/%d/fd/2" % host.private_pid
    if not stat.S_ISREG(os.stat(path).st_mode):
        pytest.skip("the supervisor's stderr is not a file")
    with open(path, errors="replace") as f:
        return f.read()


def sup_proc(host):
    return psutil.Process(host.private_pid)


# ------------------------------------------------------------------ emu.start: bad configuration
START_CASES = {
    "ram-float": (dict(ram=1.5), "memory.ram"),
    "ram-bool": (dict(ram=True), "memory.ram"),
    "ram-list": (dict(ram=[512]), "memory.ram"),
    "ram-too-small": (dict(ram="4K"), "memory.ram"),
    "ram-not-page-multiple": (dict(ram=(8 << 20) + 1), "memory.ram"),
    "ram-too-big": (dict(ram="5T"), "memory.ram"),
    "hugepages-unknown-size": (dict(hugepages={"3M": 1}), "hugepages.3M"),
    "hugepages-negative": (dict(hugepages={"2M": -1}), "hugepages.2M"),
    "hugepages-str-count": (dict(hugepages={"2M": "8"}), "hugepages.2M"),
    "hugepages-bool-count": (dict(hugepages={"1G": True}), "hugepages.1G"),
    "hugepages-list": (dict(hugepages=[("2M", 1)]), "hugepages"),
    "policy-int": (dict(policy=5), "policy"),
    "policy-empty": (dict(policy=""), "policy"),
    "policy-missing-file": (dict(policy="/nonexistent/p.py:P"), "policy"),
    "sysctl-unknown": (dict(sysctl={"vm.nope": 1}), "sysctl.vm.nope"),
    "sysctl-out-of-range": (dict(sysctl={"vm.memory_failure_early_kill": 2}),
                            "sysctl.vm.memory_failure_early_kill"),
    "sysctl-str-value": (dict(sysctl={"vm.enable_soft_offline": "1"}),
                         "sysctl.vm.enable_soft_offline"),
    "sysctl-list": (dict(sysctl=[("vm.memory_failure_early_kill", 1)]), "sysctl"),
    "madvise-ar-str": (dict(madvise_action_required="yes"), "kernel.madvise_action_required"),
    "config-int": (dict(config=5), "config"),
    "config-missing": (dict(config="/nonexistent/emu.toml"), "config"),
    "config-directory": (dict(config="/"), "config"),
}


@pytest.mark.parametrize("kw,field", START_CASES.values(), ids=START_CASES.keys())
def test_start_bad_argument_valueerror(kw, field):
    files0 = _emu_files()
    kw = dict(kw)
    kw.setdefault("ram", "8M")
    with pytest.raises(ValueError) as ei:
        emu.start(**kw)
    msg = str(ei.value)
    assert field in msg and "\n" not in msg, msg
    assert _left_behind(files0) == []


CONFIG_FILES = {
    "bad-toml": ("[memory\n", "config"),
    "unknown-table": ("[nope]\nx = 1\n", "nope"),
    "unknown-key": ("[memory]\nsize = 1\n", "memory.size"),
    "table-as-value": ("memory = 5\n", "memory"),
    "limits-zero": ("[limits]\ntasks = 0\n", "limits.tasks"),
    "limits-str": ('[limits]\nvmas = "many"\n', "limits.vmas"),
    "policy-int": ("[kernel]\npolicy = 5\n", "kernel.policy"),
    "ram-float": ("[memory]\nram = 1.5\n", "memory.ram"),
    "not-utf8": (b"\xff\xfe[memory]\n", "config"),
    "sysctl-bool": ('[sysctl]\n"vm.memory_failure_recovery" = true\n',
                    "sysctl.vm.memory_failure_recovery"),
}


@pytest.mark.parametrize("text,field", CONFIG_FILES.values(), ids=CONFIG_FILES.keys())
def test_start_bad_config_file_valueerror(tmp_path, text, field):
    conf = tmp_path / "emu.toml"
    if isinstance(text, bytes):
        conf.write_bytes(text)
    else:
        conf.write_text(text)
    files0 = _emu_files()
    with pytest.raises(ValueError) as ei:
        emu.start(config=str(conf))
    msg = str(ei.value)
    assert field in msg and "\n" not in msg, msg
    assert _left_behind(files0) == []


# ------------------------------------------------------------------ emu.connect
def _stale_socket(d):
    p = os.path.join(d, "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(p)
    s.close()                              # bound, never listening: a dead daemon's socket
    return p


def _regular_file(d):
    p = os.path.join(d, "plain")
    open(p, "w").close()
    return p


CONNECT_CASES = {
    "missing": (lambda d: os.path.join(d, "none.sock"), errno.ENOENT),
    "regular-file": (_regular_file, errno.ECONNREFUSED),
    "directory": (lambda d: d, errno.ECONNREFUSED),
    "stale-socket": (_stale_socket, errno.ECONNREFUSED),
    "path-too-long": (lambda d: os.path.join(d, "x" * 200 + ".sock"), errno.ENAMETOOLONG),
    "missing-dir": (lambda d: os.path.join(d, "no", "such", "dir.sock"), errno.ENOENT),
}


@pytest.mark.parametrize("make,err", CONNECT_CASES.values(), ids=CONNECT_CASES.keys())
def test_connect_bad_path(tmp_path, make, err):
    path = make(str(tmp_path))
    e = raises_errno(err, emu.connect, path)
    assert "cannot reach the supervisor" in str(e)


def test_connect_no_greeting_times_out(tmp_path, monkeypatch):
    """A listener that never says hello (a stopped supervisor): ETIMEDOUT, not a hang."""
    path = str(tmp_path / "mute.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(1)
    monkeypatch.setattr(channel, "GREETING_TIMEOUT", 0.3)
    raises_errno(errno.ETIMEDOUT, emu.connect, path)
    s.close()


def test_connect_refused_greeting_is_econnrefused(tmp_path):
    """A listener that accepts and hangs up at once (what the supervisor does to
    another uid, or when it is out of file descriptors)."""
    path = str(tmp_path / "rude.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(1)
    t = threading.Thread(target=lambda: s.accept()[0].close())
    t.start()
    raises_errno(errno.ECONNREFUSED, emu.connect, path)
    t.join()
    s.close()


# ------------------------------------------------------------------ host controls: bad pfns
HOST_CASES = {
    "corrupt-str": ("corrupt_pfn", ("0x10",), errno.EINVAL),
    "corrupt-bool": ("corrupt_pfn", (True,), errno.EINVAL),
    "corrupt-float": ("corrupt_pfn", (16.0,), errno.EINVAL),
    "corrupt-none": ("corrupt_pfn", (None,), errno.EINVAL),
    "corrupt-2^64": ("corrupt_pfn", (1 << 64,), errno.ERANGE),
    "corrupt-2^200": ("corrupt_pfn", (1 << 200,), errno.ERANGE),
    "hw-poison-negative": ("hw_poison", (-5,), errno.ENXIO),
    "hw-poison-str": ("hw_poison", ("5",), errno.EINVAL),
    "hw-detect-2^64": ("hw_detect", (1 << 64,), errno.ERANGE),
    "hw-detect-float": ("hw_detect", (1.5,), errno.EINVAL),
    "unpoison-list": ("unpoison_pfn", ([1],), errno.EINVAL),
    "kpageflags-str": ("kpageflags", ("1",), errno.EINVAL),
    "sysctl-name-none": ("sysctl", (None,), errno.EINVAL),
    "sysctl-value-str": ("sysctl", ("vm.memory_failure_early_kill", "1"), errno.EINVAL),
    "sysctl-value-float": ("sysctl", ("vm.enable_soft_offline", 1.0), errno.EINVAL),
    "sysctl-value-bool": ("sysctl", ("vm.memory_failure_recovery", True), errno.EINVAL),
    "events-since-str": ("events", ("x",), errno.EINVAL),
}


@pytest.mark.parametrize("meth,args,err", HOST_CASES.values(), ids=HOST_CASES.keys())
def test_host_call_bad_argument(host, meth, args, err):
    before = settled(host)
    raises_errno(err, getattr(host, meth), *args)
    unchanged(host, before)
    assert host.mf_stats() == before["mf_stats"]
    assert before["meminfo"]["HardwareCorrupted"] == 0


def test_attach_twice_ebusy(host):
    me = emu.attach(host, name="t")
    before = settled(host)
    raises_errno(errno.EBUSY, emu.attach, host)
    unchanged(host, before)
    assert [t["tid"] for p in before["processes"] for t in p["threads"]] == [me.tid]


def test_closed_host_handle_ebadf(host):
    h = emu.connect(host.path)
    before = settled(h)
    h.close()
    raises_errno(errno.EBADF, h.status)
    raises_errno(errno.EBADF, h.corrupt_pfn, 1)
    h.close()                                    # closing twice is fine
    unchanged(host, before)


def test_stopped_private_host(host_factory):
    h = host_factory()
    path = h.path
    h.close()
    raises_errno(errno.EBADF, h.meminfo)
    raises_errno(errno.ENOENT, emu.connect, path)   # its socket is gone with it


# ------------------------------------------------------------------ raw control socket: envelopes
DEEP = b'{"a":' * 50000 + b"1" + b"}" * 50000
RAW_CASES = {
    # (line, errno, the id the reply must carry)
    "id-object": (b'{"execute": "nope", "id": {"a": [1, 2]}}', errno.ENOSYS, {"a": [1, 2]}),
    "id-list": (b'{"execute": "nope", "id": [1, "x"]}', errno.ENOSYS, [1, "x"]),
    "id-huge-int": (b'{"execute": "nope", "id": 1000000000000000000000000000000}',
                    errno.ENOSYS, 10 ** 30),
    "id-float": (b'{"execute": "nope", "id": 1.5}', errno.ENOSYS, 1.5),
    "id-bool": (b'{"execute": "nope", "id": true}', errno.ENOSYS, True),
    "execute-missing": (b'{"id": 4}', errno.EINVAL, 4),
    "execute-null": (b'{"execute": null, "id": 5}', errno.EINVAL, 5),
    "execute-object": (b'{"execute": {}, "id": 6}', errno.EINVAL, 6),
    "execute-empty": (b'{"execute": "", "id": 7}', errno.ENOSYS, 7),
    "execute-padded": (b'{"execute": " status ", "id": 8}', errno.ENOSYS, 8),
    "execute-escaped-newline": (b'{"execute": "status\\n", "id": 9}', errno.ENOSYS, 9),
    "execute-lone-surrogate": (b'{"execute": "\\ud800", "id": 10}', errno.ENOSYS, 10),
    "arguments-string": (b'{"execute": "status", "arguments": "x", "id": 11}', errno.EINVAL, 11),
    "arguments-number": (b'{"execute": "status", "arguments": 5, "id": 12}', errno.EINVAL, 12),
    "arguments-true": (b'{"execute": "status", "arguments": true, "id": 13}', errno.EINVAL, 13),
    "unknown-member": (b'{"execute": "status", "argumnets": {}, "id": 14}', errno.EINVAL, 14),
    "nan": (b'{"execute": "corrupt_pfn", "arguments": {"pfn": NaN}, "id": 15}',
            errno.EINVAL, None),
    "infinity": (b'{"execute": "corrupt_pfn", "arguments": {"pfn": Infinity}}', errno.EINVAL, None),
    "minus-infinity": (b'{"execute": "hw_poison", "arguments": {"pfn": -Infinity}}',
                       errno.EINVAL, None),
    "float-overflow": (b'{"execute": "corrupt_pfn", "arguments": {"pfn": 1e400}}',
                       errno.EINVAL, None),
    "int-5000-digits": (b'{"execute": "corrupt_pfn", "arguments": {"pfn": ' + b"9" * 5000 + b"}}",
                        errno.EINVAL, None),
    "invalid-utf8": (b'{"execute": "stat\xc3\x28us", "id": 1}', errno.EINVAL, None),
    "overlong-utf8": (b'{"execute": "\xc0\xafstatus"}', errno.EINVAL, None),
    "utf16": ('{"execute": "status"}'.encode("utf-16-le"), errno.EINVAL, None),
    "nul-in-string": (b'{"execute": "status\x00"}', errno.EINVAL, None),
    "trailing-garbage": (b'{"execute": "status"} x', errno.EINVAL, None),
    "two-objects": (b'{"execute": "status"}{"execute": "status"}', errno.EINVAL, None),
    "empty-object": (b"{}", errno.EINVAL, None),
    "deep-arguments": (b'{"execute": "status", "arguments": ' + DEEP + b"}", errno.EINVAL, None),
    "utf8-bom": (b'\xef\xbb\xbf{"execute": "status"}', errno.EINVAL, None),
}


@pytest.mark.parametrize("line,err,rid", RAW_CASES.values(), ids=RAW_CASES.keys())
def test_socket_bad_request_json_error(host, line, err, rid):
    before = settled(host)
    raw = Raw(host.path)
    rep = raw.send(line)
    assert set(rep) == {"id", "error"}, rep
    assert rep["error"]["errno"] == err, rep
    assert rep["id"] == rid
    assert isinstance(rep["error"]["desc"], str) and "\n" not in rep["error"]["desc"]
    rep = raw.send(b'{"execute": "status", "id": "again"}')   # the connection still works
    assert rep["id"] == "again" and rep["return"] == before
    raw.close()
    unchanged(host, before)


RAW_ATTACH = {
    "kind-unknown": ({"kind": "thread"}, errno.EINVAL),
    "kind-int": ({"kind": 1}, errno.EINVAL),
    "comm-int": ({"comm": 5}, errno.EINVAL),
    "clone-no-parent": ({"kind": "clone", "parent": 1}, errno.ESRCH),
    "fork-parent-list": ({"kind": "fork", "parent": [1]}, errno.EINVAL),
    "clone-parent-bool": ({"kind": "clone", "parent": True}, errno.EINVAL),
}


@pytest.mark.parametrize("args,err", RAW_ATTACH.values(), ids=RAW_ATTACH.keys())
def test_socket_bad_attach(host, args, err):
    before = settled(host)
    raw = Raw(host.path)
    rep = raw.send(json.dumps({"execute": "attach", "arguments": args, "id": 1}).encode())
    assert rep["error"]["errno"] == err, rep
    # still not a thread: a system call from it is ESRCH
    rep = raw.send(b'{"execute": "mce", "arguments": {"addr": 0, "pfn": 1}, "id": 2}')
    assert rep["error"]["errno"] == errno.ESRCH
    raw.close()
    unchanged(host, before)


# ------------------------------------------------------------------ raw control socket: streams
def test_socket_100mb_line_is_refused(host):
    """A line over the limit is not buffered: EMSGSIZE, a log line, the connection
    closed; the supervisor's memory does not grow by the line."""
    before = settled(host)
    rss0 = sup_proc(host).memory_info().rss
    raw = Raw(host.path)
    limit = raw.greeting["QMP"]["max_request"]
    assert limit == 1 << 20
    sent = []

    def flood():
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(100):
                raw.sock.sendall(chunk)
                sent.append(len(chunk))
        except OSError:
            pass
    t = threading.Thread(target=flood)
    t.start()
    rep = json.loads(raw.f.readline())
    assert rep["error"]["errno"] == errno.EMSGSIZE
    t.join(60)
    assert not t.is_alive()
    assert hung_up(raw)
    assert sum(sent) < 100 << 20                          # it stopped reading
    raw.close()
    assert sup_proc(host).memory_info().rss < rss0 + (32 << 20)
    unchanged(host, before)
    assert "request line over 1048576 bytes: closing" in sup_log(host)


def test_socket_long_line_with_newline_is_refused(host):
    before = settled(host)
    raw = Raw(host.path)
    line = b'{"execute": "status", "id": 1, "arguments": {"pad": "' + b"y" * (2 << 20) + b'"}}\n'
    try:
        raw.sock.sendall(line)
    except OSError:
        pass
    rep = json.loads(raw.f.readline())
    assert rep["error"]["errno"] == errno.EMSGSIZE
    assert hung_up(raw)
    raw.close()
    unchanged(host, before)


def test_pwrite_larger_than_a_request_line(host):
    """The limit is the protocol's, not the user's: Task.pwrite splits big writes."""
    me = emu.attach(host, name="t")
    fd = me.memfd_create("big")
    data = bytes(range(256)) * (12 << 10)                 # 3 MiB
    assert me.pwrite(fd, data, 0) == len(data)
    assert me.pread(fd, len(data), 0) == data


def test_socket_request_without_newline_then_eof(host):
    """A complete request with no newline, then EOF: nothing runs, nothing breaks."""
    before = settled(host)
    raw = Raw(host.path)
    raw.sock.sendall(b'{"execute": "sysctl", "arguments": '
                     b'{"name": "vm.memory_failure_early_kill", "value": 1}}')
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.f.readline() == b""
    raw.close()
    unchanged(host, before)
    assert host.sysctl("vm.memory_failure_early_kill") == 0


def test_socket_many_connections_opened_and_dropped(host):
    """Hundreds of clients, in every state a client can die in; the supervisor
    closes its side of each (no fd leak) and keeps serving."""
    before = settled(host)
    sup = sup_proc(host)
    fds0 = sup.num_fds()
    socks = []
    for i in range(300):
        s = socket.socket(socket.AF_UNIX)
        s.connect(host.path)
        if i % 3 == 1:
            s.sendall(b'{"execute": "stat')                 # mid-line
        elif i % 3 == 2:
            s.sendall(b'{"execute": "status", "id": 1}\n')  # a request it never reads
        socks.append(s)
        if i % 50 == 49:
            assert serves(host)
    for i, s in enumerate(socks):
        if i % 2:
            s.shutdown(socket.SHUT_RDWR)
        s.close()
    end = time.monotonic() + 20
    while sup.num_fds() > fds0 and time.monotonic() < end:
        time.sleep(0.05)
    assert sup.num_fds() <= fds0
    unchanged(host, before)


def test_socket_out_of_file_descriptors(host):
    """accept() failing with EMFILE: new clients are refused (EOF before the
    greeting, ECONNREFUSED from emu.connect), connected ones keep being served,
    and the supervisor neither dies nor spins."""
    before = settled(host)
    sup = sup_proc(host)
    keep = Raw(host.path)
    old = sup.rlimit(psutil.RLIMIT_NOFILE)
    sup.rlimit(psutil.RLIMIT_NOFILE, (sup.num_fds() + 8, old[1]))
    socks = []
    try:
        refused = 0
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(host.path)
            socks.append(s)
            if s.recv(4096) == b"":
                refused += 1
        assert refused >= 20
        rep = keep.send(b'{"execute": "status", "id": 1}')
        assert rep["return"] == before
        raises_errno(errno.ECONNREFUSED, emu.connect, host.path)
        cpu0 = sum(sup.cpu_times()[:2])
        time.sleep(0.5)
        assert sum(sup.cpu_times()[:2]) - cpu0 < 0.4             # not spinning on accept
    finally:
        for s in socks:
            s.close()
        sup.rlimit(psutil.RLIMIT_NOFILE, old)
    keep.close()
    unchanged(host, before)
    assert "refusing connections" in sup_log(host)


def test_socket_client_that_never_reads(host):
    """A client sends thousands of requests and reads no reply: the supervisor
    stops reading from it (it never blocks in send), serves everybody else,
    and the client gets every reply, in order, once it reads."""
    hog = Raw(host.path)
    n = 20000
    reqs = b"".join(b'{"execute": "status", "id": %d}\n' % i for i in range(n))
    t = threading.Thread(target=hog.sock.sendall, args=(reqs,))
    t.daemon = True
    t.start()
    time.sleep(0.5)
    assert t.is_alive()                   # its buffers are full: the supervisor stopped reading
    other = Raw(host.path, timeout=30)
    for i in range(5):
        assert other.send(b'{"execute": "meminfo", "id": %d}' % i)["id"] == i
    me = emu.attach(host, name="w")       # an emulated thread is served too
    a = me.mmap(0, PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"ok")
    assert me.read(a, 2) == b"ok"
    me.munmap(a, PAGE)
    other.close()
    for i in range(n):
        rep = json.loads(hog.f.readline())
        assert rep["id"] == i and "return" in rep
    t.join(30)
    hog.close()
    me.exit()


def test_socket_client_that_never_reads_then_dies(host):
    before = settled(host)
    hog = Raw(host.path)
    hog.sock.setblocking(False)
    req = b'{"execute": "dmesg"}\n' * 2000
    try:
        hog.sock.send(req)
    except BlockingIOError:
        pass
    time.sleep(0.2)
    hog.close()
    unchanged(host, before)


# ------------------------------------------------------------------ the emu command
CWD = tempfile.gettempdir()


def emu_cmd(*args, timeout=60):
    exe = shutil.which("emu")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "emu.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=CWD)


def one_line_error(r, field=None):
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Traceback" not in out, out
    assert r.stderr.startswith("emu: ") and r.stderr.count("\n") == 1, r.stderr
    if field:
        assert field in r.stderr, r.stderr


NONE = "/nonexistent-emu-dir/none.sock"
CLI_CASES = {
    "ram-zero": (["daemon", "--ram", "0"], "memory.ram"),
    "ram-too-big": (["daemon", "--ram", "5T"], "memory.ram"),
    "ram-fraction": (["daemon", "--ram", "1.5G"], "memory.ram"),
    "ram-missing-value": (["daemon", "--ram"], "--ram"),
    "hugepages-no-count": (["daemon", "--hugepages", "2M"], "hugepages"),
    "hugepages-unknown-size": (["daemon", "--hugepages", "3M=1"], "hugepages.3M"),
    "hugepages-negative": (["daemon", "--hugepages", "2M=-1"], "hugepages"),
    "hugepages-empty-part": (["daemon", "--hugepages", "2M=1,,"], "hugepages"),
    "sysctl-no-name": (["daemon", "--sysctl", "=1"], "sysctl"),
    "sysctl-unknown": (["daemon", "--sysctl", "vm.nope=1"], "sysctl.vm.nope"),
    "sysctl-out-of-range": (["daemon", "--sysctl", "vm.memory_failure_early_kill=5"],
                            "sysctl.vm.memory_failure_early_kill"),
    "sysctl-bad-number": (["daemon", "--sysctl", "vm.enable_soft_offline=0x"], "sysctl"),
    "policy-empty": (["daemon", "--policy", ""], "policy"),
    "policy-missing-file": (["daemon", "--policy", "/nonexistent/p.py:P"], "policy"),
    "policy-not-python": (["daemon", "--policy", "{notpy}:X"], "policy"),
    "policy-syntax-error": (["daemon", "--policy", "{badpy}:X"], "policy"),
    "config-missing": (["daemon", "--config", "/nonexistent/emu.toml"], "config"),
    "config-directory": (["daemon", "--config", "/"], "config"),
    "config-bad-toml": (["daemon", "--config", "{toml:[memory}"], "config"),
    "config-unknown-key": (["daemon", "--config", "{toml:[kernel]\npolicyy = 1}"],
                           "kernel.policyy"),
    "config-wrong-type": (["daemon", "--config", "{toml:[supervisor]\nhalt_poll_ns = \"x\"}"],
                          "supervisor.halt_poll_ns"),
    "config-not-utf8": (["daemon", "--config", "{binary}"], "config"),
    "socket-no-dir": (["daemon", "--socket", NONE, "--ram", "8M"], "--socket"),
    "socket-too-long": (["daemon", "--socket", "/tmp/" + "a" * 120 + ".sock", "--ram", "8M"],
                        "--socket"),
    "background-log-unwritable": (["daemon", "--background", "--socket", "/proc/emu-x.sock",
                                   "--ram", "8M"], "emu-x.log"),
    "pfn-negative": (["inject", "corrupt-pfn", "-1"], "pfn"),
    "pfn-bare-0x": (["inject", "corrupt-pfn", "0x"], "pfn"),
    "pfn-float": (["inject", "corrupt-pfn", "1.5"], "pfn"),
    "pfn-missing": (["inject", "corrupt-pfn"], "pfn"),
    "pfn-bad-hex": (["inject", "hw-poison", "0x1g"], "pfn"),
    "inject-unknown": (["inject", "melt", "1"], "melt"),
    "no-command": ([], "cmd"),
    "unknown-command": (["reboot"], "reboot"),
    "unknown-option": (["status", "--jsn"], "--jsn"),
    "stop-no-daemon": (["stop", "--socket", NONE], "no supervisor"),
    "dmesg-no-daemon": (["dmesg", "--socket", NONE], "no supervisor"),
    "trace-no-daemon": (["trace", "--socket", NONE], "no supervisor"),
    "inject-no-daemon": (["inject", "corrupt-pfn", "1", "--socket", NONE], "no supervisor"),
    "status-not-a-socket": (["status", "--socket", "/etc/passwd"], "no supervisor"),
    "compare-unknown-policy": (["compare", "nope"], "nope"),
    "demo-unknown-policy": (["demo", "--policy", "nope"], "nope"),
}


def _materialise(args, d):
    out = []
    for a in args:
        if a == "{notpy}:X":
            p = os.path.join(d, "policy.txt")
            open(p, "w").write("x = 1\n")
            a = p + ":X"
        elif a == "{badpy}:X":
            p = os.path.join(d, "bad.py")
            open(p, "w").write("class X(:\n")
            a = p + ":X"
        elif a.startswith("{toml:"):
            p = os.path.join(d, "emu.toml")
            open(p, "w").write(a[6:-1] + "\n")
            a = p
        elif a == "{binary}":
            p = os.path.join(d, "emu.toml")
            open(p, "wb").write(b"\xff\xfe\x00[memory]\n")
            a = p
        out.append(a)
    return out


@pytest.mark.parametrize("args,field", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_bad_input_one_line(tmp_path, args, field):
    files0 = _emu_files()
    r = emu_cmd(*_materialise(args, str(tmp_path)))
    one_line_error(r, field)
    assert _left_behind(files0) == []


CLI_LIVE = {
    "corrupt-beyond-ram": (["inject", "corrupt-pfn", "0x10000000000"], "No such device"),
    "hw-detect-2^64": (["inject", "hw-detect", str(1 << 64)], "out of range"),
    "unpoison-clean": (["inject", "unpoison", "5"], "Device or resource busy"),
    "trace-chrome-no-dir": (["trace", "--chrome", "/nonexistent-emu-dir/t.json"], "trace"),
    "status-extra-arg": (["status", "extra"], "extra"),
}


@pytest.mark.parametrize("args,field", CLI_LIVE.values(), ids=CLI_LIVE.keys())
def test_cli_bad_input_live_daemon(host, args, field):
    before = settled(host)
    r = emu_cmd(*args, "--socket", host.path)
    one_line_error(r, field)
    unchanged(host, before)


# ------------------------------------------------------------------ other users
def _in_child(fn):
    """Run fn() in a forked child; returns what it returned (a str), or what it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            res = fn()
        except BaseException as e:
            res = "raised %s: %s" % (type(e).__name__, e)
        os.write(w, res.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


def _as_nobody(fn):
    """Run fn() in a child with uid/gid nobody; returns what it returned (a str)."""

    def child():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        return fn()

    return _in_child(child)


def _try(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    except posix_ipc.PermissionsError:
        return "EACCES"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_other_uid_cannot_connect_or_map(host):
    before = settled(host)
    segs = sorted("/dev/shm/" + e for e in os.listdir("/dev/shm")
                  if e.startswith("emu-%d-" % host.private_pid))
    assert len(segs) == 2

    def probe():
        res = [_try(lambda: emu.connect(host.path))]
        for p in segs:
            res.append(_try(lambda p=p: os.close(os.open(p, os.O_RDONLY))))
            res.append(_try(lambda p=p: posix_ipc.SharedMemory(p[len("/dev/shm"):])))
        return ",".join(res)
    assert _as_nobody(probe) == ",".join(["EACCES"] * 5)
    unchanged(host, before)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_other_uid_refused_by_the_supervisor(host):
    """Past the file modes (fsuid root, euid nobody): SO_PEERCRED says another user,
    and the supervisor hangs up before the greeting."""
    before = settled(host)
    libc = ctypes.CDLL(None, use_errno=True)

    def child():
        os.setegid(NOBODY)
        os.seteuid(NOBODY)               # SO_PEERCRED reports the effective uid
        libc.setfsuid(0)                 # ...while path lookups still pass as root
        libc.setfsgid(0)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(host.path)
        res = "greeted" if s.recv(4096) else "eof"
        return res + "," + _try(lambda: emu.connect(host.path))

    assert _in_child(child) == "eof,ECONNREFUSED"
    assert "refusing uid %d" % NOBODY in sup_log(host)
    unchanged(host, before)


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_private_files_modes(host):
    rd = runtime_dir()
    assert _mode(rd) == 0o700 and os.stat(rd).st_uid == os.getuid()
    assert stat.S_ISSOCK(os.lstat(host.path).st_mode) and _mode(host.path) == 0o600
    segs = [e for e in os.listdir("/dev/shm") if e.startswith("emu-%d-" % host.private_pid)]
    assert len(segs) == 2
    for e in segs:
        st = os.stat("/dev/shm/" + e)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid(), e


def test_daemon_files_modes():
    sock = os.path.join(runtime_dir(), "modes-%d.sock" % os.getpid())
    r = emu_cmd("daemon", "--background", "--socket", sock, "--ram", "8M")
    assert r.returncode == 0, r.stderr
    try:
        base = os.path.splitext(sock)[0]
        pid = int(open(base + ".pid").read())
        for p in (sock, base + ".pid", base + ".log"):
            assert _mode(p) == 0o600, p
        for e in os.listdir("/dev/shm"):
            if e.startswith("emu-%d-" % pid):
                assert _mode("/dev/shm/" + e) == 0o600
    finally:
        assert emu_cmd("stop", "--socket", sock).returncode == 0
    end = time.monotonic() + 10
    while os.path.exists(sock) and time.monotonic() < end:
        time.sleep(0.02)
    assert not os.path.exists(sock)
    try:
        os.unlink(base + ".log")
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------ a buggy worker
def _stray_store(host, where):
    """A worker that stores into the core segment at `where`(core info, own slot):
    returns how it ended (the exit status, -11 for SIGSEGV)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import faulthandler

            faulthandler.disable()
            me = emu.attach(host, name="stray")
            core = me._core
            info = core.info()
            cv, _pv = core.views()
            off = where(info, me.slot)
            cv[off] = cv[off]                # a store of the same byte: harmless if allowed
            code = 0
            me.exit()
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _other_slot(info, slot):
    far = (slot + 64) % info["ntasks"]          # 64 slots away: another page
    return info["off_tasks"] + far * info["sizeof_task"]


STRAY = {
    "header": (lambda info, slot: info["off_epoch"], -11),
    "struct-page": (lambda info, slot: info["off_hwerr"] - 64, -11),
    "hwerr": (lambda info, slot: info["off_hwerr"] + 5, -11),
    "another-task": (_other_slot, -11),
    "own-task": (lambda info, slot: info["off_tasks"] + slot * info["sizeof_task"]
                 + info["off_task_rcu_epoch"], 0),
    "page-tables": (lambda info, slot: info["off_pt"] + 4096, 0),
}


@pytest.mark.parametrize("where,code", STRAY.values(), ids=STRAY.keys())
def test_worker_cannot_write_kernel_tables(host, where, code):
    """Workers map the kernel's tables read-only: a stray store is a SIGSEGV in
    the worker, not a silently corrupted struct page, hwerr byte or mailbox."""
    before = settled(host)
    assert _stray_store(host, where) == code
    unchanged(host, before)
