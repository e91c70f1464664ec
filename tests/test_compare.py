"""`emu compare` and user-defined policies."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import emu
from emu.compare import compare

CWD = tempfile.gettempdir()


def test_compare_reads_every_row_from_the_machine():
    """The stock scenario under four policies.  Every figure is measured (page
    tables, stage-2, kpageflags, the trace, the threads' own signals) and must be
    what the scenario file expects of each policy; the rows are those figures."""
    cols = {c["policy"]: c for c in compare(["mf-delayed-fix", "minimum", "initial", "eventual"])}
    for p, c in cols.items():
        assert "error" not in c, c
        assert c["expect"]["ok"] is True, (p, c["expect"]["failures"])
    m, i, e = cols["minimum"], cols["initial"], cols["eventual"]
    # minimum keeps everything mapped: the second process consumes the poison
    assert m["measured"]["host_unmapped"] == 0 and m["host_unmapped"] == "0 B"
    assert m["measured"]["bad_memory"]["second gmem+0x5000"] == "machine check"
    assert m["offline"] == "0 B while running, 8 KiB after"      # HWPoison only on release
    # initial unmaps the whole file from every process (3 MiB + 2 MiB mapped);
    # eventual only the failed 4K page, from both
    assert i["measured"]["host_unmapped"] == 5 << 20 and i["host_unmapped"] == "5 MiB"
    assert e["measured"]["host_unmapped"] == 2 * 4096 and e["s2_zapped"] == "4 KiB"
    assert "qemu: AO lsb 21" in i["signals"] and "qemu: AO lsb 12" in e["signals"]
    assert i["gmem_usable"] == "no"
    f = cols["mf-delayed-fix"]
    assert f["gmem_usable"] == "partly (1 of 2 2M ranges)"      # the whole first huge page is lost
    assert f["exits"] == "vcpu0: EHWPOISON (private)"
    assert f["offline"] == "2052 KiB while running, 2052 KiB after"


def test_compare_cli_json_table_scenario_and_errors(tmp_path):
    exe = shutil.which("emu")
    cmd = [exe] if exe else [sys.executable, "-m", "emu.cli"]
    r = subprocess.run(cmd + ["compare", "v6.18", "eventual", "--json"], capture_output=True,
                       text=True, timeout=180, cwd=CWD)
    assert r.returncode == 0, r.stderr
    cols = json.loads(r.stdout)
    assert [c["policy"] for c in cols] == ["v6.18", "eventual"]
    assert "vcpu0: SI_KERNEL lsb 0" in cols[0]["signals"]          # kill_me_now before the fix
    assert cols[1]["measured"]["s2_zapped"] == 4096
    page = tmp_path / "cmp.html"
    r = subprocess.run(cmd + ["compare", "initial", "eventual", "--html", str(page)], capture_output=True,
                       text=True, timeout=180, cwd=CWD)
    assert r.returncode == 0, r.stderr
    doc = page.read_text()
    assert doc.count("<svg") == 2 and "initial" in doc and "eventual" in doc and "<script" not in doc
    r = subprocess.run(cmd + ["compare", "nope"], capture_output=True, text=True, timeout=60, cwd=CWD)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "nope" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[[process]]\nname = 1\n")
    r = subprocess.run(cmd + ["compare", "--scenario", str(bad)], capture_output=True, text=True,
                       timeout=60, cwd=CWD)
    assert r.returncode == 1 and r.stderr.strip() == "emu: %s:2: process[0].name: expected a string, " \
        "got 1" % bad


def test_user_defined_policy_from_a_file(tmp_path):
    path = tmp_path / "mypolicy.py"
    path.write_text(textwrap.dedent("""
        from emu.kernel.policies import MfDelayedFix

        class NoEarly(MfDelayedFix):
            name = "no-early"
            early_kill = "ignored"
    """))
    with emu.start(ram="64M", policy="%s:NoEarly" % path) as host:
        p = host.policy()
        assert p["name"] == "no-early" and p["decisions"]["early_kill"] == "ignored"
    for bad in ("%s:Missing" % path, "%s:NoEarly" % (tmp_path / "absent.py")):
        try:
            emu.start(ram="64M", policy=bad)
        except ValueError as e:
            assert "policy" in str(e)
        else:
            raise AssertionError("accepted %s" % bad)
    assert os.path.exists(path)
