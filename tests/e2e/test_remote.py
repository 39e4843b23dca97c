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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import cli, linux
from harness.analysis import trace
from harness.build import edk2
from harness.errors import UsageError
from harness.scenario import RunResult, Scenario, run_scenario
from harness.vm import host, remote
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


def test_remote_caps_agree_with_the_local_probe(session: GuestSsh,
                                                ebs_host_caps: host.HostCaps) -> None:
    caps = remote.remote_caps(session)
    assert caps.qemu_version == ebs_host_caps.qemu_version
    assert caps.tcg.available
    assert caps.sev.available == ebs_host_caps.sev.available


def test_remote_qemu_dies_with_the_session(ebs_firmware: edk2.Firmware,
                                           where: remote.RemoteHost, client_key: ClientKey,
                                           session: GuestSsh, ebs_artifacts: Path) -> None:
    from harness.vm.machine import MachineConfig

    doomed = where.connect(client_key=client_key)
    config = MachineConfig(code=ebs_firmware.code, vars_template=ebs_firmware.vars,
                           accel="tcg")
    vm = remote.RemoteMachine(doomed, config, ebs_artifacts, name="doomed")
    vm.launch(start=False)
    assert vm.remote_dir is not None
    assert remote.remote_qemu_processes(session, vm.remote_dir), "the remote QEMU is not running"
    # the harness vanishes without a word: its SSH connection drops
    doomed.client.get_transport().close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = remote.remote_qemu_processes(session, vm.remote_dir)
        if not left:
            break
        time.sleep(0.2)
    assert not left, "the remote QEMU outlived its SSH session"
    vm.shutdown()   # with the session gone: closes what is left, raises nothing
    session.run(f"rm -rf {vm.remote_dir}")


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
        assert isinstance(run.vm, remote.RemoteMachine)
        canary_length = len(run.canary)
        _, out, _ = run.session.run(f"dd if=/dev/vdb bs={canary_length} count=1 2>/dev/null")
        _, dmesg, _ = run.session.run("dmesg")
    assert out.encode() == run.canary
    assert linux.dmesg_problems(dmesg) == []
    report, _ = trace.analyze_log(run.debug_log, ebs_firmware.path)
    assert report.violations == ()
    assert sum(a.succeeded for a in report.timeline.attempts) == 1
