"""explain-log on logs of real boots made here and now: the baseline's stock
DEBUG build with nothing bootable, the harness's firmware with a #PF or an
ASSERT injected (``firmware-variants/adversary-faults.patch``), and a stock
guest under the emulated SEV. The command runs as a user runs it, a whole
``ebs-harness`` process."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from shellboot import boot_to_shell, explain_json

from harness.build import edk2
from harness.build.progress import StderrProgress
from harness.pytestplugin import session_emulated_caps
from harness.vm import host
from harness.vm.config import MachineConfig
from harness.vm.machine import QemuMachine

DATA = Path(__file__).resolve().parents[1] / "data"
FAULTS = DATA / "firmware-variants" / "adversary-faults.patch"
LOAD_LINE = re.compile(r"Loading (?:driver|PEIM) at 0x[0-9A-F]+ EntryPoint=0x[0-9A-F]+ \S+\.efi")


@pytest.fixture(scope="module")
def stock() -> edk2.Firmware:
    return edk2.build_unpatched(progress=StderrProgress()).output


@pytest.mark.tcg
def test_a_stock_boot_with_nothing_bootable(stock: edk2.Firmware, tmp_path: Path) -> None:
    log = boot_to_shell(stock, tmp_path)
    data = explain_json(log)
    text = log.read_text(encoding="latin-1")
    assert len(data["images"]) == len(LOAD_LINE.findall(text))
    assert [p["phase"] for p in data["phases"]] == ["SEC", "PEI", "DXE", "BDS"]
    assert [b["outcome"] for b in data["boot_options"]] == [
        "no boot file found on the device", "Shell.efi running when the log ends"]
    assert {f["fact"]: f["value"] for f in data["platform"]}["sev"].endswith(
        "not a SEV guest")
    assert data["crashes"] == []


@pytest.mark.tcg
@pytest.mark.parametrize(("mode", "console", "marker"), [
    ("pf", "serial", "EBS-FAULT-PF"), ("assert", "debugcon", "EBS-FAULT-ASSERT")])
def test_an_injected_fault_is_named_by_function_and_line(
        mode: str, console: str, marker: str, ebs_qemu_binary: str, tmp_path: Path,
        fault_line: Callable[[str], int]) -> None:
    firmware = edk2.build_variant(FAULTS, progress=StderrProgress()).output
    config = MachineConfig(code=firmware.code, vars_template=firmware.vars, accel="tcg",
                           qemu=ebs_qemu_binary, serial_input=False,
                           fw_cfg={"opt/org.ebs-harness/fault": mode})
    with QemuMachine(config, tmp_path / "vm") as vm:
        # the #PF dump goes to the serial port, DEBUG() and so ASSERT to 0x402
        pattern = r"!!!! Find image" if mode == "pf" else r"ASSERT "
        getattr(vm, console).expect(pattern, timeout=120, failure=[])
        log = vm.serial_log if mode == "pf" else vm.debugcon_log
    data = explain_json(log, "--firmware", str(firmware.path))
    (crash,) = data["crashes"]
    source = f"OvmfPkg/EbsAdversaryDxe/EbsAdversaryDxe.c:{fault_line(marker)}"
    assert crash["source"].endswith(source), crash
    if mode == "pf":
        assert crash["summary"] == "0E (#PF - Page-Fault)"
        assert crash["function"] == "EbsAdversaryDxe!EbsAdversaryEntryPoint"
    else:
        assert crash["expression"] == 'AsciiStrCmp (Text, "assert") != 0'


@pytest.mark.tcg
def test_without_the_fault_knob_the_driver_goes_on(ebs_qemu_binary: str,
                                                    tmp_path: Path) -> None:
    """The control of the two faults above: the same firmware, no knob."""
    firmware = edk2.build_variant(FAULTS, progress=StderrProgress()).output
    quiet = MachineConfig(code=firmware.code, vars_template=firmware.vars, accel="tcg",
                          qemu=ebs_qemu_binary, serial_input=False)
    with QemuMachine(quiet, tmp_path / "quiet") as vm:
        vm.debugcon.expect(r"EbsAdversaryDxe: off", timeout=120)
    assert "ASSERT" not in vm.debugcon_log.read_text(encoding="latin-1")
    assert "Exception" not in vm.serial_log.read_text(encoding="latin-1")


@pytest.mark.sev_emulated
def test_a_sev_guest_log_says_sev(stock: edk2.Firmware, pytestconfig: pytest.Config,
                                  tmp_path: Path) -> None:
    caps = session_emulated_caps(pytestconfig)
    sev = host.sev_config("emulated", caps)
    log = boot_to_shell(stock, tmp_path, sev=sev, qemu=caps.qemu)
    facts = {f["fact"]: f["value"] for f in explain_json(log)["platform"]}
    assert sev is not None
    assert facts["sev"] == f"enabled, encryption mask {1 << sev.cbitpos:#x}"
