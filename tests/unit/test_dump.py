"""harness.analysis.dump on small dumps in QEMU's format, written by the tests.

Each dump is a guest with identity page tables (a 4K-page table for the
first 2 MiB, a 2M page, a 1G page), the IoMmuDxe list head, and optionally
a live MAP_INFO, shared pages (software bit 52) and canary bytes: the good
guest passes D1..D3, and each negative control fails exactly its check.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from coredump import PAGE, Core, map_info

from harness.analysis.dump import GHCB_WHY, analyze_dump, ghcb_by_design, load_canary
from harness.analysis.memdump import (
    QemuDump,
    SharedRange,
    shared_ranges,
    split_by_design,
    unencrypted_ranges,
    walk_map_list,
    walk_page_tables,
)
from harness.analysis.trace import parse_text
from harness.errors import DumpFormatError, UsageError

P, RW = 0x1, 0x2
PS = 0x80
SHARED = 1 << 52
HEAD = 0x5000
CANARY = bytes(range(0x41, 0x41 + 40)) + b"-canary-" + bytes(range(200, 240))
HIGH = 0x10000000                      # a second RAM block


def guest(shared: tuple[int, ...] = (), records: int = 0, canary_at: tuple[int, ...] = (),
          shared_2m_high: bool = False) -> Core:
    core = Core(cr3=0x1000)
    core.ram(0, 4 << 20)
    core.ram(HIGH, 64 << 10)
    core.u64(0x1000, 0x2000 | P | RW)                        # PML4[0] -> PDPT
    core.u64(0x2000, 0x3000 | P | RW)                        # PDPT[0] -> PD
    core.u64(0x2000 + 8, 0x40000000 | P | RW | PS)           # PDPT[1]: 1G page
    core.u64(0x3000, 0x4000 | P | RW)                        # PD[0] -> PT
    core.u64(0x3000 + 8, 0x200000 | P | RW | PS)             # PD[1]: 2M page
    core.u64(0x3000 + 8 * 128, HIGH | P | RW | PS | (SHARED if shared_2m_high else 0))
    for i in range(512):                                     # PT: 4K identity
        core.u64(0x4000 + 8 * i, i * PAGE | P | RW | (SHARED if i in shared else 0))
    links = [0x6000 + 0x40 * k + 8 for k in range(records)]
    if links:
        core.u64(HEAD, links[0])
        core.u64(HEAD + 8, links[-1])
        for k, link in enumerate(links):
            nxt = links[k + 1] if k + 1 < len(links) else HEAD
            prev = links[k - 1] if k else HEAD
            core.poke(link - 8, map_info(link - 8, nxt, prev, op=1, pages=1,
                                         crypted=0x180000, plain=0x100000))
    else:
        core.u64(HEAD, HEAD)
        core.u64(HEAD + 8, HEAD)
    for addr in canary_at:
        core.poke(addr, CANARY)
    return core


LOG = """boot line
EBST version v=1 module=IoMmuDxe
EBST iommu-config scheme=callback emulation=1 sharedbit=52 maphead=0x5000
EBST ebs-enter mapkey=0x1
EBST ebs-return status=0x0
"""


def analyze(tmp_path: Path, core: Core, log: str = LOG, **kw: object):  # type: ignore[no-untyped-def]
    path = core.write(tmp_path / "dump.elf")
    return analyze_dump(path, parse_text(log), canary=CANARY, **kw)  # type: ignore[arg-type]


# -------------------------------------------------------------- ELF reading


def test_segments_cpu_state_and_physical_reads(tmp_path: Path) -> None:
    core = guest()
    core.poke(HIGH + 0x10, b"high")
    with QemuDump(core.write(tmp_path / "d.elf")) as dump:
        assert [(s.paddr, s.size) for s in dump.segments] == [(0, 4 << 20), (HIGH, 64 << 10)]
        assert dump.cpus[0].cr3 == 0x1000 and dump.cpus[0].rip == 0x1E6E1A3D
        assert dump.read(HIGH + 0x10, 4) == b"high"
        assert dump.read_u64(0x1000) == 0x2000 | P | RW
        assert dump.read((4 << 20) - 2, 4) is None           # runs off the block
        assert dump.read(0x80000000, 8) is None
        assert dump.ram_bytes == (4 << 20) + (64 << 10)


def test_page_walk_levels_and_shared_set(tmp_path: Path) -> None:
    core = guest(shared=(0x100, 0x101, 0x180))
    with QemuDump(core.write(tmp_path / "d.elf")) as dump:
        leaves = list(walk_page_tables(dump, dump.cpus[0].cr3))
        sizes = {leaf.size for leaf in leaves}
        assert sizes == {PAGE, 2 << 20, 1 << 30}
        assert any(leaf.vaddr == 0x40000000 and leaf.size == 1 << 30 for leaf in leaves)
        ranges = shared_ranges(dump, 0x1000, 52)
        assert [(r.paddr, r.size) for r in ranges] == [(0x100000, 2 * PAGE), (0x180000, PAGE)]


def test_page_walk_findings_do_not_stop_or_loop(tmp_path: Path) -> None:
    core = guest()
    core.u64(0x2000 + 16, 0x2000 | P | RW)                   # PDPT[2] -> PDPT itself
    core.u64(0x3000 + 16, 0x7FFFF000 | P | RW)               # PD[2] -> table not in RAM
    findings: list[str] = []
    with QemuDump(core.write(tmp_path / "d.elf")) as dump:
        leaves = list(walk_page_tables(dump, 0x1000, findings))
    assert len(leaves) == 512 + 2 + 1
    assert any("referenced twice" in f for f in findings)
    assert any("not in the dump" in f for f in findings)


def test_map_list_walk(tmp_path: Path) -> None:
    with QemuDump(guest(records=2).write(tmp_path / "d.elf")) as dump:
        walk = walk_map_list(dump, HEAD)
    assert walk.problems == ()
    assert [r.addr for r in walk.records] == [0x6000, 0x6040]
    assert walk.records[0].op_name == "BusMasterWrite" and walk.records[0].pages == 1
    with QemuDump(guest().write(tmp_path / "e.elf")) as dump:
        assert walk_map_list(dump, HEAD).records == ()


@pytest.mark.parametrize("damage, problem", [
    (lambda c: c.u64(0x6040 + 8, 0x6008), "cycle"),            # 2nd -> 1st again
    (lambda c: c.u64(0x6040 + 8, 0x7000000), "outside the dump"),
    (lambda c: c.poke(0x6040, b"DEADBEEF"), "signature"),
    (lambda c: c.u64(0x6040 + 16, 0x6108), "BackLink"),
    (lambda c: c.u64(HEAD + 8, 0x6008), "list head BackLink"),
])
def test_map_list_hostile(tmp_path: Path, damage, problem: str) -> None:  # type: ignore[no-untyped-def]
    core = guest(records=2)
    damage(core)
    with QemuDump(core.write(tmp_path / "d.elf")) as dump:
        walk = walk_map_list(dump, HEAD)
    assert len(walk.problems) == 1 and problem in walk.problems[0]


def test_self_cycle_without_head_terminates(tmp_path: Path) -> None:
    core = guest(records=1)
    core.u64(0x6000 + 8, 0x6008)                               # entry points at itself
    core.u64(0x6000 + 16, 0x6008)
    with QemuDump(core.write(tmp_path / "d.elf")) as dump:
        walk = walk_map_list(dump, HEAD)
    assert walk.problems                                       # BackLink or cycle, no hang


def test_scan_finds_across_windows_pages_and_blocks(tmp_path: Path) -> None:
    core = guest(canary_at=(0x100000 - 20, 0x3FFF00, HIGH + 0x100))
    with QemuDump(core.write(tmp_path / "d.elf")) as dump:
        assert dump.scan(CANARY) == [0x100000 - 20, 0x3FFF00, HIGH + 0x100]
        # tiny windows: every hit straddles or nears a window edge somewhere
        assert dump.scan(CANARY, window=4096) == [0x100000 - 20, 0x3FFF00, HIGH + 0x100]
        assert dump.scan(CANARY, window=1000) == [0x100000 - 20, 0x3FFF00, HIGH + 0x100]
        # restricted to two adjacent pages: the copy across their boundary counts
        assert dump.scan(CANARY, [(0x0FF000, PAGE), (0x100000, PAGE)]) == [0x100000 - 20]
        assert dump.scan(CANARY, [(0x100000, PAGE)]) == []
        assert dump.scan(b"not-in-this-dump-at-all") == []


# ------------------------------------------------------------------ verdicts


def test_good_guest_passes(tmp_path: Path) -> None:
    rep = analyze(tmp_path, guest(canary_at=(0x300000,)))   # canary only in private memory
    assert rep.violations == () and rep.scope == "shared"
    assert rep.live is not None and rep.live.records == () and rep.shared == ()
    assert any("private memory" in n for n in rep.notes)
    js = rep.as_json()
    assert js["verdict"] == "pass" and js["live_mappings"] == [] and js["canary_hits"] == []


def test_d1_negative_control_live_record(tmp_path: Path) -> None:
    rep = analyze(tmp_path, guest(records=1))
    assert [v.check for v in rep.violations] == ["D1"]
    assert "live MAP_INFO at 0x6000: BusMasterWrite" in rep.violations[0].detail
    assert rep.as_json()["live_mappings"][0]["map"] == "0x6000"  # type: ignore[index]


def test_d1_corrupt_list_cannot_pass(tmp_path: Path) -> None:
    core = guest(records=2)
    core.u64(0x6040 + 8, 0x6008)
    rep = analyze(tmp_path, core)
    assert {v.check for v in rep.violations} == {"D1"}
    assert any("cannot be proven empty: cycle" in v.detail for v in rep.violations)


def test_d2_negative_control_shared_page(tmp_path: Path) -> None:
    rep = analyze(tmp_path, guest(shared=(0x120,)))
    assert [v.check for v in rep.violations] == ["D2"]
    assert "0x120000+0x1000" in rep.violations[0].detail


def test_d3_negative_control_canary_in_shared_page(tmp_path: Path) -> None:
    rep = analyze(tmp_path, guest(shared=(0x100,), canary_at=(0x100800,)))
    assert sorted({v.check for v in rep.violations}) == ["D2", "D3"]
    assert [h.paddr for h in rep.canary_hits] == [0x100800]
    d3 = next(v for v in rep.violations if v.check == "D3")
    assert "0x100800" in d3.detail


def test_shared_2m_page_partly_outside_ram_is_scanned_where_present(tmp_path: Path) -> None:
    rep = analyze(tmp_path, guest(shared_2m_high=True, canary_at=(HIGH + 0x40,)))
    assert [h.paddr for h in rep.canary_hits] == [HIGH + 0x40]


def test_without_emulation_whole_ram_is_host_readable(tmp_path: Path) -> None:
    log = LOG.replace("emulation=1 sharedbit=52", "emulation=0 sharedbit=0")
    rep = analyze(tmp_path, guest(canary_at=(0x300000,)), log, encrypted=True)
    assert rep.scope == "all" and rep.shared is None
    assert [v.check for v in rep.violations] == ["D3"]
    assert any(n.startswith("D2 skipped") for n in rep.notes)


def test_without_iommu_d3_is_skipped_unless_asked(tmp_path: Path) -> None:
    stock = "EBST version v=1 module=DxeCore\nEBST ebs-enter mapkey=0x1\n"
    rep = analyze(tmp_path, guest(canary_at=(0x300000,)), stock)
    assert rep.violations == () and any(n.startswith("D3 skipped") for n in rep.notes)
    rep = analyze(tmp_path, guest(canary_at=(0x300000,)), stock, scope="all")
    assert [v.check for v in rep.violations] == ["D3"]


def test_five_level_paging_is_not_walked_as_four(tmp_path: Path) -> None:
    core = guest(shared=(5,))
    core.cr4 |= 1 << 12                     # CR4.LA57
    rep = analyze(tmp_path, core)
    assert rep.shared is None and "D2" not in {v.check for v in rep.violations}
    assert any("5-level paging" in n for n in rep.notes)


def test_maphead_cross_check(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="wrong --firmware"):
        analyze(tmp_path, guest(), maphead_symbol=0x5100)
    rep = analyze(tmp_path, guest(), maphead_symbol=HEAD)
    assert rep.maphead == HEAD


def test_no_maphead_anywhere_skips_d1(tmp_path: Path) -> None:
    rep = analyze(tmp_path, guest(records=1), "EBST version v=1 module=DxeCore\n")
    assert rep.live is None and any(n.startswith("D1 skipped") for n in rep.notes)


def test_load_canary(tmp_path: Path) -> None:
    (tmp_path / "c").write_bytes(CANARY + b"\n")
    assert load_canary(tmp_path / "c") == CANARY
    (tmp_path / "s").write_bytes(b"abc")
    with pytest.raises(UsageError, match="3 bytes"):
        load_canary(tmp_path / "s")
    with pytest.raises(UsageError):
        load_canary(tmp_path / "missing")


# ------------------------------------------------------------- hostile ELF


def _patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, *values)
    return bytes(buf)


GOOD = guest().image()
PH1 = 64 + 56                                   # the first PT_LOAD's header


@pytest.mark.parametrize("data, reason", [
    (b"", "too short"),
    (b"\x7fELF" + b"\0" * 100, "not a little-endian ELF64"),
    (b"MZ" + GOOD[2:], "not an ELF file"),
    (_patch(GOOD, 16, "<H", 2), "not a core dump"),
    (_patch(GOOD, 18, "<H", 3), "not x86-64"),
    (_patch(GOOD, 54, "<H", 32), "program header size"),
    (_patch(GOOD, 56, "<H", 0), "no program headers"),
    (_patch(GOOD, 56, "<H", 60000)[:200_000], "past the end of the file"),
    (_patch(_patch(GOOD, 56, "<H", 0xFFFF), 40, "<Q", len(GOOD))
     + _patch(bytes(64), 44, "<I", 1 << 30), "more than 65536"),
    (_patch(GOOD, 32, "<Q", 1 << 60), "past the end of the file"),
    (GOOD[:len(GOOD) - 100], "truncated dump"),
    (_patch(GOOD, PH1 + 8, "<Q", 1 << 62), "past the end of the file"),
    (_patch(GOOD, PH1 + 32, "<QQ", 1 << 40, 1 << 40), "past the end of the file"),
    (_patch(GOOD, PH1 + 40, "<Q", 1), "above memory size"),
    (_patch(GOOD, 64 + 32, "<Q", 1 << 40), "note segment"),
    (_patch(GOOD, 64 + 56 * 3 + 4, "<I", 1 << 30), "runs past it"),
    (_patch(GOOD, PH1 + 56 + 24, "<Q", 0x100000), "overlap"),
    (_patch(_patch(_patch(GOOD, 64, "<I", 7), PH1, "<I", 7), PH1 + 56, "<I", 7), "no PT_LOAD"),
])
def test_hostile_elf_is_one_line_error(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "bad.elf"
    path.write_bytes(data)
    with pytest.raises(DumpFormatError) as info:
        QemuDump(path)
    assert reason in str(info.value)
    assert "\n" not in str(info.value) and info.value.exit_status == 2


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DumpFormatError, match="no such file"):
        QemuDump(tmp_path / "nope")
    with pytest.raises(DumpFormatError, match="not a regular file"):
        QemuDump(tmp_path)


# ------------------------------------------------------------- SEV's C-bit

CBIT = 1 << 47
SEV_LOG = """SEV is enabled (mask 0x800000000000)
EBST version v=1 module=IoMmuDxe
EBST iommu-config scheme=callback emulation=0 sharedbit=0 maphead=0x5000
EBST ebs-enter mapkey=0x1
EBST ebs-return status=0x0
"""


def sev_guest(shared: tuple[int, ...] = (), canary_at: tuple[int, ...] = ()) -> Core:
    """The same guest as a SEV guest sees it: the C-bit in CR3, in every table
    pointer and in every leaf but those of shared pages; the legacy window
    0xA0000..1 MiB shared, as OVMF leaves it."""
    core = guest(canary_at=canary_at)
    core.cr3 = 0x1000 | CBIT
    for table, count in ((0x1000, 1), (0x2000, 2), (0x3000, 2), (0x3000 + 8 * 128, 1)):
        for i in range(count):
            entry = struct.unpack("<Q", core.blocks[0][table + 8 * i:table + 8 * i + 8])[0]
            core.u64(table + 8 * i, entry | CBIT)
    for i in range(512):
        private = not (0xA0 <= i < 0x100 or i in shared)
        core.u64(0x4000 + 8 * i, i * PAGE | P | RW | (CBIT if private else 0))
    return core


def test_sev_guest_shares_only_by_design(tmp_path: Path) -> None:
    rep = analyze(tmp_path, sev_guest(canary_at=(0x300000,)), SEV_LOG)
    assert rep.violations == () and rep.scope == "shared" and rep.shared == ()
    assert [(r.paddr, r.size) for r, _ in rep.by_design] == [(0xA0000, 0x60000)]
    assert rep.as_json()["shared_pages"] == []
    assert rep.as_json()["shared_by_design"][0]["paddr"] == "0xa0000"  # type: ignore[index]
    by_design = [n for n in rep.notes if "shared by design" in n]
    assert by_design and "96 page(s) at 0xa0000" in by_design[0]
    assert any("emulation-only evidence" in n for n in rep.notes)


def test_sev_d2_negative_control_a_page_with_the_cbit_clear(tmp_path: Path) -> None:
    rep = analyze(tmp_path, sev_guest(shared=(0x120,), canary_at=(0x120010,)), SEV_LOG)
    assert sorted({v.check for v in rep.violations}) == ["D2", "D3"]
    d2 = next(v for v in rep.violations if v.check == "D2")
    assert "1 page(s) in 1 range(s) still shared (C-bit 47 clear): 0x120000+0x1000" == d2.detail
    assert [h.paddr for h in rep.canary_hits] == [0x120010]


def test_sev_canary_in_the_shared_legacy_window_is_a_leak(tmp_path: Path) -> None:
    """Shared by design is no excuse for D3: the host can read it."""
    rep = analyze(tmp_path, sev_guest(canary_at=(0xC0000,)), SEV_LOG)
    assert [v.check for v in rep.violations] == ["D3"]


def test_sev_cbit_comes_from_the_log_or_the_caller(tmp_path: Path) -> None:
    without = SEV_LOG.replace("SEV is enabled (mask 0x800000000000)\n", "")
    rep = analyze(tmp_path, sev_guest(shared=(0x120,)), without)
    assert rep.shared is None, "no SEV line, no cbit: D2 cannot be judged"
    rep = analyze(tmp_path, sev_guest(shared=(0x120,)), without, cbit=CBIT)
    assert [v.check for v in rep.violations] == ["D2"]


def test_sev_walk_strips_the_cbit_from_table_addresses(tmp_path: Path) -> None:
    path = sev_guest().write(tmp_path / "dump.elf")
    with QemuDump(path) as dump:
        findings: list[str] = []
        leaves = list(walk_page_tables(dump, 0x1000 | CBIT, findings, cbit=CBIT))
        assert findings == [] and {leaf.paddr for leaf in leaves if leaf.size == PAGE} == \
            {i * PAGE for i in range(512)}
        # Negative control: read as an address bit, it sends the walk outside RAM.
        blind: list[str] = []
        assert list(walk_page_tables(dump, 0x1000 | CBIT, blind)) == []
        assert blind and "not in the dump" in blind[0]


def test_real_sev_dump_is_ciphertext_so_only_d3_is_judged(tmp_path: Path) -> None:
    rep = analyze(tmp_path, sev_guest(shared=(0x120,), canary_at=(0x300000,)), SEV_LOG,
                  encrypted=True)
    assert [v.check for v in rep.violations] == ["D3"] and rep.scope == "all"
    assert rep.live is None and rep.shared is None
    assert any(n.startswith("D1 skipped: under real SEV") for n in rep.notes)
    assert any(n.startswith("D2 skipped: under real SEV") for n in rep.notes)


def test_split_by_design_cuts_ranges_at_the_window() -> None:
    judged, by_design = split_by_design([SharedRange(0x9F000, 0x9F000, 0x62000)])
    assert [(r.paddr, r.size) for r in judged] == [(0x9F000, 0x1000), (0x100000, 0x1000)]
    assert [(r.paddr, r.size) for r, _ in by_design] == [(0xA0000, 0x60000)]


#: PlatformPei's lines under SEV-ES, from a boot under the emulated SEV-ES,
#: edited to two CPUs' worth of GHCB pages (the emulation runs one vCPU);
#: the backup pages line is not the GHCB pages'.
SEV_ES_LINES = ("SEV is enabled (mask 0x800000000000)\n"
                "SEV-ES is enabled, 4 GHCB pages allocated starting at 0xFF76000\n"
                "SEV-ES is enabled, 1 GHCB backup pages allocated starting at 0xFBFF000\n")


def test_the_ghcb_pages_are_shared_by_design_and_nothing_beside_them() -> None:
    """Every other page from the log's first GHCB page is a GHCB (shared);
    the per-CPU variable pages between them, and the pages around, are judged."""
    parsed = parse_text(SEV_ES_LINES)
    assert parsed.ghcb == (0xFF76000, 4)
    assert parsed.ghcb_pages == (0xFF76000, 0xFF78000)
    leaked = SharedRange(0xFF75000, 0xFF75000, 0x5000)     # one page each side, and the lot
    judged, by_design = split_by_design([leaked], ghcb_by_design(parsed))
    assert [(r.paddr, r.size) for r, _ in by_design] == [(0xFF76000, 0x1000),
                                                         (0xFF78000, 0x1000)]
    assert all(why == GHCB_WHY for _, why in by_design)
    assert sorted((r.paddr, r.size) for r in judged) == [
        (0xFF75000, 0x1000), (0xFF77000, 0x1000), (0xFF79000, 0x1000)]
    # Without the line (plain SEV) nothing is shared by design there.
    assert ghcb_by_design(parse_text(SEV_ES_LINES.splitlines(keepends=True)[0])) == ()


def test_unencrypted_ranges_refuses_a_bad_mask(tmp_path: Path) -> None:
    path = sev_guest().write(tmp_path / "dump.elf")
    with QemuDump(path) as dump, pytest.raises(UsageError, match="not one bit"):
        unencrypted_ranges(dump, 0x1000, 3 << 46)
