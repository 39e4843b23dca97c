#!/usr/bin/env python3
"""Regenerate the emulated-SEV logs of tests/data/ (see README.md here).

    .venv/bin/python tests/data/make_sev_logs.py

Builds (or takes from the cache) the patched firmware, its
``firmware-variants/teardown-reads-a-dynamic-pcd.patch`` variant and the
harness's QEMU, boots the probe under emulated SEV with the adversary at
depth 2, and keeps each debug log (trimmed like make_real_logs.py: every
``EBST`` and ``Loading driver at`` line stays) with the symbols of the
modules its contract lines name, as ``.map`` files cut to their section
lines, in ``fw-sev/`` and ``fw-sev-pcd/``.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from harness import scenario
from harness.build import edk2, qemu
from harness.build.progress import StderrProgress
from harness.vm import host

#: The noisiest DEBUG families, trimmed from every real log kept here.
NOISE = re.compile(r"^(InstallProtocolInterface|ProtectUefiImageCommon|  - 0x|"
                   r"PixelBlueGreenRedReserved|Select Item|SetUefiImageMemoryAttributes)")
#: Modules whose functions the contract lines and handlers of these boots name.
MODULES = ("DxeCore", "IoMmuDxe", "PcdDxe", "BdsDxe", "EbsAdversaryDxe",
           "ReportStatusCodeRouterRuntimeDxe")
SECTION = re.compile(r"^ \.(text|data|bss)\.\S+")


def trimmed_map(text: str) -> str:
    """The section lines of a GNU ld map with their address lines."""
    out: list[str] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if SECTION.match(line):
            out.append(line)
            if len(line.split()) == 1 and index + 1 < len(lines):
                out.append(lines[index + 1])
    return "\n".join(out) + "\n"


def record(firmware: edk2.Firmware, caps: host.HostCaps, name: str, symbols: str) -> None:
    chosen = scenario.Scenario(ebs_mode="callback", requeue_depth=2, sev="emulated")
    with tempfile.TemporaryDirectory() as tmp:
        result = scenario.run_scenario(firmware, chosen, Path(tmp), caps=caps)
        text = result.debug_log.read_text(encoding="latin-1")
    kept = [line for line in text.splitlines(keepends=True) if not NOISE.match(line)]
    (HERE / name).write_text("".join(kept), encoding="latin-1")
    out = HERE / symbols / "modules"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for module in MODULES:
        source = firmware.module_file(module, ".map").read_text(errors="replace")
        (out / f"{module}.map").write_text(trimmed_map(source))
    print(f"{name}: {len(kept)} lines, {sorted(result.failed_checks())} failed, "
          f"{len(result.log.findings)} findings")


def main() -> None:
    progress = StderrProgress()
    caps = host.probe(str(qemu.build_qemu(progress=progress).output.binary))
    firmware = edk2.build_firmware(progress=progress).output
    variant = edk2.build_variant(HERE / "firmware-variants" / "teardown-reads-a-dynamic-pcd.patch",
                                 progress=progress).output
    record(firmware, caps, "emulated-sev-callback-depth2.log", "fw-sev")
    record(variant, caps, "emulated-sev-pcd-in-teardown.log", "fw-sev-pcd")


if __name__ == "__main__":
    main()
