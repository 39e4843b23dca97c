"""explain-log on real logs (tests/data/explain/, made by make_explain_logs.py):
stock OVMF, Debian's packaged build, a #PF and an ASSERT injected into our
build, a log cut mid-line; and on bad input. Expected values are read from
the logs themselves and from the fault patch, not written here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from htmltags import start_tags

from harness import cli
from harness.analysis import explain, explain_reader
from harness.errors import LogFormatError

DATA = Path(__file__).resolve().parents[1] / "data"
EXPLAIN = DATA / "explain"
STOCK = EXPLAIN / "stock-empty-disk.log"
CUT = EXPLAIN / "stock-cut.log"
PF_SERIAL = EXPLAIN / "fault-pf-serial.log"
PF_DEBUG = EXPLAIN / "fault-pf.log"
ASSERT_LOG = EXPLAIN / "fault-assert.log"
DEBIAN = EXPLAIN / "debian-packaged-serial.log"
FW_FAULT = EXPLAIN / "fw-fault"

LOAD_LINE = re.compile(rb"Loading (?:driver|PEIM) at 0x[0-9A-F]+ EntryPoint=0x[0-9A-F]+ \S+\.efi")


def test_a_stock_debug_log_gives_its_load_map_boot_options_and_end() -> None:
    exp = explain.explain_log(STOCK)
    raw = STOCK.read_bytes()
    boot = exp.boot
    # every load line of the file, DxeIpl's and the core's own line for the DXE core once
    assert len(boot.images) == len(LOAD_LINE.findall(raw))
    assert sum(1 for i in boot.images if i.start_failed) == raw.count(b"start failed:")
    assert list(boot.phases) == ["SEC", "PEI", "DXE", "BDS"]
    assert exp.identity[0].startswith("OVMF")
    assert exp.crlf and not exp.traced
    facts = {fact: value for fact, value, _ in explain.platform_facts(boot)}
    assert facts["sev"] == "AmdSevDxe did not start (Unsupported): not a SEV guest"
    assert facts["iommu"].startswith("IoMmuDxe loaded")
    # the empty disk first, then the shell
    first, shell = boot.options
    assert first.description == "UEFI Misc Device"
    assert first.outcome == "no boot file found on the device"
    assert shell.description == "EFI Internal Shell" and shell.image == "Shell.efi"
    assert shell.outcome == "Shell.efi running when the log ends"
    assert exp.end.summary.startswith('the log ends in BDS: boot option "EFI Internal Shell"')
    assert not exp.end.cut_mid_line and not boot.crashes


def test_the_console_says_the_same_boot_in_its_own_words() -> None:
    """The serial log of the same boot: BdsDxe's own lines, with status."""
    exp = explain.explain_log(EXPLAIN / "stock-empty-disk-serial.log")
    assert exp.ansi
    assert [(a.option, a.outcome) for a in exp.boot.options] == [
        ("Boot0001", "failed to load: Not Found"), ("Boot0002", "started")]
    assert "UEFI 2.70, firmware vendor EDK II, revision 0x00010000" in exp.identity


def test_debians_packaged_ovmf_prints_only_its_console() -> None:
    exp = explain.explain_log(DEBIAN)
    assert [(a.option, a.description, a.outcome) for a in exp.boot.options] == [
        ("Boot0001", "EFI Internal Shell", "started")]
    assert not exp.boot.images


def test_a_debug_log_ending_in_the_vc_handlers_mmio_refusal_is_a_crash(tmp_path: Path) -> None:
    """A real boot under the emulated SEV-ES (the MMCONFIG variant): the
    debug log ends with the #VC handler's refusal, its #GP dump is on the
    serial port. Without that line the same log is a hang (the control)."""
    log = EXPLAIN / "emulated-sev-es-mmio-refused.log"
    last = log.read_bytes().splitlines()[-1].decode()
    address = re.fullmatch(r"MMIO using encrypted memory: ([0-9A-F]+)", last)
    assert address is not None
    exp = explain.explain_log(log)
    assert exp.end.kind == "crash" and not exp.boot.crashes
    assert (f"refusing MMIO through an encrypted mapping at 0x{address[1]} (line {exp.lines}"
            in exp.end.summary)
    assert "whose dump goes to the serial port" in exp.end.summary
    assert explain.confidential(exp.boot).kind == "sev-es"
    shorter = tmp_path / "shorter.log"
    shorter.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-1]))
    assert explain.explain_log(shorter).end.kind == "hang-in-image"
    serial = explain.explain_log(EXPLAIN / "emulated-sev-es-mmio-refused-serial.log")
    assert serial.end.kind == "crash" and serial.boot.crashes[-1].kind == "exception"


def test_a_log_cut_mid_line_says_where_it_ends() -> None:
    exp = explain.explain_log(CUT)
    raw = CUT.read_bytes()
    assert not raw.endswith(b"\n")
    assert exp.end.cut_mid_line and exp.lines == raw.count(b"\n") + 1
    last = LOAD_LINE.findall(raw)[-1].split()[-1].decode()
    assert exp.boot.images[-1].name + ".efi" == last
    assert f"the last image loaded ({last}" in exp.end.summary
    assert f"its last line ({exp.lines}) is cut in the middle" in exp.end.summary
    # the control: the whole log is not cut
    assert not explain.explain_log(STOCK).end.cut_mid_line


def test_the_injected_page_fault_names_function_and_source_line(
        fault_line: Callable[[str], int]) -> None:
    exp = explain.explain_log(PF_SERIAL, FW_FAULT)
    (crash,) = exp.boot.crashes
    assert crash.summary == "0E (#PF - Page-Fault)"
    assert crash.registers["CR2"] == 0x7F0000000000     # the patch's ADVERSARY_UNMAPPED
    assert crash.function == "EbsAdversaryDxe!EbsAdversaryEntryPoint"
    assert crash.functions[-1] == "_ModuleEntryPoint"    # LTO inlined it there
    assert crash.source.endswith(
        f"OvmfPkg/EbsAdversaryDxe/EbsAdversaryDxe.c:{fault_line('EBS-FAULT-PF')}")
    assert "EbsAdversaryDxe!EbsAdversaryEntryPoint" in exp.end.summary


def test_without_symbols_the_fault_is_image_plus_offset() -> None:
    exp = explain.explain_log(PF_SERIAL)
    (crash,) = exp.boot.crashes
    assert crash.image_base is not None and crash.rip is not None
    assert crash.where == f"EbsAdversaryDxe+{crash.rip - crash.image_base:#x}"
    assert crash.module_path.endswith("/EbsAdversaryDxe.dll") and not crash.source


def test_symbols_of_another_build_are_not_used(tmp_path: Path) -> None:
    """The control: the same fault against a .debug whose entry point moved."""
    modules = tmp_path / "modules"
    modules.mkdir()
    log = tmp_path / "pf.log"
    text = PF_SERIAL.read_text(encoding="latin-1")
    entry = re.search(r"EntryPoint=([0-9A-F]+)", text)
    assert entry is not None
    moved = f"{int(entry.group(1), 16) + 0x10:016X}"
    log.write_text(text.replace(entry.group(1), moved), encoding="latin-1")
    (modules / "EbsAdversaryDxe.debug").write_bytes(
        (FW_FAULT / "modules" / "EbsAdversaryDxe.debug").read_bytes())
    (crash,) = explain.explain_log(log, tmp_path).boot.crashes
    assert not crash.source and "!" not in crash.where


def test_the_injected_assert_names_file_line_and_expression(
        fault_line: Callable[[str], int]) -> None:
    exp = explain.explain_log(ASSERT_LOG)
    (crash,) = exp.boot.crashes
    line = ASSERT_LOG.read_text(encoding="latin-1").splitlines()[crash.line - 1]
    assert line.startswith("ASSERT ")
    assert crash.kind == "assert"
    assert crash.source.endswith(
        f"OvmfPkg/EbsAdversaryDxe/EbsAdversaryDxe.c:{fault_line('EBS-FAULT-ASSERT')}")
    assert crash.expression == 'AsciiStrCmp (Text, "assert") != 0'
    assert crash.last_image.startswith("EbsAdversaryDxe.efi")
    assert exp.end.summary.startswith(f"the log ends after an ASSERT at line {crash.line}")
    # the control of the guarded teardown's ASSERT (test_emulated_sev_es.py):
    # a driver's entry point is no teardown
    assert crash.teardown is None and not crash.during and "teardown" not in exp.end.summary


def test_our_trace_gets_the_analyze_log_verdicts_and_explain_exits_0(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A log that fails V1/V3/V4 is explained with its verdicts, exit 0:
    judging is analyze-log's (which exits 1 on it: the control)."""
    log = str(DATA / "legacy-depth2.log")
    assert cli.main(["explain-log", log, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == cli.JSON_SCHEMA
    assert data["ebs"]["verdict"] == "fail"
    assert {v["check"] for v in data["ebs"]["violations"]} == {"V1", "V3", "V4", "V5"}
    assert data["explanation"]["traced"] is True
    assert data["explanation"]["end"]["summary"].startswith(
        "the log ends after ExitBootServices() returned to EbsProbe.efi")
    assert cli.main(["analyze-log", log]) == 1
    assert cli.main(["explain-log", str(STOCK)]) == 0
    assert "no EBS verdict" in capsys.readouterr().out


def test_the_html_draws_the_load_map_and_the_crash(tmp_path: Path) -> None:
    page = tmp_path / "pf.html"
    assert cli.main(["explain-log", str(PF_DEBUG), "--html", str(page)]) == 0
    tags = start_tags(page.read_text())
    assert not any(t == "script" or a.get("src") for t, a in tags), "self-contained"
    rects = [a for t, a in tags if t == "rect"]
    assert len(rects) == len(explain.explain_log(PF_DEBUG).boot.images)
    page = tmp_path / "pf-serial.html"
    assert cli.main(["explain-log", str(PF_SERIAL), "--firmware", str(FW_FAULT),
                     "--html", str(page)]) == 0
    marks = [a for t, a in start_tags(page.read_text())
             if t == "line" and a.get("stroke") == "#b00"]
    assert len(marks) == 1, "the crash's RIP is marked on the image the dump names"
    assert "EbsAdversaryDxe!EbsAdversaryEntryPoint" in page.read_text()


@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty file"),
    (b"\x7fELF\x02\x01\x01\x00" + bytes(200), "a binary file (NUL byte at offset 7)"),
    (b"just some text\nthat is no boot log\n", "no line of an OVMF boot log in 2 lines"),
], ids=["empty", "binary", "garbage"])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, content: bytes, message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "input.log"
    path.write_bytes(content)
    with pytest.raises(LogFormatError, match=re.escape(message)):
        explain.explain_log(path)
    assert cli.main(["explain-log", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert cli.main(["explain-log", str(tmp_path / "missing.log")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_reboot_loop_and_an_endless_line_stay_bounded(tmp_path: Path) -> None:
    """Three boots in one capture: the last explained, the earlier two
    summarized; a line longer than the reader's limit is cut and said so."""
    log = tmp_path / "loop.log"
    stock = STOCK.read_bytes()
    log.write_bytes(stock + b"x" * (200 * 1024) + b"\n" + stock + stock)
    exp = explain.explain_log(log)
    assert len(exp.earlier_boots) == 2
    assert all("then the firmware started again" in e for e in exp.earlier_boots)
    assert len(exp.boot.images) == len(LOAD_LINE.findall(stock))
    assert any("longer than" in note for note in exp.notes)


# ------------------------------------------------- odd input, from review


def _explain(tmp_path: Path, text: str) -> explain.Explanation:
    path = tmp_path / "odd.log"
    path.write_text(text, encoding="latin-1")
    return explain.explain_log(path)


SEC = "SecCoreStartupWithStack(0xFFFCC000, 0x820000)\n"
LOAD = "Loading driver at 0x0000EC55000 EntryPoint=0x0000EC56E49 IoMmuDxe.efi\n"


def test_odd_lines_are_read_not_crashed_on(tmp_path: Path) -> None:
    # a DXE core line whose entry is below its base: not an image
    exp = _explain(tmp_path, SEC + "Loading DXE CORE at 0x2000 EntryPoint=0x1000\n" + LOAD)
    assert [i.name for i in exp.boot.images] == ["IoMmuDxe"]
    # an exception header cut before its Apic ID; an ASSERT without a line number
    exp = _explain(tmp_path, SEC + LOAD + "!!!! X64 Exception Type - 0E(#PF - Page-Fault)\n")
    assert [c.summary for c in exp.boot.crashes] == ["0E (#PF - Page-Fault)"]
    assert exp.end.summary.startswith("the log ends after a CPU exception 0E")
    exp = _explain(tmp_path, SEC + "ASSERT [PcdDxe] Service.c: Size != 0\n")
    assert (exp.boot.crashes[0].source, exp.boot.crashes[0].module) == ("Service.c", "PcdDxe")


def test_a_reset_inside_an_exception_dump_starts_a_new_run(tmp_path: Path) -> None:
    dump = ("!!!! X64 Exception Type - 0D(#GP - General Protection)  CPU Apic ID - 00000000 !!!!\n"
            "RIP  - 000000000EC5736D, CS  - 0000000000000038, RFLAGS - 0000000000000206\n")
    exp = _explain(tmp_path, SEC + LOAD + dump + SEC + LOAD)
    assert len(exp.earlier_boots) == 1 and not exp.boot.crashes
    assert [i.name for i in exp.boot.images] == ["IoMmuDxe"]


def test_ia32_dumps_and_dumps_without_a_pdb_name_the_loaded_image(tmp_path: Path) -> None:
    dump = ("!!!! IA32 Exception Type - 0E(#PF - Page-Fault)  CPU Apic ID - 00000000 !!!!\n"
            "EIP  - 0EC5736D, CS  - 00000010, EFLAGS - 00010206\n"
            "!!!! Find image based on IP(0xEC5736D) (No PDB)  (ImageBase=000000000EC55000, "
            "EntryPoint=000000000EC56E49) !!!!\n")
    (crash,) = _explain(tmp_path, SEC + LOAD + dump).boot.crashes
    assert crash.rip == 0xEC5736D and crash.where == "IoMmuDxe+0x236d"


def test_a_boot_option_retried_is_a_new_attempt(tmp_path: Path) -> None:
    lines = ['BdsDxe: loading Boot0001 "PXE " from PciRoot(0x0)/Pci(0x2,0x0)',
             'BdsDxe: failed to load Boot0001 "PXE " from PciRoot(0x0)/Pci(0x2,0x0): Not Found',
             'BdsDxe: failed to load Boot0002 "Disk" from PciRoot(0x0)/Pci(0x3,0x0): Not Found',
             'BdsDxe: loading Boot0001 "PXE " from PciRoot(0x0)/Pci(0x2,0x0)',
             'BdsDxe: starting Boot0001 "PXE " from PciRoot(0x0)/Pci(0x2,0x0)']
    exp = _explain(tmp_path, "\n".join(lines) + "\n")
    assert [(a.option, a.description, a.outcome) for a in exp.boot.options] == [
        ("Boot0001", "PXE", "failed to load: Not Found"),
        ("Boot0002", "Disk", "failed to load: Not Found"),
        ("Boot0001", "PXE", "started")]
    assert exp.end.summary == 'the log ends in BDS: boot option "PXE" (started)'


def test_past_the_caps_the_last_one_is_kept_and_the_rest_counted(tmp_path: Path) -> None:
    asserts = "".join(f"ASSERT [M] f.c({n}): x\n" for n in range(explain_reader.MAX_CRASHES + 11))
    exp = _explain(tmp_path, SEC + asserts)
    assert len(exp.boot.crashes) == explain_reader.MAX_CRASHES
    assert exp.boot.crashes[-1].source == f"f.c:{explain_reader.MAX_CRASHES + 10}"
    assert exp.end.summary.startswith(
        f"the log ends after an ASSERT at line {explain_reader.MAX_CRASHES + 12}")
    assert any("11 crashes between the first" in note for note in exp.notes)


def test_a_trace_before_a_reset_still_counts(tmp_path: Path) -> None:
    exp = _explain(tmp_path, SEC + "EBST version v=1 module=DxeCore\n" + SEC + LOAD)
    assert exp.traced and any("instrumented" in line for line in exp.identity)


def test_a_pipe_is_read_once(tmp_path: Path) -> None:
    """``explain-log <(xzcat log.xz)``: no seeking back."""
    proc = subprocess.run(
        ["bash", "-c", f'{sys.executable} -m harness explain-log <(cat "{STOCK}") --json'],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)["explanation"]
    assert len(data["images"]) == len(explain.explain_log(STOCK).boot.images)


def test_the_2025_02_stock_log_reads_the_same_way() -> None:
    """Debian 13's edk2 2025.02, stock, the same boot: its load map, its
    failed starts, the same two boot options and their outcomes."""
    path = EXPLAIN / "stock-2025.02-empty-disk.log"
    exp = explain.explain_log(path)
    raw = path.read_bytes()
    assert len(exp.boot.images) == len(LOAD_LINE.findall(raw))
    assert sum(1 for i in exp.boot.images if i.start_failed) == raw.count(b"start failed:")
    assert list(exp.boot.phases) == ["SEC", "PEI", "DXE", "BDS"]
    assert [(a.description, a.outcome) for a in exp.boot.options] == [
        ("UEFI Misc Device", "no boot file found on the device"),
        ("EFI Internal Shell", "Shell.efi running when the log ends")]
