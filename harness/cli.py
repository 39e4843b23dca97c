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
from pathlib import Path
from typing import Any, Callable, Sequence

from harness.errors import EXIT_ENVIRONMENT, EXIT_OK, EXIT_USAGE, HarnessError

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
        print(f"ebs-harness {args.command}: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"ebs-harness {args.command}: interrupted", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except OSError as exc:
        print(f"ebs-harness {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, FileNotFoundError) else EXIT_ENVIRONMENT


if __name__ == "__main__":
    sys.exit(main())

