"""One file's pages as the machine holds them, for pictures (`emu show`).

A read-only walk over what the kernel already keeps: the page cache (inode.pages
/ inode.find), the frames (flags, folio head and order, latent errors), each
mapping's page tables through the core's pt_scan (present PTEs/PMDs and hwpoison
entries), and each VM's stage-2 tables.  Nothing is changed; nothing new is kept.

The answer is exact but compressed: consecutive pages whose facts differ only by
one page (pfn + 1, address + 4 KiB, gpa + 4 KiB) form one run.
"""
from __future__ import annotations

from .. import _core as C
from .. import uapi as u
from .mm import PAGE_SHIFT, PAGE_SIZE
from .page_alloc import PG_hwpoison

KINDS = {"kvm-gmem": "guest_memfd", "shmem": "shmem", "hugetlbfs": "hugetlbfs", "ext2": "ext2"}


def vm_name(vm) -> str:
    """KVM's debugfs directory name for a VM: "<pid of the creator>-<vm fd>"
    (kvm_create_vm_debugfs)."""
    fd = next((fd for fd, f in vm.proc.files.items() if f.inode is vm.inode), None)
    return "%d-%s" % (vm.proc.tgid, "?" if fd is None else fd)


def _private(k, inode, index: int):
    """The attribute a guest access to this page would fault with: guest_memfd's own
    shared/private state for a slot bound to a mmap-able guest_memfd (or an unbound
    file), the VM's KVM_MEMORY_ATTRIBUTE_PRIVATE otherwise.  None: not guest_memfd."""
    if not inode.ops.gmem:
        return None
    vm = inode.private.get("vm")
    if vm is not None and not inode.flags & u.GUEST_MEMFD_FLAG_MMAP:
        for s in vm.slots.values():
            if s.gmem is inode and s.gmem_off >> PAGE_SHIFT <= index < (s.gmem_off + s.size) >> PAGE_SHIFT:
                return (s.gpa >> PAGE_SHIFT) + index - (s.gmem_off >> PAGE_SHIFT) in vm.private_gfns
    return not inode.ops.is_shared(inode, index)


def file_pages(k, inode) -> dict:
    core = k.core
    npages = (inode.size + PAGE_SIZE - 1) >> PAGE_SHIFT
    raw_hwp = k.hugetlb.raw_hwp if k.hugetlb is not None else {}
    tracked = k.memory_failure.tracked        # failures a policy records before flagging
    host: dict[int, list] = {}
    s2: dict[int, list] = {}
    pfn_of: list = [None] * npages
    index_of: dict[int, int] = {}
    for i in range(npages):
        pfn = inode.find(core, i)
        if pfn is not None:
            pfn_of[i] = pfn
            index_of[pfn] = i
    owner = {id(p.mm): p for p in k.tasklist if p.mm is not None}
    for vma in inode.i_mmap:
        p = owner.get(id(vma.mm))
        if p is None:
            continue
        vend = vma.end
        for va, e, level in core.pt_scan(vma.mm.pgd, vma.start, vend):
            base = (e & C.PTE_PFN_MASK) >> PAGE_SHIFT
            kind = "hwpoison" if not e & C.PTE_PRESENT and e & C.PTE_HWPOISON else None
            if kind is None and not e & C.PTE_PRESENT:
                continue
            for j in range(1 << (9 * (level - 1))):
                a = va + (j << PAGE_SHIFT)
                if a < vma.start or a >= vend:
                    continue
                i = vma.pgoff + ((a - vma.start) >> PAGE_SHIFT)
                if not 0 <= i < npages:
                    continue
                if kind is None and pfn_of[i] != base + j:
                    continue                        # a private COW copy: not the file's page
                host.setdefault(i, []).append(
                    {"pid": p.tgid, "comm": p.comm, "addr": a, "level": level,
                     "entry": kind or "present"})
    if k.kvm is not None and index_of:
        for vm in k.kvm.vms:
            name = vm_name(vm)
            for s in sorted(vm.slots.values(), key=lambda s: s.gpa):
                for gpa, e, level in core.pt_scan(vm.s2_root, s.gpa, s.gpa + s.size):
                    if not e & C.PTE_PRESENT:
                        continue
                    base = (e & C.PTE_PFN_MASK) >> PAGE_SHIFT
                    for j in range(1 << (9 * (level - 1))):
                        i = index_of.get(base + j)
                        if i is not None:
                            s2.setdefault(i, []).append(
                                {"vm": name, "gpa": gpa + (j << PAGE_SHIFT), "level": level,
                                 "private": bool(e & C.PTE_S2_PRIVATE)})
    runs: list[dict] = []
    prev = None
    for i in range(npages):
        pfn = pfn_of[i]
        if pfn is None:
            rec = {"pfn": None, "head": None, "order": None, "hwpoison": False,
                   "folio_hwpoison": False, "latent": False, "tracked": False}
        else:
            head = core.head(pfn)
            fhw = bool(core.flags(head) & PG_hwpoison)
            order = core.order(head)
            if order and fhw:               # HugeTLB keeps the raw pages on raw_hwp
                hw = pfn in (raw_hwp.get(head) or {head})
            else:
                hw = bool(core.flags(pfn) & PG_hwpoison)
            rec = {"pfn": pfn, "head": head, "order": order, "hwpoison": hw,
                   "folio_hwpoison": fhw, "latent": bool(core.hwerr(pfn)),
                   "tracked": pfn in tracked}
        rec["private"] = _private(k, inode, i)
        rec["host"] = host.get(i, [])
        rec["stage2"] = s2.get(i, [])
        if prev is not None and _follows(prev, rec):
            prev["count"] += 1
            prev["_last"] = rec
            continue
        rec["index"] = i
        rec["count"] = 1
        rec["_last"] = rec
        runs.append(rec)
        prev = rec
    for r in runs:
        del r["_last"]
    return {"ino": inode.ino, "kind": KINDS.get(inode.ops.name, inode.ops.name),
            "name": inode.name, "size": inode.size, "flags": inode.flags, "npages": npages,
            "vm": vm_name(inode.private["vm"]) if inode.private.get("vm") is not None else None,
            "bindings": _bindings(inode), "runs": runs}


def _bindings(inode) -> list[dict]:
    """The memslots a guest_memfd is bound to: where its pages appear to the guest."""
    vm = inode.private.get("vm") if inode.ops.gmem else None
    if vm is None:
        return []
    return [{"vm": vm_name(vm), "slot": s.id, "gpa": s.gpa, "size": s.size, "offset": s.gmem_off}
            for s in sorted(vm.slots.values(), key=lambda s: s.gpa) if s.gmem is inode]


def _follows(run: dict, rec: dict) -> bool:
    """Is rec the page after run's last one, with the same facts one page on?"""
    last = run["_last"]
    if (last["pfn"] is None) != (rec["pfn"] is None):
        return False
    if rec["pfn"] is not None and (rec["pfn"] != last["pfn"] + 1 or (
            rec["head"] != last["head"] and not (rec["order"] == last["order"] == 0))):
        return False                       # order-0 pages are their own heads: those run on
    for key in ("order", "hwpoison", "folio_hwpoison", "latent", "tracked", "private"):
        if last[key] != rec[key]:
            return False
    if len(last["host"]) != len(rec["host"]) or len(last["stage2"]) != len(rec["stage2"]):
        return False
    for a, b in zip(last["host"], rec["host"], strict=True):
        if (a["pid"], a["level"], a["entry"], a["addr"] + PAGE_SIZE) != \
                (b["pid"], b["level"], b["entry"], b["addr"]):
            return False
    for a, b in zip(last["stage2"], rec["stage2"], strict=True):
        if (a["vm"], a["level"], a["private"], a["gpa"] + PAGE_SIZE) != \
                (b["vm"], b["level"], b["private"], b["gpa"]):
            return False
    return True

