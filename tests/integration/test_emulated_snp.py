"""The emulated SEV-SNP of the harness's QEMU, on real boots.

Unmodified OVMF takes its SNP path under it: the CPUID page from the reset
vector on, the VMPL0 check (RMPADJUST), every page of RAM made private and
validated (page state changes and PVALIDATE), its GHCB registered; the
probe sees SEV_STATUS 0x7. QEMU's own trace of the page states says what
the teardown did: every page it made private again it validated again,
none twice, and no access reached a page not validated. The emulation
refuses what a real SNP launch cannot do (flash devices for the firmware,
more than one vCPU here, a policy without its reserved bit).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import pytest

from harness import scenario
from harness.analysis import trace
from harness.build import edk2
from harness.pytestplugin import session_emulated_caps
from harness.vm import host
from harness.vm.config import MachineConfig
from harness.vm.host import HostCaps
from harness.vm.machine import QemuMachine

pytestmark = pytest.mark.snp_emulated

QMP_DATA = Path(__file__).resolve().parents[1] / "data" / "qmp"
CBIT = 1 << 47
PAGE = 0x1000

#: QEMU's trace events of the emulated SNP, and the teardown's markers.
SNP_EVENTS = ("sev_snp_launch_update", "sev_snp_page_state", "sev_snp_pvalidate",
              "sev_snp_pvalidate_no_update", "sev_snp_not_validated", "fw_cfg_select")
_EVENT = re.compile(r"(sev_snp_\w+|fw_cfg_select) (.*)")


@pytest.fixture(scope="session")
def emulated(pytestconfig: pytest.Config) -> HostCaps:
    """The harness's QEMU, built (cached) and probed once per session."""
    return session_emulated_caps(pytestconfig)


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


def _snp_trace(path: Path) -> list[tuple[str, dict[str, str]]]:
    """QEMU's trace (the log backend): each line's event and its fields."""
    events = []
    for line in path.read_text().splitlines():
        found = _EVENT.match(line)
        assert found, f"not an event line: {line!r}"
        name, rest = found[1], found[2]
        if name == "fw_cfg_select":
            key = re.search(r"key 0x([0-9a-f]+)", rest)
            assert key
            events.append((name, {"key": key[1]}))
            continue
        words = rest.split()
        fields = dict(zip(words[::2], words[1::2]))
        if name == "sev_snp_page_state":
            fields["state"] = words[4]
        events.append((name, fields))
    return events


def _pages(fields: dict[str, str]) -> set[int]:
    first = int(fields["gpa"], 16)
    return {first + i * PAGE for i in range(int(fields.get("pages", "1")))}


def test_the_teardown_validates_every_page_it_makes_private(
        emulated: HostCaps, ebs_firmware: edk2.Firmware, ebs_artifacts: Path) -> None:
    """From QEMU's trace, in the order the guest asked: the launch validated
    the SEV metadata's sections; between the teardown's markers every page
    made private was validated after it; no page was validated twice and no
    access reached a page not validated, in the whole boot."""
    def launcher(config: MachineConfig, artifacts: Path, **kwargs: object) -> QemuMachine:
        config = dataclasses.replace(config, trace_events=SNP_EVENTS)
        return QemuMachine(config, artifacts, **kwargs)  # type: ignore[arg-type]

    # The harness's device trace reads device events only: QEMU's raw trace
    # of the page states is read here.
    chosen = scenario.Scenario(ebs_mode="callback", sev="emulated-snp", device_trace=False)
    result = scenario.run_scenario(ebs_firmware, chosen, ebs_artifacts, caps=emulated,
                                   launcher=launcher)
    assert result.passed, [v.detail for v in result.violations]
    events = _snp_trace(ebs_artifacts / "vm" / "device-trace.raw")
    names = [name for name, _ in events]
    assert "sev_snp_pvalidate_no_update" not in names, "a page validated twice"
    assert "sev_snp_not_validated" not in names, "an access to a page not validated"
    launched = [(f["gpa"], f["len"]) for name, f in events if name == "sev_snp_launch_update"]
    assert ("0x80d000", "0x1000") in launched and ("0x80e000", "0x1000") in launched, \
        "the secrets and CPUID pages, where OvmfPkgX64's metadata puts them"
    marks = [i for i, (name, f) in enumerate(events)
             if name == "fw_cfg_select" and f["key"] in ("3eb1", "3eb2")]
    assert len(marks) == 2, "one teardown, begin and end"
    begin, end = marks
    private: set[int] = set()
    validated: set[int] = set()
    for name, fields in events[begin:end]:
        if name == "sev_snp_page_state" and fields["state"] == "private":
            private |= _pages(fields)
            validated -= _pages(fields)
        elif name == "sev_snp_pvalidate" and fields["validate"] == "1":
            validated |= _pages(fields)
    assert private, "the teardown makes its shared pages private again"
    assert private <= validated, sorted(hex(p) for p in private - validated)[:8]


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


@pytest.mark.parametrize(("args", "why"), [
    # OVMF's split images, as flash devices: no SEV metadata reaches the launch
    (["-drive", "if=pflash,format=raw,unit=0,readonly=on,file={code}"],
     "SEV-SNP needs the firmware as one -bios image with SEV metadata"),
    (["-bios", "{combined}", "-smp", "2"], "SEV-SNP is emulated with one vCPU only"),
    (["-bios", "{combined}", "-object-policy"], "snp-policy 0x0 lacks bit 17"),
], ids=["pflash", "smp-2", "policy"])
def test_the_emulation_refuses_what_an_snp_launch_cannot_do(
        emulated: HostCaps, ebs_firmware: edk2.Firmware, args: list[str], why: str) -> None:
    policy = "0x0" if "-object-policy" in args else "0x30000"
    argv = [emulated.qemu, "-machine", "q35,confidential-guest-support=sev0", "-accel", "tcg",
            "-cpu", "qemu64", "-display", "none", "-nodefaults", "-S",
            "-object", f"sev-emulated,id=sev0,snp=on,snp-policy={policy}"]
    argv += [a.format(code=ebs_firmware.code, combined=ebs_firmware.combined)
             for a in args if a != "-object-policy"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          input="")
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert why in done.stderr, done.stderr
