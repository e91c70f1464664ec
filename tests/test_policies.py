"""Memory-failure policy presets on a HugeTLB guest_memfd, one test per seed line.

The presets model the HugeTLB guest_memfd memory-failure proposals:
- the "Upstream, initial stage" column of the design table -> preset `initial`
  (the "eventually" column is the `eventual` preset, tests/test_policy_eventual.py);
- "What does minimum support look like?" -> preset `minimum`;
- `v6.18` / `mf-delayed-fix`: today's kernel on huge folios, without / with the
  MF_DELAYED fix ("-EBUSY, leading to kill_me_now()").

Every test runs a QEMU-shaped process: the main thread PR_MCE_KILL_EARLY, vCPU
threads (clone) PR_MCE_KILL_LATE creating and running their own vCPU, a 2M HugeTLB
guest_memfd mapped MAP_SHARED and bound to one memslot.  hw_detect = a deferred
error, hw_poison + an access = a consumed error, corrupt_pfn = a software one.
"""
import os
import signal

import pytest
from checks import dmesg_has
from gmem_harness import (
    GPA,
    MB2,
    PAGE,
    PUNCH,
    RW,
    TODAY,
    Recorder,
    Second,
    Stop,
    ehwpoison,
    events,
    fail_in_stage2,
    fill_host,
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

EINTR = ("err", u.EINTR, u.KVM_EXIT_INTR)


# ================================================================== minimum
def test_minimum_track_memory_failure_in_global_data_structure(host_factory):
    """"Track memory failure in global data structure": the pfn goes to a table
    (mf_track event), counted, not flagged; a second report of it is known."""
    env = qemu(host_factory, "minimum")
    fill_host(env, [0])
    pfn = host_pfn(env, 0) + 5
    assert env.host.hw_detect(pfn) == 0
    tr = events(env.host, "mf_track")
    assert [(e["pfn"], e["first"]) for e in tr] == [(pfn, True)]
    assert env.host.meminfo()["HardwareCorrupted"] == 4
    assert env.host.mf_stats()["delayed"] == 1
    assert not poisoned(env.host, pfn) and not poisoned(env.host, pfn - 5)
    env.host.hw_detect(pfn)
    assert [(e["pfn"], e["first"]) for e in events(env.host, "mf_track")] == [
        (pfn, True), (pfn, False)]
    assert env.host.meminfo()["HardwareCorrupted"] == 4            # counted once


def test_minimum_unconsumed_failure_all_processes_continue_to_run(host_factory):
    """"Memory was unconsumed, but failure detected: let all processes continue to
    run, defer until failed memory is consumed": no signal to anyone (EARLY main,
    LATE vCPU, a second process mapping the dirty folio), and all keep working."""
    env = qemu(host_factory, "minimum")
    fill_host(env, [0, MB2])

    def before(vcpu, rec):
        vcpu.set_guest(reader((GPA + 0x1000, None), (GPA + MB2, None), (GPA + 0x2000, None)))
        return run(vcpu)

    assert in_vcpu(env, before)[1] == ("sync", b"\x11" * 8)
    second = Second(env, [0x3000], after=lambda t, hva: t.read(hva + 0x4000, 4))
    pfn = host_pfn(env, 0) + 5
    assert env.host.hw_detect(pfn) == 0
    tid, sigs, data = second.go()
    assert sigs == [] and data == b"\x11" * 4
    env.me.idle(0.1)
    assert env.rec.got == []
    assert env.me.read(env.hva + 0x6000, 4) == b"\x11" * 4        # same folio, other page

    def after(vcpu, rec):
        vcpu.set_guest(reader((GPA + 0x1000, None), (GPA + MB2, None)))
        return [run(vcpu), run(vcpu), run(vcpu)]

    _, runs, vsigs = in_vcpu(env, after, vid=1)
    assert runs == [("sync", b"\x11" * 8), ("sync", b"\x11" * 8), ("exit", u.KVM_EXIT_IO)]
    assert vsigs == []
    assert signals(env.host) == []


def test_minimum_consumed_failure_sigbus_to_current_vcpu(host_factory):
    """"Failed memory was consumed: Send SIGBUS to current": the vCPU thread that
    consumed private memory gets BUS_MCEERR_AR; the host never mapped that memory,
    so si_addr is 0 (documented in sigbus_current), lsb 21.  Nobody else is told."""
    env = qemu(host_factory, "minimum", private=[1])
    gpa = GPA + MB2 + 0x7000

    def body(vcpu, rec):
        fail_in_stage2(env, vcpu, gpa, env.host.hw_poison)
        return run(vcpu), rec.take()

    tid, (first, sigs), _ = in_vcpu(env, body)
    assert sigs == [(tid, u.BUS_MCEERR_AR, 0, 21)]
    assert first[:3] == EINTR
    env.me.idle(0.1)
    assert env.rec.got == []
    assert [e["tid"] for e in signals(env.host)] == [tid]


def test_minimum_consumed_failure_sigbus_to_current_host_thread(host_factory):
    """"Send SIGBUS to current" when current consumed it through the host mapping:
    AR at the address it read (the mapping is kept), lsb 21."""
    env = qemu(host_factory, "minimum")
    fill_host(env, [0])
    pfn = host_pfn(env, 0x9000)
    env.host.hw_poison(pfn)
    assert host_read_sigbus(env, 0x9010) == (u.BUS_MCEERR_AR, env.hva + 0x9000, 21)
    assert [e["tid"] for e in signals(env.host)] == [env.main_tid]


def test_minimum_indicate_failures_to_hugetlb_with_hwpoison_on_inode_release(host_factory):
    """"When freeing folio on inode release, indicate any memory failures to HugeTLB
    using folio's HWpoison flag": at release the folio is flagged, HugeTLB dissolves
    it (the pool shrinks by one, the raw page is retired, the rest is freed)."""
    env = qemu(host_factory, "minimum")
    fill_host(env, [0, MB2])
    head = host_pfn(env, 0)
    pfn = head + 5
    assert env.host.hw_detect(pfn) == 0
    mi = env.host.meminfo()
    assert (mi["HugePages_Total"], mi["HugePages_Free"]) == (8, 6)
    assert not poisoned(env.host, head)
    release_all(env)
    assert poisoned(env.host, pfn)
    assert not poisoned(env.host, head + 6)                        # healthy subpage freed
    assert dmesg_has(env.host, "%#x: released by guest_memfd: marked HWPoison" % pfn)
    assert [(e["pfn"], e["raw"]) for e in events(env.host, "mf_mark_on_release")] == [(head, 1)]
    mi = env.host.meminfo()
    assert (mi["HugePages_Total"], mi["HugePages_Free"]) == (7, 7)  # the healthy folio came back
    assert mi["HardwareCorrupted"] == 4


def test_minimum_dont_unmap_failed_memory(host_factory):
    """"Don't unmap failed memory": after a deferred and a consumed failure the host
    page tables and stage-2 still map the folio; no unmap or zap happened."""
    env = qemu(host_factory, "minimum")
    fill_host(env, [0])
    second = Second(env, [0x3000], after=lambda t, hva: t.pagemap(hva + 0x5000).present)

    def touch(vcpu, rec):
        vcpu.set_guest(reader((GPA, None)))
        return run(vcpu)

    assert in_vcpu(env, touch)[1] == ("sync", b"\x11" * 8)
    head = host_pfn(env, 0)
    assert env.vm.gpa_to_pfn(GPA + 0x5000)["mapped"]
    env.host.hw_detect(head + 5)
    env.host.hw_poison(head + 6)
    assert host_read_sigbus(env, 0x6000)[0] == u.BUS_MCEERR_AR      # consumed by the host
    e = env.me.pagemap(env.hva + 0x5000)
    assert e.present and not e.hwpoison and e.pfn == head + 5
    assert env.me.pagemap(env.hva + 0x6000).present
    s2 = env.vm.gpa_to_pfn(GPA + 0x5000)
    assert s2["mapped"] and s2["level"] == 2
    assert events(env.host, "unmap", "unmap_file", "kvm_zap", "zap") == []
    assert second.go()[2] is True                                 # the second process too


def test_minimum_only_mark_hwpoison_when_releasing_folios_from_guest_memfd(host_factory):
    """"Only mark HWpoison on folios when releasing folios from guest_memfd": not at
    detection, not at consumption; a punch hole releases the folio and marks it."""
    env = qemu(host_factory, "minimum")
    fill_host(env, [0, MB2])
    head = host_pfn(env, 0)
    env.host.hw_detect(head + 5)
    assert not poisoned(env.host, head) and not poisoned(env.host, head + 5)
    env.host.hw_poison(head + 7)
    host_read_sigbus(env, 0x7000)
    assert not poisoned(env.host, head) and not poisoned(env.host, head + 7)
    assert not dmesg_has(env.host, "marked HWPoison")
    env.me.fallocate(env.gfd, PUNCH, 0, MB2)
    assert poisoned(env.host, head + 5) and poisoned(env.host, head + 7)
    assert dmesg_has(env.host, "%#x: released by guest_memfd: marked HWPoison" % (head + 5))
    assert dmesg_has(env.host, "%#x: released by guest_memfd: marked HWPoison" % (head + 7))
    # the file's other folio was not released and is untouched
    assert env.me.read(env.hva + MB2, 4) == b"\x11" * 4


def test_minimum_on_faults_dont_check_for_memory_failure(host_factory):
    """"On faults, don't check for memory failure": a software-injected failure is
    tracked, then fresh host and guest faults on that page map it and read data."""
    env = qemu(host_factory, "minimum")
    fill_host(env, [0], b"\x44")
    pfn = host_pfn(env, 0x8000)
    env.me.munmap(env.hva, env.size)                              # the next access faults
    assert env.host.corrupt_pfn(pfn) == 0
    assert [e["pfn"] for e in events(env.host, "mf_track")] == [pfn]
    hva = env.me.mmap(0, env.size, RW, u.MAP_SHARED, env.gfd, 0)
    assert env.me.read(hva + 0x8000, 4) == b"\x44" * 4             # host fault: no check
    assert env.me.pagemap(hva + 0x8000).pfn == pfn

    def body(vcpu, rec):
        vcpu.set_guest(reader((GPA + 0x8000, None)))
        return run(vcpu), env.vm.gpa_to_pfn(GPA + 0x8000)         # guest fault: no check

    _, (r, s2), sigs = in_vcpu(env, body)
    assert r == ("sync", b"\x44" * 8) and s2["mapped"] and sigs == []
    env.me.idle(0.05)
    assert env.rec.got == [] and signals(env.host) == []


def test_minimum_dont_handle_pr_mce_kill_early(host_factory):
    """"Don't handle PR_MCE_KILL_EARLY": the EARLY main thread (and an EARLY second
    process, even with vm.memory_failure_early_kill=1) is not notified of a failure
    on a dirty folio it maps."""
    env = qemu(host_factory, "minimum")
    env.host.sysctl("vm.memory_failure_early_kill", 1)
    fill_host(env, [0])

    def early_child(task):
        task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
        rec = Recorder()
        emu.sigaction(signal.SIGBUS, rec)
        task.write(env.hva + 0x3000, b"\x22")
        os.write(w, b"R")
        os.read(r2, 1)
        task.idle(0.2)
        return rec.take()

    r, w = os.pipe()
    r2, w2 = os.pipe()
    th = env.me.fork(early_child, name="early")
    assert os.read(r, 1) == b"R"
    assert env.host.hw_detect(host_pfn(env, 0) + 5) == 0
    os.write(w2, b"G")
    env.me.idle(0.2)
    assert th.join(30) == 0
    assert th.result == []
    assert env.rec.got == []
    assert signals(env.host) == []


def test_minimum_repeated_consumption_repeated_machine_checks(host_factory):
    """Issue 4: with no unmapping and no fault check, every consumption is a new
    machine check (and a new SIGBUS to current)."""
    env = qemu(host_factory, "minimum", private=[1])
    gpa = GPA + MB2 + 0x7000

    def body(vcpu, rec):
        fail_in_stage2(env, vcpu, gpa, env.host.hw_poison)
        return [run(vcpu)[:3] for _ in range(4)], rec.take()

    tid, (runs, sigs), _ = in_vcpu(env, body)
    assert runs == [EINTR] * 4
    assert sigs == [(tid, u.BUS_MCEERR_AR, 0, 21)] * 4
    mces = events(env.host, "mce")
    assert len(mces) == 4 and all(e["guest"] and e["tid"] == tid for e in mces)
    assert len(events(env.host, "mf_track")) == 4
    assert env.host.meminfo()["HardwareCorrupted"] == 4


# ================================================================== initial
def test_initial_unmap_from_host_page_tables_entire_file(host_factory):
    """"Unmap from host page tables: Entire file worth": a failure in folio 0 leaves no
    page of the file mapped in any process (folio 1 included)."""
    env = qemu(host_factory, "initial")
    fill_host(env, [0, MB2])
    second = Second(env, [0x3000, MB2 + 0x3000],
                    after=lambda t, hva: [t.pagemap(hva + o).present for o in range(0, 2 * MB2, PAGE)])
    env.host.hw_detect(host_pfn(env, 0) + 5)
    present = [env.me.pagemap(env.hva + o).present for o in range(0, env.size, PAGE)]
    assert not any(present)
    assert not any(second.go()[2])
    assert events(env.host, "unmap_file")


def test_initial_unmap_from_stage2_entire_file(host_factory):
    """"Unmap from stage2 page tables: Entire file worth": every gpa of the file
    leaves stage-2 (one kvm_zap over the file's range), private folio included."""
    env = qemu(host_factory, "initial", folios=3, private=[2])
    fill_host(env, [0, MB2])

    def touch(vcpu, rec):
        vcpu.set_guest(reader((GPA, None), (GPA + MB2, None), (GPA + 2 * MB2, True)))
        return [run(vcpu) for _ in range(3)]

    assert [r[0] for r in in_vcpu(env, touch)[1]] == ["sync"] * 3
    assert all(env.vm.gpa_to_pfn(GPA + i * MB2)["mapped"] for i in range(3))
    env.host.hw_detect(host_pfn(env, 0) + 5)
    assert not any(env.vm.gpa_to_pfn(GPA + o)["mapped"] for o in range(0, env.size, 0x10000))
    zaps = events(env.host, "kvm_zap")
    assert any(e["gfn"] == GPA >> 12 and e["npages"] == env.size >> 12 for e in zaps), zaps
    assert sum(e["zapped"] for e in zaps) == env.size >> 12


@pytest.mark.parametrize("how", ["deferred", "consumed"])
def test_initial_mark_folios_hwpoisoned_on_handling_mce(host_factory, how):
    """"Mark folios HWpoisoned on handling #MCE: Yes": the head is flagged as soon as
    memory_failure() ran, while the folio still belongs to guest_memfd."""
    env = qemu(host_factory, "initial", private=[1])
    if how == "deferred":
        fill_host(env, [0])
        head = host_pfn(env, 0)
        env.host.hw_detect(head + 5)
    else:
        gpa = GPA + MB2 + 0x5000

        def body(vcpu, rec):
            pfn = fail_in_stage2(env, vcpu, gpa, env.host.hw_poison)
            return pfn, run(vcpu)

        _, (pfn, r), _ = in_vcpu(env, body)
        assert r[:3] == EINTR
        head = pfn - 5
    assert poisoned(env.host, head)
    assert env.host.meminfo()["HugePages_Total"] == 8              # not released
    assert events(env.host, "mf_mark_on_release") == []


def test_initial_track_pfn_that_failed_with_hwpoison_flag(host_factory):
    """"Track PFN that failed: With HWpoison flag": no global table, the folio's flag
    (and HugeTLB's raw-page record) is the record; counted once."""
    env = qemu(host_factory, "initial")
    fill_host(env, [0])
    head = host_pfn(env, 0)
    env.host.hw_detect(head + 5)
    assert events(env.host, "mf_track") == []
    assert poisoned(env.host, head)
    assert env.host.meminfo()["HardwareCorrupted"] == 4
    # a second report of the same pfn is found through the flag
    env.host.hw_detect(head + 5)
    assert dmesg_has(env.host, "%#x: recovery action for already poisoned page" % (head + 5))
    assert env.host.meminfo()["HardwareCorrupted"] == 4


def test_initial_indicate_memory_failure_when_folio_returned_to_hugetlb(host_factory):
    """"Indicate memory failure when folio is returned to HugeTLB: With HWpoison flag":
    the flagged folio is dissolved on release, the raw page stays retired, the rest
    goes back to the page allocator, HugeTLB never hands it out again."""
    env = qemu(host_factory, "initial")
    fill_host(env, [0, MB2])
    head = host_pfn(env, 0)
    env.host.hw_detect(head + 5)
    release_all(env)
    dis = events(env.host, "hugetlb_dissolve")
    assert [(e["pfn"], e["raw"]) for e in dis] == [(head, 1)]
    assert poisoned(env.host, head + 5) and not poisoned(env.host, head + 6)
    assert events(env.host, "mf_mark_on_release") == []          # flagged at the #MC already
    mi = env.host.meminfo()
    assert (mi["HugePages_Total"], mi["HugePages_Free"]) == (7, 7)


def test_initial_error_on_faulting_private_memory_kvm_exit_ehwpoison(host_factory):
    """"Error on faulting private memory with failure: KVM exit with -EHWPOISON"
    (exit MEMORY_FAULT, flags PRIVATE), and no signal for the deferred failure."""
    env = qemu(host_factory, "initial", private=[1])
    gpa = GPA + MB2 + 0x5008

    def body(vcpu, rec):
        fail_in_stage2(env, vcpu, gpa, env.host.hw_detect)
        return run(vcpu), run(vcpu)

    _, runs, sigs = in_vcpu(env, body)
    assert runs == (ehwpoison(gpa, True),) * 2
    assert sigs == [] and env.rec.got == []


def test_initial_error_on_faulting_shared_memory_sigbus(host_factory):
    """"Error on faulting shared memory with failure: SIGBUS": a host fault on the
    failed folio gets BUS_MCEERR_AR, lsb 21, in any process mapping the file."""
    env = qemu(host_factory, "initial")
    fill_host(env, [0])

    def fault(task, hva):
        rec = Recorder(raising=True)
        emu.sigaction(signal.SIGBUS, rec)
        with pytest.raises(Stop):
            task.read(hva + 0x5123, 1)
        return rec.got

    second = Second(env, [], after=fault)
    env.host.hw_detect(host_pfn(env, 0) + 5)
    env.me.idle(0.05)
    env.rec.take()                                                # the EARLY AO
    assert host_read_sigbus(env, 0x5123) == (u.BUS_MCEERR_AR, env.hva + 0x5123, 21)
    assert host_read_sigbus(env, 0x1000) == (u.BUS_MCEERR_AR, env.hva + 0x1000, 21)
    tid, _, got = second.go()
    assert got == [(tid, u.BUS_MCEERR_AR, env.hva + 0x5123, 21)]


def test_initial_no_hwpoison_work_during_restructuring_guest_memfd_not_functional(host_factory):
    """"Additional work HWpoison during folio restructuring: None, since guest_memfd is
    not functional upon memory failure": after a failure in folio 0, every later fault
    on the file fails, folio 1 included: guest -EHWPOISON (shared and private), host
    SIGBUS."""
    env = qemu(host_factory, "initial", folios=3, private=[2])
    fill_host(env, [0, MB2])
    env.host.hw_detect(host_pfn(env, 0) + 5)
    assert events(env.host, "gmem_unusable")
    reads = [(GPA + 0x1000, None), (GPA + MB2 + 0x2000, None), (GPA + 2 * MB2 + 0x3000, True)]

    runs, sigs = guest_reads(env, reads)
    assert runs == [ehwpoison(GPA + 0x1000, False), ehwpoison(GPA + MB2 + 0x2000, False),
                    ehwpoison(GPA + 2 * MB2 + 0x3000, True)]
    assert sigs == []
    env.me.idle(0.05)
    env.rec.take()
    # host faults: the healthy folio gets a plain SIGBUS (VM_FAULT_SIGBUS), the failed
    # one the hwpoison SIGBUS
    assert host_read_sigbus(env, MB2 + 0x2000) == (u.BUS_ADRERR, env.hva + MB2 + 0x2000, 0)
    assert host_read_sigbus(env, 0x1000) == (u.BUS_MCEERR_AR, env.hva + 0x1000, 21)


def test_initial_pr_mce_kill_early_sigbus_while_handling_mce(host_factory):
    """"PR_MCE_KILL_EARLY handling: If set, SIGBUS while handling #MCE": the EARLY main
    thread gets BUS_MCEERR_AO (lsb 21) during memory_failure(); the LATE vCPU thread
    gets nothing."""
    env = qemu(host_factory, "initial")
    fill_host(env, [0])
    gate_r, gate_w = os.pipe()
    done_r, done_w = os.pipe()

    def fn(task):
        task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_LATE)
        rec = Recorder()
        emu.sigaction(signal.SIGBUS, rec)
        os.write(done_w, b"R")
        os.read(gate_r, 1)
        task.idle(0.2)
        return os.getpid(), rec.take()

    th = env.me.clone(fn, name="vcpu0")
    assert os.read(done_r, 1) == b"R"
    pfn = host_pfn(env, 0) + 5
    env.host.hw_detect(pfn)
    os.write(gate_w, b"G")
    env.me.idle(0.1)
    assert env.rec.got == [(env.main_tid, u.BUS_MCEERR_AO, env.hva + 0x5000, 21)]
    assert th.join(30) == 0
    assert th.result[1] == []
    ev = env.host.events()
    kinds = [(e["type"], e.get("tid")) for e in ev if e["type"] in ("memory_failure", "signal", "mf_result")]
    assert [k for k, _ in kinds] == ["memory_failure", "signal", "mf_result"]
    assert kinds[1][1] == env.main_tid


def test_initial_dirty_host_mapped_folio_sigbus_all_processes_mapping_it(host_factory):
    """"If folio is dirty and folio is faulted into host userspace, SIGBUS all the
    processes where the memory is currently mapped in host page tables": a LATE
    second process that has the folio mapped gets BUS_MCEERR_AO too; a third one that
    maps the file but never faulted that folio in gets nothing."""
    env = qemu(host_factory, "initial")
    fill_host(env, [0])
    second = Second(env, [0x3000])
    third = Second(env, [MB2 + 0x3000], remap=True)
    env.host.hw_detect(host_pfn(env, 0) + 5)
    tid2, sigs2, _ = second.go()
    tid3, sigs3, _ = third.go()
    env.me.idle(0.05)
    assert sigs2 == [(tid2, u.BUS_MCEERR_AO, env.hva + 0x5000, 21)]
    assert sigs3 == []
    assert env.rec.got == [(env.main_tid, u.BUS_MCEERR_AO, env.hva + 0x5000, 21)]
    # the trace says why each got it: the EARLY main thread by early kill, the LATE
    # second process by the policy alone
    assert sorted((e["tid"], e["why"]) for e in events(env.host, "signal")) == sorted([
        (env.main_tid, "early kill: PR_MCE_KILL_EARLY"),
        (tid2, "policy: every process mapping the folio")])


def test_initial_sigbus_current_for_consumed_memory_failure(host_factory):
    """"In addition, SIGBUS current for consumed memory failure": the vCPU thread that
    consumed private memory gets BUS_MCEERR_AR (si_addr 0: no host mapping, lsb 21);
    KVM_RUN returns -EINTR, the next one -EHWPOISON."""
    env = qemu(host_factory, "initial", private=[1])
    gpa = GPA + MB2 + 0x7000

    def body(vcpu, rec):
        fail_in_stage2(env, vcpu, gpa, env.host.hw_poison)
        return run(vcpu), run(vcpu), rec.take()

    tid, (r1, r2, sigs), _ = in_vcpu(env, body)
    assert sigs == [(tid, u.BUS_MCEERR_AR, 0, 21)]
    assert r1[:3] == EINTR and r2 == ehwpoison(gpa, True)
    env.me.idle(0.05)
    assert env.rec.got == []                    # private memory: no host mapper, no AO


def test_initial_no_signal_for_deferred_memory_failure(host_factory):
    """"... no signal for deferred": a deferred failure on memory that is not faulted
    into host userspace signals nobody, the EARLY main thread included."""
    env = qemu(host_factory, "initial", private=[1])
    gpa = GPA + MB2 + 0x7000

    def body(vcpu, rec):
        vcpu.set_guest(reader((gpa, True)))
        assert run(vcpu)[0] == "sync"
        env.host.hw_detect(env.vm.gpa_to_pfn(gpa)["backing_pfn"])
        env.me.idle(0.1)
        return rec.take()

    _, sigs, _ = in_vcpu(env, body)
    assert sigs == []
    env.me.idle(0.05)
    assert env.rec.got == [] and signals(env.host) == []


# ================================================================== v6.18 / mf-delayed-fix
@pytest.mark.parametrize("policy", TODAY)
def test_today_whole_folio_zapped_from_stage2(host_factory, policy):
    """Today's kernel on huge folios: kvm_gmem_error_folio zaps the whole folio (one
    2M stage-2 entry), not the file: the next folio stays mapped."""
    env = qemu(host_factory, policy)
    fill_host(env, [0, MB2])

    def touch(vcpu, rec):
        vcpu.set_guest(reader((GPA, None), (GPA + MB2, None)))
        return [run(vcpu), run(vcpu)]

    in_vcpu(env, touch)
    env.host.hw_detect(host_pfn(env, 0) + 5)
    assert not any(env.vm.gpa_to_pfn(GPA + o)["mapped"] for o in range(0, MB2, 0x10000))
    s2 = env.vm.gpa_to_pfn(GPA + MB2 + 0x5000)
    assert s2["mapped"] and s2["level"] == 2
    assert [(e["gfn"], e["npages"], e["zapped"]) for e in events(env.host, "kvm_zap")] == [
        (GPA >> 12, 512, 512)]


@pytest.mark.parametrize("private", [False, True])
@pytest.mark.parametrize("policy", TODAY)
def test_today_every_index_of_folio_ehwpoison(host_factory, policy, private):
    """The head flag: every index of the failed folio returns -EHWPOISON, the other
    folio still works."""
    env = qemu(host_factory, policy, private=[0] if private else [])
    bad = GPA + 0x5000
    others = [GPA, GPA + 0x1000, GPA + 0x1FF000]

    def body(vcpu, rec):
        fail_in_stage2(env, vcpu, bad, env.host.hw_detect, private)
        out = []
        for gpa in others:
            vcpu.set_guest(reader((gpa, private)))
            out.append(run(vcpu))
        vcpu.set_guest(reader((GPA + MB2, False)))
        out.append(run(vcpu))
        return out

    _, runs, sigs = in_vcpu(env, body)
    assert runs == [ehwpoison(g, private) for g in others] + [("sync", bytes(8))]
    assert sigs == []


@pytest.mark.parametrize("policy", TODAY)
def test_today_host_sigbus_carries_huge_lsb(host_factory, policy):
    """A host fault anywhere in the failed folio: SIGBUS BUS_MCEERR_AR at the faulting
    address with si_addr_lsb 21; the EARLY main thread got AO (lsb 21) at the #MC."""
    env = qemu(host_factory, policy)
    fill_host(env, [0])
    env.host.hw_detect(host_pfn(env, 0) + 5)
    env.me.idle(0.05)
    assert env.rec.take() == [(env.main_tid, u.BUS_MCEERR_AO, env.hva + 0x5000, 21)]
    assert host_read_sigbus(env, 0x1FF008) == (u.BUS_MCEERR_AR, env.hva + 0x1FF008, 21)
    assert env.me.read(env.hva + MB2, 1) == b"\0"


@pytest.mark.parametrize("policy", TODAY)
def test_today_corrupt_pfn_result(host_factory, policy):
    """v6.18: kvm_gmem_error_folio's MF_DELAYED is taken as "Failed to punch page",
    so memory_failure() returns -EBUSY; with the fix it propagates and returns 0."""
    env = qemu(host_factory, policy)
    fill_host(env, [0])
    head = host_pfn(env, 0)
    if policy == "v6.18":
        with pytest.raises(OSError) as ei:
            env.host.corrupt_pfn(head + 3)
        assert ei.value.errno == u.EBUSY
        assert dmesg_has(env.host, "%#x: Failed to punch page" % (head + 3))
        assert env.host.mf_stats()["failed"] == 1
    else:
        assert env.host.corrupt_pfn(head + 3) == 0
        assert env.host.mf_stats()["delayed"] == 1
    assert poisoned(env.host, head)                                # flagged at the #MC either way


@pytest.mark.parametrize("policy", TODAY)
def test_today_consumed_private_error_kill_me_now_only_on_v618(host_factory, policy):
    """Seed 000 discussion: "memory_failure() will return -EBUSY, leading to
    kill_me_now()".  A vCPU consuming private memory (no AR sent: no host mapping):
    v6.18 SIGBUS SI_KERNEL to the vCPU thread, "Memory error not recovered"; with the
    fix no signal and the vCPU gets -EHWPOISON straight away."""
    env = qemu(host_factory, policy, private=[1])
    gpa = GPA + MB2 + 0x7000

    def body(vcpu, rec):
        fail_in_stage2(env, vcpu, gpa, env.host.hw_poison)
        out = [run(vcpu)]
        if out[0][:3] == EINTR:
            out.append(run(vcpu))
        return out, rec.take()

    tid, (runs, sigs), _ = in_vcpu(env, body)
    if policy == "v6.18":
        assert sigs == [(tid, u.SI_KERNEL, 0, 0)]
        assert runs[0][:3] == EINTR and runs[1] == ehwpoison(gpa, True)
        assert dmesg_has(env.host, "mce: Memory error not recovered")
    else:
        assert sigs == []
        assert runs == [ehwpoison(gpa, True)]
        assert not dmesg_has(env.host, "mce: Memory error not recovered")
    env.me.idle(0.05)
    assert env.rec.got == []
