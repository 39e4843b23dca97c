#!/usr/bin/env python3
"""Record the QMP replies of the harness's QEMU (emulated SEV) that the unit
tests read: query-sev-capabilities under TCG, and query-sev of a
sev-emulated-guest while paused (-S, after machine creation) and running.

    .venv/bin/python tests/data/qmp/record-emulated.py QEMU_BINARY

QEMU_BINARY: ``ebs-harness build-qemu --json`` prints it (``qemu``).
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

HERE = Path(__file__).resolve().parent


def session(qemu: str, *args: str) -> tuple[subprocess.Popen[bytes], QEMUMonitorProtocol]:
    sock = Path(tempfile.mkdtemp(prefix="ebs-record-")) / "qmp.sock"
    proc = subprocess.Popen([qemu, "-display", "none", "-nodefaults", *args,
                             "-qmp", f"unix:{sock},server=on,wait=off"])
    while not sock.exists():
        time.sleep(0.05)
    qmp = QEMUMonitorProtocol(str(sock))
    qmp.connect()
    return proc, qmp


def save(name: str, reply: dict[str, object]) -> None:
    (HERE / name).write_text(json.dumps(reply, sort_keys=True) + "\n")
    print(name, reply)


def main() -> None:
    qemu = sys.argv[1]
    proc, qmp = session(qemu, "-machine", "none", "-accel", "tcg")
    save("query-sev-capabilities-emulated.json", qmp.cmd_raw("query-sev-capabilities"))
    qmp.close()
    proc.kill()
    proc.wait()

    proc, qmp = session(qemu, "-S", "-accel", "tcg", "-machine",
                        "q35,confidential-guest-support=sev0", "-object",
                        "sev-emulated-guest,id=sev0,cbitpos=47,reduced-phys-bits=1,policy=0x3")
    save("query-sev-emulated-paused.json", qmp.cmd_raw("query-sev"))
    qmp.cmd_raw("cont")
    save("query-sev-emulated-running.json", qmp.cmd_raw("query-sev"))
    qmp.close()
    proc.kill()
    proc.wait()


if __name__ == "__main__":
    main()
