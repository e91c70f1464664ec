"""`emu run-worker qemu-like`: a QEMU-shaped VMM attached to a running daemon and
driven step by step, with errors injected from outside while it runs; it works
from the repository root too."""
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import emu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _emu():
    exe = shutil.which("emu")
    return [exe] if exe else [sys.executable, "-m", "emu.cli"]


class Lines:
    """A child's stdout, read line by line with a deadline."""

    def __init__(self, p):
        self.p, self.buf, self.seen = p, b"", []

    def until(self, pattern: str, timeout: float = 30.0) -> re.Match:
        end = time.monotonic() + timeout
        while True:
            for line in self.seen:
                m = re.search(pattern, line)
                if m:
                    return m
            left = end - time.monotonic()
            assert left > 0, "no %r in:\n%s" % (pattern, "\n".join(self.seen))
            r, _, _ = select.select([self.p.stdout], [], [], left)
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                assert chunk, "EOF before %r:\n%s" % (pattern, "\n".join(self.seen))
                self.buf += chunk
                *done, self.buf = self.buf.split(b"\n")
                self.seen += [x.decode() for x in done]


def test_qemu_like_worker_driven_from_another_terminal():
    sock = os.path.join(tempfile.mkdtemp(prefix="emu-rw-"), "emu.sock")
    r = subprocess.run(_emu() + ["daemon", "--background", "--socket", sock, "--ram", "128M"],
                       capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    p = None
    try:
        # from the repository root, as its README says one may
        p = subprocess.Popen(_emu() + ["run-worker", "qemu-like", "--socket", sock, "--vcpus", "2"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             cwd=ROOT)
        out = Lines(p)
        out.until(r"QemuLike: tgid \d+, 2 vCPUs")

        def send(line):
            p.stdin.write(line.encode() + b"\n")
            p.stdin.flush()

        send("write 0 0x1000")
        send("pfn 0x1000")
        pfn = int(out.until(r"GPA 0x1000 is pfn (0x[0-9a-f]+)").group(1), 16)
        host = emu.connect(sock)
        try:
            assert host.hw_poison(pfn) == 0          # a latent error, from outside the worker
        finally:
            host.close()
        send("read 1 0x1008")
        out.until(r"vcpu1 +QEMU: error: kvm run failed Memory page has hardware error")
        out.until(r"vcpu1 +QEMU: .*VM paused \(internal-error\)")
        out.until(r"vcpu1 +result: 'paused'")
        send("frobnicate")
        out.until(r"unknown command 'frobnicate'")
        send("quit")
        assert p.wait(30) == 0
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        subprocess.run(_emu() + ["stop", "--socket", sock], capture_output=True, timeout=60,
                       cwd=tempfile.gettempdir())
        shutil.rmtree(os.path.dirname(sock), ignore_errors=True)


def test_bad_worker_arguments_are_one_line():
    r = subprocess.run(_emu() + ["run-worker", "qemu-like", "--vcpus", "0"], capture_output=True,
                       text=True, timeout=60, cwd=tempfile.gettempdir())
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--vcpus" in r.stderr
    r = subprocess.run(_emu() + ["run-worker", "bochs-like"], capture_output=True, text=True,
                       timeout=60, cwd=tempfile.gettempdir())
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "bochs-like" in r.stderr


def test_a_source_tree_without_its_core_says_so(tmp_path):
    """`python -m workers.qemu_like` from a checkout that was installed, not built in
    place, imports the tree's emu/, which has no core: one clear line, not a bare
    ImportError from deep inside."""
    pkg = tmp_path / "emu"
    pkg.mkdir()
    shutil.copy(os.path.join(ROOT, "emu", "__init__.py"), pkg / "__init__.py")
    # -S: no site-packages, so neither an installed nor an editable emu can win
    r = subprocess.run([sys.executable, "-S", "-c", "import emu"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 1
    assert "emu's Cython core is not built in %s" % pkg in r.stderr
    assert "emu run-worker" in r.stderr


# ---- the other VMM workers: firecracker-like, cloud-hypervisor-like, recovering ----

GPA = 0x3000


class Daemon:
    """A private background daemon on a temp socket; stop() leaves nothing behind."""

    def __init__(self):
        self.sock = os.path.join(tempfile.mkdtemp(prefix="emu-rw-"), "emu.sock")
        r = subprocess.run(_emu() + ["daemon", "--background", "--socket", self.sock, "--ram", "64M"],
                           capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir())
        assert r.returncode == 0, r.stderr
        try:
            with open(os.path.splitext(self.sock)[0] + ".pid") as f:     # as cmd_daemon names it
                self.pid = int(f.read())
        except BaseException:
            subprocess.run(_emu() + ["stop", "--socket", self.sock], capture_output=True, timeout=60,
                           cwd=tempfile.gettempdir())
            raise

    def inject(self, *args):
        """`emu inject ...` from another terminal."""
        r = subprocess.run(_emu() + ["inject", *args, "--socket", self.sock], capture_output=True,
                           text=True, timeout=60, cwd=tempfile.gettempdir())
        assert r.returncode == 0, r.stderr

    def stop(self):
        subprocess.run(_emu() + ["stop", "--socket", self.sock], capture_output=True, timeout=60,
                       cwd=tempfile.gettempdir())
        import psutil
        assert not psutil.pid_exists(self.pid) or \
            psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE
        assert not [n for n in os.listdir("/dev/shm") if n.startswith("emu-%d-" % self.pid)]
        shutil.rmtree(os.path.dirname(self.sock), ignore_errors=True)


class Worker:
    """`emu run-worker ...` (or `python -m workers.X`) as a subprocess, stdout and
    stderr together as a terminal shows them."""

    def __init__(self, argv, cwd):
        import psutil
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, cwd=cwd)
        self.out = Lines(self.p)
        self.banner = self.out.until(r"vmm +(\w+): tgid \d+, 1 vCPU")
        self.procs = [psutil.Process(self.p.pid)] + psutil.Process(self.p.pid).children(recursive=True)

    def send(self, line):
        """A command; a worker that already died (the VMM ended itself) reads none."""
        try:
            self.p.stdin.write(line.encode() + b"\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass

    def rest(self, timeout=30):
        """Everything up to EOF and the exit status."""
        code = self.p.wait(timeout)
        self.out.buf += self.p.stdout.read()
        return code, self.out.seen + [x.decode() for x in self.out.buf.split(b"\n") if x]

    def close(self):
        import psutil
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        try:
            self.p.stdin.close()
        except BrokenPipeError:                  # a command it never read
            pass
        self.p.stdout.close()
        gone, alive = psutil.wait_procs(self.procs, timeout=5)
        assert not alive, alive


def _teardown(d, w) -> None:
    """The worker goes, then the daemon, whatever the worker did."""
    try:
        if w:
            w.close()
    finally:
        d.stop()


def _poison_touched_page(d, w, private=False):
    """The guest writes GPA (and the page turns private if asked); the page's frame
    gets a latent error from another terminal.  The frame."""
    w.send("write 0 %#x" % GPA)
    w.out.until(r"vcpu0 +result: 8")
    if private:
        w.send("private %#x" % GPA)
        w.out.until(r"GPA 0x3000 converted to private")
    w.send("pfn %#x" % GPA)
    pfn = int(w.out.until(r"GPA 0x3000 is pfn (0x[0-9a-f]+)%s" % (r" \(private\)" if private else ""))
              .group(1), 16)
    d.inject("hw-poison", "%#x" % pfn)
    return pfn


def _times_in_order(lines):
    ts = [float(m.group(1)) for m in map(re.compile(r"^ *(\d+\.\d+) ms  ").match, lines) if m]
    assert ts == sorted(ts), "\n".join(lines)


def test_firecracker_like_exits_149_after_its_log_line():
    """python -m workers.firecracker_like (the installed workers package; from a
    source tree's root it needs the core built in place, and says so): the guest loads
    from a page with a latent error; KVM's GUP hits the poison, the vCPU thread gets
    SIGBUS BUS_MCEERR_AR, Firecracker logs it and _exit(149)s.  The log line is on
    the terminal, then the status."""
    d = Daemon()
    w = None
    try:
        w = Worker([sys.executable, "-m", "workers.firecracker_like", "--socket", d.sock],
                   cwd=tempfile.gettempdir())
        assert w.banner.group(1) == "FirecrackerLike"
        _poison_touched_page(d, w)
        w.send("read 0 %#x" % GPA)
        w.send("quit")
        code, lines = w.rest()
        assert code == 149
        text = "\n".join(lines)
        assert re.search(r"vcpu0 +guest reads 8 bytes at GPA 0x3000\n.* firecracker Shutting down VM "
                         r"after intercepting signal 7, code 4\.\n.* vmm +the worker exited with "
                         r"status 149$", text), text
        assert "result" not in lines[-2]
        _times_in_order(lines)
    finally:
        _teardown(d, w)


def test_cloud_hypervisor_like_dies_of_sigbus():
    """cloud-hypervisor has no SIGBUS handler: the consumed error kills it, with
    nothing logged; `emu run-worker` dies of the same signal (a shell sees 135)."""
    d = Daemon()
    w = None
    try:
        w = Worker(_emu() + ["run-worker", "cloud-hypervisor-like", "--socket", d.sock],
                   cwd=tempfile.gettempdir())
        _poison_touched_page(d, w)
        w.send("host-read 0")
        w.out.until(r"vmm +device model read 0{16} at GPA 0x0")
        w.send("read 0 %#x" % GPA)
        w.send("quit")
        code, lines = w.rest()
        assert code == -signal.SIGBUS
        assert lines[-2].endswith("vcpu0   guest reads 8 bytes at GPA 0x3000"), lines
        assert lines[-1].endswith("vmm     the worker was killed by SIGBUS"), lines
        sh = subprocess.run(["sh", "-c", 'exit 135'])           # what a shell reports for it
        assert sh.returncode == 128 + signal.SIGBUS
    finally:
        _teardown(d, w)


def test_cloud_hypervisor_like_shuts_down_on_a_private_page_error():
    """guest_memfd RAM, the page private: KVM_RUN fails with EHWPOISON and
    KVM_EXIT_MEMORY_FAULT, kvm-ioctls' MemoryFault exit is unhandled, cloud-hypervisor
    logs "VCPU generated error" and shuts the VM down (status 0)."""
    d = Daemon()
    w = None
    try:
        w = Worker(_emu() + ["run-worker", "cloud-hypervisor-like", "--ram", "gmem", "--size", "64K",
                             "--socket", d.sock], cwd=tempfile.gettempdir())
        _poison_touched_page(d, w, private=True)
        w.send("read 0 %#x" % GPA)
        code, lines = w.rest()
        assert code == 0
        assert lines[-1].endswith(
            "cloud-hypervisor VCPU generated error: VcpuRun(Unexpected exit reason on vcpu run: "
            "MemoryFault { flags: 8, gpa: 12288, size: 4096 })"), lines
    finally:
        _teardown(d, w)


RECOVERY = {
    # pattern: (what the VMM logs after KVM_RUN's EHWPOISON, the guest's result)
    "punch": ("punch hole over GPA 0x3000", r"b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00'"),
    "replace": ("punch hole over GPA 0x3000", r"b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00'"),
    "degrade": ("memory error at GPA 0x3000: injecting a machine check", r"\('killed', 12288\)"),
    "shutdown": ("memory error at GPA 0x3000: shutting down", r"'shutdown'"),
}


@pytest.mark.parametrize("pattern", list(RECOVERY))
def test_recovering_worker_patterns(pattern):
    """A private guest_memfd page with a latent error: KVM_RUN returns EHWPOISON with
    the GPA (KVM_MEMORY_EXIT_FLAG_PRIVATE) and the VMM applies its pattern; it lives
    on and quits with status 0."""
    d = Daemon()
    w = None
    try:
        w = Worker(_emu() + ["run-worker", "recovering", "--pattern", pattern, "--ram", "gmem",
                             "--socket", d.sock], cwd=tempfile.gettempdir())
        assert w.banner.group(1) == "RecoveringVmm"
        pfn = _poison_touched_page(d, w, private=True)
        w.send("read 0 %#x" % GPA)
        log, result = RECOVERY[pattern]
        w.out.until(r"recovering KVM_RUN: Memory page has hardware error at GPA 0x3000 \(private\)")
        w.out.until(r"recovering %s" % re.escape(log))
        w.out.until(r"vcpu0 +result: %s" % result)
        w.send("pfn %#x" % GPA)
        w.send("quit")
        code, lines = w.rest()
        assert code == 0
        if pattern in ("punch", "replace"):                 # a fresh page behind the GPA
            new = int(re.search(r"GPA 0x3000 is pfn (0x[0-9a-f]+)", lines[-1]).group(1), 16)
            assert new != pfn
        _times_in_order(lines)
    finally:
        _teardown(d, w)


def test_other_workers_bad_arguments_are_one_line():
    for argv, word in ((["recovering"], "--pattern"), (["recovering", "--pattern", "pray"], "pray"),
                       (["firecracker-like", "--ram", "rom"], "--ram"),
                       (["cloud-hypervisor-like", "--size", "5000"], "--size")):
        r = subprocess.run(_emu() + ["run-worker", *argv], capture_output=True, text=True, timeout=60,
                           cwd=tempfile.gettempdir())
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and word in r.stderr, r.stderr
