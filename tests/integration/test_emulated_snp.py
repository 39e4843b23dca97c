"""The emulated SEV-SNP of the harness's QEMU, on real boots.

Unmodified OVMF takes its SNP path under it: the CPUID page from the reset
vector on, the VMPL0 check (RMPADJUST), every page of RAM made private and
validated (page state changes and PVALIDATE), its GHCB registered; the
probe sees SEV_STATUS 0x7. QEMU's own trace of the page states says what
the teardown did: every page it made private again it validated again,
none twice, no access reached a page not validated, and the OS is handed
only pages private and validated (S1, S2, S3); the
firmware variants of their negative controls fail exactly those. The
emulation refuses what a real SNP launch cannot do (flash devices for the
firmware, more than one vCPU here, a policy without its reserved bit).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness import scenario
from harness.analysis import devicetrace, trace
from harness.analysis.devices import analyze_device_trace
from harness.build import edk2
from harness.build.progress import StderrProgress
from harness.errors import ConsoleFailure, ConsoleTimeout, LaunchError
from harness.vm import host
from harness.vm.config import MachineConfig
from harness.vm.host import HostCaps
from harness.vm.machine import QemuMachine

pytestmark = pytest.mark.snp_emulated

QMP_DATA = Path(__file__).resolve().parents[1] / "data" / "qmp"
VARIANTS = Path(__file__).resolve().parents[1] / "data" / "firmware-variants" / "edk2-2025.02"
CBIT = 1 << 47


def test_the_firmware_takes_its_snp_path(ebs_run_probe) -> None:  # type: ignore[no-untyped-def]
    result = ebs_run_probe(scenario.Scenario(ebs_mode="callback", sev="emulated-snp", dump=True))
    parsed = result.log.timeline.trace
    assert parsed.sev_mask == CBIT
    assert parsed.ghcb is not None, "PlatformPei: SEV-ES is enabled, N GHCB pages"
    cpu, = (e for e in parsed.events if isinstance(e, trace.Probe) and e.step == "cpu")
    assert cpu.get("leaf-eax") == "0x1A", "CPUID 0x8000001F says SEV, SEV-ES and SNP"
    assert cpu.get("sev-status") == "0x7", "SEV_STATUS: SEV, SEV-ES and SNP on"
    assert result.passed, [v.detail for v in result.violations]
    # Shared on purpose and named so: the VGA and option-ROM window (with a
    # -bios image its last 128 KiB are the BIOS's ROM alias, in the dump
    # too), the GHCB, and the firmware's flash window, ROM in the dump.
    assert result.dump is not None
    ghcb, = parsed.ghcb_pages
    assert [(r.paddr, r.size) for r, _ in result.dump.by_design] == [
        (0xA0000, 0x60000), (ghcb, 0x1000), (0xFFC0_0000, 0x40_0000)]


def test_the_teardown_validates_every_page_it_makes_private(ebs_run_probe) -> None:  # type: ignore[no-untyped-def]
    """QEMU's trace of the page states, as the harness reads it (S1 to S3):
    the launch validated the SEV metadata's sections, every page the
    teardown made private again it validated again, and every page the OS
    is handed is private and validated."""
    result = ebs_run_probe(scenario.Scenario(ebs_mode="callback", requeue_depth=2,
                                             sev="emulated-snp"))
    assert result.passed, [v.detail for v in result.violations]
    assert result.devices is not None
    pages = result.devices.page_states
    assert pages is not None
    assert {(gpa, kind) for gpa, _, kind in pages.launched} >= {
        (0x80D000, "secrets"), (0x80E000, "cpuid")}, "where OvmfPkgX64's metadata puts them"
    assert pages.made_private == pages.revalidated > 0
    # the probe's memory map: nearly all of the guest's 256 MiB is the OS's
    assert pages.usable_pages is not None and pages.usable_pages > 0xF000
    assert {c: o.state.value for c, o in result.devices.outcomes.items()
            if c.startswith("S")} == {"S1": "held", "S2": "held", "S3": "held"}


def test_query_sev_is_what_the_recording_says(emulated: HostCaps, ebs_firmware: edk2.Firmware,
                                              ebs_artifacts: Path) -> None:
    """The reply the unit tests read (recorded by qmp/record-emulated.py):
    emulated, type sev-snp, snp-policy 0x30000, launch-secret while paused."""
    recorded = json.loads((QMP_DATA / "query-sev-emulated-snp-paused.json").read_text())["return"]
    sev = host.sev_config("emulated-snp", emulated)
    assert sev is not None
    config = MachineConfig(code=ebs_firmware.combined, vars_template=ebs_firmware.vars,
                           accel="tcg", sev=sev, qemu=emulated.qemu, serial_input=False)
    vm = QemuMachine(config, ebs_artifacts)
    try:
        vm.launch(start=False)
        assert vm.qmp("query-sev") == recorded
        assert recorded["snp-policy"] == 0x30000 and recorded["emulated"] is True
    finally:
        vm.shutdown()


@pytest.mark.parametrize(("policy", "args", "why"), [
    # OVMF's split images, as flash devices: no SEV metadata reaches the launch
    ("0x30000", ["-drive", "if=pflash,format=raw,unit=0,readonly=on,file={code}"],
     "SEV-SNP needs the firmware as one -bios image with SEV metadata"),
    ("0x30000", ["-bios", "{combined}", "-smp", "2"], "SEV-SNP is emulated with one vCPU only"),
    ("0x0", ["-bios", "{combined}"], "snp-policy 0x0 lacks bit 17"),
], ids=["pflash", "smp-2", "policy"])
def test_the_emulation_refuses_what_an_snp_launch_cannot_do(
        emulated: HostCaps, ebs_firmware: edk2.Firmware, policy: str, args: list[str],
        why: str) -> None:
    argv = [emulated.qemu, "-machine", "q35,confidential-guest-support=sev0", "-accel", "tcg",
            "-cpu", "qemu64", "-display", "none", "-nodefaults", "-S",
            "-object", f"sev-emulated,id=sev0,snp=on,snp-policy={policy}"]
    argv += [a.format(code=ebs_firmware.code, combined=ebs_firmware.combined) for a in args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          input="")
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert why in done.stderr, done.stderr


def _variant(name: str) -> edk2.Firmware:
    return edk2.build_variant(VARIANTS / f"{name}.patch", progress=StderrProgress()).output


@pytest.mark.parametrize(("variant", "failed", "detail"), [
    # validated twice: the page stays validated
    ("teardown-validates-a-page-twice", {"S1"}, "validated twice: PVALIDATE at 0x"),
    # the teardown's page left unvalidated, and the OS handed it
    ("teardown-leaves-a-page-unvalidated", {"S1", "S3"},
     "1 page(s) the teardown made private were not validated at the teardown's end"),
    # a handler's page of boot services data, not the teardown's
    ("ebs-handler-rescinds-a-page", {"S3"},
     ("1 page(s) the OS is handed as its memory (EfiBootServicesData) are not private and "
      "validated")),
])
def test_a_firmware_that_breaks_the_page_states_fails_exactly_its_checks(
        emulated: HostCaps, ebs_artifacts: Path, variant: str, failed: set[str],
        detail: str) -> None:
    """The firmware variants of S1's and S3's negative controls boot to the
    park under the emulated SNP (the adversary on, whose handler one of them
    changes) and fail exactly their checks; under the emulated SEV-ES the
    same firmware holds every verdict (the control: the change acts only
    under SNP, and only the page states can show it)."""
    firmware = _variant(variant)
    snp = scenario.run_scenario(firmware, scenario.Scenario(ebs_mode="callback",
                                                            requeue_depth=0,
                                                            sev="emulated-snp"),
                                ebs_artifacts / "snp", caps=emulated)
    assert snp.failed_checks() == failed, [v.detail for v in snp.violations]
    assert any(detail in v.detail for v in snp.violations), \
        [v.detail for v in snp.violations]
    es = scenario.run_scenario(firmware, scenario.Scenario(ebs_mode="callback",
                                                           requeue_depth=0,
                                                           sev="emulated-es"),
                               ebs_artifacts / "es", caps=emulated)
    assert es.passed, [v.detail for v in es.violations]
    assert es.devices is not None and es.devices.page_states is None


def test_an_access_to_a_page_not_validated_ends_the_guest_and_fails_s1_and_s2(
        emulated: HostCaps, ebs_artifacts: Path) -> None:
    """The teardown reads a page it left unvalidated: #VC 0x404, which OVMF's
    handler cannot serve, so the guest asks to end inside the teardown. The
    trace QEMU wrote up to the end fails S1 (the page) and S2 (the access)."""
    firmware = _variant("teardown-touches-an-unvalidated-page")
    with pytest.raises((ConsoleFailure, ConsoleTimeout, LaunchError)) as caught:
        scenario.run_scenario(firmware, scenario.Scenario(ebs_mode="callback",
                                                          sev="emulated-snp"),
                              ebs_artifacts, caps=emulated)
    first = str(caught.value).splitlines()[0]
    assert "exit code 0x404" in str(caught.value), first
    raw = ebs_artifacts / "vm" / "device-trace.raw"
    kept = ebs_artifacts / "device-trace.log"
    kept.write_text(devicetrace.header(emulated.qemu_version) + raw.read_text())
    report = analyze_device_trace(kept)
    assert {v.check for v in report.violations} == {"S1", "S2"}, \
        [v.detail for v in report.violations]
    # the guest never returned from ExitBootServices(): no memory map
    assert report.outcomes["S3"].state.value == "not-judged"
    s2, = (v for v in report.violations if v.check == "S2")
    assert s2.detail.startswith("a read at 0x") and s2.detail.endswith("inside the teardown"), \
        s2.detail
