"""A system call's arguments as the kernel sees them: 64-bit registers.  Bad ones are
EINVAL before anything changes.  Every system-call module parses with these."""
from __future__ import annotations

from .. import uapi as u


def _int(a: dict, key: str, default=None) -> int:
    """A system-call argument: a 64-bit register, signed or unsigned."""
    v = a.get(key, default)
    if v is None or isinstance(v, bool) or not isinstance(v, int):
        raise OSError(u.EINVAL, "%s: expected an integer" % key)
    if not -(1 << 63) <= v < 1 << 64:
        raise OSError(u.EINVAL, "%s: does not fit in 64 bits" % key)
    return v


def _u64(a: dict, key: str, default=None) -> int:
    v = _int(a, key, default)
    if v < 0 or v >= 1 << 64:
        raise OSError(u.EINVAL, "%s: out of range" % key)
    return v
