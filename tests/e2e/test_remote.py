"""QEMU on a remote host over SSH, against a real OpenSSH server on 127.0.0.1.

The suite starts Debian's ``/usr/sbin/sshd`` itself (its own config, host key,
port and authorized key, as root) and runs the same probe scenarios through
it and locally: the verdicts must be the same, failing ones included. The
remote QEMU must die with the SSH session.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import cli, linux
from harness.analysis import trace
from harness.build import edk2
from harness.errors import ConsoleTimeout, EnvironmentFailure, UsageError
from harness.scenario import RunResult, Scenario, run_scenario
from harness.vm import host, remote
from harness.vm.runner import LocalRunner
from harness.vm.ssh import ClientKey, GuestSsh

pytestmark = [
    pytest.mark.tcg,
    pytest.mark.skipif(os.geteuid() != 0, reason="sshd with privilege separation needs root"),
    pytest.mark.skipif(not remote.LocalSshd.SSHD.is_file(),
                       reason="needs /usr/sbin/sshd (Debian's openssh-server, scripts/setup-host)"),
]


@pytest.fixture(scope="module")
def client_key() -> ClientKey:
    return ClientKey.generate()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory,
         client_key: ClientKey) -> Iterator[remote.LocalSshd]:
    with remote.LocalSshd(tmp_path_factory.mktemp("sshd"), client_key.public_line) as server:
        yield server


@pytest.fixture(scope="module")
def where(sshd: remote.LocalSshd) -> remote.RemoteHost:
    return remote.RemoteHost.parse(f"ssh://root@127.0.0.1:{sshd.port}",
                                   known_hosts=sshd.known_hosts)


@pytest.fixture
def session(where: remote.RemoteHost, client_key: ClientKey) -> Iterator[GuestSsh]:
    connected = where.connect(client_key=client_key)
    yield connected
    connected.close()


def _verdicts(result: RunResult) -> dict[str, object]:
    data = result.as_json()
    return {"verdict": data["verdict"], "violations": sorted(v["check"] for v in
                                                             data["violations"]),
            "live_mappings": data.get("live_mappings"), "canary_hits": data.get("canary_hits"),
            "accel": data["accel"]}


@pytest.mark.parametrize("chosen", [
    Scenario(ebs_mode="callback", requeue_depth=2, dump=True, accel="tcg"),
    # the negative control: the 2017 scheme against a driver that re-signals twice
    Scenario(ebs_mode="legacy", requeue_depth=2, dump=True, accel="tcg"),
], ids=["callback-d2", "legacy-d2"])
def test_remote_run_has_the_local_verdicts(ebs_firmware: edk2.Firmware, ebs_host_caps: host.HostCaps,
                                           where: remote.RemoteHost, session: GuestSsh,
                                           ebs_artifacts: Path, chosen: Scenario) -> None:
    local = run_scenario(ebs_firmware, chosen, ebs_artifacts / "local", caps=ebs_host_caps)
    caps = remote.remote_caps(session)
    far = run_scenario(ebs_firmware, chosen, ebs_artifacts / "remote", caps=caps,
                       launcher=where.launcher(session))
    assert _verdicts(far) == _verdicts(local)
    if chosen.ebs_mode == "callback":
        assert far.passed
    else:
        assert {"V1", "V3"} <= far.failed_checks()
    # the logs and the dump came back, and the remote host kept nothing
    assert (ebs_artifacts / "remote" / "vm" / "debugcon.log").stat().st_size > 10_000
    assert (ebs_artifacts / "remote" / "memory.elf").is_file()
    assert "ebs-harness" in (ebs_artifacts / "remote" / "vm" / "cmdline.txt").read_text()
    cmdline = (ebs_artifacts / "remote" / "vm" / "cmdline.txt").read_text()
    remote_dir = re.search(r"/tmp/ebs-harness\.\w+", cmdline)
    assert remote_dir is not None
    assert remote.remote_qemu_processes(session, remote_dir.group()) == []
    assert session.run(f"test -e {remote_dir.group()}", check=False)[0] == 1


def test_remote_caps_are_those_of_the_remote_qemu(session: GuestSsh, tmp_path: Path) -> None:
    """The remote probe asks the remote host's binary, not this process's
    probe: a stand-in QEMU there that says 9.9.9 is what it reports, and a
    binary that is not there is an environment error naming it."""
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 9.9.9 (stand-in)'\n")
    fake.chmod(0o755)
    caps = remote.remote_caps(session, str(fake))
    assert caps.qemu == str(fake) and caps.qemu_version == "9.9.9"
    assert caps.tcg.available and "QEMU 9.9.9 runs there" in caps.tcg.reason
    with pytest.raises(EnvironmentFailure, match="no-such-qemu --version"):
        remote.remote_caps(session, str(tmp_path / "no-such-qemu"))


def test_the_capabilities_query_is_one_code_here_and_there(ebs_host_caps: host.HostCaps,
                                                          session: GuestSsh) -> None:
    """``query-sev-capabilities`` of a bare QEMU, started by the local runner
    and by the SSH runner, speaks the same QMP client and gets the same
    answer (Debian's QEMU under TCG refuses it: the same refusal), and the
    remote run leaves no directory behind."""
    here = host.query_sev_capabilities(LocalRunner(), ebs_host_caps.qemu, "tcg")
    runner = remote.SshRunner(session)
    there = host.query_sev_capabilities(runner, ebs_host_caps.qemu, "tcg")
    assert isinstance(here, str) and "KVM" in here, here
    assert there == here
    assert runner.directory is not None and not runner.directory.exists()
    # the control: a QEMU that is not there is a different answer
    missing = host.query_sev_capabilities(remote.SshRunner(session), "/nonexistent/qemu", "tcg")
    assert missing != here and "did not start" in str(missing)


def test_remote_qemu_dies_with_the_session(ebs_firmware: edk2.Firmware,
                                           where: remote.RemoteHost, client_key: ClientKey,
                                           session: GuestSsh, ebs_artifacts: Path) -> None:
    from harness.vm.machine import MachineConfig, QemuMachine

    doomed = where.connect(client_key=client_key)
    config = MachineConfig(code=ebs_firmware.code, vars_template=ebs_firmware.vars,
                           accel="tcg")
    runner = remote.SshRunner(doomed)
    vm = QemuMachine(config, ebs_artifacts, name="doomed", runner=runner)
    vm.launch(start=False)
    assert runner.directory is not None
    remote_dir = str(runner.directory)
    assert remote.remote_qemu_processes(session, remote_dir), "the remote QEMU is not running"
    # the harness vanishes without a word: its SSH connection drops
    doomed.client.get_transport().close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = remote.remote_qemu_processes(session, remote_dir)
        if not left:
            break
        time.sleep(0.2)
    assert not left, "the remote QEMU outlived its SSH session"
    # ... and the directory with the firmware, disks and canary went with it
    assert _gone(Path(remote_dir), 15), f"{remote_dir} outlived its SSH session"
    vm.shutdown()   # with the session gone: closes what is left, raises nothing


def _gone(path: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not path.exists()


def test_a_killed_remote_boot_leaves_nothing_on_the_host(
        ebs_firmware: edk2.Firmware, sshd: remote.LocalSshd, client_key: ClientKey,
        session: GuestSsh, tmp_path: Path) -> None:
    """SIGKILL of ``ebs-harness boot --host`` mid-boot: the remote QEMU and
    the remote directory (firmware, disk image, canary) are gone, as they
    are after a normal run."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(sshd.known_hosts.read_text())
    client_key.write(home / ".ssh" / "id_ed25519")
    before = set(Path("/tmp").glob("ebs-harness.*"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "-q", "boot", "--host",
         f"ssh://root@127.0.0.1:{sshd.port}", "--firmware", str(ebs_firmware.path),
         "--accel", "tcg", "--timeout", "300", "--artifacts", str(tmp_path / "run")],
        env={**os.environ, "HOME": str(home)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (made := set(Path("/tmp").glob("ebs-harness.*")) - before) \
                or not remote.remote_qemu_processes(session, str(next(iter(made)))):
            assert proc.poll() is None and time.monotonic() < deadline, "no remote QEMU"
            time.sleep(0.1)
        proc.kill()
        proc.wait(10)
    finally:
        proc.kill()
    directory = next(iter(made))
    assert _gone(directory, 15), f"{directory} outlived the killed harness"
    deadline = time.monotonic() + 15
    while (left := remote.remote_qemu_processes(session, str(directory))) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "the remote QEMU (or its wrapper) outlived the killed harness"


def test_a_stream_that_breaks_is_reported_as_such(ebs_firmware: edk2.Firmware,
                                                   where: remote.RemoteHost,
                                                   client_key: ClientKey, session: GuestSsh,
                                                   ebs_artifacts: Path) -> None:
    """The remote tail carrying the debug log dies while QEMU runs on: the
    wait ends at once naming the broken stream, not as a timeout."""
    from harness.vm.machine import MachineConfig, QemuMachine

    config = MachineConfig(code=ebs_firmware.code, vars_template=ebs_firmware.vars,
                           accel="tcg")
    ours = where.connect(client_key=client_key)
    try:
        runner = remote.SshRunner(ours)
        with QemuMachine(config, ebs_artifacts, name="torn", runner=runner) as vm:
            assert runner.directory is not None
            session.run("for p in $(pgrep -f 'tail -c [+]1 -F --pid=.* debugcon.log'); do "
                        f"[ \"$(readlink /proc/$p/cwd)\" = {runner.directory} ] && kill $p; done",
                        check=False)
            with pytest.raises(ConsoleTimeout) as info:
                vm.debugcon.expect("never printed", timeout=600)
            assert vm.is_running()
    finally:
        ours.close()
    first = str(info.value).splitlines()[0]
    assert "(the console ended: the remote log stream of debugcon.log" in first, first


def test_unknown_host_key_is_refused(sshd: remote.LocalSshd, client_key: ClientKey,
                                     tmp_path: Path) -> None:
    (tmp_path / "known_hosts").write_text("")
    stranger = remote.RemoteHost.parse(f"ssh://root@127.0.0.1:{sshd.port}",
                                       known_hosts=tmp_path / "known_hosts")
    with pytest.raises(UsageError, match="not known"):
        stranger.connect(client_key=client_key, timeout=10)
    other = ClientKey.generate()
    pinned_wrong = remote.RemoteHost.parse(f"ssh://root@127.0.0.1:{sshd.port}",
                                           host_key=other.public_line)
    with pytest.raises(UsageError, match="host key mismatch"):
        pinned_wrong.connect(client_key=client_key, timeout=10)


def test_cli_boot_host(ebs_firmware: edk2.Firmware, sshd: remote.LocalSshd,
                       client_key: ClientKey, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A developer's defaults: ~/.ssh/known_hosts and ~/.ssh/id_ed25519.
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(sshd.known_hosts.read_text())
    client_key.write(home / ".ssh" / "id_ed25519")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    status = cli.main(["boot", "--host", f"ssh://root@127.0.0.1:{sshd.port}",
                       "--firmware", str(ebs_firmware.path), "--accel", "tcg",
                       "--requeue-depth", "2", "--artifacts", str(tmp_path / "run"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert status == 0 and result["verdict"] == "pass", result
    status = cli.main(["boot", "--host", "ftp://nowhere", "--firmware",
                       str(ebs_firmware.path)])
    assert status == 2


def test_remote_linux_guest(ebs_firmware: edk2.Firmware, ebs_linux_image: linux.LinuxImage,
                            where: remote.RemoteHost, session: GuestSsh,
                            ebs_artifacts: Path) -> None:
    # QEMU there, the guest's sshd reached through the session (direct-tcpip
    # to the remote host's hostfwd port), verdicts here.
    boot = linux.LinuxBoot(accel="tcg")
    with linux.boot_linux(ebs_firmware, ebs_linux_image, boot, ebs_artifacts,
                          remote_host=(where, session)) as run:
        assert isinstance(run.vm.runner, remote.SshRunner)
        canary_length = len(run.canary)
        _, out, _ = run.session.run(f"dd if=/dev/vdb bs={canary_length} count=1 2>/dev/null")
        _, dmesg, _ = run.session.run("dmesg")
    assert out.encode() == run.canary
    assert linux.dmesg_problems(dmesg) == []
    report, _ = trace.analyze_log(run.debug_log, ebs_firmware.path)
    assert report.violations == ()
    assert sum(a.succeeded for a in report.timeline.attempts) == 1
