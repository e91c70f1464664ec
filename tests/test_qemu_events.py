"""workers/qemu_like.py against QEMU's behaviour for each memory-failure event
(vmm-and-tests.md section 3, E1-E12).  Each test runs the QEMU-shaped process in a
forked child on a private supervisor and checks what QEMU would show: its log lines,
its QMP MEMORY_FAILURE events, its exit status and the guest's outcome."""
import json
import os
import signal

import pytest

from emu import records

PAGE = 4096
GPA_A, GPA_B, GPA_P = 0x10000, 0x20000, 0x100000


def run_qemu(host, script, **kw):
    """script(q, out) runs in the QEMU-shaped child; out(key, value) records a
    result.  Returns (exit status as os.waitstatus_to_exitcode, the journal
    [(who, text)] as QEMU wrote it (its stderr, the QMP events), the QMP events,
    the results)."""
    log_r, log_w = os.pipe()

    def child(w):
        from workers.qemu_like import QemuLike

        os.close(log_r)
        q = QemuLike(host, log_fd=log_w, **kw)
        script(q, lambda key, value=None: w.send((key, value)))
        q.stop()

    pid, r = records.fork(child)
    os.close(log_w)
    res = dict(records.receive(r))
    _, status = os.waitpid(pid, 0)
    with os.fdopen(log_r, "rb") as f:
        journal = [tuple(line.split("\t", 1)) for line in f.read().decode().splitlines()]
    events = [json.loads(text) for who, text in journal if who == "qmp"]
    return os.waitstatus_to_exitcode(status), journal, events, res


def mf(recipient, action, ar, recursive=False):
    return {"event": "MEMORY_FAILURE", "data": {
        "recipient": recipient, "action": action,
        "flags": {"action-required": ar, "recursive": recursive}}}


def texts(journal, who=None):
    return [t for w, t in journal if who is None or w == who]


def pfn_of(q, gpa):
    return q.ram.vm.gpa_to_pfn(gpa)["pfn"]


def dirty_and_poison(q, out, vcpu, gpa):
    """The guest dirties a shared page, QEMU maps it (so the host kernel has a
    PTE to send SIGBUS for), and the page takes a latent error."""
    q.vcpu(vcpu, "write", gpa, data=b"\xaa" * PAGE)
    q.me.read(q.ram.hva + gpa, 8)
    q.host.hw_poison(pfn_of(q, gpa))


# ---- E1: AR on a vCPU, guest RAM, guest CPU with MCG_SER_P and CR4.MCE ----
def test_e1_ar_on_vcpu_is_injected_into_the_guest(host):
    def script(q, out):
        dirty_and_poison(q, out, 1, GPA_B)
        out("read", q.vcpu(1, "read", GPA_B + 0x40, n=8))
        out("poisoned", list(q.hwpoison_pages))
        out("hva", q.ram.hva)
        out("after", q.vcpu(1, "read", GPA_A, n=4))      # the VM keeps running

    code, journal, events, res = run_qemu(host, script)
    assert code == 0
    assert res["read"] == ("killed", GPA_B)             # the guest killed its task
    assert res["after"] == b"\0" * 4
    assert res["poisoned"] == [GPA_B]                   # kvm_hwpoison_page_add
    assert events == [mf("guest", "inject", True)]
    # error_report: no "error: " prefix (util/error-report.c vreport; only warnings get one)
    assert ("QEMU: Guest MCE Memory Error at QEMU addr %#x and GUEST addr %#x of type "
            "BUS_MCEERR_AR injected" % (res["hva"] + GPA_B, GPA_B)) in texts(journal, "vcpu1")
    assert ("guest kernel: Memory failure: %#x: Sending SIGBUS to guest-task due to hardware "
            "memory corruption" % (GPA_B >> 12)) in texts(journal, "vcpu1")


# ---- E1a + E11: the guest has not enabled CR4.MCE: triple fault, reset, pages remapped ----
def test_e1a_ar_without_cr4_mce_resets_the_guest_and_remaps_the_pages(host):
    def script(q, out):
        dirty_and_poison(q, out, 1, GPA_B)
        out("read", q.vcpu(1, "read", GPA_B, n=8))
        out("reset_requested", q.reset_requested)
        out("poisoned", list(q.hwpoison_pages))
        q.system_reset()                                 # the main loop's qemu_system_reset
        out("poisoned_after", list(q.hwpoison_pages))
        out("reread", q.vcpu(1, "read", GPA_B, n=8))    # fresh memory, no error

    code, journal, events, res = run_qemu(host, script, guest_mce=False)
    assert code == 0
    assert res["read"] == "reset" and res["reset_requested"]
    assert events == [mf("guest", "reset", True)]
    assert "QEMU: CPU 1: MCE capability is not enabled, raising triple fault" in \
        texts(journal, "vcpu1")
    assert res["poisoned"] == [GPA_B]
    assert "QEMU: kvm_unpoison_all: remapped GPA %#x" % GPA_B in texts(journal, "main")
    assert res["poisoned_after"] == []
    assert res["reread"] == b"\0" * 8


# ---- E1a: an AR while the guest is still in its #MC handler (MCIP set) ----
def test_e1a_ar_while_previous_mce_in_progress_resets_the_guest(host):
    """target/i386/helper.c do_inject_x86_mce: UC with MCG_STATUS.MCIP already set is
    "Previous MCE still in progress, raising triple fault", QMP (guest, reset,
    recursive) and qemu_system_reset_request; nothing reaches KVM_X86_SET_MCE.  The
    guest's #MC handler reports over an I/O port before it returns, and the
    guest's next access (inside that handler) consumes a second poisoned page."""
    from workers.guest_programs import mce_handler_reporting

    def script(q, out):
        dirty_and_poison(q, out, 1, GPA_A)
        dirty_and_poison(q, out, 1, GPA_B)
        out("first", q.vcpu(1, "read", GPA_B, n=8))
        out("second", q.vcpu(1, "read", GPA_A, n=8))
        out("reset_requested", q.reset_requested)
        out("poisoned", sorted(q.hwpoison_pages))
        out("hva", q.ram.hva)
        q.system_reset()
        out("reread", q.vcpu(1, "read", GPA_A, n=8))

    code, journal, events, res = run_qemu(host, script, mce_handler=mce_handler_reporting)
    assert code == 0
    assert res["first"] == "in #MC handler"             # the #MC was injected, handler running
    assert res["second"] == "reset" and res["reset_requested"]
    assert events == [mf("guest", "inject", True), mf("guest", "reset", True, recursive=True)]
    assert "QEMU: CPU 1: Previous MCE still in progress, raising triple fault" in \
        texts(journal, "vcpu1")
    assert ("QEMU: Guest MCE Memory Error at QEMU addr %#x and GUEST addr %#x of type "
            "BUS_MCEERR_AR injected" % (res["hva"] + GPA_A, GPA_A)) in texts(journal, "vcpu1")
    assert res["poisoned"] == [GPA_A, GPA_B]
    assert res["reread"] == b"\0" * 8                   # kvm_unpoison_all remapped it


# ---- E4 (dropped): an AO while the first vCPU's guest is mid-#MC ----
def test_e4_ao_while_guest_is_mid_mce_is_ignored(host):
    """do_inject_x86_mce: an AO (no MCE_INJECT_UNCOND_AO from kvm_mce_inject) while
    MCG_STATUS.MCIP is set is dropped: QMP (guest, ignore, action-required false,
    recursive true), no SET_MCE.  kvm_arch_on_sigbus_vcpu still records the page
    and warns "... injected" (it does not know run_on_cpu dropped it)."""
    from workers.guest_programs import mce_handler_reporting

    def script(q, out):
        dirty_and_poison(q, out, 0, GPA_B)
        q.vcpu(0, "write", GPA_A, data=b"\xaa" * PAGE)
        q.me.read(q.ram.hva + GPA_A, 8)
        out("first", q.vcpu(0, "read", GPA_B, n=8))     # vCPU 0's guest is in its #MC handler
        q.host.hw_detect(pfn_of(q, GPA_A))
        wait_ao(q)
        out("pending", q.pending_ao)
        q.deliver_pending_ao()
        out("poisoned", sorted(q.hwpoison_pages))

    code, journal, events, res = run_qemu(host, script, mce_handler=mce_handler_reporting)
    assert code == 0
    assert res["first"] == "in #MC handler" and res["pending"] == GPA_A
    assert events == [mf("guest", "inject", True), mf("guest", "ignore", False, recursive=True)]
    assert res["poisoned"] == [GPA_A, GPA_B]
    assert not any("recovery action" in t for t in texts(journal, "vcpu0"))   # nothing injected


# ---- E2: AR on a vCPU, guest CPU with MCG_SER_P, address in no memslot QEMU knows ----
def test_e2_ar_outside_guest_ram_with_ser_p_is_fatal_exit_1(host):
    """kvm_arch_on_sigbus_vcpu: with MCG_SER_P, an AR whose address
    kvm_physical_memory_addr_from_host cannot map through QEMU's (address space 0)
    memslots ends in hardware_memory_error: QMP (hypervisor, fatal, AR), error_report
    "QEMU got Hardware memory error at addr %p", exit(1).  KVM only sends an AR for a
    memslot's hva (kvm_send_hwpoison_signal), so the slot here is one QEMU's lookup
    does not see (as SMRAM's slot in KVM address space 1 is not in kvm_state's
    address-space-0 list)."""
    from emu import uapi as u

    gpa_x = 0x400000

    def script(q, out):
        buf = q.me.mmap(0, PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED | u.MAP_ANONYMOUS)
        q.ram.vm.set_user_memory_region2(1, 0, gpa_x, PAGE, buf)
        q.vcpu(1, "write", gpa_x, data=b"\xaa" * PAGE)
        q.host.hw_poison(q.me.pagemap(buf).pfn)
        out("buf", buf)
        q.vcpu(1, "read", gpa_x, n=8)
        out("not reached", True)

    code, journal, events, res = run_qemu(host, script)
    assert code == 1                                     # exit(1), not a signal
    assert "not reached" not in res
    assert events == [mf("hypervisor", "fatal", True)]
    assert texts(journal, "vcpu1")[-1] == ("QEMU: QEMU got Hardware memory error at addr %#x"
                                           % res["buf"])
    assert not any("injected" in t or "QEMU itself" in t for t in texts(journal))


# ---- E2: AR on a vCPU, CPU model without MCG_SER_P: hardware_memory_error, exit(1) ----
def test_e2_ar_without_ser_p_is_fatal_exit_1(host):
    def script(q, out):
        dirty_and_poison(q, out, 1, GPA_B)
        out("hva", q.ram.hva)
        q.vcpu(1, "read", GPA_B, n=8)
        out("not reached", True)

    code, journal, events, res = run_qemu(host, script, ser=False)
    assert code == 1
    assert "not reached" not in res
    assert events == [mf("hypervisor", "fatal", True)]
    assert texts(journal, "vcpu1")[-1] == ("QEMU: QEMU got Hardware memory error at addr %#x"
                                           % (res["hva"] + GPA_B))
    assert not any("injected" in t for t in texts(journal))


# ---- E3: a second AR while the first is pending: sigbus_reraise ----
def test_e3_second_ar_while_pending_kills_with_sigbus(host):
    def script(q, out):
        dirty_and_poison(q, out, 0, GPA_A)
        dirty_and_poison(q, out, 1, GPA_B)
        out("hva", q.ram.hva)
        q.vcpu(1, "read", GPA_B, n=8, touch=q.ram.hva + GPA_A)
        out("not reached", True)

    code, journal, events, res = run_qemu(host, script)
    assert code == -signal.SIGBUS
    assert "not reached" not in res
    assert events == []
    assert ("QEMU: second SIGBUS BUS_MCEERR_AR at %#x while one is pending: re-raising"
            % (res["hva"] + GPA_A)) in texts(journal, "vcpu1")


def wait_ao(q):
    for _ in range(300):                      # the AO reaches main asynchronously
        if q.pending_ao is not None or q.journal:
            return
        q.me.idle(0.01)


# ---- E4: AO on the main thread, guest RAM: injected on the first vCPU ----
def test_e4_ao_on_main_is_injected_on_first_vcpu(host):
    def script(q, out):
        q.vcpu(0, "write", GPA_A, data=b"\xaa" * PAGE)
        q.me.read(q.ram.hva + GPA_A, 8)
        out("hva", q.ram.hva)
        q.host.hw_detect(pfn_of(q, GPA_A))
        wait_ao(q)
        out("pending", q.pending_ao)
        q.deliver_pending_ao()
        out("poisoned", list(q.hwpoison_pages))
        out("after", q.vcpu(1, "read", GPA_B, n=4))

    code, journal, events, res = run_qemu(host, script)
    assert code == 0
    assert res["pending"] == GPA_A and res["poisoned"] == [GPA_A]
    assert events == [mf("guest", "inject", False)]
    assert ("QEMU: warning: Guest MCE Memory Error at QEMU addr %#x and GUEST addr %#x of type "
            "BUS_MCEERR_AO injected" % (res["hva"] + GPA_A, GPA_A)) in texts(journal, "main")
    assert ("guest kernel: Memory failure: %#x: recovery action for dirty LRU page: Recovered"
            % (GPA_A >> 12)) in texts(journal, "vcpu0")
    assert res["after"] == b"\0" * 4


# ---- E5: AO on the main thread for QEMU's own memory: a warning ----
def test_e5_ao_on_qemu_memory_warns(host):
    from emu import uapi as u

    def script(q, out):
        buf = q.me.mmap(0, PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
        q.me.write(buf, b"qemu state")
        out("buf", buf)
        q.host.hw_detect(q.me.pagemap(buf).pfn)
        wait_ao(q)
        out("pending", q.pending_ao)
        out("poisoned", list(q.hwpoison_pages))
        out("after", q.vcpu(0, "read", GPA_B, n=4))

    code, journal, events, res = run_qemu(host, script)
    assert code == 0
    assert res["pending"] is None and res["poisoned"] == []
    assert events == [mf("hypervisor", "ignore", False)]
    assert ("QEMU: warning: Hardware memory error at addr %#x of type BUS_MCEERR_AO for memory "
            "used by QEMU itself instead of guest system!" % res["buf"]) in texts(journal, "main")
    assert res["after"] == b"\0" * 4


# ---- E6: AO on the main thread, CPU model without MCG_SER_P: ignored ----
def test_e6_ao_without_ser_p_is_ignored(host):
    def script(q, out):
        q.vcpu(0, "write", GPA_A, data=b"\xaa" * PAGE)
        q.me.read(q.ram.hva + GPA_A, 8)
        q.host.hw_detect(pfn_of(q, GPA_A))
        wait_ao(q)
        out("pending", q.pending_ao)
        out("poisoned", list(q.hwpoison_pages))

    code, journal, events, res = run_qemu(host, script, ser=False)
    assert code == 0
    assert res["pending"] is None and res["poisoned"] == []
    assert events == [mf("hypervisor", "ignore", False)]
    assert not any("Guest MCE" in t or "QEMU itself" in t for t in texts(journal))


# ---- E7: AR in the main thread or an iothread (SIGBUS blocked there): killed ----
@pytest.mark.parametrize("reader", ["main_read", "iothread_read"])
def test_e7_ar_in_main_thread_or_iothread_kills_with_sigbus(host, reader):
    def script(q, out):
        q.vcpu(0, "write", GPA_A, data=b"\xaa" * PAGE)
        q.me.read(q.ram.hva + GPA_A, 8)
        q.host.hw_poison(pfn_of(q, GPA_A))
        getattr(q, reader)(GPA_A)
        out("not reached", True)

    code, journal, events, res = run_qemu(host, script)
    assert code == -signal.SIGBUS
    assert "not reached" not in res and events == []


# ---- E8: a SIGBUS that is not a memory error (BUS_ADRERR): sigbus_reraise ----
def test_e8_non_mce_sigbus_is_reraised(host):
    from emu import uapi as u

    def script(q, out):
        fd = q.me.memfd_create("qemu-file")
        q.me.ftruncate(fd, PAGE)
        m = q.me.mmap(0, 2 * PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd)
        q.vcpu(0, "qemu_read", m + PAGE, n=8)           # past EOF: BUS_ADRERR
        out("not reached", True)

    code, journal, events, res = run_qemu(host, script)
    assert code == -signal.SIGBUS
    assert "not reached" not in res and events == []
    assert "QEMU: SIGBUS si_code %#x is not a memory error: re-raising" % u.BUS_ADRERR in \
        texts(journal, "vcpu0")


# ---- E9: KVM_RUN -1/EHWPOISON (private guest_memfd page): VM paused ----
def test_e9_ehwpoison_pauses_the_vm(host):
    def script(q, out):
        q.vcpu(1, "write", GPA_P, data=b"\xcc" * 64, private=True)
        q.host.hw_detect(pfn_of(q, GPA_P))
        out("read", q.vcpu(1, "read", GPA_P, n=8, private=True))
        out("runstate", q.runstate)
        out("vcpu0", q.vcpu(0, "read", GPA_A, n=4))     # the whole VM is stopped

    code, journal, events, res = run_qemu(host, script)
    assert code == 0                                     # the process stays alive
    assert res["read"] == "paused" and res["runstate"] == "internal-error"
    assert res["vcpu0"] == "paused"
    assert "QEMU: error: kvm run failed Memory page has hardware error" in texts(journal, "vcpu1")
    assert events == []                                  # no MCE, no QMP MEMORY_FAILURE


# ---- E10: KVM_RUN -1/EFAULT with KVM_EXIT_MEMORY_FAULT: conversion ----
def test_e10_memory_fault_exit_converts_and_reenters(host):
    def script(q, out):
        out("write", q.vcpu(1, "write", GPA_P, data=b"\xcc" * 8, private=True))
        out("read", q.vcpu(0, "read", GPA_P, n=8, private=True))

    code, journal, events, res = run_qemu(host, script)
    assert code == 0 and events == []
    assert res["write"] == 8 and res["read"] == b"\xcc" * 8
    assert "QEMU: KVM_EXIT_MEMORY_FAULT gpa %#x: converting to private" % GPA_P in \
        texts(journal, "vcpu1")


# ---- E12: migration refused while the poison list is not empty; allowed after reset ----
def test_e12_migration_refused_with_poisoned_pages(host):
    def script(q, out):
        out("before", q.migrate())
        dirty_and_poison(q, out, 1, GPA_B)
        q.vcpu(1, "read", GPA_B, n=8)
        out("refused", q.migrate())
        q.system_reset()
        out("after_reset", q.migrate())

    code, journal, events, res = run_qemu(host, script)
    assert code == 0
    desc = ("Can't migrate this vm with hardware poisoned memory, please reboot the vm and "
            "try again")
    assert res["before"] == {"return": {}}
    assert res["refused"] == {"error": {"class": "GenericError", "desc": desc}}
    assert "QEMU: error: " + desc in texts(journal, "main")
    assert res["after_reset"] == {"return": {}}


# ---- E2/E3: QEMU code on a vCPU thread consumes an error in QEMU's own memory ----
def test_ar_on_vcpu_thread_outside_kvm_run_kills_with_sigbus(host):
    """kvm_on_sigbus_vcpu records the AR and returns; the load runs again and
    takes a second AR while the first is pending: sigbus_reraise."""
    from emu import uapi as u

    def script(q, out):
        buf = q.me.mmap(0, PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
        q.me.write(buf, b"qemu state")
        out("buf", buf)
        q.host.hw_poison(q.me.pagemap(buf).pfn)
        q.vcpu(0, "qemu_read", buf, n=8)
        out("not reached", True)

    code, journal, events, res = run_qemu(host, script)
    assert code == -signal.SIGBUS
    assert "not reached" not in res and events == []
    assert ("QEMU: second SIGBUS BUS_MCEERR_AR at %#x while one is pending: re-raising"
            % res["buf"]) in texts(journal, "vcpu0")
