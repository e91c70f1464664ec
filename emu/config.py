"""Supervisor configuration: an embedded default, overridden by a TOML file, then flags."""
from __future__ import annotations

import copy
import re
import tomllib

DEFAULT_TOML = """
# gmem-emu supervisor defaults
[memory]
ram = "512M"                 # emulated physical memory (frames of 4 KiB)

[hugepages]                  # HugeTLB pools reserved at boot
"2M" = 0
"1G" = 0

[kernel]
policy = "mf-delayed-fix"    # v6.18 | mf-delayed-fix | path/to/file.py:Class
madvise_action_required = true   # MADV_HWPOISON passes MF_ACTION_REQUIRED (Linux >= 6.11)

[sysctl]
"vm.memory_failure_early_kill" = 0
"vm.memory_failure_recovery" = 1
"vm.enable_soft_offline" = 1
"vm.panic_on_unrecoverable_memory_failure" = 0

[supervisor]
halt_poll_ns = 200000        # after a request, poll this long for the next before sleeping
                             # (KVM's halt_poll_ns); a thread in a system call spins as long
                             # for its reply; both only while no other task waits for a
                             # CPU; 0: always sleep
shutdown_grace_ms = 5000     # emu stop: attached processes get ESHUTDOWN (and a doorbell);
                             # one still attached after this long is SIGKILLed

[limits]                     # core tables, sized at boot; past one: ENOMEM (EAGAIN for
                             # tasks, as fork past max_threads), before anything changes
tasks = 1024                 # emulated threads (~0.8 KiB of shm each; each is an OS process)
mms = 512                    # emulated processes (each also reserves 4 page-table pages)
events = 65536               # trace events kept for host.events() / emu trace (oldest go)
inodes = 4096                # files (memfd, guest_memfd, KVM fds, ...): ENFILE past it
vmas = 16384                 # mappings, all processes together (48 bytes each)
page_tables = 0              # page-table pages (4 KiB each; host and stage-2 tables);
                             # 0: enough to map all RAM at 4K plus 4 per process
"""

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.I)
_MUL = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(ValueError):
    """A one-line error naming the field."""


def parse_size(field: str, v) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str) and _SIZE.match(v):
        m = _SIZE.match(v)
        n = int(m.group(1)) * _MUL[m.group(2).upper()]
    else:
        raise ConfigError("%s: expected a size like 512M, got %r" % (field, v))
    if n <= 0:
        raise ConfigError("%s: must be positive" % field)
    return n


def default() -> dict:
    return tomllib.loads(DEFAULT_TOML)


def load_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError("config: cannot read %s: %s" % (path, e.strerror)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config: %s: %s" % (path, e)) from None
    except UnicodeDecodeError as e:
        raise ConfigError("config: %s: not UTF-8 text (byte %d)" % (path, e.start)) from None


def merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, val in over.items():
        name = "%s.%s" % (where, key) if where else key
        if key not in out:
            raise ConfigError("%s: unknown setting" % name)
        if isinstance(out[key], dict):
            if not isinstance(val, dict):
                raise ConfigError("%s: expected a table" % name)
            out[key] = merge(out[key], val, name)
        else:
            out[key] = val
    return out


def build(file: str | None = None, ram=None, hugepages=None, policy=None, sysctl=None,
          madvise_action_required=None) -> dict:
    """The effective configuration, validated; raises ConfigError."""
    import os

    cfg = default()
    if file is not None and not isinstance(file, (str, bytes, os.PathLike)):
        raise ConfigError("config: expected a path, got %s" % type(file).__name__)
    if file:
        cfg = merge(cfg, load_file(file))
    if ram is not None:
        cfg["memory"]["ram"] = ram
    if hugepages:
        if not isinstance(hugepages, dict):
            raise ConfigError("hugepages: expected a mapping like {'2M': 64}")
        for key, val in hugepages.items():
            if key not in cfg["hugepages"]:
                raise ConfigError("hugepages.%s: unknown page size (2M or 1G)" % key)
            cfg["hugepages"][key] = val
    if policy is not None:
        cfg["kernel"]["policy"] = policy
    if madvise_action_required is not None:
        cfg["kernel"]["madvise_action_required"] = madvise_action_required
    if sysctl and not isinstance(sysctl, dict):
        raise ConfigError("sysctl: expected a mapping like {'vm.memory_failure_early_kill': 1}")
    for key, val in (sysctl or {}).items():
        if key not in cfg["sysctl"]:
            raise ConfigError("sysctl.%s: unknown sysctl" % key)
        cfg["sysctl"][key] = val
    return validate(cfg)


def validate(cfg: dict) -> dict:
    ram = parse_size("memory.ram", cfg["memory"]["ram"])
    if ram % 4096 or ram < (4 << 20):
        raise ConfigError("memory.ram: must be a multiple of 4K and at least 4M")
    if ram > (4 << 40):
        raise ConfigError("memory.ram: at most 4T")
    cfg["memory"]["ram_bytes"] = ram
    for key, val in cfg["hugepages"].items():
        if not isinstance(val, int) or isinstance(val, bool) or val < 0:
            raise ConfigError("hugepages.%s: expected a count >= 0" % key)
    if not isinstance(cfg["kernel"]["madvise_action_required"], bool):
        raise ConfigError("kernel.madvise_action_required: expected true or false")
    pol = cfg["kernel"]["policy"]
    if not isinstance(pol, str) and not isinstance(pol, type):
        raise ConfigError("kernel.policy: expected a preset name or path.py:Class")
    from .kernel import SYSCTL_RANGE

    for key, val in cfg["sysctl"].items():
        lo, hi = SYSCTL_RANGE.get(key, (-(1 << 63), (1 << 63) - 1))
        if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
            raise ConfigError("sysctl.%s: expected an integer %d..%d" % (key, lo, hi))
    poll = cfg["supervisor"]["halt_poll_ns"]
    if not isinstance(poll, int) or isinstance(poll, bool) or not 0 <= poll <= 10_000_000:
        raise ConfigError("supervisor.halt_poll_ns: expected an integer 0..10000000")
    grace = cfg["supervisor"]["shutdown_grace_ms"]
    if not isinstance(grace, int) or isinstance(grace, bool) or not 0 <= grace <= 3_600_000:
        raise ConfigError("supervisor.shutdown_grace_ms: expected an integer 0..3600000")
    for key in ("tasks", "mms", "events", "inodes", "vmas"):
        val = cfg["limits"][key]
        if not isinstance(val, int) or isinstance(val, bool) or not 1 <= val <= 1 << 20:
            raise ConfigError("limits.%s: expected an integer 1..1048576" % key)
    val = cfg["limits"]["page_tables"]
    if not isinstance(val, int) or isinstance(val, bool) or not (val == 0 or 16 <= val <= 1 << 24):
        raise ConfigError("limits.page_tables: expected 0 (automatic) or an integer 16..16777216")
    return cfg
