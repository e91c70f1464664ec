"""Recovery patterns (issue 15 item 3) under every policy preset.

Each scenario runs workers/recovering.py's RecoveringVmm with one pattern in a
forked emulated process on a private supervisor with one policy, and records what
the machine shows: the guest's (or the device model's) read result, the SIGBUS
si_codes the VMM saw, the exit status, the host's pagemap entry for the page, and
the kernel's "Memory failure:" line.  EXPECTED is the table README's "Recovery
patterns" section shows."""
import signal

import pytest
from checks import fork_with_log

import emu
from emu import uapi as u
from emu.kernel.policies import PRESETS
from workers.recovering import RecoveringVmm

PAGE = 4096
GPA = 3 * PAGE
DATA = b"guestdat"
POLICIES = list(PRESETS)
AR, SI_KERNEL = u.BUS_MCEERR_AR, 128


# ---- scenarios: steps run inside the VMM process; they return the outcome ----
def punch_private(host):
    """A private guest_memfd page holding data; the guest consumes an error in it;
    the VMM punches a hole on KVM_RUN -EHWPOISON and re-enters."""
    def steps(vmm):
        vmm.ram.make_private(GPA)
        vmm.guest_write(GPA, DATA, private=True)
        host.hw_poison(vmm.ram.pfn(GPA))
        return {"guest": vmm.guest_read(GPA, private=True)}
    return "punch", "gmem", steps


def punch_shared(host):
    """A shared guest_memfd page the host maps; the device model consumes the error;
    the VMM only punches a hole and reads again."""
    def steps(vmm):
        vmm.host_write(GPA, DATA)
        host.hw_poison(vmm.ram.pfn(GPA))
        out = {"device": vmm.device_read(GPA)}
        pm = vmm.task.pagemap(vmm.ram.hva + GPA)
        out["pagemap_hwpoison"] = pm.hwpoison
        return out
    return "punch", "gmem", steps


def replace_shared(host):
    """As punch_shared, but the VMM also maps the file again with mmap(MAP_FIXED)."""
    def steps(vmm):
        vmm.host_write(GPA, DATA)
        host.hw_poison(vmm.ram.pfn(GPA))
        out = {"device": vmm.device_read(GPA)}
        out["pagemap_hwpoison"] = vmm.task.pagemap(vmm.ram.hva + GPA).hwpoison
        out["guest"] = vmm.guest_read(GPA)
        return out
    return "replace", "gmem", steps


def replace_anon(host):
    """Anonymous guest RAM; the guest consumes the error (SIGBUS AR on the vCPU);
    the VMM drops the page with MADV_DONTNEED and re-enters."""
    def steps(vmm):
        vmm.host_write(GPA, DATA)
        host.hw_poison(vmm.ram.pfn(GPA))
        out = {"guest": vmm.guest_read(GPA)}
        out["pagemap_hwpoison"] = vmm.task.pagemap(vmm.ram.hva + GPA).hwpoison
        return out
    return "replace", "anon", steps


def degrade_shared(host):
    """A shared guest_memfd page; the guest consumes the error; the VMM injects an
    AR #MC; the guest kills its task, offlines the page and keeps running."""
    def steps(vmm):
        vmm.host_write(GPA, DATA)
        vmm.host_write(GPA + PAGE, DATA)
        host.hw_poison(vmm.ram.pfn(GPA))
        out = {"guest": vmm.guest_read(GPA)}
        out["offlined"] = list(vmm.vcpu.guest_kernel.offlined)
        out["next"] = vmm.guest_read(GPA + PAGE)
        return out
    return "degrade", "gmem", steps


def shutdown_private(host):
    """A private page; the guest consumes the error; the VMM shuts down cleanly."""
    def steps(vmm):
        vmm.ram.make_private(GPA)
        vmm.guest_write(GPA, DATA, private=True)
        host.hw_poison(vmm.ram.pfn(GPA))
        return {"guest": vmm.guest_read(GPA, private=True)}
    return "shutdown", "gmem", steps


SCENARIOS = {f.__name__: f for f in (punch_private, punch_shared, replace_shared, replace_anon,
                                     degrade_shared, shutdown_private)}


def run_scenario(host, scenario):
    pattern, ram, steps = SCENARIOS[scenario](host)
    me = emu.attach(host, name="launcher")

    def main(task, log_fd):
        vmm = RecoveringVmm(task, pattern, ram=ram, log_fd=log_fd)
        out = steps(vmm)
        out["sigbus"] = [c for c, _a, _l in vmm.sigbus]
        vmm.close()
        return out

    code, result, log = fork_with_log(me, main, "recovering-vmm")
    out = dict(result or {})
    out["exit"] = code
    out["log"] = log
    out["dmesg"] = [line.split("] ", 1)[1] for line in host.dmesg()]
    return out


def summary(out) -> str:
    """One table cell: what the VMM saw and what the guest or device model read."""
    parts = []
    ars = out.get("sigbus", [])
    if out["exit"] == -signal.SIGBUS:
        code = [line for line in out["log"] if "is not a memory error" in line]
        return "VMM killed by SIGBUS (%s)" % (code[0].split(" is ")[0] if code else "no handler")
    if ars:
        parts.append("SIGBUS " + "+".join({AR: "AR", u.BUS_MCEERR_AO: "AO"}.get(c, str(c))
                                          for c in ars))
    if any("no guest address" in line for line in out["log"]):
        parts.append("si_addr 0")
    for key in ("device", "guest", "next"):
        if key not in out:
            continue
        v = out[key]
        what = {"device": "device", "guest": "guest", "next": "next page"}[key]
        if v == b"\0" * 8:
            parts.append("%s reads zeros" % what)
        elif v == DATA:
            parts.append("%s reads its data" % what)
        elif isinstance(v, tuple) and v[0] == "killed":
            parts.append("guest task killed" if key == "guest" else "%s: guest task killed" % what)
        elif v == "shutdown":
            parts.append("clean shutdown")
        elif v == "fatal":
            parts.append("gave up")
        elif v == "re-faulted":
            parts.append("%s faults again after the fix" % what)
        else:
            parts.append("%s: %s" % (what, v))
    if out.get("pagemap_hwpoison"):
        parts.append("hwpoison PTE kept")
    if "offlined" in out:
        parts.append("gfn %s offlined" % ",".join(map(str, out["offlined"])))
    return "; ".join(parts)


EXPECTED = {
    'punch_private': {
        'v6.18': 'VMM killed by SIGBUS (SIGBUS si_code 128)',
        'mf-delayed-fix': 'guest reads zeros',
        'minimum': 'SIGBUS AR+AR; si_addr 0; gave up',
        'initial': 'SIGBUS AR; si_addr 0; guest faults again after the fix',
        'eventual': 'SIGBUS AR; si_addr 0; guest reads zeros',
    },
    'punch_shared': {
        'v6.18': 'SIGBUS AR+AR; device faults again after the fix; hwpoison PTE kept',
        'mf-delayed-fix': 'SIGBUS AR+AR; device faults again after the fix; hwpoison PTE kept',
        'minimum': 'SIGBUS AR; device reads zeros',
        'initial': 'SIGBUS AR+AR; device faults again after the fix; hwpoison PTE kept',
        'eventual': 'SIGBUS AR+AR; device faults again after the fix; hwpoison PTE kept',
    },
    'replace_shared': {
        'v6.18': 'SIGBUS AR; device reads zeros; guest reads zeros',
        'mf-delayed-fix': 'SIGBUS AR; device reads zeros; guest reads zeros',
        'minimum': 'SIGBUS AR; device reads zeros; guest reads zeros',
        'initial': 'VMM killed by SIGBUS (SIGBUS si_code 2)',
        'eventual': 'SIGBUS AR; device reads zeros; guest reads zeros',
    },
    'replace_anon': {
        'v6.18': 'SIGBUS AR; guest reads zeros',
        'mf-delayed-fix': 'SIGBUS AR; guest reads zeros',
        'minimum': 'SIGBUS AR; guest reads zeros',
        'initial': 'SIGBUS AR; guest reads zeros',
        'eventual': 'SIGBUS AR; guest reads zeros',
    },
    'degrade_shared': {
        'v6.18': 'SIGBUS AR; guest task killed; next page reads its data; gfn 3 offlined',
        'mf-delayed-fix': 'SIGBUS AR; guest task killed; next page reads its data; gfn 3 offlined',
        'minimum': 'SIGBUS AR; guest task killed; next page reads its data; gfn 3 offlined',
        'initial': 'SIGBUS AR; guest task killed; next page: guest task killed; gfn 3 offlined',
        'eventual': 'SIGBUS AR; guest task killed; next page reads its data; gfn 3 offlined',
    },
    'shutdown_private': {
        'v6.18': 'VMM killed by SIGBUS (SIGBUS si_code 128)',
        'mf-delayed-fix': 'clean shutdown',
        'minimum': 'SIGBUS AR+AR; si_addr 0; gave up',
        'initial': 'SIGBUS AR; si_addr 0; clean shutdown',
        'eventual': 'SIGBUS AR; si_addr 0; clean shutdown',
    },
}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_recovery_pattern(host_factory, scenario, policy):
    h = host_factory(policy=policy)
    out = run_scenario(h, scenario)
    want = EXPECTED[scenario][policy]
    assert summary(out) == want, out
    if not want.startswith("VMM killed"):
        assert out["exit"] == 0, out
    # kill_me_maybe: memory_failure() failed (v6.18 turns guest_memfd's MF_DELAYED into
    # MF_FAILED, -EBUSY), so "Memory error not recovered" and kill_me_now's SIGBUS; it
    # is SI_KERNEL where nothing else is pending (private memory), and merges into the
    # pending BUS_MCEERR_AR where kill_procs sent one (legacy signals do not queue)
    ram = SCENARIOS[scenario](h)[1]
    assert ("mce: Memory error not recovered" in out["dmesg"]) == (
        policy == "v6.18" and ram == "gmem"), out


# policy -> (an AO reached the VMM, the SIGBUS codes it saw, how the later guest load
# reached it, what the guest read).  guest_memfd-only slots: KVM takes the pfn from
# guest_memfd and a poisoned folio is KVM_RUN -1/EHWPOISON (kvm_gmem_get_pfn), not
# a SIGBUS.  "minimum" ignores PR_MCE_KILL_EARLY and unmaps nothing: no AO, the
# load is the VMM's SIGBUS AR.  "initial" keeps the error after the punch.
EHW = "KVM_RUN: Memory page has hardware error at GPA %#x" % GPA
AO_LATER = {
    "v6.18": (True, [u.BUS_MCEERR_AO], EHW, b"\0" * 8),
    "mf-delayed-fix": (True, [u.BUS_MCEERR_AO], EHW, b"\0" * 8),
    "minimum": (False, [AR], None, b"\0" * 8),
    "initial": (True, [u.BUS_MCEERR_AO], EHW, "re-faulted"),
    "eventual": (True, [u.BUS_MCEERR_AO], EHW, b"\0" * 8),
}


@pytest.mark.parametrize("policy", POLICIES)
def test_ao_is_noted_then_recovered_at_the_later_access(host_factory, policy):
    """The recovering VMM sets PR_MCE_KILL_EARLY (as QEMU's qemu_init_sigbus): an
    error the hardware reports without a consumer (a patrol-scrub UCNA, hw_detect)
    in a shared guest_memfd page it maps reaches it as SIGBUS BUS_MCEERR_AO
    (mm/memory-failure.c kill_procs: task_early_kill).  The handler only notes it
    ("AO memory error at hva ...: noted"); the guest's later load of the page is an
    AR that the pattern ("replace") recovers: the guest reads zeros.  Late kill
    (no prctl) would send no AO at all, only the AR at the access."""
    h = host_factory(policy=policy)
    me = emu.attach(h, name="launcher")

    def main(task, log_fd):
        vmm = RecoveringVmm(task, "replace", ram="gmem", log_fd=log_fd)
        vmm.host_write(GPA, DATA)
        hva = vmm.ram.hva + GPA
        h.hw_detect(vmm.ram.pfn(GPA))
        for _ in range(300):                    # the AO arrives asynchronously
            if vmm.sigbus:
                break
            task.idle(0.01)
        ao = list(vmm.sigbus)
        guest = vmm.guest_read(GPA)
        out = {"hva": hva, "ao": ao, "guest": guest,
               "sigbus": [c for c, _a, _l in vmm.sigbus]}
        vmm.close()
        return out

    code, out, log = fork_with_log(me, main, "recovering-vmm")
    ao, codes, later, guest = AO_LATER[policy]
    assert code == 0, (log, h.dmesg())
    noted = "AO memory error at hva %#x: noted" % out["hva"]
    if ao:
        assert out["ao"] == [(u.BUS_MCEERR_AO, out["hva"], 12)], (out, log)
        assert log[0] == noted, log
    else:
        assert out["ao"] == [] and noted not in log, (out, log)
    assert out["sigbus"] == codes, (out, log)
    if later:
        assert later in log, log
    assert out["guest"] == guest, (out, log)
