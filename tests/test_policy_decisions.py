"""Single decisions, switched on in user-defined policies (file.py:Class)."""
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

import emu
from emu import uapi as u

MB2 = 2 << 20
GPA = 1 << 32
FLAGS = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
         | u.GUESTMEM_HUGETLB_FLAG_2MB)


def _policy(tmp_path, body):
    path = tmp_path / "pol.py"
    head = "from emu.kernel.policies import MfDelayedFix\n\nclass P(MfDelayedFix):\n    name = 'p'\n"
    path.write_text(head + textwrap.indent(textwrap.dedent(body), "    "))
    return "%s:P" % path


# ================================================================== validation
BAD = [   # (class body, what the one-line error must say)
    ('host_unmap = "nnone"', ["host_unmap = 'nnone'", "'folio' | 'page' | 'none' | 'file'",
                              "did you mean 'none'"]),
    ('stage2_unmap = "Folio"', ["stage2_unmap = 'Folio'", "'folio' | 'page' | 'none' | 'file'"]),
    ('early_kill = "kvm-owner"', ["early_kill = 'kvm-owner'", "'honoured' | 'ignored' | 'kvm_owner'",
                                  "did you mean 'kvm_owner'"]),
    ('hwpoison_mark = "MCE"', ["hwpoison_mark = 'MCE'", "'mce' | 'release'"]),
    ('deferred_failure = "sigbus"', ["deferred_failure = 'sigbus'", "'defer' | 'sigbus_current'"]),
    ('gmem_after_failure = "broken"', ["'usable' | 'no_conversions' | 'unusable'"]),
    ('shmem_error_remove_folio_result = 5', ["shmem_error_remove_folio_result = 5", "0 | %d" % u.MF_DELAYED]),
    ("faults_check = 0", ["faults_check = 0", "True or False"]),
    ('split_on_poison = "yes"', ["split_on_poison = 'yes'", "True or False"]),
    ('host_umap = "none"', ["unknown decision 'host_umap'", "did you mean 'host_unmap'"]),
    ("splitonpoison = True", ["unknown decision 'splitonpoison'", "did you mean 'split_on_poison'"]),
    ("colour = 3", ["unknown decision 'colour'", "decisions: propagate_mf_delayed,"]),
    ('host_unmap = "page"', ["host_unmap = 'page' needs split_on_poison = True"]),
    ("name = 3", ["name must be a string"]),
]
CWD = tempfile.gettempdir()


def _emu(*args, timeout=120):
    exe = shutil.which("emu")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "emu.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=CWD)


@pytest.mark.parametrize("body,says", BAD, ids=[b for b, _ in BAD])
def test_bad_policy_refused_by_start(tmp_path, body, says):
    """emu.start refuses it before any supervisor starts: a one-line ValueError naming
    the decision and what it may be."""
    with pytest.raises(ValueError) as ei:
        emu.start(ram="64M", policy=_policy(tmp_path, body))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("policy P: ")
    for part in says:
        assert part in msg, msg


@pytest.mark.parametrize("cmd", ["daemon", "compare"])
@pytest.mark.parametrize("body,says", BAD[::3] + BAD[-5:-2], ids=[b for b, _ in BAD[::3] + BAD[-5:-2]])
def test_bad_policy_refused_by_the_cli(tmp_path, cmd, body, says):
    """`emu daemon --policy f.py:P` and `emu compare f.py:P`: one line on stderr, exit 1,
    no traceback, nothing started (no socket appears)."""
    sock = str(tmp_path / "emu.sock")
    args = (["daemon", "--socket", sock, "--policy"] if cmd == "daemon" else ["compare"])
    r = _emu(*args, _policy(tmp_path, body), timeout=60)
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("emu: policy P: "), r.stderr
    assert "Traceback" not in r.stderr
    for part in says:
        assert part in r.stderr, r.stderr
    assert not (tmp_path / "emu.sock").exists()


def test_policy_code_that_raises_is_a_one_line_error(tmp_path):
    """A policy file whose code fails (here a NameError) is the user's error, not a traceback."""
    path = tmp_path / "pol.py"
    path.write_text("from emu.kernel.policies import MfDelayedFix\n\n"
                    "class P(MfDelayedFix):\n    host_unmap = nnone\n")
    with pytest.raises(ValueError) as ei:
        emu.start(ram="64M", policy="%s:P" % path)
    assert "NameError" in str(ei.value) and "\n" not in str(ei.value)
    r = _emu("daemon", "--socket", str(tmp_path / "s"), "--policy", "%s:P" % path, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "NameError" in r.stderr, r.stderr


def test_valid_policy_with_helpers_is_accepted(tmp_path):
    """Methods and _private attributes are not decisions; every value the table lists
    loads, and host.policy() reports the decisions."""
    from emu.kernel import policies

    body = ('_note = "mine"\nsplit_on_poison = True\nhost_unmap = "page"\nstage2_unmap = "page"\n'
            'early_kill = "kvm_owner"\nshmem_error_remove_folio_result = 0\n'
            "def helper(self):\n    return 1\n")
    with emu.start(ram="64M", policy=_policy(tmp_path, body)) as host:
        d = host.policy()["decisions"]
        assert set(d) == set(policies.DECISIONS)
        assert (d["host_unmap"], d["stage2_unmap"], d["early_kill"]) == ("page", "page", "kvm_owner")
    for key, valid in policies.DECISIONS.items():
        for val in (valid if isinstance(valid, tuple) else (True, False)):
            klass = type("Q", (policies.MfDelayedFix,), {"split_on_poison": True, key: val})
            assert getattr(policies.load(klass), key) == val


def test_policy_instance_and_class_are_validated_too():
    """load() of a Policy instance or class checks the same table (instance attributes too)."""
    from emu.kernel import policies

    p = policies.MfDelayedFix()
    p.stage2_unmap = "pages"
    with pytest.raises(ValueError, match=r"stage2_unmap = 'pages' is not valid .*did you mean 'page'"):
        policies.load(p)
    with pytest.raises(ValueError, match=r"unknown decision 'early_kil'; did you mean 'early_kill'"):
        policies.load(type("Q", (policies.Eventual,), {"early_kil": "ignored"}))
    assert policies.load(policies.Eventual).host_unmap == "page"


def _gmem(host, size=2 * MB2):
    me = emu.attach(host, name="qemu")
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(size, FLAGS)
    hva = me.mmap(0, size, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, hva, gfd, 0)
    me.write(hva, b"\x11" * size)
    return me, vm, gfd, hva


def test_no_conversions_after_a_failure(tmp_path):
    with emu.start(ram="256M", hugepages={"2M": 4},
                   policy=_policy(tmp_path, 'gmem_after_failure = "no_conversions"')) as host:
        me, vm, gfd, hva = _gmem(host)
        me.gmem_convert(gfd, MB2, 4096, private=True)           # fine before
        host.corrupt_pfn(me.pagemap(hva).pfn + 3)
        with pytest.raises(OSError) as ei:
            me.gmem_convert(gfd, MB2 + 4096, 4096, private=True)
        assert ei.value.errno == u.EHWPOISON
        assert me.read(hva + MB2 + 8192, 1) == b"\x11"           # but the file stays usable


def test_deferred_failure_sigbus_current(tmp_path):
    pol = _policy(tmp_path, 'deferred_failure = "sigbus_current"')
    with emu.start(ram="256M", hugepages={"2M": 4}, policy=pol,
                   madvise_action_required=False) as host:
        me, vm, gfd, hva = _gmem(host)
        got = []

        class Unwind(Exception):
            pass

        def h(signum, info):
            got.append((info.si_code, info.si_addr, info.si_addr_lsb))
            raise Unwind

        emu.sigaction(signal.SIGBUS, h)
        with pytest.raises(Unwind):
            me.madvise(hva + 0x3000, 4096, u.MADV_HWPOISON)      # pre-6.11: no AR flag
        assert got == [(u.BUS_MCEERR_AR, hva + 0x3000, 21)]


@pytest.mark.parametrize("distribute", [True, False])
def test_distribute_on_split(tmp_path, distribute):
    pol = _policy(tmp_path, "split_on_poison = True\ndistribute_on_split = %s" % distribute)
    with emu.start(ram="256M", hugepages={"2M": 4}, policy=pol) as host:
        me, vm, gfd, hva = _gmem(host)
        head = me.pagemap(hva).pfn
        host.corrupt_pfn(head + 3)
        flagged = [p for p in range(head, head + 512) if host.kpageflags(p) & (1 << u.KPF_HWPOISON)]
        assert flagged == ([head + 3] if distribute else list(range(head, head + 512)))


@pytest.mark.parametrize("summarize", [True, False])
def test_summarize_on_merge(tmp_path, summarize):
    pol = _policy(tmp_path, "split_on_poison = True\nreturn_poisoned_to_hugetlb = True\n"
                  "summarize_on_merge = %s" % summarize)
    with emu.start(ram="256M", hugepages={"2M": 4}, policy=pol) as host:
        me, vm, gfd, hva = _gmem(host, MB2)
        head = me.pagemap(hva).pfn
        host.corrupt_pfn(head + 3)
        me.munmap(hva, MB2)
        vm.set_user_memory_region2(1, 0, GPA, 0)                 # delete the memslot
        me.close(gfd)
        types = [e["type"] for e in host.events()]
        assert ("hugetlb_merge" in types) == summarize
        assert ("hugetlb_free_unmerged" in types) == (not summarize)
        assert host.meminfo()["HugePages_Total"] == 3            # the huge page is gone either way
        assert host.kpageflags(head + 3) & (1 << u.KPF_HWPOISON)


# ================================================================== faults_check
class Unwind(Exception):
    pass


def _read_or_sigbus(me, addr):
    """(data, None) or (None, (si_code, si_addr, si_addr_lsb)) of the SIGBUS the read got."""
    got = []

    def h(signum, info):
        got.append((info.si_code, info.si_addr, info.si_addr_lsb))
        raise Unwind

    emu.sigaction(signal.SIGBUS, h)
    try:
        return me.read(addr, 4), None
    except Unwind:
        return None, got[0]


@pytest.mark.parametrize("check", [True, False])
def test_faults_check_on_a_host_refault_of_a_guest_memfd_page(tmp_path, check):
    """Audit A.3: host_unmap "none" leaves the poisoned page mapped; MADV_DONTNEED drops
    the PTE and the next access faults it in again.  With faults_check the fault finds
    PG_hwpoison (__do_fault) and SIGBUSes BUS_MCEERR_AR; without it the page is mapped
    and the access reads the data."""
    pol = _policy(tmp_path, 'host_unmap = "none"\nfaults_check = %s' % check)
    with emu.start(ram="64M", policy=pol) as host:
        me = emu.attach(host, name="qemu")
        vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        gfd = vm.create_guest_memfd(1 << 20, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
        ram = me.mmap(0, 1 << 20, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
        me.write(ram, b"\x5a" * 8192)
        pfn = me.pagemap(ram).pfn
        with pytest.raises(OSError) as ei:                       # still mapped: MF_FAILED
            host.corrupt_pfn(pfn)
        assert ei.value.errno == u.EBUSY
        assert host.kpageflags(pfn) & (1 << u.KPF_HWPOISON)
        assert me.pagemap(ram).present                           # host_unmap "none"
        me.madvise(ram, 4096, u.MADV_DONTNEED)
        data, sig = _read_or_sigbus(me, ram)
        if check:
            assert (data, sig) == (None, (u.BUS_MCEERR_AR, ram, 12))
        else:
            assert (data, sig) == (b"\x5a" * 4, None)
            assert me.pagemap(ram).present and me.pagemap(ram).pfn == pfn


def test_faults_check_false_leaves_other_memory_as_the_kernel_does(tmp_path):
    """faults_check is a guest_memfd decision: a shmem page still SIGBUSes."""
    pol = _policy(tmp_path, "faults_check = False")
    with emu.start(ram="64M", policy=pol) as host:
        me = emu.attach(host)
        fd = me.memfd_create("shm")
        me.ftruncate(fd, 1 << 20)
        ram = me.mmap(0, 1 << 20, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
        me.write(ram, b"\x5a" * 4096)
        pfn = me.pagemap(ram).pfn
        host.corrupt_pfn(pfn)
        me.munmap(ram, 1 << 20)                                  # drop the hwpoison entry
        ram = me.mmap(0, 1 << 20, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
        assert _read_or_sigbus(me, ram) == (None, (u.BUS_MCEERR_AR, ram, 12))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("check", [True, False])
def test_faults_check_on_a_host_fault_of_a_hugetlb_guest_memfd_page(tmp_path, check, split):
    """The same on a HugeTLB guest_memfd: a fresh mapping of the poisoned folio
    (hugetlb_no_page), or of the failed page of a split one (mapped 4K)."""
    body = "faults_check = %s\n" % check
    body += ('split_on_poison = True\nhost_unmap = "page"\n' if split else 'host_unmap = "none"\n')
    with emu.start(ram="256M", hugepages={"2M": 4}, policy=_policy(tmp_path, body)) as host:
        me, vm, gfd, hva = _gmem(host)
        head = me.pagemap(hva).pfn
        if split:
            host.corrupt_pfn(head + 3)
        else:                     # host_unmap "none": the mapping is an extra reference
            with pytest.raises(OSError) as ei:                   # MF_FAILED, as for 4K
                host.corrupt_pfn(head + 3)
            assert ei.value.errno == u.EBUSY
        me.munmap(hva, 2 * MB2)
        hva = me.mmap(0, 2 * MB2, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
        data, sig = _read_or_sigbus(me, hva + 0x3000)
        if check:
            assert (data, sig) == (None, (u.BUS_MCEERR_AR, hva + 0x3000, 12 if split else 21))
        else:
            assert (data, sig) == (b"\x11" * 4, None)
            assert me.pagemap(hva + 0x3000).pfn == head + 3


# ================================================================== "page" vs "folio"
@pytest.mark.parametrize("scope", ["page", "folio"])
def test_host_unmap_page_vs_folio(tmp_path, host_factory, scope):
    """split_on_poison splits the HugeTLB folio either way; host_unmap "page" then
    unmaps only the failed page (a hwpoison entry), "folio" every page of the folio
    the failure hit (the neighbours refault 4K with their data).  The other folio
    keeps its huge mapping."""
    from gmem_harness import MB2 as M2
    from gmem_harness import PAGE, events, qemu

    env = qemu(host_factory, _policy(tmp_path, 'split_on_poison = True\nhost_unmap = "%s"' % scope))
    env.me.write(env.hva, b"\x11" * 2 * M2)
    head = env.me.pagemap(env.hva).pfn
    assert env.host.hw_detect(head + 5) == 0
    bad = env.me.pagemap(env.hva + 5 * PAGE)
    assert not bad.present and bad.hwpoison
    near = [0, 4 * PAGE, 6 * PAGE, M2 - PAGE]
    assert [env.me.pagemap(env.hva + o).present for o in near] == [scope == "page"] * len(near)
    assert env.me.pagemap(env.hva + M2).present
    assert [e["type"] for e in events(env.host, "unmap_folio")] == (["unmap_folio"] if scope == "folio"
                                                                    else [])
    for o in near:                                       # readable either way
        assert env.me.read(env.hva + o, 4) == b"\x11" * 4
        assert env.me.pagemap(env.hva + o).pfn == head + o // PAGE


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("scope", ["page", "folio"])
def test_stage2_unmap_page_vs_folio(tmp_path, host_factory, scope, split):
    """stage2_unmap "page": the huge stage-2 entry is split into 4K entries and only the
    failed gfn is zapped; the guest keeps reading its neighbours, split folio or not.
    "folio": the whole 2M range leaves stage-2; without a split the guest then gets
    -EHWPOISON on every page of it (the folio is flagged), with one only on the bad one."""
    from gmem_harness import MB2 as M2
    from gmem_harness import PAGE, ehwpoison, events, in_vcpu, qemu, reader, run

    pol = 'stage2_unmap = "%s"\nsplit_on_poison = %s' % (scope, split)
    env = qemu(host_factory, _policy(tmp_path, pol))
    bad, near = GPA + 5 * PAGE, [GPA, GPA + 4 * PAGE, GPA + 6 * PAGE, GPA + M2 - PAGE]

    def body(vcpu, rec):
        def guest(g):
            for off in range(0, 2 * M2, 0x40000):
                yield g.write(GPA + off, b"\x44" * 8, False)
            yield g.write(GPA + 4 * PAGE, b"\x44" * 8, False)
            yield g.write(GPA + 6 * PAGE, b"\x44" * 8, False)
            yield g.write(GPA + M2 - PAGE, b"\x44" * 8, False)
            yield g.sync(0)

        vcpu.set_guest(guest)
        assert run(vcpu) == ("sync", 0)
        s2 = env.vm.gpa_to_pfn(bad)
        assert s2["mapped"] and s2["level"] == 2
        env.host.hw_detect(s2["backing_pfn"])
        after = [env.vm.gpa_to_pfn(g) for g in [bad] + near + [GPA + M2]]
        out = []
        for gpa in [bad] + near:
            vcpu.set_guest(reader((gpa, False)))
            out.append(run(vcpu))
        return s2["pfn"], after, out

    _, (head, after, runs), _sigs = in_vcpu(env, body)
    assert not after[0]["mapped"]
    if scope == "page":
        assert [(a["mapped"], a["level"], a["pfn"]) for a in after[1:-1]] == [
            (True, 1, head + (g - GPA) // PAGE) for g in near]
        assert [e["level"] for e in events(env.host, "kvm_split")] == [2]
        assert [(e["gfn"], e["zapped"]) for e in events(env.host, "kvm_zap")] == [(bad >> 12, 1)]
    else:
        assert not any(a["mapped"] for a in after[1:-1])
        assert events(env.host, "kvm_split") == []
    assert after[-1]["mapped"] and after[-1]["level"] == 2          # the other folio
    neighbours_lost = scope == "folio" and not split
    assert runs[0] == ehwpoison(bad, False)
    assert runs[1:] == ([ehwpoison(g, False) for g in near] if neighbours_lost
                        else [("sync", b"\x44" * 8)] * len(near))
