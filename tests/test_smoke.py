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
