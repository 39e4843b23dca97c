"""The machine layer on real QEMU under TCG: boots, QMP, dumps, errors, cleanup.

Each boot is a few seconds. The harness's own DEBUG build comes from the
``ebs_firmware`` fixture (``--firmware DIR`` to skip the build).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from harness.build import edk2
from harness.errors import AbnormalShutdown, ConsoleTimeout, LaunchError, QmpError
from harness.vm import guest, host, machine
from harness.vm.config import MachineConfig
from harness.vm.devices import BlockDevice
from harness.vm.machine import QemuMachine
from harness.vm.runner import LocalRunner
from harness.vm.sev import SEV_STATE_PAUSED, SevConfig

pytestmark = pytest.mark.tcg

STOCK_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
STOCK_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024

# What OVMF's BDS prints when it boots \EFI\BOOT\BOOTX64.EFI from a disk
# (edk2 2022.11 DEBUG, MdeModulePkg/Library/UefiBootManagerLib):
#   [Bds]Booting UEFI Non-Block Boot Device
#   FSOpen: Open '\EFI\BOOT\BOOTX64.EFI' Success
#   [Bds] Expand PciRoot(0x0)/Pci(0x1,0x0) -> PciRoot(0x0)/Pci(0x1,0x0)/\EFI\BOOT\BOOTX64.EFI
BDS_BOOTS_BOOTX64 = r"\[Bds\] Expand \S+ -> \S+/\\EFI\\BOOT\\BOOTX64\.EFI"


def stock_config(**kwargs: object) -> MachineConfig:
    if not STOCK_CODE.is_file():
        pytest.skip(f"Debian's OVMF is not installed ({STOCK_CODE})")
    return MachineConfig(code=STOCK_CODE, vars_template=STOCK_VARS, debugcon=False,
                         **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def boot_image(ebs_firmware: edk2.Firmware, tmp_path: Path) -> Path:
    """A FAT image whose \\EFI\\BOOT\\BOOTX64.EFI is the build's UEFI shell."""
    shell = ebs_firmware.module_file("Shell", ".efi")
    if not shell.is_file():
        pytest.skip(f"the firmware build has no {shell.name}")
    return guest.make_fat_image(tmp_path / "boot.img", {guest.BOOT_PATH: shell}, size_mib=8)


@pytest.fixture
def own_config(ebs_firmware: edk2.Firmware, boot_image: Path,
               ebs_qemu_binary: str) -> MachineConfig:
    return MachineConfig(code=ebs_firmware.code, vars_template=ebs_firmware.vars,
                         qemu=ebs_qemu_binary, accel="tcg",
                         devices=(BlockDevice(boot_image, bootindex=0),))


def qemu_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, waiting for its reaper


# --------------------------------------------------------------- boots


def test_stock_ovmf_reaches_uefi_shell(ebs_artifacts: Path) -> None:
    with QemuMachine(stock_config(), ebs_artifacts, name="stock") as vm:
        assert vm.status() == "running"
        match = vm.serial.expect([r"Press .*ESC.* in \d+ seconds", r"Shell> "], timeout=40)
        if "ESC" in match.group(0):
            vm.serial.send("\x1b")  # skip the startup.nsh countdown
            vm.serial.expect(r"Shell> ", timeout=15)
        vm.serial.send("reset -s\r")  # the guest powers itself off
        shutdown = vm.wait_event("SHUTDOWN", timeout=15)
        assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}
        assert vm.wait(10) == 0
    assert vm.exitcode == 0
    assert "Shell> " in (ebs_artifacts / "serial.log").read_text(errors="replace")
    for name in ("cmdline.txt", "reproduce.sh", "qmp.log", "serial.log",
                 "qemu-stderr.log", "OVMF_VARS.fd"):
        assert (ebs_artifacts / name).is_file(), name
    transcript = (ebs_artifacts / "qmp.log").read_text()
    assert '"execute": "cont"' in transcript and '"guest-shutdown"' in transcript
    assert os.access(ebs_artifacts / "reproduce.sh", os.X_OK)


def test_own_build_boots_bootx64(own_config: MachineConfig, ebs_artifacts: Path) -> None:
    with QemuMachine(own_config, ebs_artifacts, name="own") as vm:
        match = vm.debugcon.expect(BDS_BOOTS_BOOTX64, timeout=30)
        assert match.group(0).endswith("\\EFI\\BOOT\\BOOTX64.EFI")
        vm.debugcon.expect(r"Loading driver at 0x[0-9A-F]+ EntryPoint=0x[0-9A-F]+ Shell\.efi",
                           timeout=15)
        status = vm.qmp("query-status")
        assert status["status"] == "running" and status["running"] is True
    log = (ebs_artifacts / "debugcon.log").read_text(errors="replace")
    assert "FSOpen: Open '\\EFI\\BOOT\\BOOTX64.EFI' Success" in log


def test_memory_dump_is_an_elf_covering_ram(own_config: MachineConfig,
                                            ebs_artifacts: Path) -> None:
    with QemuMachine(own_config, ebs_artifacts, name="dump") as vm:
        vm.debugcon.expect(BDS_BOOTS_BOOTX64, timeout=30)
        path = vm.dump(ebs_artifacts / "memory.elf", timeout=60)
        assert vm.status() == "paused"
        stop = vm.wait_event("STOP", timeout=1)
        assert stop["event"] == "STOP"
    with open(path, "rb") as handle:
        elf = ELFFile(handle)
        assert elf.header["e_type"] == "ET_CORE"
        assert elf.header["e_machine"] == "EM_X86_64"
        loads = sorted((seg["p_paddr"], seg["p_memsz"]) for seg in elf.iter_segments()
                       if seg["p_type"] == "PT_LOAD")
        notes = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE"]
    assert len(notes) == 1
    assert loads, "no PT_LOAD segments"
    ram = own_config.memory_mib * MIB
    for (start, size), (following, _) in itertools.pairwise(loads):
        assert start + size <= following, "overlapping PT_LOAD segments"
    assert loads[0][0] == 0
    assert loads[-1][0] + loads[-1][1] == ram  # 256 MiB on q35: all below 4 GiB
    assert sum(size for _, size in loads) == ram


def test_qmp_events_are_waitable(ebs_artifacts: Path) -> None:
    with QemuMachine(stock_config(), ebs_artifacts, name="events") as vm:
        vm.qmp("stop")
        assert vm.wait_event(["STOP", "SHUTDOWN"], timeout=5)["event"] == "STOP"
        assert vm.status() == "paused"
        vm.qmp("cont")
        assert vm.wait_event("RESUME", timeout=5)["event"] == "RESUME"
        vm.qmp("system_reset")
        # a filter on the event's fields: the host's reset, not a guest's
        with pytest.raises(QmpError, match="matching"):
            vm.wait_event("RESET", timeout=1, match={"data": {"guest": True}})
        assert vm.wait_event("RESET", timeout=5, match={"data": {"guest": False}})
        assert [e["event"] for e in vm.events][:2] == ["RESUME", "STOP"]
    assert vm.exitcode == 0  # shutdown: QMP quit
    assert vm.events[-1]["data"] == {"guest": False, "reason": "host-qmp-quit"}
    vm.shutdown()  # idempotent
    assert '"execute": "quit"' in (ebs_artifacts / "qmp.log").read_text()


def test_a_requested_quit_is_sent_once_and_waited_for(ebs_artifacts: Path) -> None:
    with QemuMachine(stock_config(), ebs_artifacts, name="quit") as vm:
        vm.request_quit()
        vm.request_quit()   # sent once
        vm.shutdown()       # waits for the exit the quit began, sends nothing
        assert vm.exitcode == 0 and not vm.is_running()
    assert vm.abnormal is None
    assert (ebs_artifacts / "qmp.log").read_text().count('"execute": "quit"') == 1


def test_a_qemu_gone_before_the_requested_quit_is_abnormal(ebs_artifacts: Path) -> None:
    """The control: nothing to quit, and the machine says how QEMU ended."""
    with (pytest.raises(AbnormalShutdown, match="QEMU was killed by SIGKILL"),
          QemuMachine(stock_config(), ebs_artifacts, name="gone") as vm):
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGKILL)
        assert vm.process is not None
        vm.process.wait(10)
        vm.request_quit()
        assert vm.abnormal is not None
    assert '"execute": "quit"' not in (ebs_artifacts / "qmp.log").read_text()


class _StallingRunner(LocalRunner):
    """Its first QMP connection is a socket that never speaks, as a stalled
    SSH socket bridge was once."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled: list[socket.socket] = []

    def connect(self, path: Path) -> socket.socket:
        if not self.stalled:
            ours, theirs = socket.socketpair()
            self.stalled.append(theirs)     # kept open: no greeting, no EOF
            return ours
        return super().connect(path)

    def close(self) -> None:
        for sock in self.stalled:
            sock.close()
        super().close()


def test_a_qmp_connection_without_a_greeting_is_made_again(
        ebs_artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "GREETING_WAIT", 0.5)
    runner = _StallingRunner()
    with QemuMachine(stock_config(), ebs_artifacts, name="stall", runner=runner) as vm:
        assert vm.status() == "running" and len(runner.stalled) == 1


def test_without_a_new_connection_the_stall_is_the_launch_error(
        ebs_artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: one connection waits the whole deadline."""
    monkeypatch.setattr(machine, "GREETING_WAIT", 60.0)
    with (pytest.raises(LaunchError, match="did not answer in 2 s .*no greeting"),
          QemuMachine(stock_config(), ebs_artifacts, name="stall", runner=_StallingRunner(),
                      launch_timeout=2.0)):
        pytest.fail("launched without a greeting")


# -------------------------------------------------------------- errors


def test_bad_firmware_path_gives_qemus_message(tmp_path: Path,
                                               ebs_artifacts: Path) -> None:
    config = MachineConfig(code=tmp_path / "no-such-OVMF_CODE.fd",
                           vars_template=STOCK_VARS, debugcon=False)
    vm = QemuMachine(config, ebs_artifacts, name="badfw")
    with pytest.raises(LaunchError) as info:
        vm.launch()
    err = info.value
    assert err.exitcode == 1
    assert "no-such-OVMF_CODE.fd" in err.log and "No such file or directory" in err.log
    assert "No such file or directory" in str(err)
    assert err.command[0] == "qemu-system-x86_64"
    assert not vm.is_running()
    vm.shutdown()  # idempotent after a failed launch


def test_bad_device_option_gives_qemus_message(ebs_artifacts: Path) -> None:
    config = stock_config(extra_args=("-device", "virtio-blk-pci,no-such-property=1"))
    with pytest.raises(LaunchError) as info, QemuMachine(config, ebs_artifacts,
                                                         name="baddev"):
        pytest.fail("QEMU started with a bad device option")
    assert "no-such-property" in info.value.log
    assert "not found" in str(info.value)  # QEMU: Property '...no-such-property' not found


def test_hung_guest_hits_the_deadline_with_log_tails(own_config: MachineConfig,
                                                     ebs_artifacts: Path) -> None:
    with QemuMachine(own_config, ebs_artifacts, name="hung") as vm:
        vm.debugcon.expect(r"\[Bds\]", timeout=30)  # the log has content to quote
        with pytest.raises(ConsoleTimeout) as info:
            vm.debugcon.expect(r"this line never comes", timeout=2)
        assert vm.is_running()      # the deadline ended the wait, not QEMU
        last_line = (ebs_artifacts / "debugcon.log").read_text(
            errors="replace").rstrip("\n").splitlines()[-1]
    text = str(info.value)
    assert text.startswith("timed out after 2 s on debugcon waiting for "
                           "'this line never comes'")
    assert "--- last lines of debugcon.log:" in text
    assert "--- last lines of serial.log:" in text
    assert "--- last lines of qemu-stderr.log:" in text
    assert "--- command line:" in text and "-debugcon file:" in text
    assert info.value.tails["debugcon.log"].count("\n") == 39  # 40 lines
    assert last_line.strip() in info.value.tails["debugcon.log"]


def test_sev_on_a_host_without_sev_is_a_launch_error(ebs_host_caps: host.HostCaps,
                                                     ebs_artifacts: Path) -> None:
    """QEMU's SEV initialisation refuses, and the error says so: QEMU's own
    line (from sev_kvm_init) with the harness's explanation before it."""
    if ebs_host_caps.sev.available:
        pytest.skip("this host has SEV: the refusal cannot be shown here")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm: QEMU refuses KVM before it gets to SEV")
    config = MachineConfig(code=STOCK_CODE, vars_template=STOCK_VARS, accel="kvm",
                           sev=SevConfig("sev", cbitpos=47, reduced_phys_bits=1),
                           debugcon=False)
    vm = QemuMachine(config, ebs_artifacts, name="nosev")
    with pytest.raises(LaunchError) as info:
        vm.launch()
    assert not vm.is_running()
    refusal = [line for line in info.value.log.splitlines() if "sev_kvm_init" in line]
    assert refusal, info.value.log
    first = str(info.value).splitlines()[0]
    assert first.startswith("QEMU exited with status 1: ") and first.endswith(refusal[0])
    assert len(first) > len("QEMU exited with status 1: ") + len(refusal[0]) + 2  # explained


def test_qemu_killed_mid_wait_says_so_and_quotes_its_stderr(ebs_artifacts: Path) -> None:
    """QEMU dies by a signal while a console waits: the error names the
    signal (not a timeout, not "exited") and quotes qemu-stderr.log; and the
    machine, closed, reports the ungraceful end."""
    with (pytest.raises(AbnormalShutdown, match="it ended by itself before the shutdown: "
                                                "QEMU was killed by SIGKILL"),
          QemuMachine(stock_config(), ebs_artifacts, name="killed") as vm):
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGKILL)
        with pytest.raises(ConsoleTimeout) as info:
            vm.serial.expect("Shell> never", timeout=120)
    first = str(info.value).splitlines()[0]
    assert first.endswith("(the console ended: QEMU was killed by SIGKILL)"), first
    assert "--- last lines of qemu-stderr.log:" in str(info.value)


def test_plain_guest_never_passes_the_sev_check(ebs_artifacts: Path) -> None:
    """The query-sev check that runs after a SEV launch, against a plain
    TCG guest: QEMU answers enabled=false and the launch must fail."""
    with (QemuMachine(stock_config(), ebs_artifacts, name="plain") as vm,
          pytest.raises(LaunchError, match="query-sev says enabled=false")):
        vm._check_sev(SevConfig("sev", cbitpos=47, reduced_phys_bits=1), SEV_STATE_PAUSED)


def test_reproduce_script_reruns_the_same_qemu(own_config: MachineConfig,
                                               ebs_artifacts: Path) -> None:
    vm = QemuMachine(own_config, ebs_artifacts, name="repro")
    with vm:
        vm.debugcon.expect(r"SecCoreStartupWithStack", timeout=20)
    proc = subprocess.run(["timeout", "3", str(ebs_artifacts / "reproduce.sh")],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                          check=False)
    assert proc.returncode == 124, proc.stderr  # still running when timeout ended it
    log = (ebs_artifacts / "repro" / "debugcon.log").read_text(errors="replace")
    assert "SecCoreStartupWithStack" in log
    assert not (ebs_artifacts / "repro" / "qmp.sock").exists()  # QEMU removed it


# ------------------------------------------------------------- cleanup


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from harness.vm.machine import MachineConfig, QemuMachine
    config = MachineConfig(code=Path({code!r}), vars_template=Path({vars!r}), debugcon=False)
    vm = QemuMachine(config, Path(sys.argv[1]))
    vm.launch()
    print("READY", vm.pid, flush=True)
    time.sleep(600)
""")

CHILD_PLAIN = textwrap.dedent("""
    import subprocess, sys, time
    proc = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-nodefaults",
                             "-display", "none", "-S"])
    print("READY", proc.pid, flush=True)
    time.sleep(600)
""")


def run_child(script: str, artifacts: Path, tmpdir: Path) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ, TMPDIR=str(tmpdir))
    child = subprocess.Popen([sys.executable, "-c", script, str(artifacts)], env=env,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline().split()
    assert line[:1] == ["READY"], line
    return child, int(line[1])


def wait_dead(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not qemu_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_sigkill_of_the_harness_leaves_no_qemu_and_no_socket(
        tmp_path: Path, ebs_artifacts: Path) -> None:
    if not STOCK_CODE.is_file():
        pytest.skip(f"Debian's OVMF is not installed ({STOCK_CODE})")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    script = CHILD.format(repo=str(REPO), code=str(STOCK_CODE), vars=str(STOCK_VARS))
    child, qemu_pid = run_child(script, ebs_artifacts, tmpdir)
    try:
        time.sleep(1.0)  # mid-boot: the firmware is running
        assert qemu_alive(qemu_pid)
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        assert wait_dead(qemu_pid, 5), f"QEMU {qemu_pid} outlived its harness"
        assert list(tmpdir.iterdir()) == []  # no socket, no private directory
    finally:
        if qemu_alive(qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)


def test_negative_control_plain_popen_qemu_survives(tmp_path: Path) -> None:
    """Without PR_SET_PDEATHSIG a QEMU outlives its SIGKILLed parent: the
    test above can fail."""
    child, qemu_pid = run_child(CHILD_PLAIN, tmp_path, tmp_path)
    try:
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        assert not wait_dead(qemu_pid, 1.0)
    finally:
        os.kill(qemu_pid, signal.SIGKILL)
        wait_dead(qemu_pid, 5)


# ---------------------------------------------------------- host-check


def test_host_check_json() -> None:
    proc = subprocess.run([sys.executable, "-m", "harness", "host-check", "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    caps = json.loads(proc.stdout)
    assert caps["qemu_version"]
    assert caps["tcg"]["available"] is True
    for name in ("kvm", "sev", "sev_es", "snp"):
        assert isinstance(caps[name]["available"], bool)
        assert caps[name]["reason"], name
    if not Path("/dev/kvm").exists():
        assert caps["kvm"]["available"] is False
    if caps["kvm"]["available"]:
        assert "booted firmware" in caps["kvm"]["reason"]
    if not Path("/dev/sev").exists():
        assert caps["sev"]["available"] is False
        assert caps["sev_geometry"] is None


def test_a_tcg_only_probe_boots_nothing_under_kvm(ebs_host_caps: host.HostCaps,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``boot --accel tcg`` asks a probe that proves TCG and skips KVM and
    what needs it; the control: the full probe asks KVM (under the same spy)."""
    booted: list[str] = []
    real = host._boot_probe

    def spy(qemu: str, accel: str, *args: object, **kwargs: object) -> host.Capability:
        booted.append(accel)
        return real(qemu, accel, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(host, "_boot_probe", spy)
    scoped = host.probe(ebs_host_caps.qemu, tcg_only=True)
    assert booted == ["tcg"]
    assert scoped.tcg.available == ebs_host_caps.tcg.available
    assert not scoped.kvm and scoped.kvm.reason == host.NOT_PROBED_KVM
    assert not scoped.sev and not scoped.sev_es
    assert scoped.sev_emulated.available == ebs_host_caps.sev_emulated.available
    booted.clear()
    full = host.probe(ebs_host_caps.qemu)
    assert full.kvm.reason != host.NOT_PROBED_KVM
    if Path("/dev/kvm").exists():
        assert booted == ["tcg", "kvm"]
