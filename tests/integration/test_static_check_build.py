"""The static C3 check (docs/static-check.md) on firmware built here: the
series of each baseline, the PCD variant (negative control) and the variant
whose teardown leaves the page state alone (positive control), and what
``build`` records of it in the manifest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness.analysis import teardown_static as ts
from harness.build import edk2
from harness.build.progress import StderrProgress

pytestmark = pytest.mark.build

VARIANTS = Path(__file__).resolve().parents[1] / "data" / "firmware-variants"


@pytest.fixture(scope="module")
def variant() -> Callable[[str], edk2.Firmware]:
    built: dict[str, edk2.Firmware] = {}

    def get(name: str) -> edk2.Firmware:
        if name not in built:
            built[name] = edk2.build_variant(VARIANTS / name,
                                             progress=StderrProgress()).output
        return built[name]
    return get


@pytest.mark.parametrize("baseline", sorted(edk2.BASELINES))
def test_the_series_makes_pages_private_without_a_protocol_lookup(
        baseline: str, ebs_baseline_firmware: Callable[[str], edk2.Firmware]) -> None:
    """The TDX path of the teardown accepts the pages it makes private with
    TdxLib (the series' BaseMemEncryptTdxLib patch): no protocol lookup and
    no call through a protocol on it. The recorded modules of the series
    before that patch find both (tests/unit/test_teardown_static.py, the
    negative control)."""
    result = ts.check_firmware(ebs_baseline_firmware(baseline).path)
    assert any("MemEncryptTdxClearPageSharedBit" in f.functions for f in result.every_path), \
        "the TDX path is no longer followed: the control below proves nothing"
    tdx = [f.line() for f in result.every_path if "SetOrClearSharedBit" in f.functions]
    assert tdx == [], tdx
    assert not [f for f in result.every_path if f.target == "gBS->LocateProtocol"
                and f.branch == "TDX"], [f.line() for f in result.every_path]


@pytest.mark.parametrize("baseline", sorted(edk2.BASELINES))
def test_the_series_passes_with_every_path_it_has_guarded(
        baseline: str, ebs_baseline_firmware: Callable[[str], edk2.Firmware]) -> None:
    """C3S on the series: no path but those a reviewed guard covers (a
    first-use cache, a page split, an interrupt state restored), each on a
    guest branch. The recorded modules of the series before its TDX patch
    fail it (tests/unit/test_teardown_static.py)."""
    result = ts.check_firmware(ebs_baseline_firmware(baseline).path)
    assert result.verdict == "pass", [f.line() for f in result.findings]
    assert result.guarded, "nothing guarded: the guards' control proves nothing"
    assert {g.callee for _, g in result.guarded} >= {
        "AllocatePageTableMemory", "LibPcdGet64", "EnableInterrupts"}
    assert {f.branch for f, _ in result.guarded} == {"SEV", "TDX", "emulation"}


@pytest.mark.parametrize("baseline", sorted(edk2.BASELINES))
def test_no_path_of_a_series_runs_on_every_guest(
        baseline: str, ebs_baseline_firmware: Callable[[str], edk2.Firmware]) -> None:
    result = ts.check_firmware(ebs_baseline_firmware(baseline).path)
    assert result.functions and all(f.branch != ts.NO_BRANCH for f in result.every_path), \
        [f.line() for f in result.every_path]


def test_the_pcd_variant_is_found_on_every_guest(
        variant: Callable[[str], edk2.Firmware]) -> None:
    result = ts.check_firmware(variant("teardown-reads-a-dynamic-pcd.patch").path)
    pcd = [f for f in result.findings if f.branch == ts.NO_BRANCH and f.kind == "pcd-protocol"]
    assert pcd and all({"IoMmuUnmapWorker", "LibPcdGet64"} <= set(f.functions) for f in pcd)


def test_a_teardown_doing_memory_work_only_passes_and_build_recorded_it(
        variant: Callable[[str], edk2.Firmware]) -> None:
    firmware = variant("teardown-leaves-page-state.patch")
    result = ts.check_firmware(firmware.path)
    assert result.verdict == "pass", [f.line() for f in result.findings]
    record = firmware.manifest[ts.MANIFEST_KEY]
    assert isinstance(record, dict)
    assert record["verdict"] == "pass" and record["findings"] == []
    assert record["functions"] == len(result.functions)
