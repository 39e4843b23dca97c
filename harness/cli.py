"""The ``ebs-harness`` command (the README's Usage and Exit statuses are its contract).

Exit status: 0 every verdict held; 1 a verdict failed; 2 bad input or usage
(one line on stderr); 3 the environment failed (QEMU would not start, a
timeout, a missing tool); 4 an internal error (a bug of ours: one line naming
the file that holds the traceback), never 1; 130 interrupted. Each
sub-command is a ``_cmd_*`` function that returns the status; errors from
:mod:`harness.errors` become one line and their ``exit_status`` here, in one
place.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from html import escape as html_escape
from pathlib import Path
from typing import Any, NoReturn

from harness import cli_check_firmware, scenario
from harness.analysis import devices, dump, explain, report, symbols, trace
from harness.build import cache, edk2, qemu
from harness.errors import (
    EXIT_ENVIRONMENT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VIOLATION,
    HarnessError,
    TraceFormatError,
    UsageError,
)
from harness.vm import host

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
    progress = None if args.quiet else cache.StderrProgress()
    baseline = edk2.baseline_named(args.edk2)
    result = edk2.build_firmware(
        source=edk2.source_from_option(args.edk2_src, baseline),
        baseline=baseline,
        rebuild=args.rebuild,
        progress=progress,
        flags=edk2.BuildFlags(debug_on_serial=args.debug_on_serial),
    )
    return _print_build(args, result.firmware.path, {"firmware_dir": str(result.firmware.path),
                                                     "edk2": baseline.name},
                        result.firmware.key, result.cache_hit, result.seconds)


def _print_build(args: argparse.Namespace, path: Path, fields: dict[str, str], key: str,
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
    return _print_build(args, result.qemu.binary, {"qemu": str(result.qemu.binary),
                                                   "qemu_dir": str(result.qemu.path)},
                        result.qemu.key, result.cache_hit, result.seconds)


def _build_qemu(args: argparse.Namespace, rebuild: bool = False) -> qemu.QemuBuildResult:
    progress = None if args.quiet else cache.StderrProgress()
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
        if caps.cbitpos is not None:
            print(f"{'SEV':12} cbitpos {caps.cbitpos}, "
                  f"reduced-phys-bits {caps.reduced_phys_bits}")
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
    with trace.gc_paused():
        return _analyze_log(args)


def _analyze_log(args: argparse.Namespace) -> int:
    html = _writable(args.html, "--html") if args.html else None
    result, sym = trace.analyze_log(args.log, _firmware_dir(args.firmware))
    side = (devices.analyze_device_trace(args.device_trace, result.timeline.trace.events)
            if args.device_trace else None)
    if html is not None:
        html.write_text(report.render_html(result, sym, side), encoding="utf-8")
    if args.json:
        data = _verdict_json(result)
        if side is not None:
            data["violations"] += [v.as_json() for v in side.violations]
            data["verdict"] = "fail" if data["violations"] else "pass"
            data["devices"] = side.as_json()
        _print_json(data)
    else:
        sys.stdout.write(report.render_text(result, sym))
        if side is not None:
            sys.stdout.write("\n" + devices.render_text(side, report.ebs_images(result, sym)))
    passed = result.passed and (side is None or not side.violations)
    return EXIT_OK if passed else EXIT_VIOLATION


def _verdict_json(result: trace.LogReport) -> dict[str, Any]:
    return {
        "verdict": "pass" if result.passed else "fail",
        "violations": [v.as_json() for v in result.violations],
        "ebs_calls": [{"enter_seq": a.enter.seq, "exit_seq": a.exit.seq,
                       "succeeded": a.succeeded,
                       "teardowns": [t.begin.seq for t in a.teardowns]}
                      for a in result.timeline.attempts],
        "findings": [f.as_json() for f in result.findings],
        "notes": list(result.anomalies),
    }


def _cmd_explain_log(args: argparse.Namespace) -> int:
    """Explain any OVMF log; the EBS verdicts too where it carries the trace.
    Exit 0 once explained: judging is ``analyze-log``'s."""
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
        page = explain.render_html(explained)
        if ebs is not None:
            page += ("<h2>ExitBootServices trace</h2><pre>"
                     + html_escape(report.render_text(*ebs)) + "</pre>\n")
        html.write_text(page, encoding="utf-8")
    if args.json:
        _print_json({"explanation": explain.to_json(explained),
                     "ebs": _verdict_json(ebs[0]) if ebs is not None else None,
                     "ebs_error": ebs_error or None})
        return EXIT_OK
    sys.stdout.write(explain.render_text(explained))
    if ebs is not None:
        sys.stdout.write("\nExitBootServices trace (the analyze-log verdicts):\n")
        sys.stdout.write(report.render_text(*ebs))
    elif ebs_error:
        sys.stdout.write(f"\nExitBootServices trace: not judged: {ebs_error}\n")
    else:
        sys.stdout.write("\nExitBootServices trace: none in this log (no EBST lines), "
                         "so no EBS verdict\n")
    return EXIT_OK


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
    firmware = _firmware_dir(args.firmware)
    parsed = trace.parse_log(args.log)
    sym = symbols.Symbolizer(parsed.images, firmware)
    maphead_symbol = sym.symbol_address("IoMmuDxe", "mMapInfos") if firmware else None
    canary = dump.load_canary(args.canary) if args.canary else None
    result = dump.analyze_dump(args.dump, parsed, maphead_symbol=maphead_symbol,
                               canary=canary, scope=args.scan, encrypted=args.encrypted)
    if args.json:
        _print_json(result.as_json())
    else:
        sys.stdout.write(report.render_dump_text(result))
    return EXIT_OK if result.passed else EXIT_VIOLATION


# ----------------------------------------------------------- boot, demo


def _firmware_for(args: argparse.Namespace) -> edk2.Firmware:
    """``--firmware DIR``, else the patched build (built or from the cache)."""
    if getattr(args, "firmware", None):
        return edk2.Firmware.load(args.firmware)
    progress = None if args.quiet else cache.StderrProgress()
    baseline = edk2.baseline_named(getattr(args, "edk2", None))
    return edk2.build_firmware(source=edk2.source_from_option(None, baseline),
                               baseline=baseline, progress=progress).firmware


def _artifacts_dir(args: argparse.Namespace, what: str) -> Path:
    if getattr(args, "artifacts", None):
        return _writable(args.artifacts, "--artifacts", directory=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("artifacts").absolute() / f"{what}-{stamp}"


def _print_run(result: scenario.RunResult) -> None:
    sys.stdout.write(report.render_text(result.log, result.symbolizer))
    if result.dump is not None:
        sys.stdout.write("\n" + report.render_dump_text(result.dump))
    if result.devices is not None:
        sys.stdout.write("\n" + devices.render_text(
            result.devices, report.ebs_images(result.log, result.symbolizer)))
    for note in result.device_notes:
        print(f"note: {note}")
    verdict = "PASS" if result.passed else "FAIL: " + ", ".join(sorted(result.failed_checks()))
    print(f"\n{result.scenario.label()}: {verdict} (parked after {result.park_seconds:.1f} s "
          f"under {result.accel}; artifacts {result.artifacts}, timeline "
          f"{result.artifacts / 'timeline.html'})")


def _qemu_for(args: argparse.Namespace, sev: str) -> str:
    """``--qemu``; else for ``--sev emulated`` the harness's QEMU (built or
    from the cache), else the system's."""
    if args.qemu:
        return str(args.qemu)
    if sev == "emulated":
        return str(_build_qemu(args).qemu.binary)
    return host.DEFAULT_QEMU


def _cmd_boot(args: argparse.Namespace) -> int:
    chosen = scenario.scenario_from_options(vars(args))
    artifacts = _artifacts_dir(args, chosen.label())
    if args.host:
        if chosen.sev == "emulated":
            raise UsageError("--sev emulated runs on this host (the harness's QEMU under "
                             "TCG), not with --host")
        result = _boot_remote(args, chosen, artifacts)
    else:
        # Under TCG (SEV off or emulated) nothing needs KVM: do not prove it.
        tcg_only = chosen.sev == "emulated" or (chosen.sev == "off" and chosen.accel == "tcg")
        caps = host.cached_probe(_qemu_for(args, chosen.sev), tcg_only=tcg_only)
        scenario.check_host(chosen, caps)       # before a possibly long firmware build
        firmware = _firmware_for(args)
        result = scenario.run_scenario(firmware, chosen, artifacts, caps=caps)
    if args.json:
        _print_json(result.as_json())
    else:
        _print_run(result)
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


#: The demo's story: the 2017 scheme against a driver that re-signals twice,
#: then the new callback against the same driver.
DEMO = (
    ("the 2017 scheme: IoMmuDxe re-signals its EBS event to come last",
     scenario.Scenario(ebs_mode="legacy", requeue_depth=2, dump=True)),
    ("the new scheme: CoreExitBootServices() calls the IOMMU once all handlers ran",
     scenario.Scenario(ebs_mode="callback", requeue_depth=2, dump=True)),
)


def _demo_platform(args: argparse.Namespace) -> tuple[host.HostCaps, str, str]:
    """The demo's QEMU capabilities, SEV mode and a line saying why: real SEV
    where the host has it, else the emulated SEV of the harness's QEMU, else
    (that QEMU could not be had) the IOMMU emulation mode."""
    system = host.cached_probe(args.qemu or host.DEFAULT_QEMU)
    if system.sev.available:
        return system, "sev", "AMD SEV (real encryption)"
    if args.qemu:
        caps = system
    else:
        try:
            caps = host.cached_probe(str(_build_qemu(args).qemu.binary))
        except HarnessError as exc:
            first = str(exc).splitlines()[0]
            return system, "off", (f"no SEV here, and the harness's QEMU could not be built "
                                   f"({first}): IOMMU emulation mode instead")
    if caps.sev_emulated.available:
        return caps, "emulated", (f"no SEV here ({system.sev.reason}): emulated SEV on the "
                                  "harness's QEMU, OVMF on its real SEV code path (memory in "
                                  "plaintext)")
    return caps, "off", (f"no SEV here, and {caps.sev_emulated.reason}: IOMMU emulation "
                         "mode instead")


def _cmd_demo(args: argparse.Namespace) -> int:
    given = edk2.Firmware.load(args.firmware) if args.firmware else None
    if given is None:
        edk2.baseline_named(args.edk2)          # an unknown one: before anything runs
    root = _artifacts_dir(args, "demo")
    caps, sev, why = _demo_platform(args)
    accel = "tcg" if sev == "emulated" else host.resolve_accel("auto", caps)
    print(f"ebs-harness demo: {accel.upper()} ({caps.qemu} {caps.qemu_version}); {why}")
    firmware = given or _firmware_for(args)
    print(f"firmware: edk2 {firmware.baseline}, {firmware.path}")
    results = []
    for number, (story, chosen) in enumerate(DEMO, 1):
        if sev != "off":
            chosen = dataclasses.replace(chosen, sev=sev, emulation=False)
        print(f"\n=== {number}. {chosen.label()}: {story}\n")
        result = scenario.run_scenario(firmware, chosen, root / chosen.ebs_mode, caps=caps)
        _print_run(result)
        results.append(result)
    legacy, callback = results
    print("\n=== summary")
    for result in results:
        verdict = "pass" if result.passed else "FAIL " + ", ".join(
            sorted(result.failed_checks(), key=lambda c: (c[0] == "D", c)))
        print(f"  {result.scenario.label():<32} {verdict}")
    # The prediction: the adversary's late stage lands after the 2017
    # teardown (V1) and touches its device then (V3); the callback holds.
    story_held = {"V1", "V3"} <= legacy.failed_checks() and callback.passed
    print("  " + ("the 2017 scheme lost the race and the callback won it, as predicted"
                  if story_held else "UNEXPECTED: the demo's prediction did not hold"))
    # C2 by other drivers: facts about them, the same under both schemes.
    for finding in sorted({f.culprit for r in results for f in r.log.findings}):
        print(f"  finding (C2, not a failed verdict): {finding} allocates or frees memory "
              "after the memory map was terminated")
    print(f"  artifacts: {root}")
    return EXIT_OK if story_held else EXIT_VIOLATION


# ---------------------------------------------------------------- main


EDK2_HELP = (f"the edk2 baseline to build the series on: {', '.join(edk2.BASELINES)} "
             f"(default {edk2.DEFAULT_BASELINE}); also EBS_HARNESS_EDK2")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ebs-harness",
        description="Build a patched OVMF and check the IOMMU teardown at "
                    "ExitBootServices on QEMU guests.")
    # -q and -v go before or after the command: the command's copies leave
    # the attribute alone unless given (SUPPRESS).
    common = _Parser(add_help=False)
    for target, default in ((parser, False), (common, argparse.SUPPRESS)):
        target.add_argument("-q", "--quiet", action="store_true", default=default,
                            help="no progress lines on stderr")
        target.add_argument("-v", "--verbose", action="store_true", default=default,
                            help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="COMMAND")
    add_parser = functools.partial(sub.add_parser, parents=[common])

    build = add_parser("build", help="build (or reuse) the patched OVMF")
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
    build.add_argument("--json", action="store_true",
                       help="print one JSON object on stdout")
    build.set_defaults(func=_cmd_build)

    bqemu = add_parser("build-qemu",
                           help="build (or reuse) the harness's QEMU, with the emulated SEV")
    bqemu.add_argument("--rebuild", action="store_true",
                       help="build even if the cache has this QEMU")
    bqemu.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    bqemu.set_defaults(func=_cmd_build_qemu)

    alog = add_parser("analyze-log", help="EBS timeline and verdicts V1..V4 of a debug log")
    alog.add_argument("log", metavar="LOG", help="debug-port or serial log of a boot")
    alog.add_argument("--firmware", metavar="DIR",
                      help="firmware dir whose modules/*.debug|.map symbolize handlers")
    alog.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    alog.add_argument("--html", metavar="FILE",
                      help="also write the timeline as a self-contained HTML page")
    alog.add_argument("--device-trace", metavar="FILE",
                      help="the boot's QEMU device trace (device-trace.log): W1, W2")
    alog.set_defaults(func=_cmd_analyze_log)

    xlog = add_parser("explain-log",
                      help="explain any OVMF boot log: firmware, platform, load map, boot "
                           "options, crashes symbolized, where and how it ends")
    xlog.add_argument("log", metavar="LOG", help="debug-port or serial log of an OVMF boot, "
                                                 "ours or stock, whole or cut")
    xlog.add_argument("--firmware", metavar="DIR",
                      help="the firmware build the log is of (modules/*.debug): crash "
                           "addresses as function and file:line")
    xlog.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    xlog.add_argument("--html", metavar="FILE",
                      help="also write a self-contained HTML page (load map drawn)")
    xlog.set_defaults(func=_cmd_explain_log)

    night = add_parser("nightly",
                       help="run a plan of hosts x firmware x scenarios, keep it in a history, "
                            "report what regressed since the last run")
    night.add_argument("--plan", required=True, metavar="PLAN.toml",
                       help="hosts, firmware and scenarios (docs/nightly.md)")
    night.add_argument("--history", required=True, metavar="DB",
                       help="the SQLite history file (made on first use)")
    night.add_argument("--artifacts", metavar="DIR",
                       help="where each run keeps its cases' artifacts (default: beside DB)")
    night.add_argument("--html", metavar="FILE", help="also write the morning report as HTML")
    night.add_argument("--junit", metavar="FILE", help="junit XML of the cases, for the CI")
    night.add_argument("--keep-days", type=float, metavar="N",
                       help="remove the artifacts of runs older than N days first")
    night.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    night.set_defaults(func=_cmd_nightly)

    adump = add_parser("analyze-dump",
                           help="verdicts D1..D3 of a dump-guest-memory ELF core")
    adump.add_argument("dump", metavar="DUMP", help="QEMU dump-guest-memory file (ELF)")
    adump.add_argument("--log", required=True, metavar="LOG",
                       help="the debug log of the same boot (maphead, sharedbit, images)")
    adump.add_argument("--firmware", metavar="DIR",
                       help="firmware dir; cross-checks maphead with IoMmuDxe's mMapInfos")
    adump.add_argument("--canary", metavar="FILE", help="the run's canary file (D3)")
    adump.add_argument("--scan", choices=("auto", "shared", "all"), default="auto",
                       help="D3 scope: auto = the shared pages where they are known (SEV's "
                            "C-bit, the emulation's bit 52), else all RAM")
    adump.add_argument("--encrypted", action="store_true",
                       help="the dump is of a real SEV guest: private memory is ciphertext "
                            "(D1 and D2 are skipped, D3 scans all RAM)")
    adump.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    adump.set_defaults(func=_cmd_analyze_dump)

    boot = add_parser("boot", help="boot the probe guest once and judge it")
    boot.add_argument("--firmware", metavar="DIR",
                      help="a firmware directory from 'ebs-harness build' (default: build)")
    boot.add_argument("--edk2", metavar="VERSION", help=EDK2_HELP)
    boot.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto",
                      help="auto: KVM where the host probe proved it, else TCG")
    boot.add_argument("--sev", choices=scenario.SEV_MODES, default="off",
                      help="sev, sev-es: a SEV guest under KVM (a SEV host); emulated: the "
                           "harness's QEMU emulates SEV under TCG (built on first use)")
    boot.add_argument("--devices", default="virtio-blk", metavar="LIST",
                      help="comma-separated: virtio-blk (always), virtio-net, virtio-scsi, "
                           "virtio-rng, virtio-gpu, nvme, ahci, xhci-storage, usb-kbd, "
                           "e1000e, pvscsi, mptsas, lsi, adversary-nic (docs/devices.md)")
    boot.add_argument("--ebs-mode", choices=scenario.EBS_MODES, default="callback",
                      help="the IOMMU teardown scheme (none: no teardown, a negative control)")
    boot.add_argument("--requeue-depth", type=int, metavar="N",
                      help="turn on the adversary driver, re-signalling N times")
    boot.add_argument("--leak-mapping", action="store_true",
                      help="the probe leaves a mapping holding the canary live")
    boot.add_argument("--stale-mapkey", action="store_true",
                      help="the probe first calls EBS with a stale MapKey")
    boot.add_argument("--dump", action="store_true",
                      help="dump guest memory once parked and judge D1..D3")
    boot.add_argument("--inject-frames", type=int, default=0, metavar="N",
                      help="once parked, send N frames to the adversary NIC (adversary-nic)")
    boot.add_argument("--no-device-trace", action="store_true",
                      help="no QEMU device trace (W1, W2 not judged)")
    boot.add_argument("--artifacts", metavar="DIR",
                      help="where to keep the run (default artifacts/LABEL-TIME)")
    boot.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                      help="deadline from QEMU's start to the probe's park")
    boot.add_argument("--qemu", metavar="BINARY",
                      help="the QEMU to run (default: qemu-system-x86_64; with --sev "
                           "emulated, the harness's QEMU)")
    boot.add_argument("--host", metavar="ssh://USER@HOST[:PORT]",
                      help="run QEMU on that host over SSH (host key from ~/.ssh/known_hosts, "
                           "key from the agent or ~/.ssh/id_*); analysis stays here")
    boot.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    boot.set_defaults(func=_cmd_boot)

    demo = add_parser("demo", help="the 2017 scheme against the callback, side by side")
    demo.add_argument("--firmware", metavar="DIR",
                      help="a firmware directory from 'ebs-harness build' (default: build)")
    demo.add_argument("--edk2", metavar="VERSION", help=EDK2_HELP)
    demo.add_argument("--artifacts", metavar="DIR",
                      help="where to keep the runs (default artifacts/demo-TIME)")
    demo.add_argument("--qemu", metavar="BINARY",
                      help="the QEMU to run (default: the harness's QEMU for emulated SEV "
                           "where the host has no SEV)")
    demo.set_defaults(func=_cmd_demo)

    cli_check_firmware.add_parser(sub, parents=[common])

    check = add_parser("host-check",
                           help="what this host can run: TCG, KVM, SEV, SEV-ES, SNP")
    check.add_argument("--qemu", metavar="BINARY",
                       help="the QEMU to probe (default: qemu-system-x86_64)")
    check.add_argument("--json", action="store_true",
                       help="print one JSON object on stdout")
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
        # launch error) may add the log tails that explain it below.
        first, _, rest = str(exc).partition("\n")
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

