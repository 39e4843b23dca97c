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


def test_the_2025_series_reaches_locate_protocol_on_tdx(
        ebs_baseline_firmware: Callable[[str], edk2.Firmware]) -> None:
    result = ts.check_firmware(ebs_baseline_firmware("2025.02").path)
    found = [f for f in result.findings if f.target == "gBS->LocateProtocol"
             and f.functions[-1] == "SetOrClearSharedBit"]
    assert [f.branch for f in found] == ["TDX"], [f.line() for f in result.findings]
    assert "MemEncryptTdxClearPageSharedBit" in found[0].functions


@pytest.mark.parametrize("baseline", sorted(edk2.BASELINES))
def test_no_path_of_a_series_runs_on_every_guest(
        baseline: str, ebs_baseline_firmware: Callable[[str], edk2.Firmware]) -> None:
    result = ts.check_firmware(ebs_baseline_firmware(baseline).path)
    assert result.functions and all(f.branch != ts.NO_BRANCH for f in result.findings), \
        [f.line() for f in result.findings]


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
