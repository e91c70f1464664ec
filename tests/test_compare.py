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


def test_compare_presets_differ_as_the_seed_tables_say():
    cols = {c["policy"]: c for c in compare(["mf-delayed-fix", "minimum", "initial", "eventual"])}
    for c in cols.values():
        assert "error" not in c, c
    # minimum: nothing unmapped, failures tracked, repeated machine checks, the
    # second process still reaches the bad memory, guest_memfd stays usable
    m = cols["minimum"]
    assert m["host_unmapped"] == "0 B" and m["s2_unmapped"] == "0 B"
    assert int(m["mces"]) >= 2
    assert m["second_process"].startswith("yes")
    assert m["gmem_usable"] == "yes"
    assert m["offline"].startswith("0 B while running")      # tracked, no frame flagged yet
    assert "main" not in m["signals"]                       # PR_MCE_KILL_EARLY not handled
    # initial: the whole file unmapped, guest_memfd unusable
    i = cols["initial"]
    assert i["host_unmapped"] == "4 MiB" and i["gmem_usable"] == "no"
    assert "main: AO lsb 21" in i["signals"]
    # eventual: only the failed 4K pages go, lsb 12, the file stays usable
    e = cols["eventual"]
    assert e["host_unmapped"] == "8 KiB" and e["gmem_usable"] == "yes"
    assert "main: AO lsb 12" in e["signals"]
    assert e["offline"].startswith("8 KiB while running")
    # today's kernel with the fix: the whole huge page of the folio the deferred error
    # hit, 4 KiB of the one the private conversion had already split
    f = cols["mf-delayed-fix"]
    assert f["offline"].startswith("2052 KiB while running")
    assert "EHWPOISON (private)" in f["exits"]


def test_compare_cli_json_and_table():
    exe = shutil.which("emu")
    cmd = [exe] if exe else [sys.executable, "-m", "emu.cli"]
    r = subprocess.run(cmd + ["compare", "v6.18", "eventual", "--json"], capture_output=True,
                       text=True, timeout=120, cwd=CWD)
    assert r.returncode == 0, r.stderr
    cols = json.loads(r.stdout)
    assert [c["policy"] for c in cols] == ["v6.18", "eventual"]
    assert "SI_KERNEL" in cols[0]["signals"]
    r = subprocess.run(cmd + ["compare", "nope"], capture_output=True, text=True, timeout=60, cwd=CWD)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "nope" in r.stderr


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
