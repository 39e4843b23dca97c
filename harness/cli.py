"""The ``ebs-harness`` command (design.md section 5).

Exit status: 0 every verdict held; 1 a verdict failed; 2 bad input or usage
(one line on stderr); 3 the environment failed (QEMU would not start, a
timeout, a missing tool). Each sub-command is a ``_cmd_*`` function that
returns the status; errors from :mod:`harness.errors` become one line and
their ``exit_status`` here, in one place.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.errors import (
    EXIT_ENVIRONMENT,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VIOLATION,
    HarnessError,
    UsageError,
)

LOG = logging.getLogger(__name__)


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


# --------------------------------------------------------------- build


def _cmd_build(args: argparse.Namespace) -> int:
    from harness import edk2

    progress = None if args.quiet else edk2.StderrProgress()
    result = edk2.build_firmware(
        source=edk2.source_from_option(args.edk2_src),
        rebuild=args.rebuild,
        progress=progress,
    )
    if args.json:
        _print_json({
            "firmware_dir": str(result.firmware.path),
            "cache_hit": result.cache_hit,
            "key": result.firmware.key,
            "seconds": round(result.seconds, 3),
        })
    else:
        what = "cache hit" if result.cache_hit else "built"
        print(f"{result.firmware.path} ({what}, {result.seconds:.1f} s)")
    return EXIT_OK


# ----------------------------------------------------------- host-check


def _cmd_host_check(args: argparse.Namespace) -> int:
    from harness import host

    caps = host.probe(qemu=args.qemu)
    if args.json:
        _print_json(caps.to_json())
    else:
        print(f"QEMU     {caps.qemu} {caps.qemu_version}")
        for name in ("tcg", "kvm", "sev", "sev_es", "snp"):
            cap = caps.capability(name)
            print(f"{name:8} {'yes' if cap.available else 'no ':3}  {cap.reason}")
        if caps.cbitpos is not None:
            print(f"SEV      cbitpos {caps.cbitpos}, "
                  f"reduced-phys-bits {caps.reduced_phys_bits}")
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
    from harness import report, trace

    result, sym = trace.analyze_log(args.log, _firmware_dir(args.firmware))
    if args.html:
        Path(args.html).write_text(report.render_html(result, sym), encoding="utf-8")
    if args.json:
        _print_json({
            "verdict": "pass" if result.passed else "fail",
            "violations": [v.as_json() for v in result.violations],
            "ebs_calls": [{"enter_seq": a.enter.seq, "exit_seq": a.exit.seq,
                           "succeeded": a.succeeded,
                           "teardowns": [t.begin.seq for t in a.teardowns]}
                          for a in result.timeline.attempts],
            "notes": list(result.anomalies),
        })
    else:
        sys.stdout.write(report.render_text(result, sym))
    return EXIT_OK if result.passed else EXIT_VIOLATION


def _cmd_analyze_dump(args: argparse.Namespace) -> int:
    from harness import dump, report, symbols, trace

    firmware = _firmware_dir(args.firmware)
    parsed = trace.parse_log(args.log)
    sym = symbols.Symbolizer(parsed.images, firmware)
    maphead_symbol = sym.symbol_address("IoMmuDxe", "mMapInfos") if firmware else None
    canary = dump.load_canary(args.canary) if args.canary else None
    result = dump.analyze_dump(args.dump, parsed, maphead_symbol=maphead_symbol,
                               canary=canary, scope=args.scan)
    if args.json:
        _print_json(result.as_json())
    else:
        sys.stdout.write(report.render_dump_text(result))
    return EXIT_OK if result.passed else EXIT_VIOLATION


# ---------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebs-harness",
        description="Build a patched OVMF and check the IOMMU teardown at "
                    "ExitBootServices on QEMU guests.")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines on stderr")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="COMMAND")

    build = sub.add_parser("build", help="build (or reuse) the patched OVMF")
    build.add_argument("--edk2-src", metavar="DIR",
                       help="an edk2 tree to use instead of Debian's source "
                            "package (copied, never modified); also "
                            "EBS_HARNESS_EDK2_SRC")
    build.add_argument("--rebuild", action="store_true",
                       help="build even if the cache has this firmware")
    build.add_argument("--json", action="store_true",
                       help="print one JSON object on stdout")
    build.set_defaults(func=_cmd_build)

    alog = sub.add_parser("analyze-log", help="EBS timeline and verdicts V1..V4 of a debug log")
    alog.add_argument("log", metavar="LOG", help="debug-port or serial log of a boot")
    alog.add_argument("--firmware", metavar="DIR",
                      help="firmware dir whose modules/*.debug|.map symbolize handlers")
    alog.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    alog.add_argument("--html", metavar="FILE",
                      help="also write the timeline as a self-contained HTML page")
    alog.set_defaults(func=_cmd_analyze_log)

    adump = sub.add_parser("analyze-dump",
                           help="verdicts D1..D3 of a dump-guest-memory ELF core")
    adump.add_argument("dump", metavar="DUMP", help="QEMU dump-guest-memory file (ELF)")
    adump.add_argument("--log", required=True, metavar="LOG",
                       help="the debug log of the same boot (maphead, sharedbit, images)")
    adump.add_argument("--firmware", metavar="DIR",
                       help="firmware dir; cross-checks maphead with IoMmuDxe's mMapInfos")
    adump.add_argument("--canary", metavar="FILE", help="the run's canary file (D3)")
    adump.add_argument("--scan", choices=("auto", "shared", "all"), default="auto",
                       help="D3 scope: auto = shared pages under emulation, else all RAM")
    adump.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    adump.set_defaults(func=_cmd_analyze_dump)

    check = sub.add_parser("host-check",
                           help="what this host can run: TCG, KVM, SEV, SEV-ES, SNP")
    check.add_argument("--qemu", metavar="BINARY", default="qemu-system-x86_64",
                       help="the QEMU to probe (default: qemu-system-x86_64)")
    check.add_argument("--json", action="store_true",
                       help="print one JSON object on stdout")
    check.set_defaults(func=_cmd_host_check)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help 0
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except HarnessError as exc:
        # One line says what went wrong; environment failures (a timeout, a
        # launch error) may add the log tails that explain it below.
        first, _, rest = str(exc).partition("\n")
        print(f"ebs-harness {args.command}: {first}", file=sys.stderr)
        if rest and exc.exit_status == EXIT_ENVIRONMENT:
            print(rest, file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"ebs-harness {args.command}: interrupted", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except OSError as exc:
        print(f"ebs-harness {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, FileNotFoundError) else EXIT_ENVIRONMENT


if __name__ == "__main__":
    sys.exit(main())

