"""pytest plugin: the harness's options, markers and fixtures, kept thin.

Installed with the package (entry point ``pytest11``: ``ebs_harness``), so
any project's suite can use it without a ``conftest.py``. Every option is in
one group (``ebs-harness``) and has an ini key and an environment variable,
so a nightly job can set it without editing argv:

==============================  ======================  ==============================
option                          ini                     environment
==============================  ======================  ==============================
``--ebs-firmware DIR``          ``ebs_firmware``        ``EBS_HARNESS_FIRMWARE``
``--ebs-edk2 VERSION``          ``ebs_edk2``            ``EBS_HARNESS_EDK2``
``--ebs-edk2-src DIR``          ``ebs_edk2_src``        ``EBS_HARNESS_EDK2_SRC``
``--ebs-rebuild``               ``ebs_rebuild``         ``EBS_HARNESS_REBUILD=1``
``--ebs-accel auto|tcg|kvm``    ``ebs_accel``           ``EBS_HARNESS_ACCEL``
``--ebs-qemu BINARY``           ``ebs_qemu``            ``EBS_HARNESS_QEMU``
``--ebs-keep-artifacts``        ``ebs_keep_artifacts``  ``EBS_HARNESS_KEEP_ARTIFACTS=1``
``--ebs-require CAPS``          ``ebs_require``         ``EBS_HARNESS_REQUIRE``
==============================  ======================  ==============================

Markers (:data:`MARKERS`: ``tcg``, ``kvm``, ``sev``, ``sev_es``, ``snp``,
``sev_emulated``, ``sev_es_emulated``, ``snp_emulated``) say what a test needs; the host probe
(:mod:`harness.vm.host`, once per session) decides, and a test whose
capability is missing is skipped with the probe's reason.

Fixtures, all ``ebs_*``: ``ebs_firmware`` (the patched OVMF of the chosen
edk2 baseline, built once per session), ``ebs_baseline_firmware`` (a
function: the patched OVMF of any baseline, by name, built once per
session), ``ebs_run_probe`` (boot a :class:`~harness.scenario.Scenario` and
get its verdicts), ``ebs_host_caps``, ``ebs_accel``, ``ebs_qemu_binary``,
``ebs_artifacts`` (a per-test directory kept when the test fails) and
``ebs_linux_image``. They build objects from :mod:`harness` and clean up;
the logic lives in the modules, not here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import linux, scenario
from harness.analysis import report as timeline_report
from harness.build import edk2, qemu
from harness.build.progress import StderrProgress
from harness.errors import HarnessError
from harness.memo import Memo
from harness.vm import host
from harness.vm.sev import MODES

_OPTIONS: list[tuple[str, str, str, str, bool]] = [
    # (option, ini, env, help, is_flag)
    ("--ebs-firmware", "ebs_firmware", "EBS_HARNESS_FIRMWARE",
     "a prebuilt firmware directory (from `ebs-harness build`): skip the build", False),
    ("--ebs-edk2", "ebs_edk2", "EBS_HARNESS_EDK2",
     "the edk2 baseline the series is built on (default 2025.02)", False),
    ("--ebs-edk2-src", "ebs_edk2_src", "EBS_HARNESS_EDK2_SRC",
     "an edk2 tree to build instead of Debian's source package", False),
    ("--ebs-rebuild", "ebs_rebuild", "EBS_HARNESS_REBUILD",
     "rebuild the firmware even when the cache has it", True),
    ("--ebs-accel", "ebs_accel", "EBS_HARNESS_ACCEL",
     "accelerator for the guests: auto (KVM where the probe proved it), tcg, kvm", False),
    ("--ebs-qemu", "ebs_qemu", "EBS_HARNESS_QEMU",
     "the QEMU binary (default qemu-system-x86_64), e.g. a newer one for SNP", False),
    ("--ebs-keep-artifacts", "ebs_keep_artifacts", "EBS_HARNESS_KEEP_ARTIFACTS",
     "keep every test's VM artifacts (default: only a failed test's)", True),
    ("--ebs-require", "ebs_require", "EBS_HARNESS_REQUIRE",
     ("comma-separated capabilities (tcg,kvm,sev,sev_es) whose absence fails a test "
     "instead of skipping it: a nightly SEV host that lost SEV is broken"), False),
]

_METAVARS = {"--ebs-accel": "auto|tcg|kvm", "--ebs-qemu": "BINARY", "--ebs-require": "CAPS",
             "--ebs-edk2": "VERSION"}

#: marker -> what it needs (registered in pytest_configure).
MARKERS = {
    "tcg": "the test boots QEMU under TCG (skipped if the host probe says TCG is unusable)",
    "kvm": "the test needs usable KVM (proven by booting firmware; skipped otherwise)",
    "sev": "the test needs an AMD SEV host (kvm_amd sev=1, /dev/sev, QEMU sev-guest)",
    "sev_es": "the test needs an AMD SEV-ES host (kvm_amd sev_es=1 on top of SEV)",
    "snp": "the test needs an AMD SEV-SNP host and a QEMU >= 9.1 (--ebs-qemu)",
    "sev_emulated": ("the test runs under the emulated SEV of the harness's QEMU (built once "
                     "per session, cached); a QEMU without it fails the test"),
    "sev_es_emulated": ("the test runs under the emulated SEV-ES of the harness's QEMU (built "
                        "once per session, cached); a QEMU without it fails the test"),
    "snp_emulated": ("the test runs under the emulated SEV-SNP of the harness's QEMU (built "
                     "once per session, cached); a QEMU without it fails the test"),
}
#: The markers of the emulations: the harness's QEMU has them, or it is broken.
EMULATED_MARKERS = tuple(mode.capability for mode in MODES.values() if mode.emulated)

_SETTINGS = pytest.StashKey["Settings"]()
_HOST_CAPS = pytest.StashKey[host.HostCaps]()
_EMULATED_CAPS = pytest.StashKey[Memo[str, host.HostCaps]]()
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
_ARTIFACTS = pytest.StashKey[Path]()
_RUNS = pytest.StashKey[list[scenario.RunResult]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ebs-harness", "ovmf-ebs-harness")
    for option, ini, env, text, is_flag in _OPTIONS:
        if is_flag:
            group.addoption(option, action="store_true", default=None,
                            help=f"{text} (ini {ini}, env {env})")
            parser.addini(ini, text, type="bool", default=False)
        else:
            group.addoption(option, metavar=_METAVARS.get(option, "DIR"), default=None,
                            help=f"{text} (ini {ini}, env {env})")
            parser.addini(ini, text, default="")


def _raw(config: pytest.Config, option: str, ini: str, env: str,
         is_flag: bool) -> tuple[str | bool | None, str]:
    """One option's value and where it came from: the command line, then
    the environment, then the ini file, else the default."""
    value = config.getoption(option.lstrip("-").replace("-", "_"))
    if value is not None:
        return (bool(value) if is_flag else str(value)), f"command line {option}"
    if env in os.environ:
        raw = os.environ[env]
        return (raw not in ("", "0", "false", "no") if is_flag else raw), f"env {env}"
    ini_value = config.getini(ini)
    if ini_value:
        return (bool(ini_value) if is_flag else str(ini_value)), f"ini {ini}"
    return None, "default"


@dataclass(frozen=True)
class Settings:
    """The plugin's settings, resolved and checked once at configure.

    :param sources: each setting's source (``command line --ebs-accel``,
        ``env EBS_HARNESS_ACCEL``, ``ini ebs_accel``, ``default``), for
        errors and the report header.
    """

    firmware: str | None
    baseline: edk2.Baseline
    edk2_src: str | None
    rebuild: bool
    accel: str
    qemu: str
    keep_artifacts: bool
    require: frozenset[str]
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def resolve(cls, config: pytest.Config) -> Settings:
        """:raises pytest.UsageError: a value refused, naming its source."""
        raw: dict[str, str | bool | None] = {}
        sources: dict[str, str] = {}
        for option, ini, env, _text, is_flag in _OPTIONS:
            raw[ini], sources[ini] = _raw(config, option, ini, env, is_flag)

        def text(ini: str) -> str | None:
            value = raw[ini]
            return value if isinstance(value, str) and value else None

        def refuse(ini: str, reason: str) -> pytest.UsageError:
            return pytest.UsageError(f"ebs-harness: {ini} = {raw[ini]!r} (from "
                                     f"{sources[ini]}): {reason}")

        try:
            baseline = edk2.baseline_named(text("ebs_edk2"))
        except HarnessError as exc:
            raise refuse("ebs_edk2", str(exc)) from exc
        accel = text("ebs_accel") or "auto"
        if accel not in ("auto", "tcg", "kvm"):
            raise refuse("ebs_accel", "one of auto, tcg, kvm")
        require = frozenset(n for n in (text("ebs_require") or "").split(",") if n)
        if unknown := require - set(MARKERS):
            raise refuse("ebs_require", f"unknown {', '.join(sorted(unknown))}; one of "
                                        f"{', '.join(MARKERS)}")
        return cls(firmware=text("ebs_firmware"), baseline=baseline,
                   edk2_src=text("ebs_edk2_src"), rebuild=bool(raw["ebs_rebuild"]),
                   accel=accel, qemu=text("ebs_qemu") or host.DEFAULT_QEMU,
                   keep_artifacts=bool(raw["ebs_keep_artifacts"]), require=require,
                   sources=sources)

    def header(self) -> str:
        """One line: what this session builds and runs on, and why."""
        def given(ini: str) -> str:
            return "" if self.sources[ini] == "default" else f" ({self.sources[ini]})"
        firmware = (f"firmware {self.firmware}{given('ebs_firmware')}" if self.firmware else
                    f"firmware: edk2 {self.baseline.name}{given('ebs_edk2')} with the series, "
                    "built once per session")
        return (f"ebs-harness: {firmware}; qemu {self.qemu}{given('ebs_qemu')}; accel "
                f"{self.accel}{given('ebs_accel')}; require "
                f"{','.join(sorted(self.require)) or 'nothing'}{given('ebs_require')}")


def settings(config: pytest.Config) -> Settings:
    """The session's :class:`Settings` (resolved at configure)."""
    if _SETTINGS not in config.stash:        # a plugin loaded after configure
        config.stash[_SETTINGS] = Settings.resolve(config)
    return config.stash[_SETTINGS]


def pytest_report_header(config: pytest.Config) -> str:
    return settings(config).header()


@pytest.fixture(scope="session")
def ebs_firmware(pytestconfig: pytest.Config) -> Iterator[edk2.Firmware]:
    """The patched OVMF: a prebuilt ``--ebs-firmware`` dir, or built (cached)."""
    chosen = settings(pytestconfig)
    if chosen.firmware:
        yield edk2.Firmware.load(chosen.firmware)
        return
    result = edk2.build_firmware(
        source=edk2.source_from_option(chosen.edk2_src, chosen.baseline),
        baseline=chosen.baseline, rebuild=chosen.rebuild, progress=StderrProgress())
    yield result.output


def session_baseline(config: pytest.Config) -> edk2.Baseline:
    """``--ebs-edk2`` (its ini key, its variable), else the default baseline."""
    return settings(config).baseline


@pytest.fixture(scope="session")
def ebs_baseline_firmware() -> Callable[[str], edk2.Firmware]:
    """``get(VERSION)``: the patched OVMF of that edk2 baseline from Debian's
    source (built or from the cache, once per session), for tests that run a
    scenario on every baseline."""
    built: dict[str, edk2.Firmware] = {}

    def get(name: str) -> edk2.Firmware:
        if name not in built:
            built[name] = edk2.build_firmware(baseline=edk2.baseline_named(name),
                                              progress=StderrProgress()).output
        return built[name]
    return get


@pytest.fixture(scope="session")
def ebs_linux_image() -> linux.LinuxImage:
    """The Linux guest (guests/linux): kernel, initramfs, pinned host key (cached)."""
    return linux.build_image()


# ------------------------------------------------- host, markers, artifacts


#: Says how long, not what a test needs: deselected unless ``-m`` names it.
ZOO_MARKER = ("zoo: the whole device zoo, each device alone with the adversary "
              "(deselected unless -m names zoo; the nightly runs -m zoo)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SETTINGS] = Settings.resolve(config)
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    config.addinivalue_line("markers", ZOO_MARKER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``zoo`` (the whole device zoo, minutes long) run only when
    ``-m`` names them; otherwise they are deselected, and pytest's summary
    counts them."""
    if "zoo" in (config.option.markexpr or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("zoo") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("zoo") is None]


def session_host_caps(config: pytest.Config) -> host.HostCaps:
    """The host probe, run once per session (per xdist worker)."""
    if _HOST_CAPS not in config.stash:
        config.stash[_HOST_CAPS] = host.cached_probe(settings(config).qemu)
    return config.stash[_HOST_CAPS]


def session_emulated_caps(config: pytest.Config) -> host.HostCaps:
    """The harness's QEMU (built or from the cache) and its probe, once per
    session: a build that failed fails every test that needs it with the same
    error, without building again."""
    def make() -> host.HostCaps:
        built = qemu.build_qemu(progress=StderrProgress())
        # its emulated SEV runs under TCG: KVM is not asked of it
        return host.cached_probe(str(built.output.binary), tcg_only=True)
    memo = config.stash.setdefault(_EMULATED_CAPS, Memo(keeps=(HarnessError,)))
    return memo.get("emulated", make)


def pytest_runtest_setup(item: pytest.Item) -> None:
    needed = [name for name in MARKERS if item.get_closest_marker(name) is not None]
    if not needed:
        return
    for name in [name for name in needed if name in EMULATED_MARKERS]:
        needed.remove(name)
        emulated = session_emulated_caps(item.config).capability(name)
        if not emulated.available:
            # The session built this QEMU itself: no emulation is a bug, not a host's lack.
            pytest.fail(f"the harness's QEMU lacks {name}: {emulated.reason}", pytrace=False)
        baseline = settings(item.config).baseline.name
        for mode in MODES.values():
            why = mode.stops(baseline) if mode.capability == name else None
            if why is not None:     # the session's firmware, not the host, lacks it
                pytest.skip(f"{name}: {why}")
    if not needed:
        return
    caps = session_host_caps(item.config)
    chosen = settings(item.config)
    for name in needed:
        cap = caps.capability(name)
        if cap.available:
            continue
        if name in chosen.require:
            pytest.fail(f"{name} is required ({chosen.sources['ebs_require']}), but this host "
                        f"lacks it: {cap.reason}", pytrace=False)
        pytest.skip(f"needs {name}: {cap.reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    if report.failed and _ARTIFACTS in item.stash:
        report.sections.append(("ebs-harness artifacts", str(item.stash[_ARTIFACTS])))
    if report.when == "call":
        _html_extras(item, report)


@pytest.fixture(scope="session")
def ebs_host_caps(pytestconfig: pytest.Config) -> host.HostCaps:
    """What this host can run (:class:`harness.vm.host.HostCaps`), probed once."""
    return session_host_caps(pytestconfig)


@pytest.fixture(scope="session")
def ebs_qemu_binary(pytestconfig: pytest.Config) -> str:
    """``--ebs-qemu``: the QEMU binary the guests run on."""
    return settings(pytestconfig).qemu


@pytest.fixture(scope="session")
def ebs_accel(pytestconfig: pytest.Config) -> str:
    """``--ebs-accel`` resolved: ``auto`` is KVM only where the probe proved it."""
    return host.resolve_accel(settings(pytestconfig).accel, session_host_caps(pytestconfig))


@pytest.fixture
def ebs_artifacts(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A per-test directory for VM artifacts (give it to ``QemuMachine``).

    Kept when the test fails (its path is in the failure report) or with
    ``--ebs-keep-artifacts``; removed otherwise.
    """
    name = re.sub(r"[^\w.-]+", "_", request.node.name)[:60]
    path = tmp_path_factory.mktemp(f"artifacts-{name}", numbered=True)
    request.node.stash[_ARTIFACTS] = path
    yield path
    reports = request.node.stash.get(_REPORTS, {})
    failed = any(report.failed for report in reports.values())
    if failed or settings(request.config).keep_artifacts:
        print(f"ebs-harness artifacts: {path}")
        return
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------ scenarios


@pytest.fixture
def ebs_run_probe(request: pytest.FixtureRequest, ebs_firmware: edk2.Firmware,
              ebs_host_caps: host.HostCaps, ebs_accel: str, ebs_artifacts: Path,
              record_property: Callable[[str, object], None],
              ) -> Callable[..., scenario.RunResult]:
    """Boot a :class:`~harness.scenario.Scenario` of the probe guest, on
    ``ebs_firmware`` or the ``firmware`` given.

    Records the run in the junit XML (firmware key, accelerator, SEV mode,
    QEMU version, artifact directory) and keeps its timeline for the HTML
    report of a failed test.
    """
    def run(chosen: scenario.Scenario,
            firmware: edk2.Firmware | None = None) -> scenario.RunResult:
        firmware = firmware or ebs_firmware
        caps = ebs_host_caps
        if chosen.sev != "off" and MODES[chosen.sev].emulated:
            caps = session_emulated_caps(request.config)
        elif chosen.sev == "off" and chosen.accel == "auto":
            chosen = dataclasses.replace(chosen, accel=ebs_accel)
        directory = ebs_artifacts / chosen.label()
        record_property("firmware_key", firmware.key)
        record_property("edk2", firmware.baseline)
        record_property("sev_mode", chosen.sev)
        record_property("qemu", caps.qemu)
        record_property("qemu_version", caps.qemu_version)
        record_property("artifacts", str(directory))
        result = scenario.run_scenario(firmware, chosen, directory, caps=caps)
        record_property("accel", result.accel)
        record_property("park_seconds", round(result.park_seconds, 3))
        request.node.stash.setdefault(_RUNS, []).append(result)
        return result

    return run


def _html_extras(item: pytest.Item, report: pytest.TestReport) -> None:
    """pytest-html: embed each run's timeline picture in a failed test's row."""
    runs = item.stash.get(_RUNS, [])
    if not runs or not report.failed:
        return
    try:
        from pytest_html import extras
    except ImportError:
        return
    found = list(getattr(report, "extras", []))
    for result in runs:
        svg = timeline_report.render_svg(result.log, result.judgement.symbolizer)
        found.append(extras.html(f"<p>{result.scenario.label()}: {result.artifacts}</p>{svg}"))
    report.extras = found  # type: ignore[attr-defined]
