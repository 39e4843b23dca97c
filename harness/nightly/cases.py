"""The plan's cases as pytest items, for pytest-xdist to run one worker per
host (``--dist loadgroup``, a group per host): the scheduling is pytest's.

Loaded with ``-p harness.nightly.cases`` by ``ebs-harness nightly``; the
plan file is the one path collected. Each item boots its case, records the
result in the history (its own transaction) and then passes, fails (a
verdict), errors (the environment) or skips with the reason it could not
run, which the history and the report carry too.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
import pytest

from harness import scenario
from harness.build import edk2, qemu
from harness.errors import ConsoleFailure, ConsoleTimeout, HarnessError, SettingError
from harness.memo import Memo
from harness.nightly.history import History, Result
from harness.nightly.plan import Case, FirmwareSpec, Host, load_plan
from harness.vm import host as hostcaps
from harness.vm.sev import MODES

#: What reaching a host can fail with besides the harness's own errors: the
#: network and SSH.
_HOST_ERRORS: tuple[type[Exception], ...] = (HarnessError, OSError, EOFError,
                                             paramiko.SSHException)


@dataclass
class Worker:
    """What one worker (or the runner's own process) keeps across its
    cases: each host reached once, each firmware built once, the history."""

    hosts: Memo[tuple[str, bool], _Place] = field(
        default_factory=lambda: Memo(keeps=_HOST_ERRORS))
    firmware: Memo[str, edk2.Firmware] = field(
        default_factory=lambda: Memo(keeps=(HarnessError,)))
    history: History | None = None

    def close(self) -> None:
        """Close the history and the SSH sessions."""
        if self.history is not None:
            self.history.close()
        for place in self.hosts.values():
            if place.session is not None:
                try:
                    place.session.close()
                except OSError:
                    pass     # closing at the end; nothing to save


_WORKER = pytest.StashKey[Worker]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ebs-nightly", "ebs-harness nightly (set by the runner)")
    group.addoption("--ebs-nightly-plan")
    group.addoption("--ebs-nightly-history")
    group.addoption("--ebs-nightly-run", type=int)
    group.addoption("--ebs-nightly-artifacts")


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist registers it, but with one host the runner leaves xdist out
    config.addinivalue_line("markers", "xdist_group(name): the cases of one host, one worker")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Close what this worker (or this process) opened: the history, SSH sessions."""
    worker = session.config.stash.get(_WORKER, None)
    if worker is not None:
        worker.close()


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.File | None:
    if str(file_path) == parent.config.getoption("--ebs-nightly-plan"):
        return PlanFile.from_parent(parent, path=file_path)
    return None


class PlanFile(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        for case in load_plan(self.path).cases:
            item = CaseItem.from_parent(self, name=case.key, case=case)
            item.add_marker(pytest.mark.xdist_group(case.host.name))
            yield item


class CaseFailed(Exception):
    """A verdict failed (the firmware's doing)."""


class CaseItem(pytest.Item):
    def __init__(self, *, case: Case, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case

    def runtest(self) -> None:
        config = self.config
        worker = config.stash.setdefault(_WORKER, Worker())
        result = run_case(self.case, Path(config.getoption("--ebs-nightly-artifacts")), worker)
        if worker.history is None:
            worker.history = History(Path(config.getoption("--ebs-nightly-history")))
        worker.history.record(config.getoption("--ebs-nightly-run"), result)
        if result.status == "fail":
            raise CaseFailed(f"{', '.join(result.violations)}  (artifacts {result.artifacts})")
        if result.status == "error":
            raise HarnessError(result.reason)
        if result.status == "not-run":
            pytest.skip(f"not run: {result.reason}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        return f"{self.case.key}: {excinfo.value}"

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.case.key


# ------------------------------------------------------------- running


def run_case(case: Case, artifacts_root: Path, worker: Worker | None = None) -> Result:
    """Boot one case and judge it; never raises for the host or the firmware.

    The harness's own errors and the host's are the case's result (not run,
    or an error naming them); anything else is a bug of ours: an error whose
    reason says so and names the traceback kept in the case's artifacts."""
    worker = worker or Worker()
    base = Result(case.key, case.host.name, case.firmware.name, case.name, case.scenario.sev,
                  case.scenario.accel, "error")
    artifacts = artifacts_root / case.key.replace("/", "_")
    try:
        return _run_case(case, artifacts, worker, base)
    except Exception as exc:  # noqa: BLE001 - a bug of ours: kept, never a firmware verdict
        saved = _save_traceback(artifacts)
        return dataclasses.replace(base, reason=f"internal error ({type(exc).__name__}: "
                                                f"{_line(exc)}); a bug of ebs-harness, "
                                                f"traceback in {saved}")


def _run_case(case: Case, artifacts: Path, worker: Worker, base: Result) -> Result:
    try:
        place = _host(worker, case.host, case.scenario.sev)
    except _HOST_ERRORS as exc:
        return dataclasses.replace(base, status="not-run",
                                   reason=f"host {case.host.name} unreachable: {_line(exc)}")
    caps, launcher, kernel = place.caps, place.launcher, place.kernel
    try:
        scenario.check_host(case.scenario, caps)
    except HarnessError as exc:
        return dataclasses.replace(base, status="not-run", reason=_line(exc), kernel=kernel,
                                   qemu_version=caps.qemu_version)
    try:
        firmware = worker.firmware.get(case.firmware.name, lambda: _firmware(case.firmware))
    except HarnessError as exc:     # a firmware that cannot be had: every case's error
        return dataclasses.replace(base, reason=f"firmware {case.firmware.name}: {_line(exc)}")
    base = dataclasses.replace(base, firmware_key=firmware.key,
                               baseline=str(firmware.manifest.get("source", "")),
                               qemu_version=caps.qemu_version, kernel=kernel,
                               artifacts=str(artifacts))
    try:
        scenario.check_firmware(case.scenario, firmware)
    except SettingError as exc:     # this firmware does not boot in the case's SEV mode
        return dataclasses.replace(base, status="not-run", reason=_line(exc))
    try:
        run = scenario.run_scenario(firmware, case.scenario, artifacts, caps=caps,
                                    launcher=launcher)
    except (ConsoleFailure, ConsoleTimeout) as exc:
        # QEMU ran: the firmware crashed (an ASSERT, a CPU exception) or hung
        return dataclasses.replace(base, status="fail", reason=_line(exc),
                                   violations=("boot: crash" if isinstance(exc, ConsoleFailure)
                                               else "boot: no park",))
    except _HOST_ERRORS as exc:     # QEMU or the host failed: recorded, not raised
        return dataclasses.replace(base, reason=_line(exc))
    return dataclasses.replace(base, status="pass" if run.passed else "fail",
                               violations=tuple(sorted(run.failed_checks())),
                               boot_seconds=run.park_seconds)


def _save_traceback(artifacts: Path) -> Path:
    """The exception being handled, written into the case's artifacts."""
    path = artifacts / "traceback.txt"
    try:
        artifacts.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback.format_exc())
    except OSError:
        return Path("(not kept: the artifacts directory is not writable)")
    return path


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(frozen=True)
class _Place:
    """A host as a worker reaches it: capabilities, a machine launcher, its
    kernel, and the SSH session to close at the end (None here)."""

    caps: hostcaps.HostCaps
    launcher: Any
    kernel: str
    session: Any = None


def _host(worker: Worker, spec: Host, sev: str) -> _Place:
    """The host, once per worker (and per QEMU: the emulated SEV runs on the
    harness's own, here)."""
    emulated = sev != "off" and MODES[sev].emulated

    def reach() -> _Place:
        if spec.local:
            binary = spec.qemu or hostcaps.DEFAULT_QEMU
            if emulated and spec.qemu is None:
                binary = str(qemu.build_qemu().output.binary)
            from harness.vm.machine import QemuMachine
            return _Place(hostcaps.cached_probe(binary), QemuMachine, os.uname().release)
        from harness.vm import remote
        where = remote.RemoteHost.parse(spec.where, qemu=spec.qemu or hostcaps.DEFAULT_QEMU,
                                        known_hosts=spec.known_hosts,
                                        host_key=spec.host_key, identity=spec.identity)
        session = where.connect(timeout=30)
        caps = remote.remote_caps(session, where.qemu)
        kernel = session.run("uname -r", timeout=30)[1].strip()
        return _Place(caps, where.launcher(session), kernel, session)
    return worker.hosts.get((spec.name, spec.local and emulated), reach)


def _firmware(spec: FirmwareSpec) -> edk2.Firmware:
    if spec.kind == "series":
        return edk2.build_firmware(baseline=edk2.baseline_named(spec.edk2)).output
    assert spec.path is not None
    if spec.kind == "variant":
        return edk2.build_variant(spec.path).output
    return edk2.Firmware.load(spec.path)
