"""The core story on every edk2 baseline of the series (2025.02 and
2022.11), under the emulated SEV, so on OVMF's SEV path: the adversary
re-signals twice; the DXE core's teardown comes after it and nothing is
left mapped or shared, while the fallback scheme (``legacy``) tears down
before its last stage and leaves its mapping live into the OS. And the
Linux guest boots on each. The full scenario matrix runs on the default
baseline (``--ebs-edk2``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness import linux
from harness.analysis import trace
from harness.build import edk2
from harness.linux import LinuxBoot, LinuxImage
from harness.scenario import RunResult, Scenario
from harness.vm import host

BASELINES = list(edk2.BASELINES)


@pytest.mark.sev_emulated
@pytest.mark.parametrize("baseline", BASELINES)
def test_callback_holds_and_legacy_loses_on_every_baseline(
        baseline: str, ebs_baseline_firmware: Callable[[str], edk2.Firmware],
        ebs_run_probe: Callable[..., RunResult]) -> None:
    firmware = ebs_baseline_firmware(baseline)
    assert firmware.baseline == baseline
    story = Scenario(requeue_depth=2, sev="emulated", dump=True)
    callback = ebs_run_probe(story, firmware=firmware)
    assert callback.passed, callback.failed_checks()
    legacy = ebs_run_probe(Scenario(ebs_mode="legacy", requeue_depth=2, sev="emulated",
                                    dump=True), firmware=firmware)
    assert {"V1", "V3", "V4", "D1"} <= legacy.failed_checks()


@pytest.mark.tcg
@pytest.mark.parametrize("baseline", BASELINES)
def test_linux_boots_on_every_baseline(baseline: str,
                                       ebs_baseline_firmware: Callable[[str], edk2.Firmware],
                                       ebs_linux_image: LinuxImage, ebs_host_caps: host.HostCaps,
                                       tmp_path: Path) -> None:
    """The guest's kernel finds the canary disk the firmware drove before
    ExitBootServices (IOMMU emulation, the DXE core's teardown)."""
    firmware = ebs_baseline_firmware(baseline)
    with linux.boot_linux(firmware, ebs_linux_image, LinuxBoot(ebs_mode="callback", accel="tcg"),
                          tmp_path, caps=ebs_host_caps) as run:
        _, out, _ = run.session.run(f"dd if=/dev/vdb bs={len(run.canary)} count=1 2>/dev/null")
        assert out.encode() == run.canary
        report, _ = trace.analyze_log(run.debug_log, firmware.path)
    assert report.violations == (), [v.as_json() for v in report.violations]
    succeeded = [a for a in report.timeline.attempts if a.succeeded]
    teardown, = succeeded[0].teardowns
    assert teardown.begin.scheme == "callback" and teardown.begin.live > 0
    assert teardown.end is not None and teardown.end.live == 0
