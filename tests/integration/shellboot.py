"""Boot a firmware to its UEFI shell and explain the log, as a user would:
shared by the explain-log and baseline tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness.build import edk2
from harness.vm.config import MachineConfig
from harness.vm.devices import BlockDevice
from harness.vm.machine import QemuMachine
from harness.vm.sev import SevConfig


def boot_to_shell(firmware: edk2.Firmware, where: Path, *, sev: SevConfig | None = None,
                  qemu: str = "qemu-system-x86_64") -> Path:
    """Boot with one empty disk first in the boot order (nothing bootable on
    it) until the shell loads; the debug log."""
    disk = where / "empty.img"
    where.mkdir(parents=True, exist_ok=True)
    disk.write_bytes(bytes(4 << 20))
    config = MachineConfig(code=firmware.code, vars_template=firmware.vars, accel="tcg",
                           sev=sev, qemu=qemu, serial_input=False,
                           devices=(BlockDevice(disk, bootindex=0),))
    with QemuMachine(config, where / "vm") as vm:
        vm.debugcon.expect(r"Loading driver at \S+ EntryPoint=\S+ Shell\.efi", timeout=240)
        return vm.debugcon_log


def explain_json(log: Path, *extra: str) -> dict[str, Any]:
    """``ebs-harness explain-log LOG --json``, a whole process: its explanation."""
    proc = subprocess.run([sys.executable, "-m", "harness", "explain-log", str(log), "--json",
                           *extra], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)["explanation"]
    return data
