"""V6 on real boots of 2025.02 under the emulated SEV, where IoMmuDxe serves
bounce buffers from its reserved pool: the probe maps two 512 KiB buffers
at once (the pool's 1 MiB size class). On the baseline the series builds on
(Debian's tree and upstream's e27cfda33b, ``ovmf-patches/edk2-2025.02/base/``)
each gets pages of its own; on Debian's tree without the fix both get the
one 1 MiB slot, and V6 fails (the negative control)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from harness import scenario
from harness.analysis import trace
from harness.build import edk2
from harness.build.progress import StderrProgress

pytestmark = pytest.mark.sev_emulated

CHOSEN = scenario.Scenario(ebs_mode="callback", sev="emulated")


def large_maps(result: scenario.RunResult) -> tuple[str | None, str | None]:
    """The device addresses of the probe's two 512 KiB mappings."""
    step, = (e for e in result.log.timeline.trace.events
             if isinstance(e, trace.Probe) and e.step == "large-maps")
    assert step.get("status0") == "0x0" and step.get("status1") == "0x0", step.text
    assert step.get("bytes0") == step.get("bytes1") == step.get("bytes"), step.text
    return step.get("dev0"), step.get("dev1")


def test_two_live_mappings_get_bounce_pages_of_their_own(
        ebs_run_probe: Callable[..., scenario.RunResult],
        ebs_baseline_firmware: Callable[[str], edk2.Firmware]) -> None:
    result = ebs_run_probe(CHOSEN, ebs_baseline_firmware("2025.02"))
    dev0, dev1 = large_maps(result)
    assert dev0 != dev1
    assert result.passed, [v.detail for v in result.violations]


def test_without_upstreams_fix_they_share_the_1mib_slot_and_v6_fails(
        ebs_run_probe: Callable[..., scenario.RunResult]) -> None:
    unfixed = edk2.baseline_named("2025.02").without_fixes()
    firmware = edk2.build_firmware(baseline=unfixed, progress=StderrProgress()).output
    result = ebs_run_probe(CHOSEN, firmware)
    dev0, dev1 = large_maps(result)
    assert dev0 == dev1, "the base bug did not show: the control proves nothing"
    assert result.failed_checks() == {"V6"}, [v.detail for v in result.violations]
    v6, = (v for v in result.violations if v.check == "V6")
    assert f"bounce pages {int(dev1 or '0', 16):#x}.." in v6.detail
