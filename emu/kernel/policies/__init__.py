"""Memory-failure policies: named bundles of decisions the one generic flow asks.

A policy never appears as `if policy == ...` in the flow: the flow calls a
decision by name.  Users subclass `Policy` (or a preset) and override decisions;
see README "Writing a policy".
"""
from __future__ import annotations

import difflib
import importlib.util
import sys

from ... import uapi as u


class Policy:
    """The decisions, with the MF_DELAYED-fix kernel's answers as defaults.

    Decisions marked (gmem) apply to folios owned by a guest_memfd; every other
    folio is handled as the kernel does whatever the policy.
    """

    name = "base"
    description = ""

    # truncate_error_folio: an error_remove_folio that returns MF_DELAYED is passed
    # through (the fix) or taken as "Failed to punch page" -> MF_FAILED (v6.18).
    propagate_mf_delayed = True
    # shmem_error_remove_folio's return: MF_DELAYED with the fix series, 0 before it.
    shmem_error_remove_folio_result = u.MF_DELAYED

    # (gmem) when the failure is recorded: "mce" sets PG_hwpoison in memory_failure();
    # "release" only tracks the pfn in a global table, and the flag is set when the
    # folio leaves guest_memfd (and so is reported to HugeTLB then).
    hwpoison_mark = "mce"
    # (gmem) what memory_failure() unmaps from host page tables: "folio" (the kernel:
    # the whole folio the failed page was in when the failure arrived, every page of
    # it even when split_on_poison split it), "page" (the failed 4K page only; the host
    # maps a HugeTLB folio with one huge entry, so this needs split_on_poison), "none",
    # or "file" (every mapping of the whole guest_memfd).
    host_unmap = "folio"
    # (gmem) what error_remove_folio zaps from stage-2: "folio" (the whole folio, as
    # host_unmap), "page" (the failed 4K page only: a huge stage-2 entry is split into
    # 4K entries first, as KVM's huge page split / TDX demote does), "none", "file".
    stage2_unmap = "folio"
    # (gmem) host and guest faults check for failed memory (__do_fault's PageHWPoison,
    # hugetlb_no_page's folio_test_hwpoison, __kvm_gmem_get_pfn's folio_test_hwpoison);
    # without it a fault maps a poisoned guest_memfd page like any other and the access
    # reads it (memory that is really bad still raises a machine check; a hwpoison
    # entry that host_unmap left still gets SIGBUS).
    faults_check = True
    # (gmem) PR_MCE_KILL_EARLY: "honoured" (task_early_kill), "ignored", or
    # "kvm_owner": also the processes that own the struct kvm the guest_memfd belongs
    # to, whether or not they map the page (si_addr is their host address of the page
    # when they map it, else 0).
    early_kill = "honoured"
    # (gmem) a dirty folio mapped in host page tables gets every mapping process
    # signalled, early-kill or not (the kernel signals early-kill threads only).
    signal_all_mappers = False
    # (gmem) a consumed failure always ends in SIGBUS to current, even when current's
    # process has no host mapping of the page (a vCPU consuming private memory).
    sigbus_current_on_consume = False
    # (gmem) a deferred failure reported by a task (no MF_ACTION_REQUIRED, e.g. a
    # pre-6.11 MADV_HWPOISON): "defer" (the kernel) or "sigbus_current".
    deferred_failure = "defer"
    # (gmem) after a failure: "usable", "no_conversions" (in-place conversions are
    # refused), or "unusable" (every later fault on the file fails: host SIGBUS,
    # guest -EHWPOISON, and no conversions).
    gmem_after_failure = "usable"
    # (gmem, HugeTLB) split a huge folio on poison so only the failed 4K page goes:
    # host and stage-2 mappings are split too, PG_hwpoison lands on the raw page
    # (distributed), and when guest_memfd releases the pages they are merged back with
    # the flag summarized on the head, just to return the page to HugeTLB.
    split_on_poison = False
    # (gmem, HugeTLB) on such a split, PG_hwpoison lands on the failed page only
    # (distributed); without it every page of the old folio is flagged.
    distribute_on_split = True
    # (gmem, HugeTLB) when all pages of a split folio have left guest_memfd they are
    # merged back with the flag summarized on the head, just to return the page to
    # HugeTLB (which then dissolves it); without it they are freed one by one.
    summarize_on_merge = True
    # (gmem, HugeTLB) when guest_memfd releases a poisoned folio it goes back to
    # HugeTLB with the flag (memory_failure's pin dropped), so HugeTLB dissolves it
    # and reuses the healthy pages; today's kernel keeps the pin and the huge page
    # is never freed.
    return_poisoned_to_hugetlb = False
    # (gmem, HugeTLB) a conversion that makes a split folio's range uniform again
    # merges it back; with part of it poisoned the merge is refused (eventual) or the
    # flag is summarized on the merged folio's head.
    refuse_merge_if_poisoned = False

    def describe(self) -> dict:
        return {key: getattr(self, key) for key in DECISIONS}


# Every decision and what it may be (a tuple of the valid values, or a type), the
# way SYSCTL_RANGE bounds the sysctls: load() refuses anything else.
DECISIONS: dict[str, tuple | type] = {
    "propagate_mf_delayed": bool,
    "shmem_error_remove_folio_result": (0, u.MF_DELAYED),
    "hwpoison_mark": ("mce", "release"),
    "host_unmap": ("folio", "page", "none", "file"),
    "stage2_unmap": ("folio", "page", "none", "file"),
    "faults_check": bool,
    "early_kill": ("honoured", "ignored", "kvm_owner"),
    "signal_all_mappers": bool,
    "sigbus_current_on_consume": bool,
    "deferred_failure": ("defer", "sigbus_current"),
    "gmem_after_failure": ("usable", "no_conversions", "unusable"),
    "split_on_poison": bool,
    "distribute_on_split": bool,
    "summarize_on_merge": bool,
    "return_poisoned_to_hugetlb": bool,
    "refuse_merge_if_poisoned": bool,
}
# what a policy may set besides decisions: its name and description (strings)
METADATA = ("name", "description")
# decisions that only make sense together: (decision, value, needs, needed value, why)
REQUIRES = (
    ("host_unmap", "page", "split_on_poison", True,
     "the host maps a HugeTLB folio with one huge entry: only a split frees one 4K page"),
)


def validate(pol: type[Policy] | Policy) -> None:
    """Refuse a policy (class or instance) whose decisions are unknown or out of range
    (ValueError, one line naming the decision and what it may be).  Attributes
    starting with "_" and methods are the class's own business."""
    klass = pol if isinstance(pol, type) else type(pol)
    owners = [o for o in klass.__mro__ if o is not object]
    if not isinstance(pol, type) and hasattr(pol, "__dict__"):
        owners.insert(0, pol)
    for owner in owners:
        for key, val in vars(owner).items():
            if key.startswith("_") or key in DECISIONS or key in METADATA:
                continue
            if callable(val) or isinstance(val, (staticmethod, classmethod, property)):
                continue
            near = difflib.get_close_matches(key, DECISIONS, n=1)
            raise ValueError("policy %s: unknown decision %r%s (decisions: %s)"
                             % (klass.__name__, key, "; did you mean %r?" % near[0] if near else "",
                                ", ".join(DECISIONS)))
    for key in METADATA:
        if not isinstance(getattr(pol, key), str):
            raise ValueError("policy %s: %s must be a string" % (klass.__name__, key))
    for key, valid in DECISIONS.items():
        val = getattr(pol, key)
        if isinstance(valid, type):
            ok = type(val) is valid
            what = "True or False" if valid is bool else valid.__name__
        else:
            ok = any(type(val) is type(v) and val == v for v in valid)
            what = " | ".join(repr(v) for v in valid)
        if not ok:
            near = difflib.get_close_matches(str(val), [v for v in valid if isinstance(v, str)], n=1) \
                if isinstance(val, str) and isinstance(valid, tuple) else []
            raise ValueError("policy %s: %s = %r is not valid (expected %s)%s"
                             % (klass.__name__, key, val, what,
                                "; did you mean %r?" % near[0] if near else ""))
    for key, val, need, needed, why in REQUIRES:
        if getattr(pol, key) == val and getattr(pol, need) != needed:
            raise ValueError("policy %s: %s = %r needs %s = %r (%s)"
                             % (klass.__name__, key, val, need, needed, why))



class MfDelayedFix(Policy):
    name = "mf-delayed-fix"
    description = "the MF_DELAYED fix series: MF_DELAYED propagates, memory_failure returns 0"


class V618(Policy):
    name = "v6.18"
    description = ("upstream before the MF_DELAYED fix: MF_DELAYED becomes MF_FAILED, -EBUSY, "
                   "and a consumed #MC also gets kill_me_now")
    propagate_mf_delayed = False
    shmem_error_remove_folio_result = 0


class Minimum(MfDelayedFix):
    name = "minimum"
    description = ("the 'minimum support' proposal: track failures in a global structure, "
                   "defer unconsumed failures, SIGBUS current on consumption, no unmapping, "
                   "HWpoison only on release, no fault checks, PR_MCE_KILL_EARLY not handled")
    hwpoison_mark = "release"
    host_unmap = "none"
    stage2_unmap = "none"
    faults_check = False
    early_kill = "ignored"
    sigbus_current_on_consume = True
    return_poisoned_to_hugetlb = True


class Initial(MfDelayedFix):
    name = "initial"
    description = ("the 'initial stage' plan: unmap the whole file from host and stage-2, "
                   "mark HWpoison at the #MC, EARLY threads and every mapping process of a "
                   "dirty folio get SIGBUS, guest_memfd unusable after a failure")
    host_unmap = "file"
    stage2_unmap = "file"
    signal_all_mappers = True
    sigbus_current_on_consume = True
    gmem_after_failure = "unusable"
    return_poisoned_to_hugetlb = True


class Eventual(MfDelayedFix):
    name = "eventual"
    description = ("the 'eventually' plan: split the HugeTLB folio and unmap only the failed "
                   "page from host and stage-2, distribute HWpoison on split, summarize it on "
                   "merge to return the page to HugeTLB, and signal the processes that own "
                   "the struct kvm (PR_MCE_KILL_EARLY works for private memory)")
    split_on_poison = True
    early_kill = "kvm_owner"
    return_poisoned_to_hugetlb = True
    refuse_merge_if_poisoned = True
    host_unmap = "page"
    stage2_unmap = "page"


PRESETS: dict[str, type[Policy]] = {p.name: p for p in (V618, MfDelayedFix, Minimum, Initial, Eventual)}
DEFAULT = "mf-delayed-fix"
for _preset in PRESETS.values():
    validate(_preset)


def load(spec: str | type | Policy) -> Policy:
    """A preset name, 'path/to/file.py:ClassName', a Policy class or instance."""
    if isinstance(spec, Policy):
        validate(spec)
        return spec
    if isinstance(spec, type) and issubclass(spec, Policy):
        validate(spec)
        return spec()
    if not isinstance(spec, str):
        raise ValueError("policy: expected a preset name or path.py:Class")
    if spec in PRESETS:
        return PRESETS[spec]()
    if ":" in spec:
        path, _, cls = spec.rpartition(":")
        modname = "emu_user_policy_%d" % (abs(hash(path)) % 10**8)
        try:
            s = importlib.util.spec_from_file_location(modname, path)
            mod = importlib.util.module_from_spec(s)
            sys.modules[modname] = mod
            s.loader.exec_module(mod)
        except Exception as e:                    # the user's code: any error is theirs
            sys.modules.pop(modname, None)
            raise ValueError("policy: cannot load %s: %s: %s" % (path, type(e).__name__, e)) from None
        klass = getattr(mod, cls, None)
        if not (isinstance(klass, type) and issubclass(klass, Policy)):
            raise ValueError("policy: %s has no Policy subclass %r" % (path, cls))
        validate(klass)
        return klass()
    raise ValueError("policy: unknown preset %r (presets: %s)" % (spec, ", ".join(PRESETS)))
