"""The emulated SEV of the harness's QEMU (``qemu-patches/``), on real boots.

Unpatched firmware is the first control: Debian's packaged OVMF must reach
its shell under emulated SEV with the C-bit set in its page tables, and an
unpatched DEBUG build of the baseline must print that SEV is enabled. Then
the patched firmware installs its IOMMU driver because SEV is on, and the
probe sees the SEV platform. The EBS contract checks catch, under emulated
SEV only, a teardown that reads a dynamic PCD (a firmware variant that
brings the bug back). And the QEMU refuses what it cannot emulate, with a
message, and answers ``query-sev`` as the recorded replies say.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from harness import scenario
from harness.analysis import trace
from harness.analysis.memdump import (
    QemuDump,
    split_by_design,
    unencrypted_ranges,
    walk_page_tables,
)
from harness.build import cache, edk2
from harness.pytestplugin import session_emulated_caps
from harness.vm import host
from harness.vm.config import MachineConfig
from harness.vm.host import HostCaps
from harness.vm.machine import QemuMachine

pytestmark = pytest.mark.sev_emulated

STOCK_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
STOCK_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
QMP_DATA = Path(__file__).resolve().parents[1] / "data" / "qmp"
#: Test variants of the firmware: a patch on top of the series, each a
#: negative control that some check must catch.
VARIANTS = Path(__file__).resolve().parents[1] / "data" / "firmware-variants"
CBIT = 1 << 47


@pytest.fixture(scope="session")
def emulated(pytestconfig: pytest.Config) -> HostCaps:
    """The harness's QEMU, built (cached) and probed once per session."""
    return session_emulated_caps(pytestconfig)


def _config(caps: HostCaps, firmware_code: Path, firmware_vars: Path,
            **kwargs: object) -> MachineConfig:
    sev = host.sev_config("emulated", caps)
    assert sev is not None
    return MachineConfig(code=firmware_code, vars_template=firmware_vars, accel="tcg", sev=sev,
                         qemu=caps.qemu, serial_input=False, **kwargs)  # type: ignore[arg-type]


def test_stock_ovmf_reaches_its_shell_with_the_cbit_in_its_page_tables(
        emulated: HostCaps, ebs_artifacts: Path) -> None:
    config = _config(emulated, STOCK_CODE, STOCK_VARS, debugcon=False)
    with QemuMachine(config, ebs_artifacts / "vm") as vm:
        vm.serial.expect(r"UEFI Interactive Shell", timeout=90)
        assert vm.qmp("query-sev")["emulated"] is True
        path = vm.dump(ebs_artifacts / "memory.elf")
    with QemuDump(path) as dump:
        cpu = dump.cpus[0]
        findings: list[str] = []
        leaves = list(walk_page_tables(dump, cpu.cr3, findings, cbit=CBIT))
        private = sum(leaf.size for leaf in leaves if leaf.entry & CBIT)
        assert findings == [] and private >= 200 << 20, "the C-bit marks RAM private"
        judged, by_design = split_by_design(unencrypted_ranges(dump, cpu.cr3, CBIT))
        assert [(r.paddr, r.size) for r, _ in by_design] == [(0xA0000, 0x60000)]
        # Before ExitBootServices the firmware's live DMA buffers are shared
        # (the IOMMU's bounce buffers): a little, never most of RAM.
        assert sum(r.size for r in judged) < 8 << 20
        # Negative control: read as an address bit, the C-bit leads nowhere.
        assert list(walk_page_tables(dump, cpu.cr3, [])) == []


def test_unpatched_debug_build_prints_sev_enabled(emulated: HostCaps,
                                                  ebs_artifacts: Path) -> None:
    firmware = edk2.build_unpatched(progress=cache.StderrProgress()).firmware
    assert not firmware.module_file("EbsProbe", ".efi").exists()
    config = _config(emulated, firmware.code, firmware.vars)
    with QemuMachine(config, ebs_artifacts / "sev") as vm:
        vm.debugcon.expect(r"SEV is enabled \(mask 0x800000000000\)", timeout=60)
        vm.debugcon.expect(r"Loading driver at \S+ EntryPoint=\S+ IoMmuDxe\.efi", timeout=60)
    # Negative control: the same firmware without the emulation says nothing of SEV.
    plain = MachineConfig(code=firmware.code, vars_template=firmware.vars, accel="tcg",
                          qemu=emulated.qemu, serial_input=False)
    with QemuMachine(plain, ebs_artifacts / "plain") as vm:
        vm.debugcon.expect(r"Loading driver at \S+ EntryPoint=\S+ IoMmuDxe\.efi", timeout=60)
    assert "SEV is enabled" not in (ebs_artifacts / "plain" / "debugcon.log").read_text(
        errors="replace")


def test_the_firmware_takes_its_sev_path_without_a_knob(ebs_run_probe) -> None:  # type: ignore[no-untyped-def]
    result = ebs_run_probe(scenario.Scenario(ebs_mode="callback", sev="emulated"))
    assert "opt/org.ebs-harness/emulation" not in result.scenario.fw_cfg(b"x")
    events = result.log.timeline.trace.events
    config = result.log.timeline.trace.config
    assert config is not None and config.emulation == 0, "IoMmuDxe installed through SEV"
    assert result.log.timeline.trace.sev_mask == CBIT
    cpu, = (e for e in events if isinstance(e, trace.Probe) and e.step == "cpu")
    assert int(cpu.get("leaf-eax") or "0", 16) & 0x2, "CPUID 0x8000001F says SEV"
    assert cpu.get("cbitpos") == "47" and cpu.get("sev-msr") == "1"
    assert cpu.get("sev-status") == "0x1", "SEV_STATUS: SEV on, SEV-ES off"
    assert result.passed, [v.detail for v in result.violations]


def test_the_contract_catches_a_teardown_that_reads_a_dynamic_pcd(
        emulated: HostCaps, ebs_host_caps: HostCaps, ebs_artifacts: Path) -> None:
    """The negative control of C1 and C3: the series before its fix, as a
    firmware variant. The bug lives on the SEV path only: the IOMMU
    emulation mode of a plain TCG guest does not see it."""
    variant = edk2.build_variant(VARIANTS / "teardown-reads-a-dynamic-pcd.patch",
                                 progress=cache.StderrProgress()).firmware
    chosen = scenario.Scenario(ebs_mode="callback", requeue_depth=2, sev="emulated")
    result = scenario.run_scenario(variant, chosen, ebs_artifacts / "sev", caps=emulated)
    assert result.failed_checks() == {"C1", "C3"}, [v.detail for v in result.violations]
    c1 = next(v for v in result.violations if v.check == "C1")
    assert c1.culprit == "IoMmuDxe!IoMmuExitBootServicesTeardown"
    assert re.search(r"RestoreTPL\(\d+\) from PcdDxe!", c1.detail)
    assert all(v.culprit == "IoMmuDxe!IoMmuExitBootServicesTeardown"
               for v in result.violations if v.check == "C3")
    plain = scenario.run_scenario(variant, scenario.Scenario(ebs_mode="callback", requeue_depth=2,
                                                             accel="tcg"),
                                  ebs_artifacts / "plain", caps=ebs_host_caps)
    assert plain.passed, [v.detail for v in plain.violations]


def test_the_adversary_allocating_in_its_handler_is_a_finding(ebs_run_probe) -> None:  # type: ignore[no-untyped-def]
    """C2 by another driver's handler is reported, not failed, in both schemes."""
    for mode in ("callback", "legacy"):
        result = ebs_run_probe(scenario.Scenario(ebs_mode=mode, requeue_depth=2, sev="emulated"))
        assert "C2" not in result.failed_checks()
        culprits = {f.culprit for f in result.log.findings if f.check == "C2"}
        assert "EbsAdversaryDxe!AdversaryStage" in culprits, mode
        assert [f for f in result.as_json()["findings"]
                if f["culprit"] == "EbsAdversaryDxe!AdversaryStage"]


# ----------------------------------------------------------- the QEMU itself


def _qemu_error(qemu: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([qemu, "-S", "-accel", "tcg", "-display", "none", "-nodefaults",
                           "-machine", "q35,confidential-guest-support=sev0", *args],
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize(("args", "message"), [
    (("-object", "sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1"),
     "sev-guest needs KVM; without KVM use sev-emulated-guest"),
    (("-object", "sev-emulated-guest,id=sev0,policy=0x7"),
     "sev-emulated-guest: SEV-ES is not emulated (policy 0x7)"),
    (("-object", "sev-emulated-guest,id=sev0,cbitpos=60"),
     "sev-emulated-guest: cbitpos 60 is not in 32..51"),
    (("-object", "sev-emulated-guest,id=sev0,reduced-phys-bits=0"),
     "sev-emulated-guest: reduced-phys-bits 0 is not in 1..63"),
    (("-cpu", "qemu64,phys-bits=52", "-object", "sev-emulated-guest,id=sev0"),
     "sev-emulated-guest: phys-bits 52 less reduced-phys-bits 1 reach cbitpos 47"),
], ids=["sev-guest-without-kvm", "sev-es", "cbitpos", "reduced-phys-bits", "phys-bits"])
def test_the_qemu_refuses_what_it_cannot_emulate(emulated: HostCaps, args: tuple[str, ...],
                                                 message: str) -> None:
    proc = _qemu_error(emulated.qemu, *args)
    assert proc.returncode == 1, "an error exit, not an abort"
    assert message in proc.stderr


def test_debians_qemu_has_no_emulated_sev(ebs_host_caps: HostCaps) -> None:
    """The control: the system's QEMU refuses the object and the host probe says so."""
    proc = _qemu_error(ebs_host_caps.qemu, "-object", "sev-emulated-guest,id=sev0")
    assert proc.returncode == 1
    assert "does not accept value 'sev-emulated-guest'" in proc.stderr
    assert not ebs_host_caps.sev_emulated.available
    assert "has no emulated SEV" in ebs_host_caps.sev_emulated.reason


def test_query_sev_is_what_the_recorded_replies_say(emulated: HostCaps,
                                                    ebs_artifacts: Path) -> None:
    """The replies the unit tests read (recorded by qmp/record-emulated.py)
    are what this QEMU answers now: launch-secret while paused, running after
    ``cont``, emulated throughout."""
    paused = json.loads((QMP_DATA / "query-sev-emulated-paused.json").read_text())["return"]
    running = json.loads((QMP_DATA / "query-sev-emulated-running.json").read_text())["return"]
    config = _config(emulated, STOCK_CODE, STOCK_VARS, debugcon=False)
    vm = QemuMachine(config, ebs_artifacts / "vm")
    try:
        vm.launch(start=False)
        assert vm.qmp("query-sev") == paused
        assert paused["state"] == "launch-secret" and paused["emulated"] is True
        vm.qmp("cont")
        assert vm.qmp("query-sev") == running
        assert running["state"] == "running"
    finally:
        vm.shutdown()
