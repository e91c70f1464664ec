"""Halt polling, for the supervisor's idle loop and for a thread waiting in a call.

KVM polls a halted vCPU for halt_poll_ns before it schedules out, but only while
nothing else wants that CPU (kvm_vcpu_check_block and single_task_running() in
virt/kvm/kvm_main.c).  Userspace cannot see its run queue; the nearest thing is
the count of runnable tasks in /proc/loadavg, one pread away: when more tasks
are runnable than there are CPUs, somebody waits for ours and polling stops.
Without this, a woken emulated thread (an AO signal's target) waits behind the
pollers on a small machine.
"""
from __future__ import annotations

import os

_fd = -1
_ncpus = os.cpu_count() or 1


def others_waiting() -> bool:
    """More runnable tasks than CPUs (we count ourselves): stop polling."""
    global _fd
    if _fd < 0:
        try:
            _fd = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return True                        # cannot tell: do not poll
    try:
        b = os.pread(_fd, 64, 0)               # "0.10 0.28 0.38 1/77 19924\n"
        i = b.find(b"/")
        return int(b[b.rfind(b" ", 0, i) + 1:i]) > _ncpus
    except (OSError, ValueError):              # the fd was closed or reused under us
        _fd = -1
        return True
