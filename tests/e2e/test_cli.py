"""The command line on real boots: exit statuses and JSON as the README promises them.

Each test runs ``python -m harness`` as a user would, with the session's
firmware, and reads back what it printed and left in its artifacts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.build import edk2
from harness.vm.host import HostCaps
from harness.vm.sev import MODES

pytestmark = pytest.mark.tcg

DATA = Path(__file__).resolve().parent.parent / "data"


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", "-q", *args], capture_output=True,
                          text=True, check=False, timeout=timeout)


def _boot(firmware: edk2.Firmware, artifacts: Path, *options: str
          ) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    proc = _cli("boot", "--firmware", str(firmware.path), "--accel", "tcg", "--dump",
                "--json", "--artifacts", str(artifacts), *options)
    assert proc.returncode in (0, 1), proc.stderr
    return proc, json.loads(proc.stdout)


def test_boot_callback_exits_0_with_empty_findings(ebs_firmware: edk2.Firmware,
                                                   ebs_artifacts: Path) -> None:
    proc, reply = _boot(ebs_firmware, ebs_artifacts, "--requeue-depth", "2",
                        "--devices", "virtio-blk,virtio-net")
    assert proc.returncode == 0, reply
    assert reply["verdict"] == "pass" and reply["violations"] == []
    assert reply["live_mappings"] == [] and reply["shared_pages"] == []
    assert reply["canary_hits"] == []
    assert reply["firmware_key"] == ebs_firmware.key and reply["accel"] == "tcg"
    for name in ("probe.img", "canary.bin", "memory.elf", "timeline.html", "result.json",
                 "vm/debugcon.log", "vm/reproduce.sh", "vm/cmdline.txt", "vm/qmp.log"):
        assert (ebs_artifacts / name).is_file(), name


def test_boot_none_with_leak_exits_1_and_analyzers_agree(ebs_firmware: edk2.Firmware,
                                                        ebs_artifacts: Path) -> None:
    proc, reply = _boot(ebs_firmware, ebs_artifacts, "--ebs-mode", "none",
                        "--leak-mapping")
    assert proc.returncode == 1
    checks = {v["check"] for v in reply["violations"]}  # type: ignore[union-attr]
    assert {"V2", "V4", "D1", "D2", "D3"} <= checks
    assert reply["live_mappings"] and reply["shared_pages"] and reply["canary_hits"]

    log = ebs_artifacts / "vm" / "debugcon.log"
    analyzed = _cli("analyze-log", str(log), "--firmware", str(ebs_firmware.path), "--json",
                    "--html", str(ebs_artifacts / "again.html"))
    assert analyzed.returncode == 1
    assert {v["check"] for v in json.loads(analyzed.stdout)["violations"]} == {"V2", "V4"}
    assert "<svg" in (ebs_artifacts / "again.html").read_text()

    dumped = _cli("analyze-dump", str(ebs_artifacts / "memory.elf"), "--log", str(log),
                  "--firmware", str(ebs_firmware.path),
                  "--canary", str(ebs_artifacts / "canary.bin"), "--json")
    assert dumped.returncode == 1
    found = json.loads(dumped.stdout)
    assert found["live_mappings"] == reply["live_mappings"]
    assert found["canary_hits"] == reply["canary_hits"]


def test_truncated_dump_and_log_exit_2_with_one_line(ebs_firmware: edk2.Firmware,
                                                    ebs_artifacts: Path) -> None:
    _boot(ebs_firmware, ebs_artifacts)
    dump = ebs_artifacts / "memory.elf"
    cut = ebs_artifacts / "cut.elf"
    cut.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])
    log = ebs_artifacts / "vm" / "debugcon.log"
    proc = _cli("analyze-dump", str(cut), "--log", str(log))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "cut.elf" in proc.stderr

    lines = log.read_text().splitlines(keepends=True)
    ends = next(i for i, line in enumerate(lines) if "EBST ebs-return" in line)
    short = ebs_artifacts / "short.log"
    short.write_text("".join(lines[:ends]))
    proc = _cli("analyze-log", str(short))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and f"{ends}" in proc.stderr


def test_demo_tells_the_story(ebs_firmware: edk2.Firmware, ebs_artifacts: Path,
                              ebs_host_caps: HostCaps) -> None:
    """Without SEV hardware the demo runs on the emulated SEV of the harness's
    QEMU (built, or from the cache), so OVMF takes its real SEV path."""
    proc = _cli("demo", "--firmware", str(ebs_firmware.path), "--artifacts",
                str(ebs_artifacts))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    # without SEV hardware: the emulated SEV-ES, or the emulated SEV where the
    # baseline's firmware stops under SEV-ES (2022.11; the line says why)
    no_es = MODES["emulated-es"].stops(ebs_firmware.baseline)
    mode = ("sev-es" if ebs_host_caps.sev_es.available else
            "sev" if ebs_host_caps.sev.available else
            "emulated" if no_es else "emulated-es")
    first = proc.stdout.splitlines()[0]
    if mode == "emulated-es":
        assert "emulated SEV-ES on the harness's QEMU" in first
    elif mode == "emulated":
        assert "emulated SEV on the harness's QEMU" in first and no_es in first, first
    assert "as predicted" in proc.stdout
    assert ("finding (C2, not a failed verdict): EbsAdversaryDxe!AdversaryStage allocates"
            in proc.stdout)
    legacy = json.loads((ebs_artifacts / "legacy" / "result.json").read_text())
    callback = json.loads((ebs_artifacts / "callback" / "result.json").read_text())
    assert legacy["sev"] == callback["sev"] == mode
    # D1..D3 depend on the SEV mode and the baseline (test_scenarios.py)
    assert {v["check"] for v in legacy["violations"]} >= {"V1", "V3", "V4"}
    assert callback["verdict"] == "pass"


def test_demo_sev_chooses_the_platform(ebs_firmware: edk2.Firmware, ebs_artifacts: Path,
                                       ebs_host_caps: HostCaps) -> None:
    """``--sev emulated`` runs the story on plain emulated SEV (the default
    would be SEV-ES), and says so first; a mode this host lacks is exit 2."""
    proc = _cli("demo", "--sev", "emulated", "--firmware", str(ebs_firmware.path),
                "--artifacts", str(ebs_artifacts))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "emulated, as asked: the harness's QEMU emulates plain SEV" in \
        proc.stdout.splitlines()[0]
    assert json.loads((ebs_artifacts / "callback" / "result.json").read_text())["sev"] \
        == "emulated"
    lacking = next((mode for mode in ("snp", "sev-es", "sev")
                    if not ebs_host_caps.capability(MODES[mode].capability).available), None)
    if lacking is not None:         # a mode this host lacks is refused, one line
        refused = _cli("demo", "--sev", lacking, "--firmware", str(ebs_firmware.path))
        assert refused.returncode == 2
        assert refused.stderr.startswith(f"ebs-harness demo: --sev {lacking}")
    # edk2 2022.11's OVMF does not boot under the emulated SEV-ES: refused too
    old = _cli("demo", "--sev", "emulated-es", "--edk2", "2022.11")
    assert old.returncode == 2 and "stops in PEI under the emulated SEV-ES" in old.stderr


def test_demo_falls_back_with_one_line_on_a_qemu_without_the_emulation(
        ebs_firmware: edk2.Firmware, ebs_artifacts: Path, ebs_host_caps: HostCaps) -> None:
    if ebs_host_caps.sev.available:
        pytest.skip("a SEV host runs the demo on real SEV")
    proc = _cli("demo", "--firmware", str(ebs_firmware.path), "--qemu", ebs_host_caps.qemu,
                "--artifacts", str(ebs_artifacts))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "has no emulated SEV" in first and "IOMMU emulation mode instead" in first
    assert json.loads((ebs_artifacts / "callback" / "result.json").read_text())["sev"] \
        == "off"


def test_boot_deadline_exits_3_naming_what_was_awaited(ebs_firmware: edk2.Firmware,
                                                       ebs_artifacts: Path) -> None:
    """Environment failure: under TCG the probe cannot park within half a second."""
    proc = _cli("boot", "--firmware", str(ebs_firmware.path), "--accel", "tcg",
                "--timeout", "0.5", "--artifacts", str(ebs_artifacts))
    assert proc.returncode == 3 and proc.stdout == ""
    first = proc.stderr.splitlines()[0]
    assert first.startswith("ebs-harness boot: ") and "probe-parked" in first
    assert "qemu-system-x86_64" in proc.stderr          # the command line is quoted
    assert not _qemu_running(ebs_artifacts)


def _qemu_running(artifacts: Path) -> bool:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True,
                         check=False).stdout
    return str(artifacts) in out


@pytest.mark.parametrize(("options", "message"), [
    (("--sev", "bogus"), "argument --sev: invalid choice: 'bogus'"),
    (("--sev", "emulated", "--accel", "kvm"), "--sev emulated: runs under tcg, not accel kvm"),
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
        ebs_host_caps: HostCaps, tmp_path: Path) -> None:
    """Debian's QEMU asked for --sev emulated: one line saying why, exit 2,
    before the firmware is even looked at (a firmware path that does not
    exist would otherwise be the error)."""
    proc = _cli("boot", "--sev", "emulated", "--qemu", ebs_host_caps.qemu, "--firmware",
                str(tmp_path / "no-such-firmware"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("ebs-harness boot: --sev emulated: not available here: ")
    assert "has no emulated SEV" in proc.stderr and "build-qemu" in proc.stderr


def test_ctrl_c_during_a_boot_exits_130_and_leaves_no_qemu(ebs_firmware: edk2.Firmware,
                                                           ebs_artifacts: Path) -> None:
    """SIGINT (what Ctrl-C sends the foreground process) while the guest
    boots: one line, exit 130, and QEMU gone with the harness."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "-q", "boot", "--firmware", str(ebs_firmware.path),
         "--accel", "tcg", "--artifacts", str(ebs_artifacts), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        debugcon = ebs_artifacts / "vm" / "debugcon.log"
        deadline = time.monotonic() + 60
        while not (debugcon.is_file() and debugcon.stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline, "QEMU never wrote"
            time.sleep(0.05)
        assert _qemu_running(ebs_artifacts)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err == "ebs-harness boot: interrupted\n"
    assert json.loads(out)["error"] == {"kind": "interrupted", "message": "interrupted",
                                        "status": 130}
    assert not _qemu_running(ebs_artifacts)


def test_internal_error_exits_4_naming_the_traceback_file(tmp_path: Path) -> None:
    """A bug of ours in the installed command (here: a parser that raises
    what it never should) is exit 4 with the traceback kept, never 1."""
    code = ("import sys; from harness.analysis import trace\n"
            "def broken(*args, **kwargs): raise ZeroDivisionError('a bug')\n"
            "trace.analyze_log = broken\n"
            "from harness.cli import run; sys.argv[0] = 'ebs-harness'; run()\n")
    proc = subprocess.run(
        [sys.executable, "-c", code, "analyze-log", str(DATA / "callback-depth2.log"), "--json"],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "EBS_HARNESS_CACHE": str(tmp_path)})
    assert proc.returncode == 4 and proc.stderr.count("\n") == 1
    error = json.loads(proc.stdout)["error"]
    assert error["kind"] == "internal" and "ZeroDivisionError: a bug" in error["message"]
    saved = Path(error["traceback"])
    assert saved.parent == tmp_path / "crashes" and "ZeroDivisionError" in saved.read_text()
