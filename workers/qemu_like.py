"""A QEMU-shaped VMM worker: what QEMU does on each memory-failure event.

- The main thread sets PR_MCE_KILL_EARLY (qemu_init_sigbus) and takes
  BUS_MCEERR_AO: for guest RAM it records the page (kvm_hwpoison_page_add) and
  injects an AO machine check into the first vCPU (warn_report "... of type
  BUS_MCEERR_AO injected"); for other memory it warns that QEMU itself was hit.
- vCPU threads stay LATE and take BUS_MCEERR_AR during guest execution: guest
  RAM -> record the page, inject an AR #MC (error_report "... BUS_MCEERR_AR
  injected") and re-enter the guest; outside guest RAM -> "QEMU got Hardware
  memory error at addr %p" and exit(1).
- Any other SIGBUS (SI_KERNEL from kill_me_now, BUS_ADRERR) is re-raised with
  the default action: the process dies of SIGBUS (sigbus_reraise).

Until vCPUs run real guest code, a vCPU executes "guest accesses" sent by the
main thread over a pipe; each returns the journal of what happened.
"""
from __future__ import annotations

import os
import pickle
import signal
import struct
import time

import emu
from emu import uapi as u

GIB = 1 << 30


class GuestMCE(Exception):
    """Unwinds a vCPU's access after QEMU injected a machine check (the guest's
    #MC handler takes over; the access never completes)."""


class Journal(list):
    def add(self, who: str, text: str) -> None:
        self.append((time.monotonic_ns(), who, text))


def _send(fd: int, obj) -> None:
    data = pickle.dumps(obj)
    os.write(fd, struct.pack("I", len(data)) + data)


def _recv(fd: int):
    hdr = b""
    while len(hdr) < 4:
        chunk = os.read(fd, 4 - len(hdr))
        if not chunk:
            raise EOFError
        hdr += chunk
    (n,) = struct.unpack("I", hdr)
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return pickle.loads(data)


class GuestRam:
    """The guest's RAM: one guest_memfd, mapped shared at `hva`, at GPA `gpa_base`."""

    def __init__(self, me, size: int, gpa_base: int = 0):
        self.size, self.gpa_base = size, gpa_base
        self.kvm = me.open_kvm()
        self.vm = self.kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
        self.gmem = self.vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP
                                               | u.GUEST_MEMFD_FLAG_INIT_SHARED)
        self.hva = me.mmap(0, size, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, self.gmem, 0)

    def contains(self, hva: int) -> bool:
        return self.hva <= hva < self.hva + self.size

    def gpa(self, hva: int) -> int:
        return self.gpa_base + (hva - self.hva)


class QemuLike:
    def __init__(self, host, ram_size: int = 2 << 20, nvcpus: int = 2, name: str = "qemu"):
        self.host = host
        self.journal = Journal()
        self.hwpoison_pages: list[int] = []
        self.me = emu.attach(host, name=name)
        self.me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
        emu.sigaction(signal.SIGBUS, self._main_sigbus)
        self.ram = GuestRam(self.me, ram_size)
        self.vcpus = []
        for i in range(nvcpus):
            cmd_r, cmd_w = os.pipe()
            rep_r, rep_w = os.pipe()
            th = self.me.clone(_vcpu_thread, i, self.ram.hva, self.ram.size, cmd_r, rep_w,
                               name="vcpu%d" % i)
            os.close(cmd_r)
            os.close(rep_w)
            self.vcpus.append((th, cmd_w, rep_r))

    # ---- the main thread's SIGBUS (QEMU: sigbus_handler -> kvm_on_sigbus) ----
    def _main_sigbus(self, signum, info) -> None:
        if info.si_code not in (u.BUS_MCEERR_AO, u.BUS_MCEERR_AR):
            _sigbus_reraise()
        # SIGBUS is blocked in QEMU's main thread and read from a signalfd, so an
        # AR here cannot be handled: QEMU asserts code != AR.
        addr = info.si_addr
        if self.ram.contains(addr):
            self.hwpoison_pages.append(self.ram.gpa(addr) & ~0xFFF)
            self.journal.add("main", "QEMU: warning: Guest MCE Memory Error at QEMU addr %#x and "
                             "GUEST addr %#x of type BUS_MCEERR_AO injected"
                             % (addr, self.ram.gpa(addr)))
        else:
            self.journal.add("main", "QEMU: warning: Hardware memory error at addr %#x of type "
                             "BUS_MCEERR_AO for memory used by QEMU itself instead of guest "
                             "system!" % addr)

    # ---- driving the vCPUs ----
    def vcpu(self, i: int, op: str, gpa: int, n: int = 8, data: bytes = b""):
        th, cmd_w, rep_r = self.vcpus[i]
        _send(cmd_w, (op, gpa, n, data))
        result, journal = _recv(rep_r)
        self.journal.extend(journal)
        return result

    def stop(self) -> None:
        for th, cmd_w, rep_r in self.vcpus:
            try:
                _send(cmd_w, ("exit", 0, 0, b""))
            except OSError:
                pass
            th.join(10)
            os.close(cmd_w)
            os.close(rep_r)
        self.vcpus = []


def _sigbus_reraise() -> None:
    """QEMU's sigbus_reraise: SIG_DFL, raise, unblock."""
    signal.signal(signal.SIGBUS, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGBUS)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGBUS])
    os._exit(134)                       # perror("Failed to re-raise SIGBUS!"); abort()


def _vcpu_thread(task, idx: int, hva: int, size: int, cmd_r: int, rep_w: int) -> int:
    who = "vcpu%d" % idx
    task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_LATE)
    journal = Journal()

    def on_sigbus(signum, info):
        # QEMU: sigbus_handler -> kvm_on_sigbus_vcpu -> kvm_arch_on_sigbus_vcpu
        if info.si_code not in (u.BUS_MCEERR_AO, u.BUS_MCEERR_AR):
            journal.add(who, "QEMU: SIGBUS si_code %#x is not a memory error: re-raising"
                        % info.si_code)
            _send(rep_w, (None, journal))
            _sigbus_reraise()
        if hva <= info.si_addr < hva + size:
            gpa = info.si_addr - hva
            kind = "BUS_MCEERR_AR" if info.si_code == u.BUS_MCEERR_AR else "BUS_MCEERR_AO"
            journal.add(who, "QEMU: error: Guest MCE Memory Error at QEMU addr %#x and GUEST "
                        "addr %#x of type %s injected" % (info.si_addr, gpa, kind))
            raise GuestMCE(gpa)
        journal.add(who, "QEMU: QEMU got Hardware memory error at addr %#x" % info.si_addr)
        _send(rep_w, (None, journal))
        os._exit(1)

    emu.sigaction(signal.SIGBUS, on_sigbus)
    while True:
        try:
            op, gpa, n, data = _recv(cmd_r)
        except EOFError:
            return 0
        if op == "exit":
            return 0
        result = None
        try:
            if op == "read":
                journal.add(who, "guest reads %d bytes at GPA %#x" % (n, gpa))
                result = task.read(hva + gpa, n)
            elif op == "write":
                journal.add(who, "guest writes %d bytes at GPA %#x" % (len(data), gpa))
                task.write(hva + gpa, data)
                result = len(data)
        except GuestMCE as e:
            journal.add(who, "guest: #MC delivered for GPA %#x, the guest's handler takes over"
                        % e.args[0])
            result = "mce"
        _send(rep_w, (result, list(journal)))
        journal.clear()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="a QEMU-shaped process against a running emu daemon")
    ap.add_argument("--socket")
    args = ap.parse_args()
    h = emu.connect(args.socket)
    q = QemuLike(h)
    print("qemu-like: tgid %d, guest RAM at hva %#x; Ctrl-C to stop" % (q.me.tgid, q.ram.hva))
    try:
        while True:
            q.me.idle(1.0)
            for _t, who, text in q.journal:
                print("%s  %s" % (who, text))
            q.journal.clear()
    except KeyboardInterrupt:
        q.stop()
