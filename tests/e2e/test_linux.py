"""The operating system side of ExitBootServices: a real Linux guest over SSH.

The patched OVMF (``callback`` scheme, IOMMU emulation on a plain guest)
drives the virtio disks and NIC (its shell reads the ESP and configures the
NIC), then starts Debian's kernel through its EFI stub; the stub calls
ExitBootServices, the firmware's virtio drivers reset their devices and the
teardown unmaps what they left mapped, and Linux must then find working
devices: the virtio-blk disk with the per-run canary and the virtio-net NIC
the SSH session itself runs over. One boot serves the
checks of the callback guest (they are cheap once it is up); the SSH
deadline and SEV have boots of their own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest

from harness import linux
from harness.analysis import devices, devicetrace, trace
from harness.build import edk2
from harness.errors import ConsoleTimeout, GuestCommandError
from harness.linux import LinuxBoot, LinuxImage, LinuxRun
from harness.pytestplugin import session_emulated_caps
from harness.vm import host


def _qemu_pids_with(text: str) -> list[int]:
    """QEMU processes whose command line mentions ``text``."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(text.encode() in a for a in argv):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def callback_guest(ebs_firmware: edk2.Firmware, ebs_linux_image: LinuxImage,
                   ebs_host_caps: host.HostCaps, ebs_accel: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[LinuxRun]:
    boot = LinuxBoot(ebs_mode="callback", accel=ebs_accel)
    artifacts = tmp_path_factory.mktemp("linux-callback")
    with linux.boot_linux(ebs_firmware, ebs_linux_image, boot, artifacts, caps=ebs_host_caps) as run:
        yield run
    assert not _qemu_pids_with(str(artifacts))


@pytest.mark.tcg
def test_ssh_ready_time_is_recorded(callback_guest: LinuxRun,
                             record_property: Callable[[str, object], None]) -> None:
    record_property("ssh_ready_seconds", round(callback_guest.ready_seconds, 1))
    record_property("accel", callback_guest.accel)
    _, out, _ = callback_guest.session.run("uname -r; cat /proc/cmdline")
    assert out.startswith("6.")
    assert "ebs.authkey=ssh-ed25519:" in out


@pytest.mark.tcg
def test_guest_reads_the_canary_disk(callback_guest: LinuxRun) -> None:
    canary = callback_guest.canary
    session = callback_guest.session
    # vda is the ESP, vdb the 1 MiB canary disk (PCI order)
    assert session.run("cat /sys/block/vdb/size")[1].strip() == "2048"
    _, out, _ = session.run(f"dd if=/dev/vdb bs={len(canary)} count=1 2>/dev/null")
    assert out.encode() == canary
    # and the whole disk, canary and zeros, byte for byte
    expected = hashlib.sha256(callback_guest.canary_image.read_bytes()).hexdigest()
    _, out, _ = session.run("sha256sum /dev/vdb")
    assert out.split()[0] == expected


@pytest.mark.tcg
def test_network_answers(callback_guest: LinuxRun) -> None:
    # The SSH session itself runs over virtio-net; the gateway answers too.
    session = callback_guest.session
    _, driver, _ = session.run("readlink /sys/class/net/eth0/device/driver")
    assert driver.strip().endswith("/virtio_net")
    _, out, _ = session.run(f"ping -c 2 -W 5 {linux.GATEWAY}", timeout=30)
    assert " 0% packet loss" in out


@pytest.mark.tcg
def test_dmesg_has_no_dma_iommu_or_virtio_errors(callback_guest: LinuxRun) -> None:
    _, dmesg, _ = callback_guest.session.run("dmesg")
    assert linux.dmesg_problems(dmesg) == []
    # the control of test_guest_under_emulated_sev: a plain guest has no SEV
    assert linux.SEV_ACTIVE["emulated"] not in dmesg
    assert "Memory encryption is active and system is using DMA bounce buffers" not in dmesg
    # the devices the firmware reset at ExitBootServices were taken over
    assert "[vda]" in dmesg and "[vdb]" in dmesg
    _, modules, _ = callback_guest.session.run("cat /proc/modules")
    assert {"virtio_pci", "virtio_blk", "virtio_net"} <= {m.split()[0]
                                                          for m in modules.splitlines()}


@pytest.mark.tcg
def test_firmware_trace_of_the_linux_boot_passes(callback_guest: LinuxRun,
                                                 ebs_firmware: edk2.Firmware) -> None:
    report, _ = trace.analyze_log(callback_guest.debug_log, ebs_firmware.path)
    assert report.violations == (), [v.as_json() for v in report.violations]
    succeeded = [a for a in report.timeline.attempts if a.succeeded]
    # the kernel's EFI stub called ExitBootServices; exactly one succeeded
    assert len(succeeded) == 1
    teardown, = succeeded[0].teardowns
    assert succeeded[0].dispatches, "no EBS notification was traced"
    # The firmware had really driven the devices: its virtio drivers mapped
    # through the IOMMU, and mappings (the disks' rings) were still live when
    # the teardown began; it unmapped every one.
    maps = [e for e in report.timeline.trace.events if isinstance(e, trace.IommuMap)]
    assert len(maps) > 10
    assert teardown.begin.live > 0
    assert teardown.end is not None and teardown.end.live == 0
    assert len(teardown.unmaps) == teardown.begin.live


@pytest.mark.tcg
def test_commands_and_sftp(callback_guest: LinuxRun, tmp_path: Path) -> None:
    session = callback_guest.session
    with pytest.raises(GuestCommandError) as failed:
        session.run("echo out; echo err >&2; exit 3")
    assert (failed.value.status, failed.value.stdout, failed.value.stderr) == (3, "out\n", "err\n")
    assert session.run("exit 4", check=False) == (4, "", "")
    with pytest.raises(GuestCommandError, match="timed out|-1"):
        session.run("sleep 10", timeout=1)
    payload = os.urandom(100_000)
    (tmp_path / "up.bin").write_bytes(payload)
    session.put(tmp_path / "up.bin", "/tmp/up.bin")
    _, out, _ = session.run("sha256sum /tmp/up.bin")
    assert out.split()[0] == hashlib.sha256(payload).hexdigest()
    assert session.get("/tmp/up.bin", tmp_path / "down.bin").read_bytes() == payload


@pytest.mark.tcg
def test_no_child_of_the_connection_ends_while_a_command_starts(
        callback_guest: LinuxRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The guest's dropbear (2022.83) closes a channel that waits for its
    exec when another child of its connection exits. The session never
    leaves one: a timed-out command takes its connection with it, and an
    SFTP transfer returns once its server has exited."""
    session = callback_guest.session
    ended = []
    close = paramiko.SFTPClient.close

    def closing(sftp: paramiko.SFTPClient) -> None:
        channel = sftp.get_channel()
        ended.append(channel is not None and channel.exit_status_ready())
        close(sftp)

    monkeypatch.setattr(paramiko.SFTPClient, "close", closing)
    # The controls, raw, on one connection: a command left running ends
    # while the next channel waits for its exec, and that channel is gone;
    # a plain SFTP session is closed with its server running.
    transport = session.client.get_transport()
    assert transport is not None
    first = transport.open_session()
    first.exec_command("sleep 2")
    first.close()
    second = transport.open_session()
    time.sleep(4)
    with pytest.raises(paramiko.SSHException):
        second.exec_command("true")
    with session.client.open_sftp() as sftp:
        sftp.stat("/tmp")
    assert ended == [False]
    # that connection, whose SFTP server may still be ending, is left
    session.close()
    session.connect(deadline=time.monotonic() + 60)

    # The session, with the same pause between each open and its exec.
    exec_command = paramiko.Channel.exec_command

    def late(channel: paramiko.Channel, command: str) -> None:
        time.sleep(3)
        exec_command(channel, command)

    caplog.set_level(logging.INFO, logger="harness.vm.ssh")
    with pytest.raises(GuestCommandError, match="timed out after 0.5 s"):
        session.run("sleep 1", timeout=0.5)
    monkeypatch.setattr(paramiko.Channel, "exec_command", late)
    assert session.run("echo after the timeout")[1] == "after the timeout\n"
    assert "'sleep 1' timed out and may still run; connecting again" in caplog.text

    (tmp_path / "small.bin").write_bytes(b"x" * 1000)
    session.put(tmp_path / "small.bin", "/tmp/small.bin")
    assert session.run("cat /tmp/small.bin")[1] == "x" * 1000
    session.get("/tmp/small.bin", tmp_path / "back.bin")
    assert session.run("rm /tmp/small.bin", check=False)[0] == 0
    assert ended == [False, True, True]


@pytest.mark.tcg
def test_a_dropped_connection_is_made_again(callback_guest: LinuxRun,
                                            caplog: pytest.LogCaptureFixture) -> None:
    session = callback_guest.session
    # The shell's parent is dropbear's process for this connection: the
    # command ends the connection it runs over, and says so at once. The
    # pause lets dropbear answer the exec request first (else the exec
    # itself fails, as it did once in CI).
    with pytest.raises(GuestCommandError, match="connection was lost while it ran") as lost:
        session.run("echo started; sleep 1; kill -9 $PPID; sleep 30", timeout=20)
    assert lost.value.stdout == "started\n"
    assert session.run("echo back")[1] == "back\n"
    assert "the connection was lost" in caplog.text
    assert "connecting again for 'echo back'" in caplog.text
    # dropbear's log on the serial console has both sessions
    serial = callback_guest.vm.serial_log.read_text(errors="replace")
    assert serial.count("Pubkey auth succeeded for 'root'") >= 2


@pytest.mark.tcg
def test_guest_without_sshd_fails_at_the_deadline(
        ebs_firmware: edk2.Firmware, ebs_linux_image: LinuxImage, ebs_host_caps: host.HostCaps,
        ebs_accel: str, ebs_artifacts: Path) -> None:
    deadline = 20.0
    boot = LinuxBoot(accel=ebs_accel, start_sshd=False, ssh_timeout=deadline)
    with (pytest.raises(ConsoleTimeout) as timeout,
          linux.boot_linux(ebs_firmware, ebs_linux_image, boot, ebs_artifacts, caps=ebs_host_caps)):
        pytest.fail("SSH answered a guest that never started sshd")
    assert timeout.value.console == "ssh"
    # the serial log tail shows why: init skipped dropbear
    assert "EBSG sshd-skipped" in timeout.value.tails["serial.log"]
    assert "--- last lines of serial.log" in str(timeout.value)
    assert not _qemu_pids_with(str(ebs_artifacts))


@pytest.mark.parametrize("mode", [pytest.param("sev", marks=pytest.mark.sev),
                                  pytest.param("sev-es", marks=pytest.mark.sev_es)])
def test_guest_reports_memory_encryption(ebs_firmware: edk2.Firmware, ebs_linux_image: LinuxImage,
                                         ebs_host_caps: host.HostCaps, ebs_artifacts: Path,
                                         mode: str) -> None:
    boot = LinuxBoot(ebs_mode="callback", sev=mode)
    with linux.boot_linux(ebs_firmware, ebs_linux_image, boot, ebs_artifacts,
                          caps=ebs_host_caps) as run:
        _, dmesg, _ = run.session.run("dmesg")
        _, canary, _ = run.session.run(f"dd if=/dev/vdb bs={len(run.canary)} count=1")
    assert linux.SEV_ACTIVE[mode] in dmesg
    assert canary.encode() == run.canary
    assert linux.dmesg_problems(dmesg) == []
    report, _ = trace.analyze_log(run.debug_log, ebs_firmware.path)
    assert report.violations == ()


@pytest.mark.parametrize("sev", [
    pytest.param("emulated", marks=pytest.mark.sev_emulated, id="emulated-sev"),
    pytest.param("emulated-es", marks=pytest.mark.sev_es_emulated, id="emulated-sev-es"),
    pytest.param("emulated-snp", marks=pytest.mark.snp_emulated, id="emulated-snp"),
])
def test_guest_under_emulated_sev(ebs_firmware: edk2.Firmware, ebs_linux_image: LinuxImage,
                                  pytestconfig: pytest.Config, ebs_artifacts: Path,
                                  record_property: Callable[[str, object], None],
                                  sev: str) -> None:
    """Linux takes its SEV path on the harness's QEMU: it reports AMD SEV
    (and SEV-ES: its own #VC handler and GHCB from then on; and SEV-SNP: the
    CPUID page, its pages validated, the SNP guest device), does all DMA
    through its bounce buffers (SWIOTLB with memory encryption), and the
    disk and the network still work; the firmware's trace of the boot, EBS
    contract included, passes."""
    caps = session_emulated_caps(pytestconfig)
    boot = LinuxBoot(ebs_mode="callback", sev=sev)
    with linux.boot_linux(ebs_firmware, ebs_linux_image, boot, ebs_artifacts,
                          caps=caps) as run:
        record_property("ssh_ready_seconds", round(run.ready_seconds, 1))
        _, dmesg, _ = run.session.run("dmesg")
        _, canary, _ = run.session.run(f"dd if=/dev/vdb bs={len(run.canary)} count=1 "
                                       "2>/dev/null")
        expected = hashlib.sha256(run.canary_image.read_bytes()).hexdigest()
        _, whole, _ = run.session.run("sha256sum /dev/vdb")
        _, ping, _ = run.session.run(f"ping -c 2 -W 5 {linux.GATEWAY}", timeout=30)
    assert linux.SEV_ACTIVE[sev] in dmesg
    if sev == "emulated":       # the line SEV-ES extends: plain SEV stops before it
        assert linux.SEV_ACTIVE["emulated-es"] not in dmesg
    if sev == "emulated-snp":
        assert "SEV: Using SNP CPUID table" in dmesg
        assert "SEV: SNP guest platform device initialized." in dmesg
    else:                       # the control: SEV and SEV-ES have no SNP line
        assert linux.SEV_ACTIVE["emulated-snp"] not in dmesg
    assert "Memory encryption is active and system is using DMA bounce buffers" in dmesg
    assert canary.encode() == run.canary and whole.split()[0] == expected
    assert " 0% packet loss" in ping
    assert linux.dmesg_problems(dmesg) == []
    report, _ = trace.analyze_log(run.debug_log, ebs_firmware.path)
    assert report.contract_judged and report.violations == (), \
        [v.as_json() for v in report.violations]
    assert report.timeline.trace.sev_mask == 1 << 47


@pytest.mark.tcg
def test_device_side_of_the_linux_boot(callback_guest: LinuxRun, ebs_firmware: edk2.Firmware,
                                      tmp_path: Path) -> None:
    """QEMU's device trace of the Linux boot: both disks were reset before
    the teardown, no device did DMA from then until the kernel first touched
    it (its PCI config writes), and the kernel then drove each. 2025.02's
    firmware never started the NIC (VirtioNetDxe only probed it); 2022.11's
    BDS connects the network stack to it (its boot options get a PXEv4
    entry), which starts it, and its ExitBootServices() handler resets it."""
    raw = callback_guest.vm.device_trace_raw.read_bytes()
    kept = tmp_path / "device-trace.log"
    # QEMU is still running: keep the lines it has finished
    kept.write_bytes(devicetrace.header("7.2").encode() + raw[:raw.rfind(b"\n") + 1])
    log, _ = trace.analyze_log(callback_guest.debug_log)
    report = devices.analyze_device_trace(kept, log.timeline.trace.events)
    assert report.judged and report.violations == (), [v.detail for v in report.violations]
    virtio = [d for d in devices.driven(report) if d.qom.startswith("virtio-")]
    assert sorted(d.qom for d in virtio) == ["virtio-blk-pci", "virtio-blk-pci",
                                             "virtio-net-pci"]
    assert report.begin_line is not None
    nic = "never armed" if ebs_firmware.baseline == "2025.02" else "virtio reset"
    for device in virtio:
        expected = nic if device.qom == "virtio-net-pci" else "virtio reset"
        assert device.quiesce_text is not None and expected in device.quiesce_text
        assert device.touched_after is not None and device.touched_after > report.begin_line
    # the kernel read its disks and answered on the network through them
    assert all(d.dma_os > 0 for d in virtio), [(d.bdf, d.dma_os) for d in virtio]
