"""A firmware built with -D DEBUG_ON_SERIAL_PORT, for labs that capture only
the serial console: the trace comes on the serial port, the debug port stays
silent, and the scenario judges the serial log with the same verdicts.

Its own workspace and a full build (a few minutes, once; cached after).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.build import edk2
from harness.build.progress import StderrProgress
from harness.pytestplugin import settings
from harness.scenario import Scenario, run_scenario
from harness.vm import host

pytestmark = [pytest.mark.build, pytest.mark.tcg]


@pytest.fixture(scope="session")
def serial_firmware(pytestconfig: pytest.Config) -> edk2.Firmware:
    if settings(pytestconfig).firmware:
        pytest.skip("--ebs-firmware: the serial variant is built from source, not given")
    return edk2.build_firmware(flags=edk2.BuildFlags(debug_on_serial=True),
                               progress=StderrProgress()).output


def test_manifest_records_the_serial_flag(serial_firmware: edk2.Firmware,
                                          ebs_firmware: edk2.Firmware) -> None:
    assert serial_firmware.debug_on_serial and not ebs_firmware.debug_on_serial
    assert serial_firmware.key != ebs_firmware.key
    argv = serial_firmware.manifest["build_argv"]
    assert "DEBUG_ON_SERIAL_PORT=TRUE" in argv  # type: ignore[operator]


def test_scenario_reads_the_trace_from_the_serial_log(serial_firmware: edk2.Firmware,
                                                      ebs_host_caps: host.HostCaps,
                                                      ebs_artifacts: Path) -> None:
    result = run_scenario(serial_firmware,
                          Scenario(ebs_mode="legacy", requeue_depth=2, accel="tcg"),
                          ebs_artifacts, caps=ebs_host_caps)
    assert result.debug_log.name == "serial.log"
    assert (ebs_artifacts / "vm" / "debugcon.log").read_text().count("EBST") == 0
    # The same verdicts as from the debug port: the 2017 scheme loses.
    assert {"V1", "V3", "V4"} <= result.failed_checks()
