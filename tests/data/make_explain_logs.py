#!/usr/bin/env python3
"""Make the logs of tests/data/explain/ (see README.md here).

    .venv/bin/python tests/data/make_explain_logs.py [--faults-only]

(``--faults-only``: only the fault logs and ``fw-fault/``, after a change to
EbsAdversaryDxe or to the variant patch moved the injected lines.)

Real boots, nothing written by hand:

- ``stock-empty-disk.log`` / ``stock-empty-disk-serial.log``: the baseline
  edk2 as Debian ships it, a DEBUG build without the series (what
  ``harness.build.edk2.build_unpatched`` builds), booted under TCG with one
  empty virtio disk as the first boot option: BDS finds no boot file on it
  and falls back to the UEFI shell. Debug port and serial port.
- ``stock-2025.02-empty-disk.log``: the same boot of Debian 13's edk2
  2025.02, stock (``build_unpatched(baseline="2025.02")``).
- ``stock-cut.log``: ``stock-empty-disk.log`` cut in the middle of a line
  during DXE dispatch (the first image load after 40 % of the file).
- ``debian-packaged-serial.log``: Debian's packaged OVMF
  (``/usr/share/OVMF/OVMF_CODE.fd``, which prints nothing on the debug
  port) booted to its shell: the serial console.
- ``fault-pf-serial.log`` / ``fault-pf.log``: the harness's firmware with
  ``firmware-variants/adversary-faults.patch``, fw_cfg ``fault=pf``: the
  adversary's entry point writes to an unmapped address; the #PF dump is on
  the serial port, the load map on the debug port.
- ``fault-assert.log``: the same firmware with ``fault=assert``: an ASSERT.
- ``fw-fault/modules/``: that build's ``EbsAdversaryDxe.debug`` (with its
  DWARF) and its symbol index, for ``--firmware``.
- ``emulated-sev-es-mmio-refused.log`` / ``...-serial.log``: the series on
  2025.02 with ``firmware-variants/edk2-2025.02/mmconfig-keeps-its-cbit.patch``
  under the emulated SEV-ES of the harness's QEMU: the #VC handler refuses
  the first PCI configuration access through the encrypted MMCONFIG mapping
  (the debug log's last line); the #GP's dump is on the serial port.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "explain"
sys.path.insert(0, str(HERE.parents[1]))

from harness.analysis import symbols
from harness.build import edk2, qemu
from harness.build.progress import StderrProgress
from harness.vm import host
from harness.vm.config import MachineConfig
from harness.vm.devices import BlockDevice
from harness.vm.machine import QemuMachine

FAULTS = HERE / "firmware-variants" / "adversary-faults.patch"
MMCONFIG = HERE / "firmware-variants" / "edk2-2025.02" / "mmconfig-keeps-its-cbit.patch"
DEBIAN_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
DEBIAN_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")


def boot(config: MachineConfig, console: str, pattern: str, work: Path) -> QemuMachine:
    """Boot until ``pattern`` on ``console``, let it settle, end QEMU."""
    with QemuMachine(config, work) as vm:
        getattr(vm, console).expect(pattern, timeout=180, failure=[])
        time.sleep(1.0)
    return vm


def keep(source: Path, name: str) -> Path:
    target = OUT / name
    shutil.copyfile(source, target)
    print(f"{name}: {sum(1 for _ in target.open('rb'))} lines")
    return target


def cut(source: Path, name: str) -> None:
    data = source.read_bytes()
    start = data.index(b"Loading driver at", int(len(data) * 0.4))
    (OUT / name).write_bytes(data[:start + 30])
    print(f"{name}: cut at byte {start + 30} of {len(data)}")


def main() -> None:
    progress = StderrProgress()
    OUT.mkdir(exist_ok=True)
    faults = edk2.build_variant(FAULTS, progress=progress).output
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "--faults-only" not in sys.argv[1:]:
            stock_logs(progress, work)
            sev_es_logs(progress, work)
        for mode, console, pattern in (("pf", "serial", r"!!!! Find image"),
                                       ("assert", "debugcon", r"ASSERT ")):
            vm = boot(MachineConfig(code=faults.code, vars_template=faults.vars, accel="tcg",
                                    serial_input=False,
                                    fw_cfg={"opt/org.ebs-harness/fault": mode}),
                      console, pattern, work / mode)
            if mode == "pf":
                keep(vm.serial_log, "fault-pf-serial.log")
                keep(vm.debugcon_log, "fault-pf.log")
            else:
                keep(vm.debugcon_log, "fault-assert.log")
    modules = OUT / "fw-fault" / "modules"
    shutil.rmtree(modules, ignore_errors=True)
    modules.mkdir(parents=True)
    shutil.copyfile(faults.module_file("EbsAdversaryDxe", ".debug"),
                    modules / "EbsAdversaryDxe.debug")
    symbols.write_index(modules)


def sev_es_logs(progress: StderrProgress, work: Path) -> None:
    variant = edk2.build_variant(MMCONFIG, progress=progress).output
    caps = host.cached_probe(str(qemu.build_qemu(progress=progress).output.binary),
                             tcg_only=True)
    sev = host.sev_config("emulated-es", caps)
    vm = boot(MachineConfig(code=variant.code, vars_template=variant.vars, accel="tcg",
                            sev=sev, qemu=caps.qemu, serial_input=False),
              "serial", r"!!!! Find image", work / "sev-es")
    keep(vm.debugcon_log, "emulated-sev-es-mmio-refused.log")
    keep(vm.serial_log, "emulated-sev-es-mmio-refused-serial.log")


def stock_logs(progress: StderrProgress, work: Path) -> None:
    """The stock and Debian logs, and the cut one."""
    stock = edk2.build_unpatched(progress=progress, baseline="2022.11").output
    disk = work / "empty.img"
    disk.write_bytes(bytes(4 << 20))
    vm = boot(MachineConfig(code=stock.code, vars_template=stock.vars, accel="tcg",
                            serial_input=False, devices=(BlockDevice(disk, bootindex=0),)),
              "serial", r"startup\.nsh", work / "stock")
    debug = keep(vm.debugcon_log, "stock-empty-disk.log")
    keep(vm.serial_log, "stock-empty-disk-serial.log")
    cut(debug, "stock-cut.log")

    newer = edk2.build_unpatched(progress=progress, baseline="2025.02").output
    vm = boot(MachineConfig(code=newer.code, vars_template=newer.vars, accel="tcg",
                            serial_input=False, devices=(BlockDevice(disk, bootindex=0),)),
              "serial", r"startup\.nsh", work / "newer")
    keep(vm.debugcon_log, "stock-2025.02-empty-disk.log")

    vm = boot(MachineConfig(code=DEBIAN_CODE, vars_template=DEBIAN_VARS, accel="tcg",
                            serial_input=False), "serial", r"startup\.nsh", work / "debian")
    keep(vm.serial_log, "debian-packaged-serial.log")


if __name__ == "__main__":
    main()
