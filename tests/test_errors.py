"""Bad arguments get the errno Linux gives and change nothing (DESIGN.md: "Bad arguments
get the errno Linux gives (EINVAL, EBADF, ENODEV, ...) as OSError, never a traceback from
inside the emulator, and leave state unchanged")."""
import errno
import json
import os
import socket
import time

import pytest
from checks import raises_errno, settled

import emu
from emu import uapi as u

PAGE = 4096
RW = u.PROT_READ | u.PROT_WRITE
ANON = u.MAP_PRIVATE | u.MAP_ANONYMOUS


# ------------------------------------------------------------------ helpers


class Region:
    """A populated anonymous region with known contents, to check nothing changed."""

    def __init__(self, me, pages=4):
        self.me, self.pages = me, pages
        self.addr = me.mmap(0, pages * PAGE, RW, ANON)
        self.data = bytes(range(256)) * (pages * PAGE // 256)
        me.write(self.addr, self.data)
        self.maps = [me.pagemap(self.addr + i * PAGE) for i in range(pages)]

    def intact(self):
        assert [self.me.pagemap(self.addr + i * PAGE) for i in range(self.pages)] == self.maps
        assert self.me.read(self.addr, self.pages * PAGE) == self.data


def check_unchanged(host, me, fn, *args, err):
    region = Region(me)
    before = settled(host)
    raises_errno(err, fn, *args)
    assert host.status() == before
    region.intact()
    assert settled(host) == before


# ------------------------------------------------------------------ mmap
def test_mmap_length_zero_einval(host):
    me = emu.attach(host, name="t")
    check_unchanged(host, me, me.mmap, 0, 0, RW, ANON, err=errno.EINVAL)


def test_mmap_file_length_zero_einval(host):
    me = emu.attach(host, name="t")
    fd = me.memfd_create("m")
    me.ftruncate(fd, PAGE)
    check_unchanged(host, me, me.mmap, 0, 0, RW, u.MAP_SHARED, fd, 0, err=errno.EINVAL)


def test_mmap_unaligned_offset_einval(host):
    me = emu.attach(host, name="t")
    fd = me.memfd_create("m")
    me.ftruncate(fd, 4 * PAGE)
    check_unchanged(host, me, me.mmap, 0, PAGE, RW, u.MAP_SHARED, fd, 1, err=errno.EINVAL)
    check_unchanged(host, me, me.mmap, 0, PAGE, RW, u.MAP_SHARED, fd, PAGE + 512,
                    err=errno.EINVAL)


@pytest.mark.parametrize("mtype", [0x0, 0x4, 0x5, 0x0F])
def test_mmap_bad_map_type_einval(host, mtype):
    me = emu.attach(host, name="t")
    check_unchanged(host, me, me.mmap, 0, PAGE, RW, u.MAP_ANONYMOUS | mtype, err=errno.EINVAL)


def test_mmap_file_bad_map_type_einval(host):
    me = emu.attach(host, name="t")
    fd = me.memfd_create("m")
    me.ftruncate(fd, PAGE)
    check_unchanged(host, me, me.mmap, 0, PAGE, RW, 0, fd, 0, err=errno.EINVAL)


@pytest.mark.parametrize("fd", [-1, 999, 3])
def test_mmap_bad_fd_ebadf(host, fd):
    me = emu.attach(host, name="t")
    # fd 3 is not open yet in a fresh emulated process (fds start at 3)
    check_unchanged(host, me, me.mmap, 0, PAGE, RW, u.MAP_SHARED, fd, 0, err=errno.EBADF)


def test_mmap_closed_fd_ebadf(host):
    me = emu.attach(host, name="t")
    fd = me.memfd_create("m")
    me.ftruncate(fd, PAGE)
    me.close(fd)
    check_unchanged(host, me, me.mmap, 0, PAGE, RW, u.MAP_SHARED, fd, 0, err=errno.EBADF)


def test_mmap_fixed_unaligned_einval(host):
    me = emu.attach(host, name="t")
    region = Region(me)
    before = settled(host)
    for off in (1, 8, PAGE // 2):
        raises_errno(errno.EINVAL, me.mmap, region.addr + off, PAGE, RW, ANON | u.MAP_FIXED)
    assert host.status() == before
    region.intact()          # MAP_FIXED did not clobber the existing mapping


# ------------------------------------------------------------------ munmap / madvise
def test_munmap_unaligned_einval(host):
    me = emu.attach(host, name="t")
    region = Region(me)
    before = settled(host)
    raises_errno(errno.EINVAL, me.munmap, region.addr + 1, PAGE)
    raises_errno(errno.EINVAL, me.munmap, region.addr + PAGE // 2, 2 * PAGE)
    raises_errno(errno.EINVAL, me.munmap, region.addr, 0)       # len 0 is EINVAL too
    assert host.status() == before
    region.intact()


def test_madvise_unaligned_einval(host):
    me = emu.attach(host, name="t")
    region = Region(me)
    before = settled(host)
    raises_errno(errno.EINVAL, me.madvise, region.addr + 1, PAGE, u.MADV_DONTNEED)
    raises_errno(errno.EINVAL, me.madvise, region.addr + 100, PAGE, u.MADV_HWPOISON)
    assert host.status() == before
    assert host.meminfo()["HardwareCorrupted"] == before["meminfo"]["HardwareCorrupted"]
    region.intact()          # DONTNEED would have zeroed it; HWPOISON would have poisoned it


@pytest.mark.parametrize("advice", [12345, -1, 99])
def test_madvise_unknown_advice_einval(host, advice):
    me = emu.attach(host, name="t")
    region = Region(me)
    before = settled(host)
    raises_errno(errno.EINVAL, me.madvise, region.addr, PAGE, advice)
    assert host.status() == before
    region.intact()


def test_madvise_valid_advice_is_not_einval(host):
    # MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, MADV_DONTFORK, MADV_DOFORK are valid
    # on any anonymous mapping (madvise_behavior_valid): a good argument is not EINVAL
    me = emu.attach(host, name="t")
    region = Region(me)
    refused = {}
    for advice in (1, 2, 3, 10, 11):
        try:
            me.madvise(region.addr, PAGE, advice)
        except OSError as e:
            refused[advice] = errno.errorcode.get(e.errno, e.errno)
    assert refused == {}
    region.intact()


# ------------------------------------------------------------------ fds
@pytest.mark.parametrize("fd", [-1, 999, 3])
def test_close_bad_fd_ebadf(host, fd):
    me = emu.attach(host, name="t")
    check_unchanged(host, me, me.close, fd, err=errno.EBADF)


def test_close_twice_ebadf(host):
    me = emu.attach(host, name="t")
    fd = me.memfd_create("m")
    me.close(fd)
    check_unchanged(host, me, me.close, fd, err=errno.EBADF)


@pytest.mark.parametrize("flags", [0x0100, 0x8000, 1 << 20, u.MFD_HUGE_2MB])
def test_memfd_create_bad_flags_einval(host, flags):
    # MFD_HUGE_2MB without MFD_HUGETLB is EINVAL in memfd_create()
    me = emu.attach(host, name="t")
    check_unchanged(host, me, me.memfd_create, "m", flags, err=errno.EINVAL)


# ------------------------------------------------------------------ KVM / guest_memfd
def _vm(me, vm_type=u.KVM_X86_DEFAULT_VM):
    return me.open_kvm().create_vm(vm_type)


@pytest.mark.parametrize("vm_type", [99, -1, 1 << 20])
def test_create_vm_bad_type_einval(host, vm_type):
    me = emu.attach(host, name="t")
    kvm = me.open_kvm()
    check_unchanged(host, me, kvm.create_vm, vm_type, err=errno.EINVAL)


@pytest.mark.parametrize("which", ["kvm", "vm"])
def test_mmap_of_kvm_or_vm_fd_enodev(host, which):
    # kvm_chardev_ops and kvm_vm_fops have no .mmap: do_mmap returns -ENODEV
    me = emu.attach(host, name="t")
    kvm = me.open_kvm()
    vm = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
    fd = kvm.fd if which == "kvm" else vm.fd
    check_unchanged(host, me, me.mmap, 0, PAGE, RW, u.MAP_SHARED, fd, 0, err=errno.ENODEV)


@pytest.mark.parametrize("flag", [1 << 3, 1 << 8, 1 << 40, 1 << 63])
def test_guest_memfd_unknown_flag_einval(host, flag):
    me = emu.attach(host, name="t")
    vm = _vm(me)
    check_unchanged(host, me, vm.create_guest_memfd, PAGE,
                    u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | flag,
                    err=errno.EINVAL)


@pytest.mark.parametrize("size", [0, 1, PAGE - 1, PAGE + 1, 3 * PAGE + 100, -PAGE])
def test_guest_memfd_bad_size_einval(host, size):
    me = emu.attach(host, name="t")
    vm = _vm(me)
    check_unchanged(host, me, vm.create_guest_memfd, size, u.GUEST_MEMFD_FLAG_MMAP,
                    err=errno.EINVAL)


def test_guest_memfd_mmap_without_mmap_flag_enodev(host):
    me = emu.attach(host, name="t")
    gfd = _vm(me).create_guest_memfd(4 * PAGE, 0)
    check_unchanged(host, me, me.mmap, 0, 4 * PAGE, RW, u.MAP_SHARED, gfd, 0, err=errno.ENODEV)
    # the MMAP check comes before the MAP_SHARED check
    check_unchanged(host, me, me.mmap, 0, 4 * PAGE, RW, u.MAP_PRIVATE, gfd, 0, err=errno.ENODEV)


def test_guest_memfd_map_private_einval(host):
    me = emu.attach(host, name="t")
    gfd = _vm(me).create_guest_memfd(
        4 * PAGE, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    check_unchanged(host, me, me.mmap, 0, 4 * PAGE, RW, u.MAP_PRIVATE, gfd, 0, err=errno.EINVAL)


@pytest.mark.parametrize("mode", [0, u.FALLOC_FL_PUNCH_HOLE])
def test_guest_memfd_fallocate_without_keep_size_eopnotsupp(host, mode):
    me = emu.attach(host, name="t")
    gfd = _vm(me).create_guest_memfd(
        4 * PAGE, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    check_unchanged(host, me, me.fallocate, gfd, mode, 0, PAGE, err=errno.EOPNOTSUPP)


@pytest.mark.parametrize("mode", [u.FALLOC_FL_KEEP_SIZE,
                                  u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE])
@pytest.mark.parametrize("off,length", [(1, PAGE), (0, 1), (PAGE - 1, PAGE), (PAGE, PAGE + 1),
                                        (PAGE // 2, PAGE // 2)])
def test_guest_memfd_fallocate_unaligned_einval(host, mode, off, length):
    me = emu.attach(host, name="t")
    flags = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
    gfd = _vm(me).create_guest_memfd(4 * PAGE, flags)
    a = me.mmap(0, 4 * PAGE, RW, u.MAP_SHARED, gfd, 0)
    me.write(a, b"\xaa" * (4 * PAGE))
    check_unchanged(host, me, me.fallocate, gfd, mode, off, length, err=errno.EINVAL)
    assert me.read(a, 4 * PAGE) == b"\xaa" * (4 * PAGE)   # a punch would have zeroed a page


# ------------------------------------------------------------------ prctl
@pytest.mark.parametrize("option", [12345, -1 & 0x7FFFFFFF, 0x59616d61 + 1])
def test_prctl_bad_option_einval(host, option):
    me = emu.attach(host, name="t")
    check_unchanged(host, me, me.prctl, option, 0, 0, 0, 0, err=errno.EINVAL)
    assert me.prctl(u.PR_MCE_KILL_GET) == u.PR_MCE_KILL_DEFAULT


# ------------------------------------------------------------------ host controls
@pytest.mark.parametrize("pfn", [10 ** 9, 64 << 8, -1])
def test_corrupt_pfn_out_of_range_enxio(host, pfn):
    # 64 MiB of RAM = 16384 frames: pfn 16384 is the first invalid one
    before = settled(host)
    raises_errno(errno.ENXIO, host.corrupt_pfn, pfn)
    assert host.status() == before
    assert host.mf_stats() == before["mf_stats"]
    assert host.meminfo()["HardwareCorrupted"] == 0


def test_unpoison_not_poisoned_ebusy(host):
    me = emu.attach(host, name="t")
    region = Region(me, pages=1)
    pfn = region.maps[0].pfn
    before = settled(host)
    raises_errno(errno.EBUSY, host.unpoison_pfn, pfn)
    raises_errno(errno.EBUSY, host.unpoison_pfn, 1000)       # a free frame
    assert host.status() == before
    assert host.kpageflags(pfn) & (1 << u.KPF_HWPOISON) == 0
    region.intact()


@pytest.mark.parametrize("value", [2, -1, 100])
def test_sysctl_early_kill_out_of_range_einval(host, value):
    before = host.sysctl("vm.memory_failure_early_kill")
    raises_errno(errno.EINVAL, host.sysctl, "vm.memory_failure_early_kill", value)
    assert host.sysctl("vm.memory_failure_early_kill") == before == 0
    assert host.sysctl("vm.memory_failure_early_kill", 1) == 1
    raises_errno(errno.EINVAL, host.sysctl, "vm.memory_failure_early_kill", value)
    assert host.sysctl("vm.memory_failure_early_kill") == 1


def test_sysctl_other_ranges_einval(host):
    raises_errno(errno.EINVAL, host.sysctl, "vm.memory_failure_recovery", 2)
    assert host.sysctl("vm.memory_failure_recovery") == 1
    raises_errno(errno.EINVAL, host.sysctl, "vm.enable_soft_offline", 4)
    assert host.sysctl("vm.enable_soft_offline") == 1


def test_sysctl_unknown_enoent(host):
    before = settled(host)
    raises_errno(errno.ENOENT, host.sysctl, "vm.no_such_sysctl")
    raises_errno(errno.ENOENT, host.sysctl, "vm.no_such_sysctl", 1)
    assert host.status() == before
    assert "vm.no_such_sysctl" not in host.status()["sysctl"]


# ------------------------------------------------------------------ emu.start config errors
def _emu_shm():
    return sorted(e for e in os.listdir("/dev/shm") if e.startswith("emu-"))


def _emu_socks():
    from emu.shm import runtime_dir

    return sorted(e for e in os.listdir(runtime_dir()) if e.startswith("priv-"))


def _nothing_left(shm_before, socks_before) -> None:
    """A start that failed left no segment or socket behind.  Other supervisors
    (other tests, other users of this uid) may come and go meanwhile: an entry
    that appeared is a leak only if no live process owns it."""
    import psutil

    def owner(ent: str) -> int:
        digits = ent.split("-")[1].split(".")[0]
        return int(digits) if digits.isdigit() else -1

    new = (set(_emu_shm()) - set(shm_before)) | (set(_emu_socks()) - set(socks_before))
    leaked = [e for e in new if not psutil.pid_exists(owner(e))]
    assert leaked == []


@pytest.mark.parametrize("ram", ["bogus", "12Q", "-5M", ""])
def test_start_bad_ram_valueerror(ram):
    shm_before, socks_before = _emu_shm(), _emu_socks()
    with pytest.raises(ValueError) as ei:
        emu.start(ram=ram)
    assert "memory.ram" in str(ei.value)
    assert "\n" not in str(ei.value)
    _nothing_left(shm_before, socks_before)


@pytest.mark.parametrize("val", ["-1", '"fast"', "true", "10000001", "1.5"])
def test_start_bad_halt_poll_ns_valueerror(tmp_path, val):
    conf = tmp_path / "emu.toml"
    conf.write_text("[supervisor]\nhalt_poll_ns = %s\n" % val)
    shm_before, socks_before = _emu_shm(), _emu_socks()
    with pytest.raises(ValueError) as ei:
        emu.start(config=str(conf))
    assert "supervisor.halt_poll_ns" in str(ei.value)
    assert "\n" not in str(ei.value)
    _nothing_left(shm_before, socks_before)


def test_start_unknown_policy_valueerror():
    with pytest.raises(ValueError) as ei:
        emu.start(policy="nope")
    assert "nope" in str(ei.value)
    assert "\n" not in str(ei.value)


def test_start_unknown_policy_leaves_nothing():
    shm_before, socks_before = _emu_shm(), _emu_socks()
    with pytest.raises((ValueError, RuntimeError)):
        emu.start(policy="nope")
    end = time.monotonic() + 5
    while (_emu_shm(), _emu_socks()) != (shm_before, socks_before) and time.monotonic() < end:
        time.sleep(0.05)
    _nothing_left(shm_before, socks_before)


# ------------------------------------------------------------------ control socket garbage
class Raw:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.f = self.sock.makefile("rb")
        greeting = self.f.readline()
        assert "QMP" in json.loads(greeting)

    def send(self, data: bytes) -> bytes:
        self.sock.sendall(data + b"\n")
        return self.f.readline()

    def close(self):
        self.f.close()
        self.sock.close()


GARBAGE_IDS = ["word", "broken-object", "binary", "array", "string", "number", "null",
               "execute-int", "execute-list", "arguments-list", "sysctl-name-int",
               "pfn-string", "mmap-no-args", "deep-array", "deep-object"]
GARBAGE = [
    b"garbage",
    b"{not json",
    b"\xff\xfe\x00binary",
    b"[1, 2, 3]",
    b'"just a string"',
    b"42",
    b"null",
    b'{"execute": 5}',
    b'{"execute": ["status"]}',
    b'{"execute": "status", "arguments": [1]}',
    b'{"execute": "sysctl", "arguments": {"name": 5}}',
    b'{"execute": "corrupt_pfn", "arguments": {"pfn": "x"}}',
    b'{"execute": "mmap", "arguments": {}}',
    b"[" * 100000,
    b'{"a": ' * 50000,
]


@pytest.mark.parametrize("line", GARBAGE, ids=GARBAGE_IDS)
def test_socket_garbage_line_one_line_error(host, line):
    raw = Raw(host.path)
    before = settled(host)
    reply = raw.send(line)
    assert reply, "no reply: the supervisor closed the connection"
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    rep = json.loads(reply)
    assert "error" in rep and "return" not in rep
    assert isinstance(rep["error"].get("errno"), int) and rep["error"]["errno"] > 0
    # the same connection and a new one keep working
    ok = json.loads(raw.send(b'{"execute": "status", "id": 7}'))
    assert ok["id"] == 7 and ok["return"]["processes"] == []
    raw.close()
    assert host.status() == before
    me = emu.attach(host, name="after")
    a = me.mmap(0, PAGE, RW, ANON)
    me.write(a, b"ok")
    assert me.read(a, 2) == b"ok"


def test_socket_unknown_command(host):
    raw = Raw(host.path)
    rep = json.loads(raw.send(b'{"execute": "no_such_command", "id": 3}'))
    assert rep["id"] == 3 and rep["error"]["errno"] == errno.ENOSYS
    assert "\n" not in rep["error"]["desc"]
    # a syscall from a connection that never attached
    rep = json.loads(raw.send(b'{"execute": "mmap", "arguments": {"length": 4096}, "id": 4}'))
    assert rep["id"] == 4 and rep["error"]["errno"] == errno.ESRCH
    rep = json.loads(raw.send(b'{"execute": "status", "id": 5}'))
    assert rep["id"] == 5 and "return" in rep
    raw.close()
    assert host.status()["processes"] == []


def test_socket_many_garbage_lines_in_one_write(host):
    raw = Raw(host.path)
    raw.sock.sendall(b"junk1\njunk2\n{\"execute\": \"nope\", \"id\": 1}\n")
    replies = [json.loads(raw.f.readline()) for _ in range(3)]
    assert all("error" in r for r in replies)
    assert replies[2]["id"] == 1
    rep = json.loads(raw.send(b'{"execute": "meminfo", "id": 2}'))
    assert rep["id"] == 2 and rep["return"]["MemTotal"] == 64 * 1024
    raw.close()


def test_socket_disconnect_midline(host):
    raw = Raw(host.path)
    raw.sock.sendall(b'{"execute": "sta')
    raw.close()
    raw2 = Raw(host.path)
    rep = json.loads(raw2.send(b'{"execute": "status", "id": 1}'))
    assert rep["id"] == 1 and "return" in rep
    raw2.close()
