"""Stores to a frame with a latent uncorrected error (x86 SRAR is loads and fetches only).

Intel SDM vol. 3B, machine-check architecture ("SRAR error" and the table of MCA error
codes for SRAR): software recoverable action-required errors are signalled for a data
load (MCACOD 0x134) and an instruction fetch (0x150); a store does not consume the
poison (hardware may at most log a UCNA or SRAO when the line is written back).
Linux's severity table (arch/x86/kernel/cpu/mce/severity.c) accordingly has AR rows
only for "data load" and "instruction fetch".  So a store to a frame from
host.hw_poison() completes: no #MC, no SIGBUS, no memory_failure(); the frame stays
bad and the next load still consumes the poison.
"""
import array

import pytest
from checks import Stop, sigbus_recorder

import emu
from emu import _core as C
from emu import uapi as u
from emu._pyref import PyCore

PAGE = 4096
GPA = 1 << 32

pytestmark = pytest.mark.both_backends        # conftest: each test on both CPUs


@pytest.fixture
def me(backend, host):
    return emu.attach(host, name="cpu")


def _poisoned_anon_page(me, host):
    a = me.mmap(0, 2 * PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"\x11" * (2 * PAGE))
    pfn = me.pagemap(a).pfn
    host.hw_poison(pfn)
    return a, pfn




def test_store_to_poisoned_frame_completes_and_a_later_load_consumes(me, host):
    got = sigbus_recorder()
    a, pfn = _poisoned_anon_page(me, host)
    me.write(a + 0x100, b"stored!!")                  # no #MC: the store completes
    assert got == []
    assert host.mf_stats()["total"] == 0
    assert not any("Uncorrected hardware memory error" in line for line in host.dmesg())
    assert me._core.phys_read(pfn, 0x100, 8) == b"stored!!"   # the bytes reached the frame
    assert me.pagemap(a).present and not me.pagemap(a).hwpoison
    # the line is still poisoned: the next load is an SRAR, as before the store
    with pytest.raises(Stop):
        me.read(a + 0x100, 8)
    assert got == [(u.BUS_MCEERR_AR, a, 12)]
    assert me.pagemap(a).hwpoison
    assert host.mf_stats()["total"] == 1


def test_batched_stores_cross_a_poisoned_frame(me, host):
    got = sigbus_recorder()
    a, pfn = _poisoned_anon_page(me, host)
    addrs = array.array("Q", [a + 8, a + PAGE + 8])   # the poisoned page, then the good one
    me.write_batch(addrs, 8, b"AAAAAAAABBBBBBBB")
    assert got == []
    assert me.read(a + PAGE + 8, 8) == b"BBBBBBBB"
    assert me._core.phys_read(pfn, 8, 8) == b"AAAAAAAA"
    with pytest.raises(Stop):
        me.read_batch(addrs, 8)
    assert got == [(u.BUS_MCEERR_AR, a, 12)]


def test_both_backends_agree_stores_pass_loads_stop(me, host):
    """The CPU contract itself: on a frame with hwerr set, a write returns ACC_OK and
    a read ACC_MCE, on the Cython core and the reference alike."""
    a, pfn = _poisoned_anon_page(me, host)
    core, py = me._core, PyCore(me._core)
    assert core.access_write(me.slot, me.pgd, a + 4, bytearray(b"w" * 8)) == (8, C.ACC_OK, 0, 0)
    assert py.access(me.slot, me.pgd, a + 4, bytearray(b"w" * 8), True) == (8, C.ACC_OK, 0, 0)
    assert core.access_read(me.slot, me.pgd, a + 4, bytearray(8)) == (0, C.ACC_MCE, a + 4, pfn)
    assert py.access(me.slot, me.pgd, a + 4, bytearray(8), False) == (0, C.ACC_MCE, a + 4, pfn)
    # a write that spans into the poisoned page from the one before does not stop either
    b = a + PAGE - 4
    host.hw_poison(me.pagemap(a + PAGE).pfn)
    assert core.access_write(me.slot, me.pgd, b, bytearray(8)) == (8, C.ACC_OK, 0, 0)
    assert py.access(me.slot, me.pgd, b, bytearray(8), True) == (8, C.ACC_OK, 0, 0)
    r = core.access_batch(me.slot, me.pgd, array.array("Q", [a, a + PAGE]), 0, 8, bytearray(16), True)
    assert r[:2] == (2, C.ACC_OK)
    r = py.access_batch(me.slot, me.pgd, array.array("Q", [a, a + PAGE]), 0, 8, bytearray(16), True)
    assert r[:2] == (2, C.ACC_OK)


def test_guest_store_to_poisoned_frame_does_not_exit(me, host):
    """Through stage-2 too: a guest store completes without a #MC (KVM_RUN goes on to
    the ucall); the guest's next load of the page is the machine check."""
    size = 2 * PAGE
    vm = me.open_kvm().create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    hva = me.mmap(0, size, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, hva, gfd, 0)
    me.write(hva, b"\x22" * size)
    pfn = me.pagemap(hva).pfn
    got = sigbus_recorder()

    def guest(g):
        yield g.read(GPA + 64, 8)                    # stage-2 mapped before the error
        yield g.sync(0)
        yield g.write(GPA + 64, b"guest-st")
        yield g.sync(1)
        yield g.read(GPA + 64, 8)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert vcpu.run() == 0 and vcpu.ucall() == (u.UCALL_SYNC, (0,))
    host.hw_poison(pfn)
    assert vcpu.run() == 0 and vcpu.ucall() == (u.UCALL_SYNC, (1,))
    assert got == [] and host.mf_stats()["total"] == 0
    assert me._core.phys_read(pfn, 64, 8) == b"guest-st"
    with pytest.raises(Stop):                         # the load: #MC in guest mode
        vcpu.run()
    assert host.mf_stats()["total"] == 1
