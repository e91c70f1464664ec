"""i_mmap as mm/interval_tree.c keeps it: file VMAs in vm_pgoff order, an equal key
after those already there, a forked child's VMA right after its parent's."""
from emu.kernel.mm import (
    Mm,
    Vma,
    vma_interval_tree_insert,
    vma_interval_tree_insert_after,
    vma_interval_tree_remove,
)


def vma(pgoff: int, start: int) -> Vma:
    return Vma(Mm(0, 0), start, start + 0x1000, 3, True, None, pgoff)


def test_vm_pgoff_order_ties_in_insertion_order():
    root: list = []
    a, b, c, d = vma(3, 0x1000), vma(0, 0x9000), vma(3, 0x5000), vma(1, 0x2000)
    for v in (a, b, c, d):
        vma_interval_tree_insert(v, root)
    assert root == [b, d, a, c]


def test_insert_after_and_remove():
    root: list = []
    a, b = vma(2, 0x1000), vma(2, 0x3000)
    vma_interval_tree_insert(a, root)
    vma_interval_tree_insert(b, root)
    child = vma(2, 0x1000)                      # fork: same pgoff, same address
    vma_interval_tree_insert_after(child, a, root)
    assert root == [a, child, b]
    vma_interval_tree_remove(a, root)
    assert root == [child, b]                   # by identity, not by value
