"""The host side of tools/testing/selftests/kvm/guest_memfd_test.c against the emulated
kernel (virt/kvm/guest_memfd.c: kvm_gmem_create, kvm_gmem_fallocate, kvm_gmem_fault_user_mapping)."""
import errno
import signal

import pytest

import emu
from emu import uapi as u

pytestmark = pytest.mark.both_backends      # conftest: on the Cython core and the reference CPU

PAGE = 4096
RW = u.PROT_READ | u.PROT_WRITE
SHARED_FLAGS = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
KEEP = u.FALLOC_FL_KEEP_SIZE
PUNCH = u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE


class Sigbus(Exception):
    def __init__(self, info):
        super().__init__(info)
        self.info = info


def _raise(signum, info):
    raise Sigbus(info)


def setup(host, size, flags=SHARED_FLAGS, vm_type=u.KVM_X86_DEFAULT_VM):
    me = emu.attach(host, name="gmem-test")
    vm = me.open_kvm().create_vm(vm_type)
    gfd = vm.create_guest_memfd(size, flags)
    return me, vm, gfd


def expect_sigbus(fn, *args):
    with pytest.raises(Sigbus) as ei:
        fn(*args)
    return ei.value.info


# ------------------------------------------------------------------ mmap_supported
def test_mmap_shared_roundtrip(host):
    size = 4 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    assert me.read(a, size) == bytes(size)            # fresh guest_memfd pages are zeroed
    pattern = bytes((i * 7) & 0xFF for i in range(size))
    me.write(a, pattern)
    assert me.read(a, size) == pattern
    me.write(a + PAGE + 100, b"\xaa" * 16)
    assert me.read(a + PAGE + 100, 16) == b"\xaa" * 16
    e = me.pagemap(a)
    assert e.present and e.file and e.pfn > 0
    me.munmap(a, size)
    # the contents live in the file, not the mapping
    b = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    expect = bytearray(pattern)
    expect[PAGE + 100:PAGE + 116] = b"\xaa" * 16
    assert me.read(b, size) == bytes(expect)


def test_mmap_with_offset(host):
    size = 4 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    me.write(a + 2 * PAGE, b"page two")
    b = me.mmap(0, 2 * PAGE, RW, u.MAP_SHARED, gfd, 2 * PAGE)
    assert me.read(b, 8) == b"page two"
    me.write(b + PAGE, b"page three")
    assert me.read(a + 3 * PAGE, 10) == b"page three"


def test_map_shared_validate_works(host):
    me, _vm, gfd = setup(host, PAGE)
    a = me.mmap(0, PAGE, RW, u.MAP_SHARED_VALIDATE, gfd, 0)
    me.write(a, b"v")
    assert me.read(a, 1) == b"v"


# ------------------------------------------------------------------ fd read/write fail
def test_file_read_write_fail(host):
    me, _vm, gfd = setup(host, PAGE)
    with pytest.raises(OSError):
        me.pread(gfd, 8, 0)
    with pytest.raises(OSError):
        me.pwrite(gfd, b"x" * 8, 0)
    with pytest.raises(OSError) as ei:          # kvm_gmem_setattr: -EINVAL
        me.ftruncate(gfd, 2 * PAGE)
    assert ei.value.errno == errno.EINVAL


# ------------------------------------------------------------------ fault_overflow
@pytest.mark.parametrize("off", [0, 8, PAGE - 1])
def test_fault_beyond_isize_sigbus_adrerr(host, off):
    size = 2 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size * 2, RW, u.MAP_SHARED, gfd, 0)   # map past the end of the file
    emu.sigaction(signal.SIGBUS, _raise)
    me.write(a, b"\x11" * size)                          # inside i_size: fine
    assert me.read(a, size) == b"\x11" * size
    for page in (size, size + PAGE):
        for access in ("read", "write"):
            va = a + page + off
            if access == "read":
                info = expect_sigbus(me.read, va, 1)
            else:
                info = expect_sigbus(me.write, va, b"\x22")
            assert info.si_signo == signal.SIGBUS
            assert info.si_code == u.BUS_ADRERR == 2
            assert info.si_addr == va
    # a read that starts inside i_size and runs past it faults at the first page beyond
    info = expect_sigbus(me.read, a + size - 16, 32)
    assert (info.si_code, info.si_addr) == (u.BUS_ADRERR, a + size)
    # nothing was mapped or allocated beyond i_size; the file is intact
    assert not me.pagemap(a + size).present
    assert me.read(a, size) == b"\x11" * size


def test_fault_overflow_memory_not_allocated(host):
    size = PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, 4 * PAGE, RW, u.MAP_SHARED, gfd, 0)
    me.read(a, 1)
    free = host.meminfo()["MemFree"]
    emu.sigaction(signal.SIGBUS, _raise)
    for i in range(1, 4):
        expect_sigbus(me.read, a + i * PAGE, 1)
    assert host.meminfo()["MemFree"] == free


# ------------------------------------------------------------------ fault_private
@pytest.mark.parametrize("access", ["read", "write"])
def test_fault_private_sigbus_adrerr(host, access):
    size = 4 * PAGE
    me, _vm, gfd = setup(host, size, u.GUEST_MEMFD_FLAG_MMAP)    # no INIT_SHARED: private
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)               # mmap itself succeeds
    emu.sigaction(signal.SIGBUS, _raise)
    for i in range(4):
        va = a + i * PAGE + 24
        info = (expect_sigbus(me.read, va, 8) if access == "read"
                else expect_sigbus(me.write, va, b"\x33" * 8))
        assert info.si_code == u.BUS_ADRERR
        assert info.si_addr == va
        assert not me.pagemap(a + i * PAGE).present


def test_runtime_usable_after_handler_raises(host):
    """The runtime stays usable after a handler raised out of an access."""
    size = PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, 2 * PAGE, RW, u.MAP_SHARED, gfd, 0)
    emu.sigaction(signal.SIGBUS, _raise)
    for _ in range(20):
        expect_sigbus(me.read, a + PAGE, 1)
        me.write(a, b"ok")
        assert me.read(a, 2) == b"ok"


# ------------------------------------------------------------------ punch hole
def test_punch_hole_page0_reads_zeros(host):
    size = 4 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    me.write(a, b"\xaa" * size)
    me.fallocate(gfd, PUNCH, 0, PAGE)
    assert me.read(a, PAGE) == bytes(PAGE)
    assert me.read(a + PAGE, 3 * PAGE) == b"\xaa" * (3 * PAGE)
    # the hole is writable again and the new page is a fresh one
    me.write(a, b"\x55" * PAGE)
    assert me.read(a, PAGE) == b"\x55" * PAGE


def test_punch_hole_frees_the_page_and_unmaps_everywhere(host):
    size = 4 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    b = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    me.write(a, b"\xaa" * size)
    assert me.read(b + PAGE, 4) == b"\xaa" * 4
    me.read(b, 4)
    assert me.pagemap(a + PAGE).pfn == me.pagemap(b + PAGE).pfn
    me.fallocate(gfd, PUNCH, PAGE, 2 * PAGE)
    for base in (a, b):
        assert not me.pagemap(base + PAGE).present
        assert not me.pagemap(base + 2 * PAGE).present
        assert me.read(base, PAGE) == b"\xaa" * PAGE
        assert me.read(base + PAGE, 2 * PAGE) == bytes(2 * PAGE)
        assert me.read(base + 3 * PAGE, PAGE) == b"\xaa" * PAGE


def test_punch_hole_whole_file_and_beyond(host):
    # kvm_gmem_punch_hole has no size check (only alignment)
    size = 2 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    me.write(a, b"\xee" * size)
    me.fallocate(gfd, PUNCH, 0, size)
    assert me.read(a, size) == bytes(size)
    me.fallocate(gfd, PUNCH, 0, 16 * PAGE)
    me.fallocate(gfd, PUNCH, 8 * PAGE, PAGE)


# ------------------------------------------------------------------ fallocate
def test_fallocate_allocate_within_size(host):
    size = 4 * PAGE
    me, _vm, gfd = setup(host, size)
    free = host.meminfo()["MemFree"]
    me.fallocate(gfd, KEEP, 0, size)
    assert host.meminfo()["MemFree"] <= free - size // 1024
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    assert me.read(a, size) == bytes(size)
    me.fallocate(gfd, KEEP, 0, size)                 # already allocated: still 0


@pytest.mark.parametrize("off,length", [(0, 5 * PAGE), (4 * PAGE, PAGE), (3 * PAGE, 2 * PAGE),
                                        (16 * PAGE, PAGE)])
def test_fallocate_beyond_size_einval(host, off, length):
    size = 4 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    me.write(a, b"\x77" * size)
    free = host.meminfo()["MemFree"]
    with pytest.raises(OSError) as ei:
        me.fallocate(gfd, KEEP, off, length)
    assert ei.value.errno == errno.EINVAL
    assert host.meminfo()["MemFree"] == free
    assert me.read(a, size) == b"\x77" * size


@pytest.mark.parametrize("mode", [KEEP, PUNCH])
def test_fallocate_alignment_einval(host, mode):
    # guest_memfd_test.c test_fallocate: every unaligned offset or length is -EINVAL
    size = 4 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    me.write(a, b"\x99" * size)
    for off, length in ((1, PAGE), (PAGE - 1, PAGE), (0, PAGE - 1), (0, 1),
                        (PAGE, PAGE + 1), (PAGE + 512, PAGE), (0, PAGE // 2)):
        with pytest.raises(OSError) as ei:
            me.fallocate(gfd, mode, off, length)
        assert ei.value.errno == errno.EINVAL, (off, length)
    assert me.read(a, size) == b"\x99" * size
    # aligned ones work
    me.fallocate(gfd, mode, PAGE, PAGE)


def test_fallocate_bad_mode_eopnotsupp(host):
    me, _vm, gfd = setup(host, PAGE)
    for mode in (0, u.FALLOC_FL_PUNCH_HOLE, KEEP | 0x10):      # 0x10: FALLOC_FL_ZERO_RANGE
        with pytest.raises(OSError) as ei:
            me.fallocate(gfd, mode, 0, PAGE)
        assert ei.value.errno == errno.EOPNOTSUPP, mode


# ------------------------------------------------------------------ two mappings
def test_two_mappings_see_each_others_writes(host):
    size = 4 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    b = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    assert a != b
    me.write(a + 10, b"from a")
    assert me.read(b + 10, 6) == b"from a"
    me.write(b + 3 * PAGE, b"from b")
    assert me.read(a + 3 * PAGE, 6) == b"from b"
    for i in range(4):
        assert me.pagemap(a + i * PAGE).pfn == me.pagemap(b + i * PAGE).pfn


def test_forked_process_shares_gmem_mapping(host):
    size = 4 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    me.write(a, b"parent")

    def child(t):
        seen = t.read(a, 6)
        t.write(a + PAGE, b"child")
        return seen

    ch = me.fork(child, name="child")
    assert ch.join(30) == 0
    assert ch.result == b"parent"
    assert me.read(a + PAGE, 5) == b"child"


def test_forked_process_maps_gmem_through_inherited_fd(host):
    size = 2 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    me.write(a + PAGE, b"hello child")

    def child(t):
        b = t.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
        seen = t.read(b + PAGE, 11)
        t.write(b, b"hello parent")
        return seen

    ch = me.fork(child, name="child")
    assert ch.join(30) == 0
    assert ch.result == b"hello child"
    assert me.read(a, 12) == b"hello parent"


def test_clone_thread_shares_gmem_mapping(host):
    size = 2 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)

    def thread(t):
        t.write(a + PAGE + 1, b"thread")
        return t.read(a, 4)

    me.write(a, b"main")
    th = me.clone(thread, name="t1")
    assert th.join(30) == 0 and th.result == b"main"
    assert me.read(a + PAGE + 1, 6) == b"thread"


def test_file_outlives_close_while_mapped(host):
    size = 2 * PAGE
    me, _vm, gfd = setup(host, size)
    a = me.mmap(0, size, RW, u.MAP_SHARED, gfd, 0)
    me.write(a, b"keep")
    me.close(gfd)
    assert me.read(a, 4) == b"keep"
    me.write(a + PAGE, b"more")
    assert me.read(a + PAGE, 4) == b"more"
