import signal

import emu
from emu import uapi as u


def test_memfd_roundtrip_and_madvise_hwpoison(host):
    me = emu.attach(host, name="t")
    fd = me.memfd_create("shm")
    me.ftruncate(fd, 4 * 4096)
    a = me.mmap(0, 4 * 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
    me.write(a + 4096, b"hello")
    assert me.read(a + 4096, 5) == b"hello"
    got = []
    emu.sigaction(signal.SIGBUS, lambda s, i: got.append(i))
    me.madvise(a + 4096, 4096, u.MADV_HWPOISON)
    assert [(i.si_code, i.si_addr, i.si_addr_lsb) for i in got] == [(u.BUS_MCEERR_AR, a + 4096, 12)]


def test_core_mirrors_inodes_and_vmas(host):
    """The core's inode and VMA tables follow the kernel's objects."""
    me = emu.attach(host, name="t")
    fd = me.memfd_create("mirror")
    me.ftruncate(fd, 3 * 4096)
    a = me.mmap(0, 3 * 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
    me.write(a, b"x" * 8192)

    def mine():
        st = host.status()
        proc = next(p for p in st["processes"] if p["tgid"] == me.tgid)
        return proc["maps"], {f["ino"]: f for f in st["files"]}

    maps, files = mine()
    m = next(m for m in maps if m["start"] == a)
    assert (m["end"], m["shared"], m["pgoff"]) == (a + 3 * 4096, True, 0)
    f = files[m["ino"]]
    assert (f["kind"], f["size"], f["nrpages"], f["name"]) == ("shmem", 3 * 4096, 2, "memfd:mirror")
    me.munmap(a + 4096, 4096)                      # splits the VMA in two
    maps, _ = mine()
    assert sorted((x["start"], x["end"], x["pgoff"]) for x in maps if x["ino"] == m["ino"]) == [
        (a, a + 4096, 0), (a + 2 * 4096, a + 3 * 4096, 2)]
    me.munmap(a, 3 * 4096)
    me.close(fd)
    maps, files = mine()
    assert m["ino"] not in files and not [x for x in maps if x["ino"] == m["ino"]]


def test_trace_exports_chrome_json(host):
    from emu.trace import to_chrome

    me = emu.attach(host, name="t")
    a = me.mmap(0, 4096, u.PROT_READ | u.PROT_WRITE, u.MAP_PRIVATE | u.MAP_ANONYMOUS)
    me.write(a, b"x")
    emu.sigaction(signal.SIGBUS, lambda s, i: None)
    me.madvise(a, 4096, u.MADV_HWPOISON)
    doc = to_chrome(host.events())
    names = [e["name"] for e in doc["traceEvents"]]
    assert {"memory_failure", "unmap", "signal", "mf_result"} <= set(names)
    sig = next(e for e in doc["traceEvents"] if e["name"] == "signal")
    assert sig["tid"] == me.tid and sig["args"]["code"] == u.BUS_MCEERR_AR


def test_hugetlb_pool_reserved_at_boot(host_factory):
    h = host_factory(ram="512M", hugepages={"2M": 64})
    mi = h.meminfo()
    assert (mi["HugePages_Total"], mi["HugePages_Free"], mi["Hugepagesize"]) == (64, 64, 2048)
    assert mi["Hugetlb"] == 64 * 2048
    assert mi["MemFree"] <= mi["MemTotal"] - 64 * 2048
