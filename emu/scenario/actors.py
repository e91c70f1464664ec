"""A scenario's emulated threads.  Each one connects to the runner over a Unix
socket and does what each step asks, in its own process, so that the signals it
takes are real and a thread that dies of SIGBUS takes only its own process.

The runner never touches guest or host memory itself: every access is made by the
thread the scenario names, through its own mapping or its own vCPU.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from multiprocessing.connection import Connection

from workers.models import MODELS, SHORT, errname, sigbus_reraise

from .. import uapi as u
from ..guest import GuestTaskKilled
from ..user import KernelPanic
from .spec import PAGE, Memory, Scenario

MCE_KILL = {"early": u.PR_MCE_KILL_EARLY, "late": u.PR_MCE_KILL_LATE,
            "default": u.PR_MCE_KILL_DEFAULT}
_inherited: list = []                    # fds a forked child must drop first


def connect(path: str, hello: dict) -> Connection:
    for c in _inherited:
        c.close()                        # the parent's line to the runner is not ours
    _inherited.clear()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    conn = Connection(s.detach())
    conn.send(hello)
    _inherited.append(conn)
    return conn


class Unwind(Exception):
    """A handler's siglongjmp out of the access that took SIGBUS."""

    def __init__(self, code: int):
        super().__init__(SHORT.get(code, code))
        self.code = code


class Actor:
    """One emulated thread: a process's main thread, another thread, or a vCPU."""

    def __init__(self, task, name: str, sc: Scenario, proc_name: str, sock: str):
        self.task, self.name, self.sc, self.sock = task, name, sc, sock
        self.proc = sc.process(proc_name)
        self.model = MODELS[self.proc.vmm]()
        self.poisoned: set = set()        # QEMU's kvm_hwpoison_page_add list
        self.journal: list = []
        self.signals: list = []
        self.requests: list = []
        self.pending: list = []
        self.conn: Connection | None = None
        self.mem: dict = {}               # name -> {"fd", "hva"} as this process sees it
        self.vms: dict = {}               # name -> emu Vm (in the VM's process)
        self.words: str | None = None
        self.exits: list = []             # KVM_RUN errors this vCPU saw

    # ---- bookkeeping
    def log(self, text: str) -> None:
        self.journal.append((time.monotonic_ns(), self.name, text))

    def last_words(self, text: str) -> None:
        self.words = text
        self.flush()

    def flush(self) -> None:
        """Hand what this thread saw to the runner now: it is about to die."""
        if self.conn is not None:
            try:
                self.conn.send(dict(self._take(), words=self.words, requests=[], result=None,
                                    **{"async": True}))
            except OSError:
                pass

    def set_mce_kill(self, how: str) -> None:
        if how != "unset" and self.model.prctl:
            self.task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, MCE_KILL[how])

    def install(self, vcpu: bool = False) -> None:
        if (self.proc.sigbus == "default" and self.model.name == "none") or not self.model.handles_sigbus:
            return                         # SIG_DFL: SIGBUS kills the process
        import emu

        def handler(signum, info):
            self.signals.append((time.monotonic_ns(), self.name, SHORT.get(info.si_code, info.si_code),
                                 info.si_addr, info.si_addr_lsb))
            self.log("SIGBUS %s addr %#x lsb %d" % (SHORT.get(info.si_code, info.si_code),
                                                     info.si_addr, info.si_addr_lsb))
            self.model.on_sigbus(self, info, vcpu)

        emu.sigaction(signal.SIGBUS, handler)

    # ---- the VMM model's Executor (workers/models.py): its decisions, carried out here
    index = 0
    _gpa_vm: str | None = None

    def qmp(self, recipient: str, action: str, ar: bool, recursive: bool = False) -> None:
        self.log("QMP " + json.dumps({"event": "MEMORY_FAILURE", "data": {
            "recipient": recipient, "action": action,
            "flags": {"action-required": bool(ar), "recursive": bool(recursive)}}}))

    def die(self, status: int):
        self.last_words("exit %d" % status)
        os._exit(status)

    def reraise(self):
        self.flush()
        sigbus_reraise()

    def unwind(self, code: int):
        raise Unwind(code)

    def guest_addr(self, hva: int) -> int | None:
        """The GPA of hva in guest RAM; the VM it is in is kept for kvm_mce_inject."""
        vg = self.gpa_of(hva)
        self._gpa_vm = vg and vg[0]
        return vg and vg[1]

    def hwpoison_page_add(self, gpa: int) -> None:
        self.poisoned.add(gpa & ~(PAGE - 1))

    def kvm_mce_inject(self, code: int, gpa: int) -> None:
        """run_on_cpu(first_cpu, do_inject_x86_mce): the runner asks the VM's first vCPU."""
        self.requests.append(("inject_mce", self._gpa_vm, code, gpa))

    def gpa_of(self, hva: int):
        """(vm name, gpa) of a host address in this process's guest RAM, or None."""
        for vm in self.sc.vms:
            if vm.process != self.proc.name:
                continue
            for s in vm.slots:
                m = self.mem.get(s.memory)
                if m and m["hva"] and m["hva"] + s.offset <= hva < m["hva"] + s.offset + s.size:
                    return vm.name, s.gpa + hva - m["hva"] - s.offset
        return None

    # ---- the loop
    def serve(self, conn: Connection) -> int:
        self.conn = conn
        while True:
            try:
                cmd = conn.recv()
            except (EOFError, OSError):
                return 0
            op = cmd.pop("op")
            if op == "exit":
                self._reply(None)
                return 0
            try:
                result = getattr(self, "op_" + op.replace("-", "_"))(**cmd)
            except Unwind as e:
                result = "SIGBUS %s" % SHORT.get(e.code, e.code)
            except OSError as e:
                result = "error %s (%s)" % (errname(e.errno), e.strerror)
            except KernelPanic as e:
                result = "kernel panic: %s" % e.reason
            except Exception as e:            # a bug in the scenario machinery: say so
                result = "error BUG %s: %s" % (type(e).__name__, e)
            self._reply(result)

    def _reply(self, result) -> None:
        self.conn.send(dict(self._take(), result=result))

    def _take(self) -> dict:
        """What this thread saw since the last reply.  Swapped out before it is sent:
        a handler may run (and append) at any bytecode, also while sending."""
        out = {"journal": self.journal, "signals": self.signals, "requests": self.requests,
               "exits": self.exits}
        self.journal, self.signals, self.requests, self.exits = [], [], [], []
        return out

    # ---- memory through this process's mappings
    def addr(self, memory: str, offset: int) -> int:
        m = self.mem.get(memory)
        if not m or not m["hva"]:
            raise OSError(u.EFAULT, "memory %s is not mapped here" % memory)
        return m["hva"] + offset

    def op_read(self, memory: str, offset: int, length=None, **_):
        self.log("reads %s+%#x" % (memory, offset))
        self.task.read(self.addr(memory, offset), min(length or 8, 4096))
        return "ok"

    def op_write(self, memory: str, offset: int, length=None, data=0x5A, **_):
        n = length or 8
        self.log("writes %d bytes at %s+%#x" % (n, memory, offset))
        self.task.write(self.addr(memory, offset), bytes([data]) * n)
        return "ok"

    def op_touch(self, memory: str, offset: int, length=None, **_):
        n = length or PAGE
        self.log("touches %s+%#x..+%#x" % (memory, offset, offset + n))
        counts: dict = {}
        for off in range(offset & ~(PAGE - 1), offset + n, PAGE):
            try:
                self.task.read(self.addr(memory, off), 8)
                r = "ok"
            except Unwind as e:
                r = "SIGBUS %s" % SHORT.get(e.code, e.code)
            counts[r] = counts.get(r, 0) + 1
        return _counts(counts)

    def op_pread(self, memory: str, offset: int, length=None, **_):
        """read(2) of the memory's file: the kernel copies the page itself
        (filemap_read/shmem_file_read_iter), not through an MC-safe copy."""
        n = length or 8
        self.log("pread(fd, %d, %s+%#x)" % (n, memory, offset))
        got = self.task.pread(self.mem[memory]["fd"], n, offset)
        return "ok" if len(got) == n else "short read: %d of %d bytes" % (len(got), n)

    def op_vhost_copy(self, memory: str, offset: int, length=None, **_):
        """A vhost worker of this process copying a guest buffer (copy_from_iter):
        a kernel copy from user, EFAULT at a bad page, never a signal."""
        n = length or 8
        self.log("vhost copies %d bytes at %s+%#x" % (n, memory, offset))
        self.task.vhost_copy(self.addr(memory, offset), n)
        return "ok"

    def op_idle(self, seconds: float, **_):
        self.task.idle(seconds)
        return "ok"

    def op_madvise(self, memory: str, offset: int, **_):
        self.log("madvise(%#x, 4096, MADV_HWPOISON)" % self.addr(memory, offset))
        self.task.madvise(self.addr(memory, offset), PAGE, u.MADV_HWPOISON)
        return "ok"

    def op_convert(self, memory: str, offset: int, length: int, to: str, **_):
        self.log("converts %s+%#x..+%#x to %s" % (memory, offset, offset + length, to))
        self.task.gmem_convert(self.mem[memory]["fd"], offset, length, to == "private")
        return "ok"

    def op_punch(self, memory: str, offset: int, length: int, **_):
        self.log("fallocate(PUNCH_HOLE) %s+%#x..+%#x" % (memory, offset, offset + length))
        self.task.fallocate(self.mem[memory]["fd"], u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE,
                            offset, length)
        return "ok"

    def op_pfn(self, memory: str, offset: int, **_):
        """The frame behind memory+offset: the guest_memfd's own page, else this
        process's pagemap (populating the page as a read would)."""
        m = self.sc.memory(memory)
        slot = next((s for s in self.sc.vm(m.vm).slots if s.memory == memory
                     and s.offset <= offset < s.offset + s.size), None) if m.vm else None
        if m.type == "guest_memfd" and slot is not None:
            return self.vms[m.vm].gpa_to_pfn(slot.gpa + offset - slot.offset)["backing_pfn"]
        pm = self.task.pagemap(self.addr(memory, offset))
        return pm.pfn if pm.present else None

    def op_poll(self, **_):
        return None

    def op_pid(self, **_):
        return {"tid": self.task.tid, "tgid": self.task.tgid}


class MainActor(Actor):
    """A process's main thread: it builds the process (memory, VMs) and spawns its
    threads, vCPUs and child processes."""

    def op_init(self, **_):
        self.set_mce_kill(self.proc.mce_kill)
        self.install()
        kept = {}
        for name, m in self.mem.items():          # inherited across fork
            mem = self.sc.memory(name)
            if m["hva"] and self.proc.name not in mem.mapped_by:
                self.task.munmap(m["hva"], mem.size)
                m = dict(m, hva=0)
            elif not m["hva"] and self.proc.name in mem.mapped_by and m["fd"] is not None:
                m = dict(m, hva=self._map(mem, m["fd"]))
            kept[name] = m
        self.mem = kept
        kvm = None
        for vm in self.sc.vms:
            if vm.process == self.proc.name:
                kvm = kvm or self.task.open_kvm()
                self.vms[vm.name] = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM if vm.type == "sw-protected"
                                                  else u.KVM_X86_DEFAULT_VM)
        for mem in self.sc.memories:
            if mem.process == self.proc.name:
                self.mem[mem.name] = self._create(mem)
        for vm in self.sc.vms:
            if vm.process == self.proc.name:
                for i, s in enumerate(vm.slots):
                    self._bind(vm, i, s)
        for mem in self.sc.memories:
            for off, ln in mem.private if mem.process == self.proc.name else ():
                self.task.gmem_convert(self.mem[mem.name]["fd"], off, ln, True)
        return {n: m["hva"] for n, m in self.mem.items()}

    def _map(self, mem: Memory, fd) -> int:
        if mem.type == "anon":
            return self.task.mmap(0, mem.size, u.PROT_READ | u.PROT_WRITE,
                                  u.MAP_PRIVATE | u.MAP_ANONYMOUS, -1, 0)
        return self.task.mmap(0, mem.size, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)

    def _create(self, mem: Memory) -> dict:
        t = self.task
        fd = None
        if mem.type == "memfd":
            fd = t.memfd_create(mem.name, 0)
            t.ftruncate(fd, mem.size)
        elif mem.type == "hugetlb-memfd":
            fd = t.memfd_create(mem.name, u.MFD_HUGETLB | (u.MFD_HUGE_1GB if mem.page == 1 << 30
                                                           else u.MFD_HUGE_2MB))
            t.ftruncate(fd, mem.size)
        elif mem.type == "guest_memfd":
            flags = (u.GUEST_MEMFD_FLAG_MMAP if mem.mmap else 0) | (
                u.GUEST_MEMFD_FLAG_INIT_SHARED if mem.shared else 0)
            if mem.huge:
                flags |= u.GUEST_MEMFD_FLAG_HUGETLB | (u.GUESTMEM_HUGETLB_FLAG_1GB if mem.page == 1 << 30
                                                       else u.GUESTMEM_HUGETLB_FLAG_2MB)
            fd = self.vms[mem.vm].create_guest_memfd(mem.size, flags)
        hva = self._map(mem, fd) if self.proc.name in mem.mapped_by else 0
        return {"fd": fd, "hva": hva}

    def _bind(self, vm, i: int, s) -> None:
        mem = self.sc.memory(s.memory)
        m = self.mem[s.memory]
        hva = m["hva"] + s.offset if m["hva"] else 0
        if mem.type == "guest_memfd":
            self.vms[vm.name].set_user_memory_region2(i, u.KVM_MEM_GUEST_MEMFD, s.gpa, s.size, hva,
                                                      m["fd"], s.offset)
        else:
            if not hva:
                raise OSError(u.EINVAL, "memslot %d: memory %s is not mapped by %s"
                              % (i, s.memory, self.proc.name))
            self.vms[vm.name].set_user_memory_region2(i, 0, s.gpa, s.size, hva)

    def op_spawn(self, kind: str, name: str, arg: str | None = None, **_):
        """A thread (clone), a vCPU thread (clone) or a child process (fork)."""
        if kind == "fork":
            th = self.task.fork(_child_process, self, name, name=name)
        elif kind == "vcpu":
            th = self.task.clone(_vcpu_thread, self, name, arg, name=name)
        else:
            th = self.task.clone(_thread, self, name, arg, name=name)
        return th.pid


def _counts(counts: dict) -> str:
    if list(counts) == ["ok"]:
        return "ok"
    return ", ".join("%d %s" % (n, r) for r, n in counts.items())


# ---------------------------------------------------------------- new threads
def _child_process(task, parent: MainActor, name: str) -> int:
    a = MainActor(task, name, parent.sc, name, parent.sock)
    a.mem = {n: dict(m) for n, m in parent.mem.items()}
    return a.serve(connect(parent.sock, {"name": name, "tid": task.tid}))


def _thread(task, parent: MainActor, name: str, mce_kill: str) -> int:
    a = Actor(task, name, parent.sc, parent.proc.name, parent.sock)
    a.mem, a.vms = parent.mem, parent.vms
    a.set_mce_kill(mce_kill)
    a.install()
    return a.serve(connect(parent.sock, {"name": name, "tid": task.tid}))


def _vcpu_thread(task, parent: MainActor, name: str, vm_name: str) -> int:
    a = VcpuActor(task, name, parent.sc, parent.proc.name, parent.sock)
    a.mem, a.vms = parent.mem, parent.vms
    a.set_mce_kill("late")                  # QEMU's vCPU threads: PR_MCE_KILL_LATE
    a.install(vcpu=True)
    a.boot(vm_name)
    return a.serve(connect(parent.sock, {"name": name, "tid": task.tid}))


# ---------------------------------------------------------------- vCPUs
def _guest_access(g, op, gpas, data):
    """Guest user tasks, one per access: the guest kernel may kill any of them."""
    out = []
    for gpa in gpas:
        try:
            if op == "read":
                yield g.read(gpa, 8)
            else:
                yield g.write(gpa, data)
            out.append("ok")
        except GuestTaskKilled:
            out.append("killed")
    yield g.sync(out)


def _guest_kernel_read(g, what, gpa):
    """The guest kernel makes KVM read guest memory itself."""
    yield g.kernel()
    try:
        v = yield (g.emulate(gpa, 8) if what == "emulate" else g.kvm_map_read(gpa, 8))
        r = "ok" if v is not None else "map failed"
    except GuestTaskKilled:
        r = "killed"
    yield g.user()
    yield g.sync(r)


def _guest_boot(g):
    yield g.set_cr4_mce(True)
    yield g.sync("booted")


def _guest_idle(g):
    yield g.sync("idle")


class VcpuActor(Actor):
    """A vCPU thread: KVM_RUN in a loop, exits handled as its VMM does."""

    paused = False
    vcpu = None

    def boot(self, vm_name: str) -> None:
        self.vm_name = vm_name
        vm = self.vms[vm_name]
        self.vcpu = vm.create_vcpu(self.sc.vm(vm_name).vcpus.index(self.name))
        self.index = self.sc.vm(vm_name).vcpus.index(self.name)
        if self.model.mce_banks:
            self.vcpu.setup_mce(self.model.mcg_cap)
        self.vcpu.set_guest(_guest_boot)
        self.exec(raw=True)

    def gpa(self, memory: str, offset: int) -> int:
        s = next(s for s in self.sc.vm(self.vm_name).slots
                 if s.memory == memory and s.offset <= offset < s.offset + s.size)
        return s.gpa + offset - s.offset

    def exec(self, raw: bool = False):
        """kvm_cpu_exec() until the guest's ucall; the ucall's value, or what stopped it."""
        vcpu = self.vcpu
        while True:
            try:
                vcpu.run()
            except OSError as e:
                r = self._kvm_error(e, raw)
                if r is None:
                    continue
                return r
            kr = vcpu.kvm_run
            if kr.exit_reason == u.KVM_EXIT_IO:
                cmd, args = vcpu.ucall()
                if cmd == u.UCALL_SYNC:
                    return args[0]
                return "done"
            if kr.exit_reason == u.KVM_EXIT_SHUTDOWN:
                self.log("guest triple fault: shutdown")
                return "shutdown"
            return "exit %d" % kr.exit_reason

    def _kvm_error(self, e: OSError, raw: bool):
        """KVM_RUN returned -1: the VMM model decides (None re-enters).  A probe
        (raw) asks the machine, not the VMM: the errno is its answer."""
        if e.errno == u.EINTR:
            return None if raw else self.model.post_run(self)
        kr = self.vcpu.kvm_run
        mf = kr.memory_fault
        priv = bool(mf.flags & u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
        self.log("KVM_RUN: -1/%s, exit %d, gpa %#x, flags %#x" % (errname(e.errno), kr.exit_reason,
                                                                 mf.gpa, mf.flags))
        if raw:
            return errname(e.errno)
        self.exits.append(errname(e.errno) + (" (private)" if priv else ""))
        return self.model.on_kvm_error(self, e.errno, kr)   # a VMM that ends here does not return

    # ---- Executor, vCPU side
    def kvm_mce_inject(self, code: int, gpa: int) -> str | None:
        return self.model.do_inject_x86_mce(self, code, gpa)

    def guest_state(self) -> dict:
        return self.task._call("guest_state", vcpu=self.vcpu.fd)

    def set_mce(self, mce) -> None:
        self.vcpu.set_mce(mce)

    def convert(self, gpa: int, size: int, private: bool) -> None:
        self.exits.pop()                  # a conversion request the VMM resolves is no error
        mem, off = self._memory_at(gpa)
        self.task.gmem_convert(self.mem[mem]["fd"], off, size, private)

    def punch(self, gpa: int, size: int) -> None:
        mem, off = self._memory_at(gpa)
        self.task.fallocate(self.mem[mem]["fd"], u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE,
                            off, size)

    def pause(self) -> str:
        self.paused = True
        return "paused"

    def _memory_at(self, gpa: int) -> tuple[str, int]:
        for s in self.sc.vm(self.vm_name).slots:
            if s.gpa <= gpa < s.gpa + s.size:
                return s.memory, s.offset + gpa - s.gpa
        raise OSError(u.EFAULT, "gpa %#x in no memslot" % gpa)

    def _run(self, op: str, gpas: list, data: bytes, raw: bool = False):
        if self.paused and not raw:
            return ["paused"] * len(gpas)
        gk = self.vcpu.guest_kernel
        seen = len(gk.log)
        self.vcpu.set_guest(_guest_access, op, gpas, data)
        r = self.exec(raw)
        for line in gk.log[seen:]:
            self.log("guest kernel: " + line)
        if isinstance(r, list):
            return r
        return [r] * len(gpas)

    def op_read(self, memory: str, offset: int, length=None, **_):
        gpa = self.gpa(memory, offset)
        self.log("guest reads GPA %#x (%s+%#x)" % (gpa, memory, offset))
        return self._run("read", [gpa], b"")[0]

    def op_write(self, memory: str, offset: int, length=None, data=0x5A, **_):
        gpa = self.gpa(memory, offset)
        self.log("guest writes %d bytes at GPA %#x (%s+%#x)" % (length or 8, gpa, memory, offset))
        return self._run("write", [gpa], bytes([data]) * min(length or 8, PAGE - (gpa & (PAGE - 1))))[0]

    def op_touch(self, memory: str, offset: int, length=None, **_):
        n = length or PAGE
        gpas = [self.gpa(memory, o) for o in range(offset & ~(PAGE - 1), offset + n, PAGE)]
        self.log("guest touches GPA %#x..%#x (%s+%#x)" % (gpas[0], gpas[-1] + PAGE, memory, offset))
        counts: dict = {}
        for r in self._run("read", gpas, b""):
            counts[r] = counts.get(r, 0) + 1
        return _counts(counts)

    def _kernel_read(self, what: str, memory: str, offset: int):
        if self.paused:
            return "paused"
        gpa = self.gpa(memory, offset)
        self.log("guest makes KVM %s GPA %#x (%s+%#x)" % (
            "emulate an instruction at" if what == "emulate" else "map and read", gpa, memory, offset))
        self.vcpu.set_guest(_guest_kernel_read, what, gpa)
        r = self.exec()
        if r == "exit %d" % u.KVM_EXIT_INTERNAL_ERROR:
            return "KVM_EXIT_INTERNAL_ERROR (emulation)"
        return r

    def op_emulate(self, memory: str, offset: int, **_):
        """KVM emulates an instruction at the address: it fetches the bytes with
        __copy_from_user (kvm_fetch_guest_virt), an MC-safe copy."""
        return self._kernel_read("emulate", memory, offset)

    def op_kvm_map_read(self, memory: str, offset: int, **_):
        """KVM maps the page into the kernel and loads from it (kvm_vcpu_map): not
        MC-safe."""
        return self._kernel_read("kvm_map_read", memory, offset)

    def op_idle(self, seconds: float, **_):
        if not self.paused:
            self.vcpu.set_guest(_guest_idle)
            self.exec()
        self.task.idle(seconds)
        return "ok"

    def op_inject_mce(self, code: int, gpa: int, **_):
        """run_on_cpu(first_cpu, do_inject_x86_mce): this vCPU's thread does SET_MCE."""
        self.log("QEMU: injecting the %s machine check for GPA %#x (run_on_cpu)"
                 % (SHORT.get(code, code), gpa))
        if self.model.do_inject_x86_mce(self, code, gpa) == "reset":
            return "reset"
        if not self.paused:
            self.vcpu.set_guest(_guest_idle)
            self.exec()
        return "ok"

    def op_probe(self, gpas: list, **_):
        """Whether each page still works for the guest, whatever the VMM decided:
        one guest program per page, so that one failing page stops only itself."""
        return [self._run("read", [gpa], b"", raw=True)[0] for gpa in gpas]

