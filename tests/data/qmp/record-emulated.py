#!/usr/bin/env python3
"""Record the QMP replies of the harness's QEMU (emulated SEV) that the unit
tests read: qom-list-properties of the sev-emulated class under TCG (how the
host probe finds the emulation and whether it has SEV-ES), query-sev of a
sev-emulated guest while paused (-S, after machine creation) and running,
and of an emulated SEV-ES and SEV-SNP guest while paused.

    .venv/bin/python tests/data/qmp/record-emulated.py QEMU_BINARY OVMF_FD

QEMU_BINARY: ``ebs-harness build-qemu --json`` prints it (``qemu``);
OVMF_FD: the one-image ``OVMF.fd`` of a harness firmware build (SEV-SNP
launches from its SEV metadata, which Debian's OVMF of 2022.11 lacks). The
QEMUs are started and spoken to as the harness does it (its machine, and
its one QMP client).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from harness.vm.config import MachineConfig
from harness.vm.host import bare_qemu_qmp
from harness.vm.machine import QemuMachine
from harness.vm.runner import LocalRunner
from harness.vm.sev import SevConfig

STOCK_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
STOCK_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")


def save(name: str, result: object) -> None:
    reply = {"return": result}
    (HERE / name).write_text(json.dumps(reply, sort_keys=True) + "\n")
    print(name, reply)


def main() -> None:
    qemu = sys.argv[1]
    save("qom-list-properties-sev-emulated.json",
         bare_qemu_qmp(LocalRunner(), qemu, "tcg", "qom-list-properties",
                       {"typename": "sev-emulated"}))
    with paused(qemu, SevConfig("emulated", 47, 1, policy=0x3)) as vm:
        save("query-sev-emulated-paused.json", vm.qmp("query-sev"))
        vm.qmp("cont")
        save("query-sev-emulated-running.json", vm.qmp("query-sev"))
    with paused(qemu, SevConfig("emulated-es", 47, 1, policy=0x7)) as vm:
        save("query-sev-emulated-es-paused.json", vm.qmp("query-sev"))
    with paused(qemu, SevConfig("emulated-snp", 47, 1), code=Path(sys.argv[2])) as vm:
        save("query-sev-emulated-snp-paused.json", vm.qmp("query-sev"))


@contextlib.contextmanager
def paused(qemu: str, sev: SevConfig, code: Path = STOCK_CODE) -> Iterator[QemuMachine]:
    """OVMF (Debian's unless ``code``) under ``sev``, paused after machine
    creation (``-S``)."""
    config = MachineConfig(code=code, vars_template=STOCK_VARS, accel="tcg", sev=sev,
                           qemu=qemu, debugcon=False, serial_input=False)
    with tempfile.TemporaryDirectory() as tmp:
        vm = QemuMachine(config, Path(tmp))
        try:
            vm.launch(start=False)
            yield vm
        finally:
            vm.shutdown()


if __name__ == "__main__":
    main()
