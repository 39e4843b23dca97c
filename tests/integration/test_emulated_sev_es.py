"""The emulated SEV-ES of the harness's QEMU, on real boots.

Unmodified OVMF takes its SEV-ES path under it: the reset vector's #VC
handler and the GHCB MSR protocol, a GHCB page, every port I/O, MSR and
MMIO access through #VC; the probe sees SEV_STATUS 0x3, and the one page
the firmware shares on purpose (its GHCB) is named as such in the dump.
The negative controls end the guest for the reason they name: a #VC whose
exit code is not its instruction's (either of OVMF's two checks, and the
harness says which termination in one line), and MMIO through a C-bit-set
mapping (a firmware variant, which plain SEV boots). The C1/C3 control of
the SEV path fails exactly C1 and C3 under SEV-ES too.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from harness import scenario
from harness.analysis import explain, trace
from harness.build import edk2
from harness.build.progress import StderrProgress
from harness.errors import ConsoleFailure, ConsoleTimeout, LaunchError
from harness.vm import host
from harness.vm.config import MachineConfig
from harness.vm.host import HostCaps
from harness.vm.machine import QemuMachine

pytestmark = pytest.mark.sev_es_emulated

#: Test variants of edk2 2025.02 (2022.11's OVMF stops in PEI under the
#: emulated SEV-ES: docs/emulated-sev.md).
VARIANTS = Path(__file__).resolve().parents[1] / "data" / "firmware-variants" / "edk2-2025.02"
QMP_DATA = Path(__file__).resolve().parents[1] / "data" / "qmp"
CBIT = 1 << 47


def test_the_firmware_takes_its_sev_es_path(ebs_run_probe) -> None:  # type: ignore[no-untyped-def]
    result = ebs_run_probe(scenario.Scenario(ebs_mode="callback", sev="emulated-es", dump=True))
    parsed = result.log.timeline.trace
    assert parsed.sev_mask == CBIT
    assert parsed.ghcb is not None, "PlatformPei: SEV-ES is enabled, N GHCB pages"
    config = parsed.config
    assert config is not None and config.emulation == 0, "IoMmuDxe installed through SEV"
    cpu, = (e for e in parsed.events if isinstance(e, trace.Probe) and e.step == "cpu")
    leaf = int(cpu.get("leaf-eax") or "0", 16)
    assert leaf & 0x2 and leaf & 0x8, "CPUID 0x8000001F says SEV and SEV-ES"
    assert cpu.get("sev-status") == "0x3", "SEV_STATUS: SEV and SEV-ES on"
    assert result.passed, [v.detail for v in result.violations]
    # The firmware's GHCB stays shared into the OS: by design, and named so.
    assert result.dump is not None
    ghcb, = parsed.ghcb_pages
    assert [(r.paddr, r.size) for r, _ in result.dump.by_design] == [
        (0xA0000, 0x40000), (ghcb, 0x1000)]


def _mismatched(caps: HostCaps, firmware: edk2.Firmware, artifacts: Path,
                mismatch: str) -> str:
    """Boot with ``x-vc-mismatch``; the first line of the error the guest's end made."""
    sev = host.sev_config("emulated-es", caps)
    assert sev is not None
    config = MachineConfig(code=firmware.code, vars_template=firmware.vars, accel="tcg",
                           sev=dataclasses.replace(sev, vc_mismatch=mismatch),
                           qemu=caps.qemu, serial_input=False)
    # The guest can be ended before the launch's last QMP query, or after.
    with pytest.raises((LaunchError, ConsoleTimeout)) as caught, \
            QemuMachine(config, artifacts) as vm:
        vm.debugcon.expect(scenario.PARKED, timeout=120)
    events = (artifacts / "qmp.log").read_text()
    assert "GUEST_PANICKED" in events, "the emulated hypervisor reports a panic"
    return str(caught.value).splitlines()[0]


@pytest.mark.parametrize(("mismatch", "why"), [
    # The reset vector's handler serves CPUID only; any other exit code
    # makes it ask for termination (reason set 1: OVMF; TERM_VC_NOT_CPUID).
    ("cpuid", "the guest asked for termination: reason set 1, code 0x01"),
    # CcExitLib checks the instruction against the exit code (CVE-2024-25742)
    # and reports an event it cannot handle.
    ("ioio", "the guest's #VC handler did not handle exit code 0x72"),
], ids=["reset-vector", "cc-exit-lib"])
def test_a_vc_with_another_instructions_exit_code_ends_the_guest(
        emulated: HostCaps, ebs_firmware: edk2.Firmware, ebs_artifacts: Path,
        mismatch: str, why: str) -> None:
    line = _mismatched(emulated, ebs_firmware, ebs_artifacts / mismatch, mismatch)
    assert f"SEV-ES guest terminated: {why}" in line, line
    assert "SEV-ES is enabled" not in (ebs_artifacts / mismatch / "debugcon.log").read_text(
        errors="replace"), "it ends before PlatformPei"


def test_mmio_through_an_encrypted_mapping_stops_the_guest(
        emulated: HostCaps, ebs_artifacts: Path) -> None:
    """A firmware that leaves the C-bit on MMCONFIG: under SEV-ES, the #VC
    handler refuses the MMIO with a #GP and the guest stops at PCI
    enumeration; plain SEV, which raises no #VC, boots the same firmware
    (the control: only the SEV-ES emulation can see this bug)."""
    variant = edk2.build_variant(VARIANTS / "mmconfig-keeps-its-cbit.patch",
                                 progress=StderrProgress()).output
    es = scenario.Scenario(ebs_mode="callback", sev="emulated-es")
    with pytest.raises(ConsoleFailure) as caught:
        scenario.run_scenario(variant, es, ebs_artifacts / "es", caps=emulated)
    first = str(caught.value).splitlines()[0]
    assert caught.value.console == "serial", first
    assert "!!!! X64 Exception Type - 0D(#GP - General Protection)" in first, first
    log = (ebs_artifacts / "es" / "vm" / "debugcon.log").read_text(errors="replace")
    refused = re.search(r"MMIO using encrypted memory: ([0-9A-Fa-f]+)", log)
    # q35's MMCONFIG: PcdPciExpressBaseAddress, 256 MiB
    assert refused and 0xE000_0000 <= int(refused[1], 16) < 0xF000_0000, log[-2000:]
    serial = (ebs_artifacts / "es" / "vm" / "serial.log").read_text(errors="replace")
    assert "!!!! X64 Exception Type - 0D(#GP" in serial
    plain = scenario.run_scenario(variant, dataclasses.replace(es, sev="emulated"),
                                  ebs_artifacts / "sev", caps=emulated)
    assert plain.passed, [v.detail for v in plain.violations]


def test_the_contract_catches_a_teardown_that_reads_a_dynamic_pcd(
        emulated: HostCaps, ebs_artifacts: Path) -> None:
    """The C1/C3 control of the SEV path, under SEV-ES: the teardown's PCD
    read re-enables interrupts through PcdDxe's lock, as under SEV."""
    variant = edk2.build_variant(VARIANTS / "teardown-reads-a-dynamic-pcd.patch",
                                 progress=StderrProgress()).output
    chosen = scenario.Scenario(ebs_mode="callback", requeue_depth=2, sev="emulated-es")
    result = scenario.run_scenario(variant, chosen, ebs_artifacts, caps=emulated)
    assert result.failed_checks() == {"C1", "C3"}, [v.detail for v in result.violations]
    c1 = next(v for v in result.violations if v.check == "C1")
    assert c1.culprit == "IoMmuDxe!IoMmuExitBootServicesTeardown"


def test_the_core_stops_a_teardown_that_takes_a_lock(
        emulated: HostCaps, ebs_artifacts: Path) -> None:
    """The same PCD read under the DXE core's guard (the teardowns run at
    TPL_HIGH_LEVEL): PcdDxe's lock calls RaiseTPL(TPL_NOTIFY) from there,
    and the DEBUG build stops at CoreRaiseTpl()'s ASSERT inside the
    teardown instead of restoring the TPL and turning interrupts back on.
    The control is the test above: the read on a core without the guard
    returns with them on."""
    variant = edk2.build_variant(VARIANTS / "teardown-reads-a-dynamic-pcd-under-the-guard.patch",
                                 progress=StderrProgress()).output
    chosen = scenario.Scenario(ebs_mode="callback", requeue_depth=2, sev="emulated-es")
    with pytest.raises(ConsoleFailure) as caught:
        scenario.run_scenario(variant, chosen, ebs_artifacts, caps=emulated)
    first = str(caught.value).splitlines()[0]
    assert re.search(r"ASSERT (\[DxeCore\] )?\S*Tpl\.c\(\d+\)", first), first
    log = (ebs_artifacts / "vm" / "debugcon.log").read_text(errors="replace")
    teardown = log[log.index("EBST ebs-callback "):]
    raised = re.search(r"EBST tpl-change op=raise tpl=16 .*\n.*RaiseTpl with OldTpl\(0x1F\) > "
                       r"NewTpl\(0x10\)", teardown, re.IGNORECASE)
    assert raised, teardown[:2000]
    assert "op=restore" not in teardown
    assert "ebs-callback-end" not in teardown and "ebs-return" not in teardown
    # explain-log says where the ASSERT came from, from the log and the build
    exp = explain.explain_log(ebs_artifacts / "vm" / "debugcon.log", variant.path)
    crash = exp.boot.crashes[-1]
    assert crash.kind == "assert" and "Tpl.c:" in crash.source
    assert crash.during.startswith("inside the IOMMU ExitBootServices() teardown "
                                   "IoMmuDxe!IoMmuExitBootServicesTeardown "), crash.during
    assert re.search(r"after RaiseTPL\(16\) from PcdDxe!EfiAcquireLock\+0x[0-9a-f]+ at line "
                     r"\d+: a boot service", crash.during), crash.during
    assert ", inside the IOMMU teardown (ebs-callback at line" in exp.end.summary


def test_query_sev_is_what_the_recording_says(emulated: HostCaps, ebs_firmware: edk2.Firmware,
                                              ebs_artifacts: Path) -> None:
    """The reply the unit tests read (recorded by qmp/record-emulated.py):
    emulated, policy 0x7 (the ES bit), launch-secret while paused."""
    recorded = json.loads((QMP_DATA / "query-sev-emulated-es-paused.json").read_text())["return"]
    sev = host.sev_config("emulated-es", emulated)
    assert sev is not None
    config = MachineConfig(code=ebs_firmware.code, vars_template=ebs_firmware.vars,
                           accel="tcg", sev=sev, qemu=emulated.qemu, serial_input=False)
    vm = QemuMachine(config, ebs_artifacts)
    try:
        vm.launch(start=False)
        assert vm.qmp("query-sev") == recorded
        assert recorded["policy"] == 0x7 and recorded["emulated"] is True
    finally:
        vm.shutdown()

