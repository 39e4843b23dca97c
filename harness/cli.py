"""The ``ebs-harness`` command (the README's Usage and Exit statuses are its contract).

Exit status: 0 every verdict held; 1 a verdict failed; 2 bad input or usage
(one line on stderr); 3 the environment failed (QEMU would not start, a
timeout, a missing tool); 4 an internal error (a bug of ours: one line naming
the file that holds the traceback), never 1; 130 interrupted. Each
sub-command is a ``_cmd_*`` function that returns the status; errors from
:mod:`harness.errors` become one line and their ``exit_status`` here, in one
place. A command imports the analysis it runs: ``boot`` starts QEMU before
the verdicts' code is loaded, and loads it while the guest boots.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from harness import scenario
from harness.analysis import checks
from harness.build import cache, edk2
from harness.build.progress import StderrProgress
from harness.errors import (
    EXIT_ENVIRONMENT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VIOLATION,
    HarnessError,
    SettingError,
    TraceFormatError,
    UsageError,
)
from harness.vm import devices as vm_devices
from harness.vm import host, sev

if TYPE_CHECKING:
    from harness.analysis import symbols, trace
    from harness.build import qemu

LOG = logging.getLogger(__name__)


#: The layout of every ``--json`` object, in its ``schema`` key: bumped when
#: a key changes meaning or goes away (new keys do not bump it).
JSON_SCHEMA = 1

#: ``error.kind`` of a ``--json`` error object, by exit status.
ERROR_KINDS = {EXIT_USAGE: "usage", EXIT_ENVIRONMENT: "environment",
               EXIT_INTERNAL: "internal", EXIT_INTERRUPTED: "interrupted"}


def _print_json(obj: Mapping[str, Any]) -> None:
    json.dump({"schema": JSON_SCHEMA, **obj}, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _fail(command: str, status: int, message: str, json_mode: bool,
          detail: str = "", traceback: Path | None = None) -> int:
    """Report an error: one line on stderr (``detail`` below it), and in
    ``--json`` mode the same as a JSON object on stdout. Returns ``status``."""
    print(f"{command}: {message}", file=sys.stderr)
    if detail:
        print(detail, file=sys.stderr)
    if json_mode:
        error: dict[str, Any] = {"status": status, "kind": ERROR_KINDS.get(status, "error"),
                                 "message": message}
        if detail:
            error["detail"] = detail
        if traceback is not None:
            error["traceback"] = str(traceback)
        _print_json({"verdict": "error", "error": error})
    return status


def _writable(value: str, option: str, directory: bool = False) -> Path:
    """An output path the user named, proven writable before any work (exit
    2 if not): a directory is made now, a file's directory gets a trial file."""
    path = Path(value).expanduser().absolute()
    try:
        if directory:
            path.mkdir(parents=True, exist_ok=True)
        elif path.is_dir():
            raise UsageError(f"{option} {value}: is a directory")
        else:
            with tempfile.TemporaryFile(dir=path.parent):
                pass
    except OSError as exc:
        raise UsageError(f"{option} {value}: {exc.strerror or exc}") from exc
    return path


# --------------------------------------------------------------- build


def _cmd_build(args: argparse.Namespace) -> int:
    from harness.analysis import teardown_static

    progress = None if args.quiet else StderrProgress()
    baseline = edk2.baseline_named(args.edk2)
    result = edk2.build_firmware(
        source=edk2.source_from_option(args.edk2_src, baseline),
        baseline=baseline,
        rebuild=args.rebuild,
        progress=progress,
        flags=edk2.BuildFlags(debug_on_serial=args.debug_on_serial),
    )
    return _print_build(args, result.output.path, {
        "firmware_dir": str(result.output.path), "edk2": baseline.name,
        # C3S as the build recorded it (None: a build from before the check)
        "static_c3": result.output.manifest.get(teardown_static.MANIFEST_KEY)},
        result.output.key, result.cache_hit, result.seconds)


def _print_build(args: argparse.Namespace, path: Path, fields: Mapping[str, object], key: str,
                 cache_hit: bool, seconds: float) -> int:
    """What ``build`` and ``build-qemu`` print: ``path (built, 12.3 s)``, or JSON."""
    if args.json:
        _print_json({**fields, "cache_hit": cache_hit, "key": key,
                     "seconds": round(seconds, 3)})
    else:
        print(f"{path} ({'cache hit' if cache_hit else 'built'}, {seconds:.1f} s)")
    return EXIT_OK


def _cmd_build_qemu(args: argparse.Namespace) -> int:
    result = _build_qemu(args, rebuild=args.rebuild)
    return _print_build(args, result.output.binary, {"qemu": str(result.output.binary),
                                                   "qemu_dir": str(result.output.path)},
                        result.output.key, result.cache_hit, result.seconds)


def _build_qemu(args: argparse.Namespace, rebuild: bool = False) -> qemu.QemuBuildResult:
    from harness.build import qemu

    progress = None if args.quiet else StderrProgress()
    return qemu.build_qemu(rebuild=rebuild, progress=progress)


# ----------------------------------------------------------- host-check


def _cmd_host_check(args: argparse.Namespace) -> int:
    caps = host.fresh_probe(args.qemu or host.DEFAULT_QEMU)
    if args.json:
        _print_json(caps.to_json())
    else:
        print(f"QEMU     {caps.qemu} {caps.qemu_version}")
        for name in host.CAPABILITIES:
            cap = caps.capability(name)
            print(f"{name:12} {'yes' if cap.available else 'no ':3}  {cap.reason}")
        for what, geometry in (("SEV", caps.sev_geometry), ("emulated", caps.emulated_geometry)):
            if geometry is not None:
                print(f"{what:12} cbitpos {geometry.cbitpos}, "
                      f"reduced-phys-bits {geometry.reduced_phys_bits}")
        print(f"{'memlock':12} {'yes' if caps.memlock.available else 'no ':3}  "
              f"{caps.memlock.reason}")
    # Usable when at least one accelerator runs firmware.
    return EXIT_OK if caps.tcg.available or caps.kvm.available else EXIT_ENVIRONMENT


# ------------------------------------------------------------- analyze


def _firmware_dir(value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not (path / "modules").is_dir():
        raise UsageError(f"--firmware {value}: no modules/ directory with symbol files")
    return path


def _cmd_analyze_log(args: argparse.Namespace) -> int:
    from harness.analysis import trace

    with trace.gc_paused():
        return _analyze_log(args)


def _analyze_log(args: argparse.Namespace) -> int:
    from harness.analysis import devices, trace
    from harness.analysis.judgement import Judgement

    html = _writable(args.html, "--html") if args.html else None
    result, sym = trace.analyze_log(args.log, _firmware_dir(args.firmware))
    side = (devices.analyze_device_trace(args.device_trace, result.timeline.trace.events)
            if args.device_trace else None)
    judged = Judgement(result, sym, devices=side)
    if html is not None:
        html.write_text(judged.render_html(), encoding="utf-8")
    if args.json:
        _print_json(judged.log_json())
    else:
        sys.stdout.write(judged.render_text())
    return EXIT_OK if judged.passed else EXIT_VIOLATION


def _cmd_explain_log(args: argparse.Namespace) -> int:
    """Explain any OVMF log; the EBS verdicts too where it carries the trace.
    Exit 0 once explained: judging is ``analyze-log``'s."""
    from harness.analysis import explain, explain_render, report, trace
    from harness.analysis.judgement import Judgement

    html = _writable(args.html, "--html") if args.html else None
    firmware = _firmware_dir(args.firmware)
    with trace.gc_paused():
        explained = explain.explain_log(args.log, firmware)
        ebs: tuple[trace.LogReport, symbols.Symbolizer] | None = None
        ebs_error = ""
        if explained.traced:
            try:
                ebs = trace.analyze_log(args.log, firmware)
            except TraceFormatError as exc:
                ebs_error = str(exc)
    if html is not None:
        page = explain_render.render_html(explained)
        if ebs is not None:
            page += report.ebs_section_html(report.render_text(*ebs))
        html.write_text(page, encoding="utf-8")
    if args.json:
        _print_json({"explanation": explain_render.to_json(explained),
                     "ebs": Judgement(*ebs).log_json() if ebs is not None else None,
                     "ebs_error": ebs_error or None})
        return EXIT_OK
    sys.stdout.write(explain_render.render_text(explained))
    if ebs is not None:
        sys.stdout.write("\nExitBootServices trace (the analyze-log verdicts):\n")
        sys.stdout.write(report.render_text(*ebs))
    elif ebs_error:
        sys.stdout.write(f"\nExitBootServices trace: not judged: {ebs_error}\n")
    else:
        sys.stdout.write("\nExitBootServices trace: none in this log (no EBST lines), "
                         "so no EBS verdict\n")
    return EXIT_OK


def _cmd_check_firmware(args: argparse.Namespace) -> int:
    """C3S alone: 0 when no path is found, 1 when one is, 2 for a directory
    that is no firmware build."""
    from harness.analysis import teardown_static

    result = teardown_static.check_firmware(Path(args.firmware),
                                            args.entry or teardown_static.ENTRY)
    violations = [checks.Violation("C3S", finding.line()) for finding in result.findings]
    if args.json:
        _print_json({**result.as_dict(), "violations": [v.as_json() for v in violations],
                     "checks": checks.states_json(checks.outcomes(["C3S"], violations, {}))})
    else:
        for line in teardown_static.lines(result):
            print(line)
    return EXIT_VIOLATION if violations else EXIT_OK


def _cmd_nightly(args: argparse.Namespace) -> int:
    """Exit 0: no regression; 1: a regression; 3: nothing could run."""
    from harness.nightly import report as nightly_report
    from harness.nightly.runner import run_nightly

    html = _writable(args.html, "--html") if args.html else None
    junit = _writable(args.junit, "--junit") if args.junit else None
    history = _writable(args.history, "--history")
    artifacts = (_writable(args.artifacts, "--artifacts", directory=True) if args.artifacts
                 else history.resolve().parent / f"{history.stem}-artifacts")
    done = run_nightly(Path(args.plan), history, artifacts, junit=junit,
                       keep_days=args.keep_days)
    text = nightly_report.render_text(done.report)
    if html is not None:
        html.write_text(nightly_report.render_html(done.report), encoding="utf-8")
    if args.json:
        _print_json({"run": done.run_id, "plan": done.plan.name,
                     "exit_status": done.report.exit_status, "counts": done.report.counts(),
                     "regressions": [dataclasses.asdict(c) for c in done.report.regressions],
                     "changes": [dataclasses.asdict(c) for c in done.report.changes],
                     "reaped_incomplete_runs": list(done.reaped),
                     "pruned_artifacts": [str(p) for p in done.pruned], "report": text})
    else:
        sys.stdout.write(text)
    return done.report.exit_status


def _cmd_analyze_dump(args: argparse.Namespace) -> int:
    from harness.analysis import dump, report, symbols, trace

    firmware = _firmware_dir(args.firmware)
    parsed = trace.parse_log(args.log)
    sym = symbols.Symbolizer(parsed.images, firmware)
    maphead_symbol = sym.symbol_address("IoMmuDxe", "mMapInfos") if firmware else None
    canary = dump.load_canary(args.canary) if args.canary else None
    result = dump.analyze_dump(args.dump, parsed, maphead_symbol=maphead_symbol,
                               canary=canary, scope=args.scan, encrypted=args.encrypted)
    if args.json:
        _print_json({**result.as_json(), "checks": checks.states_json(result.outcomes)})
    else:
        sys.stdout.write(report.render_dump_text(result))
    return EXIT_OK if result.passed else EXIT_VIOLATION


# ----------------------------------------------------------- boot, demo


def _firmware_for(args: argparse.Namespace) -> edk2.Firmware:
    """``--firmware DIR``, else the patched build (built or from the cache)."""
    if getattr(args, "firmware", None):
        return edk2.Firmware.load(args.firmware)
    progress = None if args.quiet else StderrProgress()
    baseline = edk2.baseline_named(getattr(args, "edk2", None))
    return edk2.build_firmware(source=edk2.source_from_option(None, baseline),
                               baseline=baseline, progress=progress).output


def _artifacts_dir(args: argparse.Namespace, what: str) -> Path:
    if getattr(args, "artifacts", None):
        return _writable(args.artifacts, "--artifacts", directory=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("artifacts").absolute() / f"{what}-{stamp}"


def _qemu_for(args: argparse.Namespace, mode: str) -> str:
    """``--qemu``; else for an emulated ``--sev`` the harness's QEMU (built
    or from the cache), else the system's."""
    if args.qemu:
        return str(args.qemu)
    if mode != "off" and sev.MODES[mode].emulated:
        return str(_build_qemu(args).output.binary)
    return host.DEFAULT_QEMU


def _cmd_boot(args: argparse.Namespace) -> int:
    chosen = scenario.scenario_from_options(vars(args))
    artifacts = _artifacts_dir(args, chosen.label())
    emulated = chosen.sev != "off" and sev.MODES[chosen.sev].emulated
    if args.host:
        if emulated:
            raise UsageError(f"--sev {chosen.sev} runs on this host (the harness's QEMU under "
                             "TCG), not with --host")
        result = _boot_remote(args, chosen, artifacts)
    else:
        # Under TCG (SEV off or emulated) nothing needs KVM: do not prove it.
        tcg_only = emulated or (chosen.sev == "off" and chosen.accel == "tcg")
        caps = host.cached_probe(_qemu_for(args, chosen.sev), tcg_only=tcg_only)
        scenario.check_host(chosen, caps)       # before a possibly long firmware build
        firmware = _firmware_for(args)
        result = scenario.run_scenario(firmware, chosen, artifacts, caps=caps)
    if args.json:
        _print_json(result.as_json())
    else:
        sys.stdout.write(result.render_text())
    return EXIT_OK if result.passed else EXIT_VIOLATION


def _boot_remote(args: argparse.Namespace, chosen: scenario.Scenario,
                 artifacts: Path) -> scenario.RunResult:
    """``boot --host ssh://...``: QEMU on the remote host, the rest here."""
    from harness.vm import remote  # paramiko: 0.08 s of every command's start otherwise
    qemu_binary = args.qemu or host.DEFAULT_QEMU
    where = remote.RemoteHost.parse(args.host, qemu=qemu_binary)
    session = where.connect()
    try:
        caps = remote.remote_caps(session, qemu_binary)
        scenario.check_host(chosen, caps)       # before a possibly long firmware build
        firmware = _firmware_for(args)
        return scenario.run_scenario(firmware, chosen, artifacts, caps=caps,
                                     launcher=where.launcher(session))
    finally:
        session.close()


def _cmd_demo(args: argparse.Namespace) -> int:
    from harness import demo

    given = edk2.Firmware.load(args.firmware) if args.firmware else None
    if given is None:
        edk2.baseline_named(args.edk2)          # an unknown one: before anything runs
    root = _artifacts_dir(args, "demo")
    system = host.cached_probe(args.qemu or host.DEFAULT_QEMU)
    harness_qemu = None if args.qemu else lambda: str(_build_qemu(args).output.binary)
    baseline = given.baseline if given is not None else edk2.baseline_named(args.edk2).name
    platform = (demo.choose_platform(system, baseline, harness_qemu) if args.sev is None
                else demo.chosen_platform(system, args.sev, baseline, harness_qemu))
    print(f"ebs-harness demo: {platform.accel.upper()} ({platform.caps.qemu} "
          f"{platform.caps.qemu_version}); {platform.why}")
    firmware = given or _firmware_for(args)
    print(f"firmware: edk2 {firmware.baseline}, {firmware.path}", flush=True)
    held = demo.run(firmware, platform, root, sys.stdout)
    return EXIT_OK if held else EXIT_VIOLATION


# ---------------------------------------------------------------- main


EDK2_HELP = (f"the edk2 baseline to build the series on: {', '.join(edk2.BASELINES)} "
             f"(default {edk2.DEFAULT_BASELINE}); also EBS_HARNESS_EDK2")
_DEFAULTS = scenario.Scenario()


def _flag(setting: str) -> str:
    """The command line's flag for a setting (a field's name)."""
    return {"device_trace": "--no-device-trace"}.get(setting, "--" + setting.replace("_", "-"))


def _options(*adders: Callable[[argparse.ArgumentParser], object]) -> argparse.ArgumentParser:
    """A parent parser holding the options ``adders`` add, for the commands
    that share them."""
    parent = _Parser(add_help=False)
    for add in adders:
        add(parent)
    return parent


def _json(parser: argparse.ArgumentParser) -> object:
    return parser.add_argument("--json", action="store_true",
                               help="print one JSON object on stdout")


def _html(what: str) -> Callable[[argparse.ArgumentParser], object]:
    return lambda parser: parser.add_argument("--html", metavar="FILE",
                                              help=f"also write {what} as a self-contained "
                                                   "HTML page")


def _firmware_to_run(parser: argparse.ArgumentParser) -> object:
    parser.add_argument("--firmware", metavar="DIR",
                        help="a firmware directory from 'ebs-harness build' (default: build "
                             "or reuse the patched one)")
    return parser.add_argument("--edk2", metavar="VERSION", help=EDK2_HELP)


def _firmware_symbols(what: str) -> Callable[[argparse.ArgumentParser], object]:
    return lambda parser: parser.add_argument(
        "--firmware", metavar="DIR",
        help=f"the firmware build the log is of (modules/*.debug|.map): {what}")


def _artifacts(what: str) -> Callable[[argparse.ArgumentParser], object]:
    return lambda parser: parser.add_argument(
        "--artifacts", metavar="DIR", help=f"where to keep {what} (default artifacts/{what}-TIME)")


def _qemu(default: str) -> Callable[[argparse.ArgumentParser], object]:
    return lambda parser: parser.add_argument("--qemu", metavar="BINARY",
                                              help=f"the QEMU to run (default: {default})")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ebs-harness",
        description="Build a patched OVMF and check the IOMMU teardown at "
                    "ExitBootServices on QEMU guests.",
        epilog="checks:\n" + checks.help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    # -q and -v go before or after the command: the command's copies leave
    # the attribute alone unless given (SUPPRESS).
    common = _Parser(add_help=False)
    for target, default in ((parser, False), (common, argparse.SUPPRESS)):
        target.add_argument("-q", "--quiet", action="store_true", default=default,
                            help="no progress lines on stderr")
        target.add_argument("-v", "--verbose", action="store_true", default=default,
                            help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_parser(name: str, *parents: argparse.ArgumentParser,
                   **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name, parents=[common, *parents], **kwargs)  # type: ignore[list-item]
        return parser

    json_out = _options(_json)
    build = add_parser("build", json_out, help="build (or reuse) the patched OVMF")
    build.add_argument("--edk2-src", metavar="DIR",
                       help="an edk2 tree to use instead of Debian's source "
                            "package (copied, never modified); also "
                            "EBS_HARNESS_EDK2_SRC")
    build.add_argument("--edk2", metavar="VERSION", help=EDK2_HELP)
    build.add_argument("--rebuild", action="store_true",
                       help="build even if the cache has this firmware")
    build.add_argument("--debug-on-serial", action="store_true",
                       help="the firmware's debug output (and the EBS trace) on the serial "
                            "port instead of the 0x402 debug port (-D DEBUG_ON_SERIAL_PORT), "
                            "for labs that capture only the serial console")
    build.set_defaults(func=_cmd_build)

    bqemu = add_parser("build-qemu", json_out,
                       help="build (or reuse) the harness's QEMU, with the emulated SEV")
    bqemu.add_argument("--rebuild", action="store_true",
                       help="build even if the cache has this QEMU")
    bqemu.set_defaults(func=_cmd_build_qemu)

    alog = add_parser("analyze-log",
                      _options(_json, _html("the timeline"),
                               _firmware_symbols("handlers named as functions")),
                      help="EBS timeline and verdicts V1..V6, C1..C3 of a debug log")
    alog.add_argument("log", metavar="LOG", help="debug-port or serial log of a boot")
    alog.add_argument("--device-trace", metavar="FILE",
                      help="the boot's QEMU device trace (device-trace.log): W1, W2")
    alog.set_defaults(func=_cmd_analyze_log)

    xlog = add_parser("explain-log",
                      _options(_json, _html("the explanation (load map drawn)"),
                               _firmware_symbols("crash addresses as function and "
                                                 "file:line")),
                      help="explain any OVMF boot log: firmware, platform, load map, boot "
                           "options, crashes symbolized, where and how it ends")
    xlog.add_argument("log", metavar="LOG", help="debug-port or serial log of an OVMF boot, "
                                                 "ours or stock, whole or cut")
    xlog.set_defaults(func=_cmd_explain_log)

    night = add_parser("nightly", _options(_json, _html("the morning report")),
                       help="run a plan of hosts x firmware x scenarios, keep it in a history, "
                            "report what regressed since the last run")
    night.add_argument("--plan", required=True, metavar="PLAN.toml",
                       help="hosts, firmware and scenarios (docs/nightly.md)")
    night.add_argument("--history", required=True, metavar="DB",
                       help="the SQLite history file (made on first use)")
    night.add_argument("--artifacts", metavar="DIR",
                       help="where each run keeps its cases' artifacts (default: beside DB)")
    night.add_argument("--junit", metavar="FILE", help="junit XML of the cases, for the CI")
    night.add_argument("--keep-days", type=float, metavar="N",
                       help="remove the artifacts of runs older than N days first")
    night.set_defaults(func=_cmd_nightly)

    adump = add_parser("analyze-dump",
                       _options(_json, _firmware_symbols("cross-checks maphead with "
                                                         "IoMmuDxe's mMapInfos")),
                       help="verdicts D1..D3 of a dump-guest-memory ELF core")
    adump.add_argument("dump", metavar="DUMP", help="QEMU dump-guest-memory file (ELF)")
    adump.add_argument("--log", required=True, metavar="LOG",
                       help="the debug log of the same boot (maphead, sharedbit, images)")
    adump.add_argument("--canary", metavar="FILE", help="the run's canary file (D3)")
    adump.add_argument("--scan", choices=("auto", "shared", "all"), default="auto",
                       help="D3 scope: auto = the shared pages where they are known (SEV's "
                            "C-bit, the emulation's bit 52), else all RAM")
    adump.add_argument("--encrypted", action="store_true",
                       help="the dump is of a real SEV guest: private memory is ciphertext "
                            "(D1 and D2 are skipped, D3 scans all RAM)")
    adump.set_defaults(func=_cmd_analyze_dump)

    # The scenario's options default to None: Scenario holds the defaults.
    boot = add_parser("boot", _options(_json, _firmware_to_run, _artifacts("LABEL"),
                                       _qemu("qemu-system-x86_64; with --sev emulated, "
                                             "emulated-es or emulated-snp, the harness's "
                                             "QEMU")),
                      help="boot the probe guest once and judge it")
    boot.add_argument("--accel", choices=("auto", "tcg", "kvm"),
                      help="auto (default): KVM where the host probe proved it, else TCG")
    boot.add_argument("--sev", choices=sev.SEV_MODES,
                      help="off (default); " + "; ".join(f"{m.name}: {m.about}"
                                                        for m in sev.MODES.values()))
    boot.add_argument("--devices", metavar="LIST",
                      help="comma-separated: " + ", ".join(vm_devices.DEVICE_NAMES)
                           + " (virtio-blk, the boot disk, always; docs/devices.md)")
    boot.add_argument("--ebs-mode", choices=scenario.EBS_MODES,
                      help=f"the IOMMU teardown scheme (default {_DEFAULTS.ebs_mode}; none: no "
                           "teardown, a negative control)")
    boot.add_argument("--requeue-depth", type=int, metavar="N",
                      help="turn on the adversary driver, re-signalling N times")
    boot.add_argument("--leak-mapping", action="store_true",
                      help="the probe leaves a mapping holding the canary live")
    boot.add_argument("--stale-mapkey", action="store_true",
                      help="the probe first calls EBS with a stale MapKey")
    boot.add_argument("--dump", action="store_true",
                      help="dump guest memory once parked and judge D1..D3")
    boot.add_argument("--inject-frames", type=int, metavar="N",
                      help="once parked, send N frames to the adversary NIC (adversary-nic)")
    boot.add_argument("--no-device-trace", dest="device_trace", action="store_false",
                      default=None, help="no QEMU device trace (W1, W2 not judged)")
    boot.add_argument("--timeout", type=float, metavar="SECONDS",
                      help=f"deadline from QEMU's start to the probe's park (default "
                           f"{_DEFAULTS.timeout:g})")
    boot.add_argument("--host", metavar="ssh://USER@HOST[:PORT]",
                      help="run QEMU on that host over SSH (host key from ~/.ssh/known_hosts, "
                           "key from the agent or ~/.ssh/id_*); analysis stays here")
    boot.set_defaults(func=_cmd_boot)

    demo_cmd = add_parser("demo", _options(_firmware_to_run, _artifacts("demo"),
                                           _qemu("the harness's QEMU for emulated SEV where "
                                                 "the host has no SEV")),
                          help="the 2017 scheme against the callback, side by side")
    demo_cmd.add_argument("--sev", choices=sev.SEV_MODES,
                          help="where to run the story (default: real SEV-ES or SEV where "
                               "the host has it, else emulated SEV-ES, else emulated SEV, "
                               "else off)")
    demo_cmd.set_defaults(func=_cmd_demo)

    static = add_parser("check-firmware", json_out,
                        help="C3S: every path from the IOMMU teardown to a boot service, read "
                             "from the built IoMmuDxe (docs/static-check.md)")
    static.add_argument("firmware", metavar="DIR",
                        help="a firmware directory from 'ebs-harness build' "
                             "(reads modules/IoMmuDxe.debug)")
    static.add_argument("--entry", metavar="FUNCTION",
                        help="the function to start from (default: the teardown IoMmuDxe "
                             "registers, the one the DXE core calls)")
    static.set_defaults(func=_cmd_check_firmware)

    check = add_parser("host-check", json_out,
                       help="what this host can run: TCG, KVM, SEV, SEV-ES, SNP")
    check.add_argument("--qemu", metavar="BINARY",
                       help="the QEMU to probe (default: qemu-system-x86_64)")
    check.set_defaults(func=_cmd_host_check)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in argv
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as exc:
        return _fail(exc.prog, EXIT_USAGE, str(exc), json_mode)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    command = f"ebs-harness {args.command}"
    json_mode = bool(getattr(args, "json", False))
    try:
        return func(args)
    except HarnessError as exc:
        # One line says what went wrong; environment failures (a timeout, a
        # launch error) may add the log tails that explain it below. A
        # setting is named by its flag here.
        text = exc.spelled(_flag(exc.setting)) if isinstance(exc, SettingError) else str(exc)
        first, _, rest = text.partition("\n")
        return _fail(command, exc.exit_status, first, json_mode,
                     rest if exc.exit_status == EXIT_ENVIRONMENT else "")
    except KeyboardInterrupt:
        return _fail(command, EXIT_INTERRUPTED, "interrupted", json_mode)
    except OSError as exc:
        # Paths the user names are checked before any work (exit 2);
        # anything else failing here is the machine's.
        return _fail(command, EXIT_ENVIRONMENT, str(exc), json_mode)
    except Exception as exc:  # noqa: BLE001 - a bug of ours: say where, never exit 1
        saved = _save_traceback(args.command)
        return _fail(command, EXIT_INTERNAL,
                     f"internal error ({type(exc).__name__}: "
                     f"{str(exc).splitlines()[0] if str(exc) else 'no message'}); a bug of "
                     f"ebs-harness, traceback in {saved}", json_mode, traceback=saved)


class _ArgumentError(Exception):
    """argparse refused the command line (its usage line is on stderr)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so that ``--json`` can say it."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise _ArgumentError(self.prog, f"error: {message}")


def run() -> None:
    """The ``ebs-harness`` command: :func:`main`, then exit without the
    interpreter's last collection walking every object of a large analysis
    (a quarter of a second for a 10 MB log)."""
    status = main()
    gc.freeze()
    sys.exit(status)


def _save_traceback(command: str) -> Path:
    """Write the current exception's traceback where the user will find it:
    ``EBS_HARNESS_CACHE/crashes/`` (the cache root, else the system's temp
    directory)."""
    import traceback

    stamp = time.strftime("%Y%m%d-%H%M%S")
    for directory in (cache.cache_root() / "crashes", Path(tempfile.gettempdir())):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"ebs-harness-{command}-{stamp}-{os.getpid()}.txt"
            path.write_text(f"ebs-harness {command}: {' '.join(sys.argv)}\n\n"
                            + traceback.format_exc())
            return path
        except OSError:
            continue
    return Path("(nowhere: no writable directory)")


if __name__ == "__main__":
    sys.exit(main())

