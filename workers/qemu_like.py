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
import signal
import time
from multiprocessing import Pipe

import emu
from emu import uapi as u
from workers import guest_programs, models

MIGRATE_POISONED = ("Can't migrate this vm with hardware poisoned memory, please reboot the vm "
                    "and try again")                # migration/migration.c migrate_prepare


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
        self.model = models.QemuLike(ser=ser, recover=recover)
        self.runstate = "running"
        self.reset_requested = False
        self.me = emu.attach(host, name=name)
        # system/cpus.c qemu_init_sigbus: sigbus_handler, then PR_MCE_KILL_EARLY
        emu.sigaction(signal.SIGBUS, self._main_sigbus)
        self.me.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_EARLY)
        self.ram = GuestRam(self.me, ram_size)
        self.vcpus = []
        for i in range(nvcpus):
            ours, theirs = Pipe()                     # run_on_cpu's queue, both ways
            th = self.me.clone(_vcpu_thread, i, self.ram, theirs, self.model, guest_mce,
                               log_fd, mce_handler, name="vcpu%d" % i)
            theirs.close()
            self.vcpus.append((th, ours))
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
        self.model.on_sigbus(self, info, vcpu=False)

    # the main thread as the models' Executor
    pending: list = []                      # never used: no KVM_RUN on the main thread
    index = 0

    def log(self, text: str) -> None:
        self.journal.add("main", text)

    def qmp(self, recipient: str, action: str, ar: bool, recursive: bool = False) -> None:
        self.journal.memory_failure(recipient, action, ar, recursive)

    def reraise(self):
        models.sigbus_reraise()

    def die(self, status: int):
        os._exit(status)

    def guest_addr(self, hva: int) -> int | None:
        return self.ram.gpa(hva) if self.ram.contains(hva) else None

    def kvm_mce_inject(self, code: int, gpa: int) -> None:
        self.pending_ao = gpa                 # run_on_cpu(first_cpu, ...) when next driven

    pending_ao = None

    def hwpoison_page_add(self, gpa: int) -> None:
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
        self.vcpus[i][1].send((op, gpa, n, data, private, touch))
        result = self._wait(i)
        if result == "paused":
            self.runstate = "internal-error"          # vm_stop(RUN_STATE_INTERNAL_ERROR)
        elif result in ("reset", "shutdown"):
            self.reset_requested = True               # qemu_system_reset_request(GUEST_RESET)
        return result

    def _wait(self, i: int):
        try:
            result, journal, poisoned = self.vcpus[i][1].recv()
        except EOFError:
            result, journal, poisoned = None, [], []
        self.journal.extend(journal)
        for gpa in poisoned:
            self.hwpoison_page_add(gpa)
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
        for th, conn in self.vcpus:
            try:
                conn.send(("exit", 0, 0, b"", None, None))
            except OSError:
                pass
            th.join(10)
            conn.close()
        self.vcpus = []


def _guest_idle(g):
    yield g.sync("idle")


class VcpuThread:
    """A vCPU thread (kvm_vcpu_thread_fn): KVM_RUN in kvm_cpu_exec, the main
    thread's requests between runs, and the models' Executor for what it decides."""

    def __init__(self, task, idx: int, ram: GuestRam, conn, model: models.QemuLike,
                 log_fd: int | None):
        self.task, self.index, self.ram, self.conn, self.model = task, idx, ram, conn, model
        self.who = "vcpu%d" % idx
        self.journal = Journal()
        self.journal.fd = log_fd
        self.poisoned: list[int] = []             # kvm_hwpoison_page_add, sent to main
        self.pending: list = []                   # QEMU: pending_sigbus_addr/code
        self.touch: int | None = None
        task.prctl(u.PR_MCE_KILL, u.PR_MCE_KILL_SET, u.PR_MCE_KILL_LATE)
        emu.sigaction(signal.SIGBUS, lambda signum, info: model.on_sigbus(self, info, vcpu=True))
        self.vcpu = ram.vm.create_vcpu(idx)       # kvm_init_cpu_signals unblocks SIGBUS
        self.vcpu.setup_mce(model.mcg_cap)

    def reply(self, result) -> None:
        self.conn.send((result, list(self.journal), list(self.poisoned)))
        self.journal.clear()
        self.poisoned.clear()

    # ---- Executor ----
    def log(self, text: str) -> None:
        self.journal.add(self.who, text)

    def qmp(self, recipient: str, action: str, ar: bool, recursive: bool = False) -> None:
        self.journal.memory_failure(recipient, action, ar, recursive)

    def die(self, status: int):
        """exit(status) on this thread: the main thread ends the process."""
        self.reply(("qemu-exit", status))
        self.task.exit()
        os._exit(0)

    def reraise(self):
        self.reply(None)
        models.sigbus_reraise()

    def guest_addr(self, hva: int) -> int | None:
        return self.ram.gpa(hva) if self.ram.contains(hva) else None

    def hwpoison_page_add(self, gpa: int) -> None:
        self.poisoned.append(gpa & ~0xFFF)

    def kvm_mce_inject(self, code: int, gpa: int) -> str | None:
        return self.model.do_inject_x86_mce(self, code, gpa)

    def guest_state(self) -> dict:
        return self.task._call("guest_state", vcpu=self.vcpu.fd)

    def set_mce(self, mce: u.KvmX86Mce) -> None:
        self.vcpu.set_mce(mce)

    def convert(self, gpa: int, size: int, private: bool) -> None:
        self.task.gmem_convert(self.ram.gmem, gpa - self.ram.gpa_base, size, private)

    def punch(self, gpa: int, size: int) -> None:
        self.task.fallocate(self.ram.gmem, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE,
                            gpa - self.ram.gpa_base, size)

    def pause(self) -> str:
        return "paused"

    # ---- the loop ----
    def kvm_cpu_exec(self):
        """accel/kvm/kvm-all.c kvm_cpu_exec until the guest's ucall; returns the
        ucall value, "paused", "reset" or "shutdown"."""
        vcpu = self.vcpu
        while True:
            try:
                vcpu.run()
            except OSError as e:
                if self.pending and self.touch is not None:
                    self.task.read(self.touch, 8)   # QEMU code between KVM_RUN and the BQL
                if self.model.post_run(self) == "reset":
                    return "reset"
                if e.errno == u.EINTR:             # kvm_eat_signals, EXCP_INTERRUPT
                    continue
                r = self.model.on_kvm_error(self, e.errno, vcpu.kvm_run)
                if r is None:
                    continue
                return r
            kr = vcpu.kvm_run
            if kr.exit_reason == u.KVM_EXIT_IO:
                cmd, args = vcpu.ucall()
                if cmd == u.UCALL_SYNC:
                    return args[0] if len(args) == 1 else args
                if cmd == u.UCALL_DONE:
                    return "done"
            elif kr.exit_reason == u.KVM_EXIT_SHUTDOWN:
                self.log("QEMU: guest triple fault: system reset requested")
                return "shutdown"
            else:
                return "exit %d" % kr.exit_reason

    def boot(self, guest_mce: bool, mce_handler) -> None:
        self.vcpu.set_guest(guest_programs.boot, guest_mce)
        if mce_handler is not None:                # the guest kernel's own #MC handler
            self.vcpu.guest_kernel.handler = mce_handler

    def serve(self, guest_mce: bool, mce_handler=None) -> int:
        vcpu = self.vcpu
        self.boot(guest_mce, mce_handler)
        self.kvm_cpu_exec()
        self.reply("booted")
        while True:
            try:
                op, gpa, n, data, private, touch = self.conn.recv()
            except EOFError:
                return 0
            if op == "exit":
                return 0
            self.touch = touch
            if op == "qemu_read":                  # QEMU code on the vCPU thread
                self.log("QEMU reads %d bytes at %#x" % (n, gpa))
                self.reply(self.task.read(gpa, n))
                continue
            if op == "reset":                      # kvm_arch_reset_vcpu + the guest boots
                vcpu.reset()
                self.boot(guest_mce, mce_handler)
                self.reply(self.kvm_cpu_exec())
                continue
            gk = vcpu.guest_kernel
            seen = len(gk.log)
            if op == "inject_ao":
                self.log("QEMU: injecting the AO machine check for GPA %#x (run_on_cpu)" % gpa)
                r = self.model.do_inject_x86_mce(self, u.BUS_MCEERR_AO, gpa)
                vcpu.set_guest(_guest_idle)
                result = r or self.kvm_cpu_exec()
            else:
                self.log("guest %s %d bytes at GPA %#x%s" % (
                    "reads" if op == "read" else "writes", n if op == "read" else len(data), gpa,
                    " (private)" if private else ""))
                vcpu.set_guest(guest_programs.access, gpa, n, private,
                               None if op == "read" else data)
                result = self.kvm_cpu_exec()
            for line in gk.log[seen:]:
                self.log("guest kernel: " + line)
            self.reply(result)


def _vcpu_thread(task, idx: int, ram: GuestRam, conn, model: models.QemuLike,
                 guest_mce: bool = True, log_fd: int | None = None, mce_handler=None) -> int:
    return VcpuThread(task, idx, ram, conn, model, log_fd).serve(guest_mce, mce_handler)


def main(argv=None) -> int:
    """`emu run-worker qemu-like` (also `python -m workers.qemu_like`): this VMM on a
    running daemon, driven from stdin (workers/console.py)."""
    from workers.console import main as console_main

    return console_main(argv)


if __name__ == "__main__":
    from workers.console import script

    script(main)
