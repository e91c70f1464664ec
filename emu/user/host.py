"""The machine from outside: a Host handle on a supervisor (what debugfs, /proc, /sys
and sysctl show an administrator), start() of a private one, connect() to a daemon."""
from __future__ import annotations

import errno
import os

from .. import shm
from .. import uapi as u
from . import current, mm
from .channel import Channel
from .errors import SHUTDOWN_MSG, KernelGone


def expand_runs(runs: list[dict]) -> list[dict]:
    """The per-page records of a `file_pages` run list (its compression undone):
    in a run of `count` pages, page j has pfn, host addresses and gpas + j pages
    (and, for order-0 pages, its own head)."""
    out = []
    for r in runs:
        for j in range(r["count"]):
            rec = {key: v for key, v in r.items() if key != "count"}
            rec["index"] = r["index"] + j
            if r["pfn"] is not None:
                rec["pfn"] = r["pfn"] + j
                if r["order"] == 0:
                    rec["head"] = rec["pfn"]
            rec["host"] = [{**m, "addr": m["addr"] + (j << 12)} for m in r["host"]]
            rec["stage2"] = [{**m, "gpa": m["gpa"] + (j << 12)} for m in r["stage2"]]
            out.append(rec)
    return out


def _sysctl_name(path: str) -> str:
    """/proc/sys/vm/memory_failure_early_kill -> vm.memory_failure_early_kill."""
    if not isinstance(path, str) or not path.startswith("/proc/sys/") or ".." in path:
        raise OSError(errno.ENOENT, "%s: not an emulated /proc/sys file" % path)
    return path[len("/proc/sys/"):].strip("/").replace("/", ".")


# ------------------------------------------------------------------ host handle
class Host:
    """The emulated machine: debugfs, /proc and sysctl views, and its lifetime."""

    def __init__(self, path: str, pid: int | None = None):
        self.path = path
        self.private_pid = pid
        self._ch: Channel | None = None
        self._ch_pid = None
        self._segments: set[tuple] = set()    # the cores this process mapped through it
        self._closed = False

    @property
    def ch(self) -> Channel:
        if self._closed:
            raise OSError(errno.EBADF, "this host handle is closed")
        if self._ch is None or self._ch_pid != os.getpid():
            self._ch = Channel(self.path)
            self._ch_pid = os.getpid()
        return self._ch

    def _call(self, _cmd, **a):
        return self.ch.call(_cmd, **a)

    def _errno_call(self, _cmd, **a) -> int:
        r = self._call(_cmd, **a)
        if isinstance(r, int) and r < 0:
            raise OSError(-r, os.strerror(-r))
        return r

    def sysctl(self, name: str, value=None):
        return self._call("sysctl", name=name, value=value)

    def read_file(self, path: str) -> str:
        """read(2) of a /proc/sys file as a shell's `cat` sees it: proc_dointvec's
        "%d\n"; or of /proc/sysvipc/shm (one line per SysV segment).  ENOENT for a
        path that is not one of the emulated files."""
        if path == "/proc/sysvipc/shm":
            return self._call("sysvipc_shm")
        return "%d\n" % self.sysctl(_sysctl_name(path))

    def write_file(self, path: str, data) -> int:
        """write(2) to a /proc/sys file (`echo 1 > ...`): proc_dointvec_minmax parses
        one decimal integer (whitespace around it allowed); not a number or out of
        range is EINVAL and the value stays.  Returns the bytes written."""
        name = _sysctl_name(path)
        raw = data.encode() if isinstance(data, str) else bytes(data)
        try:
            val = int(raw.decode("ascii").strip(), 10)
        except (UnicodeDecodeError, ValueError):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL)) from None
        self.sysctl(name, val)
        return len(raw)

    def corrupt_pfn(self, pfn: int) -> int:
        return self._errno_call("corrupt_pfn", pfn=pfn)

    def unpoison_pfn(self, pfn: int) -> int:
        return self._errno_call("unpoison_pfn", pfn=pfn)

    def soft_offline_page(self, phys_addr: int) -> int:
        """/sys/devices/system/memory/soft_offline_page: soft-offline the page at a
        physical address (not a pfn; the low 12 bits are ignored).  0, or OSError."""
        return self._errno_call("soft_offline_page", addr=phys_addr)

    def hw_poison(self, pfn: int, addr_lsb: int = 0) -> int:
        """A latent uncorrected error in pfn, consumed by the next load (SRAR).
        `addr_lsb`: the address granularity the machine check will report (0: the
        byte); above 12 the address is not usable and the consumer gets SIGBUS
        (SI_KERNEL) with no memory_failure() (kill_me_now)."""
        return self._errno_call("hw_poison", pfn=pfn, addr_lsb=addr_lsb)

    def hw_detect(self, pfn: int) -> int:
        """A deferred error: returns memory_failure()'s return value (0, -EBUSY, ...)."""
        r = self._call("hw_detect", pfn=pfn)
        if r == -u.ENXIO:
            raise OSError(u.ENXIO, os.strerror(u.ENXIO))
        return r

    def meminfo(self) -> dict:
        return self._call("meminfo")

    def mf_stats(self) -> dict:
        return self._call("mf_stats")

    def kpageflags(self, pfn: int, count: int | None = None):
        """The /proc/kpageflags entry of pfn (KPF_* bits); None at or past max_pfn,
        where a read(2) of the file returns 0 bytes.  With `count`: the list of up to
        `count` entries from pfn on, as one pread(2) of count * 8 bytes reads them."""
        if count is None:
            return self._call("kpageflags", pfn=pfn)
        return self._call("kpageflags", pfn=pfn, count=count)

    def smaps(self, pid: int) -> list[dict]:
        """/proc/PID/smaps of an emulated process: per VMA start, end, prot, shared,
        ino, pgoff, Rss (bytes, from the page tables), `present` ([addr, bytes,
        level] runs of mapped leaves) and `hwpoison` (addresses of hwpoison entries,
        as pagemap shows them).  ESRCH for an unknown pid."""
        return self._call("smaps", pid=pid)

    def kvm_stat(self) -> list[dict]:
        """KVM's per-VM stage-2 stats (debugfs kvm/<pid>-<fd>/pages_4k, pages_2m,
        pages_1g) for every VM, with `present`: the mapped [gpa, bytes, level] runs."""
        return self._call("kvm_stat")

    def dmesg(self) -> list[str]:
        return self._call("dmesg")

    def events(self, since: int = 0) -> list[dict]:
        return self._call("events", since=since)

    def status(self) -> dict:
        return self._call("status")

    def file_pages(self, ino: int, runs: bool = False) -> dict:
        """One memory file's pages (guest_memfd, shmem/memfd, hugetlbfs): {"ino",
        "kind", "name", "size", "flags", "npages", "vm", "pages"}, one record per
        page index in [0, i_size) (see docs/api.md).  `runs=True`: "runs" instead of
        "pages", consecutive pages with the same facts one page apart as one record
        with "count" (exact; what the wire carries).  OSError(ENOENT) for no such
        inode, OSError(EINVAL) for one that is not a memory file."""
        r = self._call("file_pages", ino=ino)
        if not runs:
            r["pages"] = expand_runs(r.pop("runs"))
        return r

    def tainted(self) -> int:
        """The kernel's taint mask, as /proc/sys/kernel/tainted (uapi.TAINT_* bits)."""
        return self._call("tainted")

    def policy(self) -> dict:
        return self._call("policy")

    def panicked(self) -> str | None:
        """None while the emulated kernel runs; the panic reason once it panicked
        (then only reads of the machine and close() are served)."""
        return self._call("panicked")

    def check_invariants(self) -> list[str]:
        """The emulated kernel's CONFIG_DEBUG_VM-style self-check: one line per broken
        invariant (frames conserved, HardwareCorrupted, HugeTLB pools, no mapping of a
        freed frame, mapcounts), empty when all hold."""
        return self._call("check_invariants")

    def close(self) -> None:
        """Stop a private supervisor (its owner only), then let go of the machine:
        this process's emulated thread on it is retired (an orderly shutdown for
        a private host, a clean exit for a connect()ed daemon) and its memory is
        unmapped from this process."""
        stopped = False
        if self.private_pid is not None and os.getpid() == self._owner_pid:
            try:
                self._call("shutdown")
            except (KernelGone, ConnectionRefusedError, FileNotFoundError):
                pass                        # it died or stopped already: reap it below
            try:
                os.waitpid(self.private_pid, 0)
            except ChildProcessError:
                pass
            self.private_pid = None
            stopped = True
        if self._ch is not None and self._ch_pid == os.getpid():
            self._ch.close()
        self._ch = None
        t = current.task
        if t is not None and t.host is self and t.alive:
            if stopped:
                t._retire(u.ESHUTDOWN, SHUTDOWN_MSG)
            else:
                t.exit()
        for key in self._segments:
            mm.release_core(key)
        self._segments.clear()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start(policy=None, ram=None, hugepages=None, config=None, sysctl=None,
          madvise_action_required=None) -> Host:
    """A private supervisor owned by this process; use as a context manager."""
    from .. import config as cfgmod
    from ..spawn import spawn_private

    try:
        cfg = cfgmod.build(file=config, ram=ram, hugepages=hugepages, policy=policy,
                           sysctl=sysctl, madvise_action_required=madvise_action_required)
    except cfgmod.ConfigError as e:
        raise ValueError(str(e)) from None
    if policy is not None and not isinstance(policy, str):
        raise ValueError("policy: pass a preset name or 'path/to/file.py:Class'")
    from ..kernel.policies import load

    load(cfg["kernel"]["policy"])              # a bad policy is a ValueError here, not at boot
    pid, path = spawn_private(cfg)
    h = Host(path, pid)
    h._owner_pid = os.getpid()
    return h


def connect(path: str | None = None) -> Host:
    """Attach to a running `emu daemon` (default: the per-user socket)."""
    h = Host(path or os.environ.get("EMU_SOCKET") or shm.default_socket())
    h._owner_pid = None
    h.ch  # noqa: B018  (connect now, so a missing daemon is reported here)
    return h

