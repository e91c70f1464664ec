"""In-place conversion on a HugeTLB guest_memfd (issue 4 item 3): a conversion that
cuts a huge folio splits it (host and stage-2 mappings split too); a range that
becomes uniform again merges back.  Default policy (mf-delayed-fix) unless said.

A QEMU-shaped process: a 2M HugeTLB guest_memfd (MMAP | INIT_SHARED) mapped
MAP_SHARED at hva and bound at GPA 4G on a KVM_X86_SW_PROTECTED_VM; vCPUs are
created and run by their own clone()d thread.
"""
import signal

import pytest
from gmem_harness import (
    GPA,
    KPF_COMPOUND_HEAD,
    KPF_HUGE,
    MB2,
    PAGE,
    Recorder,
    events,
    host_read_sigbus,
    qemu,
    run,
)

import emu
from emu import uapi as u

HUGE = u.GUEST_MEMFD_FLAG_HUGETLB | u.GUESTMEM_HUGETLB_FLAG_2MB
CUT = 0x10000                    # the page a conversion cuts out of folio 0


def pattern(page):
    """8 bytes that say which page of the file they were written to."""
    return b"P%06xQ" % page


def setup(host_factory, policy=None, folios=2):
    return qemu(host_factory, policy, folios, early=False)


def host_fill(env, folio):
    """The host writes every page of the folio with its pattern (one huge mapping)."""
    base = folio * 512
    env.me.write(env.hva + folio * MB2, b"".join(pattern(base + i) * (PAGE // 8) for i in range(512)))


def in_vcpu(env, body):
    vid, env.vid = env.vid, env.vid + 1

    def fn(task):
        rec = Recorder()
        emu.sigaction(signal.SIGBUS, rec)
        vcpu = env.vm.create_vcpu(vid)
        res = body(vcpu)
        return res, rec.take()

    th = env.me.clone(fn, name="vcpu%d" % vid)
    assert th.join(30) == 0
    return th.result


def guest(env, ops):
    """Run guest accesses in a vCPU thread, one KVM_RUN each: ("r", off, private) reads
    8 bytes at GPA + off, ("w", off, private, data) writes.  Returns the results
    (read: the bytes, or the ("err", ...) tuple) and asserts no signal came."""

    def body(vcpu):
        out = []
        for op in ops:
            if op[0] == "r":
                _, off, priv = op

                def prog(g, off=off, priv=priv):
                    v = yield g.read(GPA + off, 8, priv)
                    yield g.sync(v)
            else:
                _, off, priv, data = op

                def prog(g, off=off, priv=priv, data=data):
                    yield g.write(GPA + off, data, priv)
                    yield g.sync(None)
            vcpu.set_guest(prog)
            r = run(vcpu)
            out.append(r[1] if r[0] == "sync" else r)
        return out

    res, sigs = in_vcpu(env, body)
    assert sigs == []
    return res


def s2(env, off):
    return env.vm.gpa_to_pfn(GPA + off)


SAMPLE = [0, 0x1000, CUT - PAGE, CUT + PAGE, 0x20000, 0x100000, MB2 - PAGE]


# ================================================================== split
def test_conversion_that_cuts_a_huge_folio_splits_it(host_factory):
    """Converting one 4 KiB page of a huge folio private splits the folio
    (hugetlb_split, why "conversion"); the 2M stage-2 entry goes and the guest maps
    the folio back at 4 KiB (level 1); the host mapping of the still-shared pages keeps
    working (present at their pfns, reads and writes); the converted page leaves the
    host page tables and a host access to it is SIGBUS BUS_ADRERR.  The other folio
    is not touched."""
    env = setup(host_factory)
    host_fill(env, 0)
    host_fill(env, 1)
    assert guest(env, [("r", 0x20000, None), ("r", MB2 + 0x3000, None)]) == [
        pattern(0x20), pattern(512 + 3)]
    head = s2(env, 0x20000)["pfn"]
    assert s2(env, 0x20000)["level"] == 2
    assert env.host.kpageflags(head) & KPF_HUGE
    free = env.host.meminfo()["HugePages_Free"]
    env.me.gmem_convert(env.gfd, CUT, PAGE, private=True)
    assert [(e["pfn"], e["pages"], e["why"]) for e in events(env.host, "hugetlb_split")] == [
        (head, 512, "conversion")]
    assert not env.host.kpageflags(head) & (KPF_HUGE | KPF_COMPOUND_HEAD)
    assert not s2(env, 0x20000)["mapped"]                           # the 2M entry went
    assert env.host.meminfo()["HugePages_Free"] == free              # nothing freed or taken
    # the host: the shared pages stay mapped at their pfns
    for off in SAMPLE:
        e = env.me.pagemap(env.hva + off)
        assert e.present and e.pfn == head + off // PAGE, (hex(off), e)
        assert env.me.read(env.hva + off, 8) == pattern(off // PAGE)
    env.me.write(env.hva + 0x21000, b"hostnew!")
    # the guest maps the folio back 4 KiB at a time, the private page included
    got = guest(env, [("r", 0x20000, None), ("r", 0x21000, None), ("r", CUT, True),
                      ("r", MB2 - PAGE, None), ("r", MB2 + 0x3000, None)])
    assert got == [pattern(0x20), b"hostnew!", pattern(CUT // PAGE), pattern(511), pattern(512 + 3)]
    for off in (0x20000, 0x21000, CUT, MB2 - PAGE):
        st = s2(env, off)
        assert st["mapped"] and st["level"] == 1 and st["pfn"] == head + off // PAGE, (hex(off), st)
    st = s2(env, MB2 + 0x3000)
    assert st["mapped"] and st["level"] == 2
    # the converted page is the guest's now: gone from the host, a host access is SIGBUS
    assert not env.me.pagemap(env.hva + CUT).present
    assert host_read_sigbus(env, CUT + 8) == (u.BUS_ADRERR, env.hva + CUT + 8, 0)
    assert not env.me.pagemap(env.hva + CUT).present
    assert env.me.read(env.hva + CUT + PAGE, 8) == pattern(CUT // PAGE + 1)


def test_conversion_preserves_data_across_split_and_merge(host_factory):
    """In-place conversion: host-written bytes are what the guest reads after the
    split (the private page included), bytes the guest wrote to the private page are
    what the host reads once it is shared again, and after the merge the guest and
    the host read every page as before."""
    env = setup(host_factory)
    host_fill(env, 0)
    env.me.gmem_convert(env.gfd, CUT, 2 * PAGE, private=True)
    reads = [("r", off, None) for off in SAMPLE] + [("r", CUT, True), ("r", CUT + 0x808, True)]
    want = [pattern(off // PAGE) for off in SAMPLE] + [pattern(CUT // PAGE), pattern(CUT // PAGE)]
    assert guest(env, reads + [("w", CUT + PAGE + 0x800, True, b"guest!!!")]) == want + [None]
    env.me.gmem_convert(env.gfd, CUT, 2 * PAGE, private=False)
    assert len(events(env.host, "hugetlb_merge")) == 1
    assert env.me.read(env.hva + CUT + PAGE + 0x800, 8) == b"guest!!!"
    assert env.me.read(env.hva + CUT, 8) == pattern(CUT // PAGE)
    for off in SAMPLE:
        assert env.me.read(env.hva + off, 8) == pattern(off // PAGE)
    got = guest(env, [("r", off, None) for off in SAMPLE + [CUT, CUT + PAGE + 0x800]])
    assert got == [pattern(off // PAGE) for off in SAMPLE + [CUT]] + [b"guest!!!"]


# ================================================================== merge
@pytest.mark.parametrize("how", ["back-to-shared", "rest-to-private"])
def test_conversion_that_makes_the_range_uniform_merges_it(host_factory, how):
    """A range uniform again merges back (hugetlb_merge, why "conversion"): converting
    the cut page back to shared, or converting the rest of the folio private too.
    The folio is one huge HugeTLB folio again; stage-2 maps it at level 2; shared,
    the host faults it back in huge and reads every page at its pfn."""
    env = setup(host_factory)
    host_fill(env, 0)
    head = env.me.pagemap(env.hva).pfn
    env.me.gmem_convert(env.gfd, CUT, PAGE, private=True)
    assert guest(env, [("r", 0x20000, None)]) == [pattern(0x20)]
    assert s2(env, 0x20000)["level"] == 1
    private = how == "rest-to-private"
    if private:
        env.me.gmem_convert(env.gfd, 0, MB2, private=True)
    else:
        env.me.gmem_convert(env.gfd, CUT, PAGE, private=False)
    assert [(e["pfn"], e["raw"], e["why"]) for e in events(env.host, "hugetlb_merge")] == [
        (head, 0, "conversion")]
    assert len(events(env.host, "hugetlb_split")) == 1
    fl = env.host.kpageflags(head)
    assert fl & KPF_HUGE and fl & KPF_COMPOUND_HEAD
    got = guest(env, [("r", off, private or None) for off in SAMPLE + [CUT]])
    assert got == [pattern(off // PAGE) for off in SAMPLE + [CUT]]
    for off in SAMPLE + [CUT]:
        st = s2(env, off)
        assert st["mapped"] and st["level"] == 2 and st["pfn"] == head, (hex(off), st)
    if private:
        assert not env.me.pagemap(env.hva + 0x20000).present
        assert host_read_sigbus(env, 0x20000) == (u.BUS_ADRERR, env.hva + 0x20000, 0)
    else:
        for off in SAMPLE + [CUT]:
            assert env.me.read(env.hva + off, 8) == pattern(off // PAGE)
            e = env.me.pagemap(env.hva + off)
            assert e.present and e.pfn == head + off // PAGE, (hex(off), e)


def test_conversion_of_a_whole_aligned_folio_does_not_split(host_factory):
    """Converting exactly one whole 2M folio (or the whole file) cuts nothing: no
    split, no merge; the private folio is mapped whole in stage-2, gone from the host;
    the other folio keeps its huge host and stage-2 mappings."""
    env = setup(host_factory)
    host_fill(env, 0)
    host_fill(env, 1)
    head1 = env.me.pagemap(env.hva + MB2).pfn
    env.me.gmem_convert(env.gfd, MB2, MB2, private=True)
    assert events(env.host, "hugetlb_split", "hugetlb_merge") == []
    assert env.host.kpageflags(head1) & KPF_HUGE
    got = guest(env, [("r", MB2 + 0x3000, True), ("r", MB2 + MB2 - PAGE, True), ("r", 0x3000, None)])
    assert got == [pattern(512 + 3), pattern(1023), pattern(3)]
    st = s2(env, MB2 + 0x3000)
    assert st["mapped"] and st["level"] == 2 and st["pfn"] == head1
    assert s2(env, 0x3000)["level"] == 2
    assert not env.me.pagemap(env.hva + MB2 + 0x3000).present
    assert host_read_sigbus(env, MB2 + 0x3000) == (u.BUS_ADRERR, env.hva + MB2 + 0x3000, 0)
    assert env.me.read(env.hva + 0x3000, 8) == pattern(3)
    env.me.gmem_convert(env.gfd, 0, env.size, private=False)
    env.me.gmem_convert(env.gfd, 0, env.size, private=True)
    assert events(env.host, "hugetlb_split", "hugetlb_merge") == []


# ================================================================== errors
def test_conversion_on_unusable_guest_memfd_fails_with_ehwpoison(host_factory):
    """Policy `initial`: after a memory failure the guest_memfd is unusable, and
    conversions are refused with EHWPOISON in either direction, whether or not they
    would cut a folio, on the failed folio or the healthy one; nothing is split."""
    env = setup(host_factory, "initial")
    host_fill(env, 0)
    host_fill(env, 1)
    env.me.gmem_convert(env.gfd, MB2, MB2, private=True)            # works before the failure
    env.host.hw_detect(env.me.pagemap(env.hva).pfn + 5)
    assert events(env.host, "gmem_unusable")
    n = len(events(env.host, "gmem_convert"))
    for off, size, private in ((CUT, PAGE, True), (0, MB2, True), (MB2, MB2, False),
                               (MB2 + CUT, PAGE, False), (0, env.size, False)):
        with pytest.raises(OSError) as ei:
            env.me.gmem_convert(env.gfd, off, size, private=private)
        assert ei.value.errno == u.EHWPOISON, (off, size, private)
    assert len(events(env.host, "gmem_convert")) == n
    assert events(env.host, "hugetlb_split", "hugetlb_merge") == []


def test_conversion_after_failure_still_works_under_default_policy(host_factory):
    """Contrast: under the default policy guest_memfd stays usable after a failure;
    a conversion of the healthy folio goes through."""
    env = setup(host_factory)
    host_fill(env, 0)
    host_fill(env, 1)
    env.host.hw_detect(env.me.pagemap(env.hva).pfn + 5)
    env.me.gmem_convert(env.gfd, MB2, MB2, private=True)
    assert guest(env, [("r", MB2 + 0x3000, True)]) == [pattern(512 + 3)]


def test_conversion_argument_errors_einval(host_factory):
    """Unaligned offset or size, an empty range, a range past the end of the file, and
    a guest_memfd without GUEST_MEMFD_FLAG_MMAP (no in-place conversion): EINVAL, and
    nothing is converted or split."""
    env = setup(host_factory)
    host_fill(env, 0)
    for off, size in ((1, PAGE), (CUT + 0x800, PAGE), (CUT, 100), (CUT, PAGE + 1), (CUT, 0),
                      (env.size - PAGE, 2 * PAGE), (env.size, PAGE), (0, env.size + MB2)):
        for private in (True, False):
            with pytest.raises(OSError) as ei:
                env.me.gmem_convert(env.gfd, off, size, private=private)
            assert ei.value.errno == u.EINVAL, (hex(off), hex(size), private)
    for flags in (HUGE, u.GUEST_MEMFD_FLAG_INIT_SHARED | HUGE, 0):
        gfd = env.vm.create_guest_memfd(MB2, flags)
        with pytest.raises(OSError) as ei:
            env.me.gmem_convert(gfd, 0, PAGE, private=True)
        assert ei.value.errno == u.EINVAL, hex(flags)
        env.me.close(gfd)
    assert events(env.host, "gmem_convert", "hugetlb_split") == []
    assert env.me.read(env.hva + CUT, 8) == pattern(CUT // PAGE)
    assert env.me.pagemap(env.hva + CUT).present
