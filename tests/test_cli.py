"""The `emu` command as a user runs it: one-line errors, the daemon's life cycle,
injection, status and the demo."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from emu.shm import runtime_dir

CWD = tempfile.gettempdir()        # run outside the checkout: use the installed package


def emu_cmd(*args, timeout=120):
    exe = shutil.which("emu")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "emu.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=CWD)


@pytest.mark.parametrize("args", [
    ["inject", "bogus", "1"], ["inject", "corrupt-pfn", "zz"], ["nosuch"],
    ["daemon", "--ram", "lots"], ["daemon", "--policy", "nope"], ["daemon", "--sysctl", "x"],
])
def test_errors_are_one_line(args):
    r = emu_cmd(*args)
    assert r.returncode != 0
    assert r.stderr.startswith("emu: ") and r.stderr.count("\n") == 1, r.stderr


def test_no_daemon_is_one_line(tmp_path):
    r = emu_cmd("status", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1
    assert r.stderr.startswith("emu: no supervisor at ") and r.stderr.count("\n") == 1


def test_daemon_background_status_inject_dmesg_stop():
    sock = os.path.join(runtime_dir(), "cli-test-%d.sock" % os.getpid())
    r = emu_cmd("daemon", "--background", "--socket", sock, "--ram", "32M",
                "--policy", "v6.18", "--sysctl", "vm.memory_failure_early_kill=1")
    assert r.returncode == 0 and "ready" in r.stdout, r.stderr
    try:
        r = emu_cmd("status", "--socket", sock)
        assert "policy            v6.18" in r.stdout
        assert "vm.memory_failure_early_kill=1" in r.stdout
        assert emu_cmd("inject", "corrupt-pfn", "0x1000", "--socket", sock).returncode == 0
        r = emu_cmd("inject", "corrupt-pfn", "0x1000", "--socket", sock)
        assert r.returncode == 1 and "Memory page has hardware error" in r.stderr
        r = emu_cmd("dmesg", "--socket", sock)
        assert "Memory failure: 0x1000: recovery action for free buddy page: Recovered" in r.stdout
        r = emu_cmd("status", "--socket", sock, "--json")
        assert '"recovered": 1' in r.stdout
        r = emu_cmd("daemon", "--socket", sock, "--ram", "32M")
        assert r.returncode == 1 and "already running" in r.stderr
    finally:
        emu_cmd("stop", "--socket", sock)
    for _ in range(500):
        if not os.path.exists(sock):
            break
        import time

        time.sleep(0.01)
    assert not os.path.exists(sock)


def test_demo_tells_who_got_which_signal():
    r = emu_cmd("demo")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "SIGBUS BUS_MCEERR_AO to main" in out and "early kill: PR_MCE_KILL_EARLY" in out
    assert "SIGBUS BUS_MCEERR_AR to vcpu1" in out
    assert "recovery action for dirty unevictable LRU page: Delayed" in out
    assert "qemu exited normally." in out


def test_demo_v618_kills_the_vm_on_a_clean_page():
    r = emu_cmd("demo", "--policy", "v6.18")
    assert r.returncode == 0, r.stderr
    assert "SIGBUS SI_KERNEL to vcpu0" in r.stdout
    assert "qemu was killed by SIGBUS." in r.stdout
