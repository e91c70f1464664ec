"""Other VMMs (issue 15 item 2): what Firecracker and cloud-hypervisor turn a memory
error into, on a private supervisor.  Each VMM is a forked emulated process whose
log goes to a pipe; the test reads its output line, its exit status and the
kernel's dmesg."""
import os
import signal

import pytest
from checks import fork_with_log

import emu
from emu import uapi as u
from workers.cloud_hypervisor_like import CloudHypervisorLike
from workers.firecracker_like import FirecrackerLike

PAGE = 4096
GPA = 3 * PAGE
DATA = b"guestdat"
VMMS = {"firecracker": FirecrackerLike, "cloud-hypervisor": CloudHypervisorLike}


def run_vmm(host, cls, body, ram="anon"):
    """Fork a VMM process, run body(vmm) in it; (exit status, log lines, body's
    return value or None)."""
    me = emu.attach(host, name="launcher")

    def main(task, log_fd):
        vmm = cls(task, ram=ram, log_fd=log_fd)
        out = body(vmm)
        vmm.close()
        return out

    code, result, log = fork_with_log(me, main, cls.name)
    return code, log, result


def consumed_in_guest(host):
    def body(vmm):
        vmm.host_write(GPA, DATA)
        assert vmm.guest_read(GPA) == DATA         # the guest touched the page
        host.hw_poison(vmm.ram.pfn(GPA))
        return vmm.guest_read(GPA)                      # the guest consumes the error
    return body


@pytest.mark.parametrize("vmm", list(VMMS))
def test_consumed_error_in_guest_ram(host, vmm):
    """The guest loads from a poisoned page of anonymous guest RAM: the #MC in guest
    mode becomes memory_failure(MF_ACTION_REQUIRED) and SIGBUS BUS_MCEERR_AR to the
    vCPU thread.  Firecracker logs it with code 4 and exits 149; cloud-hypervisor has
    no handler and dies of SIGBUS."""
    code, lines, result = run_vmm(host, VMMS[vmm], consumed_in_guest(host))
    if vmm == "firecracker":
        assert code == 149
        assert lines == ["Shutting down VM after intercepting signal 7, code %d."
                         % u.BUS_MCEERR_AR]
    else:
        assert code == -signal.SIGBUS
        assert lines == []
    assert result is None
    dmesg = host.dmesg()
    assert any("Memory failure:" in line and "recovery action for dirty LRU page: Recovered"
               in line for line in dmesg), dmesg


@pytest.mark.parametrize("vmm", list(VMMS))
def test_deferred_error_signals_nobody_until_touched(host, vmm):
    """A deferred error (memory_failure without MF_ACTION_REQUIRED) in guest RAM:
    neither VMM sets PR_MCE_KILL_EARLY and the sysctl is 0, so nobody is signalled
    and the VM keeps running (other pages read fine).  The guest's next load from
    the page: KVM's GUP hits the hwpoison entry, kvm_send_hwpoison_signal sends
    BUS_MCEERR_AR to the vCPU thread (149 / killed by SIGBUS)."""
    def body(vmm):
        vmm.host_write(GPA, DATA)
        assert vmm.guest_read(GPA) == DATA
        pfn = vmm.ram.pfn(GPA)
        assert host.hw_detect(pfn) == 0
        vmm.task.idle(0.2)
        ok = vmm.guest_read(GPA + PAGE)                 # still running
        vmm.log("still running: %r" % (ok,))
        pm = vmm.task.pagemap(vmm.ram.hva + GPA)
        assert (pm.present, pm.hwpoison) == (False, True)     # a hwpoison entry
        return vmm.guest_read(GPA)

    code, lines, _ = run_vmm(host, VMMS[vmm], body)
    assert lines[0] == "still running: %r" % (b"\0" * 8,)
    mf = [line for line in host.dmesg() if "Memory failure:" in line]
    assert len(mf) == 1 and mf[0].endswith("recovery action for dirty LRU page: Recovered"), mf
    assert host.mf_stats()["recovered"] == 1
    if vmm == "firecracker":
        assert code == 149
        assert lines[1:] == ["Shutting down VM after intercepting signal 7, code %d."
                             % u.BUS_MCEERR_AR]
    else:
        assert (code, lines[1:]) == (-signal.SIGBUS, [])


@pytest.mark.parametrize("vmm", list(VMMS))
def test_device_model_touches_poisoned_guest_ram(host, vmm):
    """The VMM itself (a virtio queue read) consumes the error: SIGBUS AR in the
    VMM thread; Firecracker does not tell it from a vCPU's (149)."""
    def body(vmm):
        vmm.host_write(GPA, DATA)
        assert vmm.guest_read(GPA) == DATA
        host.hw_poison(vmm.ram.pfn(GPA))
        return vmm.host_read(GPA)

    code, lines, _ = run_vmm(host, VMMS[vmm], body)
    if vmm == "firecracker":
        assert (code, lines) == (149, ["Shutting down VM after intercepting signal 7, code 4."])
    else:
        assert (code, lines) == (-signal.SIGBUS, [])


@pytest.mark.parametrize("vmm", list(VMMS))
def test_kvm_run_ehwpoison_on_private_guest_memfd(host, vmm):
    """A private guest_memfd page with a deferred error: no host mapping, so no
    SIGBUS; the guest's next load makes KVM_RUN return -1/EHWPOISON with
    KVM_EXIT_MEMORY_FAULT (flags PRIVATE).  kvm-ioctls reports that as
    VcpuExit::MemoryFault, which neither VMM handles: Firecracker logs "Unexpected
    exit reason on vcpu run: MemoryFault {...}" and exits 1 (GenericError);
    cloud-hypervisor logs "VCPU generated error", writes exit_evt, and its control
    loop's vmm_shutdown() returns Ok: main() exits 0 (vmm/src/cpu.rs, vmm/src/lib.rs
    Vmm::control_loop, cloud-hypervisor/src/main.rs)."""
    def body(vmm):
        vmm.ram.make_private(GPA)
        assert vmm.guest_read(GPA, private=True) == b"\0" * 8     # a fresh private page
        pfn = vmm.ram.pfn(GPA)
        assert host.hw_detect(pfn) == 0
        vmm.log("pfn %#x" % pfn)
        return vmm.guest_read(GPA, private=True)

    code, lines, _ = run_vmm(host, VMMS[vmm], body, ram="gmem")
    pfn = int(lines.pop(0).split()[1], 16)
    fault = "MemoryFault { flags: %d, gpa: %d, size: %d }" % (
        u.KVM_MEMORY_EXIT_FLAG_PRIVATE, GPA, PAGE)
    if vmm == "firecracker":
        assert (code, lines) == (1, ["Unexpected exit reason on vcpu run: " + fault])
    else:
        assert (code, lines) == (0, ["VCPU generated error: VcpuRun(Unexpected exit reason "
                                     "on vcpu run: %s)" % fault])
    assert any(line.endswith("Memory failure: %#x: recovery action for dirty unevictable LRU "
                             "page: Delayed" % pfn) for line in host.dmesg()), host.dmesg()


def test_firecracker_ignores_si_code(host):
    """sigbus_sigsegv_handler does not look at si_code: a plain SIGBUS (kill -BUS,
    SI_USER) ends the VM the same way, with its own code."""
    def body(vmm):
        os.kill(os.getpid(), signal.SIGBUS)
        vmm.task.idle(5)
        return "survived"

    code, lines, _ = run_vmm(host, FirecrackerLike, body)
    assert code == 149
    assert len(lines) == 1 and lines[0].startswith("Shutting down VM after intercepting signal 7, code ")
