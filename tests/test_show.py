"""`host.file_pages()` and `emu show`: the picture's facts checked against the machine
(pagemap, kpageflags, gpa_to_pfn, status)."""
import html.parser
import json
import os

import pytest
from test_cli import emu_cmd

import emu
from emu import show
from emu import uapi as u
from emu.shm import runtime_dir

MB = 1 << 20
PAGE = 4096
GPA = 1 << 32
HUGE = (u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED | u.GUEST_MEMFD_FLAG_HUGETLB
        | u.GUESTMEM_HUGETLB_FLAG_2MB)


def _gmem_ino(host):
    return next(f["ino"] for f in host.status()["files"] if f["kind"] == "guest_memfd")


def _scene(host):
    """A 4 MiB HugeTLB guest_memfd (2 MiB folios), the last MiB private, the host
    touching the first folio, the guest a shared and a private page of the second,
    then one page of the first poisoned."""
    me = emu.attach(host, name="qemu")
    kvm = me.open_kvm()
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gfd = vm.create_guest_memfd(4 * MB, HUGE)
    hva = me.mmap(0, 4 * MB, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, gfd, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, 4 * MB, hva, gfd, 0)
    me.gmem_convert(gfd, 3 * MB, MB, True)
    me.write(hva, b"x")

    def guest(g):
        yield g.read(GPA, 4)
        yield g.read(GPA + 2 * MB, 4)
        yield g.read(GPA + 3 * MB, 4)
        yield g.done()

    vcpu = vm.create_vcpu(0)
    vcpu.set_guest(guest)
    assert vcpu.run() == 0
    return me, vm, gfd, hva


def test_file_pages_of_a_hugetlb_gmem(host_factory):
    host = host_factory(ram="256M", hugepages={"2M": 4})
    me, vm, gfd, hva = _scene(host)
    ino = _gmem_ino(host)
    before = host.file_pages(ino)
    pages = before["pages"]
    assert (before["kind"], before["size"], before["npages"], len(pages)) == (
        "guest_memfd", 4 * MB, 1024, 1024)
    assert [p["index"] for p in pages] == list(range(1024))
    # folio 0 whole; folio 1, shared and private, was split when it was allocated
    assert len({p["head"] for p in pages[:512]}) == 1 and {p["order"] for p in pages[:512]} == {9}
    assert all(p["order"] == 0 and p["head"] == p["pfn"] for p in pages[512:] if p["pfn"] is not None)
    assert [p["pfn"] for p in pages[:512]] == [pages[0]["head"] + i for i in range(512)]
    assert sum(p["private"] for p in pages) == 256 and all(p["private"] for p in pages[768:])
    # host mappings: the process that mmap'ed it, at its pagemap pfn, one PMD
    assert pages[3]["host"] == [{"pid": me.tgid, "comm": "qemu", "addr": hva + 3 * PAGE,
                                 "level": 2, "entry": "present"}]
    assert me.pagemap(hva + 3 * PAGE).pfn == pages[3]["pfn"]
    # stage-2, as KVM's own walk sees it; the VM named as KVM's debugfs does
    name = "%d-%d" % (me.tgid, vm.fd)
    for idx in (0, 512, 768):
        st = vm.gpa_to_pfn(GPA + idx * PAGE)
        assert st["mapped"] and st["pfn"] == pages[idx]["pfn"]
        s2 = pages[idx]["stage2"]
        assert [(m["vm"], m["gpa"], m["level"], m["private"]) for m in s2] == [
            (name, GPA + idx * PAGE, st["level"], idx >= 768)]
    assert pages[600]["stage2"] == []
    assert before["bindings"] == [{"vm": name, "slot": 1, "gpa": GPA, "size": 4 * MB, "offset": 0}]

    victim = pages[5]["pfn"]
    assert host.corrupt_pfn(victim) == 0
    after = host.file_pages(ino)["pages"]
    assert [p["index"] for p in after if p["hwpoison"]] == [5]
    assert host.kpageflags(victim) & (1 << u.KPF_HWPOISON)
    assert all(p["folio_hwpoison"] for p in after[:512]) and not any(p["folio_hwpoison"] for p in after[512:])
    # the PMD became a hwpoison entry: pagemap says so too
    assert after[5]["host"] == [{"pid": me.tgid, "comm": "qemu", "addr": hva + 5 * PAGE,
                                 "level": 2, "entry": "hwpoison"}]
    assert not vm.gpa_to_pfn(GPA)["mapped"] and after[0]["stage2"] == []

    runs = host.file_pages(ino, runs=True)["runs"]
    assert sum(r["count"] for r in runs) == 1024 and len(runs) < 20
    snap = show.snapshot(host, ino)
    json.dumps(snap)
    text = show.render_text(snap, color=False)
    assert "folios: 512 x order 0 (4 KiB), 1 x order 9 (2 MiB)" in text
    assert "private pages: 256 of 1024" in text
    assert "poisoned pages: 1 (index 5, pfn %#x)" % victim in text
    assert ("host: pid %d (qemu) has hwpoison entries for 512 pages, lowest at %#x (PMD)"
            % (me.tgid, hva)) in text
    assert "stage-2: vm %s maps 1 private pages, lowest at gpa %#x" % (name, GPA + 3 * MB) in text
    grid = [line.split("|")[1] for line in text.splitlines() if line.endswith("|")]
    assert len(grid) == 16 and grid[0][5] == "X" and grid[0][4] == "x" and grid[12][0] == "P"
    assert "\x1b[" not in text and "\x1b[" in show.render_text(snap, color=True)

    doc = show.render_html([("mf-delayed-fix", snap), ("again", show.snapshot_vm(host, name))])

    class P(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags = []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))

    p = P()
    p.feed(doc)
    p.close()
    tags = [t for t, _ in p.tags]
    assert tags.count("svg") == 2 and tags.count("h2") == 2
    assert not [a for t, a in p.tags if t in ("script", "link") or "src" in a]
    assert doc.count('data-c="X"') == 2


def test_file_pages_of_a_memfd_and_bad_inos(host):
    me = emu.attach(host, name="w")
    fd = me.memfd_create("ram")
    me.ftruncate(fd, 4 * PAGE)
    a = me.mmap(0, 4 * PAGE, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
    me.write(a + PAGE, b"y")
    ino = next(f["ino"] for f in host.status()["files"] if f["name"] == "memfd:ram")
    pages = host.file_pages(ino)["pages"]
    assert [p["pfn"] is not None for p in pages] == [False, True, False, False]
    assert pages[1]["private"] is None and pages[1]["order"] == 0
    assert pages[1]["host"] == [{"pid": me.tgid, "comm": "w", "addr": a + PAGE, "level": 1,
                                 "entry": "present"}]
    host.hw_poison(pages[1]["pfn"])
    assert host.file_pages(ino)["pages"][1]["latent"]
    for bad, err in ((10 ** 6, u.ENOENT), ("x", u.EINVAL)):
        with pytest.raises(OSError) as ei:
            host.file_pages(bad)
        assert ei.value.errno == err
    kvm = me.open_kvm()
    kino = max(f["ino"] for f in host.status()["files"] if f["kind"] == "kvm")
    with pytest.raises(OSError) as ei:
        host.file_pages(kino)
    assert ei.value.errno == u.EINVAL
    del kvm


def test_emu_show_cli(tmp_path):
    sock = os.path.join(runtime_dir(), "show-test-%d.sock" % os.getpid())
    r = emu_cmd("daemon", "--background", "--socket", sock, "--ram", "256M", "--hugepages", "2M=4")
    assert r.returncode == 0, r.stderr
    try:
        host = emu.connect(sock)
        me, vm, gfd, hva = _scene(host)
        name = "%d-%d" % (me.tgid, vm.fd)
        r = emu_cmd("show", "--socket", sock)
        assert r.returncode == 0, r.stderr
        assert "guest_memfd ino" in r.stdout and "vm %s" % name in r.stdout
        assert "private pages: 256 of 1024" in r.stdout and "\x1b[" not in r.stdout
        r = emu_cmd("show", "--socket", sock, "--vm", name, "--json")
        assert json.loads(r.stdout)["files"][0]["vm"] == name
        out = tmp_path / "s.html"
        r = emu_cmd("show", "--socket", sock, "--ino", str(_gmem_ino(host)), "--html", str(out))
        assert r.returncode == 0 and out.read_text().count("<svg") == 1
        for args, msg in ((["--ino", "99999"], "show --ino 99999: No such file or directory"),
                          (["--vm", "1-1"], "show --vm 1-1: no guest_memfd bound")):
            r = emu_cmd("show", "--socket", sock, *args)
            assert r.returncode == 1 and r.stderr.startswith("emu: " + msg) and r.stderr.count("\n") == 1
        me.exit()
    finally:
        emu_cmd("stop", "--socket", sock)
