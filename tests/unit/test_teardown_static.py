"""The static C3 check on recorded IoMmuDxe modules of real builds
(``tests/data/teardown-static/README.md`` says how each was made).

Negative controls: the series as it stands (2025.02: the TDX path of
``SetOrClearSharedBit`` to ``gBS->LocateProtocol``), the PCD variant of the
2022.11 series (a dynamic ``PcdGet64`` in the teardown itself), and the
protocol's own ``Unmap`` of the recorded 2025.02 module (``MemoryMapLocked``
FALSE frees pages). Positive
control: the 2022.11 series with the page-state change left out of the
teardown (``firmware-variants/teardown-leaves-page-state.patch``), whose
teardown does memory work only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness import cli
from harness.analysis import teardown_static as ts

DATA = Path(__file__).resolve().parents[1] / "data" / "teardown-static"
SERIES_2025 = DATA / "series-2025.02"
SERIES_2022 = DATA / "series-2022.11"
PCD_VARIANT = DATA / "pcd-variant-2022.11"
CLEAN = DATA / "leaves-page-state-2022.11"


def _module(firmware: Path) -> Path:
    return firmware / "modules" / "IoMmuDxe.debug"


@pytest.fixture(scope="module")
def checked() -> dict[Path, ts.StaticCheck]:
    """Each recorded module checked once from the teardown (a few seconds each)."""
    return {firmware: ts.check_firmware(firmware)
            for firmware in (SERIES_2025, SERIES_2022, PCD_VARIANT, CLEAN)}


def _offset_of(member: str, members: tuple[str, ...], header: int = 24) -> int:
    return header + 8 * members.index(member)


# ------------------------------------------------------ the tables


def _dwarf_struct(module: Path, typedef: str) -> dict[int, str]:
    """Member offset -> name of the struct ``typedef`` names, from the
    module's own DWARF (what the compiler laid out)."""
    from elftools.elf.elffile import ELFFile

    with module.open("rb") as handle:
        dwarf = ELFFile(handle).get_dwarf_info(relocate_dwarf_sections=False)
        for unit in dwarf.iter_CUs():
            for die in unit.iter_DIEs():
                name = die.attributes.get("DW_AT_name")
                if die.tag != "DW_TAG_typedef" or name is None or \
                        name.value.decode() != typedef or "DW_AT_type" not in die.attributes:
                    continue
                struct = die.get_DIE_from_attribute("DW_AT_type")
                members = {child.attributes["DW_AT_data_member_location"].value:
                           child.attributes["DW_AT_name"].value.decode()
                           for child in struct.iter_children()
                           if child.tag == "DW_TAG_member"}
                if members:
                    return members
    raise AssertionError(f"{module}: no struct {typedef} in the DWARF")


def test_the_boot_services_table_is_the_one_the_compiler_laid_out() -> None:
    """The offsets computed from the specification's member list (24-byte
    header, 8-byte pointers) are the DWARF's, member for member."""
    compiled = _dwarf_struct(_module(SERIES_2025), "EFI_BOOT_SERVICES")
    assert compiled.pop(0) == "Hdr"
    assert compiled == dict(ts.BOOT_SERVICES.members)
    assert ts.BOOT_SERVICES.member(0x140) == "LocateProtocol"
    assert ts.BOOT_SERVICES.member(0x18) == "RaiseTPL"


def test_the_pcd_protocol_table_is_the_one_the_compiler_laid_out() -> None:
    assert _dwarf_struct(_module(SERIES_2025), "PCD_PROTOCOL") == \
        dict(ts.PCD_PROTOCOL.members)


def test_boot_services_sits_where_the_system_table_has_it() -> None:
    assert _dwarf_struct(_module(SERIES_2025), "EFI_SYSTEM_TABLE")[
        ts.SYSTEM_TABLE_BOOT_SERVICES] == "BootServices"


# -------------------------------------------- negative: the TDX path


def test_the_series_teardown_reaches_locate_protocol_on_tdx(
        checked: dict[Path, ts.StaticCheck]) -> None:
    """Item 1 of the review: MemEncryptTdxClearPageSharedBit ->
    SetOrClearSharedBit -> gBS->LocateProtocol, once per page made private."""
    result = checked[SERIES_2025]
    assert result.verdict == "fail"
    locate = [f for f in result.findings if f.target == "gBS->LocateProtocol"
              and "SetOrClearSharedBit" in f.functions]
    assert len(locate) == 1
    finding = locate[0]
    assert finding.branch == "TDX"
    assert finding.kind == "boot-service" and finding.group == "protocol lookup"
    assert finding.functions[0] == ts.ENTRY
    assert finding.functions[-1] == "SetOrClearSharedBit"
    assert "MemEncryptTdxClearPageSharedBit" in finding.functions
    # The call goes through the member the spec's layout puts LocateProtocol at.
    offset = _offset_of("LocateProtocol", ts.BOOT_SERVICES_MEMBERS)
    assert finding.instruction.startswith("call") and f"+ {offset:#x}]" in finding.instruction
    assert finding.path_text().endswith("SetOrClearSharedBit → gBS->LocateProtocol")


def test_the_protocol_it_locates_is_called_through_a_pointer_the_check_cannot_follow(
        checked: dict[Path, ts.StaticCheck]) -> None:
    """MemoryAcceptProtocol->AcceptMemory: reported, not silently dropped."""
    indirect = [f for f in checked[SERIES_2025].findings if f.kind == "indirect"]
    assert indirect and all(f.branch == "TDX" for f in indirect)
    assert any(f.functions[-1] == "SetOrClearSharedBit" for f in indirect)


def test_inlined_frames_are_hops_of_the_path(checked: dict[Path, ts.StaticCheck]) -> None:
    """IoMmuReleaseReservedSharedMem is inlined into IoMmuTearDownAllMappings
    by LTO: the path names it all the same, marked inlined."""
    finding = next(f for f in checked[SERIES_2025].findings
                   if f.target == "gBS->LocateProtocol" and f.branch == "TDX")
    hops = {hop.function: hop.inlined for hop in finding.path}
    assert hops.get("IoMmuReleaseReservedSharedMem") is True
    assert hops[ts.ENTRY] is False


def test_no_path_of_the_series_runs_on_every_guest(
        checked: dict[Path, ts.StaticCheck]) -> None:
    """Every finding of the series sits on a guest-specific branch; the
    unmap loop's FreePages/FreePool (taken only when MemoryMapLocked is
    FALSE) is pruned by the TRUE the teardown passes."""
    for firmware in (SERIES_2025, SERIES_2022):
        result = checked[firmware]
        assert result.findings
        assert [f.line() for f in result.findings if f.branch == ts.NO_BRANCH] == []
        assert any(name.startswith("IoMmuUnmapWorker") for name in result.functions)


def test_unmap_with_the_map_unlocked_frees_pages() -> None:
    """Negative control of that pruning, on the same module: the protocol's
    Unmap() tail-jumps into the worker with MemoryMapLocked = 0 (in this
    recorded module; the series now passes the core's MemoryMapTerminated(),
    unknown to the check, which follows both branches)."""
    result = ts.check_firmware(SERIES_2025, entry="IoMmuUnmap")
    freed = {f.target for f in result.findings
             if f.branch == ts.NO_BRANCH and f.functions[:2] == ("IoMmuUnmap", "IoMmuUnmapWorker")}
    assert {"gBS->FreePages", "gBS->FreePool"} <= freed


def test_a_module_without_dwarf_is_checked_by_symbol_names() -> None:
    """The reference (unpatched) build's IoMmuDxe, ``.symtab`` only
    (``fw-ref/``): ``gBS`` and ``mPcd`` are known by name, and the paths
    are found; without the DWARF's inlined frames the TDX library's entry
    (inlined into the worker) is invisible, so the branch is ``none``: the
    stricter side."""
    stock = DATA.parent / "fw-ref"
    result = ts.check_firmware(stock, entry="IoMmuUnmap")
    targets = {(f.functions[-1], f.target, f.branch) for f in result.findings}
    assert ("SetOrClearSharedBit", "gBS->LocateProtocol", ts.NO_BRANCH) in targets
    assert ("LibPcdGet64", "mPcd->Get64", ts.NO_BRANCH) in targets
    assert ("IoMmuUnmapWorker", "gBS->FreePages", ts.NO_BRANCH) in targets


# ------------------------------------------- negative: the PCD variant


def test_the_pcd_variant_reads_a_dynamic_pcd_on_every_guest(
        checked: dict[Path, ts.StaticCheck]) -> None:
    """The round-one variant: PcdGet64 in IoMmuUnmapWorker's condition, on
    no guest-specific branch: the PCD protocol call and the lookup behind it."""
    result = checked[PCD_VARIANT]
    mine = [f for f in result.findings if f.branch == ts.NO_BRANCH]
    pcd = [f for f in mine if f.kind == "pcd-protocol"]
    assert pcd, [f.line() for f in result.findings]
    assert all("IoMmuUnmapWorker" in f.functions and "LibPcdGet64" in f.functions
               for f in pcd)
    assert {f.target for f in pcd} == {"mPcd->Get64"}
    lookup = [f for f in mine if f.target == "gBS->LocateProtocol"]
    assert lookup and lookup[0].functions[-2:] == ("LibPcdGet64", "GetPcdProtocol")


def test_without_the_variant_the_same_series_has_no_such_read(
        checked: dict[Path, ts.StaticCheck]) -> None:
    assert not [f for f in checked[SERIES_2022].findings
                if f.branch == ts.NO_BRANCH and f.kind == "pcd-protocol"]


# ----------------------------------------------------- positive control


def test_a_teardown_doing_memory_work_only_passes(
        checked: dict[Path, ts.StaticCheck]) -> None:
    result = checked[CLEAN]
    assert result.findings == ()
    assert result.verdict == "pass"
    # Not vacuous: the walk went through the unmap worker, the trace and
    # the memory helpers.
    reached = {ts.plain_name(name) for name in result.functions}
    assert {"IoMmuUnmapWorker", "DebugPrint", "CopyMem", "ZeroMem"} <= reached
    assert result.instructions > 1000


# ----------------------------------------------------- the branch rule


@pytest.mark.parametrize(("names", "files", "branch"), [
    (["IoMmuTearDownAllMappings", "MemEncryptTdxClearPageSharedBit"], [], "TDX"),
    (["TdIoWrite16"], [], "TDX"),
    (["MemEncryptSevSetPageEncMask", "MemEncryptTdxIsEnabled"], [], "SEV"),
    (["SetOrClearCBit.constprop.0"],
     ["/edk2/OvmfPkg/Library/BaseMemEncryptSevLib/X64/PeiDxeVirtualMemory.c"], "SEV"),
    (["SetOrClearSharedBit"],
     ["/edk2/OvmfPkg/Library/BaseMemEncryptTdxLib/MemoryEncryption.c"], "TDX"),
    (["IoMmuEmuSetPagesPrivate"], [], "emulation"),
    (["IoMmuUnmapWorker", "LibPcdGet64"], ["/edk2/OvmfPkg/IoMmuDxe/CcIoMmu.c"], None),
])
def test_the_branch_is_the_first_family_on_the_path(names: list[str], files: list[str],
                                                    branch: str | None) -> None:
    assert ts.branch_of(names, files) == branch


# ------------------------------------------------------------ the CLI


# ------------------------------------------------------------- guards


def test_the_tdx_lookup_is_all_no_guard_covers_on_the_old_series(
        checked: dict[Path, ts.StaticCheck]) -> None:
    """The paths the reviewed guards cover (first-use caches, page splits,
    interrupt restores) are reported apart; what stays a finding of the
    series before its TDX patch is exactly the per-page protocol lookup and
    the call through the protocol it found."""
    for firmware in (SERIES_2025, SERIES_2022):
        result = checked[firmware]
        assert {(f.functions[-1], f.target) for f in result.findings} == {
            ("SetOrClearSharedBit", "gBS->LocateProtocol"),
            ("SetOrClearSharedBit", "call qword ptr [rax] (not followed)")}
        assert {g.callee for _, g in result.guarded} >= {
            "AllocatePageTableMemory", "LibPcdGet64", "EnableInterrupts", "SetInterruptState"}
        assert all(g in ts.GUARDS and g.covers(f) for f, g in result.guarded)


def test_the_pcd_variant_is_not_covered_by_the_first_use_guard(
        checked: dict[Path, ts.StaticCheck]) -> None:
    """The guard is MemEncryptSevGetEncryptionMask's call of LibPcdGet64,
    not any PCD read: the variant's own PcdGet64 in the unmap worker fails."""
    pcd = [f for f in checked[PCD_VARIANT].findings if f.kind == "pcd-protocol"]
    assert pcd and all(f.branch == ts.NO_BRANCH and ts.guard_of(f) is None for f in pcd)


def _finding(*functions: str, target: str = "sti (interrupts enabled)") -> ts.Finding:
    return ts.Finding("interrupts", target, "SEV", tuple(ts.Hop(name) for name in functions),
                      0x1000, "sti")


def test_a_guard_covers_its_own_call_only() -> None:
    done = next(g for g in ts.GUARDS if g.caller == "CcExitVmgDone")
    assert ts.guard_of(_finding(ts.ENTRY, "PageStateChange", "CcExitVmgDone",
                                "EnableInterrupts")) == done
    # compiler suffixes are cut, as in the paths
    assert ts.guard_of(_finding(ts.ENTRY, "CcExitVmgDone.constprop.0",
                                "EnableInterrupts")) == done
    # negative controls: the same sink reached another way
    assert ts.guard_of(_finding(ts.ENTRY, "IoMmuUnmapWorker", "EnableInterrupts")) is None
    assert ts.guard_of(_finding(ts.ENTRY, "CcExitVmgDone", "Helper",
                                "EnableInterrupts")) is None
    assert ts.guard_of(_finding(ts.ENTRY, "EnableInterrupts", "CcExitVmgDone")) is None


def test_cli_prints_the_guarded_paths_under_their_guard(
        capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _cli(capsys, str(SERIES_2022))
    assert status == 1
    assert "guarded (reviewed, not failed): 12 path(s)" in out
    assert "  CcExitVmgDone → EnableInterrupts: re-enables interrupts only if" in out
    status, out, _ = _cli(capsys, str(SERIES_2022), "--json")
    data: dict[str, Any] = json.loads(out)
    assert len(data["guarded"]) == 12 and len(data["findings"]) == 2
    assert all(g["guard"]["why"] for g in data["guarded"])


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(["check-firmware", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_exit_1_prints_the_paths(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _cli(capsys, str(PCD_VARIANT))
    assert status == 1
    assert "static C3: fail" in out
    assert "IoMmuUnmapWorker → LibPcdGet64 → mPcd->Get64" in out


def test_cli_exit_0_on_the_positive_control(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _cli(capsys, str(CLEAN), "--json")
    assert status == 0
    data: dict[str, Any] = json.loads(out)
    assert data["verdict"] == "pass" and data["violations"] == [] and data["findings"] == []


def test_cli_json_names_the_path(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _cli(capsys, str(SERIES_2025), "--json")
    assert status == 1
    data = json.loads(out)
    texts = [f["text"] for f in data["findings"] if f["branch"] == "TDX"]
    assert any(t.endswith("SetOrClearSharedBit → gBS->LocateProtocol") for t in texts)
    assert all(v["check"] == "C3S" for v in data["violations"])
    assert data["checks"]["C3S"] == {"state": "failed"}


def test_cli_exit_2_for_a_directory_that_is_no_firmware_build(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _cli(capsys, str(tmp_path))
    assert status == 2 and out == ""
    assert "is not a firmware build" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "IoMmuDxe.debug").write_bytes(b"not an ELF")
    status, _, err = _cli(capsys, str(tmp_path))
    assert status == 2 and "not a readable ELF" in err
    status, _, err = _cli(capsys, str(tmp_path / "missing"))
    assert status == 2


def test_cli_exit_2_when_the_teardown_is_not_there(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _cli(capsys, str(CLEAN), "--entry", "NoSuchFunction")
    assert status == 2 and "no function NoSuchFunction" in err


# ------------------------------------------------ what build records


def test_build_records_the_verdict_without_failing(
        checked: dict[Path, ts.StaticCheck], tmp_path: Path) -> None:
    bad = ts.build_record(SERIES_2025 / "modules")
    expected = ts.manifest_record(checked[SERIES_2025])
    for key in ("check_version", "verdict", "entry", "findings", "branches", "functions"):
        assert bad[key] == expected[key], key
    assert bad["verdict"] == "fail"
    assert any("SetOrClearSharedBit → gBS->LocateProtocol" in line
               for line in bad["findings"])  # type: ignore[attr-defined]
    assert ts.build_record(CLEAN / "modules")["verdict"] == "pass"
    none = ts.build_record(tmp_path)
    assert none["verdict"] == "unchecked" and "IoMmuDxe.debug" in str(none["reason"])


def test_a_module_without_the_teardown_is_unchecked(tmp_path: Path) -> None:
    """Stock OVMF's IoMmuDxe (the reference build's, ``fw-ref/``) registers
    no teardown: build records it as unchecked, saying why."""
    stock = DATA.parent / "fw-ref" / "modules" / "IoMmuDxe.debug"
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "IoMmuDxe.debug").write_bytes(stock.read_bytes())
    record = ts.build_record(tmp_path / "modules")
    assert record["verdict"] == "unchecked"
    assert f"no function {ts.ENTRY}" in str(record["reason"])


# ------------------------------------------- compiled edge cases


@pytest.fixture(scope="module")
def edge_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``edge-cases.c`` built by the host's gcc into a linked ELF with DWARF."""
    import shutil
    import subprocess

    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build tests/data/teardown-static/edge-cases.c")
    out = tmp_path_factory.mktemp("edge") / "edge-cases.elf"
    subprocess.run(["gcc", "-O2", "-g", "-nostdlib", "-static", "-no-pie", "-fno-pie",
                    "-fno-omit-frame-pointer", "-mno-red-zone", "-fno-stack-protector",
                    "-fcf-protection=none", "-Wl,-e,Teardown", "-o", str(out),
                    str(DATA / "edge-cases.c")], check=True)
    return out


def test_compiled_edge_cases_each_found_with_its_service(edge_cases: Path) -> None:
    result = ts.check_module(edge_cases, entry="Teardown")
    by_function = {f.functions[1:]: f for f in result.findings}
    # gST->BootServices (offset 0x60 of the system table), then RaiseTPL.
    assert by_function[("ViaSystemTable",)].target == "gST->BootServices->RaiseTPL"
    # gBS spilled to the stack across a loop, reloaded, + 0x40, dereferenced.
    assert by_function[("Spilled",)].target == "gBS->AllocatePool"
    # A tail call (jmp FreeIt) is followed.
    assert by_function[("TailToFree", "FreeIt")].target == "gBS->FreePool"
    # A call through a global function pointer: reported, not followed.
    assert by_function[("Callback",)].kind == "indirect"
    # gBS kept in a callee-saved register across a call.
    assert by_function[("AcrossCall",)].target == "gBS->HandleProtocol"
    assert by_function[("AcrossCall",)].group == "protocol lookup"
    # Guarded(1): the constant decides the branch; nothing else is found.
    assert ("Guarded",) not in by_function
    assert len(result.findings) == 5, [f.line() for f in result.findings]


def test_compiled_guard_taken_with_the_other_constant(edge_cases: Path) -> None:
    result = ts.check_module(edge_cases, entry="Unlocked")
    assert [(f.functions, f.target) for f in result.findings] == \
        [(("Unlocked", "Guarded"), "gBS->FreePages")]


SHIELD = ts.Guard("Shield", "Sink", "a test guard")


def test_compiled_a_site_behind_a_guard_only_is_guarded(edge_cases: Path) -> None:
    result = ts.check_module(edge_cases, entry="GuardedOnly", guards=(SHIELD,))
    assert result.findings == ()
    assert [(f.functions, f.target, g) for f, g in result.guarded] == \
        [(("GuardedOnly", "Shield", "Sink"), "gBS->AllocatePages", SHIELD)]


def test_compiled_a_site_also_reached_around_the_guard_is_a_finding(edge_cases: Path) -> None:
    """The guarded way is the shorter one; the site fails all the same, by
    the way no guard covers."""
    result = ts.check_module(edge_cases, entry="GuardedAndNot", guards=(SHIELD,))
    assert [(f.functions, f.target) for f in result.findings] == \
        [(("GuardedAndNot", "Around", "Middle", "Sink"), "gBS->AllocatePages")]
    assert result.guarded == ()
    # without the guard, the shorter way is the one reported
    bare = ts.check_module(edge_cases, entry="GuardedAndNot", guards=())
    assert [f.functions for f in bare.findings] == [("GuardedAndNot", "Shield", "Sink")]
