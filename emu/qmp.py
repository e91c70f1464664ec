"""The control socket's wire protocol (QMP-like JSON lines): what a request line
must be before the kernel sees it, and the errors for one that is not."""
from __future__ import annotations

import json

from . import uapi as u

# The longest request line the supervisor buffers; a longer one is refused with
# EMSGSIZE and its connection closed.  The greeting tells clients (Task.pwrite
# splits its data to fit).
MAX_REQUEST = 1 << 20


class BadRequest(OSError):
    """A malformed request envelope: EINVAL, with the request id when it was readable."""

    def __init__(self, msg: str, rid=None):
        super().__init__(u.EINVAL, msg)
        self.rid = rid


def _no_constant(s: str):
    raise ValueError("%s is not JSON" % s)


def _finite_float(s: str) -> float:
    v = float(s)
    if v in (float("inf"), float("-inf")):
        raise ValueError("number out of range: %s" % s[:40])
    return v


_ENVELOPE = frozenset(("execute", "arguments", "id"))
# one decoder for every request: json.loads(s, **hooks) builds a new one per call
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def parse_request(line: bytes) -> tuple:
    """(id, command, arguments) of one request line, or BadRequest.  Strict JSON
    (no NaN/Infinity, UTF-8), an object with a string "execute" and an object
    (or absent/null) "arguments"; "id" is any JSON value, echoed back."""
    try:
        req = _DECODER.decode(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRequest("request: not UTF-8 (byte %d)" % e.start) from None
    except (ValueError, RecursionError) as e:           # JSONDecodeError, digits limit
        raise BadRequest("request: not valid JSON: %s" % str(e)[:200]) from None
    if not isinstance(req, dict):
        raise BadRequest("request: expected an object")
    rid = req.get("id")
    if not req.keys() <= _ENVELOPE:
        extra = req.keys() - _ENVELOPE
        raise BadRequest("request: unexpected member %r" % sorted(extra)[0][:64], rid)
    name = req.get("execute")
    if not isinstance(name, str):
        raise BadRequest("execute: expected a command name", rid)
    args = req.get("arguments")
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        raise BadRequest("arguments: expected an object", rid)
    return rid, name, args


def generic_error(rid, desc: str) -> dict:
    """A protocol-level error: the line was not a request."""
    return {"id": rid, "error": {"class": "GenericError", "errno": u.EINVAL, "desc": desc}}


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
