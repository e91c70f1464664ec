"""A QEMU-shaped VMM worker: what QEMU does on each memory-failure event.

- The main thread sets PR_MCE_KILL_EARLY (qemu_init_sigbus) and takes
  BUS_MCEERR_AO: for guest RAM it records the page (kvm_hwpoison_page_add) and
  has the first vCPU inject an AO machine check (run_on_cpu + KVM_X86_SET_MCE,
  warn_report "... of type BUS_MCEERR_AO injected"); for other memory it warns
  that QEMU itself was hit.
- vCPU threads stay LATE and run the guest with KVM_RUN (kvm_cpu_exec):
  * SIGBUS BUS_MCEERR_AR during KVM_RUN: the handler records it, KVM_RUN returns
    -EINTR, QEMU injects an AR machine check into the guest (error_report
    "... of type BUS_MCEERR_AR injected") and re-enters;
  * -1/EFAULT with KVM_EXIT_MEMORY_FAULT: a conversion request, resolved with an
    in-place conversion of the guest_memfd, then re-entry;
  * -1/EHWPOISON: "error: kvm run failed Memory page has hardware error" and the
    VM is paused (internal-error).  With recover=True the VMM instead punches a
    hole over the page and re-enters, as the KVM RFC selftests do;
  * any other SIGBUS (SI_KERNEL from kill_me_now, BUS_ADRERR): sigbus_reraise,
    the process dies of SIGBUS.
"""
from __future__ import annotations

import os
import pickle
import signal
import struct
import time

import emu
from emu import uapi as u
from emu.guest import GuestTaskKilled

MCG_CAP = u.MCG_SER_P | u.MCG_CTL_P | 10            # 10 banks, as QEMU's default CPU models
AR_STATUS = (u.MCI_STATUS_VAL | u.MCI_STATUS_UC | u.MCI_STATUS_EN | u.MCI_STATUS_MISCV
             | u.MCI_STATUS_ADDRV | u.MCI_STATUS_S | u.MCI_STATUS_AR | 0x134)
AO_STATUS = (u.MCI_STATUS_VAL | u.MCI_STATUS_UC | u.MCI_STATUS_EN | u.MCI_STATUS_MISCV
             | u.MCI_STATUS_ADDRV | u.MCI_STATUS_S | 0xC0)


def kvm_mce(code: int, gpa: int) -> u.KvmX86Mce:
    """QEMU's kvm_mce_inject() for an Intel guest: bank 9, misc 0x8c."""
    ar = code == u.BUS_MCEERR_AR
    mcg = u.MCG_STATUS_MCIP | u.MCG_STATUS_RIPV | (u.MCG_STATUS_EIPV if ar else 0)
    return u.KvmX86Mce(status=AR_STATUS if ar else AO_STATUS, addr=gpa, misc=0x8C,
                       mcg_status=mcg, bank=9)


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
    """The guest's RAM: one guest_memfd (MMAP|INIT_SHARED) mapped shared at `hva`,
    bound to a gmem-only memslot at GPA `gpa_base`."""

    def __init__(self, me, size: int, gpa_base: int = 0):
        self.size, self.gpa_base = size, gpa_base
        self.kvm = me.open_kvm()
        self.vm = self.kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
        self.gmem = self.vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP
                                               | u.GUEST_MEMFD_FLAG_INIT_SHARED)
        self.hva = me.mmap(0, size, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, self.gmem, 0)
        self.vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, gpa_base, size, self.hva,
                                        self.gmem, 0)

    def contains(self, hva: int) -> bool:
        return self.hva <= hva < self.hva + self.size

    def gpa(self, hva: int) -> int:
        return self.gpa_base + (hva - self.hva)


class QemuLike:
    def __init__(self, host, ram_size: int = 2 << 20, nvcpus: int = 2, name: str = "qemu",
                 recover: bool = False):
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
            th = self.me.clone(_vcpu_thread, i, self.ram, cmd_r, rep_w, recover,
                               name="vcpu%d" % i)
            os.close(cmd_r)
            os.close(rep_w)
            self.vcpus.append((th, cmd_w, rep_r))
            self._wait(i)                             # the guest kernel booted on it

    # ---- the main thread's SIGBUS (QEMU: sigbus_handler -> kvm_on_sigbus) ----
    def _main_sigbus(self, signum, info) -> None:
        if info.si_code not in (u.BUS_MCEERR_AO, u.BUS_MCEERR_AR):
            _sigbus_reraise()
        # SIGBUS is blocked in QEMU's main thread and read from a signalfd, so an
        # AR here cannot be handled: QEMU asserts code != AR.
        addr = info.si_addr
        if self.ram.contains(addr):
            gpa = self.ram.gpa(addr)
            self.hwpoison_pages.append(gpa & ~0xFFF)
            self.journal.add("main", "QEMU: warning: Guest MCE Memory Error at QEMU addr %#x and "
                             "GUEST addr %#x of type BUS_MCEERR_AO injected" % (addr, gpa))
            self.pending_ao = gpa                     # run_on_cpu(first_cpu, ...)
        else:
            self.journal.add("main", "QEMU: warning: Hardware memory error at addr %#x of type "
                             "BUS_MCEERR_AO for memory used by QEMU itself instead of guest "
                             "system!" % addr)

    pending_ao = None

    def deliver_pending_ao(self) -> None:
        """run_on_cpu(first_cpu, do_inject_x86_mce): the vCPU thread itself does SET_MCE."""
        if self.pending_ao is not None:
            gpa, self.pending_ao = self.pending_ao, None
            self.vcpu(0, "inject_ao", gpa)

    # ---- driving the vCPUs ----
    def vcpu(self, i: int, op: str, gpa: int = 0, n: int = 8, data: bytes = b"",
             private: bool | None = None):
        """Have vCPU i's guest do one access (or an injection); returns its result."""
        _send(self.vcpus[i][1], (op, gpa, n, data, private))
        return self._wait(i)

    def _wait(self, i: int):
        result, journal = _recv(self.vcpus[i][2])
        self.journal.extend(journal)
        return result

    def stop(self) -> None:
        for th, cmd_w, rep_r in self.vcpus:
            try:
                _send(cmd_w, ("exit", 0, 0, b"", None))
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


def _guest_access(g, op, gpa, n, data, private):
    """One guest user task doing one access; the guest kernel may kill it."""
    try:
        if op == "read":
            v = yield g.read(gpa, n, private)
        else:
            yield g.write(gpa, data, private)
            v = len(data)
        yield g.sync(v)
    except GuestTaskKilled as e:
        yield g.sync("killed", e.args[0])


def _guest_boot(g):
    yield g.set_cr4_mce(True)
    yield g.sync("booted")


def _guest_idle(g):
    yield g.sync("idle")


def _vcpu_thread(task, idx: int, ram: GuestRam, cmd_r: int, rep_w: int, recover: bool) -> int:
    who = "vcpu%d" % idx
    task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_LATE)
    journal = Journal()
    pending = []                                   # QEMU: pending_sigbus_addr/code

    def on_sigbus(signum, info):
        # QEMU: sigbus_handler -> kvm_on_sigbus_vcpu
        if info.si_code not in (u.BUS_MCEERR_AO, u.BUS_MCEERR_AR):
            journal.add(who, "QEMU: SIGBUS si_code %#x is not a memory error: re-raising"
                        % info.si_code)
            _send(rep_w, (None, journal))
            _sigbus_reraise()
        if pending:                                # a second AR while one is pending
            _sigbus_reraise()
        pending.append((info.si_code, info.si_addr))

    emu.sigaction(signal.SIGBUS, on_sigbus)
    vcpu = ram.vm.create_vcpu(idx)
    vcpu.setup_mce(MCG_CAP)

    def kvm_cpu_exec():
        """QEMU's vCPU loop until the guest's ucall; returns the ucall value."""
        while True:
            try:
                vcpu.run()
            except OSError as e:
                kr = vcpu.kvm_run
                if e.errno == u.EINTR and pending:
                    code, addr = pending.pop()
                    if ram.contains(addr):
                        gpa = ram.gpa(addr)
                        journal.add(who, "QEMU: error: Guest MCE Memory Error at QEMU addr %#x and "
                                    "GUEST addr %#x of type %s injected" % (
                                        addr, gpa, "BUS_MCEERR_AR" if code == u.BUS_MCEERR_AR
                                        else "BUS_MCEERR_AO"))
                        vcpu.set_mce(kvm_mce(code, gpa))
                        continue
                    journal.add(who, "QEMU: QEMU got Hardware memory error at addr %#x" % addr)
                    _send(rep_w, (None, journal))
                    os._exit(1)
                if e.errno == u.EINTR:
                    continue
                if e.errno == u.EFAULT and kr.exit_reason == u.KVM_EXIT_MEMORY_FAULT:
                    mf = kr.memory_fault
                    private = bool(mf.flags & u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
                    journal.add(who, "QEMU: KVM_EXIT_MEMORY_FAULT gpa %#x: converting to %s"
                                % (mf.gpa, "private" if private else "shared"))
                    task.gmem_convert(ram.gmem, mf.gpa - ram.gpa_base, mf.size, private)
                    continue
                journal.add(who, "QEMU: error: kvm run failed %s (exit %d, gpa %#x, flags %#x)" % (
                    os.strerror(e.errno), kr.exit_reason, kr.memory_fault.gpa,
                    kr.memory_fault.flags))
                if recover and e.errno == u.EHWPOISON:
                    mf = kr.memory_fault
                    journal.add(who, "recovering VMM: punch hole over GPA %#x and re-enter"
                                % mf.gpa)
                    task.fallocate(ram.gmem, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE,
                                   mf.gpa - ram.gpa_base, mf.size)
                    continue
                journal.add(who, "QEMU: VM paused (internal-error)")
                return "paused"
            if vcpu.kvm_run.exit_reason == u.KVM_EXIT_IO:
                cmd, args = vcpu.ucall()
                if cmd == u.UCALL_SYNC:
                    return args[0] if len(args) == 1 else args
                if cmd == u.UCALL_DONE:
                    return "done"
            elif vcpu.kvm_run.exit_reason == u.KVM_EXIT_SHUTDOWN:
                journal.add(who, "QEMU: guest triple fault: system reset requested")
                return "shutdown"
            else:
                return "exit %d" % vcpu.kvm_run.exit_reason

    vcpu.set_guest(_guest_boot)
    kvm_cpu_exec()
    _send(rep_w, ("booted", list(journal)))
    journal.clear()
    while True:
        try:
            op, gpa, n, data, private = _recv(cmd_r)
        except EOFError:
            return 0
        if op == "exit":
            return 0
        gk = vcpu.guest_kernel
        seen = len(gk.log)
        if op == "inject_ao":
            journal.add(who, "QEMU: injecting the AO machine check for GPA %#x (run_on_cpu)" % gpa)
            vcpu.set_mce(kvm_mce(u.BUS_MCEERR_AO, gpa))
            vcpu.set_guest(_guest_idle)
        else:
            journal.add(who, "guest %s %d bytes at GPA %#x%s" % (
                "reads" if op == "read" else "writes", n if op == "read" else len(data), gpa,
                " (private)" if private else ""))
            vcpu.set_guest(_guest_access, op, gpa, n, data, private)
        result = kvm_cpu_exec()
        for line in gk.log[seen:]:
            journal.add(who, "guest kernel: " + line)
        _send(rep_w, (result, list(journal)))
        journal.clear()


if __name__ == "__main__":
    import argparse
    import errno

    ap = argparse.ArgumentParser(description="a QEMU-shaped process against a running emu daemon")
    ap.add_argument("--socket")
    args = ap.parse_args()
    h = emu.connect(args.socket)
    q = QemuLike(h)
    print("qemu-like: tgid %d, guest RAM at hva %#x; Ctrl-C to stop" % (q.me.tgid, q.ram.hva))
    try:
        while True:
            q.me.idle(1.0)
            q.deliver_pending_ao()
            for _t, who, text in q.journal:
                print("%s  %s" % (who, text))
            q.journal.clear()
    except KeyboardInterrupt:
        q.stop()
    except OSError as e:                   # `emu stop`: the host went away under the VM
        if e.errno != errno.ESHUTDOWN:
            raise
        print("qemu-like: %s; exiting" % e.strerror)
        q.stop()
