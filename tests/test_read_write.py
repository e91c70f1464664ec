"""open/creat/unlink (fs/open.c, fs/namei.c), read/write/lseek with a file position on
every kind of file descriptor (fs/read_write.c: vfs_read, vfs_write, ksys_pread64,
ksys_lseek, generic_file_llseek, default_llseek, noop_llseek; mm/shmem.c
shmem_file_llseek), fsync on each (fs/sync.c vfs_fsync_range), fstat (fs/stat.c) and
fstatfs (fs/statfs.c), held against Linux 6.18.  These are what LTP's read01-04,
write01-05, lseek01-02/07/11, fsync01-03, fstat02-03, fstatfs01-02, open01-11 and
creat01-08 exercise, and what selftests/mm/memory-failure.c needs (fstatfs's f_type).
"""
import errno

import pytest
from selftest_harness import PAGE, RW

import emu
from emu import uapi as u

CREAT_RW = u.O_CREAT | u.O_RDWR


def _err(fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


# ------------------------------------------------------------------ open and the name space
def test_open_creat_unlink_errors(host):
    """ENOENT without O_CREAT, EEXIST with O_CREAT|O_EXCL, EISDIR for the directory
    opened to write, ENAMETOOLONG; O_TRUNC empties the file (even O_RDONLY, as Linux
    does); creat is O_CREAT|O_WRONLY|O_TRUNC; unlink ENOENT, and an unlinked file lives
    on while open (st_nlink 0).  (LTP open01-11, creat01-08, unlink05/07.)"""
    me = emu.attach(host, name="t")
    assert _err(me.open, "/nope", u.O_RDONLY) == errno.ENOENT
    fd = me.open("/f", CREAT_RW | u.O_EXCL, 0o640)
    assert me.fstat(fd)["st_mode"] == u.S_IFREG | 0o640
    assert _err(me.open, "/f", CREAT_RW | u.O_EXCL) == errno.EEXIST
    assert _err(me.open, "/", u.O_WRONLY) == errno.EISDIR
    assert _err(me.open, "/" + "a" * 256, CREAT_RW) == errno.ENAMETOOLONG
    assert _err(me.open, "", u.O_RDONLY) == errno.ENOENT
    me.write_fd(fd, b"12345")
    ro = me.open("/f", u.O_RDONLY | u.O_TRUNC)
    assert me.fstat(ro)["st_size"] == 0
    w = me.creat("/f")
    assert _err(me.read_fd, w, 1) == errno.EBADF          # O_WRONLY: no FMODE_READ
    assert _err(me.write_fd, ro, b"x") == errno.EBADF     # O_RDONLY: no FMODE_WRITE
    me.write_fd(w, b"kept")
    assert _err(me.ftruncate, ro, 0) == errno.EINVAL      # do_ftruncate: no FMODE_WRITE
    assert _err(me.fallocate, ro, 0, 0, PAGE) == errno.EBADF   # vfs_fallocate
    assert _err(me.fallocate, w, 0, 0, PAGE) == errno.EOPNOTSUPP   # ext2: no fallocate
    me.unlink("/f")
    assert _err(me.unlink, "/f") == errno.ENOENT
    assert _err(me.open, "/f", u.O_RDONLY) == errno.ENOENT
    st = me.fstat(ro)
    assert st["st_nlink"] == 0 and st["st_size"] == 4
    assert me.read_fd(ro, 10) == b"kept"
    for f in (fd, ro, w):
        me.close(f)


def test_file_position_read_write_append_and_fork(host):
    """read/write advance f_pos; O_APPEND writes at i_size (pwrite too, as Linux);
    pread/pwrite leave it; a forked child shares the struct file and its position.
    (LTP read02, write03, pwrite04, lseek01.)"""
    me = emu.attach(host, name="t")
    fd = me.open("/p", CREAT_RW)
    assert me.write_fd(fd, b"abcdef") == 6
    assert me.lseek(fd, 0, u.SEEK_CUR) == 6
    assert me.lseek(fd, 1, u.SEEK_SET) == 1
    assert me.read_fd(fd, 2) == b"bc"
    assert me.pread(fd, 2, 0) == b"ab"
    assert me.lseek(fd, 0, u.SEEK_CUR) == 3
    ch = me.fork(lambda task: task.read_fd(fd, 2), name="child")
    assert ch.join(30) == 0 and ch.result == b"de"
    assert me.lseek(fd, 0, u.SEEK_CUR) == 5
    ap = me.open("/p", u.O_WRONLY | u.O_APPEND)
    me.write_fd(ap, b"G")
    me.pwrite(ap, b"H", 0)
    assert me.pread(fd, 16, 0) == b"abcdefGH"
    assert me.lseek(ap, 0, u.SEEK_CUR) == 7                # pwrite leaves f_pos
    assert me.lseek(fd, -2, u.SEEK_END) == 6
    assert me.read_fd(fd, 100) == b"GH" and me.read_fd(fd, 100) == b""


def test_lseek_errors_and_seek_data_hole(host):
    """ksys_lseek: whence > SEEK_MAX is -EINVAL; a negative result -EINVAL (vfs_setpos);
    SEEK_DATA/SEEK_HOLE at or past EOF -ENXIO; generic_file_llseek: DATA is the offset,
    HOLE is EOF.  shmem_file_llseek walks the page cache: a page never written is a
    hole.  (LTP lseek01, lseek02, lseek07, lseek11.)"""
    me = emu.attach(host, name="t")
    fd = me.open("/s", CREAT_RW)
    me.pwrite(fd, b"x", 3 * PAGE)
    assert _err(me.lseek, fd, 0, 5) == errno.EINVAL
    assert _err(me.lseek, fd, -1, u.SEEK_SET) == errno.EINVAL
    assert _err(me.lseek, fd, -(4 * PAGE), u.SEEK_END) == errno.EINVAL
    assert me.lseek(fd, 10, u.SEEK_DATA) == 10
    assert me.lseek(fd, 10, u.SEEK_HOLE) == 3 * PAGE + 1
    assert _err(me.lseek, fd, 3 * PAGE + 1, u.SEEK_DATA) == errno.ENXIO
    assert me.lseek(fd, 1 << 40, u.SEEK_SET) == 1 << 40    # past EOF is allowed
    m = me.memfd_create("m")
    me.ftruncate(m, 4 * PAGE)
    me.pwrite(m, b"y", 2 * PAGE + 5)
    assert me.lseek(m, 0, u.SEEK_DATA) == 2 * PAGE
    assert me.lseek(m, 2 * PAGE + 7, u.SEEK_HOLE) == 3 * PAGE
    assert me.lseek(m, 3 * PAGE, u.SEEK_HOLE) == 3 * PAGE
    assert _err(me.lseek, m, 3 * PAGE, u.SEEK_DATA) == errno.ENXIO
    assert _err(me.lseek, m, -1, u.SEEK_DATA) == errno.ENXIO
    assert me.read_fd(m, 1) == b"\0"                       # f_pos 3 * PAGE
    assert me.lseek(m, 0, u.SEEK_END) == 4 * PAGE


# ------------------------------------------------------------------ every kind of fd
def test_memfd_read_write_fstat_fstatfs(host):
    """memfd (shmem): read/write at f_pos, fsync is noop_fsync; fstat: S_IFREG|0777,
    st_nlink 0 (an unlinked shmem file), st_blocks per page, st_blksize PAGE_SIZE;
    fstatfs: TMPFS_MAGIC (what selftests' get_fs_type skips on)."""
    me = emu.attach(host, name="t")
    fd = me.memfd_create("m")
    assert me.write_fd(fd, b"hello") == 5
    assert me.lseek(fd, 0, u.SEEK_SET) == 0
    assert me.read_fd(fd, 10) == b"hello"
    me.fsync(fd)
    st = me.fstat(fd)
    assert (st["st_mode"], st["st_nlink"], st["st_size"], st["st_blocks"], st["st_blksize"]) \
        == (u.S_IFREG | 0o777, 0, 5, 8, PAGE)
    assert me.fstatfs(fd)["f_type"] == u.TMPFS_MAGIC


def test_ext2_fstat_fstatfs(host):
    """A disk file: S_IFREG with the open mode less the umask (022), st_nlink 1,
    st_blocks the allocated blocks in sectors, f_type EXT2_SUPER_MAGIC, f_bsize 4096."""
    me = emu.attach(host, name="t")
    fd = me.open("/e", CREAT_RW, 0o666)
    me.pwrite(fd, b"z", PAGE + 1)                          # one block allocated, one hole
    st = me.fstat(fd)
    assert (st["st_mode"], st["st_nlink"], st["st_size"], st["st_blocks"], st["st_blksize"]) \
        == (u.S_IFREG | 0o644, 1, PAGE + 2, 8, PAGE)
    sf = me.fstatfs(fd)
    assert (sf["f_type"], sf["f_bsize"], sf["f_namelen"]) == (u.EXT2_SUPER_MAGIC, PAGE, 255)


def test_hugetlbfs_read_but_no_write(host_factory):
    """hugetlbfs_file_operations has read_iter but no write_iter: write(2) and
    pwrite(2) are -EINVAL (vfs_write: !FMODE_CAN_WRITE); read(2) at f_pos works;
    default_llseek; fsync is noop_fsync; fstat: st_blksize the huge page size;
    fstatfs: HUGETLBFS_MAGIC."""
    h = host_factory(ram="128M", hugepages={"2M": 2})
    me = emu.attach(h, name="t")
    fd = me.memfd_create("h", u.MFD_HUGETLB)
    me.ftruncate(fd, 2 << 20)
    va = me.mmap(0, 2 << 20, RW, u.MAP_SHARED, fd, 0)
    me.write(va + 8, b"huge")
    assert _err(me.write_fd, fd, b"x") == errno.EINVAL
    assert _err(me.pwrite, fd, b"x", 0) == errno.EINVAL
    assert me.lseek(fd, 8, u.SEEK_SET) == 8
    assert me.read_fd(fd, 4) == b"huge"
    assert me.lseek(fd, 0, u.SEEK_CUR) == 12
    assert me.lseek(fd, 5, u.SEEK_HOLE) == 2 << 20          # default_llseek: i_size
    me.fsync(fd)
    st = me.fstat(fd)
    assert (st["st_mode"], st["st_blksize"], st["st_size"]) == (u.S_IFREG | 0o777, 2 << 20, 2 << 20)
    assert me.fstatfs(fd)["f_type"] == u.HUGETLBFS_MAGIC


def test_guest_memfd_and_kvm_fds(host):
    """kvm_gmem_fops (6.18) has mmap, open, release and fallocate only: read/write are
    -EINVAL (!FMODE_CAN_READ/WRITE), pread -ESPIPE (no FMODE_PREAD from
    alloc_file_pseudo), lseek -ESPIPE (no FMODE_LSEEK), fsync -EINVAL; fstat S_IFREG|0600,
    fstatfs GUEST_MEMFD_MAGIC (the kvm_guest_memory pseudo file system).  /dev/kvm
    and a VM fd: noop_llseek (0), read -EINVAL, fsync -EINVAL; /dev/kvm is a
    character device on devtmpfs (TMPFS_MAGIC), a VM fd an anonymous inode
    (ANON_INODE_FS_MAGIC, mode 0600 without a type); a VM fd's pread is -ESPIPE."""
    me = emu.attach(host, name="t")
    kvm = me.open_kvm()
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    g = vm.create_guest_memfd(2 * PAGE, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    assert _err(me.read_fd, g, 1) == errno.EINVAL
    assert _err(me.write_fd, g, b"x") == errno.EINVAL
    assert _err(me.pread, g, 1, 0) == errno.ESPIPE
    assert _err(me.lseek, g, 0, u.SEEK_SET) == errno.ESPIPE
    assert _err(me.lseek, g, 0, 7) == errno.EINVAL          # whence first
    assert _err(me.fsync, g) == errno.EINVAL
    st = me.fstat(g)
    assert (st["st_mode"], st["st_size"], st["st_nlink"]) == (u.S_IFREG | 0o600, 2 * PAGE, 1)
    assert me.fstatfs(g)["f_type"] == u.GUEST_MEMFD_MAGIC
    va = me.mmap(0, 2 * PAGE, RW, u.MAP_SHARED, g, 0)
    me.write(va, b"g")
    assert _err(me.msync, va, 2 * PAGE, u.MS_SYNC) == errno.EINVAL   # vfs_fsync_range
    me.msync(va, 2 * PAGE, u.MS_ASYNC)
    for fd in (kvm.fd, vm.fd):
        assert me.lseek(fd, 100, u.SEEK_SET) == 0
        assert _err(me.read_fd, fd, 1) == errno.EINVAL
        assert _err(me.fsync, fd) == errno.EINVAL
    assert _err(me.pread, kvm.fd, 1, 0) == errno.EINVAL    # FMODE_PREAD, no read
    assert _err(me.pread, vm.fd, 1, 0) == errno.ESPIPE
    st = me.fstat(kvm.fd)
    assert (st["st_mode"], st["st_rdev"]) == (u.S_IFCHR | 0o666, (10 << 8) | 232)
    assert me.fstatfs(kvm.fd)["f_type"] == u.TMPFS_MAGIC
    assert me.fstat(vm.fd)["st_mode"] == 0o600
    assert me.fstatfs(vm.fd)["f_type"] == u.ANON_INODE_FS_MAGIC
    assert _err(me.fstat, 999) == errno.EBADF


def test_msync_arguments(host):
    """mm/msync.c: unknown flags, an unaligned start, or MS_ASYNC|MS_SYNC are -EINVAL;
    an unmapped range -ENOMEM (after syncing what is mapped); a zero length is 0."""
    me = emu.attach(host, name="t")
    fd = me.open("/ms", CREAT_RW)
    me.ftruncate(fd, PAGE)
    va = me.mmap(0, PAGE, RW, u.MAP_SHARED, fd, 0)
    assert _err(me.msync, va, PAGE, 8) == errno.EINVAL
    assert _err(me.msync, va + 1, PAGE, u.MS_SYNC) == errno.EINVAL
    assert _err(me.msync, va, PAGE, u.MS_SYNC | u.MS_ASYNC) == errno.EINVAL
    me.msync(va, 0, u.MS_SYNC)
    me.write(va, b"q")
    assert _err(me.msync, va, 3 * PAGE, u.MS_SYNC) == errno.ENOMEM
    me.munmap(va, PAGE)
    assert _err(me.msync, va, PAGE, u.MS_ASYNC) == errno.ENOMEM
    assert me.pread(fd, 1, 0) == b"q"
