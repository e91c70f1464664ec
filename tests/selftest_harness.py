"""What the ports of the upstream memory-failure test suites share: a SIGBUS handler
that plays the C tests' siglongjmp, a pipe-based flag for forked processes, and the
/proc views the C tests read (meminfo HardwareCorrupted, kpageflags, dmesg)."""
import os
import select
import signal
import time

from checks import dmesg_has  # noqa: F401  (the selftest ports import it from here)

import emu
from emu import uapi as u

PAGE = 4096
HPAGE = 2 << 20
RW = u.PROT_READ | u.PROT_WRITE
AR, AO = u.BUS_MCEERR_AR, u.BUS_MCEERR_AO
KPF_HWPOISON = 1 << u.KPF_HWPOISON
WAIT = 5.0           # bound for asynchronous (AO) delivery; never a latency assert
QUIET = 0.3          # how long to look for a signal that must not come

# madvise(MADV_HWPOISON) before and after Linux 6.11 (MF_ACTION_REQUIRED): the
# emulator's kernel.madvise_action_required switch (docs/deviations.md)
MADVISE = {"6.18": True, "pre-6.11": False}


class Jump(Exception):
    """siglongjmp out of a SIGBUS handler: the faulting access or the system call
    in progress does not complete.  `info` is the siginfo the handler saw."""

    def __init__(self, info):
        super().__init__(info.si_code)
        self.info = info


class SigJmp:
    """A SA_SIGINFO SIGBUS handler: while armed it jumps (raises Jump, which carries
    the siginfo); otherwise it records (si_code, si_addr, si_addr_lsb) and returns."""

    def __init__(self):
        self.got = []
        self.armed = False

    def __call__(self, signum, info):
        assert signum == signal.SIGBUS
        if self.armed:
            self.armed = False                # one jump: sigsetjmp returns once
            raise Jump(info)
        self.got.append((info.si_code, info.si_addr, info.si_addr_lsb))

    def take(self) -> list:
        out, self.got = self.got, []
        return out

    def run(self, fn, *args):
        """fn(*args) with the handler armed: ("ok", result) or ("jump", siginfo)."""
        self.armed = True
        try:
            return "ok", fn(*args)
        except Jump as j:
            return "jump", (j.info.si_code, j.info.si_addr, j.info.si_addr_lsb)
        finally:
            self.armed = False

    def wait(self, task, n=1, timeout=WAIT) -> None:
        """Bounded wait for asynchronously delivered (AO) signals."""
        end = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < end:
            task.idle(0.05)


def attach(host, name="selftest"):
    me = emu.attach(host, name=name)
    rec = SigJmp()
    emu.sigaction(signal.SIGBUS, rec)
    return me, rec


class Pipe:
    """A byte channel between forked processes; reading to EOF tells that every
    writer has exited (the way SEM_UNDO releases a dead holder's semaphore)."""

    def __init__(self):
        self.r, self.w = os.pipe()

    def put(self, b: bytes) -> None:
        os.write(self.w, b)

    def close_write(self) -> None:
        """This process will not write: a reader then sees EOF once the writers left."""
        os.close(self.w)

    def get(self, task, timeout=10.0) -> bytes:
        """One byte, or b"" at EOF / timeout; idles as an emulated thread does."""
        end = time.monotonic() + timeout
        while not select.select([self.r], [], [], 0)[0]:
            if time.monotonic() > end:
                return b""
            task.idle(0.02)
        return os.read(self.r, 1)

    def get_bytes(self, n: int, timeout=10.0) -> bytes:
        """n bytes written by one os.write (n <= PIPE_BUF), without an emulated thread."""
        if not select.select([self.r], [], [], timeout)[0]:
            return b""
        return os.read(self.r, n)

    def drain(self, timeout=10.0) -> bytes:
        """Everything written until every writer closed its end (the caller's is closed here)."""
        os.close(self.w)
        out = b""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if select.select([self.r], [], [], 0.05)[0]:
                b = os.read(self.r, 4096)
                if not b:
                    break
                out += b
        return out


def hardware_corrupted(h) -> int:
    """/proc/meminfo HardwareCorrupted, kB (get_hardware_corrupted_size in vm_util.c)."""
    return h.meminfo()["HardwareCorrupted"]
