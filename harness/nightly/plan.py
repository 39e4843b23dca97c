"""The nightly plan: a TOML file of hosts, firmware and scenarios.

::

    name = "lab"                  # runs of one name are compared with each other
    slower = 0.25                 # a case is slower when its boot-to-park time
    window = 5                    #   exceeds the median of its last 5 by 25 %

    [[host]]
    name = "here"
    where = "local"               # or "ssh://root@sevhost[:22]"
    # qemu, known_hosts, host_key, identity: as for ``boot --host``

    [[firmware]]
    name = "series"
    build = "series"              # the patched firmware (built or from the cache)
    # edk2 = "2022.11"            # with build: the baseline (default 2025.02)
    # variant = "PATCH"           # the series plus one test patch
    # dir = "DIR"                 # a published firmware directory

    [[scenario]]
    name = "callback-d2"
    ebs_mode = "callback"
    requeue_depth = 2
    sev = ["off", "emulated", "emulated-es", "emulated-snp"]   # each a case
    accel = ["auto"]

A case is one host, firmware, scenario, SEV mode and accelerator: its key
``host/firmware/scenario/sev/accel`` names it in the history and reports.
Relative paths are relative to the plan file.
"""

from __future__ import annotations

import hashlib
import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import scenario
from harness.build import edk2
from harness.errors import UsageError

HOST_KEYS = {"name", "where", "qemu", "known_hosts", "host_key", "identity"}
FIRMWARE_KEYS = {"name", "build", "variant", "dir", "edk2"}
SCENARIO_KEYS = {"name", "ebs_mode", "requeue_depth", "devices", "leak_mapping",
                 "stale_mapkey", "dump", "memory_mib", "timeout", "sev", "accel"}


@dataclass(frozen=True)
class Host:
    name: str
    where: str = "local"
    qemu: str | None = None
    known_hosts: Path | None = None
    host_key: str | None = None
    identity: Path | None = None

    @property
    def local(self) -> bool:
        return self.where == "local"


@dataclass(frozen=True)
class FirmwareSpec:
    """``build = "series"`` (on ``edk2``, default the default baseline),
    ``variant = PATCH`` or ``dir = DIR``."""

    name: str
    kind: str
    path: Path | None = None
    edk2: str | None = None


@dataclass(frozen=True)
class Case:
    host: Host
    firmware: FirmwareSpec
    name: str
    scenario: scenario.Scenario

    @property
    def key(self) -> str:
        return f"{self.host.name}/{self.firmware.name}/{self.name}/{self.scenario.sev}/{self.scenario.accel}"


@dataclass(frozen=True)
class Plan:
    path: Path
    name: str
    slower: float
    window: int
    hosts: tuple[Host, ...]
    firmware: tuple[FirmwareSpec, ...]
    cases: tuple[Case, ...]
    digest: str


def _table(data: dict[str, Any], key: str, what: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value) or not value:
        raise UsageError(f"{what}: needs at least one [[{key}]] table")
    return value


def _check_keys(entry: dict[str, Any], allowed: set[str], what: str) -> str:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise UsageError(f"{what}: unknown key(s) {', '.join(unknown)} (known: "
                         f"{', '.join(sorted(allowed))})")
    name = entry.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise UsageError(f"{what}: needs a name without '/'")
    return name


def _path(base: Path, value: Any, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{what}: a path string")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def load_plan(path: Path) -> Plan:
    """Read and check ``path``; every problem is one :class:`UsageError` line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--plan {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--plan {path}: not TOML: {exc}") from exc
    base = path.resolve().parent
    unknown = sorted(set(data) - {"name", "slower", "window", "host", "firmware", "scenario"})
    if unknown:
        raise UsageError(f"--plan {path}: unknown key(s) {', '.join(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise UsageError(f"--plan {path}: needs name = \"...\" (runs of one name are compared)")
    slower = data.get("slower", 0.25)
    window = data.get("window", 5)
    if not isinstance(slower, (int, float)) or slower <= 0:
        raise UsageError(f"--plan {path}: slower = {slower!r}: a positive fraction")
    if not isinstance(window, int) or window < 1:
        raise UsageError(f"--plan {path}: window = {window!r}: a positive count of runs")
    hosts = tuple(_host(entry, base, f"{path}: host #{n}")
                  for n, entry in enumerate(_table(data, "host", str(path)), 1))
    firmware = tuple(_firmware(entry, base, f"{path}: firmware #{n}")
                     for n, entry in enumerate(_table(data, "firmware", str(path)), 1))
    scenarios = [_scenarios(entry, f"{path}: scenario #{n}")
                 for n, entry in enumerate(_table(data, "scenario", str(path)), 1)]
    for kind, names in (("host", [h.name for h in hosts]),
                        ("firmware", [f.name for f in firmware]),
                        ("scenario", [s[0] for s in scenarios])):
        if len(names) != len(set(names)):
            raise UsageError(f"{path}: two {kind} tables share a name")
    cases = tuple(Case(host, fw, name, chosen)
                  for host, fw, (name, variants) in itertools.product(hosts, firmware, scenarios)
                  for chosen in variants)
    return Plan(path, name, float(slower), window, hosts, firmware, cases,
                hashlib.sha256(raw).hexdigest()[:16])


def _host(entry: dict[str, Any], base: Path, what: str) -> Host:
    name = _check_keys(entry, HOST_KEYS, what)
    where = entry.get("where", "local")
    if not isinstance(where, str) or not (where == "local" or where.startswith("ssh://")):
        raise UsageError(f"{what} ({name}): where = {where!r}: \"local\" or \"ssh://...\"")
    known = entry.get("known_hosts")
    identity = entry.get("identity")
    host = Host(name, where, entry.get("qemu"),
                None if known is None else _existing(base, known, f"{what} known_hosts"),
                entry.get("host_key"),
                None if identity is None else _existing(base, identity, f"{what} identity"))
    if not host.local:
        from harness.vm.remote import RemoteHost
        try:
            RemoteHost.parse(where)
        except UsageError as exc:
            raise UsageError(f"{what} ({name}): {exc}") from exc
    return host


def _existing(base: Path, value: Any, what: str) -> Path:
    path = _path(base, value, what)
    if not path.exists():
        raise UsageError(f"{what}: {path} does not exist")
    return path


def _firmware(entry: dict[str, Any], base: Path, what: str) -> FirmwareSpec:
    name = _check_keys(entry, FIRMWARE_KEYS, what)
    given = [k for k in ("build", "variant", "dir") if k in entry]
    if len(given) != 1:
        raise UsageError(f"{what} ({name}): exactly one of build = \"series\", variant = PATCH, "
                         "dir = DIR")
    kind = given[0]
    if kind == "build":
        if entry["build"] != "series":
            raise UsageError(f"{what} ({name}): build = {entry['build']!r}: only \"series\"")
        baseline = entry.get("edk2")
        if baseline is not None and baseline not in edk2.BASELINES:
            raise UsageError(f"{what} ({name}): edk2 = {baseline!r}: one of "
                             f"{', '.join(edk2.BASELINES)}")
        return FirmwareSpec(name, "series", edk2=baseline)
    if "edk2" in entry:
        raise UsageError(f"{what} ({name}): edk2 goes with build = \"series\" (a variant is "
                         f"written for {edk2.VARIANT_BASELINE}, or for the baseline its "
                         "directory names, edk2-VERSION/)")
    return FirmwareSpec(name, kind, _existing(base, entry[kind], f"{what} {kind}"))


def _scenarios(entry: dict[str, Any], what: str) -> tuple[str, list[scenario.Scenario]]:
    name = _check_keys(entry, SCENARIO_KEYS, what)
    options = {k: v for k, v in entry.items() if k not in ("name", "sev", "accel")}
    sevs = entry.get("sev", ["off"])
    accels = entry.get("accel", ["auto"])
    sevs = [sevs] if isinstance(sevs, str) else sevs
    accels = [accels] if isinstance(accels, str) else accels
    if not sevs or not accels:
        raise UsageError(f"{what} ({name}): sev and accel need at least one value")
    if "devices" in options:
        devices = options["devices"]
        options["devices"] = (devices,) if isinstance(devices, str) else tuple(devices)
    out = []
    for sev, accel in itertools.product(sevs, accels):
        try:
            out.append(scenario.Scenario(sev=sev, accel=accel, **options))
        except (UsageError, TypeError) as exc:
            raise UsageError(f"{what} ({name}): {exc}") from exc
    return name, out
