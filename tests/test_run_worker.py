"""`emu run-worker qemu-like`: a QEMU-shaped VMM attached to a running daemon and
driven step by step, with errors injected from outside while it runs; it works
from the repository root too."""
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time

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
