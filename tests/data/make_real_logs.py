#!/usr/bin/env python3
"""Regenerate the real firmware logs of tests/data/ (see README.md here).

    .venv/bin/python tests/data/make_real_logs.py

Builds (or takes from the cache) the patched firmware the harness tests,
boots the probe under TCG in the IOMMU emulation mode once per log, with
the fw_cfg knobs and ``ebs-probe.cfg`` of the README's table, until the
probe parks, and keeps each debug log trimmed like the emulated-SEV logs
(every ``EBST`` and ``Loading driver at`` line stays). The symbols those
logs' addresses belong to go to ``fw-emu/modules/``: ``strip --strip-debug``
copies of the traced modules' ``.debug`` files (``.symtab`` only) and
``DxeCore.map`` cut to its section lines.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from make_sev_logs import NOISE, trimmed_map

from harness import scenario
from harness.build import edk2
from harness.build.progress import StderrProgress
from harness.vm import devices, host, machine

#: Log name -> the scenario, and fw_cfg knobs replacing the scenario's
#: (None: the scenario's own).
CASES: dict[str, tuple[scenario.Scenario, dict[str, str] | None]] = {
    "callback-depth2": (scenario.Scenario(ebs_mode="callback", requeue_depth=2), None),
    "legacy-depth2": (scenario.Scenario(ebs_mode="legacy", requeue_depth=2), None),
    "legacy-depth1": (scenario.Scenario(ebs_mode="legacy", requeue_depth=1), None),
    "none-leak": (scenario.Scenario(ebs_mode="none", leak_mapping=True), None),
    "callback-stale": (scenario.Scenario(leak_mapping=True, stale_mapkey=True), None),
    # no knob at all: the firmware as a plain guest runs it
    "stock-noknobs": (scenario.Scenario(iommu_emulation=False), {}),
}
#: Modules whose symbols the tests read, as .debug files.
DEBUG_MODULES = ("IoMmuDxe", "VirtioBlkDxe", "EbsAdversaryDxe", "EbsProbe")


def record(firmware: edk2.Firmware, caps: host.HostCaps, name: str,
           chosen: scenario.Scenario, knobs: dict[str, str] | None) -> None:
    chosen = dataclasses.replace(chosen, accel="tcg")
    with tempfile.TemporaryDirectory() as tmp:
        canary = scenario.make_canary()
        image = scenario.write_guest(firmware, chosen, Path(tmp), canary)
        config = scenario.machine_config(
            firmware, chosen, devices.parse_devices(",".join(chosen.devices), image), caps,
            canary)
        if knobs is not None:
            config = dataclasses.replace(config, fw_cfg=knobs)
        with machine.QemuMachine(config, Path(tmp) / "vm", name=name) as vm:
            vm.debugcon.expect(scenario.PARKED, timeout=chosen.timeout)
            text = vm.debugcon_log.read_text(encoding="latin-1")
    kept = [line for line in text.splitlines(keepends=True) if not NOISE.match(line)]
    (HERE / f"{name}.log").write_text("".join(kept), encoding="latin-1")
    print(f"{name}.log: {len(kept)} lines")


def symbols(firmware: edk2.Firmware) -> None:
    out = HERE / "fw-emu" / "modules"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for module in DEBUG_MODULES:
        subprocess.run(["strip", "--strip-debug", "-o", str(out / f"{module}.debug"),
                        str(firmware.module_file(module, ".debug"))], check=True)
    source = firmware.module_file("DxeCore", ".map").read_text(errors="replace")
    (out / "DxeCore.map").write_text(trimmed_map(source))


def main() -> None:
    firmware = edk2.build_firmware(progress=StderrProgress()).output
    caps = host.probe(tcg_only=True)
    for name, (chosen, knobs) in CASES.items():
        record(firmware, caps, name, chosen, knobs)
    symbols(firmware)


if __name__ == "__main__":
    main()
