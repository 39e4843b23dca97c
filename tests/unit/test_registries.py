"""The registries every concept has one entry in (checks, devices, SEV
modes), the seams between them, and each check's outcome in the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from coredump import Core

from harness import cli, pytestplugin, scenario
from harness.analysis import checks, device_models, verdicts
from harness.analysis.checks import Evidence, Outcome, State, Violation
from harness.vm import devices as vm_devices
from harness.vm import host, sev

DATA = Path(__file__).resolve().parent.parent / "data"
WITH_CONTRACT = DATA / "callback-depth2.log"
LEGACY = DATA / "legacy-depth2.log"
WITHOUT_CONTRACT = DATA / "synthetic-callback-depth2.log"
ZOO = DATA / "devices" / "zoo-callback.log"


def _missing(names: set[str], known: set[str]) -> set[str]:
    return names - known


# ------------------------------------------------------------ checks


def test_every_log_check_has_exactly_one_function_and_nothing_else_does() -> None:
    readers = set(checks.of(Evidence.LOG) + checks.of(Evidence.CONTRACT))
    assert set(verdicts.LOG_CHECKS) == readers
    with pytest.raises(ValueError, match="judged twice"):
        verdicts.judges("V1")(verdicts.order)
    with pytest.raises(ValueError, match="does not read the debug log"):
        verdicts.judges("D1")


def test_a_violation_names_a_registered_check() -> None:
    assert Violation("W2", "late DMA").check == "W2"
    with pytest.raises(ValueError, match="unknown check 'V9'"):
        Violation("V9", "no such check")


def test_outcomes_need_their_reason_and_only_then() -> None:
    Outcome("D1", State.SKIPPED, "ciphertext")
    with pytest.raises(ValueError, match="a reason goes with"):
        Outcome("D1", State.SKIPPED)
    with pytest.raises(ValueError, match="a reason goes with"):
        Outcome("V1", State.HELD, "why")


def test_the_cli_help_lists_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for check in checks.CHECKS.values():
        assert f"{check.title}: " in out


# ------------------------------------------------------------ devices


def test_every_device_kind_has_a_trace_model_the_analysis_knows() -> None:
    models = {model.kind for model in device_models.MODELS}
    assert _missing({k.trace_model for k in vm_devices.KINDS.values()}, models) == set()
    # the control: a model the analysis lacks is seen
    assert _missing({"virtio-blk", "virtio-foo"}, models) == {"virtio-foo"}


def test_device_kinds_make_their_dataclass_and_argv(tmp_path: Path) -> None:
    boot, disk = tmp_path / "boot.img", tmp_path / "disk.img"
    made = vm_devices.parse_devices(",".join(vm_devices.DEVICE_NAMES), boot, lambda _: disk)
    assert [vm_devices.KINDS[name].trace_model for name in vm_devices.DEVICE_NAMES] == \
        vm_devices.trace_models(made)
    argv = vm_devices.device_args(made, True, tmp_path / "nic.sock")
    assert argv.count("qemu-xhci,id=xhci") == 1          # once for both USB kinds
    storage = [d for d in made if isinstance(d, vm_devices.ZooDevice) and d.image is not None]
    assert {d.kind for d in storage} == set(vm_devices.STORAGE_KINDS)


# ------------------------------------------------------------ SEV modes


def test_every_sev_mode_is_proven_by_a_host_capability() -> None:
    assert {m.capability for m in sev.MODES.values()} <= set(host.CAPABILITIES)
    assert scenario.Scenario(sev="emulated").label().endswith("-emulated-sev")
    assert sev.SEV_MODES == ("off", *sev.MODES)


def test_every_capability_is_a_pytest_marker_and_the_emulations_are_known() -> None:
    """A mode's capability is what a test marks: a new one without its marker
    would run unchecked. The emulated ones fail rather than skip (the session
    builds their QEMU)."""
    assert set(pytestplugin.MARKERS) == set(host.CAPABILITIES)
    assert set(pytestplugin.EMULATED_MARKERS) == {
        mode.capability for mode in sev.MODES.values() if mode.emulated}
    assert "sev" not in pytestplugin.EMULATED_MARKERS            # the control


def test_a_mode_that_a_baseline_does_not_boot_says_why_before_any_boot() -> None:
    """emulated-es refuses 2022.11's firmware (its OVMF stops in PEI) and
    takes 2025.02's; plain emulated SEV takes both (the control)."""
    assert sev.MODES["emulated-es"].stops("2022.11") is not None
    assert sev.MODES["emulated-es"].stops("2025.02") is None
    assert all(sev.MODES["emulated"].stops(name) is None for name in ("2022.11", "2025.02"))
    # SNP is SEV-ES's path and more
    assert sev.MODES["emulated-snp"].stops("2022.11") is not None
    assert sev.MODES["emulated-snp"].stops("2025.02") is None


def test_the_mode_decides_the_object_the_cpu_and_the_evidence() -> None:
    emulated = sev.SevConfig("emulated", 47, 1)
    real = sev.SevConfig("sev-es", 51, 1)
    assert (emulated.accel, emulated.kind.cpu, emulated.kind.encrypted) == \
        ("tcg", sev.EMULATED_SEV_CPU, False)
    assert (real.accel, real.kind.cpu, real.kind.encrypted) == ("kvm", "host", True)
    assert real.effective_policy & sev.POLICY_ES and not emulated.effective_policy & sev.POLICY_ES


# ------------------------------------------------------------ outcomes


def _checks(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, dict[str, str]]]:
    status = cli.main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)["checks"]


def test_every_check_has_a_state_in_the_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, states = _checks(capsys, "analyze-log", str(WITH_CONTRACT))
    assert status == 0 and set(states) == set(checks.CHECKS)
    assert {states[c]["state"] for c in ("V1", "V2", "V3", "V4", "C1", "C2", "C3")} == {"held"}
    # not judged, with the reason: no dump, no device trace in this analysis
    assert states["D1"] == {"state": "not-judged", "reason": "no memory dump was taken"}
    assert states["W2"]["state"] == "not-judged" and states["W2"]["reason"]


def test_a_failed_check_is_failed_and_the_others_still_held(
        capsys: pytest.CaptureFixture[str]) -> None:
    status, states = _checks(capsys, "analyze-log", str(LEGACY))
    assert status == 1
    assert states["V1"] == {"state": "failed"} and states["V3"] == {"state": "failed"}
    assert states["V2"] == {"state": "held"}


def test_a_log_without_the_contract_lines_does_not_judge_c1_to_c3(
        capsys: pytest.CaptureFixture[str]) -> None:
    _, states = _checks(capsys, "analyze-log", str(WITHOUT_CONTRACT))
    for check in ("C1", "C2", "C3"):
        assert states[check]["state"] == "not-judged"
        assert "no memmap-terminated or ints-off line" in states[check]["reason"]
    assert states["V1"] == {"state": "held"}


def test_the_device_trace_judges_w1_and_w2(capsys: pytest.CaptureFixture[str]) -> None:
    _, states = _checks(capsys, "analyze-log", str(WITH_CONTRACT), "--device-trace", str(ZOO))
    assert states["W1"] == {"state": "failed"}      # NVMe and AHCI stay armed
    assert states["W2"] == {"state": "held"}


def test_a_dump_of_real_sev_skips_d1_and_d2_with_the_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    core = Core()
    core.blocks[0] = bytearray(1 << 20)
    path = core.write(tmp_path / "memory.elf")
    status, states = _checks(capsys, "analyze-dump", str(path), "--log", str(WITH_CONTRACT),
                             "--encrypted")
    assert status == 0
    assert states["D1"]["state"] == "skipped" and "ciphertext" in states["D1"]["reason"]
    assert states["D2"]["state"] == "skipped" and "private" in states["D2"]["reason"]
    assert states["D3"] == {"state": "skipped", "reason": "no canary given"}
    assert states["V1"]["state"] == "not-judged"
