"""``ebs-harness check-firmware DIR``: the static C3 check alone.

It reads ``DIR/modules/IoMmuDxe.debug`` and prints every path from the
teardown the DXE core calls to a boot service, a PCD protocol, a table read,
an unfollowed indirect call or an ``sti`` (:mod:`harness.analysis.teardown_static`,
``docs/static-check.md``). Exit status: 0 no path, 1 a path found, 2 ``DIR``
is no firmware build (or its IoMmuDxe has no such teardown).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.analysis import teardown_static
from harness.errors import EXIT_OK, EXIT_VIOLATION

#: The ``--json`` layout's version (the ``schema`` key every command prints).
JSON_SCHEMA = 1


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()
               ) -> argparse.ArgumentParser:
    """Add ``check-firmware`` to ``subparsers`` (an argparse sub-parsers action)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "check-firmware", parents=list(parents),
        help="static C3: every path from the IOMMU teardown to a boot service, in the "
             "built IoMmuDxe")
    parser.add_argument("firmware", metavar="DIR",
                        help="a firmware directory from 'ebs-harness build' "
                             "(reads modules/IoMmuDxe.debug)")
    parser.add_argument("--entry", metavar="FUNCTION", default=teardown_static.ENTRY,
                        help=f"the function to start from (default: "
                             f"{teardown_static.ENTRY}, the one the DXE core calls)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Check ``args.firmware``; 0 when no path is found, 1 when one is.

    :raises UsageError: not a firmware build (exit 2).
    """
    result = teardown_static.check_firmware(Path(args.firmware), args.entry)
    if args.json:
        violations = [{"check": "C3-static", "detail": f.line()} for f in result.findings]
        json.dump({"schema": JSON_SCHEMA, "violations": violations, **result.as_dict()},
                  sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for line in teardown_static.lines(result):
            print(line)
    return EXIT_VIOLATION if result.findings else EXIT_OK
