"""Random operation sequences run on both CPU backends, for the property tests
(tests/test_properties.py) and the soak (benchmarks/soak.py).

A sequence is a list of small tuples (`gen_ops` draws them from any integer
source: hypothesis or random.Random).  `run_sequence` runs one in a fresh worker
process attached to a running host, with the CPU backend chosen (Cython core or
the pure-Python reference): each op's outcome (data read, errno, the signals it
brought, normalised to mapping and offset) is recorded, and the emulated kernel's
invariants are checked after every step.  A signal that kills the worker is seen
as its exit status.  Two runs of one sequence must agree outcome for outcome.

Ops name mappings, pages and offsets by index modulo what exists, so every drawn
sequence is meaningful whatever the earlier ops did (an op with nothing to act on
is recorded as "none")."""
from __future__ import annotations

import json
import os
import select
import signal
import time

from . import uapi as u

PAGE = 4096
MB2 = 2 << 20
RAM = "96M"                   # the supervisor the sequences run on: small, so that the
HUGEPAGES = {"2M": 8}         # invariant check after every step stays cheap
RW = u.PROT_READ | u.PROT_WRITE
GPA = 1 << 32
GMEM_PAGES = 16
PUNCH = u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE
ADVICE = (u.MADV_HWPOISON, u.MADV_DONTNEED, u.MADV_SOFT_OFFLINE)
INJECT = ("corrupt_pfn", "hw_poison", "hw_detect")

# each op kind and the ranges of its integer arguments (see World.op_<kind>); mappings
# are anon, shmem, HugeTLB memfd and a VM's guest_memfd (4K or HugeTLB), accessed by
# single and batched loads/stores of the host, forked/cloned children and the guest
OPS = {
    "anon": ((1, 8),),
    "shmem": ((1, 8),),
    "huge": (),
    "munmap": ((0, 7), (0, 7), (1, 4)),
    "read": ((0, 7), (0, 1 << 16), (1, 256)),
    "write": ((0, 7), (0, 1 << 16), (1, 256), (0, 255)),
    "madvise": ((0, 7), (0, 7), (1, 2), (0, len(ADVICE) - 1)),
    "punch": ((0, 7), (0, 7), (1, 2)),
    "fork": ((0, 7), (0, 1 << 16), (0, 1)),
    "clone": ((0, 7), (0, 1 << 16), (0, 1)),
    "vm": ((0, 1),),
    "guest": ((0, GMEM_PAGES - 1), (0, PAGE - 1), (1, 64), (0, 1), (0, 2)),
    "inject": ((0, 7), (0, 1 << 12), (0, len(INJECT) - 1)),
    "unpoison": (),
    "convert": ((0, GMEM_PAGES - 1), (1, 4), (0, 1)),
    "rbatch": ((0, 7), (0, PAGE - 8), (0, 3), (1, 12)),
    "wbatch": ((0, 7), (0, PAGE - 8), (0, 3), (1, 12), (0, 255)),
    "gbatch": ((0, GMEM_PAGES - 1), (1, 12), (0, 1), (0, 2)),
    "truncate": ((0, 7), (0, 8)),
    "close": ((0, 7),),
    "prctl": ((0, 2),),
    "sigdfl": (),
}
WEIGHTS = {"anon": 2, "shmem": 2, "huge": 1, "munmap": 1, "read": 4, "write": 4, "madvise": 2,
           "punch": 1, "fork": 1, "clone": 1, "vm": 1, "guest": 3, "inject": 2, "unpoison": 1,
           "convert": 1, "prctl": 1, "sigdfl": 1, "rbatch": 2, "wbatch": 2, "gbatch": 2,
           "truncate": 1, "close": 1}
KINDS = [k for k, w in WEIGHTS.items() for _ in range(w)]     # drawn uniformly: weighted
CREATE = ["anon", "shmem", "huge", "vm"]     # a sequence starts with something to act on


def gen_op(draw, kinds=KINDS) -> tuple:
    """One op from `draw(lo, hi)`, an inclusive integer source."""
    kind = kinds[draw(0, len(kinds) - 1)]
    return (kind,) + tuple(draw(lo, hi) for lo, hi in OPS[kind])


def gen_ops(draw, n: int) -> list[tuple]:
    """n ops, the first of them creating a mapping."""
    return [gen_op(draw, CREATE if i == 0 else KINDS) for i in range(n)]


class Stop(Exception):
    """Raised by the SIGBUS recorder for a synchronous signal: the access ends."""


class _Mapping:
    __slots__ = ("addr", "npages", "kind", "fd", "foff")

    def __init__(self, addr, npages, kind, fd, foff=0):
        self.addr, self.npages, self.kind, self.fd, self.foff = addr, npages, kind, fd, foff

    @property
    def end(self):
        return self.addr + self.npages * PAGE


class World:
    """The worker's side of one sequence: its mappings, files, VM and signals."""

    def __init__(self, host, me):
        self.host, self.me = host, me
        self.maps: list[_Mapping] = []
        self.sigs: list[tuple] = []
        self.vm = None
        self.injected: list[int] = []

    # -- signals
    def handler(self, signum, info):
        self.sigs.append((signum, info.si_code, info.si_addr, info.si_addr_lsb))
        if info.si_code != u.BUS_MCEERR_AO:
            raise Stop()

    def where(self, addr: int):
        """An address as (mapping index, offset), stable across runs."""
        for i, m in enumerate(self.maps):
            if m.addr <= addr < m.end:
                return (i, addr - m.addr)
        return ("-", 0 if addr == 0 else addr & (PAGE - 1))

    def take_sigs(self) -> list:
        out = [(s, c, self.where(a), lsb) for s, c, a, lsb in self.sigs]
        self.sigs = []
        return out

    def pick(self, i: int):
        return self.maps[i % len(self.maps)] if self.maps else None

    # -- ops
    def run(self, op: tuple):
        kind = op[0]
        try:
            val = getattr(self, "op_" + kind)(*op[1:])
            out = ("ok", val)
        except Stop:
            out = ("stopped",)
        except OSError as e:
            out = ("errno", e.errno)
        return out

    def _add(self, addr, npages, kind, fd, foff=0):
        self.maps.append(_Mapping(addr, npages, kind, fd, foff))
        return len(self.maps) - 1

    def op_anon(self, npages):
        a = self.me.mmap(0, npages * PAGE, RW, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
        return self._add(a, npages, "anon", -1)

    def op_shmem(self, npages):
        fd = self.me.memfd_create("s")
        self.me.ftruncate(fd, npages * PAGE)
        a = self.me.mmap(0, npages * PAGE, RW, u.MAP_SHARED, fd, 0)
        return self._add(a, npages, "shmem", fd)

    def op_huge(self):
        fd = self.me.memfd_create("h", u.MFD_HUGETLB)
        try:
            self.me.ftruncate(fd, MB2)
            a = self.me.mmap(0, MB2, RW, u.MAP_SHARED, fd, 0)
        except OSError:
            self.me.close(fd)
            raise
        return self._add(a, MB2 // PAGE, "huge", fd)

    def op_munmap(self, i, page, npages):
        m = self.pick(i)
        if m is None:
            return "none"
        page %= m.npages
        npages = min(npages, m.npages - page)
        self.me.munmap(m.addr + page * PAGE, npages * PAGE)
        # the model follows: the mapping loses [page, page + npages)
        idx = self.maps.index(m)
        pieces = []
        if page:
            pieces.append(_Mapping(m.addr, page, m.kind, m.fd, m.foff))
        if page + npages < m.npages:
            pieces.append(_Mapping(m.addr + (page + npages) * PAGE, m.npages - page - npages,
                                   m.kind, m.fd, m.foff + page + npages))
        self.maps[idx:idx + 1] = pieces
        return len(pieces)

    def _span(self, i, off, n):
        m = self.pick(i)
        if m is None:
            return None, 0, 0
        off %= m.npages * PAGE
        return m, m.addr + off, min(n, m.end - (m.addr + off))

    def op_read(self, i, off, n):
        m, a, n = self._span(i, off, n)
        return "none" if m is None else self.me.read(a, n).hex()

    def op_write(self, i, off, n, byte):
        m, a, n = self._span(i, off, n)
        if m is None:
            return "none"
        self.me.write(a, bytes([byte]) * n)
        return n

    def _batch_addrs(self, i, off, stride, count):
        """`count` 8-byte slots in a mapping: `stride` pages apart from `off`, or with
        stride 0 consecutive slots in its first page."""
        m = self.pick(i)
        if m is None:
            return None
        off &= ~7
        if not stride:
            return [m.addr + (off + 8 * k) % PAGE for k in range(count)]
        return [m.addr + (k * stride % m.npages) * PAGE + off for k in range(count)]

    def op_rbatch(self, i, off, stride, count):
        addrs = self._batch_addrs(i, off, stride, count)
        return "none" if addrs is None else bytes(self.me.read_batch(addrs, 8)).hex()

    def op_wbatch(self, i, off, stride, count, byte):
        addrs = self._batch_addrs(i, off, stride, count)
        if addrs is None:
            return "none"
        self.me.write_batch(addrs, 8, bytes([byte]) * 8 * count)
        return count

    def op_gbatch(self, page, count, write, priv):
        """A batch of guest accesses, one 8-byte slot per page from `page` on."""
        if self.vm is None:
            return "none"
        gpas = [GPA + ((page + k) % GMEM_PAGES) * PAGE + 8 * k for k in range(count)]
        view = (None, False, True)[priv]

        def guest(g):
            if write:
                yield g.write_batch(gpas, 8, b"\x3e" * 8 * count, view)
                yield g.sync("w")
            else:
                v = yield g.read_batch(gpas, 8, view)
                yield g.sync(bytes(v).hex())
            yield g.done()

        return self._run_guest(guest)

    def op_madvise(self, i, page, npages, adv):
        m = self.pick(i)
        if m is None:
            return "none"
        page %= m.npages
        npages = min(npages, m.npages - page)
        self.me.madvise(m.addr + page * PAGE, npages * PAGE, ADVICE[adv])
        return 0

    def op_punch(self, i, page, npages):
        m = self.pick(i)
        if m is None or m.fd < 0:
            return "none"
        page %= m.npages
        size = PAGE
        if m.kind in ("huge", "gmem-huge"):
            size = MB2
            page, npages = 0, 1
        self.me.fallocate(m.fd, PUNCH, (m.foff + page) * PAGE if size == PAGE else 0,
                          npages * size)
        return 0

    def op_truncate(self, i, npages):
        """ftruncate a mapping's file (pages past the end: SIGBUS BUS_ADRERR)."""
        m = self.pick(i)
        if m is None or m.fd < 0 or m.kind.startswith("gmem"):
            return "none"
        unit = MB2 if m.kind == "huge" else PAGE
        self.me.ftruncate(m.fd, npages % 2 * unit if unit == MB2 else npages * PAGE)
        return 0

    def op_close(self, i):
        """Close a mapping's file descriptor: the mapping keeps the file."""
        m = self.pick(i)
        if m is None or m.fd < 0:
            return "none"
        fd = m.fd
        self.me.close(fd)
        for other in self.maps:
            if other.fd == fd:
                other.fd = -1
        if self.vm is not None and self.vm[2] == fd:
            self.vm = (self.vm[0], self.vm[1], -1)
        return 0

    def _child(self, i, off, write, how):
        m, a, _n = self._span(i, off, 8)
        if m is None:
            return "none"
        a &= ~7

        def fn(t):
            got = []

            def h(signum, info):
                got.append((signum, info.si_code, info.si_addr - a, info.si_addr_lsb))
                if info.si_code != u.BUS_MCEERR_AO:
                    raise Stop()

            import emu

            emu.sigaction(signal.SIGBUS, h)
            try:
                if write:
                    t.write(a, b"\x5c" * 8)
                    return ["w", got]
                return [t.read(a, 8).hex(), got]
            except Stop:
                return ["stopped", got]
            except OSError as e:
                return ["errno", e.errno, got]

        th = (self.me.fork if how == "fork" else self.me.clone)(fn, name="c")
        code = th.join(30)
        return [code, th.result]

    def op_fork(self, i, off, write):
        return self._child(i, off, write, "fork")

    def op_clone(self, i, off, write):
        return self._child(i, off, write, "clone")

    def op_vm(self, huge):
        """A VM whose slot is a 2 MiB mmap-able guest_memfd (HugeTLB-backed with
        `huge`); ops address its first GMEM_PAGES pages."""
        if self.vm is not None:
            return "none"
        me = self.me
        vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
        size = MB2
        flags = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
        if huge:
            flags |= u.GUEST_MEMFD_FLAG_HUGETLB | u.GUESTMEM_HUGETLB_FLAG_2MB
        gfd = vm.create_guest_memfd(size, flags)
        hva = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
        vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, hva, gfd, 0)
        vcpu = vm.create_vcpu(0)
        self.vm = (vm, vcpu, gfd)
        return self._add(hva, GMEM_PAGES, "gmem-huge" if huge else "gmem", gfd)

    def op_guest(self, page, off, n, write, priv):
        if self.vm is None:
            return "none"
        gpa = GPA + page * PAGE + off
        n = min(n, GMEM_PAGES * PAGE - page * PAGE - off)
        view = (None, False, True)[priv]

        def guest(g):
            if write:
                yield g.write(gpa, b"\xa7" * n, view)
                yield g.sync("w")
            else:
                v = yield g.read(gpa, n, view)
                yield g.sync(bytes(v).hex())
            yield g.done()

        return self._run_guest(guest)

    def _run_guest(self, guest):
        vcpu = self.vm[1]
        vcpu.set_guest(guest)
        exits = []
        for _ in range(4):                   # a VMM's KVM_RUN loop, bounded
            try:
                vcpu.run()
            except OSError as e:
                m = vcpu.kvm_run.memory_fault
                exits.append(["err", e.errno, vcpu.kvm_run.exit_reason, m.gpa - GPA if m.gpa else 0,
                              m.flags])
                if e.errno != u.EINTR:
                    break
                continue
            r = vcpu.kvm_run.exit_reason
            if r == u.KVM_EXIT_IO:
                exits.append(["sync", vcpu.ucall()[1][0]])
                break
            exits.append(["exit", r])
            if r != u.KVM_EXIT_INTR:
                break
        return exits

    def _pfn(self, i, page):
        """The frame behind a page: the host's PTE, or for guest_memfd the file's
        folio (a page only the guest touched has no host mapping)."""
        m = self.pick(i)
        if m is None:
            return None
        page %= m.npages
        e = self.me.pagemap(m.addr + page * PAGE)
        if e.present:
            return e.pfn
        if m.kind.startswith("gmem") and self.vm is not None:
            return self.vm[0].gpa_to_pfn(GPA + (m.foff + page) * PAGE)["backing_pfn"]
        return None

    def op_inject(self, i, page, how):
        pfn = self._pfn(i, page)
        if pfn is None:
            return "none"
        self.injected.append(pfn)
        r = getattr(self.host, INJECT[how])(pfn)
        return r

    def op_unpoison(self):
        if not self.injected:
            return "none"
        return self.host.unpoison_pfn(self.injected[-1])

    def op_convert(self, page, npages, private):
        if self.vm is None:
            return "none"
        npages = min(npages, GMEM_PAGES - page)
        self.me.gmem_convert(self.vm[2], page * PAGE, npages * PAGE, bool(private))
        return 0


    def op_prctl(self, mode):
        """PR_MCE_KILL: early, late, or back to the sysctl's default."""
        if mode == 2:
            return self.me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_CLEAR)
        return self.me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET,
                             (u.PR_MCE_KILL_LATE, u.PR_MCE_KILL_EARLY)[mode])

    def op_sigdfl(self):
        """SIGBUS back to SIG_DFL: the next one kills the worker (seen as its exit)."""
        import emu

        emu.sigaction(signal.SIGBUS, signal.SIG_DFL)
        return 0


def _worker(host, ops, backend: str, wfd: int, check: bool) -> None:
    """The forked worker: attach with the chosen CPU, run the ops, stream outcomes."""
    import emu

    if backend == "python":
        os.environ["EMU_FASTPATH"] = "python"
    else:
        os.environ.pop("EMU_FASTPATH", None)
    out = os.fdopen(wfd, "w", buffering=1)
    me = emu.attach(host, name="seq")
    w = World(host, me)
    emu.sigaction(signal.SIGBUS, w.handler)
    for step, op in enumerate(ops):
        res = w.run(op)
        rec = {"step": step, "op": list(op), "out": res, "sigs": w.take_sigs()}
        if check:
            rec["bad"] = host.check_invariants()
        out.write(json.dumps(rec) + "\n")
    out.flush()
    me.exit()


def run_sequence(host, ops, backend: str, check: bool = True, timeout: float = 60.0) -> dict:
    """Run `ops` in a fresh worker on `backend`: {"steps": [...], "exit": status,
    "bad": [(step, line), ...]} (step -1: after the worker is gone)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            _worker(host, ops, backend, w, check)
        except BaseException as e:       # an unexpected error is the harness's, report it
            try:
                os.write(w, (json.dumps({"step": -2, "error": repr(e)}) + "\n").encode())
            except OSError:
                pass
            code = 70
        os._exit(code)
    os.close(w)
    buf, end = b"", time.monotonic() + timeout
    hung = False
    while True:
        left = end - time.monotonic()
        if left <= 0:
            hung = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([r], [], [], left)
        if not ready:
            continue
        chunk = os.read(r, 65536)
        if not chunk:
            break
        buf += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    steps = [json.loads(line) for line in buf.decode().splitlines() if line]
    res = {"steps": [s for s in steps if s["step"] >= 0], "exit": os.waitstatus_to_exitcode(status),
           "hung": hung, "error": [s["error"] for s in steps if s["step"] == -2]}
    bad = [(s["step"], line) for s in res["steps"] for line in s.get("bad", ())]
    if check:
        _wait_exited(host, pid)
        bad += [(-1, line) for line in host.check_invariants()]
    res["bad"] = bad
    return res


def _wait_exited(host, pid: int, timeout: float = 5.0) -> None:
    """The kernel tears a dead worker down when it sees EOF: wait until it has."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(p["tgid"] == pid for p in host.status()["processes"]):
            return
        time.sleep(0.002)


def outcome(res: dict) -> list:
    """What must agree between backends: every step's op, outcome and signals, and
    the worker's exit status."""
    return [[s["op"], s["out"], s["sigs"]] for s in res["steps"]] + [["exit", res["exit"]]]


def diff(a: dict, b: dict) -> str | None:
    """The first disagreement between two runs of one sequence, or None."""
    oa, ob = outcome(a), outcome(b)
    for x, y in zip(oa, ob, strict=False):
        if x != y:
            return "%r != %r" % (x, y)
    if len(oa) != len(ob):
        return "%d steps != %d steps" % (len(oa), len(ob))
    return None
