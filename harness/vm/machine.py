"""A QEMU process and its QMP: one guest of the harness.

:class:`QemuMachine` runs a :class:`~harness.vm.config.MachineConfig`, in
the manner of QEMU's ``python/qemu/machine/machine.py``::

    with QemuMachine(config, artifacts_dir) as vm:
        vm.debugcon.expect(r"\\[Bds\\] Expand .*BOOTX64\\.EFI", timeout=20)
        vm.dump(vm.artifacts / "memory.elf")

QEMU starts paused (``-S``). Its QMP monitor and its serial port are unix
sockets in the run's private (0700) working directory; the harness
connects to both (QMP with :class:`~harness.vm.qmp.QmpSession`), checks
SEV with ``query-sev`` where asked, then sends ``cont``. Where QEMU runs is
the machine's :class:`~harness.vm.runner.Runner`: this host
(:class:`~harness.vm.runner.LocalRunner`, the default: QEMU dies with the
harness, however the harness dies) or another over SSH
(:class:`harness.vm.remote.SshRunner`); the machine is the same. A QEMU that
did not end by the harness's ``quit`` (it crashed, or had to be killed) is an
:class:`~harness.errors.AbnormalShutdown` the caller is told of, as
``QEMUMachine`` reports it.

Artifacts per VM, in the directory given: ``cmdline.txt`` (shell-quoted),
``reproduce.sh`` (the same QEMU, by hand, with a QMP socket and the serial
port on the terminal), ``qmp.log`` (transcript), ``serial.log``,
``debugcon.log``, ``qemu-stderr.log`` and ``OVMF_VARS.fd`` (this VM's copy)."""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TextIO

from harness.errors import (
    AbnormalShutdown,
    DependencyError,
    LaunchError,
    QmpError,
    UsageError,
)
from harness.vm import limits
from harness.vm.config import MachineConfig, RuntimePaths, build_argv, reproduce_script
from harness.vm.console import (
    Console,
    CrashWatch,
    debug_console,
    serial_console,
    tail_lines,
)
from harness.vm.devices import E1000E_ROM, BlockDevice, Device, ScsiController, ZooDevice
from harness.vm.runner import LocalProcess, LocalRunner, Process, Runner, describe_exit
from harness.vm.sev import (
    SEV_STATE_PAUSED,
    SEV_STATE_RUNNING,
    SevConfig,
    sev_es_termination,
    sev_info_problem,
    sev_launch_reason,
)

if TYPE_CHECKING:
    from harness.vm.qmp import QmpSession

LOG = logging.getLogger(__name__)

#: How long one QMP connection waits for QEMU's greeting before another is
#: made (QEMU greets within milliseconds of a connection).
GREETING_WAIT = 10.0


class QemuMachine:
    """A QEMU guest: launch, QMP, consoles, memory dump, shutdown, on this
    host or, with :class:`harness.vm.remote.SshRunner`, on another.

    A context manager; :meth:`launch` cleans up on any failure and raises
    :class:`LaunchError`; :meth:`shutdown` is idempotent.

    :param config: what to run.
    :param artifacts: this VM's artifact directory (created).
    :param name: the VM's name in logs (child logger ``harness.vm.machine.NAME``).
    :param runner: where QEMU runs (default: :class:`~harness.vm.runner.LocalRunner`).
    :param launch_timeout: deadline for QEMU to come up on QMP.
    :param qmp_timeout: default deadline of a QMP command.
    """

    def __init__(self, config: MachineConfig, artifacts: Path, *, name: str = "vm",
                 runner: Runner | None = None, launch_timeout: float = 30.0,
                 qmp_timeout: float = 30.0) -> None:
        self.config = config.resolved()
        self.artifacts = Path(artifacts).absolute()
        self.name = name
        self.runner: Runner = runner if runner is not None else LocalRunner()
        self.log = LOG.getChild(name)
        self.launch_timeout = launch_timeout
        self.qmp_timeout = qmp_timeout
        self.command: list[str] = []
        self.exitcode: int | None = None
        self.process: Process | None = None
        self._qmp: QmpSession | None = None
        self._transcript: TextIO | None = None
        self._serial: Console | None = None
        self._debugcon: Console | None = None
        self._serial_sock: socket.socket | None = None
        self._launched = False
        self._closed = False
        self._quit_requested = False
        self._crash = CrashWatch(self.serial_log)
        #: how QEMU ended, when it did not end by the harness's ``quit``
        self.abnormal: str | None = None
        #: the adversary NIC's unix datagram socket (QEMU binds it), or None
        self.nic_socket: Path | None = None
        self._nic_sock: socket.socket | None = None

    # artifact paths
    @property
    def serial_log(self) -> Path:
        return self.artifacts / "serial.log"

    @property
    def debugcon_log(self) -> Path:
        return self.artifacts / "debugcon.log"

    @property
    def stderr_log(self) -> Path:
        return self.artifacts / "qemu-stderr.log"

    @property
    def qmp_log(self) -> Path:
        return self.artifacts / "qmp.log"

    @property
    def device_trace_raw(self) -> Path:
        """QEMU's trace lines, as QEMU wrote them (``config.trace_events``)."""
        return self.artifacts / "device-trace.raw"

    @property
    def pid(self) -> int | None:
        """QEMU's PID on this host (None before launch, or when it runs elsewhere)."""
        return self.process.pid if isinstance(self.process, LocalProcess) else None

    @property
    def serial(self) -> Console:
        if self._serial is None:
            raise QmpError(f"{self.name}: not launched")
        return self._serial

    @property
    def debugcon(self) -> Console:
        if self._debugcon is None:
            raise QmpError(f"{self.name}: not launched or debugcon off")
        return self._debugcon

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every QMP event seen so far."""
        return [] if self._qmp is None else list(self._qmp.history)

    def __enter__(self) -> Self:
        self.launch()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.shutdown()
        # Reported only when nothing else is: an error in flight says more.
        if exc_type is None and self.abnormal is not None:
            raise AbnormalShutdown(self.abnormal, tail_lines(self.stderr_log, 10))

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ended(self) -> str:
        """Why the consoles ended (QEMU's exit, or what broke, and the SEV-ES
        termination that made QEMU exit), for errors."""
        if self.process is None:
            return describe_exit(None)
        reasons = []
        if self._crash.line is not None:
            reasons.append(f"the guest's CPU exception dump on the serial port: "
                           f"{self._crash.line}")
        if self.process.poll() is not None:
            why = (sev_es_termination(self._stderr_text()) if self.config.sev is not None
                   else None)
            reasons.append(self.process.ended() + (f": {why}" if why else ""))
        return "; ".join(reasons) or self.process.ended()

    def _readable(self) -> bool:
        return self.process is not None and self.process.readable()

    def _stderr_text(self) -> str:
        """QEMU's output so far, for errors."""
        return "" if self.process is None else self.process.stderr_text()

    def _logs(self) -> dict[str, Path]:
        logs = {"serial.log": self.serial_log}
        if self.config.debugcon:
            logs["debugcon.log"] = self.debugcon_log
        logs["qemu-stderr.log"] = self.stderr_log
        return logs

    def tails(self) -> dict[str, str]:
        """The last lines of the serial and debug logs and of QEMU's stderr."""
        return {name: tail_lines(path) for name, path in self._logs().items()}

    # --------------------------------------------------------- launch

    def launch(self, *, start: bool = True) -> None:
        """Start QEMU paused, connect QMP and the serial port, then ``cont``.

        :param start: send ``cont``; False leaves the guest paused.
        :raises LaunchError: QEMU did not start, died, or SEV is not on.
        """
        if self._launched or self._closed:
            raise LaunchError(f"{self.name}: a QemuMachine launches once")
        self._launched = True
        try:
            self._launch(start)
        except BaseException as exc:
            stderr = self._stderr_text()
            self.shutdown()
            if isinstance(exc, LaunchError):
                exc.log = exc.log or stderr
                raise
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
                raise
            where = f" on {self.runner.where}" if self.runner.where else ""
            # A SEV-ES guest can be ended before the launch's last query.
            error = f"{type(exc).__name__}: {exc}"
            ended = sev_es_termination(stderr) if self.config.sev is not None else None
            why = f"{ended} ({error})" if ended else error
            raise LaunchError(f"launch{where} failed: {why}", self.exitcode, self.command,
                              stderr) from exc

    def _placed(self, vars_copy: Path) -> MachineConfig:
        """The config with every input file where QEMU reads it."""
        runner = self.runner
        config = self.config
        devices: list[Device] = []
        for index, device in enumerate(config.devices):
            if isinstance(device, (BlockDevice, ScsiController, ZooDevice)) and device.image:
                device = dataclasses.replace(device, image=runner.place(
                    device.image, f"disk{index}-{device.image.name}"))
            devices.append(device)
        return dataclasses.replace(
            config, code=runner.place(config.code, "OVMF_CODE.fd"),
            vars_template=runner.place(vars_copy, "OVMF_VARS.fd"), devices=tuple(devices),
            kernel=None if config.kernel is None else runner.place(config.kernel, "kernel"),
            initrd=None if config.initrd is None else runner.place(config.initrd, "initrd"))

    def _launch(self, start: bool) -> None:
        """The launch in its steps: inputs placed, the command written down,
        QEMU started, its sockets connected, the consoles opened, SEV
        checked, the guest let go."""
        work = self.runner.open()
        config = self._placed(self._vars_copy())
        paths = self._paths(config, work)
        self.command = build_argv(config, paths)
        self._write_command()
        self._start()
        self._connect(paths)
        self._open_consoles()
        if self.config.sev is not None:
            self._check_sev(self.config.sev, SEV_STATE_PAUSED)
        if start:
            self.qmp("cont")
            if self.config.sev is not None:
                self._check_sev(self.config.sev, SEV_STATE_RUNNING)

    def _vars_copy(self) -> Path:
        """This VM's own copy of the firmware's variable store."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        vars_copy = self.artifacts / "OVMF_VARS.fd"
        try:
            shutil.copyfile(self.config.vars_template, vars_copy)
        except OSError as exc:
            raise LaunchError(f"cannot copy the firmware VARS {self.config.vars_template}: "
                              f"{exc.strerror}") from exc
        return vars_copy

    def _paths(self, config: MachineConfig, work: Path) -> RuntimePaths:
        """Where this run's sockets and logs go; what the devices need of
        this host is checked here."""
        runner = self.runner
        zoo = {d.kind for d in config.devices if isinstance(d, ZooDevice)}
        if "adversary-nic" in zoo and runner.where:
            raise LaunchError(f"adversary-nic needs QEMU on this host, not on {runner.where}")
        if "e1000e" in zoo and not runner.where and not E1000E_ROM.is_file():
            raise DependencyError(f"e1000e needs iPXE's EFI ROM {E1000E_ROM}: install "
                                  "Debian's ipxe-qemu (scripts/setup-host)")
        self.nic_socket = work / "adv-nic.sock" if "adversary-nic" in zoo else None
        return RuntimePaths(qmp_socket=work / "qmp.sock", serial_socket=work / "serial.sock",
                            serial_log=runner.output(self.serial_log),
                            debugcon_log=runner.output(self.debugcon_log),
                            vars_copy=config.vars_template,
                            trace_log=(runner.output(self.device_trace_raw)
                                       if config.trace_events else None),
                            nic_socket=self.nic_socket)

    def _write_command(self) -> None:
        """``cmdline.txt`` and ``reproduce.sh``; stale logs of a run before go."""
        where = self.runner.where
        (self.artifacts / "cmdline.txt").write_text(
            (f"# on {where}\n" if where else "") + shlex.join(self.command) + "\n")
        script = self.artifacts / "reproduce.sh"
        script.write_text(reproduce_script(self.config, self.config.vars_template))
        script.chmod(0o755)
        for stale in self._logs().values():
            stale.unlink(missing_ok=True)

    def _start(self) -> None:
        """QEMU's process, paused, with the locked-memory limit a SEV guest needs."""
        self._transcript = open(self.qmp_log, "w", encoding="utf-8")  # noqa: SIM115
        where = f" on {self.runner.where}" if self.runner.where else ""
        self.log.info("launching%s: %s", where, shlex.join(self.command))
        memlock = (limits.sev_memlock_bytes(self.config.memory_mib)
                   if self.config.sev is not None and self.config.sev.pins_memory else None)
        self.process = self.runner.start(self.command, stderr=self.runner.output(
            self.stderr_log), memlock=memlock)

    def _connect(self, paths: RuntimePaths) -> None:
        """QMP, the serial port and the adversary NIC's socket, before the
        runner removes the working directory's names."""
        self._qmp = self._connect_qmp(paths.qmp_socket,
                                      time.monotonic() + self.launch_timeout)
        if self.config.serial_input:
            assert paths.serial_socket is not None
            self._serial_sock = self.runner.connect(paths.serial_socket)
        if self.nic_socket is not None:
            self._nic_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._nic_sock.connect(str(self.nic_socket))
        self.runner.sockets_done()

    def _open_consoles(self) -> None:
        logs = self._logs()
        # The console owns the connected socket from here on (and closes it).
        sock, self._serial_sock = self._serial_sock, None
        self._serial = serial_console(sock, self.serial_log, self._readable, self.log,
                                      logs, self.command, ended=self.ended)
        if self.config.debugcon:
            # The debug log ends, too, when the guest's exception dump reaches
            # the serial port: a wait on it fails at once, saying so.
            self._debugcon = debug_console(self.debugcon_log, self._readable, self.log,
                                           logs, self.command, ended=self.ended,
                                           crash=self._crash)

    def _connect_qmp(self, path: Path, deadline: float) -> QmpSession:
        # Imported here, while QEMU starts: asyncio is a tenth of the
        # harness's start.
        from harness.vm.qmp import QmpSession

        assert self.process is not None and self._transcript is not None
        last: Exception | None = None
        while True:
            exitcode = self.process.poll()
            if exitcode is not None:
                self.exitcode = exitcode
                raise self._early_exit(self.process.ended(), self._stderr_text())
            if self.runner.has_socket(path):
                qmp = QmpSession(f"{self.name}-qmp", self._transcript, self.log)
                # A greeting that does not come is asked for again on a new
                # connection (a remote host's socket bridge stalled once in
                # some hundred launches), until the deadline.
                wait = min(GREETING_WAIT, max(0.1, deadline - time.monotonic()))
                try:
                    qmp.connect(self.runner.connect(path), wait)
                    return qmp
                except Exception as exc:  # noqa: BLE001 - retried until the deadline
                    last = exc
                    qmp.close()
            if time.monotonic() > deadline:
                raise LaunchError(f"QEMU's QMP socket did not answer in "
                                  f"{self.launch_timeout:g} s ({last})", None,
                                  self.command, self._stderr_text())
            time.sleep(0.005)   # QEMU answers some 40 ms after its start

    def _early_exit(self, ended: str, stderr: str) -> LaunchError:
        """The error of a QEMU that ended before its QMP answered: how it
        ended and, when its stderr says why (a SEV refusal), why."""
        why = sev_launch_reason(stderr) if self.config.sev is not None else None
        return LaunchError(ended + (f": {why}" if why else ""), self.exitcode, self.command,
                           stderr)

    def _check_sev(self, sev: SevConfig, state: str) -> None:
        """``query-sev`` must say SEV is on as ``sev`` asks, in launch ``state``."""
        info = self.qmp("query-sev")
        problem = sev_info_problem(info, sev.effective_policy, emulated=sev.emulated,
                                   state=None if sev.snp else state, snp=sev.snp)
        if problem:
            raise LaunchError(f"SEV is not active as asked: {problem}", None, self.command,
                              self._stderr_text())
        self.log.info("SEV active: %s %#x, state %s%s", "snp-policy" if sev.snp else "policy",
                      info["snp-policy" if sev.snp else "policy"], info.get("state"),
                      " (emulated)" if sev.emulated else "")

    # ------------------------------------------------------------ QMP

    def qmp(self, command: str, arguments: Mapping[str, object] | None = None, *,
            timeout: float | None = None) -> Any:
        """Run a QMP command; its ``return`` value, or :class:`QmpError`."""
        if self._qmp is None:
            raise QmpError(f"QMP {command}: {self.name} is not connected")
        return self._qmp.execute(command, arguments,
                                 self.qmp_timeout if timeout is None else timeout)

    def send_frames(self, frames: Sequence[bytes]) -> int:
        """Send Ethernet frames to the adversary NIC (``adversary-nic``); how
        many QEMU took. A frame QEMU's socket refuses is not retried."""
        if self._nic_sock is None:
            raise UsageError(f"{self.name}: no adversary-nic to send frames to")
        sent = 0
        for frame in frames:
            try:
                self._nic_sock.send(frame)
                sent += 1
            except OSError as exc:
                self.log.warning("frame to the adversary NIC not sent: %s", exc)
        return sent

    def wait_event(self, names: str | Sequence[str], timeout: float = 30.0,
                   match: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Wait for (and consume) the next QMP event of one of ``names``
        whose fields hold ``match`` (``{"data": {"guest": True}}``)."""
        if self._qmp is None:
            raise QmpError(f"{self.name} is not connected")
        wanted = [names] if isinstance(names, str) else list(names)
        return self._qmp.wait_event(wanted, timeout, match)

    def status(self) -> str:
        """The run state from ``query-status`` ("running", "paused", ...)."""
        return str(self.qmp("query-status")["status"])

    # ----------------------------------------------------------- dump

    def dump(self, path: Path | None = None, timeout: float = 300.0) -> Path:
        """Stop the guest and write its memory as an ELF core (``paging=false``).

        The guest stays stopped. :returns: the dump's path.
        :raises QmpError: the dump failed or missed the deadline.
        """
        target = (path or self.artifacts / "memory.elf").absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        landed = self.runner.landing(target)
        self.qmp("stop")
        # QEMU 7.2: synchronous unless "detach" is given.
        self.qmp("dump-guest-memory", {"paging": False, "protocol": f"file:{landed}"},
                 timeout=timeout)
        self.runner.fetch(landed, target)
        self.log.info("memory dump %s (%d bytes) in %.2f s", target,
                      target.stat().st_size, time.monotonic() - started)
        return target

    # ------------------------------------------------------- shutdown

    def wait(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself; its exit status."""
        if self.process is None:
            raise QmpError(f"{self.name}: not launched")
        try:
            self.exitcode = self.process.wait(timeout)
        except TimeoutError as exc:
            raise QmpError(f"{self.name}: QEMU still runs after {timeout:g} s") from exc
        return self.exitcode

    def request_quit(self) -> None:
        """Send QMP ``quit`` without waiting for QEMU to end, so that work
        that needs only what the guest wrote overlaps QEMU's exit;
        :meth:`shutdown` then waits for it. A QEMU that ended by itself is
        :attr:`abnormal` from here. Sent once, however often called."""
        if not self._closed:
            self._quit()

    def _quit(self) -> None:
        """Note a QEMU that ended by itself, else send ``quit`` (once)."""
        if self._quit_requested:
            return
        self._quit_requested = True
        ended = self.process.poll() if self.process is not None else None
        if ended is not None and ended != 0:
            self.abnormal = f"it ended by itself before the shutdown: {self.ended()}"
        if self._qmp is not None and self.is_running():
            try:
                self._qmp.execute("quit", None, 3.0)
            except QmpError as exc:
                # QEMU may close QMP before its reply: its exit says how it went
                self.log.debug("quit: %s", exc)

    def shutdown(self, timeout: float = 10.0) -> None:
        """QMP ``quit`` (unless :meth:`request_quit` sent it), wait, then
        kill; close everything; the runner removes what the run left.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._quit()
            if self.process is not None:
                try:
                    self.exitcode = self.process.wait(timeout)
                except TimeoutError:
                    self.abnormal = f"it did not quit in {timeout:g} s and was killed"
                    self.log.warning("QEMU did not quit in %g s: killing it", timeout)
                    self.process.kill()
                    self.exitcode = self.process.poll()
        finally:
            if self.process is not None:
                self.process.kill()
                if self.exitcode is None:
                    self.exitcode = self.process.poll()
            if self._qmp is not None:
                self._qmp.close()
            for console in (self._serial, self._debugcon):
                if console is not None:
                    console.close()
            if self._transcript is not None:
                self._transcript.close()
            if self._serial_sock is not None:
                self._serial_sock.close()
            if self._nic_sock is not None:
                self._nic_sock.close()
            self.runner.close()
            if self.exitcode is not None:
                self.log.info("QEMU exited with status %s", self.exitcode)
