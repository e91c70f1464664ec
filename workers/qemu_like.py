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

Every decision QEMU reports through QMP is journalled as the JSON line of a
MEMORY_FAILURE event ({"event": "MEMORY_FAILURE", "data": {"recipient":
"hypervisor"|"guest", "action": "ignore"|"inject"|"fatal"|"reset", "flags":
{"action-required": bool, "recursive": bool}}}), who = "qmp"; `qmp_events()`
returns them.  The guest's CPU model has MCG_SER_P unless `ser=False`; its
kernel enables CR4.MCE unless `guest_mce=False`; `mce_handler` replaces its #MC
handler (emu.guest.GuestKernel.handler).
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import time

import emu
from emu import uapi as u
from workers import guest_programs

MCG_CAP = u.MCG_SER_P | u.MCG_CTL_P | 10            # 10 banks, as QEMU's default CPU models
MCG_CAP_NO_SER = u.MCG_CTL_P | 10                   # a CPU model without MCG_SER_P
MIGRATE_POISONED = ("Can't migrate this vm with hardware poisoned memory, please reboot the vm "
                    "and try again")                # migration/migration.c migrate_prepare
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
    """(ns, who, text) entries.  With `fd` set each one is also written at once as
    a "who<TAB>text" line, as QEMU's error_report/warn_report reach stderr at once:
    what a thread wrote before the process died stays readable."""

    fd: int | None = None

    def add(self, who: str, text: str) -> None:
        self.append((time.monotonic_ns(), who, text))
        if self.fd is not None:
            os.write(self.fd, ("%s\t%s\n" % (who, text)).encode())

    def memory_failure(self, recipient: str, action: str, ar: bool,
                       recursive: bool = False) -> None:
        """QAPI event MEMORY_FAILURE as QMP sends it (qapi_event_send_memory_failure,
        from emit_hypervisor_memory_failure in target/i386/kvm/kvm.c and
        emit_guest_memory_failure in target/i386/helper.c)."""
        self.add("qmp", json.dumps({"event": "MEMORY_FAILURE", "data": {
            "recipient": recipient, "action": action,
            "flags": {"action-required": bool(ar), "recursive": bool(recursive)}}}))


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
                 recover: bool = False, ser: bool = True, guest_mce: bool = True,
                 log_fd: int | None = None, mce_handler=None):
        self.host = host
        self.journal = Journal()
        self.journal.fd = log_fd
        self.hwpoison_pages: list[int] = []          # kvm_hwpoison_page_add's list (GPAs here)
        self.ser = ser
        self.runstate = "running"
        self.reset_requested = False
        self.me = emu.attach(host, name=name)
        # system/cpus.c qemu_init_sigbus: sigbus_handler, then PR_MCE_KILL_EARLY
        emu.sigaction(signal.SIGBUS, self._main_sigbus)
        self.me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
        self.ram = GuestRam(self.me, ram_size)
        self.vcpus = []
        for i in range(nvcpus):
            cmd_r, cmd_w = os.pipe()
            rep_r, rep_w = os.pipe()
            th = self.me.clone(_vcpu_thread, i, self.ram, cmd_r, rep_w, recover, ser, guest_mce,
                               log_fd, mce_handler, name="vcpu%d" % i)
            os.close(cmd_r)
            os.close(rep_w)
            self.vcpus.append((th, cmd_w, rep_r))
            self._wait(i)                             # the guest kernel booted on it

    # ---- the main thread's SIGBUS (QEMU: sigbus_handler -> kvm_on_sigbus) ----
    def _main_sigbus(self, signum, info) -> None:
        """system/cpus.c sigbus_handler with current_cpu == NULL, then
        accel/kvm/kvm-all.c kvm_on_sigbus and kvm_arch_on_sigbus_vcpu(first_cpu).
        QEMU's main thread blocks SIGBUS and reads it from a signalfd
        (util/main-loop.c qemu_signal_init, sigfd_handler calls this handler); the
        emulated thread takes it through a handler instead, which is the same
        synchronous call.  An AR cannot come here in QEMU: a blocked SIGBUS that the
        kernel forces is unblocked and reset to SIG_DFL (force_sig_info_to_task), so
        main_read() blocks SIGBUS as QEMU does, and the process dies."""
        if info.si_code not in (u.BUS_MCEERR_AO, u.BUS_MCEERR_AR):
            _sigbus_reraise()
        addr = info.si_addr
        if info.si_code == u.BUS_MCEERR_AR:          # assert(code != BUS_MCEERR_AR)
            _sigbus_reraise()
        if self.ser and addr:                         # env->mcg_cap & MCG_SER_P
            if self.ram.contains(addr):
                gpa = self.ram.gpa(addr)
                self._hwpoison_page_add(gpa)
                self.journal.add("main", "QEMU: warning: Guest MCE Memory Error at QEMU addr %#x "
                                 "and GUEST addr %#x of type BUS_MCEERR_AO injected" % (addr, gpa))
                self.pending_ao = gpa                 # run_on_cpu(first_cpu, ...)
                return
            self.journal.add("main", "QEMU: warning: Hardware memory error at addr %#x of type "
                             "BUS_MCEERR_AO for memory used by QEMU itself instead of guest "
                             "system!" % addr)
        # "Hope we are lucky for AO MCE, just notify a event"
        self.journal.memory_failure("hypervisor", "ignore", False)

    pending_ao = None

    def _hwpoison_page_add(self, gpa: int) -> None:
        """accel/kvm/kvm-all.c kvm_hwpoison_page_add: a deduplicated list."""
        page = gpa & ~0xFFF
        if page not in self.hwpoison_pages:
            self.hwpoison_pages.append(page)

    def deliver_pending_ao(self) -> None:
        """run_on_cpu(first_cpu, do_inject_x86_mce): the vCPU thread itself does SET_MCE."""
        if self.pending_ao is not None:
            gpa, self.pending_ao = self.pending_ao, None
            self.vcpu(0, "inject_ao", gpa)

    # ---- driving the vCPUs ----
    def vcpu(self, i: int, op: str, gpa: int = 0, n: int = 8, data: bytes = b"",
             private: bool | None = None, touch: int | None = None):
        """Have vCPU i's guest do one access (or an injection); returns its result.
        op "qemu_read" has the vCPU thread itself (QEMU code, e.g. MMIO emulation)
        read n bytes at host address gpa.  `touch`: a host address the vCPU thread
        reads after KVM_RUN returned with a SIGBUS pending, before it handles it.
        While the VM is paused (internal-error) the vCPUs do not run: "paused"."""
        if self.runstate != "running" and op not in ("reset",):
            return "paused"
        _send(self.vcpus[i][1], (op, gpa, n, data, private, touch))
        result = self._wait(i)
        if result == "paused":
            self.runstate = "internal-error"          # vm_stop(RUN_STATE_INTERNAL_ERROR)
        elif result in ("reset", "shutdown"):
            self.reset_requested = True               # qemu_system_reset_request(GUEST_RESET)
        return result

    def _wait(self, i: int):
        try:
            result, journal, poisoned = _recv(self.vcpus[i][2])
        except EOFError:
            result, journal, poisoned = None, [], []
        self.journal.extend(journal)
        for gpa in poisoned:
            self._hwpoison_page_add(gpa)
        if result is None:                            # the vCPU thread died
            self._thread_ended(self.vcpus[i][0])
        if isinstance(result, tuple) and result[:1] == ("qemu-exit",):
            os._exit(result[1])                       # a vCPU's exit(1) is exit_group
        return result

    def _thread_ended(self, th) -> None:
        """A QEMU thread that exit()s or dies of a signal takes the process with it
        (exit_group, or the group-wide default action of a fatal signal).  The
        emulator's threads are separate OS processes, so the main thread follows."""
        code = th.join(30)
        if code == -signal.SIGBUS:
            signal.signal(signal.SIGBUS, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGBUS])
            os.kill(os.getpid(), signal.SIGBUS)
        os._exit(code if code and code > 0 else 1)

    # ---- the main thread's own accesses and monitor commands ----
    def main_read(self, gpa: int, n: int = 8) -> bytes:
        """Device emulation in the main loop reads guest RAM through QEMU's mapping,
        with SIGBUS blocked as in every QEMU thread but the vCPUs
        (util/main-loop.c qemu_signal_init): an AR kills the process."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGBUS})
        try:
            return self.me.read(self.ram.hva + gpa, n)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def iothread_read(self, gpa: int, n: int = 8):
        """An iothread (util/qemu-thread-posix.c qemu_thread_create blocks every
        signal but SIGSEGV/SIGFPE/SIGILL) reads guest RAM; returns the thread's
        exit status (an AR kills the whole process)."""
        def body(task):
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals()
                                   - {signal.SIGSEGV, signal.SIGFPE, signal.SIGILL})
            task.read(self.ram.hva + gpa, n)
            return 0
        th = self.me.clone(body, name="iothread0")
        if th.join(30) != 0:
            self._thread_ended(th)
        return th.exitcode

    def system_reset(self) -> None:
        """qemu_system_reset: the reset handlers run, among them kvm_unpoison_all
        (accel/kvm/kvm-all.c, registered by kvm_init) which calls qemu_ram_remap
        (system/physmem.c) for every poisoned page and empties the list; for
        fd-backed RAM that is ram_block_discard_range, a FALLOC_FL_PUNCH_HOLE, and
        on failure "Could not remap RAM ..." and exit(1).  Then the vCPUs are reset
        and the guest boots again."""
        for gpa in self.hwpoison_pages:
            try:
                self.me.fallocate(self.ram.gmem, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE,
                                  gpa - self.ram.gpa_base, 4096)
            except OSError as e:
                self.journal.add("main", "QEMU: Could not remap RAM pc.ram:%x +%x: %s"
                                 % (gpa, 4096, e.strerror))
                os._exit(1)
            self.journal.add("main", "QEMU: kvm_unpoison_all: remapped GPA %#x" % gpa)
        self.hwpoison_pages = []
        self.journal.add("main", "QEMU: system reset")
        self.runstate, self.reset_requested = "running", False
        for i in range(len(self.vcpus)):
            self.vcpu(i, "reset")

    def migrate(self) -> dict:
        """QMP `migrate`: migration/migration.c migrate_prepare refuses while the
        poison list is not empty (kvm_hwpoisoned_mem)."""
        if self.hwpoison_pages:
            self.journal.add("main", "QEMU: error: " + MIGRATE_POISONED)
            return {"error": {"class": "GenericError", "desc": MIGRATE_POISONED}}
        return {"return": {}}

    def qmp_events(self) -> list[dict]:
        """The QMP events journalled so far."""
        return [json.loads(text) for _t, who, text in self.journal if who == "qmp"]

    def stop(self) -> None:
        for th, cmd_w, rep_r in self.vcpus:
            try:
                _send(cmd_w, ("exit", 0, 0, b"", None, None))
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


def _guest_idle(g):
    yield g.sync("idle")


def _vcpu_thread(task, idx: int, ram: GuestRam, cmd_r: int, rep_w: int, recover: bool,
                 ser: bool = True, guest_mce: bool = True, log_fd: int | None = None,
                 mce_handler=None) -> int:
    who = "vcpu%d" % idx
    task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_LATE)
    journal = Journal()
    journal.fd = log_fd
    poisoned: list[int] = []                       # kvm_hwpoison_page_add, sent to main
    pending = []                                   # QEMU: pending_sigbus_addr/code
    state = {"touch": None}

    def reply(result):
        _send(rep_w, (result, list(journal), list(poisoned)))
        journal.clear()
        poisoned.clear()

    def on_sigbus(signum, info):
        # system/cpus.c sigbus_handler -> accel/kvm/kvm-all.c kvm_on_sigbus_vcpu
        if info.si_code not in (u.BUS_MCEERR_AO, u.BUS_MCEERR_AR):
            journal.add(who, "QEMU: SIGBUS si_code %#x is not a memory error: re-raising"
                        % info.si_code)
            reply(None)
            _sigbus_reraise()
        if pending:                                # have_sigbus_pending: return 1 -> reraise
            journal.add(who, "QEMU: second SIGBUS %s at %#x while one is pending: re-raising"
                        % (_code_name(info.si_code), info.si_addr))
            reply(None)
            _sigbus_reraise()
        pending.append((info.si_code, info.si_addr))

    emu.sigaction(signal.SIGBUS, on_sigbus)        # kvm_init_cpu_signals unblocks it
    vcpu = ram.vm.create_vcpu(idx)
    vcpu.setup_mce(MCG_CAP if ser else MCG_CAP_NO_SER)

    def do_inject_x86_mce(code: int, gpa: int) -> str | None:
        """target/i386/helper.c do_inject_x86_mce on this vCPU (run_on_cpu), after
        cpu_synchronize_state: the guest's CR4, MCG_STATUS/MCG_CTL and the bank's
        MCi_CTL as KVM holds them.  Returns "reset" when it raised a triple fault."""
        ar = code == u.BUS_MCEERR_AR
        st = task._call("guest_state", vcpu=vcpu.fd)
        recursive = bool(st["mcg_status"] & u.MCG_STATUS_MCIP)
        if not ar and recursive:                   # an AO while the guest is mid-#MC: dropped
            journal.memory_failure("guest", "ignore", ar, recursive)
            return None
        ones = (1 << 64) - 1
        # "Uncorrected error reporting disabled": printed to params->mon, which is
        # NULL for kvm_mce_inject, so nothing is shown and no event is sent.
        if st["mcg_cap"] & u.MCG_CTL_P and st.get("mcg_ctl", ones) != ones:
            return None
        if st["banks"][9][0] != ones:
            return None
        msg = None
        if not st["cr4_mce"]:
            msg = "CPU %d: MCE capability is not enabled, raising triple fault" % idx
        elif recursive:
            msg = "CPU %d: Previous MCE still in progress, raising triple fault" % idx
        if msg:                                    # qemu_system_reset_request(GUEST_RESET)
            journal.memory_failure("guest", "reset", ar, recursive)
            journal.add(who, "QEMU: " + msg)       # qemu_log_mask(CPU_LOG_RESET): -d cpu_reset
            return "reset"
        vcpu.set_mce(kvm_mce(code, gpa))
        journal.memory_failure("guest", "inject", ar, recursive)
        return None

    def kvm_arch_on_sigbus_vcpu(code: int, addr: int) -> str | None:
        """target/i386/kvm/kvm.c kvm_arch_on_sigbus_vcpu for a SIGBUS on this vCPU."""
        if ser and addr and ram.contains(addr):    # qemu_ram_addr_from_host + memslot lookup
            gpa = ram.gpa(addr)
            poisoned.append(gpa & ~0xFFF)          # kvm_hwpoison_page_add
            r = do_inject_x86_mce(code, gpa)       # kvm_mce_inject
            if code == u.BUS_MCEERR_AR:
                # error_report (no "error: " prefix: util/error-report.c vreport)
                journal.add(who, "QEMU: Guest MCE Memory Error at QEMU addr %#x and "
                            "GUEST addr %#x of type BUS_MCEERR_AR injected" % (addr, gpa))
            else:
                journal.add(who, "QEMU: warning: Guest MCE Memory Error at QEMU addr %#x and "
                            "GUEST addr %#x of type BUS_MCEERR_AO injected" % (addr, gpa))
            return r
        if ser and addr and code == u.BUS_MCEERR_AO:
            journal.add(who, "QEMU: warning: Hardware memory error at addr %#x of type "
                        "BUS_MCEERR_AO for memory used by QEMU itself instead of guest system!"
                        % addr)
        if code == u.BUS_MCEERR_AR:                # hardware_memory_error
            journal.memory_failure("hypervisor", "fatal", True)
            journal.add(who, "QEMU: QEMU got Hardware memory error at addr %#x" % addr)
            reply(("qemu-exit", 1))                   # exit(1): the main thread ends the process
            task.exit()
            os._exit(0)
        journal.memory_failure("hypervisor", "ignore", False)
        return None

    def kvm_cpu_exec():
        """accel/kvm/kvm-all.c kvm_cpu_exec until the guest's ucall; returns the
        ucall value, "paused", "reset" or "shutdown"."""
        while True:
            try:
                vcpu.run()
            except OSError as e:
                kr = vcpu.kvm_run
                if pending:                        # right after KVM_RUN, under the BQL
                    if state["touch"] is not None:
                        task.read(state["touch"], 8)
                    code, addr = pending.pop()
                    if kvm_arch_on_sigbus_vcpu(code, addr) == "reset":
                        return "reset"
                if e.errno in (u.EINTR, u.EAGAIN):  # kvm_eat_signals, EXCP_INTERRUPT
                    continue
                if e.errno == u.EFAULT and kr.exit_reason == u.KVM_EXIT_MEMORY_FAULT:
                    mf = kr.memory_fault
                    private = bool(mf.flags & u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
                    journal.add(who, "QEMU: KVM_EXIT_MEMORY_FAULT gpa %#x: converting to %s"
                                % (mf.gpa, "private" if private else "shared"))
                    task.gmem_convert(ram.gmem, mf.gpa - ram.gpa_base, mf.size, private)
                    continue                       # kvm_convert_memory
                journal.add(who, "QEMU: error: kvm run failed %s" % os.strerror(e.errno))
                if recover and e.errno == u.EHWPOISON:
                    mf = kr.memory_fault
                    journal.add(who, "recovering VMM: punch hole over GPA %#x and re-enter"
                                % mf.gpa)
                    task.fallocate(ram.gmem, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE,
                                   mf.gpa - ram.gpa_base, mf.size)
                    continue
                journal.add(who, "QEMU: KVM_EXIT_MEMORY_FAULT gpa %#x size %#x flags %#x; "
                            "VM paused (internal-error)" % (
                                kr.memory_fault.gpa, kr.memory_fault.size, kr.memory_fault.flags))
                return "paused"                    # cpu_dump_state, vm_stop(INTERNAL_ERROR)
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

    if mce_handler is not None:                    # the guest kernel's own #MC handler
        vcpu.guest_kernel.handler = mce_handler
    vcpu.set_guest(guest_programs.boot, guest_mce)
    kvm_cpu_exec()
    reply("booted")
    while True:
        try:
            op, gpa, n, data, private, touch = _recv(cmd_r)
        except EOFError:
            return 0
        if op == "exit":
            return 0
        state["touch"] = touch
        if op == "qemu_read":                      # QEMU code on the vCPU thread
            journal.add(who, "QEMU reads %d bytes at %#x" % (n, gpa))
            reply(task.read(gpa, n))
            continue
        if op == "reset":                          # kvm_arch_reset_vcpu + the guest boots
            vcpu.reset()
            if mce_handler is not None:
                vcpu.guest_kernel.handler = mce_handler
            vcpu.set_guest(guest_programs.boot, guest_mce)
            reply(kvm_cpu_exec())
            continue
        gk = vcpu.guest_kernel
        seen = len(gk.log)
        if op == "inject_ao":
            journal.add(who, "QEMU: injecting the AO machine check for GPA %#x (run_on_cpu)" % gpa)
            r = do_inject_x86_mce(u.BUS_MCEERR_AO, gpa)
            vcpu.set_guest(_guest_idle)
            result = r or kvm_cpu_exec()
        else:
            journal.add(who, "guest %s %d bytes at GPA %#x%s" % (
                "reads" if op == "read" else "writes", n if op == "read" else len(data), gpa,
                " (private)" if private else ""))
            vcpu.set_guest(guest_programs.access, gpa, n, private, None if op == "read" else data)
            result = kvm_cpu_exec()
        for line in gk.log[seen:]:
            journal.add(who, "guest kernel: " + line)
        reply(result)


def _code_name(code: int) -> str:
    return {u.BUS_MCEERR_AO: "BUS_MCEERR_AO", u.BUS_MCEERR_AR: "BUS_MCEERR_AR"}.get(code, str(code))


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
