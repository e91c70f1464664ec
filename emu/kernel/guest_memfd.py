"""guest_memfd (virt/kvm/guest_memfd.c): KVM's own file for guest memory.

Folios sit on the unevictable LRU; with GUEST_MEMFD_FLAG_MMAP the host may map
the shared ones.  On memory failure the file's error_remove_folio zaps KVM's
mappings of the whole folio and keeps it ("userspace's decision"): MF_DELAYED.
"""
from __future__ import annotations

from .. import uapi as u
from .fs import File, FileOps, Inode, filemap_add_folio, truncate_inode_pages_range
from .hugetlb import hstate_name
from .mm import PAGE_SHIFT, PAGE_SIZE, VM_FAULT_OK, VM_FAULT_SIGBUS
from .page_alloc import PG_hwpoison, PG_lru, PG_unevictable, PG_uptodate


class GuestMemfdOps(FileOps):
    name = "kvm-gmem"
    gmem = True
    # kvm_gmem_fops (6.18): mmap, open, release, fallocate only; the kvm_guest_memory
    # pseudo file system; alloc_anon_secure_inode's 0600, plus S_IFREG
    llseek = None
    statfs_magic = u.GUEST_MEMFD_MAGIC
    st_mode = u.S_IFREG | 0o600

    # ---- helpers ----
    @staticmethod
    def is_shared(inode: Inode, index: int) -> bool:
        """Host-faultable?  A file starts all shared (INIT_SHARED) or all private;
        in-place conversion then keeps a per-page private set."""
        if not inode.private.get("converted"):
            return bool(inode.flags & u.GUEST_MEMFD_FLAG_INIT_SHARED)
        return index not in inode.private["private_idx"]

    def get_folio(self, k, inode: Inode, index: int) -> int:
        """kvm_gmem_get_folio: find or allocate (zeroed: 'prepared').  The mapping is
        unevictable (mapping_set_inaccessible), so the folio joins the unevictable LRU;
        it is not swap-backed (only shmem sets PG_swapbacked)."""
        pfn = inode.pages.get(index)
        if pfn is None:
            pfn = filemap_add_folio(k, inode, index, 0, PG_lru | PG_unevictable | PG_uptodate)
        return pfn

    def get_pfn(self, k, inode: Inode, index: int) -> int:
        """__kvm_gmem_get_pfn: -EHWPOISON for a poisoned folio (or, under a policy
        that makes a failed guest_memfd unusable, for every index of the file)."""
        if inode.private.get("failed"):
            raise OSError(u.EHWPOISON, "guest_memfd is unusable after a memory failure")
        pfn = self.get_folio(k, inode, index)
        if k.policy.faults_check and k.core.flags(k.core.head(pfn)) & PG_hwpoison:
            raise OSError(u.EHWPOISON, "guest_memfd page is poisoned")
        return pfn

    # ---- file operations ----
    def mmap_check(self, k, file: File, shared: bool, prot: int) -> None:
        if not file.inode.flags & u.GUEST_MEMFD_FLAG_MMAP:
            raise OSError(u.ENODEV, "guest_memfd without GUEST_MEMFD_FLAG_MMAP")
        if not shared:
            raise OSError(u.EINVAL, "guest_memfd needs MAP_SHARED")

    def map_ok(self, inode: Inode, index: int) -> bool:
        return self.is_shared(inode, index)

    def fault(self, k, inode: Inode, index: int):
        """kvm_gmem_fault_user_mapping."""
        if index << PAGE_SHIFT >= inode.size:
            return VM_FAULT_SIGBUS, 0
        if not self.is_shared(inode, index):
            return VM_FAULT_SIGBUS, 0
        pfn = self.get_folio(k, inode, index)
        if inode.private.get("failed") and not k.core.flags(k.core.head(pfn)) & PG_hwpoison:
            return VM_FAULT_SIGBUS, 0                 # the whole file is unusable
        return VM_FAULT_OK, pfn

    def fallocate(self, k, inode: Inode, mode: int, off: int, length: int) -> None:
        if not mode & u.FALLOC_FL_KEEP_SIZE:
            raise OSError(u.EOPNOTSUPP, "fallocate")
        if mode & ~(u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE):
            raise OSError(u.EOPNOTSUPP, "fallocate")
        if off % PAGE_SIZE or length % PAGE_SIZE:
            raise OSError(u.EINVAL, "fallocate")
        start, end = off >> PAGE_SHIFT, (off + length) >> PAGE_SHIFT
        if mode & u.FALLOC_FL_PUNCH_HOLE:
            self.invalidate(k, inode, start, end)
            truncate_inode_pages_range(k, inode, start, end, even_cows=False)
            return
        if off + length > inode.size:
            raise OSError(u.EINVAL, "fallocate beyond the guest_memfd size")
        for index in range(start, end):
            self.get_folio(k, inode, index)

    def invalidate(self, k, inode: Inode, start: int, end: int) -> None:
        """kvm_gmem_invalidate_begin/end: zap stage-2 in every bound slot."""
        if k.kvm is not None:
            k.kvm.gmem_invalidate(inode, start, end)

    def error_remove_folio(self, k, inode: Inode, head: int) -> int:
        """kvm_gmem_error_folio: zap stage-2 (the folio, or as the policy says) and
        keep the folio; MF_DELAYED."""
        core = k.core
        start, nr = core.index(head), 1 << core.order(head)
        scope = k.policy.stage2_unmap
        if scope == "file":
            self.invalidate(k, inode, 0, (inode.size + PAGE_SIZE - 1) >> PAGE_SHIFT)
        elif scope == "folio":                    # the folio as the failure found it
            split = k.memory_failure.split_from
            if split is not None:
                start, nr = core.index(split[0]), split[1]
            self.invalidate(k, inode, start, start + nr)
        elif scope == "page" and k.kvm is not None:   # the failed pages (HugeTLB: raw_hwp)
            raw = k.hugetlb.raw_hwp.get(head, {head}) if nr > 1 else {head}
            for pfn in sorted(raw):
                k.kvm.gmem_zap_page(inode, start + pfn - head)
        after = k.policy.gmem_after_failure
        if after == "unusable":
            inode.private["failed"] = True
            k.trace("gmem_unusable", ino=inode.ino)
        elif after == "no_conversions":
            inode.private["no_conversions"] = True
        return u.MF_DELAYED


class GuestMemfdHugeOps(GuestMemfdOps):
    """guest_memfd backed by HugeTLB (the HugeTLB guest_memfd series): folios come
    from the HugeTLB pool and are mapped whole in the host and in stage-2 while
    the huge range is uniformly shared (resp. private)."""

    name = "kvm-gmem"
    huge = True

    def shift(self, inode: Inode) -> int:
        return 12 + inode.private["hstate"].order

    def get_folio(self, k, inode: Inode, index: int) -> int:
        """A folio allocated over a range that conversions already made mixed is
        split at once, as a conversion that cuts a present folio splits it: no huge
        mapping may cover a private page."""
        nr = 1 << inode.private["hstate"].order
        fresh = inode.find(k.core, index) is None
        head = k.hugetlb.get_folio(inode, index, extra_flags=0)
        if head is None:
            raise OSError(u.ENOMEM, "HugeTLB pool exhausted")
        if fresh and self.mixed(inode, index) and k.hugetlb.split_group_of(head) is None:
            k.hugetlb.split_gmem_folio(head, why="conversion")
        return head + index % nr

    @staticmethod
    def mixed(inode: Inode, index: int) -> bool:
        """Does the huge page around index hold both shared and private pages?"""
        if not inode.private.get("converted"):
            return False
        nr = 1 << inode.private["hstate"].order
        base, priv = index - index % nr, inode.private["private_idx"]
        return len({i in priv for i in range(base, base + nr)}) > 1

    def reserve(self, k, inode: Inode, offset: int, length: int) -> None:
        """guest_memfd allocates its huge folios on demand; a host mmap reserves nothing."""

    def remove_folio(self, k, inode: Inode, head: int) -> None:
        """Truncation.  Under a policy that returns poisoned folios to HugeTLB,
        memory_failure's pin goes with guest_memfd's reference, so HugeTLB gets the
        folio (or, after a split, the page for the merge) with its flag."""
        from .fs import filemap_remove_folio

        poisoned = bool(k.core.flags(head) & PG_hwpoison)
        filemap_remove_folio(k, inode, head)
        if poisoned and k.policy.return_poisoned_to_hugetlb and k.core.refcount(head) == 1 \
                and not k.mm.folio_mapped(head):
            k.trace("gmem_release_poisoned", pfn=head)
            k.mm.folio_put(head)

    def huge_get_folio(self, k, inode: Inode, index: int) -> int | None:
        try:
            return k.core.head(self.get_folio(k, inode, index))
        except OSError:
            return None

    def huge_fault(self, k, task, vma, va: int, write: bool) -> int:
        from .mm import VM_FAULT_SIGBUS

        index = vma.pgoff + ((va - vma.start) >> PAGE_SHIFT)
        if not self.is_shared(vma.inode, index):
            return VM_FAULT_SIGBUS
        if vma.inode.private.get("failed"):
            head = vma.inode.find(k.core, index)
            if head is None or not k.core.flags(k.core.head(head)) & PG_hwpoison:
                return VM_FAULT_SIGBUS                 # the whole file is unusable
        pfn = vma.inode.find(k.core, index)
        if pfn is None and self.mixed(vma.inode, index):
            pfn = self.get_folio(k, vma.inode, index)   # allocated split
        if pfn is not None and k.hugetlb.split_group_of(pfn) is not None:
            # a split folio is mapped page by page
            from .mm import VM_FAULT_HWPOISON, VM_FAULT_OK

            if k.core.flags(pfn) & PG_hwpoison and k.policy.faults_check:
                return VM_FAULT_HWPOISON
            k.mm.set_pte(vma.mm, va & ~(PAGE_SIZE - 1), pfn, bool(vma.prot & u.PROT_WRITE), write)
            return VM_FAULT_OK
        return k.hugetlb.fault(task, vma, va, write)

    def fallocate(self, k, inode: Inode, mode: int, off: int, length: int) -> None:
        hsize = 1 << self.shift(inode)
        if mode & u.FALLOC_FL_PUNCH_HOLE and (off % hsize or length % hsize):
            raise OSError(u.EINVAL, "fallocate: HugeTLB guest_memfd works in huge pages")
        super().fallocate(k, inode, mode, off, length)


GMEM_OPS = GuestMemfdOps()
GMEM_HUGE_OPS = GuestMemfdHugeOps()


def kvm_gmem_convert(k, inode: Inode, offset: int, size: int, private: bool) -> None:
    """In-place conversion (KVM_GMEM_CONVERT_PRIVATE / _SHARED): pages that become
    private are unmapped from the host first; stage-2 of the range is zapped so the
    next guest access faults with the new attribute."""
    if offset < 0 or size <= 0 or offset % PAGE_SIZE or size % PAGE_SIZE or offset + size > inode.size:
        raise OSError(u.EINVAL, "conversion range")
    if not inode.flags & u.GUEST_MEMFD_FLAG_MMAP:
        raise OSError(u.EINVAL, "in-place conversion needs GUEST_MEMFD_FLAG_MMAP")
    if inode.private.get("failed") or inode.private.get("no_conversions"):
        raise OSError(u.EHWPOISON, "guest_memfd refuses conversions after a memory failure")
    start, end = offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT
    heads, splits = [], []
    if inode.ops.huge:                                 # a conversion that cuts a folio splits it
        nr = 1 << inode.private["hstate"].order
        for base in range(start - start % nr, end, nr):
            pfn = inode.find(k.core, base)
            if pfn is None:
                continue
            head = k.core.head(pfn)
            heads.append((base, head))
            cut = base < start or base + nr > end
            if cut and k.core.order(head) and k.hugetlb.split_group_of(head) is None:
                splits.append(head)
        seen: set = set()                              # all the splits' tables, up front
        need = sum(k.hugetlb.split_check(k.mm.rmap_walk(h), nr, seen) for h in splits)
        if need > k.core.pt_free:
            raise OSError(u.ENOMEM, "conversion: page-table pool exhausted")
    priv = inode.private.setdefault("private_idx", set())
    if not inode.flags & u.GUEST_MEMFD_FLAG_INIT_SHARED and not inode.private.get("converted"):
        priv.update(range(inode.size >> PAGE_SHIFT))   # the file started all private
    inode.private["converted"] = True
    for head in splits:
        k.hugetlb.split_gmem_folio(head, why="conversion")
    GMEM_OPS.invalidate(k, inode, start, end)
    if private:
        from .fs import unmap_mapping_range

        unmap_mapping_range(k, inode, start, end, even_cows=False)
        priv.update(range(start, end))
    else:
        priv.difference_update(range(start, end))
    k.trace("gmem_convert", ino=inode.ino, start=start, end=end, private=private)
    for base, _head in heads:                         # a range uniform again merges back
        group = k.hugetlb.split_group_of(inode.find(k.core, base) or -1)
        if group is None:
            continue
        nr = 1 << k.hugetlb.groups[group]["order"]
        kinds = {i in priv for i in range(base, base + nr)}
        if len(kinds) == 1:
            k.hugetlb.merge_gmem_folio(inode, base, group)


HUGETLB_SIZE_FLAGS = (u.GUESTMEM_HUGETLB_FLAG_MASK << u.GUESTMEM_HUGETLB_FLAG_SHIFT)


def supported_flags(vm_type: int) -> int:
    """kvm_gmem_get_supported_flags.  6.18 offers INIT_SHARED only without private
    memory (x86: !kvm_arch_has_private_mem); with in-place conversion, which the
    emulator models, shared/private is per page and every VM type may start shared.
    GUEST_MEMFD_FLAG_HUGETLB and its page-size field come from the HugeTLB series."""
    return (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
            | HUGETLB_SIZE_FLAGS)


def kvm_gmem_create(k, proc, vm, size: int, flags: int) -> int:
    if flags & ~supported_flags(vm.type):
        raise OSError(u.EINVAL, "guest_memfd flags")
    if size <= 0 or size % PAGE_SIZE:
        raise OSError(u.EINVAL, "guest_memfd size")
    ops, hstate = GMEM_OPS, None
    if flags & u.GUEST_MEMFD_FLAG_HUGETLB:
        log = (flags >> u.GUESTMEM_HUGETLB_FLAG_SHIFT) & u.GUESTMEM_HUGETLB_FLAG_MASK
        name = hstate_name(log)
        if name is None or k.hugetlb is None or name not in k.hugetlb.hstates:
            raise OSError(u.EINVAL, "guest_memfd: no HugeTLB pool of that size")
        hstate = k.hugetlb.hstates[name]
        if size % (4096 << hstate.order):
            raise OSError(u.EINVAL, "guest_memfd size: not a multiple of the huge page size")
        ops = GMEM_HUGE_OPS
    elif flags & HUGETLB_SIZE_FLAGS:
        raise OSError(u.EINVAL, "guest_memfd: a HugeTLB size without GUEST_MEMFD_FLAG_HUGETLB")
    inode = k.new_inode(ops, "[kvm-gmem]")
    if hstate is not None:
        inode.private["hstate"] = hstate
        inode.huge_order = hstate.order
    inode.size, inode.flags = size, flags
    inode.private["vm"] = vm
    k.inode_sync(inode)
    return proc.fd_install(File(inode))
