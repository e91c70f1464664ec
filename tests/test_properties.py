"""Property-based tests: random sequences of mmap/munmap/read/write/madvise
(MADV_HWPOISON, DONTNEED, SOFT_OFFLINE)/fallocate punch hole/fork/clone/guest
access/injection (corrupt_pfn, hw_poison, hw_detect)/unpoison/guest_memfd conversion,
each run in a worker process on the Cython core and on the pure-Python reference CPU
(emu._pyref), each on a fresh supervisor booted with a drawn policy preset.  After
every step the emulated kernel's invariants hold (host.check_invariants() is
empty), and the two runs agree byte for byte on data read, on errnos, on every
signal (si_code, si_addr as mapping and offset, si_addr_lsb) and on the worker's
exit status.

CI runs a few derandomized examples (profile "ci"); HYPOTHESIS_PROFILE=dev runs
more, and benchmarks/soak.py runs thousands."""
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import emu
from emu import _oracle as O

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck), print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

pytestmark = pytest.mark.timeout(900)


@st.composite
def op_lists(draw, min_size=1, max_size=14):
    n = draw(st.integers(min_size, max_size))
    return O.gen_ops(lambda lo, hi: draw(st.integers(lo, hi)), n)


POLICIES = ["mf-delayed-fix", "v6.18", "minimum", "initial", "eventual"]


def run_both(ops, policy="mf-delayed-fix"):
    """The sequence on each backend, each on its own fresh supervisor."""
    out = {}
    for backend in ("cython", "python"):
        h = emu.start(ram=O.RAM, hugepages=O.HUGEPAGES, policy=policy)
        try:
            out[backend] = O.run_sequence(h, ops, backend)
        finally:
            h.close()
    return out


def check(ops, policy="mf-delayed-fix"):
    res = run_both(ops, policy)
    for backend, r in res.items():
        assert not r["hung"] and not r["error"], (backend, r["error"])
        assert r["bad"] == [], (backend, r["bad"])
        assert len(r["steps"]) == len(ops) or r["exit"] != 0, (backend, r)
    assert O.diff(res["cython"], res["python"]) is None, O.diff(res["cython"], res["python"])
    return res


# the paths every CI run covers, whatever hypothesis draws
GUEST_MCE = [("vm", 0), ("guest", 0, 8, 16, 1, 1), ("guest", 1, 0, 8, 1, 2), ("inject", 0, 0, 1),
             ("guest", 0, 0, 8, 0, 1), ("read", 0, 0, 8), ("convert", 1, 1, 1),
             ("guest", 1, 0, 8, 0, 2), ("inject", 0, 1, 2), ("punch", 0, 1, 1),
             ("guest", 1, 0, 8, 0, 0)]
ANON = [("anon", 3), ("write", 0, 4000, 300, 7), ("inject", 0, 0, 1), ("read", 0, 4090, 16),
        ("fork", 0, 4096, 0), ("clone", 0, 100, 1), ("madvise", 0, 1, 1, 0), ("read", 0, 4096, 8),
        ("madvise", 0, 2, 1, 1), ("read", 0, 2 * 4096, 8), ("unpoison",), ("munmap", 0, 1, 1),
        ("read", 0, 0, 8)]
FILES = [("shmem", 4), ("write", 0, 0, 256, 1), ("madvise", 0, 1, 1, 0), ("punch", 0, 1, 1),
         ("read", 0, 4096, 8), ("madvise", 0, 2, 1, 2), ("read", 0, 2 * 4096, 8), ("huge",),
         ("write", 1, 0, 8, 2), ("inject", 1, 3, 0), ("read", 1, 0, 8), ("inject", 1, 0, 2),
         ("fork", 1, 0, 0), ("punch", 1, 0, 1), ("read", 1, 0, 8)]
HUGE_GMEM = [("vm", 1), ("prctl", 1), ("read", 0, 0, 8), ("guest", 2, 0, 8, 1, 0),
             ("inject", 0, 2, 0), ("guest", 2, 0, 8, 0, 0), ("read", 0, 3 * 4096, 8),
             ("convert", 4, 2, 1), ("guest", 4, 0, 8, 0, 2), ("sigdfl",), ("read", 0, 2 * 4096, 8),
             ("read", 0, 0, 8)]


@given(ops=op_lists(), policy=st.sampled_from(POLICIES))
@example(ops=GUEST_MCE, policy="mf-delayed-fix")
@example(ops=ANON, policy="v6.18")
@example(ops=FILES, policy="mf-delayed-fix")
@example(ops=HUGE_GMEM, policy="mf-delayed-fix")
@example(ops=HUGE_GMEM, policy="eventual")
def test_random_sequences_keep_invariants_and_backends_agree(ops, policy):
    check(ops, policy)


def test_the_examples_reach_the_paths_they_name():
    """The fixed examples are not vacuous: they read data, get SIGBUS with each
    si_addr_lsb, errnos and guest exits."""
    res = {name: check(ops)["cython"] for name, ops in
           (("guest", GUEST_MCE), ("anon", ANON), ("files", FILES))}
    sigs = {(s[1], s[3]) for r in res.values() for st_ in r["steps"] for s in st_["sigs"]}
    assert (4, 12) in sigs and (4, 21) in sigs              # BUS_MCEERR_AR, 4K and 2M
    guest = [s["out"] for s in res["guest"]["steps"] if s["op"][0] == "guest"]
    assert ["ok", [["sync", "w"]]] in guest
    assert any(o[0] == "ok" and o[1][0][0] == "err" for o in guest)   # a memory-fault exit
    forked = next(s["out"] for s in res["anon"]["steps"] if s["op"][0] == "fork")
    assert forked == ["ok", [0, ["07" * 8, []]]]            # the child's copy of page 1
    kinds = {(s["op"][0], s["out"][0]) for r in res.values() for s in r["steps"]}
    assert {("read", "stopped"), ("unpoison", "errno"), ("inject", "ok")} <= kinds


def test_soak_runs_and_reports(capsys):
    """benchmarks/soak.py: a short run on both backends prints its counts and figures
    and exits 0 (the figures themselves are for benchmarks, not asserted)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "soak.py")
    spec = importlib.util.spec_from_file_location("soak", path)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    assert soak.main(["--sequences", "6", "--batch", "3", "--seed", "3", "--max-ops", "8"]) == 0
    out = capsys.readouterr().out
    assert "sequences run: 6 per backend (12 in all)" in out
    assert "invariant violations: 0 (in 0 sequences)" in out
    assert "backend disagreements: 0 sequences" in out
    assert out.count("| ratio") == 4
