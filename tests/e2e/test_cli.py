"""The command line on real boots: exit statuses and JSON as the README promises them.

Each test runs ``python -m harness`` as a user would, with the session's
firmware, and reads back what it printed and left in its artifacts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.build import edk2
from harness.vm.host import HostCaps

pytestmark = pytest.mark.tcg


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", "-q", *args], capture_output=True,
                          text=True, check=False, timeout=timeout)


def _boot(firmware: edk2.Firmware, artifacts: Path, *options: str
          ) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    proc = _cli("boot", "--firmware", str(firmware.path), "--accel", "tcg", "--dump",
                "--json", "--artifacts", str(artifacts), *options)
    assert proc.returncode in (0, 1), proc.stderr
    return proc, json.loads(proc.stdout)


def test_boot_callback_exits_0_with_empty_findings(ovmf_firmware: edk2.Firmware,
                                                   machine_artifacts: Path) -> None:
    proc, reply = _boot(ovmf_firmware, machine_artifacts, "--requeue-depth", "2",
                        "--devices", "virtio-blk,virtio-net")
    assert proc.returncode == 0, reply
    assert reply["verdict"] == "pass" and reply["violations"] == []
    assert reply["live_mappings"] == [] and reply["shared_pages"] == []
    assert reply["canary_hits"] == []
    assert reply["firmware_key"] == ovmf_firmware.key and reply["accel"] == "tcg"
    for name in ("probe.img", "canary.bin", "memory.elf", "timeline.html", "result.json",
                 "vm/debugcon.log", "vm/reproduce.sh", "vm/cmdline.txt", "vm/qmp.log"):
        assert (machine_artifacts / name).is_file(), name


def test_boot_none_with_leak_exits_1_and_analyzers_agree(ovmf_firmware: edk2.Firmware,
                                                        machine_artifacts: Path) -> None:
    proc, reply = _boot(ovmf_firmware, machine_artifacts, "--ebs-mode", "none",
                        "--leak-mapping")
    assert proc.returncode == 1
    checks = {v["check"] for v in reply["violations"]}  # type: ignore[union-attr]
    assert {"V2", "V4", "D1", "D2", "D3"} <= checks
    assert reply["live_mappings"] and reply["shared_pages"] and reply["canary_hits"]

    log = machine_artifacts / "vm" / "debugcon.log"
    analyzed = _cli("analyze-log", str(log), "--firmware", str(ovmf_firmware.path), "--json",
                    "--html", str(machine_artifacts / "again.html"))
    assert analyzed.returncode == 1
    assert {v["check"] for v in json.loads(analyzed.stdout)["violations"]} == {"V2", "V4"}
    assert "<svg" in (machine_artifacts / "again.html").read_text()

    dumped = _cli("analyze-dump", str(machine_artifacts / "memory.elf"), "--log", str(log),
                  "--firmware", str(ovmf_firmware.path),
                  "--canary", str(machine_artifacts / "canary.bin"), "--json")
    assert dumped.returncode == 1
    found = json.loads(dumped.stdout)
    assert found["live_mappings"] == reply["live_mappings"]
    assert found["canary_hits"] == reply["canary_hits"]


def test_truncated_dump_and_log_exit_2_with_one_line(ovmf_firmware: edk2.Firmware,
                                                    machine_artifacts: Path) -> None:
    _boot(ovmf_firmware, machine_artifacts)
    dump = machine_artifacts / "memory.elf"
    cut = machine_artifacts / "cut.elf"
    cut.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])
    log = machine_artifacts / "vm" / "debugcon.log"
    proc = _cli("analyze-dump", str(cut), "--log", str(log))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "cut.elf" in proc.stderr

    lines = log.read_text().splitlines(keepends=True)
    ends = next(i for i, line in enumerate(lines) if "EBST ebs-return" in line)
    short = machine_artifacts / "short.log"
    short.write_text("".join(lines[:ends]))
    proc = _cli("analyze-log", str(short))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and f"{ends}" in proc.stderr


def test_demo_tells_the_story(ovmf_firmware: edk2.Firmware, machine_artifacts: Path,
                              host_caps: HostCaps) -> None:
    """Without SEV hardware the demo runs on the emulated SEV of the harness's
    QEMU (built, or from the cache), so OVMF takes its real SEV path."""
    proc = _cli("demo", "--firmware", str(ovmf_firmware.path), "--artifacts",
                str(machine_artifacts))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    mode = "sev" if host_caps.sev.available else "emulated"
    if mode == "emulated":
        assert "emulated SEV on the harness's QEMU" in proc.stdout.splitlines()[0]
    assert "as predicted" in proc.stdout
    assert ("finding (C2, not a failed verdict): EbsAdversaryDxe!AdversaryStage allocates"
            in proc.stdout)
    legacy = json.loads((machine_artifacts / "legacy" / "result.json").read_text())
    callback = json.loads((machine_artifacts / "callback" / "result.json").read_text())
    assert legacy["sev"] == callback["sev"] == mode
    assert {v["check"] for v in legacy["violations"]} >= {"V1", "V3", "D3"}
    assert callback["verdict"] == "pass"


def test_demo_falls_back_with_one_line_on_a_qemu_without_the_emulation(
        ovmf_firmware: edk2.Firmware, machine_artifacts: Path, host_caps: HostCaps) -> None:
    if host_caps.sev.available:
        pytest.skip("a SEV host runs the demo on real SEV")
    proc = _cli("demo", "--firmware", str(ovmf_firmware.path), "--qemu", host_caps.qemu,
                "--artifacts", str(machine_artifacts))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "has no emulated SEV" in first and "IOMMU emulation mode instead" in first
    assert json.loads((machine_artifacts / "callback" / "result.json").read_text())["sev"] \
        == "off"


def test_boot_deadline_exits_3_naming_what_was_awaited(ovmf_firmware: edk2.Firmware,
                                                       machine_artifacts: Path) -> None:
    """Environment failure: under TCG the probe cannot park within half a second."""
    proc = _cli("boot", "--firmware", str(ovmf_firmware.path), "--accel", "tcg",
                "--timeout", "0.5", "--artifacts", str(machine_artifacts))
    assert proc.returncode == 3 and proc.stdout == ""
    first = proc.stderr.splitlines()[0]
    assert first.startswith("ebs-harness boot: ") and "probe-parked" in first
    assert "qemu-system-x86_64" in proc.stderr          # the command line is quoted
    assert not _qemu_running(machine_artifacts)


def _qemu_running(artifacts: Path) -> bool:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True,
                         check=False).stdout
    return str(artifacts) in out


@pytest.mark.parametrize(("options", "message"), [
    (("--sev", "bogus"), "argument --sev: invalid choice: 'bogus'"),
    (("--sev", "emulated", "--accel", "kvm"), "--sev emulated runs under TCG: drop --accel kvm"),
    (("--sev", "emulated", "--host", "ssh://nobody@127.0.0.1"),
     "--sev emulated runs on this host"),
], ids=["unknown-mode", "with-kvm", "with-host"])
def test_boot_bad_sev_options_exit_2_with_one_line(options: tuple[str, ...],
                                                   message: str) -> None:
    proc = _cli("boot", *options)
    assert proc.returncode == 2 and proc.stdout == ""
    # the last line says what is wrong (argparse puts its usage above it)
    assert message in proc.stderr.strip().splitlines()[-1]


def test_boot_emulated_on_a_qemu_without_the_emulation_exits_2_before_any_build(
        host_caps: HostCaps, tmp_path: Path) -> None:
    """Debian's QEMU asked for --sev emulated: one line saying why, exit 2,
    before the firmware is even looked at (a firmware path that does not
    exist would otherwise be the error)."""
    proc = _cli("boot", "--sev", "emulated", "--qemu", host_caps.qemu, "--firmware",
                str(tmp_path / "no-such-firmware"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("ebs-harness boot: --sev emulated: not available: ")
    assert "has no emulated SEV" in proc.stderr and "build-qemu" in proc.stderr
