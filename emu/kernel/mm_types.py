"""vm_fault_t (include/linux/mm_types.h, enum vm_fault_reason): what a fault handler
returns.  Its own module so that the fault paths mm.py calls (hugetlb_fault) can
name the codes without importing mm."""

VM_FAULT_OK = 0
VM_FAULT_SIGBUS = 0x2
VM_FAULT_HWPOISON = 0x10
VM_FAULT_HWPOISON_LARGE = 0x20
VM_FAULT_SIGSEGV = 0x40
