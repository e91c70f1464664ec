"""x86 machine checks (arch/x86/kernel/cpu/mce/core.c, severity.c): what the #MC
handler does when an access consumes a latent uncorrected error.

The emulated hardware raises only software-recoverable action-required errors
(SRAR): a data load (MCACOD 0x134) or an instruction fetch (0x150) that reaches a
frame from host.hw_poison().  do_machine_check() grades the error with the
severity table (first match wins, as severities[]) in the context it came from:
- user mode (or guest mode: kvm_machine_check() fakes cs=3): action required, the
  consuming thread gets kill_me_maybe (kill_me_now without a usable address) as
  task work on its way back to user mode;
- a kernel copy *from* user memory (is_copy_from_user(): the source is a user
  address): recoverable, the copy returns short (-EFAULT) and kill_me_never runs
  memory_failure() on the way back;
- a machine-check-safe kernel copy (copy_mc_to_kernel(): migration's folio_mc_copy(),
  a copy-on-write's copy_mc_user_highpage()): recoverable, the copy fails and its
  caller decides (those helpers queue memory_failure() for the source page);
- any other kernel load (copy_to_user() from the page cache, a plain memcpy):
  unrecoverable, mce_panic("Fatal machine check").
The machine has one CPU and no LMCE (broadcast machine checks): a fatal error
panics through the monarch's mce_reign(), hence "Fatal machine check".
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .. import uapi as u

HW_ERR = "[Hardware Error]: "
MCACOD_DATA = 0x134                 # data cache unit: data read error
MCACOD_INSTR = 0x150                # instruction fetch unit: instruction read error

# enum context (severity.c)
IN_KERNEL, IN_USER, IN_KERNEL_RECOV = 1, 2, 3
# severity levels used here (asm/mce.h MCE_*_SEVERITY)
MCE_KEEP_SEVERITY, MCE_UC_SEVERITY, MCE_AR_SEVERITY, MCE_PANIC_SEVERITY = 1, 3, 5, 6
# mce.kflags
MCE_IN_KERNEL_RECOV = 1 << 0
MCE_IN_KERNEL_COPYIN = 1 << 7

MCI_MISC_ADDR_PHYS = 2              # MCi_MISC address mode: physical address
MCE_MAX_CONSECUTIVE = 10            # queue_task_work: "Ten is likely overkill"


@dataclass(frozen=True)
class Severity:
    """One row of severities[] restricted to what can match an SRAR with ADDRV and
    MISCV set: the error kind (None: any), the context (None: any), whether the row
    wants MCG_STATUS.RIPV clear, the severity and its message."""
    mcacod: int | None
    context: int | None
    no_ripv: bool
    sev: int
    msg: str


SEVERITIES = (
    Severity(None, IN_KERNEL, True, MCE_PANIC_SEVERITY, "In kernel and no restart IP"),
    Severity(None, IN_KERNEL_RECOV, True, MCE_PANIC_SEVERITY, "In kernel and no restart IP"),
    Severity(MCACOD_DATA, IN_KERNEL_RECOV, False, MCE_AR_SEVERITY,
             "Action required: data load in error recoverable area of kernel"),
    Severity(MCACOD_DATA, IN_USER, False, MCE_AR_SEVERITY,
             "Action required: data load error in a user process"),
    Severity(MCACOD_INSTR, IN_USER, False, MCE_AR_SEVERITY,
             "Action required: instruction fetch error in a user process"),
    Severity(MCACOD_DATA, IN_KERNEL, False, MCE_PANIC_SEVERITY,
             "Data load in unrecoverable area of kernel"),
    Severity(MCACOD_INSTR, IN_KERNEL, False, MCE_PANIC_SEVERITY,
             "Instruction fetch error in kernel"),
    Severity(None, None, False, MCE_PANIC_SEVERITY, "Action required: unknown MCACOD"),
)


@dataclass
class Mce:
    """struct mce, the fields the handler and print_mce() use."""
    status: int
    mcgstatus: int
    addr: int
    misc: int
    bank: int
    tsc: int
    time: int
    kflags: int = 0


def srar(phys_addr: int, fetch: bool, lsb: int = 0) -> Mce:
    """The record an SRAR leaves in the bank (Intel SDM vol. 3B, table "MCA error
    codes for SRAR"): a data load is bank 1 (DCU) with RIPV and EIPV set; an
    instruction fetch is bank 0 (IFU) with EIPV only, so it cannot be restarted.
    `lsb`: the address granularity MCi_MISC reports (0: the byte consumed); the
    handler masks MCi_ADDR with it (mce_read_aux)."""
    status = (u.MCI_STATUS_VAL | u.MCI_STATUS_UC | u.MCI_STATUS_EN | u.MCI_STATUS_MISCV
              | u.MCI_STATUS_ADDRV | u.MCI_STATUS_S | u.MCI_STATUS_AR
              | (MCACOD_INSTR if fetch else MCACOD_DATA))
    mcg = u.MCG_STATUS_MCIP | u.MCG_STATUS_EIPV | (0 if fetch else u.MCG_STATUS_RIPV)
    misc = MCI_MISC_ADDR_PHYS << 6 | lsb
    return Mce(status, mcg, phys_addr >> lsb << lsb, misc, 0 if fetch else 1,
               time.monotonic_ns(), int(time.time()))


def mce_severity(m: Mce, ctx: int) -> Severity:
    """mce_severity_intel(): the first matching row; an uncorrected error graded in
    IN_KERNEL context is a panic whatever the row says."""
    ripv = bool(m.mcgstatus & u.MCG_STATUS_RIPV)
    code = m.status & 0xFFFF
    for s in SEVERITIES:
        if (s.mcacod is None or s.mcacod == code) and (s.context is None or s.context == ctx) \
                and (not s.no_ripv or not ripv):
            if s.sev >= MCE_UC_SEVERITY and ctx == IN_KERNEL:
                return Severity(s.mcacod, s.context, s.no_ripv, MCE_PANIC_SEVERITY, s.msg)
            return s
    raise AssertionError("severities[] ends with a catch-all")


class MachineCheck:
    def __init__(self, k):
        self.k = k

    # ------------------------------------------------------------ #MC entry points
    def user_access(self, t, pfn: int, phys_addr: int, fetch: bool = False) -> None:
        """A load or fetch of `t` in user (or guest) mode consumed the poison."""
        m = srar(phys_addr, fetch, addr_lsb(self.k, pfn))
        self.do_machine_check(t, m, IN_USER, ("exc_machine_check_user",))

    def kernel_load(self, t, pfn: int, phys_addr: int, copy_from_user: bool,
                    stack: tuple[str, ...]) -> None:
        """A load by the kernel on behalf of `t` consumed the poison.  Returns only
        if it was recoverable (copy from user: the caller's copy stops there, as
        the exception fixup makes it); otherwise the machine panics."""
        m = srar(phys_addr, False, addr_lsb(self.k, pfn))
        self.k.trace("mce", tid=t.tid if t is not None else 0, pfn=pfn, addr=phys_addr,
                     kernel=True, copy_from_user=copy_from_user)
        if copy_from_user:                       # error_context(): is_copy_from_user()
            m.kflags |= MCE_IN_KERNEL_COPYIN | MCE_IN_KERNEL_RECOV
            ctx = IN_KERNEL_RECOV
        else:                                    # EX_TYPE_UACCESS of copy_to_user: IN_KERNEL
            ctx = IN_KERNEL
        self.do_machine_check(t, m, ctx, ("exc_machine_check_kernel",) + stack)

    def kernel_copy_mc(self, t, pfn: int, stack: tuple[str, ...]) -> None:
        """A machine-check-safe kernel copy (copy_mc_to_kernel(), exception type
        EX_TYPE_DEFAULT_MCE_SAFE) consumed the poison in the source page: error_context()
        gives IN_KERNEL_RECOV ("data load in error recoverable area of kernel"); the
        fixup ends the copy, which reports it to its caller.  No task work: only a copy
        from user memory (MCE_IN_KERNEL_COPYIN) queues kill_me_never."""
        m = srar(pfn << 12, False, addr_lsb(self.k, pfn))
        m.kflags |= MCE_IN_KERNEL_RECOV
        self.k.trace("mce", tid=t.tid if t is not None else 0, pfn=pfn, addr=pfn << 12,
                     kernel=True, copy_mc=True)
        self.do_machine_check(t, m, IN_KERNEL_RECOV, ("exc_machine_check_kernel",) + stack)

    def do_machine_check(self, t, m: Mce, ctx: int, stack: tuple[str, ...]) -> None:
        """do_machine_check() with mce_reign() for the one CPU: a fatal grade panics;
        otherwise the consuming thread gets its task work."""
        sev = mce_severity(m, ctx)
        self.k.add_taint(u.TAINT_MACHINE_CHECK)  # __mc_scan_banks(): every signalled bank
        if sev.sev >= MCE_PANIC_SEVERITY:
            self.mce_panic("Fatal machine check", m, sev.msg, stack)
        kill_current_task = not m.mcgstatus & u.MCG_STATUS_RIPV
        if sev.sev != MCE_AR_SEVERITY and not kill_current_task:
            return
        if ctx == IN_USER:
            self.queue_task_work(t, m, sev.msg, "kill_me_maybe" if mce_usable_address(m)
                                 else "kill_me_now", stack)
        elif m.kflags & MCE_IN_KERNEL_COPYIN:     # (the fixup itself is the caller's)
            self.queue_task_work(t, m, sev.msg, "kill_me_never", stack)

    def mce_panic(self, msg: str, m: Mce, exp: str, stack: tuple[str, ...]) -> None:
        """mce_panic(): the record (print_mce), the grade, then panic(msg).  No RIP
        line: the emulator has no kernel text addresses."""
        lines = [
            "mce: " + HW_ERR + "CPU 0: Machine Check Exception: %x Bank %d: %016x"
            % (m.mcgstatus, m.bank, m.status),
            "mce: " + HW_ERR + "TSC %x ADDR %x MISC %x " % (m.tsc, m.addr, m.misc),
            "mce: " + HW_ERR + "PROCESSOR 0:0 TIME %d SOCKET 0 APIC 0 microcode 0" % m.time,
            "mce: " + HW_ERR + "Run the above through 'mcelog --ascii'",
            "mce: " + HW_ERR + "Machine check: %s" % exp,
        ]
        self.k.panic(msg, lines, ("panic", "mce_panic", "do_machine_check") + stack)

    # ------------------------------------------------------------ task work
    def queue_task_work(self, t, m: Mce, msg: str, func: str, stack: tuple[str, ...]) -> None:
        """queue_task_work(): the first #MC since the thread last went back to user
        mode records the error and the callback; more of them before it gets
        there must hit the same page, at most ten."""
        t.mce_count += 1
        if t.mce_count == 1:
            t.mce_addr, t.mce_ripv = m.addr, bool(m.mcgstatus & u.MCG_STATUS_RIPV)
            t.mce_kill_me = func
        if t.mce_count > MCE_MAX_CONSECUTIVE:
            self.mce_panic("Too many consecutive machine checks while accessing user data",
                           m, msg, stack)
        if t.mce_count > 1 and t.mce_addr >> 12 != m.addr >> 12:
            self.mce_panic("Consecutive machine checks to different user pages", m, msg, stack)

    def task_work_run(self, t) -> None:
        """On the way back to user mode (exit_to_user_mode): the queued callback."""
        func, t.mce_kill_me = t.mce_kill_me, None
        if func is None:
            return
        t.mce_count = 0
        mf, addr = self.k.memory_failure, t.mce_addr
        if func == "kill_me_maybe":
            mf.kill_me_maybe(addr >> 12, addr, ripv=t.mce_ripv)
        elif func == "kill_me_never":
            mf.kill_me_never(addr >> 12, addr)
        else:                                     # kill_me_now
            self.k.signals.force_sig(t, u.SIGBUS, why="kill_me_now: no usable address")


def addr_lsb(k, pfn: int) -> int:
    """The granularity the bank reports for pfn's latent error: hwerr holds it + 1
    (host.hw_poison(pfn, addr_lsb))."""
    return max(k.core.hwerr(pfn) - 1, 0)


def mce_usable_address(m: Mce) -> bool:
    """mce_usable_address() for Intel: ADDRV and MISCV, physical mode, at most page
    granularity."""
    if not m.status & u.MCI_STATUS_ADDRV or not m.status & u.MCI_STATUS_MISCV:
        return False
    return (m.misc & 0x3F) <= 12 and (m.misc >> 6 & 7) == MCI_MISC_ADDR_PHYS
