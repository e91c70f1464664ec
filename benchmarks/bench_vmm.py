"""What a memory error costs a VMM's vCPU, end to end (workers/qemu_like.py).

(a) QEMU, AR on a vCPU: the guest loads from a shared guest_memfd page with a
    latent error.  The emulated CPU takes the machine check, memory_failure()
    runs in the supervisor and sends SIGBUS BUS_MCEERR_AR to the vCPU thread,
    KVM_RUN returns -EINTR, QEMU injects an AR #MC into the guest
    (kvm_arch_on_sigbus_vcpu, do_inject_x86_mce) and re-enters, and the guest's
    #MC handler kills its task.  Measured: the main thread's request to the vCPU
    until its answer ("killed").
(b) The recovering VMM (qemu-like --recover), a private page: the load gets
    KVM_RUN -1/EHWPOISON, the VMM punches a hole over the page and re-enters,
    and the guest reads zeros.

Baseline, same run: the same request for a load from a healthy page of the same
kind, through the same pipe, the same vCPU thread and the same KVM_RUN; so the
ratio is what the error path adds to an ordinary guest access.  A page is
poisoned before each timed request, outside the timing.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import report  # noqa: E402

import emu  # noqa: E402
from emu import records  # noqa: E402

PAGE = 4096
N = 200


def _timed_reads(q, gpas, private=None) -> list[int]:
    out = []
    for gpa in gpas:
        t = time.perf_counter_ns()
        r = q.vcpu(0, "read", gpa, n=8, private=private)
        out.append(time.perf_counter_ns() - t)
        assert r not in ("paused", None), r
    return out


def ar_on_vcpu(host) -> dict:
    from workers.qemu_like import QemuLike

    q = QemuLike(host, ram_size=4 * N * PAGE, nvcpus=1)
    bad = [i * 2 * PAGE for i in range(N)]
    good = [gpa + PAGE for gpa in bad]
    for gpa in bad + good:
        q.vcpu(0, "write", gpa, data=b"\xaa" * 8)
        q.me.read(q.ram.hva + gpa, 8)                # QEMU maps it: SIGBUS has a PTE
    base = _timed_reads(q, good)
    errs = []
    for gpa in bad:
        host.hw_poison(q.ram.vm.gpa_to_pfn(gpa)["pfn"])
        errs += _timed_reads(q, [gpa])
    q.stop()
    return report("QEMU: guest load of a poisoned page (AR, inject)",
                  statistics.median(errs) / 1e3, "us", "guest load of a healthy page",
                  statistics.median(base) / 1e3)


def recover_private(host) -> dict:
    from workers.qemu_like import QemuLike

    q = QemuLike(host, ram_size=4 * N * PAGE, nvcpus=1, recover=True)
    bad = [i * 2 * PAGE for i in range(N)]
    good = [gpa + PAGE for gpa in bad]
    for gpa in bad + good:
        q.me.gmem_convert(q.ram.gmem, gpa, PAGE, True)
        q.vcpu(0, "write", gpa, data=b"\xaa" * 8, private=True)
    base = _timed_reads(q, good, private=True)
    errs = []
    for gpa in bad:
        host.hw_poison(q.ram.vm.gpa_to_pfn(gpa)["backing_pfn"])
        errs += _timed_reads(q, [gpa], private=True)
    q.stop()
    return report("recovering: private load, EHWPOISON, punch, re-enter",
                  statistics.median(errs) / 1e3, "us", "private load of a healthy page",
                  statistics.median(base) / 1e3)


def _in_child(fn, host) -> dict:
    """Each VMM is its own emulated process (a process attaches once)."""
    pid, r = records.fork(lambda w: w.send(fn(host)))
    out = records.receive(r)
    os.waitpid(pid, 0)
    return out[0]


def main() -> list[dict]:
    with emu.start(ram="256M") as host:
        return [_in_child(ar_on_vcpu, host), _in_child(recover_private, host)]


if __name__ == "__main__":
    main()
