"""Scenario files: the format's one-line errors (file:line: key), a run's figures
read from the machine, `emu run`, and a policy decision changing the outcome."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

import emu.scenario as S

CWD = tempfile.gettempdir()

BASE = """\
[machine]
ram = "64M"

[[process]]
name = "vmm"
mce_kill = "early"

[[process]]
name = "other"

[[memory]]
name = "m"
type = "memfd"
size = "64K"
mapped_by = ["vmm", "other"]

[[step]]
who = "vmm"
do = "write"
memory = "m"
offset = 0x1000

[[step]]
who = "other"
do = "read"
memory = "m"
offset = 0x1000

[[step]]
do = "inject"
error = "deferred"
memory = "m"
offset = 0x1000
"""


def _cli():
    exe = shutil.which("emu")
    return [exe] if exe else [sys.executable, "-m", "emu.cli"]


@pytest.mark.parametrize("edit, line, key, words", [
    (("size = \"64K\"", "size = \"64Q\""), 14, "memory[0].size", "expected a size"),
    (("mce_kill = \"early\"", "mce_kill = \"earli\""), 6, "process[0].mce_kill", "not one of"),
    (("who = \"other\"", "who = \"nobody\""), 24, "step[1].who", "no thread named 'nobody'"),
    (("offset = 0x1000\n\n[[step]]\nwho = \"other\"", "offset = 0x10000\n\n[[step]]\nwho = \"other\""),
     21, "step[0].offset", "past the end"),
    (("error = \"deferred\"", "error = \"later\""), 31, "step[2].error", "not one of"),
    (("ram = \"64M\"", "ram = \"64M\"\nswap = 1"), 3, "machine.swap", "unknown key"),
    (("do = \"write\"", "do = \"fly\""), 19, "step[0].do",
     "'fly' is not one of"),
    (("mapped_by = [\"vmm\", \"other\"]", "mapped_by = [\"vmm\", \"ghost\"]"), 15, "memory[0].mapped_by",
     "no process named 'ghost'"),
])
def test_bad_files_get_one_line_with_the_line_and_key(tmp_path, edit, line, key, words):
    text = BASE.replace(*edit)
    assert text != BASE
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(S.ScenarioError) as e:
        S.load(str(p))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("%s:%d: %s: " % (p, line, key)), msg
    assert words in msg
    r = subprocess.run(_cli() + ["run", str(p)], capture_output=True, text=True, timeout=60, cwd=CWD)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and ("%s:%d: %s" % (p, line, key)) in r.stderr


def test_toml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text(BASE.replace("name = \"other\"", "name = other"))
    with pytest.raises(S.ScenarioError) as e:
        S.load(str(p))
    assert str(e.value) == "%s:9: Invalid value" % p


def test_a_run_is_read_from_the_machine(tmp_path):
    """A deferred error on a dirty shared memfd page mapped by two processes: the
    early threads get AO (lsb 12), the page leaves both page tables (two hwpoison
    entries: 8 KiB unmapped), HWPoison and HardwareCorrupted count one page, and
    the other process's later read is SIGBUS AR without a machine check."""
    trace = tmp_path / "t.json"
    out = S.run(S.loads(BASE, "base.toml"), "mf-delayed-fix", trace=str(trace))
    assert out["error"] is None
    # "other" is forked from vmm and keeps its PR_MCE_KILL (copy_process keeps PF_MCE_*)
    assert out["signals"] == ["vmm: AO lsb 12", "other: AO lsb 12"]
    assert out["host_unmapped"] == 8192
    assert out["hwpoison_running"] == 4096 and out["hardware_corrupted_running"] == 4
    assert out["hwpoison_after"] == 4096 and out["hardware_corrupted_after"] == 4
    assert out["recovery"] == ["dirty LRU page: Delayed"]
    assert out["mces"] == 0 and out["panic"] is None
    assert out["bad_memory"] == {"vmm m+0x1000": "SIGBUS AR", "other m+0x1000": "SIGBUS AR"}
    assert out["processes"] == {"vmm": "ran to the end", "other": "ran to the end"}
    assert any("memory_failure(" in e["what"] for e in out["timeline"])
    doc = json.loads(trace.read_text())
    assert any(ev.get("name") == "signal" for ev in doc["traceEvents"])


def test_a_policy_decision_changes_the_outcome(tmp_path):
    """The scenario on a guest_memfd, then under a user policy that keeps a failed
    guest_memfd page mapped (host_unmap = "none"): nothing is unmapped, and the other process's read now
    consumes the poison (a machine check) instead of a SIGBUS from the fault."""
    pol = tmp_path / "keep.py"
    pol.write_text(textwrap.dedent("""
        from emu.kernel.policies import MfDelayedFix

        class KeepMapped(MfDelayedFix):
            name = "keep-mapped"
            host_unmap = "none"
    """))
    gmem = BASE.replace('type = "memfd"', 'type = "guest_memfd"').replace(
        '[[memory]]', '[[vm]]\nname = "vm0"\nprocess = "vmm"\nvcpus = 0\n\n[[memory]]')
    out = S.run(S.loads(gmem, "gmem.toml"), "mf-delayed-fix")
    assert out["host_unmapped"] == 8192
    assert out["bad_memory"] == {"vmm m+0x1000": "SIGBUS AR", "other m+0x1000": "SIGBUS AR"}
    out = S.run(S.loads(gmem, "gmem.toml"), "%s:KeepMapped" % pol)
    assert out["error"] is None
    assert out["host_unmapped"] == 0
    assert out["bad_memory"] == {"vmm m+0x1000": "machine check", "other m+0x1000": "machine check"}
    assert out["mces"] == 0                       # counted at the end of the steps


def test_emu_run_prints_timeline_and_outcome_and_lists_the_library():
    r = subprocess.run(_cli() + ["run", "--list"], capture_output=True, text=True, timeout=60, cwd=CWD)
    assert r.returncode == 0 and "stock" in r.stdout
    r = subprocess.run(_cli() + ["run", "stock", "--policy", "initial"], capture_output=True, text=True,
                       timeout=120, cwd=CWD)
    assert r.returncode == 0, r.stderr
    assert "memory_failure(" in r.stdout and "unmapped from host page tables" in r.stdout
    r = subprocess.run(_cli() + ["run", "stock", "--policy", "nope"], capture_output=True, text=True,
                       timeout=60, cwd=CWD)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "nope" in r.stderr


def test_no_leftovers_after_runs():
    """Whatever a run created is gone once it returns (shm objects are named after
    their supervisor's pid; other runs on this machine may be alive meanwhile)."""
    import psutil

    before = set(os.listdir("/dev/shm"))
    S.run(S.loads(BASE, "base.toml"), "eventual")
    new = [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("emu-")]
    assert [n for n in new if not psutil.pid_exists(int(n.split("-")[1]))] == []


def test_a_non_mc_safe_kernel_read_panics_the_run():
    """read(2) of a shmem page with a latent error: the kernel's own copy consumes
    it (not MC-safe) and the machine panics; the run stops its steps there and
    reports the panic and the machine check, and nothing else is tried."""
    text = """
        [machine]
        ram = "64M"
        [[process]]
        name = "vmm"
        [[memory]]
        name = "m"
        type = "memfd"
        size = "64K"
        [[step]]
        who = "vmm"
        do = "write"
        memory = "m"
        [[step]]
        do = "inject"
        error = "latent"
        memory = "m"
        [[step]]
        who = "vmm"
        do = "pread"
        memory = "m"
        [[step]]
        who = "vmm"
        do = "read"
        memory = "m"
    """
    out = S.run(S.loads(textwrap.dedent(text), "panic.toml"), "mf-delayed-fix")
    assert out["error"] is None
    assert out["panic"] == "Fatal machine check" and out["mces"] == 1
    assert out["processes"] == {"vmm": "stopped with the machine"}
    assert out["bad_memory"] == {} and out["signals"] == []
    steps = [e["what"] for e in out["timeline"] if e["who"] == "step"]
    assert len(steps) == 3 and steps[-1].endswith("kernel panic: Fatal machine check")
    assert "Kernel panic - not syncing: Fatal machine check" in "\n".join(out["dmesg"])


def test_the_readme_example_runs_and_holds():
    """The scenario shown in README.md, as a user would copy it."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    text = re.search(r"```toml\n(.*?)```", readme, re.S).group(1)
    out = S.run(S.loads(text, "README.md"), "mf-delayed-fix")
    assert out["expect"] == {"ok": True, "failures": []}, out["expect"]


def test_what_the_machine_refuses_is_a_setup_error_not_a_crash():
    """Two memslots at one gpa: KVM_SET_USER_MEMORY_REGION2 says EEXIST; the run
    reports it in one line and leaves nothing behind.  Huge pages that cannot fit in
    the machine's RAM are refused when the file is read."""
    bad = BASE.replace("[[memory]]", textwrap.dedent("""\
        [[vm]]
        name = "vm0"
        process = "vmm"
        type = "default"
        vcpus = 0
        slots = [{ memory = "m", gpa = 0 }, { memory = "m", gpa = 0 }]

        [[memory]]"""))
    out = S.run(S.loads(bad, "overlap.toml"), "mf-delayed-fix")
    assert out["error"] == "setup: vmm: init: error EEXIST (memslot overlaps slot 0)"
    assert out["expect"] == {"ok": None, "failures": []}
    with pytest.raises(S.ScenarioError) as e:
        S.loads(BASE.replace('ram = "64M"', 'ram = "64M"\nhugepages = { "2M" = 2 }'), "hp.toml")
    assert str(e.value) == ("hp.toml:3: machine.hugepages: 4M of huge pages do not fit in "
                            "ram = '64M': the first 64M stay with the buddy allocator")


@pytest.mark.parametrize("vmm, ends, line", [
    ("firecracker-like", "exit 1 (vcpu0)",
     "Unexpected exit reason on vcpu run: MemoryFault { flags: 8, gpa: 12288, size: 4096 }"),
    ("cloud-hypervisor-like", "exit 0 (vcpu0)",
     "VCPU generated error: VcpuRun(Unexpected exit reason on vcpu run: "
     "MemoryFault { flags: 8, gpa: 12288, size: 4096 })"),
    ("qemu-like", "ran to the end", "QEMU: error: kvm run failed Memory page has hardware error"),
])
def test_vmm_models_end_a_guest_memfd_ehwpoison_their_own_way(vmm, ends, line):
    """KVM_RUN -1/EHWPOISON on a private guest_memfd page (MEMORY_FAULT, flags
    PRIVATE): Firecracker's handle_kvm_exit ends the VM with GenericError (1),
    cloud-hypervisor shuts the VM down, QEMU pauses it."""
    text = textwrap.dedent("""
        [machine]
        ram = "64M"
        [[process]]
        name = "vmm"
        vmm = "%s"
        [[vm]]
        name = "vm0"
        process = "vmm"
        vcpus = 1
        slots = [{ memory = "ram", gpa = 0 }]
        [[memory]]
        name = "ram"
        type = "guest_memfd"
        size = "64K"
        private = [[0x3000, 0x1000]]
        [[step]]
        who = "vcpu0"
        do = "write"
        memory = "ram"
        offset = 0x3000
        [[step]]
        do = "inject"
        error = "deferred"
        memory = "ram"
        offset = 0x3000
        [[step]]
        who = "vcpu0"
        do = "read"
        memory = "ram"
        offset = 0x3000
    """ % vmm)
    out = S.run(S.loads(text, "vmm.toml"), "mf-delayed-fix")
    assert out["error"] is None
    assert out["processes"] == {"vmm": ends}
    assert out["exits"] == ["vcpu0: EHWPOISON (private)"]
    assert line in [e["what"] for e in out["timeline"] if e["who"] == "vcpu0"]
