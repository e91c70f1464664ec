"""Signal generation (kernel/signal.c) for emulated threads.

The kernel side decides who gets which siginfo; delivery is real:
- to current (the thread in a syscall or fault): the record rides on the reply and
  the worker raises it on itself with rt_tgsigqueueinfo; a forced one first
  resets a blocked or ignored SIGBUS to SIG_DFL and unblocks it, as
  force_sig_info_to_task does;
- to any other thread: the record goes to its shm mailbox and a thread-directed
  SIGBUS rings the doorbell; blocked, it stays pending until unblocked.
SIGBUS is a legacy signal: one already pending makes a new one a no-op
(legacy_queue), so the kernel's own drop rule decides, not the doorbell.  The rule
has one definition, the core's legacy_queue, which both branches consult.
"""
from __future__ import annotations

import collections
import os

from .. import _core as C
from .. import uapi as u


class Signals:
    def __init__(self, k):
        self.k = k
        self.seq = 0
        # records the core posted in try_to_unmap's call (mm.try_to_unmap), with its
        # sig_send result each, waiting for kill_procs' send_sig_mceerr to account for them
        self.early: collections.deque = collections.deque()

    def _queue(self, t, signo: int, code: int, addr: int, lsb: int, force: bool, why: str) -> int:
        """send_signal_locked() for one thread: current's siginfo rides on the reply,
        another thread's goes to its mailbox.  Both drop a SIGBUS while one is
        pending by the core's legacy_queue."""
        k = self.k
        info = (t, signo, code, addr, lsb, force, why)
        if self.early:
            return self._sent(info, self._take_early(t, signo, code, addr, lsb))
        self.seq += 1
        if not t.alive:
            return -u.ESRCH
        if t is k.current:
            pend = [s for s in t.reply_sigs if s[0] == signo and s[5]]
            if k.core.legacy_queue(t.slot, bool(pend)):
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

    # ------------------------------------------------------------ sent with the unmap
    def early_records(self, targets: list, signo: int, code: int) -> list | None:
        """The mailbox records _queue would post for (thread, addr, lsb, ...) targets,
        in order, for the core to post in try_to_unmap's own call (an optimisation
        of kill_procs: the signals leave the moment the PTEs are gone); None if a
        target is current or dead (its signal must take _queue's other branch).
        Each record takes the next seq, as _queue would."""
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

    def posted_early(self, records: list, results: list) -> None:
        """The core posted `records` (its sig_send result each): kill_procs' sends
        take them in order instead of posting again."""
        self.early.extend((r[0], r[2], r[3], r[4], r[5], res)
                          for r, res in zip(records, results, strict=True))
        self.doorbells_rung()

    def _take_early(self, t, signo: int, code: int, addr: int, lsb: int) -> tuple:
        e = self.early.popleft()
        assert e[:5] == (t.slot, signo, code, addr, lsb), "early send out of kill_procs' order"
        return e[5]

    def early_done(self) -> None:
        """kill_procs is over: every early send was accounted for."""
        assert not self.early, "early sends kill_procs did not make"

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
    def force_sig_mceerr(self, t, code: int, addr: int, lsb: int, why: str = "") -> int:
        """force_sig_mceerr(): to current (force_sig_info)."""
        return self._queue(t, u.SIGBUS, code, addr, lsb, True, why)

    def send_sig_mceerr(self, t, code: int, addr: int, lsb: int, why: str = "") -> int:
        """send_sig_mceerr(): to any thread, blockable (send_sig_info)."""
        return self._queue(t, u.SIGBUS, code, addr, lsb, False, why)

    def force_sig(self, t, signo: int, why: str = "") -> int:
        """force_sig: si_code SI_KERNEL, no address."""
        return self._queue(t, signo, u.SI_KERNEL, 0, 0, True, why)

    def force_sig_fault(self, t, signo: int, code: int, addr: int, why: str = "") -> int:
        return self._queue(t, signo, code, addr, 0, True, why)
