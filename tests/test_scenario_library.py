"""The scenario library (emu/scenarios/*.toml): each scenario reproduces a table or a
claim of the design documents, and its [expect.<policy>] tables say what the source
says each policy gives.  Every (scenario, policy) with an expectation is run here and
must give exactly that.

Sources: the 2025-07-24 "minimum support" and 2025-08-07 "circling back on memory
failure" guest_memfd upstream calls, the MF_DELAYED fix's decision tables A-D (Lisa
Wang's selftests and table), the presets' own descriptions; each file cites its own.
"""
import json

import pytest

import emu.scenario as S
from emu.kernel.policies import PRESETS

LIBRARY = S.library()
CASES = [(name, pol) for name, path in LIBRARY.items() for pol in S.load(path).expect]


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_scenario_is_documented(name):
    """A summary, a description that cites its source, a default comparison of known
    policies, and an expectation only for a policy it compares."""
    sc = S.load(name)
    assert sc.name == name
    assert sc.summary and sc.description
    assert sc.policies and all(p in PRESETS for p in sc.policies), sc.policies
    assert set(sc.expect) <= set(sc.policies), (set(sc.expect), sc.policies)


@pytest.mark.parametrize("name,policy", CASES, ids=["%s-%s" % c for c in CASES])
def test_library_scenario_gives_what_its_source_says(name, policy):
    out = S.run(S.load(name), policy)
    check = out["expect"]
    assert check["ok"] is True, "%s under %s:\n  %s\n(error: %s)\ntimeline:\n%s" % (
        name, policy, "\n  ".join(check["failures"]), out.get("error"),
        "\n".join(json.dumps(e) for e in out.get("timeline", [])[-30:]))
