"""The `eventual` preset on a HugeTLB guest_memfd, one test per seed line.

The design table's column "Upstream, eventually":
  "Unmap from host page tables: Split and unmap failed page within folio",
  "Unmap from stage2 page tables: Split and unmap failed page within folio",
  and the row "Additional work HWpoison during folio restructuring": "Distribute
  HWpoison flag during split", "Disable merging during conversions when some part
  of a HugeTLB folio is poisoned", "Implement summarizing of the HWpoison flag during
  merge just for returning the page to HugeTLB".
- the preset's brief: the same, plus "signal the processes associated with
  the struct kvm so EARLY works for private memory (document the si_addr you give
  when there is no host address)": si_addr is 0 then (policies.Policy.early_kill,
  "kvm_owner"), and a split folio's signals carry the 4 KiB lsb.

Every test runs a QEMU-shaped process: the main thread PR_MCE_KILL_EARLY, vCPU
threads (clone) PR_MCE_KILL_LATE creating and running their own vCPU, a 2M HugeTLB
guest_memfd mapped MAP_SHARED and bound to one memslot at 4G.  hw_detect = a
deferred error, hw_poison + an access = a consumed error.
"""
import signal
import time

import pytest
from gmem_harness import (
    GPA,
    KPF_COMPOUND_HEAD,
    KPF_HUGE,
    MB2,
    PAGE,
    RW,
    Recorder,
    Second,
    Stop,
    ehwpoison,
    events,
    fail_in_stage2,
    guest_reads,
    host_pfn,
    host_read_sigbus,
    in_vcpu,
    poisoned,
    qemu,
    reader,
    release_all,
    run,
    signals,
)

import emu
from emu import uapi as u

BAD = 0x5000                     # the failed page's offset in folio 0


def fill(env, folio, byte=b"\x11"):
    """The host writes the whole 2M folio: it is dirty and host-mapped (one huge PTE)."""
    env.me.write(env.hva + folio * MB2, byte * MB2)


def settled_meminfo(env, memfree_kb, timeout=3.0):
    """meminfo once MemFree reached memfree_kb (pages freed by the kernel go to the
    page allocator after a grace period), or at the timeout."""
    end = time.monotonic() + timeout
    while True:
        mi = env.host.meminfo()
        if mi["MemFree"] >= memfree_kb or time.monotonic() > end:
            return mi
        env.me.idle(0.02)


# ================================================================== host page tables
def test_eventual_split_and_unmap_failed_page_from_host_page_tables(host_factory):
    """"Unmap from host page tables: Split and unmap failed page within folio": the
    huge folio is split (hugetlb_split, why "poison"); in every process that maps it
    only the failed 4 KiB page leaves the page tables (a hwpoison entry); the other
    511 pages of the folio stay present, at their pfns, with their data, and the next
    folio is still mapped huge.  Every unmap is of one 4 KiB page (level 1)."""
    env = qemu(host_factory, "eventual")
    fill(env, 0)
    fill(env, 1, b"\x33")
    head = host_pfn(env, 0)
    assert env.host.kpageflags(head) & KPF_HUGE

    def look(task, hva):
        return [(o, task.pagemap(hva + o).present, task.pagemap(hva + o).hwpoison)
                for o in (0, BAD - PAGE, BAD, BAD + PAGE, MB2 - PAGE)]

    second = Second(env, [0x3000], after=look)
    assert env.host.hw_detect(head + BAD // PAGE) == 0
    assert [(e["pfn"], e["pages"], e["why"]) for e in events(env.host, "hugetlb_split")] == [
        (head, 512, "poison")]
    for o in range(0, MB2, PAGE):
        e = env.me.pagemap(env.hva + o)
        if o == BAD:
            assert not e.present and e.hwpoison and e.pfn == head + BAD // PAGE, e
        else:
            assert e.present and not e.hwpoison and e.pfn == head + o // PAGE, (hex(o), e)
    assert env.me.read(env.hva + BAD - 8, 8) == b"\x11" * 8          # neighbours keep data
    assert env.me.read(env.hva + BAD + PAGE, 8) == b"\x11" * 8
    assert env.me.read(env.hva + MB2 - 8, 8) == b"\x11" * 8
    unmaps = events(env.host, "unmap")
    assert unmaps and all(e["level"] == 1 and e["pfn"] == head + BAD // PAGE and e["hwpoison"]
                          for e in unmaps), unmaps
    assert env.hva + BAD in [e["addr"] for e in unmaps]
    assert len(unmaps) == 2                                          # main + second process
    tid2, _, seen = second.go()
    assert seen == [(0, True, False), (BAD - PAGE, True, False), (BAD, False, True),
                    (BAD + PAGE, True, False), (MB2 - PAGE, True, False)]
    # the other folio is untouched: still one huge folio, mapped
    assert env.host.kpageflags(host_pfn(env, MB2)) & KPF_HUGE
    assert env.me.read(env.hva + MB2 + BAD, 4) == b"\x33" * 4


# ================================================================== stage-2
@pytest.mark.parametrize("private", [False, True])
def test_eventual_split_and_unmap_failed_page_from_stage2(host_factory, private):
    """"Unmap from stage2 page tables: Split and unmap failed page within folio": the
    huge stage-2 entry of the folio is split into 4 KiB entries (KVM's huge page split,
    TDX demote: a huge entry cannot stay over a split folio) and only the failed gpa's
    entry goes; the guest keeps reading the rest of the folio (level 1, no refault);
    only the failed gpa returns -EHWPOISON (KVM_EXIT_MEMORY_FAULT, 4 KiB), every time.
    The other folio keeps its 2M stage-2 entry."""
    env = qemu(host_factory, "eventual", private=[0] if private else [])
    bad = GPA + BAD
    others = [GPA, GPA + BAD - PAGE, GPA + BAD + PAGE, GPA + MB2 - PAGE]

    def body(vcpu, rec):
        def guest(g):
            for off in range(0, MB2, 0x40000):                       # the guest writes its data
                yield g.write(GPA + off, b"\x44" * 8, private)
            yield g.write(bad - PAGE, b"\x44" * 8, private)
            yield g.write(bad + PAGE, b"\x44" * 8, private)
            yield g.write(GPA + MB2 - PAGE, b"\x44" * 8, private)
            v = yield g.read(GPA + MB2, 8, False)
            yield g.sync(v)

        vcpu.set_guest(guest)
        assert run(vcpu) == ("sync", bytes(8))
        s2 = env.vm.gpa_to_pfn(bad)
        assert s2["mapped"] and s2["level"] == 2
        env.host.hw_detect(s2["backing_pfn"])
        gone = [env.vm.gpa_to_pfn(GPA + o)["mapped"] for o in range(0, MB2, 0x10000)]
        out = []
        for gpa in [bad] + others + [bad]:
            vcpu.set_guest(reader((gpa, private)))
            out.append(run(vcpu))
        return s2["pfn"], gone, out

    _, (head, gone, runs), sigs = in_vcpu(env, body)
    assert all(gone)                                                 # split, not zapped
    assert [e["level"] for e in events(env.host, "kvm_split")] == [2]
    zaps = [(e["gfn"], e["npages"], e["zapped"]) for e in events(env.host, "kvm_zap")]
    assert zaps == [(bad >> 12, 1, 1)], zaps
    assert runs == ([ehwpoison(bad, private)] + [("sync", b"\x44" * 8)] * len(others)
                    + [ehwpoison(bad, private)])
    assert sigs == []
    for gpa in others:                                               # still mapped, 4 KiB
        s2 = env.vm.gpa_to_pfn(gpa)
        assert s2["mapped"] and s2["level"] == 1 and s2["pfn"] == head + (gpa - GPA) // PAGE, s2
    assert not env.vm.gpa_to_pfn(bad)["mapped"]
    s2 = env.vm.gpa_to_pfn(GPA + MB2 + BAD)
    assert s2["mapped"] and s2["level"] == 2


# ================================================================== distribute on split
def test_eventual_distribute_hwpoison_flag_during_split(host_factory):
    """"Distribute HWpoison flag during split": PG_hwpoison lands on the raw failed
    page only; the old head and the other pages of the folio are clean and no longer a
    huge compound page.  A second failure in the split folio flags its own page only
    (no second split); each counts 4 KiB."""
    env = qemu(host_factory, "eventual")
    fill(env, 0)
    head = host_pfn(env, 0)
    raw = head + BAD // PAGE
    assert env.host.hw_detect(raw) == 0
    assert poisoned(env.host, raw)
    for pfn in (head, raw - 1, raw + 1, head + 511):
        assert not poisoned(env.host, pfn), hex(pfn)
    for pfn in (head, raw, head + 511):
        assert not env.host.kpageflags(pfn) & (KPF_HUGE | KPF_COMPOUND_HEAD)
    assert env.host.meminfo()["HardwareCorrupted"] == 4
    raw2 = head + 0x9
    assert env.host.hw_detect(raw2) == 0
    assert poisoned(env.host, raw2) and poisoned(env.host, raw)
    assert not poisoned(env.host, head) and not poisoned(env.host, raw2 + 1)
    assert len(events(env.host, "hugetlb_split")) == 1
    assert env.host.meminfo()["HardwareCorrupted"] == 8
    assert env.me.pagemap(env.hva + 0x9000).hwpoison
    assert env.me.pagemap(env.hva + 0xA000).present


# ================================================================== signals: 4 KiB lsb
def test_eventual_host_sigbus_for_failed_page_has_4k_lsb(host_factory):
    """Only 4 KiB is lost, and the signals say so: the EARLY main thread's AO at the
    #MC, and an AR on a later host access to the failed page (main thread or a second
    process), carry si_addr_lsb 12, not 21.  The neighbouring page is readable."""
    env = qemu(host_factory, "eventual")
    fill(env, 0)

    def fault(task, hva):
        rec = Recorder(raising=True)
        emu.sigaction(signal.SIGBUS, rec)
        with pytest.raises(Stop):
            task.read(hva + BAD + 0x123, 1)
        return rec.got, task.read(hva + BAD + PAGE, 4)

    second = Second(env, [0x3000], after=fault)
    env.host.hw_detect(host_pfn(env, 0) + BAD // PAGE)
    env.me.idle(0.05)
    assert env.rec.take() == [(env.main_tid, u.BUS_MCEERR_AO, env.hva + BAD, 12)]
    assert host_read_sigbus(env, BAD + 0x123) == (u.BUS_MCEERR_AR, env.hva + BAD + 0x123, 12)
    assert env.me.read(env.hva + BAD - 4, 4) == b"\x11" * 4
    tid, sigs, (got, data) = second.go()
    assert sigs == []                                                # LATE: nothing at the #MC
    assert got == [(tid, u.BUS_MCEERR_AR, env.hva + BAD + 0x123, 12)]
    assert data == b"\x11" * 4
    assert all(e["lsb"] == 12 for e in signals(env.host)), signals(env.host)


def test_eventual_consumed_failure_on_host_page_has_4k_lsb(host_factory):
    """A consumed error (machine check on a host load) in a huge folio: the consumer
    gets BUS_MCEERR_AR at the page, lsb 12; the folio was split, the rest is readable."""
    env = qemu(host_factory, "eventual")
    fill(env, 0)
    pfn = host_pfn(env, 0x7000)
    env.host.hw_poison(pfn)
    assert host_read_sigbus(env, 0x7010) == (u.BUS_MCEERR_AR, env.hva + 0x7000, 12)
    assert [e["why"] for e in events(env.host, "hugetlb_split")] == ["poison"]
    assert env.me.read(env.hva + 0x8000, 4) == b"\x11" * 4
    assert env.me.pagemap(env.hva + 0x7000).hwpoison


# ================================================================== EARLY for private memory
@pytest.mark.parametrize("policy", ["eventual", "mf-delayed-fix"])
def test_eventual_pr_mce_kill_early_works_for_private_memory(host_factory, policy):
    """"Signal the processes associated with the struct kvm so EARLY works for private
    memory": a deferred error on a private page that the host never mapped sends
    BUS_MCEERR_AO to the EARLY main thread of the VMM owning the struct kvm.  There is
    no host address to report: si_addr is 0 (documented in Policy.early_kill), lsb 12
    (the folio was split).  The LATE vCPU thread gets nothing.  Contrast: today's
    kernel (mf-delayed-fix) finds no mapping process and tells nobody."""
    env = qemu(host_factory, policy, private=[1])
    gpa = GPA + MB2 + 0x7000

    def body(vcpu, rec):
        fail_in_stage2(env, vcpu, gpa, env.host.hw_detect)
        env.me.idle(0.1)
        return rec.take()

    assert not env.me.pagemap(env.hva + MB2 + 0x7000).present
    _, sigs, _ = in_vcpu(env, body)
    assert sigs == []
    env.me.idle(0.1)
    assert not env.me.pagemap(env.hva + MB2 + 0x7000).present       # never host-mapped
    if policy == "eventual":
        assert env.rec.got == [(env.main_tid, u.BUS_MCEERR_AO, 0, 12)]
        sig = signals(env.host)
        assert [(e["tid"], e["code"], e["addr"], e["lsb"]) for e in sig] == [
            (env.main_tid, u.BUS_MCEERR_AO, 0, 12)]
    else:
        assert env.rec.got == [] and signals(env.host) == []


# ================================================================== summarize on merge
def test_eventual_summarize_hwpoison_on_merge_to_return_page_to_hugetlb(host_factory):
    """"Implement summarizing of the HWpoison flag during merge just for returning the
    page to HugeTLB": when guest_memfd releases the split folio (munmap, close, memslot
    deleted) its pages are merged back with the flag summarized (hugetlb_merge raw=1),
    then HugeTLB dissolves it (hugetlb_dissolve raw=1): the pool shrinks by one huge
    page, the healthy 2 MiB - 4 KiB go to the page allocator, the raw page stays
    HWpoison.  The healthy folio goes back to the pool."""
    env = qemu(host_factory, "eventual")
    fill(env, 0)
    fill(env, 1)
    head = host_pfn(env, 0)
    raw = head + BAD // PAGE
    env.host.hw_detect(raw)
    mi0 = env.host.meminfo()
    assert (mi0["HugePages_Total"], mi0["HugePages_Free"]) == (8, 6)
    assert events(env.host, "hugetlb_merge", "hugetlb_dissolve") == []
    release_all(env)
    ev = [(e["type"], e["pfn"], e["raw"]) for e in events(env.host, "hugetlb_merge", "hugetlb_dissolve")]
    assert ev == [("hugetlb_merge", head, 1), ("hugetlb_dissolve", head, 1)]
    assert [e["pfn"] for e in events(env.host, "gmem_release_poisoned")] == [raw]
    mi1 = settled_meminfo(env, mi0["MemFree"] + 2048 - 4)
    assert mi1["HugePages_Total"] == mi0["HugePages_Total"] - 1
    assert mi1["HugePages_Free"] == 7                                # folio 1 came back
    grew = mi1["MemFree"] - mi0["MemFree"]
    assert 2048 - 4 <= grew <= 2048 - 4 + 64, grew                   # KiB; + freed page tables
    assert mi1["HardwareCorrupted"] == 4
    assert poisoned(env.host, raw)
    assert not poisoned(env.host, head) and not poisoned(env.host, raw + 1)


# ================================================================== refuse merge
def _split_and_poison(env, order):
    """Folio 0 split by a conversion of page 0x10 and a failure at page 0x30, in the
    given order; the page converted private is converted back at the end (the range is
    uniform again).  Returns the old head."""
    head = host_pfn(env, 0)
    if order == "conversion-first":
        env.me.gmem_convert(env.gfd, 0x10000, PAGE, private=True)
        env.host.hw_detect(head + 0x30)
    else:
        env.host.hw_detect(head + 0x30)
        env.me.gmem_convert(env.gfd, 0x10000, PAGE, private=True)
    assert len(events(env.host, "hugetlb_split")) == 1
    env.me.gmem_convert(env.gfd, 0x10000, PAGE, private=False)
    return head


@pytest.mark.parametrize("order", ["conversion-first", "poison-first"])
def test_eventual_refuse_merge_during_conversion_when_part_is_poisoned(host_factory, order):
    """"Disable merging during conversions when some part of a HugeTLB folio is
    poisoned": converting the range back to uniform does not merge
    (hugetlb_merge_refused, raw=1); the folio stays split, stage-2 maps its pages at
    4 KiB, only the bad page returns -EHWPOISON, the host reads the rest."""
    env = qemu(host_factory, "eventual")
    fill(env, 0)
    head = _split_and_poison(env, order)
    assert [(e["pfn"], e["raw"]) for e in events(env.host, "hugetlb_merge_refused")] == [(head, 1)]
    assert events(env.host, "hugetlb_merge") == []
    assert poisoned(env.host, head + 0x30) and not poisoned(env.host, head)
    assert not env.host.kpageflags(head) & KPF_HUGE
    runs, sigs = guest_reads(env, [(GPA, None), (GPA + 0x10000, None), (GPA + 0x20000, None),
                                   (GPA + 0x30000, None), (GPA + MB2 - PAGE, None)])
    assert runs == [("sync", b"\x11" * 8)] * 3 + [ehwpoison(GPA + 0x30000, False)] + [
        ("sync", b"\x11" * 8)]
    assert sigs == []
    for off in (0, 0x10000, 0x20000, MB2 - PAGE):
        s2 = env.vm.gpa_to_pfn(GPA + off)
        assert s2["mapped"] and s2["level"] == 1 and s2["pfn"] == head + off // PAGE, (hex(off), s2)
    assert env.me.read(env.hva + 0x10000, 4) == b"\x11" * 4
    assert env.me.read(env.hva + 0x2F000, 4) == b"\x11" * 4


def test_today_merge_summarizes_flag_on_head_every_index_ehwpoison(host_factory):
    """Contrast (mf-delayed-fix, no refusal): the conversion back merges the folio
    anyway (hugetlb_merge raw=1), the flag is summarized on the merged head, and every
    index of the folio now returns -EHWPOISON to the guest."""
    env = qemu(host_factory, "mf-delayed-fix")
    fill(env, 0)
    head = _split_and_poison(env, "conversion-first")
    assert events(env.host, "hugetlb_merge_refused") == []
    assert [(e["pfn"], e["raw"]) for e in events(env.host, "hugetlb_merge")] == [(head, 1)]
    assert poisoned(env.host, head)
    assert env.host.kpageflags(head) & KPF_HUGE
    gpas = [GPA, GPA + 0x10000, GPA + 0x20000, GPA + 0x30000, GPA + MB2 - PAGE]
    runs, sigs = guest_reads(env, [(g, None) for g in gpas])
    assert runs == [ehwpoison(g, False) for g in gpas]
    assert sigs == []


def test_eventual_host_fault_on_fresh_mapping_of_failed_page_has_4k_lsb(host_factory):
    """The same through a fresh mapping of the file (no hwpoison entry to find: the
    fault reaches guest_memfd): the split folio is mapped 4 KiB at a time, the healthy
    neighbour maps and reads, the failed page is BUS_MCEERR_AR with lsb 12."""
    env = qemu(host_factory, "eventual")
    fill(env, 0)
    head = host_pfn(env, 0)
    env.host.hw_detect(head + BAD // PAGE)
    env.me.idle(0.05)
    env.rec.take()
    env.me.munmap(env.hva, env.size)
    assert env.me.mmap(env.hva, env.size, RW, u.MAP_SHARED | u.MAP_FIXED, env.gfd, 0) == env.hva
    assert not env.me.pagemap(env.hva + BAD).hwpoison
    assert env.me.read(env.hva + BAD + PAGE, 4) == b"\x11" * 4
    e = env.me.pagemap(env.hva + BAD + PAGE)
    assert e.present and e.pfn == head + BAD // PAGE + 1
    assert host_read_sigbus(env, BAD + 8) == (u.BUS_MCEERR_AR, env.hva + BAD + 8, 12)
