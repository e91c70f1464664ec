"""The emulated CPU: the same cases against the Cython fast path and the
pure-Python reference (emu._pyref), as uvloop runs its tests on two loops."""
import array
import os
import signal

import pytest

import emu
from emu import _core as C
from emu import uapi as u
from emu._pyref import PyCore

PAGE = 4096


pytestmark = pytest.mark.both_backends        # conftest: each test on both CPUs


@pytest.fixture
def me(backend, host):
    task = emu.attach(host, name="cpu")
    assert (task._rd == task._core.access_read) == (backend == "cython")
    return task


def _anon(me, pages):
    return me.mmap(0, pages * PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)


def test_read_write_across_pages(me):
    a = _anon(me, 4)
    data = bytes(range(256)) * 40                  # 10240 bytes, crosses 3 pages
    me.write(a + 100, data)
    assert me.read(a + 100, len(data)) == data
    assert me.read(a, 100) == bytes(100)           # fresh anonymous memory reads zeros


def test_accessed_and_dirty_bits(me, host):
    a = _anon(me, 2)
    me.read(a, 1)                                  # read fault: present, accessed, clean
    e, level = me._core.walk(me.pgd, a)
    assert level == 1 and e & C.PTE_PRESENT and e & C.PTE_ACCESSED and not e & C.PTE_DIRTY
    me.write(a + 5, b"x")                          # the CPU sets D without a fault
    e, _ = me._core.walk(me.pgd, a)
    assert e & C.PTE_DIRTY


def test_batch_resumes_after_faults(me):
    a = _anon(me, 8)
    addrs = array.array("Q", [a + i * PAGE + 8 for i in range(8)])
    me.write_batch(addrs, 8, b"".join(i.to_bytes(8, "little") for i in range(8)))
    out = me.read_batch(addrs, 8)
    assert [int.from_bytes(out[i * 8:i * 8 + 8], "little") for i in range(8)] == list(range(8))


def test_write_to_readonly_mapping_is_sigsegv(me, host):
    """A write through a read-only PTE is a fault the kernel answers with SIGSEGV."""
    def child(t):
        a = t.mmap(0, PAGE, u.PROT_READ, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
        t.read(a, 1)
        t.write(a, b"x")
        return "survived"

    ch = me.fork(child)
    assert ch.join(10) == -signal.SIGSEGV


def test_latent_poison_is_consumed_by_an_access(me, host):
    got = []

    def h(signum, info):
        got.append((info.si_code, info.si_addr, info.si_addr_lsb))
        raise InterruptedError

    emu.sigaction(signal.SIGBUS, h)
    a = _anon(me, 1)
    me.write(a, b"\xce" * PAGE)
    pfn = me.pagemap(a).pfn
    host.hw_poison(pfn)
    with pytest.raises(InterruptedError):
        me.read(a + 0x40, 8)
    # the #MC killed current with AR at the page; the page is a hwpoison entry now
    assert got == [(u.BUS_MCEERR_AR, a, 12)]
    assert me.pagemap(a).hwpoison


def test_both_backends_agree_on_status(host):
    """Direct comparison on the same tables: bytes, status, fault address, pfn."""
    me = emu.attach(host, name="cmp")
    a = _anon(me, 3)
    me.write(a, os.urandom(2 * PAGE))              # pages 0-1 present, page 2 not
    core, py = me._core, PyCore(me._core)
    pfn1 = me.pagemap(a + PAGE).pfn
    host.hw_poison(pfn1)
    for va, n in ((a, 100), (a + 4000, 200), (a + PAGE - 8, 16), (a + 2 * PAGE + 1, 4)):
        b1, b2 = bytearray(n), bytearray(n)
        r1 = core.access_read(me.slot, me.pgd, va, b1)
        r2 = py.access(me.slot, me.pgd, va, b2, False)
        assert r1 == r2 and b1 == b2, (hex(va), r1, r2)
    assert core.access_read(me.slot, me.pgd, a + PAGE, bytearray(8))[1:] == (C.ACC_MCE, a + PAGE, pfn1)
    assert core.access_read(me.slot, me.pgd, a + 2 * PAGE + 1, bytearray(4))[1:3] == (
        C.ACC_FAULT, a + 2 * PAGE + 1)


def _sw_protected_vm(me, size):
    """A SW_PROTECTED VM over a gmem-only file: page 0 private, the rest shared."""
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    hva = me.mmap(0, size, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, hva, gfd, 0)
    me.gmem_convert(gfd, 0, PAGE, True)
    return vm, hva


GPA = 1 << 32


def test_guest_accesses_run_on_the_selected_backend(me, backend, monkeypatch):
    """The vCPU's stage-2 loads and stores take the same CPU as the host's: the
    reference with EMU_FASTPATH=python, the Cython core otherwise."""
    calls = []
    real = PyCore._access
    monkeypatch.setattr(PyCore, "_access", lambda self, *a: calls.append(a[:2]) or real(self, *a))
    vm, hva = _sw_protected_vm(me, 4 * PAGE)
    me.write(hva + PAGE, b"shared!!")

    def guest(g):
        v = yield g.read(GPA + PAGE, 8, False)
        yield g.write(GPA, v, True)                  # private page: only the guest sees it
        v = yield g.read(GPA, 8, True)
        yield g.sync(v)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    vcpu.run()
    assert vcpu.ucall()[1][0] == b"shared!!"
    s2 = [c for c in calls if c[0] == vcpu.s2]
    assert bool(s2) == (backend == "python"), calls


def test_both_backends_agree_on_stage2_private_view(host):
    """Stage-2 entries carry the private/shared kind: an access whose view (priv 0/1)
    disagrees faults on both backends, priv -1 ignores it; bytes and status agree."""
    me = emu.attach(host, name="cmp")
    vm, hva = _sw_protected_vm(me, 4 * PAGE)
    me.write(hva + PAGE, b"s" * 16)

    def guest(g):
        yield g.write(GPA, b"p" * 16, True)
        yield g.read(GPA + PAGE, 16, False)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    vcpu.run()
    core, py = me._core, PyCore(me._core)
    seen = set()
    for gpa in (GPA, GPA + PAGE, GPA + 2 * PAGE, GPA + PAGE - 8):
        for priv in (-1, 0, 1):
            for write in (False, True):
                b1 = bytearray(b"w" * 16) if write else bytearray(16)
                b2 = bytearray(b1)
                if write:
                    r1 = core.access_write(me.slot, vcpu.s2, gpa, b1, priv)
                else:
                    r1 = core.access_read(me.slot, vcpu.s2, gpa, b1, priv)
                r2 = py.access(me.slot, vcpu.s2, gpa, b2, write, priv)
                assert r1 == r2 and b1 == b2, (hex(gpa), priv, write, r1, r2)
                seen.add(r1[1])
                b1 = bytearray(32)
                r1 = core.access_batch(me.slot, vcpu.s2, array.array("Q", [gpa, gpa + 8]), 0, 16,
                                       b1, write, priv)
                b2 = bytearray(32)
                r2 = py.access_batch(me.slot, vcpu.s2, array.array("Q", [gpa, gpa + 8]), 0, 16,
                                     b2, write, priv)
                assert r1 == r2 and b1 == b2, (hex(gpa), priv, write, r1, r2)
    assert seen == {C.ACC_OK, C.ACC_FAULT}
    # the private page through a shared view faults at its first byte
    assert core.access_read(me.slot, vcpu.s2, GPA, bytearray(8), 0)[:3] == (0, C.ACC_FAULT, GPA)
    assert core.access_read(me.slot, vcpu.s2, GPA, bytearray(8), 1) == (8, C.ACC_OK, 0, 0)


def test_batch_word_path_agrees_with_reference(host_factory):
    """The batch's word-sized path (size 8: one copy per access, in one page) and
    the general path give the reference's bytes and outcome: accesses inside a
    page, across a page boundary, inside a 2M HugeTLB leaf (a PMD entry), then a
    hole (FAULT) and latent poison (MCE), each stopping the batch where the
    reference stops it."""
    host = host_factory(ram="128M", hugepages={"2M": 2})
    me = emu.attach(host, name="cmp")
    core, py = me._core, PyCore(me._core)
    a = _anon(me, 4)
    me.write(a, os.urandom(3 * PAGE))              # pages 0-2 present, page 3 not
    gfd = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM).create_guest_memfd(
        2 << 20, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
        | u.GUEST_MEMFD_FLAG_HUGETLB | u.GUESTMEM_HUGETLB_FLAG_2MB)
    h = me.mmap(0, 2 << 20, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
    me.write(h + 0x12345, os.urandom(PAGE))
    assert core.walk(me.pgd, h + 0x12345)[1] == 2   # a PMD leaf: va's offset in it counts
    ok = [a + 8, a + PAGE - 4, a + PAGE + 100, a + PAGE - 8, h + 0x12345, h + 0x13000 - 3]
    pfn2 = me.pagemap(a + 2 * PAGE).pfn
    for size in (8, 16, 3):
        for tail in ([], [a + 3 * PAGE + 8, a], [a + 2 * PAGE, a]):
            if tail and tail[0] == a + 2 * PAGE:
                host.hw_poison(pfn2)
            addrs = array.array("Q", ok + tail)
            b1, b2 = bytearray(len(addrs) * size), bytearray(len(addrs) * size)
            r1 = core.access_batch(me.slot, me.pgd, addrs, 0, size, b1, False)
            r2 = py.access_batch(me.slot, me.pgd, addrs, 0, size, b2, False)
            assert r1 == r2 and b1 == b2, (size, tail, r1, r2)
            assert r1[0] == len(ok) if tail else r1[0] == len(addrs)   # stopped at the tail
            for i, va in enumerate(addrs[:r1[0]]):          # each as a single access
                one = bytearray(size)
                core.access_read(me.slot, me.pgd, va, one)
                assert b1[i * size:(i + 1) * size] == one
    # the batch writes too: a word at each address, read back one by one
    addrs = array.array("Q", ok)
    data = os.urandom(len(ok) * 8)
    assert core.access_batch(me.slot, me.pgd, addrs, 0, 8, data, True)[:2] == (len(ok), C.ACC_OK)
    for j, va in enumerate(ok):
        if j != 1:                                  # ok[3], written later, overlaps ok[1]
            assert me.read(va, 8) == data[j * 8:(j + 1) * 8]


def test_benchmark_baselines_copy_the_same_bytes(host):
    """The benchmark baselines (software walk, plain loads from a real mmap) read the
    bytes the fast path reads, so their ratios compare the same work."""
    me = emu.attach(host, name="base")
    a = _anon(me, 4)
    data = os.urandom(4 * PAGE)
    me.write(a, data)
    hw = C.HwMem(4 * PAGE)
    hw.load(0, data)
    addrs = array.array("Q", [a + 8, a + 3 * PAGE + 16, a + PAGE - 8, a + 2 * PAGE])
    for size in (8, 5):
        fast, soft, real = (bytearray(len(addrs) * size) for _ in range(3))
        assert me._core.access_batch(me.slot, me.pgd, addrs, 0, size, fast, False)[0] == 4
        assert me._core.soft_walk_loop(me.pgd, addrs, size, soft) == 4
        hw.read_batch(a, addrs, size, real)
        assert fast == soft == real
    with pytest.raises(ValueError):
        hw.read_batch(a, array.array("Q", [a + 4 * PAGE]), 8, bytearray(8))
