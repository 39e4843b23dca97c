"""V6's negative control on a real boot of 2025.02 under the emulated SEV,
where IoMmuDxe serves bounce buffers from its reserved pool: the probe maps
two 512 KiB buffers at once (the pool's 1 MiB size class). On Debian's tree
without upstream's e27cfda33b (which ``ovmf-patches/edk2-2025.02/base/``
carries) both get the one 1 MiB slot, and V6 fails. The positive control is
the emulated-SEV boot of the series in ``test_emulated_sev.py``: each
mapping gets pages of its own there, and every verdict holds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from probe_steps import large_maps

from harness import scenario
from harness.build import edk2
from harness.build.progress import StderrProgress

pytestmark = pytest.mark.sev_emulated

CHOSEN = scenario.Scenario(ebs_mode="callback", sev="emulated")


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
