"""Signal generation (kernel/signal.c) for emulated threads.

The kernel side decides who gets which siginfo; delivery is real:
- to current (the thread in a syscall or fault): the record rides on the reply and
  the worker raises it on itself with rt_tgsigqueueinfo; a forced one first
  resets a blocked or ignored SIGBUS to SIG_DFL and unblocks it, as
  force_sig_info_to_task does;
- to any other thread: the record goes to its shm mailbox and a thread-directed
  SIGBUS rings the doorbell; blocked, it stays pending until unblocked.
SIGBUS is a legacy signal: one already pending makes a new one a no-op
(legacy_queue), so the kernel's own drop rule decides, not the doorbell.
"""
from __future__ import annotations

import os

from .. import _core as C
from .. import uapi as u


class Signals:
    def __init__(self, k):
        self.k = k
        self.seq = 0

    def _queue(self, t, signo: int, code: int, addr: int, lsb: int, force: bool, why: str) -> int:
        k = self.k
        self.seq += 1
        if not t.alive:
            return -u.ESRCH
        info = (t, signo, code, addr, lsb, force, why)
        if t is k.current:
            pend = [s for s in t.reply_sigs if s[0] == signo and s[5]]
            if pend or k.core.sig_pending(t.slot):
                if force:
                    # force_sig_info_to_task resets a blocked/ignored handler and
                    # unblocks before legacy_queue drops the new siginfo: the
                    # pending one is then delivered with the default action
                    for s in pend:
                        s[4] = True
                    if not pend:
                        t.reply_sigs.append([signo, code, addr, lsb, True, False])
                self._trace("signal_dropped", info, reason="already pending")
                return 0
            t.reply_sigs.append([signo, code, addr, lsb, force, True])
            self._trace("signal", info, via="current")
            return 0
        ret = self._sent(info, k.core.sig_send(t.slot, t.tid, signo, code, addr, lsb, 0, self.seq))
        self.doorbells_rung()
        return ret

    def mailbox_records(self, targets: list, signo: int, code: int) -> list | None:
        """The mailbox records _queue would send to (thread, addr, lsb, ...) targets, for
        a caller that has the core send them; None if a target is current or dead
        (its signal must take _queue's own way).  Each record takes the next seq."""
        cur = self.k.current
        for tk in targets:
            if tk[0] is cur or not tk[0].alive:
                return None
        out = []
        for tk in targets:
            t = tk[0]
            self.seq += 1
            out.append((t.slot, t.tid, signo, code, tk[1], tk[2], 0, self.seq))
        return out

    def _sent(self, info: tuple, result: tuple) -> int:
        """Account for the core's sig_send of `info`: the trace event, the return value."""
        status, rung, r = result
        if status == C.SEND_PENDING:
            self._trace("signal_dropped", info, reason="already pending")
            return 0
        # trace_signal_generate fires after complete_signal() has woken the target
        # (waking an idle vCPU makes the tgkill itself cost tens of microseconds);
        # stamped with the doorbell, as the woken thread may already have run
        self._trace("signal", info, _ts=rung, via="mailbox", doorbell_ns=rung)
        return r

    @staticmethod
    def doorbells_rung() -> None:
        """A woken thread may have been queued on this CPU: let it run its handler
        now rather than after the rest of this kernel path."""
        os.sched_yield()

    def _trace(self, type_: str, info: tuple, _ts: int = 0, **extra) -> None:
        t, signo, code, addr, lsb, force, why = info
        self.k.trace(type_, _ts, tid=t.tid, signo=signo, code=code, addr=addr, lsb=lsb,
                     force=force, why=why, **extra)

    # the kernel's entry points
    def send_sig_mceerr_sent(self, t, code: int, addr: int, lsb: int, why: str,
                             result: tuple) -> int:
        """send_sig_mceerr whose mailbox record the core has already sent (result:
        sig_send's): what is left is its trace and return value."""
        return self._sent((t, u.SIGBUS, code, addr, lsb, False, why), result)

    def force_sig_mceerr(self, t, code: int, addr: int, lsb: int, why: str = "") -> int:
        return self._queue(t, u.SIGBUS, code, addr, lsb, True, why)

    def send_sig_mceerr(self, t, code: int, addr: int, lsb: int, why: str = "") -> int:
        return self._queue(t, u.SIGBUS, code, addr, lsb, False, why)

    def force_sig(self, t, signo: int, why: str = "") -> int:
        """force_sig: si_code SI_KERNEL, no address."""
        return self._queue(t, signo, u.SI_KERNEL, 0, 0, True, why)

    def force_sig_fault(self, t, signo: int, code: int, addr: int, why: str = "") -> int:
        return self._queue(t, signo, code, addr, 0, True, why)
