"""harness.analysis.pagestates: S1 and S2 from an emulated SEV-SNP's trace.

The recorded trace (tests/data/devices/emulated-snp-callback.log, see its
README.md) is a real boot under ``--sev emulated-snp``: both hold. Each
control below changes it as a broken firmware would have changed it and
must fail exactly its check; the firmware variants that do the same on real
boots are in tests/integration/test_emulated_snp.py.
"""

from __future__ import annotations

from pathlib import Path

from harness.analysis import checks
from harness.analysis.debuglog import parse_text
from harness.analysis.devices import NO_PAGE_STATES, analyze_device_trace, judge, memmap_in_log
from harness.analysis.devicetrace import parse_device_trace
from harness.analysis.pagestates import NO_MEMORY_MAP

DATA = Path(__file__).resolve().parent.parent / "data" / "devices"
SNP = DATA / "emulated-snp-callback.log"
ZOO = DATA / "zoo-callback.log"
BEGIN = "key 0x3eb1"
#: The teardown makes the reserved pool's first slot private, then validates it.
PRIVATE = "sev_snp_page_state gpa 0xdc6c000 pages 1 private by psc\n"
VALIDATED = "sev_snp_pvalidate gpa 0xdc6c000 pages 1 validate 1\n"


def _states(report: object) -> dict[str, str]:
    outcomes = report.outcomes  # type: ignore[attr-defined]
    return {c: outcomes[c].state.value for c in ("S1", "S2")}


#: A memory map as the probe prints it: conventional memory below the
#: firmware's 8 MiB, boot services data over the reserved DMA pool's slot.
MEMMAP = [(7, 0x100000, 0x700), (4, 0xDC6C000, 0x10)]
#: The GHCB page PlatformPei shares (shared for good: D2 names it by design).
GHCB = 0xFF76000


def _changed(tmp_path: Path, old: str, new: str) -> Path:
    text = SNP.read_text()
    assert text.count(old) == 1, old
    path = tmp_path / "device-trace.log"
    path.write_text(text.replace(old, new))
    return path


def _after_begin(tmp_path: Path, line: str) -> Path:
    """The recorded trace with ``line`` right after the teardown's first
    validation."""
    return _changed(tmp_path, PRIVATE + VALIDATED, PRIVATE + VALIDATED + line)


def test_the_recorded_boot_holds_s1_and_s2() -> None:
    report = analyze_device_trace(SNP)
    pages = report.page_states
    assert pages is not None and not report.violations
    assert _states(report) == {"S1": "held", "S2": "held"}
    assert pages.made_private == pages.revalidated == 1412
    assert [(gpa, kind) for gpa, _, kind in pages.launched] == [
        (0x800000, "sec-mem"), (0x80A000, "sec-mem"), (0x80D000, "secrets"),
        (0x80E000, "cpuid"), (0x80F000, "zero"), (0x810000, "sec-mem")]
    assert report.outcomes["W1"].state is checks.State.HELD


def test_a_page_made_private_and_never_validated_fails_s1(tmp_path: Path) -> None:
    report = analyze_device_trace(_changed(tmp_path, PRIVATE + VALIDATED, PRIVATE))
    assert _states(report) == {"S1": "failed", "S2": "held"}
    violation, = report.violations
    assert violation.detail.startswith("1 page(s) the teardown made private were not "
                                       "validated at the teardown's end (line 1074): "
                                       "0xdc6c000+0x1000"), violation.detail


def test_a_page_rescinded_after_it_was_validated_fails_s1(tmp_path: Path) -> None:
    report = analyze_device_trace(_after_begin(
        tmp_path, "sev_snp_pvalidate gpa 0xdc6c000 pages 1 validate 0\n"))
    assert _states(report) == {"S1": "failed", "S2": "held"}
    assert "0xdc6c000+0x1000" in report.violations[0].detail


def test_a_page_validated_twice_fails_s1(tmp_path: Path) -> None:
    report = analyze_device_trace(_after_begin(
        tmp_path, "sev_snp_pvalidate_no_update gpa 0xdc6c000 addr 0xdc6c000 validate 1\n"))
    assert _states(report) == {"S1": "failed", "S2": "held"}
    violation, = report.violations
    assert violation.detail.startswith("page 0xdc6c000 validated twice: PVALIDATE at "
                                       "0xdc6c000 changed nothing (CF set) at line"), \
        violation.detail


def test_an_access_to_a_page_not_validated_fails_s2(tmp_path: Path) -> None:
    report = analyze_device_trace(_after_begin(
        tmp_path, "sev_snp_not_validated addr 0xdc6c000 gpa 0xdc6c000 access 0\n"))
    assert _states(report) == {"S1": "held", "S2": "failed"}
    violation, = report.violations
    assert violation.detail == ("a read at 0xdc6c000 reached gpa 0xdc6c000, a private page "
                                "not validated (#VC 0x404) at line 1036, inside the teardown")


def test_a_trace_without_page_states_judges_neither() -> None:
    """Not an emulated SEV-SNP guest (the zoo's plain boot): not judged, with
    the reason, while W1 and W2 are."""
    report = analyze_device_trace(ZOO)
    assert report.page_states is None
    assert {c: report.outcomes[c].reason for c in ("S1", "S2")} == {
        "S1": NO_PAGE_STATES, "S2": NO_PAGE_STATES}
    assert report.outcomes["W1"].state is not checks.State.NOT_JUDGED


def test_s3_holds_when_the_os_is_handed_validated_pages() -> None:
    report = judge(parse_device_trace(SNP), memmap=MEMMAP)
    assert report.outcomes["S3"].state is checks.State.HELD
    assert report.page_states is not None and report.page_states.usable_pages == 0x710


def test_a_usable_page_left_unvalidated_fails_s3(tmp_path: Path) -> None:
    """The pool's page rescinded after the teardown validated it: S1 (the
    teardown's page) and S3 (the OS is handed it)."""
    path = _after_begin(tmp_path, "sev_snp_pvalidate gpa 0xdc6c000 pages 1 validate 0\n")
    report = judge(parse_device_trace(path), memmap=MEMMAP)
    assert {v.check for v in report.violations} == {"S1", "S3"}
    s3, = (v for v in report.violations if v.check == "S3")
    assert s3.detail == ("1 page(s) the OS is handed as its memory (EfiBootServicesData) are "
                         "not private and validated when the guest parks after "
                         "ExitBootServices(): 0xdc6c000+0x1000")


def test_s3_judges_only_the_memory_the_os_uses() -> None:
    """The shared GHCB page as EfiBootServicesData fails S3; as memory the OS
    must accept itself (EfiUnacceptedMemoryType, 15) or reserved memory, it
    is not S3's (the control)."""
    trace = parse_device_trace(SNP)
    assert judge(trace, memmap=[(4, GHCB, 1)]).outcomes["S3"].state is checks.State.FAILED
    for kind in (15, 0):
        assert judge(trace, memmap=[(kind, GHCB, 1)]).outcomes["S3"].state is \
            checks.State.HELD


def test_without_the_probes_memory_map_s3_is_not_judged() -> None:
    report = analyze_device_trace(SNP)
    assert report.outcomes["S3"].state is checks.State.NOT_JUDGED
    assert report.outcomes["S3"].reason == NO_MEMORY_MAP


def _memmap_events(lines: list[str]) -> list[object]:
    text = "EBST version v=1 module=EbsProbe\n" + "".join(f"EBST probe {line}\n" for line in lines)
    return list(parse_text(text).events)


def test_a_cut_memory_map_is_not_judged() -> None:
    """The end line counts the descriptors: a map that lost one (or its end)
    is not judged rather than judged in part."""
    whole = ["step=memmap type=7 start=0x100000 pages=0x700",
             "step=memmap type=4 start=0xdc6c000 pages=0x10",
             "step=memmap-end count=2 desc-size=48"]
    assert memmap_in_log(_memmap_events(whole)) == (
        [(7, 0x100000, 0x700), (4, 0xDC6C000, 0x10)], "")
    for cut, said in ((whole[1:], "2"), (whole[:2], "no count")):
        found, why = memmap_in_log(_memmap_events(cut))
        assert found == [] and why.endswith(f"the end line says {said}"), why
        report = judge(parse_device_trace(SNP), memmap=found, memmap_cut=why)
        assert report.outcomes["S3"].reason == why
