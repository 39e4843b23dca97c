"""SSH sessions to a guest (paramiko): commands, SFTP, a pinned host key.

The session takes an address, not a QEMU process: the Linux guest's sshd is
reached through QEMU's user-mode ``hostfwd`` on 127.0.0.1 (see
:mod:`harness.linux`), but nothing here knows that. The client key is made
per run (:class:`ClientKey`); the server's host key is known in advance
and pinned: an unknown or different host key is refused
(:class:`paramiko.RejectPolicy`), never added blindly. A session made with
``reconnect`` (the Linux guest's) makes a connection the guest dropped
again, once, before the next command, with a warning naming what ended
it; a command whose connection ends while it runs fails at once.

No child of a connection is left to end while another command starts on
it. The guest's dropbear (Debian 12's 2022.83; fixed upstream in 2024.86,
its bug #321) closes a session channel that is between its open and its
exec when another child of the same connection exits, and may end the
whole connection on a failed assertion (``common-channel.c:705``). So an
SFTP transfer returns once its server has exited, and with ``reconnect``
a command that timed out, still running, takes its connection with it:
the next command connects again.

::

    session = GuestSsh("127.0.0.1", port, host_key="ssh-ed25519 AAAA...",
                       client_key=ClientKey.generate())
    session.connect(deadline=time.monotonic() + 90, alive=vm.is_running, tails=vm.tails)
    rc, out, err = session.run("dmesg", timeout=30)
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.errors import (
    ConsoleTimeout,
    EnvironmentFailure,
    GuestCommandError,
    LaunchError,
    UsageError,
)

LOG = logging.getLogger(__name__)

#: How long one connection attempt may take before the next one.
ATTEMPT_TIMEOUT = 10.0
RETRY_PAUSE = 1.0


class _Silence(logging.Filter):
    """Drops paramiko's transport tracebacks of attempts that will be retried."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ClientKey:
    """An Ed25519 key pair made for one run."""

    private_openssh: bytes

    @classmethod
    def generate(cls) -> ClientKey:
        key = Ed25519PrivateKey.generate()
        return cls(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption()))

    @property
    def pkey(self) -> paramiko.PKey:
        return paramiko.Ed25519Key.from_private_key(io.StringIO(self.private_openssh.decode()))

    @property
    def key_type(self) -> str:
        return "ssh-ed25519"

    @property
    def public_base64(self) -> str:
        return str(self.pkey.get_base64())

    @property
    def public_line(self) -> str:
        """The ``authorized_keys`` line."""
        return f"{self.key_type} {self.public_base64}"

    def write(self, path: Path) -> Path:
        """The private key as an OpenSSH file (0600), for ``ssh -i`` by hand."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_bytes(self.private_openssh)
        path.with_name(path.name + ".pub").write_text(self.public_line + "\n")
        return path


def parse_public_key(line: str) -> paramiko.PKey:
    """A ``TYPE BASE64 [comment]`` public key line as a paramiko key."""
    parts = line.split()
    if len(parts) < 2:
        raise UsageError(f"not a public key line: {line!r}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
        key = paramiko.PKey.from_type_string(parts[0], blob)
    except paramiko.pkey.UnknownKeyType as exc:
        raise UsageError(f"public key type {parts[0][:40]} is not supported (paramiko "
                         f"{paramiko.__version__} reads ssh-ed25519, ecdsa-sha2-* and "
                         "ssh-rsa)") from exc
    except (ValueError, paramiko.SSHException) as exc:
        raise UsageError(f"not a public key line: {line[:40]!r}...: {exc}") from exc
    if key.get_name() != parts[0]:
        raise UsageError(f"public key type {parts[0]} does not match its blob")
    return key


class _UnknownHostKey(paramiko.SSHException):  # type: ignore[misc]
    """The server's host key is not the pinned one nor in known_hosts."""


class _Reject(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        raise _UnknownHostKey(f"{hostname}: host key {key.get_name()} "
                              f"{key.get_base64()[:24]}... is not known")


class GuestSsh:
    """One SSH connection to a guest (or a remote host), host key checked.

    :param host: the address to connect to.
    :param port: its port.
    :param host_key: the server's public key line (``ssh-ed25519 AAAA...``),
        pinned; or None to check ``known_hosts``.
    :param known_hosts: an OpenSSH known_hosts file (default
        ``~/.ssh/known_hosts``), used when no ``host_key`` is pinned.
    :param client_key: our key (the server must have its public half); or
        None for ``key_filename``, the SSH agent and ``~/.ssh/id_*``.
    :param key_filename: a private key file.
    :param user: the login.
    :param channel: opens the transport's byte stream for each attempt
        instead of a TCP connection to ``host:port`` (e.g. a ``direct-tcpip``
        channel of another SSH session: a guest's hostfwd on a remote host).
    """

    def __init__(self, host: str, port: int = 22, *, host_key: str | None = None,
                 known_hosts: Path | None = None, client_key: ClientKey | None = None,
                 key_filename: Path | None = None, user: str = "root",
                 channel: Callable[[], Any] | None = None, reconnect: bool = False) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.client_key = client_key
        self.key_filename = key_filename
        self.host_key = None if host_key is None else parse_public_key(host_key)
        self.known_hosts = known_hosts
        self.channel = channel
        self.reconnect = reconnect
        self._client: paramiko.SSHClient | None = None
        #: a command that timed out, still running on the connection
        self._left_running: str | None = None
        self.attempts = 0
        self.last_error: str = ""

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def _host_entry(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def _try_connect(self, timeout: float) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        if self.host_key is not None:
            client.get_host_keys().add(self._host_entry(), self.host_key.get_name(),
                                       self.host_key)
        else:
            known = self.known_hosts or Path.home() / ".ssh" / "known_hosts"
            if known.is_file():
                client.get_host_keys().load(str(known))
        client.set_missing_host_key_policy(_Reject())
        own_key = self.client_key is not None or self.key_filename is not None
        try:
            sock = None if self.channel is None else self.channel()
            client.connect(self.host, self.port, username=self.user,
                           pkey=None if self.client_key is None else self.client_key.pkey,
                           key_filename=None if self.key_filename is None
                           else str(self.key_filename),
                           timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                           allow_agent=not own_key, look_for_keys=not own_key, sock=sock)
        except BaseException:
            client.close()
            raise
        return client

    def connect(self, deadline: float, *, alive: Callable[[], bool] | None = None,
                tails: Callable[[], dict[str, str]] | None = None,
                command: Sequence[str] = ()) -> None:
        """Retry until sshd answers and lets us in, or ``deadline`` (monotonic).

        A wrong host key fails at once (it will not get better).

        :param alive: False means the guest is gone: stop waiting.
        :param tails: the guest's log tails, quoted by a timeout.
        :param command: the guest's command line, quoted by a timeout.
        :raises ConsoleTimeout: no session by the deadline (``console`` "ssh").
        :raises LaunchError: ``alive`` said the guest is gone.
        """
        transport_log = logging.getLogger("paramiko.transport")
        silence = _Silence()
        transport_log.addFilter(silence)
        try:
            self._connect(deadline, alive, tails, command)
        finally:
            transport_log.removeFilter(silence)

    def _connect(self, deadline: float, alive: Callable[[], bool] | None,
                 tails: Callable[[], dict[str, str]] | None, command: Sequence[str]) -> None:
        start = time.monotonic()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConsoleTimeout(
                    "ssh", f"sshd at {self.address} (last error: {self.last_error or 'none'}, "
                    f"{self.attempts} attempts)", round(deadline - start, 1),
                    tails() if tails else {}, command)
            if alive is not None and not alive():
                raise LaunchError(f"the guest ended before sshd at {self.address} answered "
                                  f"(last error: {self.last_error})", None, command,
                                  "\n".join((tails() if tails else {}).values()))
            self.attempts += 1
            try:
                self._client = self._try_connect(min(ATTEMPT_TIMEOUT, max(1.0, remaining)))
                LOG.info("ssh %s: connected after %d attempts, %.1f s", self.address,
                         self.attempts, time.monotonic() - start)
                return
            except paramiko.BadHostKeyException as exc:
                raise UsageError(f"ssh {self.address}: host key mismatch: got "
                                 f"{exc.key.get_name()} {exc.key.get_base64()[:24]}..., "
                                 "expected the pinned or known_hosts key") from exc
            except _UnknownHostKey as exc:
                raise UsageError(f"ssh {self.address}: {exc} (pin it or add it to "
                                 "known_hosts)") from exc
            except paramiko.AuthenticationException as exc:
                raise EnvironmentFailure(f"ssh {self.address}: authentication failed: "
                                         f"{exc}") from exc
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                LOG.debug("ssh %s: attempt %d: %s", self.address, self.attempts,
                          self.last_error)
            time.sleep(min(RETRY_PAUSE, max(0.0, deadline - time.monotonic())))

    @property
    def client(self) -> paramiko.SSHClient:
        if self._client is None:
            raise GuestCommandError("(connect)", -1, "", f"ssh {self.address}: not connected")
        return self._client

    def _transport(self, what: str, timeout: float) -> paramiko.Transport:
        """The live transport for ``what``: a connection the guest dropped,
        or one a timed-out command may still run on (with ``reconnect``), is
        made again first, one attempt of at most ``timeout``.

        :raises GuestCommandError: not connected, or the new attempt failed.
        """
        transport = self.client.get_transport()
        if transport is not None and transport.is_active():
            if self._left_running is None:
                return transport
            why = f"{self._left_running!r} timed out and may still run"
            LOG.info("ssh %s: %s; connecting again for %r", self.address, why, what)
        else:
            cause = transport.get_exception() if transport is not None else None
            why = f"the connection was lost ({cause or 'closed by the guest'})"
            if not self.reconnect:
                raise GuestCommandError(what, -1, "", f"ssh {self.address}: the connection "
                                        f"was lost ({cause or 'closed by the other end'})")
            LOG.warning("ssh %s: %s; connecting again for %r", self.address, why, what)
        self._left_running = None
        self.client.close()
        self._client = None
        try:
            self._client = self._try_connect(min(ATTEMPT_TIMEOUT, max(1.0, timeout)))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise GuestCommandError(what, -1, "", f"ssh {self.address}: {why} and connecting "
                                    f"again failed: {type(exc).__name__}: {exc}") from exc
        transport = self._client.get_transport()
        assert transport is not None
        return transport

    def _started(self, command: str,
                 timeout: float) -> tuple[paramiko.Transport, paramiko.Channel]:
        """``command`` started on a new channel. A channel the dropped
        connection could not open is asked for once more (with
        ``reconnect``); a failed exec is not: the command may have started."""
        transport = self._transport(command, timeout)
        try:
            try:
                channel = transport.open_session(timeout=timeout)
            except (paramiko.SSHException, EOFError, OSError):
                if transport.is_active() or not self.reconnect:
                    raise
                transport = self._transport(command, timeout)
                channel = transport.open_session(timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise GuestCommandError(command, -1, "", f"ssh {self.address}: "
                                    f"{type(exc).__name__}: {exc}") from exc
        try:
            channel.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            channel.close()
            # The guest may have run it and lost the connection before its
            # answer to the exec request came back: not retried.
            lost = ("" if transport.is_active()
                    else " (the connection was lost as it started: it may have run)")
            raise GuestCommandError(command, -1, "", f"ssh {self.address}: "
                                    f"{type(exc).__name__}: {exc}{lost}") from exc
        return transport, channel

    def run(self, command: str, timeout: float = 60.0, *,
            check: bool = True) -> tuple[int, str, str]:
        """Run ``command`` in the guest's shell: ``(status, stdout, stderr)``.

        :raises GuestCommandError: it exited non-zero (with ``check``), or did
            not finish by ``timeout`` (status -1), with all it printed.
        """
        transport, channel = self._started(command, timeout)
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                while channel.recv_ready():
                    out += channel.recv(65536)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                if (channel.exit_status_ready() and channel.eof_received
                        and not channel.recv_ready() and not channel.recv_stderr_ready()):
                    break
                if time.monotonic() > deadline:
                    if self.reconnect:
                        self._left_running = command
                    raise GuestCommandError(
                        command, -1, out.decode(errors="replace"),
                        err.decode(errors="replace") + f"\n(timed out after {timeout:g} s)")
                if not transport.is_active():
                    if channel.exit_status_ready() and channel.eof_received:
                        continue    # it ended first: what it printed is read above
                    raise GuestCommandError(
                        command, -1, out.decode(errors="replace"),
                        err.decode(errors="replace") + "\n(the connection was lost while it "
                        "ran)")
                channel.status_event.wait(0.02)
            status = channel.recv_exit_status()
        finally:
            channel.close()
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        LOG.debug("ssh %s: %r -> %d", self.address, command, status)
        if check and status != 0:
            raise GuestCommandError(command, status, stdout, stderr)
        return status, stdout, stderr

    @contextlib.contextmanager
    def _sftp(self) -> Iterator[paramiko.SFTPClient]:
        """An SFTP session that ends with its server: its input is closed
        and its exit awaited (at most :data:`ATTEMPT_TIMEOUT`) before the
        channel is."""
        sftp = self.client.open_sftp()
        try:
            yield sftp
        finally:
            channel = sftp.get_channel()
            if channel is not None and not channel.closed:
                try:
                    channel.shutdown_write()
                    channel.status_event.wait(ATTEMPT_TIMEOUT)
                except (paramiko.SSHException, OSError, EOFError):
                    pass    # the connection is gone: the next command says so
            sftp.close()

    def put(self, local: Path, remote: str) -> None:
        """Copy a file to the guest (SFTP)."""
        self._transport(f"sftp put {remote}", ATTEMPT_TIMEOUT)
        try:
            with self._sftp() as sftp:
                sftp.put(str(local), remote)
        except (paramiko.SSHException, OSError) as exc:
            raise EnvironmentFailure(f"sftp put {local} -> {self.address}:{remote}: "
                                     f"{exc}") from exc

    def get(self, remote: str, local: Path) -> Path:
        """Copy a file from the guest (SFTP)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        self._transport(f"sftp get {remote}", ATTEMPT_TIMEOUT)
        try:
            with self._sftp() as sftp:
                sftp.get(remote, str(local))
        except (paramiko.SSHException, OSError) as exc:
            raise EnvironmentFailure(f"sftp get {self.address}:{remote} -> {local}: "
                                     f"{exc}") from exc
        return local

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
