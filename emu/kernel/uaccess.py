"""User-memory access by the kernel (arch/x86/lib/usercopy, mm/gup for faults).

The kernel reads a thread's memory through its page tables as the CPU does; what
differs from a user access is what a failure means:
- a page that is not present is faulted in, and a fault that would have sent a
  signal (no VMA, a hwpoison entry) fails the copy instead: the exception table
  fixup of the uaccess instruction, kernelmode_fixup_or_oops(), -EFAULT;
- a latent hardware error consumed by the copy is a machine check in the kernel
  whose source is a user address (is_copy_from_user()): recoverable, the copy
  stops short and kill_me_never runs memory_failure() on the way back to user.
"""
from __future__ import annotations

from .. import _core as C
from .mm import PAGE_SIZE

_STACK = ("copy_user_generic", "_copy_from_iter", "generic_perform_write", "vfs_write")


def copy_from_user(k, t, addr: int, n: int, stack: tuple[str, ...] | None = None) -> bytes:
    """The bytes of t's memory at [addr, addr + n), as far as they can be read: a
    short result means the copy stopped at a bad page (the caller returns what it
    did, or -EFAULT).  `stack`: the kernel path, for the #MC's call trace (default:
    write(2)'s, entered through the system call current is in)."""
    if stack is None:
        stack = _STACK + (k.syscall_entry(), "do_syscall_64")
    core, mm = k.core, t.process.mm
    out = bytearray()
    pos, end = addr, addr + n
    while pos < end:
        e, level = core.walk(mm.pgd, pos)
        if not e & C.PTE_PRESENT:
            if e & C.PTE_HWPOISON or k.mm.handle_mm_fault(t, pos, False, gup=True):
                break                              # the fixup: no signal, -EFAULT
            continue
        shift = 12 + 9 * (level - 1)
        pfn = ((e & C.PTE_PFN_MASK) >> 12) + ((pos >> 12) & ((1 << (shift - 12)) - 1))
        po = pos & (PAGE_SIZE - 1)
        if core.hwerr(pfn):
            k.mce.kernel_load(t, pfn, (pfn << 12) | po, True, stack)
            break
        chunk = min(PAGE_SIZE - po, end - pos)
        out += core.phys_read(pfn, po, chunk)
        pos += chunk
    return bytes(out)
