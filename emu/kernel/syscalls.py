"""The system-call table: what an emulated thread may ask of the kernel, and the
host-side controls (debugfs, /proc, sysctl).

Every entry validates its arguments the way Linux does and raises OSError(errno)
before changing anything.
"""
from __future__ import annotations

import base64

from .. import _core as C
from .. import uapi as u
from . import ext2, ipc_shm, mlock, read_write, sched, stat, sync
from .fs import MAX_LFS_FILESIZE, MAX_RW_COUNT
from .mm import PAGE_SHIFT, PAGE_SIZE, TASK_SIZE
from .shmem import memfd_create
from .sysargs import _int, _u64
from .uaccess import copy_from_user


# ------------------------------------------------------------------ worker syscalls
def sys_prctl(k, t, a):
    args = [_u64(a, "arg%d" % i, 0) for i in range(2, 6)]
    ret = sched.prctl(t, _int(a, "option"), *args)
    k.core.task_set(t.slot, "mce_flags", t.flags)
    return ret


def sys_memfd_create(k, t, a):
    name = a.get("name")
    if not isinstance(name, str):
        raise OSError(u.EFAULT, "name")
    return memfd_create(k, t.process, name, _u64(a, "flags", 0))


def sys_mmap(k, t, a):
    length = _u64(a, "length")
    flags = _u64(a, "flags")
    fd = _int(a, "fd", -1)
    f = None
    if not flags & u.MAP_ANONYMOUS:
        f = t.process.fget(fd)
    # calc_vm_prot_bits: bits other than READ/WRITE/EXEC do not reach the VMA
    prot = _u64(a, "prot") & (u.PROT_READ | u.PROT_WRITE | u.PROT_EXEC)
    addr = k.mm.mmap(t.process, _u64(a, "addr", 0), length, prot, flags, f, _int(a, "offset", 0))
    if flags & u.MAP_LOCKED:
        mlock.map_locked(k, t.process.mm, addr)
    if flags & (u.MAP_POPULATE | u.MAP_LOCKED):
        # populate_vma_page_range(): FOLL_WRITE for private writable mappings only
        # (break COW; a shared mapping is not dirtied for nothing)
        shared = flags & u.MAP_TYPE != u.MAP_PRIVATE
        k.mm.populate(t, addr, length, bool(prot & u.PROT_WRITE) and not shared)
    return addr


def sys_mlock(k, t, a):
    return mlock.sys_mlock(k, t, _u64(a, "addr"), _u64(a, "length"))


def sys_mlock2(k, t, a):
    return mlock.sys_mlock2(k, t, _u64(a, "addr"), _u64(a, "length"), _u64(a, "flags", 0))


def sys_munlock(k, t, a):
    return mlock.sys_munlock(k, t, _u64(a, "addr"), _u64(a, "length"))


def sys_munmap(k, t, a):
    k.mm.munmap(t.process, _u64(a, "addr"), _u64(a, "length"))
    return 0


def sys_madvise(k, t, a):
    addr, length, advice = _u64(a, "addr"), _u64(a, "length"), _int(a, "advice")
    if addr % PAGE_SIZE:
        raise OSError(u.EINVAL, "madvise: unaligned start")
    end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
    if end > TASK_SIZE:
        raise OSError(u.EINVAL, "madvise")
    mm = t.process.mm
    if advice in (u.MADV_DONTNEED, u.MADV_FREE, u.MADV_REMOVE):
        cursor = addr
        for vma in mm.overlapping(addr, end):
            if vma.start > cursor:
                raise OSError(u.ENOMEM, "madvise: unmapped range")
            if vma.locked:          # madvise_dontneed_free_valid_vma, madvise_remove
                raise OSError(u.EINVAL, "madvise: VM_LOCKED")
            k.mm.zap_range(mm, max(addr, vma.start), min(end, vma.end))
            cursor = vma.end
        if cursor < end:
            raise OSError(u.ENOMEM, "madvise: unmapped range")
        return 0
    if advice in (u.MADV_HWPOISON, u.MADV_SOFT_OFFLINE):
        return madvise_inject_error(k, t, addr, addr + length, advice)
    if advice in MADV_HINTS:
        cursor = addr
        for vma in mm.overlapping(addr, end):
            if vma.start > cursor:
                raise OSError(u.ENOMEM, "madvise: unmapped range")
            cursor = vma.end
        if cursor < end:
            raise OSError(u.ENOMEM, "madvise: unmapped range")
        return 0
    raise OSError(u.EINVAL, "madvise: advice not emulated")


# advice that only tunes reclaim, readahead, fork or dumps: accepted, nothing to model
MADV_HINTS = {u.MADV_NORMAL, 1, 2, 3, 10, 11, 14, 15, 16, 17, 20, 21}   # RANDOM .. PAGEOUT


def madvise_inject_error(k, t, start: int, end: int, advice: int) -> int:
    """mm/madvise.c: pin each page with GUP (faulting it in), then inject.  The step
    is the size of the folio just injected (page_size(compound_head(page)))."""
    from .. import _core as C

    mm = t.process.mm
    while start < end:
        e, level = k.core.walk(mm.pgd, start)
        if not e & C.PTE_PRESENT:
            # get_user_pages_fast(start, 1, 0, ...) faults the page in; a fault that
            # would signal fails GUP instead.  Without FOLL_HWPOISON, vm_fault_to_errno
            # turns VM_FAULT_HWPOISON into -EFAULT as well.
            if mm.find_vma(start) is None or e & C.PTE_HWPOISON:
                raise OSError(u.EFAULT, "madvise: get_user_pages_fast")
            if k.mm.handle_mm_fault(t, start, False, gup=True):
                raise OSError(u.EFAULT, "madvise: get_user_pages_fast")
            e, level = k.core.walk(mm.pgd, start)
        shift = 12 + 9 * (level - 1)
        pfn = ((e & C.PTE_PFN_MASK) >> 12) + ((start >> 12) & ((1 << (shift - 12)) - 1))
        head = k.core.head(pfn)
        size = PAGE_SIZE << k.core.order(head)
        if advice == u.MADV_SOFT_OFFLINE:
            k.log("Soft offlining pfn %#x at process virtual address %#x" % (pfn, start))
            ret = k.memory_failure.soft_offline_page(pfn)
        else:
            k.log("Injecting memory failure for pfn %#x at process virtual address %#x"
                  % (pfn, start))
            k.core.ref_add(head, 1)                 # MF_COUNT_INCREASED: GUP's reference
            flags = u.MF_COUNT_INCREASED | u.MF_SW_SIMULATED
            if k.madvise_action_required:
                flags |= u.MF_ACTION_REQUIRED
            try:
                ret = k.memory_failure.memory_failure(pfn, flags)
            except OSError:             # refused up front (a split out of page tables):
                k.mm.folio_put(head)    # GUP's reference was not taken over
                raise
            if ret == -u.EOPNOTSUPP:
                ret = 0
        if ret:
            raise OSError(-ret, "madvise")
        start += size           # not aligned: the same offset into the next huge page
    return 0


# host_status's name for each kind in the core's inode table (layout.h EMU_INODE_*)
INODE_KIND_NAME = {C.INODE_SHMEM: "shmem", C.INODE_GMEM: "guest_memfd",
                   C.INODE_HUGETLBFS: "hugetlbfs", C.INODE_KVM: "kvm", C.INODE_EXT2: "ext2"}



def sys_fallocate(k, t, a):
    f = t.process.fget(_int(a, "fd"))
    mode, off, length = _int(a, "mode"), _int(a, "offset"), _int(a, "length")
    if off < 0 or length <= 0:                          # vfs_fallocate, before any fs
        raise OSError(u.EINVAL, "fallocate: offset or length")
    if not f.writable:                                  # vfs_fallocate: !FMODE_WRITE
        raise OSError(u.EBADF, "fallocate: file not open for writing")
    if off + length > MAX_LFS_FILESIZE:
        raise OSError(u.EFBIG, "fallocate: beyond the maximum file size")
    f.inode.ops.fallocate(k, f.inode, mode, off, length)
    return 0


def sys_ftruncate(k, t, a):
    f = t.process.fget(_int(a, "fd"))
    length = _int(a, "length")
    if length < 0:
        raise OSError(u.EINVAL, "ftruncate: negative length")
    if length > MAX_LFS_FILESIZE:
        raise OSError(u.EFBIG, "ftruncate: beyond the maximum file size")
    if not f.writable:                                  # do_ftruncate: !FMODE_WRITE
        raise OSError(u.EINVAL, "ftruncate: file not open for writing")
    f.inode.ops.truncate(k, f.inode, length)
    return 0


def sys_close(k, t, a):
    fd = _int(a, "fd")
    f = t.process.fget(fd)
    del t.process.files[fd]
    f.put(k)
    return 0


def sys_pagemap(k, t, a):
    return k.mm.pagemap(t.process.mm, _u64(a, "addr"))


def sys_fault(k, t, a):
    k.mm.handle_mm_fault(t, _u64(a, "addr"), bool(a.get("write")))
    return 0


def sys_mce(k, t, a):
    """An emulated #MC raised by this thread's load (or instruction fetch, `fetch`)
    in user or guest mode: do_machine_check queues kill_me_maybe as task work on
    current, run before this call returns (exit_to_user_mode)."""
    pfn, addr = _u64(a, "pfn"), _u64(a, "addr")
    if pfn >= k.nframes:
        raise OSError(u.EINVAL, "mce: pfn beyond RAM")
    fetch = bool(a.get("fetch"))
    k.trace("mce", tid=t.tid, pfn=pfn, addr=addr, guest=bool(a.get("guest")), fetch=fetch)
    k.mce.user_access(t, pfn, (pfn << 12) | (addr & 0xFFF), fetch)
    return 0


def sys_open_kvm(k, t, a):
    return k.kvm.open_kvm(t.process)


def sys_create_vm(k, t, a):
    return k.kvm.create_vm(t.process, _int(a, "fd"), _int(a, "type", 0))


def sys_create_guest_memfd(k, t, a):
    return k.kvm.create_guest_memfd(t.process, _int(a, "vmfd"), _int(a, "size"),
                                    _u64(a, "flags", 0))


def sys_set_user_memory_region2(k, t, a):
    return k.kvm.set_user_memory_region2(
        t.process, _int(a, "vmfd"), _int(a, "slot"), _u64(a, "flags", 0), _u64(a, "guest_phys_addr"),
        _u64(a, "memory_size"), _u64(a, "userspace_addr", 0), _int(a, "guest_memfd", -1),
        _u64(a, "guest_memfd_offset", 0))


def sys_set_memory_attributes(k, t, a):
    return k.kvm.set_memory_attributes(t.process, _int(a, "vmfd"), _u64(a, "address"),
                                       _u64(a, "size"), _u64(a, "attributes"), _u64(a, "flags", 0))


def sys_gmem_convert(k, t, a):
    from .guest_memfd import GuestMemfdOps, kvm_gmem_convert

    f = t.process.fget(_int(a, "fd"))
    if not isinstance(f.inode.ops, GuestMemfdOps):
        raise OSError(u.EINVAL, "not a guest_memfd")
    kvm_gmem_convert(k, f.inode, _int(a, "offset"), _int(a, "size"), bool(a.get("private")))
    return 0


def sys_create_vcpu(k, t, a):
    return k.kvm.create_vcpu(t, _int(a, "vmfd"), _int(a, "id"))


def sys_gpa_to_pfn(k, t, a):
    return k.kvm.gpa_to_pfn(t.process, _int(a, "vmfd"), _u64(a, "gpa"))


def sys_kvm_fault(k, t, a):
    """A stage-2 fault taken while this vCPU thread ran guest code.  Resolves up to
    `gpas` pages (the ones the guest touches next, in order) in one request and
    stops at the first that exits."""
    vcpu = k.kvm.vcpu_of(t, _int(a, "vcpu"))
    gpas = a.get("gpas") or []
    if not isinstance(gpas, list) or not gpas:
        raise OSError(u.EINVAL, "gpas")
    write = bool(a.get("write"))
    private = a.get("private")
    if private is not None and not isinstance(private, bool):
        raise OSError(u.EINVAL, "private: expected true, false or null")
    if not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 1 << 52
               for g in gpas[:4096]):
        raise OSError(u.EINVAL, "gpas: guest physical addresses below 2**52")
    done = 0
    for gpa in gpas[:4096]:
        e, _ = k.core.walk(vcpu.vm.s2_root, gpa)
        if e & C.PTE_PRESENT and (not write or e & C.PTE_RW) and (
                private is None or bool(e & C.PTE_S2_PRIVATE) == bool(private)):
            done += 1
            continue
        ex = k.kvm.page_fault(t, vcpu.vm, gpa, write, private)
        if ex is not None:
            return {"exit": ex, "done": done}
        done += 1
    return {"exit": None, "done": done}


def sys_kvm_guest_read(k, t, a):
    """KVM reading guest memory for the vCPU this thread runs: `how` "emulate" (the
    instruction fetch of x86_emulate_instruction, a copy from user) or "map"
    (kvm_vcpu_map and a kernel load).  `cpl`: the guest's privilege level."""
    vcpu = k.kvm.vcpu_of(t, _int(a, "vcpu"))
    gpa, n, how = _u64(a, "gpa"), _int(a, "n"), a.get("how")
    if gpa >= 1 << 52:
        raise OSError(u.EINVAL, "gpa: beyond 2**52")
    if how == "emulate":
        cpl = _int(a, "cpl", 0)
        if cpl not in (0, 3):
            raise OSError(u.EINVAL, "cpl: 0 or 3")
        r = k.kvm.emulate_fetch(t, vcpu, gpa, n, cpl)
    elif how == "map":
        r = {"data": k.kvm.map_read(t, vcpu, gpa, n)}
    else:
        raise OSError(u.EINVAL, "how: \"emulate\" or \"map\"")
    if r.get("data") is not None:
        r["data"] = base64.b64encode(r["data"]).decode()
    return r


_VHOST_STACK = ("copy_user_generic", "_copy_from_iter", "copy_from_iter", "handle_tx_copy",
                "handle_tx", "handle_tx_kick", "vhost_run_work_list", "vhost_task_fn",
                "ret_from_fork")


def sys_vhost_copy(k, t, a):
    """A vhost worker of this process (a vhost_task: a thread of the owner's group,
    on its mm) copying a guest buffer at the VMM address `addr` with
    copy_from_iter(): a copy from user.  A short copy is a failed descriptor
    (vq_err): -EFAULT."""
    addr, n = _u64(a, "addr"), _int(a, "n")
    if n < 0 or n > MAX_RW_COUNT:
        raise OSError(u.EINVAL, "vhost_copy: length")
    data = copy_from_user(k, t, addr, n, _VHOST_STACK)
    if len(data) < n:
        raise OSError(u.EFAULT, "vhost_copy: fault copying the guest buffer")
    return base64.b64encode(data).decode()


def sys_setup_mce(k, t, a):
    return k.kvm.setup_mce(t, _int(a, "vcpu"), _u64(a, "mcg_cap"))


def sys_set_mce(k, t, a):
    return k.kvm.set_mce(t, _int(a, "vcpu"), _u64(a, "status"), _u64(a, "addr", 0),
                         _u64(a, "misc", 0), _u64(a, "mcg_status", 0), _u64(a, "bank"))


def sys_guest_state(k, t, a):
    cr4_mce = a.get("cr4_mce")
    if cr4_mce is not None and not isinstance(cr4_mce, (bool, int)):
        raise OSError(u.EINVAL, "cr4_mce: expected true or false")
    mcg_status = None if a.get("mcg_status") is None else _u64(a, "mcg_status")
    clear_bank = None if a.get("clear_bank") is None else _int(a, "clear_bank")
    ctl2 = a.get("mci_ctl2")
    if ctl2 is not None:
        if not isinstance(ctl2, (list, tuple)) or len(ctl2) != 2:
            raise OSError(u.EINVAL, "mci_ctl2: expected [bank, value]")
        ctl2 = (_int({"b": ctl2[0]}, "b"), _u64({"v": ctl2[1]}, "v"))
    return k.kvm.guest_state(t, _int(a, "vcpu"), cr4_mce, mcg_status, clear_bank, ctl2)


def sys_check_extension(k, t, a):
    return k.kvm.check_extension(t, _int(a, "fd"), _int(a, "cap"))


def sys_get_mce_cap_supported(k, t, a):
    f = t.process.fget(_int(a, "fd"))
    if f.inode.ops.name != "kvm":                 # a /dev/kvm ioctl only
        raise OSError(u.ENOTTY, "not /dev/kvm")
    return k.kvm.get_mce_cap_supported()


def sys_getpid(k, t, a):
    return t.tgid


SYSCALLS = {
    "prctl": sys_prctl, "memfd_create": sys_memfd_create, "mmap": sys_mmap,
    "munmap": sys_munmap, "madvise": sys_madvise,
    "fallocate": sys_fallocate, "ftruncate": sys_ftruncate, "close": sys_close,
    "pagemap": sys_pagemap, "fault": sys_fault, "mce": sys_mce, "open_kvm": sys_open_kvm,
    "create_vm": sys_create_vm, "create_guest_memfd": sys_create_guest_memfd,
    "getpid": sys_getpid, "set_user_memory_region2": sys_set_user_memory_region2,
    "set_memory_attributes": sys_set_memory_attributes, "gmem_convert": sys_gmem_convert,
    "create_vcpu": sys_create_vcpu, "gpa_to_pfn": sys_gpa_to_pfn, "kvm_fault": sys_kvm_fault,
    "kvm_guest_read": sys_kvm_guest_read, "vhost_copy": sys_vhost_copy,
    "setup_mce": sys_setup_mce, "set_mce": sys_set_mce, "guest_state": sys_guest_state,
    "check_extension": sys_check_extension, "get_mce_cap_supported": sys_get_mce_cap_supported,
    "mlock": sys_mlock, "mlock2": sys_mlock2, "munlock": sys_munlock,
}
SYSCALLS.update(read_write.SYSCALLS | ext2.SYSCALLS | sync.SYSCALLS | stat.SYSCALLS
                | ipc_shm.SYSCALLS)


# ------------------------------------------------------------------ host controls
def _pfn(k, a):
    """A pfn written to a debugfs u64 attribute: simple_attr_write's kstrtoull
    refuses a value past 64 bits with -ERANGE before the handler sees it."""
    pfn = a.get("pfn")
    if isinstance(pfn, int) and not isinstance(pfn, bool) and pfn >= 1 << 64:
        raise OSError(u.ERANGE, "pfn: out of range for a u64")
    return _int(a, "pfn")


def host_sysctl(k, a):
    name = a.get("name")
    if not isinstance(name, str):
        raise OSError(u.EINVAL, "name")
    if "value" in a and a["value"] is not None:
        k.set_sysctl(name, a["value"])
    if name not in k.sysctl:
        raise OSError(u.ENOENT, "no such sysctl: %s" % name)
    return k.sysctl[name]


def host_corrupt_pfn(k, a):
    return k.memory_failure.hwpoison_inject(_pfn(k, a))


def host_unpoison_pfn(k, a):
    return k.memory_failure.unpoison_memory(_pfn(k, a))


def host_soft_offline_page(k, a):
    """/sys/devices/system/memory/soft_offline_page (soft_offline_page_store): a
    physical address; kstrtoull() failing is -EINVAL."""
    return k.memory_failure.soft_offline_page(_u64(a, "addr") >> 12)


def host_hw_poison(k, a):
    """A latent uncorrected error in pfn.  `addr_lsb`: the address granularity the
    memory controller will report for it (MCi_MISC[5:0], 0 = the byte): above
    PAGE_SHIFT the address is not usable (mce_usable_address()).  Kept in hwerr as
    addr_lsb + 1, so that any non-zero byte is an error for the CPU."""
    pfn = _pfn(k, a)
    lsb = _int(a, "addr_lsb", 0)
    if not 0 <= lsb <= 63:
        raise OSError(u.EINVAL, "addr_lsb: 0..63 (MCi_MISC[5:0])")
    if pfn < 0 or pfn >= k.nframes:
        return -u.ENXIO
    k.core.set_hwerr(pfn, lsb + 1)
    k.trace("hw_poison", pfn=pfn, addr_lsb=lsb)
    return 0


def host_hw_detect(k, a):
    pfn = _pfn(k, a)
    if pfn < 0 or pfn >= k.nframes:
        return -u.ENXIO
    k.core.set_hwerr(pfn, 1)
    k.trace("hw_detect", pfn=pfn)
    return k.memory_failure.memory_failure_queue(pfn)


def host_meminfo(k, a):
    return k.meminfo()


def host_mf_stats(k, a):
    return dict(k.memory_failure.stats)


def host_kpageflags(k, a):
    """pread(/proc/kpageflags, count * 8, pfn * 8): one entry, or a list of up to
    `count` (shorter at max_pfn, as the read stops at the end of the file)."""
    pfn = _int(a, "pfn")
    if a.get("count") is None:
        return k.kpageflags(pfn)
    count = _int(a, "count")
    if count < 0 or count > k.nframes:
        raise OSError(u.EINVAL, "count")
    k.kpageflags(pfn)                                  # the file position's own checks
    return [k.kpageflags(p) for p in range(pfn, min(pfn + count, k.nframes))]


def host_dmesg(k, a):
    return k.dmesg()


def host_events(k, a):
    return k.trace_events(_int(a, "since", 0))


def host_status(k, a):
    procs = []
    for p in k.tasklist:
        procs.append({
            "tgid": p.tgid, "comm": p.comm, "vmas": len(p.mm.vmas), "fds": len(p.files),
            "maps": [{"start": s, "end": e, "prot": pr, "shared": sh, "ino": ino, "pgoff": off}
                     for _mm, s, e, pr, sh, ino, off in k.core.vmas(p.mm.slot)],
            "threads": [{"tid": t.tid, "comm": t.comm, "slot": t.slot,
                         "mce_kill": {0: "LATE", 1: "EARLY", 2: "DEFAULT"}[t.mce_policy()]}
                        for t in p.threads if t.alive],
        })
    mi = k.meminfo()
    files = [{"ino": ino, "kind": INODE_KIND_NAME.get(kind),
              "size": size, "flags": flags, "nrpages": nr, "name": name}
             for _s, ino, kind, size, flags, nr, _nl, name in k.core.inodes()]
    return {"policy": k.policy.name, "sysctl": dict(k.sysctl), "meminfo": mi, "files": files,
            "mf_stats": dict(k.memory_failure.stats), "processes": procs,
            "inodes": len(k.inodes), "pt_pages": k.core.pt_used,
            "madvise_action_required": k.madvise_action_required,
            "tainted": k.tainted, "taint": k.print_tainted(), "limits": k.limits(),
            "panic": k.panicked}


def _leaf_ranges(core, root: int, start: int, end: int) -> tuple[list, list]:
    """Present leaves in [start, end) of one page-table tree, coalesced into
    [addr, bytes, level] runs, and the hwpoison entries' addresses."""
    runs, poisoned = [], []
    for va, e, level in core.pt_scan(root, start, end):
        if e & C.PTE_HWPOISON and not e & C.PTE_PRESENT:
            poisoned.append(va)
            continue
        if not e & C.PTE_PRESENT:
            continue
        size = PAGE_SIZE << (9 * (level - 1))
        if runs and runs[-1][0] + runs[-1][1] == va and runs[-1][2] == level:
            runs[-1][1] += size
        else:
            runs.append([va, size, level])
    return runs, poisoned


def host_smaps(k, a):
    """/proc/PID/smaps, one record per VMA (fs/proc/task_mmu.c show_smap): Rss
    counted from the page tables, plus what pagemap would show (the present runs
    and the hwpoison swap entries), so that callers can count what was unmapped."""
    pid = _int(a, "pid")
    proc = next((p for p in k.tasklist if p.tgid == pid), None)
    if proc is None:
        raise OSError(u.ESRCH, "no such process: %d" % pid)
    out = []
    for _mm, s, e, prot, shared, ino, pgoff in k.core.vmas(proc.mm.slot):
        runs, poisoned = _leaf_ranges(k.core, proc.mm.pgd, s, e)
        rss = sum(r[1] for r in runs)
        out.append({"start": s, "end": e, "prot": prot, "shared": shared, "ino": ino,
                    "pgoff": pgoff, "Rss": rss, "present": runs, "hwpoison": poisoned,
                    "Locked": rss if proc.mm.find_vma(s).locked else 0})
    return out


def host_kvm_stat(k, a):
    """Per VM, KVM's x86 stats pages_4k/pages_2m/pages_1g (arch/x86/kvm/x86.c
    kvm_vm_stats_desc), named as debugfs names the VM's directory ("<pid>-<fd>"),
    with the stage-2 runs behind them."""
    out = []
    for vm in k.kvm.vms:
        fd = next((fd for fd, f in vm.proc.files.items() if f.inode is vm.inode), None)
        runs, _ = _leaf_ranges(k.core, vm.s2_root, 0, 1 << 48)
        pages = {1: 0, 2: 0, 3: 0}
        for _gpa, size, level in runs:
            pages[level] += size >> (PAGE_SHIFT + 9 * (level - 1))
        out.append({"name": "%d-%s" % (vm.proc.tgid, fd), "pid": vm.proc.tgid, "fd": fd,
                    "pages_4k": pages[1], "pages_2m": pages[2], "pages_1g": pages[3],
                    "present": runs})
    return out


def host_file_pages(k, a):
    """One file's pages: page cache, folios, poison, host and stage-2 mappers
    (emu.kernel.file_pages).  An ino that names no inode is -ENOENT; one that is
    no memory file (/dev/kvm, a VM) is -EINVAL."""
    from .file_pages import KINDS, file_pages

    ino = _int(a, "ino")
    inode = k.inodes.get(ino)
    if inode is None:
        raise OSError(u.ENOENT, "no inode %d" % ino)
    if inode.ops.name not in KINDS:
        raise OSError(u.EINVAL, "inode %d is %s, not a memory file" % (ino, inode.ops.name))
    return file_pages(k, inode)


def host_tainted(k, a):
    return k.tainted


def host_check_invariants(k, a):
    from .debug_vm import check_invariants

    return check_invariants(k)


def host_policy(k, a):
    return {"name": k.policy.name, "decisions": k.policy.describe()}


def host_panicked(k, a):
    """None while the kernel runs; the reason panic() was called with after."""
    return k.panicked


HOSTCALLS = {
    "sysctl": host_sysctl, "corrupt_pfn": host_corrupt_pfn, "unpoison_pfn": host_unpoison_pfn,
    "soft_offline_page": host_soft_offline_page,
    "hw_poison": host_hw_poison, "hw_detect": host_hw_detect, "meminfo": host_meminfo,
    "mf_stats": host_mf_stats, "kpageflags": host_kpageflags, "dmesg": host_dmesg,
    "events": host_events, "status": host_status, "policy": host_policy,
    "check_invariants": host_check_invariants, "tainted": host_tainted,
    "panicked": host_panicked, "smaps": host_smaps, "kvm_stat": host_kvm_stat,
    "file_pages": host_file_pages,
}
HOSTCALLS.update(ipc_shm.HOSTCALLS)

# What the host may still do once the kernel has panicked: read the machine, as one
# reads a crash dump (a sysctl without a new value), and stop it.  The rest is
# refused with KernelPanic; "exit" is answered without touching the frozen tables.
HOST_READS = frozenset({"meminfo", "mf_stats", "kpageflags", "dmesg", "events", "status",
                        "policy", "tainted", "check_invariants", "panicked", "smaps",
                        "kvm_stat", "file_pages", "sysvipc_shm"})
LIFECYCLE = frozenset({"shutdown", "segments", "reap"})


def after_panic_ok(name: str, args: dict) -> bool:
    """May this request run on a panicked kernel?"""
    if name == "sysctl":
        return args.get("value") is None
    return name in HOST_READS or name in LIFECYCLE
