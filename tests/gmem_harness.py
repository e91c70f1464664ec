"""Shared harness for the guest_memfd policy tests: a QEMU-shaped process's
helpers (signal recorder, guest readers, KVM_RUN wrapper, event and page queries)."""
import os
import signal

import pytest

from emu import uapi as u

PAGE = 4096
MB2 = 2 << 20
GPA = 1 << 32
SLOT = 1
RW = u.PROT_READ | u.PROT_WRITE
FLAGS = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
         | u.GUESTMEM_HUGETLB_FLAG_2MB)
PUNCH = u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE
KPF_HWPOISON = 1 << u.KPF_HWPOISON
TODAY = ["v6.18", "mf-delayed-fix"]



class Stop(Exception):
    """Raised from a SIGBUS handler: the access does not retry."""


class Recorder:
    """SIGBUS handler recording (tid, si_code, si_addr, si_addr_lsb); it returns (the
    access retries) unless `raising`."""

    def __init__(self, raising=False):
        self.got = []
        self.raising = raising

    def __call__(self, signum, info):
        assert signum == signal.SIGBUS
        self.got.append((os.getpid(), info.si_code, info.si_addr, info.si_addr_lsb))
        if self.raising:
            raise Stop()

    def take(self):
        out, self.got = self.got, []
        return out


def reader(*reads):
    """Guest program: for each (gpa, private) read 8 bytes and sync the value."""

    def guest(g):
        for gpa, priv in reads:
            v = yield g.read(gpa, 8, priv)
            yield g.sync(v)
        yield g.done()

    return guest


def run(vcpu):
    """One KVM_RUN: ("sync", value) / ("exit", reason) or ("err", errno, exit_reason,
    memory_fault gpa, size, flags)."""
    try:
        vcpu.run()
    except OSError as e:
        m = vcpu.kvm_run.memory_fault
        return ("err", e.errno, vcpu.kvm_run.exit_reason, m.gpa, m.size, m.flags)
    if vcpu.kvm_run.exit_reason == u.KVM_EXIT_IO and vcpu.ucall()[0] == u.UCALL_SYNC:
        return ("sync", vcpu.ucall()[1][0])
    return ("exit", vcpu.kvm_run.exit_reason)


def ehwpoison(gpa, private):
    return ("err", u.EHWPOISON, u.KVM_EXIT_MEMORY_FAULT, gpa & ~(PAGE - 1), PAGE,
            u.KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0)


def events(host, *types):
    return [e for e in host.events() if e["type"] in types]


def signals(host):
    return [e for e in host.events() if e["type"] == "signal"]


def poisoned(host, pfn):
    return bool(host.kpageflags(pfn) & KPF_HWPOISON)


def host_pfn(env, off):
    e = env.me.pagemap(env.hva + off)
    assert e.present
    return e.pfn


def host_read_sigbus(env, off):
    """A host read that must end in SIGBUS: (si_code, si_addr, si_addr_lsb)."""
    env.rec.raising = True
    env.rec.take()
    try:
        with pytest.raises(Stop):
            env.me.read(env.hva + off, 8)
    finally:
        env.rec.raising = False
    got = env.rec.take()
    assert len(got) == 1, got
    return got[0][1:]


def release_all(env):
    """Drop every reference to the file: host mapping, fd, memslot binding."""
    env.me.munmap(env.hva, env.size)
    env.me.close(env.gfd)
    env.vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, 0, 0, -1, 0)
