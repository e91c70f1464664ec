"""Shared harness for the guest_memfd policy tests: a QEMU-shaped process's
helpers (signal recorder, guest readers, KVM_RUN wrapper, event and page queries)."""
import os
import signal
from types import SimpleNamespace

import pytest
from checks import Stop

import emu
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
KPF_HUGE = 1 << u.KPF_HUGE
KPF_COMPOUND_HEAD = 1 << u.KPF_COMPOUND_HEAD
TODAY = ["v6.18", "mf-delayed-fix"]


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


def write_then_read(gpa, private=True, label="in"):
    """Guest program: write 8 bytes at gpa (the page enters stage-2), sync `label`, then
    read them back and sync the value."""

    def guest(g):
        yield g.write(gpa, b"\x33" * 8, private)
        yield g.sync(label)
        v = yield g.read(gpa, 8, private)
        yield g.sync(v)

    return guest


def fail_in_stage2(env, vcpu, gpa, fail, private=True):
    """In a vCPU thread: the guest writes gpa and syncs, then `fail` (host.hw_poison,
    host.hw_detect) hits the pfn backing it; the guest's next step reads gpa back.
    Returns that pfn."""
    vcpu.set_guest(write_then_read(gpa, private))
    assert run(vcpu) == ("sync", "in")
    pfn = env.vm.gpa_to_pfn(gpa)["backing_pfn"]
    fail(pfn)
    return pfn


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


def qemu(host_factory, policy, folios=2, private=(), early=True):
    """The VMM's main thread (EARLY unless early=False) with a HugeTLB guest_memfd of
    `folios` 2M folios mapped MAP_SHARED at hva and bound at GPA; folios listed in
    `private` are converted private before anything touches them (the host never
    maps them).  policy=None: the default policy."""
    host = host_factory(ram="256M", hugepages={"2M": 8}, policy=policy)
    me = emu.attach(host, name="qemu")
    if early:
        me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
    rec = Recorder()
    emu.sigaction(signal.SIGBUS, rec)
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    size = folios * MB2
    gfd = vm.create_guest_memfd(size, FLAGS)
    hva = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, size, hva, gfd, 0)
    for i in private:
        me.gmem_convert(gfd, i * MB2, MB2, private=True)
    return SimpleNamespace(host=host, me=me, rec=rec, vm=vm, gfd=gfd, hva=hva, size=size,
                           main_tid=os.getpid(), vid=0)


def in_vcpu(env, body, vid=None):
    """Run body(vcpu, rec) in a clone()d vCPU thread (PR_MCE_KILL_LATE, its own SIGBUS
    recorder, its own vCPU: `vid`, or a fresh id).  Returns (tid, body's result,
    signals left unread)."""
    if vid is None:
        vid = env.vid
    env.vid = max(env.vid, vid + 1)

    def fn(task):
        task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_LATE)
        rec = Recorder()
        emu.sigaction(signal.SIGBUS, rec)
        vcpu = env.vm.create_vcpu(vid)
        res = body(vcpu, rec)
        return os.getpid(), res, rec.take()

    th = env.me.clone(fn, name="vcpu%d" % vid)
    assert th.join(30) == 0
    return th.result


def guest_reads(env, reads):
    """One KVM_RUN per (gpa, private) read, each from a fresh guest program, in a vCPU
    thread: [run results], the vCPU thread's signals."""

    def body(vcpu, rec):
        out = []
        for gpa, priv in reads:
            vcpu.set_guest(reader((gpa, priv)))
            out.append(run(vcpu))
        return out

    _, runs, sigs = in_vcpu(env, body)
    return runs, sigs


def fill_host(env, offsets, byte=b"\x11"):
    """The host writes 64 KiB at each offset: the folio is dirty and host-mapped."""
    for off in offsets:
        env.me.write(env.hva + off, byte * 0x10000)


class Second:
    """A second process (fork: it inherits the fd and the mapping, page tables
    included).  It sets PR_MCE_KILL_LATE, optionally maps the file afresh, writes
    one byte at each offset in `touch`, then waits; `go()` lets it idle a moment and
    run `after(task, hva)`, and returns (tid, its signals, after's result)."""

    def __init__(self, env, touch, after=None, remap=False):
        self.r1, w1 = os.pipe()
        r2, self.w2 = os.pipe()

        def child(task):
            task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_LATE)
            rec = Recorder()
            emu.sigaction(signal.SIGBUS, rec)
            if remap:       # a fresh mapping of the whole file: nothing faulted in yet
                task.munmap(env.hva, env.size)
                assert task.mmap(env.hva, env.size, RW, u.MAP_SHARED | u.MAP_FIXED,
                                 env.gfd, 0) == env.hva
                assert not task.pagemap(env.hva).present
            for off in touch:
                task.write(env.hva + off, b"\x22")
            os.write(w1, b"R")
            os.read(r2, 1)
            task.idle(0.2)
            sigs = rec.take()
            res = after(task, env.hva) if after is not None else None
            return os.getpid(), sigs, res

        self.th = env.me.fork(child, name="second")
        assert os.read(self.r1, 1) == b"R"

    def go(self):
        os.write(self.w2, b"G")
        assert self.th.join(30) == 0
        return self.th.result
