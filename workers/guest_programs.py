"""The guest programs the VMM workers run on their vCPUs (emu.guest generators)."""
from __future__ import annotations

from emu.guest import GuestTaskKilled


def access(g, gpa: int, n: int, private, data: bytes | None = None):
    """One guest user task loading n bytes at gpa (or storing data); the guest
    kernel may kill it.  The ucall carries the value, or ("killed", addr)."""
    try:
        if data is None:
            v = yield g.read(gpa, n, private)
        else:
            yield g.write(gpa, data, private)
            v = len(data)
        yield g.sync(v)
    except GuestTaskKilled as e:
        yield g.sync("killed", e.args[0])


def boot(g, mce: bool = True):
    """The guest kernel comes up, with CR4.MCE set unless told otherwise."""
    if mce:
        yield g.set_cr4_mce(True)
    yield g.sync("booted")


def mce_handler_reporting(gk, ev):
    """A guest #MC handler that reports the event over an I/O port (a ucall: the
    vCPU exits to the VMM) before it finishes: until it returns, MCG_STATUS.MCIP is
    still set, so what the guest does next happens inside the handler."""
    gk.log.append("mce: reporting machine check at %#x before returning" % ev["addr"])

    def body(g, ev):
        yield g.sync("in #MC handler")
        return "recovered"
    return body
