"""QEMU on another host, over SSH: ``ebs-harness boot --host ssh://user@sevhost``.

For a developer whose laptop has no SEV: the harness stays here (build,
analysis, verdicts), QEMU runs on the SEV host. The machine is the usual
:class:`~harness.vm.machine.QemuMachine` with an :class:`SshRunner`, so
:func:`harness.scenario.run_scenario` runs unchanged with
``launcher=RemoteHost.launcher(session)``:

- the inputs (firmware CODE and VARS, disk images, kernel and initrd) are
  uploaded by SFTP into a fresh ``mktemp -d`` directory on the remote host,
  made by a *lease* (:data:`LEASE`): a remote command that removes the
  directory when its stdin ends, that is when the harness is done with it or
  its connection dies, however the harness dies;
- the argv is :func:`~harness.vm.config.build_argv`'s, for the remote paths;
  QMP and the serial port are the remote QEMU's unix sockets in that
  (0700) directory, each joined to a local socket by an SSH exec channel
  (:data:`SOCKET_BRIDGE`), so QMP is spoken with
  :class:`~harness.vm.qmp.QmpSession` as for a local QEMU;
- the serial and debug logs and QEMU's stderr are streamed back as QEMU
  writes them (``tail -F`` over SSH) into the local artifact directory,
  where the usual consoles follow them; a stream that breaks ends a wait
  with an error that says so; a memory dump is written remotely and fetched;
- QEMU dies with the SSH session: its wrapper kills it when the session's
  stdin reaches EOF, which is what happens when the harness exits or is
  killed.

Host keys are checked (pinned or ``known_hosts``), never added blindly.
:class:`LocalSshd` runs Debian's OpenSSH server on 127.0.0.1 for the tests."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import paramiko

from harness.errors import (
    EnvironmentFailure,
    HarnessError,
    LaunchError,
    UsageError,
)
from harness.vm import host, limits, machine
from harness.vm.config import MachineConfig
from harness.vm.runner import describe_exit, dies_with_us
from harness.vm.ssh import ClientKey, GuestSsh, free_port

LOG = logging.getLogger(__name__)

#: Joins an exec channel's stdin/stdout to one of QEMU's unix sockets
#: (``{sock}``): socat where the host has it, else Python (one of the two is
#: on any QEMU host).
SOCKET_BRIDGE = (
    "if command -v socat >/dev/null; then exec socat - UNIX-CONNECT:{sock}; fi; "
    "exec python3 -c '"
    "import os, socket, sys, threading\n"
    "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
    "def up():\n"
    "    while True:\n"
    "        d = os.read(0, 65536)\n"
    "        if not d:\n"
    "            s.shutdown(socket.SHUT_WR); return\n"
    "        s.sendall(d)\n"
    "threading.Thread(target=up, daemon=True).start()\n"
    "while True:\n"
    "    d = s.recv(65536)\n"
    "    if not d:\n"
    "        break\n"
    "    os.write(1, d)\n"
    "' {sock}"
)

#: The remote wrapper (``wrapper DIR STDERR ARGV...``): runs QEMU in DIR
#: with its output in STDERR, kills it when the SSH session's stdin closes
#: (the harness went away), exits with QEMU's status.
WRAPPER = r"""cd "$1" || exit 127
err=$2
shift 2
exec 3<&0   # an asynchronous list's stdin would be /dev/null
"$@" </dev/null >"$err" 2>&1 &
q=$!
echo $q >qemu.pid
( cat <&3 >/dev/null 2>&1; kill $q 2>/dev/null; sleep 5; kill -9 $q 2>/dev/null ) &
w=$!
wait $q
rc=$?
kill $w 2>/dev/null
exit $rc
"""

#: Makes the remote directory, prints its name, and removes it once its
#: stdin ends: when the harness is done with it (it closes the channel) or
#: when the harness's connection dies, however the harness dies.
LEASE = ('d=$(mktemp -d /tmp/ebs-harness.XXXXXXXX) || exit 1; echo "$d"; '
         'cat >/dev/null; cd / && rm -rf "$d"')

#: Follows a remote log until QEMU (qemu.pid) has exited.
TAIL = ('cd {dir} && while [ ! -s qemu.pid ]; do sleep 0.05; done; '
        'exec tail -c +1 -F --pid="$(cat qemu.pid)" {name} 2>/dev/null')


@dataclass(frozen=True)
class RemoteHost:
    """Where QEMU runs: ``ssh://[user@]host[:port]``.

    :param known_hosts: checked for the host key (default ~/.ssh/known_hosts).
    :param host_key: a pinned host key line instead of known_hosts.
    :param identity: a private key file (default: agent and ~/.ssh/id_*).
    :param qemu: the QEMU binary on the remote host.
    """

    host: str
    user: str = "root"
    port: int = 22
    known_hosts: Path | None = None
    host_key: str | None = None
    identity: Path | None = None
    qemu: str = "qemu-system-x86_64"

    def __post_init__(self) -> None:
        if not self.host or not 1 <= self.port <= 65535:
            raise UsageError(f"remote host {self.host!r}:{self.port}: not an address")

    @classmethod
    def parse(cls, url: str, **options: Any) -> RemoteHost:
        """``ssh://user@host:port`` (user default: the local user's name)."""
        parts = urlsplit(url)
        if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/"):
            raise UsageError(f"--host {url!r}: expected ssh://[user@]host[:port]")
        try:
            port = parts.port or 22
        except ValueError as exc:
            raise UsageError(f"--host {url!r}: bad port") from exc
        user = parts.username or os.environ.get("USER") or "root"
        return cls(host=parts.hostname, user=user, port=port, **options)

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"

    def connect(self, timeout: float = 30.0, client_key: ClientKey | None = None) -> GuestSsh:
        session = GuestSsh(self.host, self.port, user=self.user, host_key=self.host_key,
                           known_hosts=self.known_hosts, client_key=client_key,
                           key_filename=self.identity)
        session.connect(deadline=time.monotonic() + timeout)
        return session

    def tunnel(self, session: GuestSsh, port: int) -> Callable[[], paramiko.Channel]:
        """Opens a ``direct-tcpip`` channel to the remote host's 127.0.0.1:``port``
        (a guest's hostfwd there), for :class:`GuestSsh`'s ``channel``."""
        def open_channel() -> paramiko.Channel:
            transport = session.client.get_transport()
            if transport is None or not transport.is_active():
                raise paramiko.SSHException(f"the session to {self.url} is closed")
            return transport.open_channel("direct-tcpip", ("127.0.0.1", port),
                                          ("127.0.0.1", 0), timeout=10)
        return open_channel

    def launcher(self, session: GuestSsh) -> Callable[..., machine.QemuMachine]:
        """A ``launcher`` for :func:`harness.scenario.run_scenario`: machines
        whose QEMU (this host's :attr:`qemu`) runs there."""
        def launch(config: MachineConfig, artifacts: Path, *,
                   name: str = "vm") -> machine.QemuMachine:
            return machine.QemuMachine(replace(config, qemu=self.qemu), artifacts, name=name,
                                       runner=SshRunner(session), launch_timeout=60.0)
        return launch


# ---------------------------------------------------------- capabilities


def remote_caps(session: GuestSsh, qemu: str = "qemu-system-x86_64") -> host.HostCaps:
    """What the remote host can run, read over SSH.

    TCG is assumed where QEMU runs; KVM is taken from a usable ``/dev/kvm``
    (not proven by a firmware boot, unlike the local probe); SEV and SEV-ES
    come from the same decision as the local probe
    (:func:`harness.vm.host.sev_verdicts`): the kvm_amd parameters, ``/dev/sev``,
    the CPU flags and QEMU's ``query-sev-capabilities`` (asked of a
    ``-machine none`` QEMU on the remote host).
    """
    _, out, _ = session.run(f"{shlex.quote(qemu)} --version", timeout=30)
    try:
        version = host.parse_qemu_version(out)
    except ValueError as exc:
        raise EnvironmentFailure(f"remote {session.host}: {qemu} --version: {exc}") from exc
    tcg = host.Capability(True, f"remote {session.host}: QEMU {version} runs there")
    rc, _, _ = session.run("test -r /dev/kvm -a -w /dev/kvm", check=False)
    kvm = host.Capability(rc == 0, f"remote {session.host}: /dev/kvm "
                          + ("usable (not boot-proven)" if rc == 0 else "missing or not usable"))
    params: dict[str, bool | None] | None = None
    _, text, _ = session.run("for p in sev sev_es sev_snp; do printf '%s=' $p; "
                             "cat /sys/module/kvm_amd/parameters/$p 2>/dev/null || echo; done",
                             check=False)
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if any(v.strip() for v in values.values()):
        try:
            params = {name: host.parse_module_flag(v) if v.strip() else None
                      for name, v in values.items()}
        except ValueError as exc:
            raise EnvironmentFailure(f"remote {session.host}: kvm_amd parameters: "
                                     f"{exc}") from exc
    dev_sev = session.run("test -e /dev/sev", check=False)[0] == 0
    _, cpuinfo, _ = session.run("grep -m1 '^flags' /proc/cpuinfo", check=False)
    flags = host.parse_cpuinfo_flags(cpuinfo)
    qmp: host.SevCapabilities | str | None = None
    if kvm.available and dev_sev:
        qmp = host.query_sev_capabilities(SshRunner(session), qemu)
    sev, sev_es, snp = host.sev_verdicts(params, dev_sev, None, flags, kvm, qmp, version)
    return host.HostCaps(qemu=qemu, qemu_version=version, tcg=tcg, kvm=kvm, sev=sev,
                         sev_es=sev_es, snp=snp,
                         sev_geometry=qmp if isinstance(qmp, host.SevCapabilities) else None)


# ------------------------------------------------------------- machine


class _Pump(threading.Thread):
    """Copies bytes between a local socket and an SSH channel until either closes."""

    def __init__(self, sock: socket.socket, channel: paramiko.Channel) -> None:
        super().__init__(daemon=True, name="qmp-pump")
        self.sock = sock
        self.channel = channel

    def run(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self.sock, self.channel], [], [], 0.5)
                if self.sock in ready:
                    data = self.sock.recv(65536)
                    if not data:
                        break
                    self.channel.sendall(data)
                # Asked on every pass too: paramiko signals a channel through a
                # pipe that can miss an event, and QMP's greeting then stays in
                # the channel's buffer while QEMU waits for an answer.
                channel = self.channel
                if channel in ready or channel.recv_ready() or channel.eof_received:
                    data = channel.recv(65536)
                    if not data:
                        break
                    self.sock.sendall(data)
        except OSError as exc:
            LOG.debug("QMP pump: %s", exc)
        finally:
            self.channel.close()
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()


class _Stream(threading.Thread):
    """Appends what a remote command prints to a local file, as it comes.

    ``broken`` says why it stopped, if the connection failed or ``tail``
    exited with an error; a stream that ends while QEMU runs is broken too
    (:meth:`SshProcess.ended`).
    """

    def __init__(self, channel: paramiko.Channel, path: Path) -> None:
        super().__init__(daemon=True, name=f"tail-{path.name}")
        self.channel = channel
        self.path = path
        self.broken: str | None = None

    def run(self) -> None:
        try:
            with open(self.path, "ab") as out:
                while data := self.channel.recv(65536):
                    out.write(data)
                    out.flush()
            status = self.channel.recv_exit_status()
            transport = self.channel.get_transport()
            if status == -1 and (transport is None or not transport.is_active()):
                self.broken = f"the SSH connection carrying {self.path.name} closed"
            elif status not in (0, -1):
                self.broken = f"the remote log stream of {self.path.name} ended with status " \
                              f"{status}"
        except (OSError, paramiko.SSHException, EOFError) as exc:
            self.broken = f"the remote log stream of {self.path.name} broke: " \
                          f"{type(exc).__name__}: {exc}"


class SshProcess:
    """A QEMU started by :class:`SshRunner`: its wrapper's exec channel
    (exit status as a shell reports it) and the streams of its logs."""

    def __init__(self, runner: SshRunner, channel: paramiko.Channel, stderr: Path) -> None:
        self._runner = runner
        self.channel = channel
        self._stderr = stderr

    def poll(self) -> int | None:
        if not self.channel.exit_status_ready():
            return None
        status: int = self.channel.recv_exit_status()
        return status

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while not self.channel.exit_status_ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"remote QEMU still runs after {timeout:g} s")
            time.sleep(0.05)
        status: int = self.channel.recv_exit_status()
        return status

    def kill(self) -> None:
        """End the session's stdin (the wrapper kills QEMU), wait 10 s for
        the exit, close the channel."""
        if not self.channel.closed:
            with contextlib.suppress(OSError, paramiko.SSHException):
                self.channel.shutdown_write()
            deadline = time.monotonic() + 10
            while not self.channel.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.channel.close()

    def readable(self) -> bool:
        """The consoles read on while QEMU runs and their streams stand, and
        after it ended while a stream still brings its last bytes."""
        if self.poll() is None:
            return self._runner.broken_stream(running=True) is None
        return self._runner.streaming()

    def ended(self) -> str:
        # A stream's tail ends with QEMU (--pid), a moment before the exit
        # status comes: give QEMU's exit that moment to be the reason.
        deadline = time.monotonic() + 1.0
        while not self.channel.exit_status_ready() and time.monotonic() < deadline:
            if self._runner.broken_stream(running=True) is None:
                return "QEMU is still running"
            time.sleep(0.05)
        broken = self._runner.broken_stream(running=not self.channel.exit_status_ready())
        if broken is not None:
            return broken
        if not self.channel.exit_status_ready():
            return "QEMU is still running"
        status = self.channel.recv_exit_status()
        if status == -1:
            return f"the SSH session running QEMU on {self._runner.host} closed without an " \
                   "exit status"
        return f"{describe_exit(status, shell=True)} on {self._runner.host}"

    def stderr_text(self) -> str:
        return self._runner.read_text(self._stderr)


class SshRunner:
    """QEMU on another host, reached through a connected SSH session.

    The working directory is made by a *lease* (:data:`LEASE`) and goes
    with it; inputs are uploaded there; logs stream back as QEMU writes
    them; unix sockets are reached through an exec channel bridged to a
    local socket pair (no TCP port another user could reach).
    """

    def __init__(self, session: GuestSsh) -> None:
        self.session = session
        self.where = session.address
        self.host = session.host
        self.directory: Path | None = None
        self._lease: paramiko.Channel | None = None
        self._follow: dict[Path, Path] = {}
        self._streams: list[_Stream] = []
        self._stderr_copy: tuple[Path, Path] | None = None

    def _transport(self) -> paramiko.Transport:
        transport = self.session.client.get_transport()
        if transport is None or not transport.is_active():
            raise LaunchError(f"the SSH connection to {self.host} is closed")
        return transport

    def open(self) -> Path:
        if self._lease is not None:
            raise LaunchError("a runner serves one QEMU")
        self._lease = self._transport().open_session(timeout=30)
        self._lease.exec_command(LEASE)
        self.directory = Path(_first_line(self._lease, 30, self.host))
        return self.directory

    def _path(self, name: str) -> Path:
        if self.directory is None:
            raise LaunchError("the remote working directory is not open")
        return self.directory / name

    def place(self, local: Path, name: str) -> Path:
        remote = self._path(name)
        self.session.put(local, str(remote))
        return remote

    def output(self, local: Path) -> Path:
        remote = self._path(local.name)
        self._follow[remote] = local
        return remote

    def landing(self, local: Path) -> Path:
        return self._path(local.name)

    def fetch(self, landed: Path, local: Path) -> None:
        self.session.get(str(landed), local)
        self.session.run(f"rm -f {shlex.quote(str(landed))}", check=False)

    def start(self, argv: Sequence[str], *, stderr: Path, memlock: int | None) -> SshProcess:
        """The wrapper runs ``argv`` in the working directory; one ``tail``
        per :meth:`output` streams it back."""
        directory = self._path("")
        transport = self._transport()
        # KVM pins a SEV guest's memory: raise the locked-memory limit first
        # where the remote hard limit allows (QEMU's refusal explains the rest).
        ulimit = "" if memlock is None else limits.ulimit_command(memlock) + "; "
        channel = transport.open_session(timeout=30)
        channel.exec_command(ulimit + "exec sh -c " + shlex.quote(WRAPPER) + " wrapper "
                             + shlex.join([str(directory), str(stderr), *argv]))
        try:
            for remote, local in self._follow.items():
                tail = transport.open_session(timeout=30)
                tail.exec_command(TAIL.format(dir=shlex.quote(str(directory)),
                                              name=shlex.quote(remote.name)))
                stream = _Stream(tail, local)
                stream.start()
                self._streams.append(stream)
        except BaseException:
            # nobody owns the wrapper yet: end QEMU now (sshd may refuse a
            # channel: MaxSessions)
            SshProcess(self, channel, stderr).kill()
            raise
        if stderr in self._follow:
            self._stderr_copy = (stderr, self._follow[stderr])
        return SshProcess(self, channel, stderr)

    def streaming(self) -> bool:
        """A log stream still copies (``tail --pid`` ends a moment after QEMU)."""
        return any(stream.is_alive() for stream in self._streams)

    def broken_stream(self, *, running: bool) -> str | None:
        """Why a log stream stopped (``running``: while QEMU runs), if one did."""
        for stream in self._streams:
            if stream.broken:
                return stream.broken
            if running and not stream.is_alive():
                return f"the remote log stream of {stream.path.name} ended while QEMU ran"
        return None

    def has_socket(self, path: Path) -> bool:
        return self.session.run(f"test -S {shlex.quote(str(path))}", check=False)[0] == 0

    def connect(self, path: Path) -> socket.socket:
        """A local socket joined to the remote unix socket by :data:`SOCKET_BRIDGE`."""
        try:
            channel = self._transport().open_session(timeout=30)
            channel.exec_command(SOCKET_BRIDGE.format(sock=shlex.quote(str(path))))
        except paramiko.SSHException as exc:
            raise OSError(f"remote socket bridge to {path}: {exc}") from exc
        ours, theirs = socket.socketpair()
        _Pump(theirs, channel).start()
        return ours

    def sockets_done(self) -> None:
        """The remote directory stays until :meth:`close` (it holds the inputs)."""

    def read_text(self, path: Path) -> str:
        """A remote file's text so far ("" if it cannot be read)."""
        try:
            return self.session.run(f"cat {shlex.quote(str(path))}", timeout=30,
                                    check=False)[1]
        except (OSError, HarnessError, paramiko.SSHException):
            return ""

    def close(self) -> None:
        """Let the streams end, make QEMU's stderr whole locally, and let the
        lease remove the remote directory (waiting until it has)."""
        for stream in self._streams:
            stream.join(timeout=5)
            stream.channel.close()
        if self._stderr_copy is not None and self._lease is not None:
            # the stream may have ended before the last of it: fetch it whole
            with contextlib.suppress(OSError, EOFError, HarnessError, paramiko.SSHException):
                self.session.get(str(self._stderr_copy[0]), self._stderr_copy[1])
        self._streams.clear()
        if self._lease is None:
            return
        try:
            self._lease.shutdown_write()
            deadline = time.monotonic() + 30
            while not self._lease.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self._lease.exit_status_ready():
                LOG.warning("%s on %s: not removed in 30 s", self.directory, self.host)
        except (OSError, paramiko.SSHException) as exc:
            LOG.warning("could not remove %s on %s: %s", self.directory, self.host, exc)
        finally:
            self._lease.close()
            self._lease = None


def _first_line(channel: paramiko.Channel, timeout: float, host: str) -> str:
    """The first line a remote command (the lease's ``mktemp``) prints."""
    channel.settimeout(timeout)
    data = b""
    try:
        while b"\n" not in data:
            chunk = channel.recv(4096)
            if not chunk:
                raise LaunchError(f"mktemp -d /tmp/ebs-harness.XXXXXXXX on {host} failed "
                                  f"(status {channel.recv_exit_status()}): no directory for "
                                  "the run")
            data += chunk
    except TimeoutError as exc:
        raise LaunchError(f"mktemp -d on {host}: no answer in {timeout:g} s") from exc
    finally:
        channel.settimeout(None)
    return data.split(b"\n", 1)[0].decode().strip()


# ------------------------------------------------------------ test sshd


class LocalSshd:
    """Debian's OpenSSH server on 127.0.0.1, its own config, host key and
    authorized key, for tests of the remote path (needs root, as
    ``/usr/sbin/sshd`` privilege separation does).

    :param directory: where its config, keys and log go.
    :param authorized: the public key line allowed to log in (as root).
    """

    SSHD = Path("/usr/sbin/sshd")

    def __init__(self, directory: Path, authorized: str) -> None:
        self.directory = Path(directory)
        self.authorized = authorized
        self.port = 0
        self.host_key = ""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.directory / "sshd.log"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    def start(self, timeout: float = 15.0) -> None:
        if not self.SSHD.is_file():
            raise EnvironmentFailure(f"{self.SSHD} not found: install Debian's openssh-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        key = ClientKey.generate()   # an Ed25519 key in OpenSSH format serves as host key
        key_file = key.write(self.directory / "ssh_host_ed25519_key")
        self.host_key = key.public_line
        (self.directory / "authorized_keys").write_text(self.authorized + "\n")
        self.port = free_port()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_key}\n")
        config = self.directory / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {key_file}",
            f"AuthorizedKeysFile {self.directory / 'authorized_keys'}",
            f"PidFile {self.directory / 'sshd.pid'}", "StrictModes no", "UsePAM no",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp", "LogLevel VERBOSE", ""]))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)   # privilege separation dir
        self.process = subprocess.Popen(
            dies_with_us([str(self.SSHD), "-D", "-f", str(config), "-E", str(self.log)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not re.search(r"Server listening", _read(self.log)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise EnvironmentFailure(f"sshd did not start: {_read(self.log)[-500:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def remote_qemu_processes(session: GuestSsh, remote_dir: str = "/tmp/ebs-harness.") -> list[str]:
    """The remote host's QEMU processes whose command line names ``remote_dir``
    (default: any this harness started there)."""
    # "[q]emu": the pattern must not match the shell that runs pgrep
    pattern = shlex.quote(f"[q]emu-system.*{re.escape(remote_dir)}")
    _, out, _ = session.run(f"pgrep -af {pattern} || true", check=False)
    return out.splitlines()
