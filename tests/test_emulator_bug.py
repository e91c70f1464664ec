"""An unexpected exception inside the emulated kernel is an emulator bug, never an
errno: a BUG record with the traceback in dmesg, the kernel tainted (TAINT_DIE), the
caller gets emu.EmulatorBug saying where to look, and the supervisor serves on.
Bad input (an OSError the kernel raised on purpose, a line that is not a request)
keeps its errno and taints nothing.

A bug is provoked by patching a kernel function before the private supervisor is
forked (it inherits the patch), as test_signals.py does."""
import errno
import io
import json
import os
import re
import signal
import socket
import time
from contextlib import redirect_stdout

import pytest

import emu
from emu import uapi as u
from emu.cli import main as cli_main

PAGE = 4096
RW = u.PROT_READ | u.PROT_WRITE
ANON = u.MAP_PRIVATE | u.MAP_ANONYMOUS
D = 1 << u.TAINT_DIE


def still_serves(host):
    """The supervisor answers host calls and a new process's system calls."""
    assert host.meminfo()["MemTotal"] == 64 * 1024

    def fresh(task):
        a = task.mmap(0, PAGE, RW, ANON)
        task.write(a, b"ok")
        return task.read(a, 2)

    me = emu.user.current.task or emu.attach(host, name="after")
    th = me.fork(fresh, name="fresh")
    assert th.join(30) == 0 and th.result == b"ok"


def bug_record(host):
    """The dmesg lines from the first cut-here marker on."""
    lines = [ln.split("] ", 1)[1] for ln in host.dmesg()]
    i = lines.index("------------[ cut here ]------------")
    return lines[i:]


def test_bug_in_a_host_control_is_reported_not_einval(monkeypatch, host_factory):
    from emu.kernel.memory_failure import MemoryFailure

    def broken(self, pfn):
        raise KeyError("no such folio")

    monkeypatch.setattr(MemoryFailure, "hwpoison_inject", broken)
    host = host_factory()
    assert host.tainted() == 0
    with pytest.raises(emu.EmulatorBug) as ei:
        host.corrupt_pfn(100)
    assert not isinstance(ei.value, OSError)
    msg = str(ei.value)
    assert "emulator bug" in msg and "corrupt_pfn" in msg and "KeyError" in msg
    assert "dmesg" in msg and "daemon log" in msg
    # the raising frame, relative to the source tree when it is inside it (here a test
    # file: relative in a checkout, absolute against an installed package)
    assert re.fullmatch(r"(/.*/)?tests/test_emulator_bug\.py:\d+", ei.value.where)

    assert host.tainted() == D
    rec = bug_record(host)
    assert rec[1] == "kernel BUG at %s!" % ei.value.where
    assert rec[2].startswith("Oops: KeyError: 'no such folio' [#1]")
    assert "Comm: emu-host Tainted: G      D" in rec[3]
    assert any(ln.strip() == 'raise KeyError("no such folio")' for ln in rec)
    assert any("emu/daemon.py:" in ln and "in _handle" in ln for ln in rec)
    assert rec[-1].startswith("---[ end trace")
    st = host.status()
    assert st["tainted"] == D and st["taint"].startswith("Tainted: G      D")
    still_serves(host)
    with pytest.raises(emu.EmulatorBug):               # the next one is #2, same taint
        host.corrupt_pfn(101)
    assert host.tainted() == D
    assert sum(1 for ln in host.dmesg() if "Oops: KeyError" in ln and "[#2]" in ln) == 1


def test_bug_in_a_system_call_names_the_thread(monkeypatch, host_factory):
    from emu.kernel.mm import MM

    def broken(self, mm, addr):
        return {"pfn": "x"}["nope"] + addr         # a KeyError deep in a syscall

    monkeypatch.setattr(MM, "pagemap", broken)
    host = host_factory()
    me = emu.attach(host, name="qemu")
    a = me.mmap(0, PAGE, RW, ANON)
    me.write(a, b"data")
    with pytest.raises(emu.EmulatorBug) as ei:
        me.pagemap(a)
    assert "emulator bug in pagemap" in str(ei.value)
    rec = bug_record(host)
    assert "PID: %d Comm: qemu Tainted:" % me.tid in rec[3]
    assert host.tainted() == D
    # the thread that hit it keeps working, and so does everyone else
    assert me.read(a, 4) == b"data"
    me.munmap(a, PAGE)
    still_serves(host)


@pytest.mark.parametrize("exc", [ValueError("v"), TypeError("t"), IndexError("i"),
                                 AssertionError("a"), ZeroDivisionError("z"),
                                 OSError("an OSError without an errno")],
                         ids=["ValueError", "TypeError", "IndexError", "AssertionError",
                              "ZeroDivisionError", "OSError-no-errno"])
def test_any_unexpected_exception_is_a_bug(monkeypatch, host_factory, exc):
    from emu.kernel import Kernel

    def broken(self):
        raise exc

    monkeypatch.setattr(Kernel, "meminfo", broken)
    host = host_factory()
    with pytest.raises(emu.EmulatorBug) as ei:
        host.meminfo()
    assert type(exc).__name__ in str(ei.value)
    assert host.tainted() == D
    assert host.kpageflags(0) >= 0                     # still serving


def test_deliberate_oserror_keeps_its_errno_and_taints_nothing(host):
    me = emu.attach(host, name="t")
    with pytest.raises(OSError) as ei:
        me.mmap(0, 0, RW, ANON)
    assert ei.value.errno == errno.EINVAL and not isinstance(ei.value, emu.EmulatorBug)
    with pytest.raises(OSError) as ei:
        host.corrupt_pfn(10 ** 9)
    assert ei.value.errno == errno.ENXIO
    assert host.tainted() == 0
    assert not any("cut here" in ln for ln in host.dmesg())


@pytest.mark.parametrize("line,err", [
    (b"{not json", errno.EINVAL), (b"[" * 100000, errno.EINVAL), (b"[1]", errno.EINVAL),
    (b'{"execute": ["status"]}', errno.EINVAL), (b'{"execute": "status", "arguments": 5}',
                                                 errno.EINVAL),
    (b'{"execute": "attach", "arguments": {"kind": "fork", "parent": [1]}}', errno.EINVAL),
    (b'{"execute": "attach", "arguments": {"kind": {"a": 1}}}', errno.EINVAL),
], ids=["not-json", "deep", "array", "execute-list", "arguments-int", "attach-parent-list",
        "attach-kind-object"])
def test_protocol_garbage_is_an_errno_not_a_bug(host, line, err):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(host.path)
    f = s.makefile("rb")
    f.readline()
    s.sendall(line + b"\n")
    rep = json.loads(f.readline())
    assert rep["error"]["class"] in ("GenericError", "OSError")
    assert rep["error"]["errno"] == err
    s.close()
    assert host.tainted() == 0


def test_guest_state_wrong_types_einval_and_nothing_changes(host):
    """A.7: a string mcg_status used to be stored and break every later SET_MCE."""
    me = emu.attach(host, name="vcpu")
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    vcpu = vm.create_vcpu(0)
    vcpu.setup_mce(u.MCG_CTL_P | u.MCG_SER_P | 4)
    before = me._call("guest_state", vcpu=vcpu.fd)
    bad = [{"mcg_status": "bogus"}, {"mcg_status": -1}, {"mcg_status": 1 << 64},
           {"mcg_status": 1.5}, {"cr4_mce": "yes"}, {"cr4_mce": [1]},
           {"clear_bank": "0"}, {"clear_bank": 4}, {"clear_bank": -1},
           {"cr4_mce": True, "mcg_status": "bogus"}, {"cr4_mce": True, "clear_bank": 99}]
    for args in bad:
        with pytest.raises(OSError) as ei:
            me._call("guest_state", vcpu=vcpu.fd, **args)
        assert ei.value.errno == errno.EINVAL, args
        assert me._call("guest_state", vcpu=vcpu.fd) == before, args
    me._call("guest_state", vcpu=vcpu.fd, cr4_mce=True)
    assert vcpu.set_mce(u.KvmX86Mce(status=u.MCI_STATUS_VAL | u.MCI_STATUS_UC, addr=0x1000,
                                    misc=0, mcg_status=0, bank=1)) == 0   # not EINVAL
    st = me._call("guest_state", vcpu=vcpu.fd)
    assert st["banks"][1][1] & u.MCI_STATUS_VAL and st["banks"][1][2] == 0x1000
    assert host.tainted() == 0


@pytest.mark.parametrize("call,args,err", [
    ("pwrite", {"data": "!!not base64!!", "offset": 0}, errno.EFAULT),
    ("pwrite", {"data": "eA==", "offset": -1}, errno.EINVAL),
    # rw_verify_area(): pos + count past LLONG_MAX is -EINVAL (fs/read_write.c)
    ("pwrite", {"data": "eA==", "offset": (1 << 63) - 1}, errno.EINVAL),
    ("pread", {"n": 1 << 70, "offset": 0}, errno.EINVAL),
    ("fallocate", {"mode": 0, "offset": -4096, "length": 4096}, errno.EINVAL),
    ("fallocate", {"mode": 0, "offset": 0, "length": 0}, errno.EINVAL),
    ("fallocate", {"mode": 0, "offset": 1 << 62, "length": 1 << 62}, errno.EFBIG),
    ("ftruncate", {"length": -1}, errno.EINVAL),
    ("ftruncate", {"length": 1 << 63}, errno.EFBIG),
], ids=["pwrite-not-base64", "pwrite-negative", "pwrite-past-llong-max", "pread-n-huge",
        "fallocate-negative", "fallocate-zero", "fallocate-efbig", "ftruncate-negative",
        "ftruncate-efbig"])
def test_file_syscall_arguments_are_validated(host, call, args, err):
    me = emu.attach(host, name="t")
    fd = me.memfd_create("m")
    me.ftruncate(fd, PAGE)
    me.pwrite(fd, b"keep", 0)
    before = host.status()
    with pytest.raises(OSError) as ei:
        me._call(call, fd=fd, **args)
    assert ei.value.errno == err
    assert host.status() == before
    assert me.pread(fd, 4, 0) == b"keep"
    assert host.tainted() == 0


def test_syscall_arguments_beyond_64_bits_and_odd_types(host):
    me = emu.attach(host, name="t")
    vm = me.open_kvm().create_vm(u.KVM_X86_DEFAULT_VM)
    vcpu = vm.create_vcpu(0)
    for call, args, err in [
            ("mmap", {"addr": 0, "length": PAGE, "prot": 1 << 40 | RW, "flags": ANON}, None),
            ("munmap", {"addr": 1 << 64, "length": PAGE}, errno.EINVAL),
            ("pagemap", {"addr": -1}, errno.EINVAL),
            ("mce", {"pfn": 1 << 40, "addr": 0}, errno.EINVAL),
            ("kvm_fault", {"vcpu": vcpu.fd, "gpas": [1 << 64]}, errno.EINVAL),
            ("kvm_fault", {"vcpu": vcpu.fd, "gpas": [True]}, errno.EINVAL),
            ("kvm_fault", {"vcpu": vcpu.fd, "gpas": [0], "private": "yes"}, errno.EINVAL),
            ("close", {"fd": 1 << 80}, errno.EINVAL),
    ]:
        if err is None:                                 # unknown prot bits are ignored
            a = me._call(call, **args)
            me.write(a, b"w")
            continue
        with pytest.raises(OSError) as ei:
            me._call(call, **args)
        assert ei.value.errno == err, (call, args, ei.value)
    assert host.tainted() == 0


def test_emu_status_shows_taint_and_limits(monkeypatch, host_factory):
    from emu.kernel import Kernel

    def broken(self, pfn):
        raise RuntimeError("boom")

    monkeypatch.setattr(Kernel, "kpageflags", broken)
    host = host_factory()

    def status(*extra):
        out = io.StringIO()
        with redirect_stdout(out):
            assert cli_main(["status", "--socket", host.path, *extra]) == 0
        return out.getvalue()

    text = status()
    assert "kernel            Not tainted (tainted=0)" in text
    assert "limits            tasks 0/1024  mms 0/512  inodes 0/4096  vmas 0/16384" in text
    with pytest.raises(emu.EmulatorBug):
        host.kpageflags(3)
    text = status()
    assert "Tainted: G      D" in text and "(tainted=128)" in text and "emu dmesg" in text
    js = json.loads(status("--json"))
    assert js["tainted"] == D and js["limits"]["tasks"] == {"used": 0, "max": 1024}


def test_bug_outside_a_request_is_reported_and_the_kernel_serves_on(monkeypatch, host_factory):
    """A bug in a dead task's teardown (EOF on its socket, no request to answer) is
    recorded the same way, and the supervisor keeps running.  The thread dies of
    SIGKILL (no exit request) and its parent does not reap it until the BUG is in:
    the supervisor meets the death first as EOF, outside any request."""
    from emu.kernel import Kernel

    real = Kernel.exit_task
    raised = []

    def broken(self, t):
        if t.comm == "doomed" and not raised:
            raised.append(t.tid)
            raise IndexError("teardown")
        return real(self, t)

    monkeypatch.setattr(Kernel, "exit_task", broken)
    host = host_factory()
    me = emu.attach(host, name="parent")
    th = me.fork(lambda task: os.kill(os.getpid(), signal.SIGKILL), name="doomed")
    deadline = time.monotonic() + 10
    while host.tainted() == 0 and time.monotonic() < deadline:
        me.idle(0.05)
    assert host.tainted() == D
    rec = bug_record(host)
    assert rec[2].startswith("Oops: IndexError: teardown")
    assert "PID: 0 Comm: kworker/0:0" in rec[3]
    assert th.join(30) == -signal.SIGKILL          # the reap retires it: no second BUG
    assert sum(1 for line in host.dmesg() if "kernel BUG at" in line) == 1
    still_serves(host)
