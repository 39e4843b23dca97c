"""QEMU on another host, over SSH: ``ebs-harness boot --host ssh://user@sevhost``.

For a developer whose laptop has no SEV: the harness stays here (build,
analysis, verdicts), QEMU runs on the SEV host. :class:`RemoteMachine` has
the part of :class:`~harness.vm.machine.QemuMachine`'s interface a scenario
uses, so :func:`harness.scenario.run_scenario` runs unchanged with
``launcher=RemoteHost.launcher(session)``:

- the inputs (firmware CODE and VARS, disk images, kernel and initrd) are
  uploaded by SFTP into a fresh ``mktemp -d`` directory on the remote host,
  made by a *lease* (:data:`LEASE`): a remote command that removes the
  directory when its stdin ends, that is when the harness is done with it or
  its connection dies, however the harness dies;
- the argv is :func:`~harness.vm.machine.build_argv`'s, for the remote paths,
  plus a second QMP monitor on the remote host's 127.0.0.1 (TCP), reached
  through an SSH ``direct-tcpip`` channel (the harness speaks QMP with
  :mod:`qemu.qmp` as for a local QEMU);
- the serial and debug logs and QEMU's stderr are streamed back as QEMU
  writes them (``tail -F`` over SSH) into the local artifact directory,
  where the usual consoles follow them; a stream that breaks ends a wait
  with an error that says so; a memory dump is written remotely and fetched;
- QEMU dies with the SSH session: its wrapper kills it when the session's
  stdin reaches EOF, which is what happens when the harness exits or is
  killed.

Host keys are checked (pinned or ``known_hosts``), never added blindly.
:class:`LocalSshd` runs Debian's OpenSSH server on 127.0.0.1 for the tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
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
from harness.vm.console import Console, FileFollower, debug_console
from harness.vm.ssh import ClientKey, GuestSsh, free_port

LOG = logging.getLogger(__name__)

#: The remote wrapper: runs QEMU, kills it when the SSH session's stdin
#: closes (the harness went away), exits with QEMU's status.
#: Joins the exec channel's stdin/stdout to QEMU's QMP unix socket: socat
#: where the host has it, else Python (one of the two is on any QEMU host).
QMP_BRIDGE = (
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
WRAPPER = r"""cd "$1" || exit 127
shift
exec 3<&0   # an asynchronous list's stdin would be /dev/null
"$@" </dev/null >qemu-stderr.log 2>&1 &
q=$!
echo $q >qemu.pid
( cat <&3 >/dev/null 2>&1; kill $q 2>/dev/null ) &
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

    def launcher(self, session: GuestSsh) -> Callable[..., RemoteMachine]:
        """A ``launcher`` for :func:`harness.scenario.run_scenario`."""
        def launch(config: machine.MachineConfig, artifacts: Path, *,
                   name: str = "vm") -> RemoteMachine:
            return RemoteMachine(session, config, artifacts, name=name, qemu=self.qemu)
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
        qmp = _remote_sev_capabilities(session, qemu)
    sev, sev_es, snp = host.sev_verdicts(params, dev_sev, None, flags, kvm, qmp, version)
    cbitpos = qmp.cbitpos if isinstance(qmp, host.SevCapabilities) else None
    reduced = qmp.reduced_phys_bits if isinstance(qmp, host.SevCapabilities) else None
    return host.HostCaps(qemu=qemu, qemu_version=version, tcg=tcg, kvm=kvm, sev=sev,
                         sev_es=sev_es, snp=snp, cbitpos=cbitpos, reduced_phys_bits=reduced)


def _remote_sev_capabilities(session: GuestSsh, qemu: str) -> host.SevCapabilities | str:
    script = ('{"execute": "qmp_capabilities"}\n{"execute": "query-sev-capabilities"}\n'
              '{"execute": "quit"}\n')
    rc, out, err = session.run(
        f"printf %s {shlex.quote(script)} | {shlex.quote(qemu)} -machine none,accel=kvm "
        "-nodefaults -display none -qmp stdio", timeout=30, check=False)
    for line in out.splitlines():
        try:
            reply = json.loads(line)
        except ValueError:
            continue
        if isinstance(reply, dict) and isinstance(reply.get("return"), dict) \
                and "cbitpos" in reply["return"]:
            return host.parse_sev_capabilities(reply["return"])
        if isinstance(reply, dict) and "error" in reply:
            return f"query-sev-capabilities: {reply['error'].get('desc')}"
    return f"query-sev-capabilities: no answer (QEMU exited {rc}: {err.strip()[:200]})"


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
                if self.channel in ready:
                    data = self.channel.recv(65536)
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
    (:meth:`RemoteMachine.ended`).
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


class RemoteMachine(machine.GuestMachine):
    """A QEMU guest on a remote host, with the same artifact files locally
    as a :class:`~harness.vm.machine.QemuMachine`.

    :param session: a connected SSH session to the remote host.
    :param qemu: the QEMU binary there (replaces ``config.qemu``).
    """

    def __init__(self, session: GuestSsh, config: machine.MachineConfig, artifacts: Path, *,
                 name: str = "vm", qemu: str = "qemu-system-x86_64",
                 launch_timeout: float = 60.0, qmp_timeout: float = 30.0) -> None:
        super().__init__(config, artifacts, name=name, launch_timeout=launch_timeout,
                         qmp_timeout=qmp_timeout)
        self.session = session
        self.qemu = qemu
        self.remote_dir: str | None = None
        self._channel: paramiko.Channel | None = None
        self._lease: paramiko.Channel | None = None
        self._streams: list[_Stream] = []
        self._launched = False

    def is_running(self) -> bool:
        return self._channel is not None and not self._channel.exit_status_ready()

    def _broken_stream(self) -> str | None:
        """Why a log stream stopped while QEMU runs, if one did."""
        for stream in self._streams:
            if stream.broken:
                return stream.broken
            if not stream.is_alive() and self.is_running():
                return f"the remote log stream of {stream.path.name} ended while QEMU ran"
        return None

    def _console_alive(self) -> bool:
        """The consoles read on while QEMU runs and their streams stand."""
        return self.is_running() and self._broken_stream() is None

    def ended(self) -> str:
        # A stream's tail ends with QEMU (--pid), a moment before the exit
        # status comes: give QEMU's exit that moment to be the reason.
        deadline = time.monotonic() + 1.0
        while self.is_running() and time.monotonic() < deadline:
            broken = self._broken_stream()
            if broken is None:
                return "QEMU is still running"
            time.sleep(0.05)
        broken = self._broken_stream()
        if broken is not None:
            return broken
        if self._channel is None or not self._channel.exit_status_ready():
            return "QEMU is still running"
        status = self._channel.recv_exit_status()
        if status == -1:
            return f"the SSH session running QEMU on {self.session.host} closed without an " \
                   "exit status"
        return machine.describe_exit(status, shell=True)

    # ------------------------------------------------------- launch

    def launch(self, *, start: bool = True) -> None:
        if self._launched:
            raise LaunchError(f"{self.name}: a RemoteMachine launches once")
        self._launched = True
        try:
            self._launch(start)
        except BaseException as exc:
            stderr = self._fetch_stderr()
            self.shutdown()
            if isinstance(exc, LaunchError):
                exc.log = exc.log or stderr
                raise
            if not isinstance(exc, Exception):
                raise
            raise LaunchError(f"remote launch on {self.session.host} failed: "
                              f"{type(exc).__name__}: {exc}", self.exitcode, self.command,
                              stderr) from exc

    def _upload(self, local: Path, name: str) -> str:
        assert self.remote_dir is not None
        remote = f"{self.remote_dir}/{name}"
        self.session.put(local, remote)
        return remote

    def _launch(self, start: bool) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        transport = self.session.client.get_transport()
        assert transport is not None
        self._lease = transport.open_session(timeout=30)
        self._lease.exec_command(LEASE)
        self.remote_dir = _first_line(self._lease, 30, self.session.host)
        rdir = Path(self.remote_dir)
        config = self.config
        shutil.copyfile(config.vars_template, self.artifacts / "OVMF_VARS.fd")
        code = self._upload(config.code, "OVMF_CODE.fd")
        vars_copy = self._upload(config.vars_template, "OVMF_VARS.fd")
        devices: list[machine.Device] = []
        for index, device in enumerate(config.devices):
            if isinstance(device, (machine.BlockDevice, machine.ScsiController)) and device.image:
                remote = self._upload(device.image, f"disk{index}-{device.image.name}")
                device = replace(device, image=Path(remote))
            devices.append(device)
        files: dict[str, Any] = {}
        for field_name in ("kernel", "initrd"):
            local = getattr(config, field_name)
            if local is not None:
                files[field_name] = Path(self._upload(local, field_name))
        remote_config = replace(config, code=Path(code), vars_template=Path(vars_copy),
                                devices=tuple(devices), qemu=self.qemu, **files)
        paths = machine.RuntimePaths(qmp_socket=rdir / "qmp.sock",
                                     serial_socket=rdir / "serial.sock",
                                     serial_log=rdir / "serial.log",
                                     debugcon_log=rdir / "debugcon.log",
                                     vars_copy=Path(vars_copy))
        self.command = machine.build_argv(remote_config, paths)
        (self.artifacts / "cmdline.txt").write_text(
            f"# on {self.session.address}\n{shlex.join(self.command)}\n")
        for stale in (self.serial_log, self.debugcon_log, self.stderr_log):
            stale.unlink(missing_ok=True)
            stale.touch()
        self.log.info("launching on %s: %s", self.session.address, shlex.join(self.command))
        self._channel = transport.open_session(timeout=30)
        # KVM pins a SEV guest's memory: raise the locked-memory limit first
        # where the remote hard limit allows (QEMU's refusal explains the rest).
        ulimit = ""
        if config.sev is not None and config.sev.pins_memory:
            ulimit = limits.ulimit_command(limits.sev_memlock_bytes(config.memory_mib)) + "; "
        self._channel.exec_command(ulimit + "exec sh -c " + shlex.quote(WRAPPER) + " wrapper "
                                   + shlex.join([self.remote_dir, *self.command]))
        for name, local in self._logs().items():
            channel = transport.open_session(timeout=30)
            channel.exec_command(TAIL.format(dir=shlex.quote(self.remote_dir), name=name))
            stream = _Stream(channel, local)
            stream.start()
            self._streams.append(stream)
        self._transcript = open(self.qmp_log, "w", encoding="utf-8")  # noqa: SIM115
        self._qmp = self._connect_qmp(transport, paths.qmp_socket,
                                      time.monotonic() + self.launch_timeout)
        logs = self._logs()
        self._serial = Console("serial", FileFollower(self.serial_log, self._console_alive),
                               self.log, logs, self.command, ended=self.ended)
        if config.debugcon:
            self._debugcon = debug_console(self.debugcon_log, self._console_alive, self.log,
                                           logs, self.command, ended=self.ended)
        if config.sev is not None:
            self._check_sev(config.sev, machine.SEV_STATE_PAUSED)
        if start:
            self.qmp("cont")
            if config.sev is not None:
                self._check_sev(config.sev, machine.SEV_STATE_RUNNING)

    def _connect_qmp(self, transport: paramiko.Transport, sock: Path,
                     deadline: float) -> machine._Qmp:
        """QMP through the unix socket in the private (0700) remote directory,
        bridged over an exec channel: no TCP port another user could reach."""
        assert self._transcript is not None
        while True:
            if not self.is_running():
                assert self._channel is not None
                self.exitcode = self._channel.recv_exit_status()
                raise self._early_exit(f"{machine.describe_exit(self.exitcode, shell=True)} "
                                       f"on {self.session.host}", self._fetch_stderr())
            if self.session.run(f"test -S {shlex.quote(str(sock))}", check=False)[0] == 0:
                break
            if time.monotonic() > deadline:
                raise LaunchError(f"remote QMP socket {sock} did not appear in "
                                  f"{self.launch_timeout:g} s", None, self.command,
                                  self._fetch_stderr())
            time.sleep(0.1)
        try:
            channel = transport.open_session(timeout=30)
            channel.exec_command(QMP_BRIDGE.format(sock=shlex.quote(str(sock))))
        except paramiko.SSHException as exc:
            raise LaunchError(f"remote QMP bridge: {exc}", None, self.command) from exc
        ours, theirs = socket.socketpair()
        _Pump(theirs, channel).start()
        qmp = machine._Qmp(f"{self.name}-qmp", self._transcript, self.log)
        try:
            qmp.connect(ours, max(1.0, deadline - time.monotonic()))
        except Exception as exc:
            qmp.close()
            raise LaunchError(f"remote QMP: {type(exc).__name__}: {exc}", None,
                              self.command) from exc
        return qmp

    def _end_lease(self) -> None:
        """Let the lease remove the remote directory, and wait until it has."""
        if self._lease is None:
            return
        try:
            self._lease.shutdown_write()
            deadline = time.monotonic() + 30
            while not self._lease.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self._lease.exit_status_ready():
                self.log.warning("%s on %s: not removed in 30 s", self.remote_dir,
                                 self.session.host)
        except (OSError, paramiko.SSHException) as exc:
            self.log.warning("could not remove %s on %s: %s", self.remote_dir,
                             self.session.host, exc)
        finally:
            self._lease.close()
            self._lease = None

    def _fetch_stderr(self) -> str:
        """QEMU's stderr so far. While its stream still appends to the local
        copy, the remote file is read without touching that copy; once the
        stream has ended, the local copy is made whole from the remote file."""
        if self.remote_dir is None:
            return ""
        remote = f"{self.remote_dir}/qemu-stderr.log"
        streaming = any(s.path == self.stderr_log and s.is_alive() for s in self._streams)
        try:
            if streaming:
                return self.session.run(f"cat {shlex.quote(remote)}", timeout=30,
                                        check=False)[1]
            self.session.get(remote, self.stderr_log)
        except (OSError, HarnessError, paramiko.SSHException):
            return ""
        return self.stderr_log.read_text(errors="replace")

    # ----------------------------------------------------------- dump

    def dump(self, path: Path | None = None, timeout: float = 300.0) -> Path:
        """Stop the guest, dump its memory on the remote host, fetch it."""
        assert self.remote_dir is not None
        target = (path or self.artifacts / "memory.elf").absolute()
        started = time.monotonic()
        remote = f"{self.remote_dir}/memory.elf"
        self.qmp("stop")
        self.qmp("dump-guest-memory", {"paging": False, "protocol": f"file:{remote}"},
                 timeout=timeout)
        self.session.get(remote, target)
        self.session.run(f"rm -f {shlex.quote(remote)}", check=False)
        self.log.info("remote memory dump %s (%d bytes) in %.2f s", target,
                      target.stat().st_size, time.monotonic() - started)
        return target

    # ---------------------------------------------------- shutdown

    def shutdown(self, timeout: float = 10.0) -> None:
        """QMP ``quit``, wait; else close the session (the wrapper kills
        QEMU); fetch QEMU's stderr; remove the remote directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._request_quit()
            if self._channel is not None:
                deadline = time.monotonic() + timeout
                while self.is_running() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self.is_running():
                    self.log.warning("remote QEMU did not quit in %g s: ending its session",
                                     timeout)
                    self._channel.shutdown_write()
                    deadline = time.monotonic() + timeout
                    while self.is_running() and time.monotonic() < deadline:
                        time.sleep(0.05)
                if self._channel.exit_status_ready():
                    self.exitcode = self._channel.recv_exit_status()
        finally:
            if self._channel is not None:
                self._channel.close()
            for stream in self._streams:
                stream.join(timeout=5)
                stream.channel.close()
            self._close_io()
            if self.remote_dir is not None:
                self._fetch_stderr()
            self._end_lease()
            if self.exitcode is not None:
                self.log.info("remote QEMU exited with status %s", self.exitcode)


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
            machine.dies_with_us([str(self.SSHD), "-D", "-f", str(config), "-E", str(self.log)]),
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
