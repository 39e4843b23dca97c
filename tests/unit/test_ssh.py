"""SSH client pieces: keys, host key parsing, the connect deadline, remote URLs."""

from __future__ import annotations

import socket
import stat
import time
from pathlib import Path

import paramiko
import pytest

from harness.errors import ConsoleTimeout, GuestCommandError, LaunchError, UsageError
from harness.vm import remote, ssh


def test_client_key_round_trips_through_openssh_files(tmp_path: Path) -> None:
    key = ssh.ClientKey.generate()
    assert key.public_line.startswith("ssh-ed25519 AAAA")
    path = key.write(tmp_path / "id_ed25519")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = paramiko.Ed25519Key.from_private_key_file(str(path))
    assert loaded.get_base64() == key.public_base64
    assert (tmp_path / "id_ed25519.pub").read_text().strip() == key.public_line
    assert ssh.ClientKey.generate().public_base64 != key.public_base64


def test_parse_public_key() -> None:
    key = ssh.ClientKey.generate()
    parsed = ssh.parse_public_key(key.public_line + " comment")
    assert parsed.get_name() == "ssh-ed25519"
    assert parsed.get_base64() == key.public_base64
    for bad in ("", "ssh-ed25519", "ssh-ed25519 !!!notbase64", "ssh-rsa " + key.public_base64):
        with pytest.raises(UsageError):
            ssh.parse_public_key(bad)
    # A DSA key (gone from paramiko 4): one line naming the type, not a traceback.
    dss = "ssh-dss AAAAB3NzaC1kc3MAAACBAP8A host"
    with pytest.raises(UsageError, match="public key type ssh-dss is not supported"):
        ssh.parse_public_key(dss)


def test_free_port_is_bindable() -> None:
    port = ssh.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def _session(port: int, *, reconnect: bool = False) -> ssh.GuestSsh:
    return ssh.GuestSsh("127.0.0.1", port, host_key=ssh.ClientKey.generate().public_line,
                        client_key=ssh.ClientKey.generate(), reconnect=reconnect)


def test_connect_deadline_quotes_the_tails() -> None:
    session = _session(ssh.free_port())   # nothing listens there
    started = time.monotonic()
    with pytest.raises(ConsoleTimeout) as timeout:
        session.connect(deadline=started + 2.0, tails=lambda: {"serial.log": "EBSG sshd-skipped"},
                        command=["qemu-system-x86_64", "-kernel", "vmlinuz"])
    assert timeout.value.console == "ssh"
    assert session.attempts >= 2
    assert "ConnectionRefusedError" in str(timeout.value) or "Errno" in str(timeout.value)
    assert "EBSG sshd-skipped" in str(timeout.value)
    assert "qemu-system-x86_64 -kernel vmlinuz" in str(timeout.value)


def test_connect_stops_when_the_guest_is_gone() -> None:
    session = _session(ssh.free_port())
    started = time.monotonic()
    # not the 30 s deadline (a ConsoleTimeout): the dead guest ends the wait
    with pytest.raises(LaunchError, match="ended before sshd"):
        session.connect(deadline=started + 30, alive=lambda: False,
                        tails=lambda: {"serial.log": "Kernel panic"})


def test_run_needs_a_connection() -> None:
    with pytest.raises(GuestCommandError, match="not connected"):
        _session(22).run("true")


def test_a_lost_connection_not_made_again_says_both(caplog: pytest.LogCaptureFixture) -> None:
    """The negative control of the reconnection (tests/e2e/test_linux.py
    has it working): the guest's sshd is gone too."""
    session = _session(ssh.free_port(), reconnect=True)     # nothing listens there any more
    session._client = paramiko.SSHClient()  # a session whose transport is gone
    started = time.monotonic()
    with pytest.raises(GuestCommandError) as failed:
        session.run("true", timeout=3)
    assert time.monotonic() - started < 3
    assert failed.value.status == -1
    assert failed.value.stderr.endswith(
        "the connection was lost (closed by the guest) and connecting again failed: "
        f"NoValidConnectionsError: [Errno None] Unable to connect to port {session.port} on "
        "127.0.0.1")
    assert "connecting again for 'true'" in caplog.text


def test_without_reconnect_a_lost_connection_is_an_error_at_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """A QEMU host's session (harness.vm.remote): its working directory and
    QEMU end with the connection, so it is not made again."""
    session = _session(ssh.free_port())
    session._client = paramiko.SSHClient()
    with pytest.raises(GuestCommandError, match="the connection was lost "
                                                r"\(closed by the other end\)$"):
        session.run("true", timeout=3)
    assert "connecting again" not in caplog.text


class _Transport:
    """A live connection; ``drops``: it dies as a command is started on it
    (the guest ran it and dropped the connection), else the exec alone is
    refused."""

    def __init__(self, drops: bool) -> None:
        self.active = True
        self.drops = drops

    def is_active(self) -> bool:
        return self.active

    def open_session(self, timeout: float) -> _Channel:
        return _Channel(self)


class _Channel:
    def __init__(self, transport: _Transport) -> None:
        self.transport = transport

    def exec_command(self, command: str) -> None:
        self.transport.active = not self.transport.drops
        raise paramiko.SSHException("Channel closed.")

    def close(self) -> None:
        pass


class _Client:
    def __init__(self, transport: _Transport) -> None:
        self.transport = transport

    def get_transport(self) -> _Transport:
        return self.transport


@pytest.mark.parametrize("drops", [True, False], ids=["lost", "control-alive"])
def test_an_exec_on_a_connection_that_dies_says_it_may_have_run(drops: bool) -> None:
    session = _session(ssh.free_port(), reconnect=True)
    session._client = _Client(_Transport(drops))   # type: ignore[assignment]
    with pytest.raises(GuestCommandError) as failed:
        session.run("reboot", timeout=3)
    assert failed.value.status == -1
    assert "connecting again" not in failed.value.stderr    # never retried
    lost = "(the connection was lost as it started: it may have run)"
    assert (lost in failed.value.stderr) is drops


@pytest.mark.parametrize(("url", "host", "user", "port"), [
    ("ssh://root@sevhost", "sevhost", "root", 22),
    ("ssh://dev@10.1.2.3:2222", "10.1.2.3", "dev", 2222),
    ("ssh://dev@sevhost/", "sevhost", "dev", 22),
])
def test_remote_host_parse(url: str, host: str, user: str, port: int) -> None:
    where = remote.RemoteHost.parse(url)
    assert (where.host, where.user, where.port) == (host, user, port)
    assert where.url == f"ssh://{user}@{host}:{port}"


@pytest.mark.parametrize("url", ["sevhost", "http://sevhost", "ssh://", "ssh://h:99999",
                                 "ssh://h/some/path"])
def test_remote_host_parse_rejects(url: str) -> None:
    with pytest.raises(UsageError):
        remote.RemoteHost.parse(url)
