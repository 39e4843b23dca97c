#!/usr/bin/env python3
"""Write the synthetic trace logs of tests/data/ (see README.md there).

Each log is ``base/ovmf-stock-boot.log`` (a trimmed real boot log of the stock
edk2 2022.11 DEBUG build: real "Loading driver at" lines, so real addresses
that symbolize against that build) with ``EBST`` lines of trace format v1
inserted where the patched firmware prints them, and an EBS sequence at the
end that follows the DXE core's dispatch rules (TPL_CALLBACK FIFO queue, re-signalled
events appended at its tail). Run it from anywhere; it rewrites the
``synthetic-*.log`` files next to it and nothing else.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

IOMMU_BASE = 0x1ECC7000
MAPHEAD = IOMMU_BASE + 0x57B0               # mMapInfos in the reference build
IOMMU_EXIT = IOMMU_BASE + 0x12AC            # IoMmuDxe!IoMmuExitBoot
IOMMU_UNMAP_ALL = IOMMU_BASE + 0x3790       # IoMmuDxe!IoMmuUnmapAllMappings
BLK_EXIT = 0x1EC07000 + 0x1890              # VirtioBlkDxe!VirtioBlkExitBoot
NET_EXIT = 0x1E8C9000 + 0x1ED9              # VirtioNetDxe!VirtioNetExitBoot
CORE_FN = 0x1FE8A000 + 0x10AED              # a DxeCore function (nested TPL_NOTIFY)
ADV_BASE = 0x1E000000
ADV_LOAD = (f"Loading driver at 0x000{ADV_BASE:08X} EntryPoint=0x000{ADV_BASE + 0x1240:08X} "
            "EbsAdversaryDxe.efi")
ADV_STAGE = ADV_BASE + 0x1400               # no symbols: EbsAdversaryDxe+0x1400


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.maps: dict[int, tuple[int, int, int, int]] = {}
        self.next_map = 0x1E5F0018
        self.events = 0x1F000000

    def ebst(self, text: str) -> None:
        self.lines.append("EBST " + text)

    def map(self, op: int, host: int, pages: int) -> int:
        addr = self.next_map
        self.next_map += 0x40
        dev = host if op in (2, 5) else 0x1E100000 + (addr & 0xFFFF) * 0x10
        self.maps[addr] = (op, host, dev, pages)
        self.ebst(f"iommu-map map={addr:#x} op={op} host={host:#x} dev={dev:#x} "
                  f"pages={pages} live={len(self.maps)}")
        return addr

    def unmap(self, addr: int) -> None:
        op, host, dev, pages = self.maps.pop(addr)
        self.ebst(f"iommu-unmap map={addr:#x} op={op} host={host:#x} dev={dev:#x} "
                  f"pages={pages} live={len(self.maps)}")

    def handler(self, fn: int, tpl: int, body: list[str] | None = None) -> tuple[int, int]:
        self.events += 0x30
        ev = self.events
        self.ebst(f"notify-begin event={ev:#x} fn={fn:#x} ctx=0x0 tpl={tpl}")
        return ev, fn

    def end(self, handle: tuple[int, int]) -> None:
        self.ebst(f"notify-end event={handle[0]:#x} fn={handle[1]:#x}")

    def teardown(self, scheme: str) -> None:
        live = dict(self.maps)
        self.ebst(f"teardown-begin scheme={scheme} live={len(live)}")
        for addr, (op, host, dev, pages) in live.items():
            self.ebst(f"teardown-unmap map={addr:#x} op={op} host={host:#x} dev={dev:#x} "
                      f"pages={pages}")
            del self.maps[addr]
        self.ebst(f"teardown-end unmapped={len(live)} live=0")

    def adversary_access(self) -> None:
        addr = self.map(1, 0x1DF00000, 1)
        _op, host, dev, pages = self.maps[addr]
        self.ebst(f"device-access module=EbsAdversaryDxe kind=map map={addr:#x} "
                  f"host={host:#x} dev={dev:#x} pages={pages}")
        self.unmap(addr)


def scenario(scheme: str, depth: int | None, leak: bool = False, stale: bool = False,
             nested: bool = True) -> str:
    base = (HERE / "base" / "ovmf-stock-boot.log").read_bytes().decode("latin-1")
    out: list[str] = []
    log = Log()
    for line in base.split("\r\n" if "\r\n" in base else "\n"):
        if not line:
            continue
        out.append(line)
        if "DxeCore.efi" in line and line.startswith("Loading PEIM"):
            out.append("EBST version v=1 module=DxeCore")
        elif "IoMmuDxe.efi" in line:
            out.append("EBST version v=1 module=IoMmuDxe")
            out.append(f"EBST iommu-config scheme={scheme} emulation=1 sharedbit=52 "
                       f"maphead={MAPHEAD:#x}")
            if depth is not None:
                out.append(ADV_LOAD)
                out.append("EBST version v=1 module=EbsAdversaryDxe")
        elif "VirtioBlkDxe.efi" in line:
            out.append("VirtioBlkInit: ring setup")
            log.lines = []
            log.ebst("iommu-alloc host=0x1E6A0000 pages=3")
            log.map(5, 0x1E6A0000, 3)          # the virtio ring, CommonBuffer64
            for i in range(3):                  # a few reads through bounce buffers
                m = log.map(1, 0x1E7B0000 + i * 0x1000, 1)
                log.unmap(m)
            out.extend(log.lines)
    log.lines = []
    # The probe application: version, canary read, optional leak.
    log.ebst("version v=1 module=EbsProbe")
    m = log.map(1, 0x1D800000, 1)
    log.unmap(m)
    log.ebst("probe step=canary-read bytes=4096")
    if leak:
        m = log.map(1, 0x1D900000, 1)
        log.ebst(f"probe step=leak map={m:#x}")
    if stale:
        log.ebst("ebs-enter mapkey=0x1233")
        log.ebst("ebs-fail status=0x8000000000000002")
        log.ebst("probe step=stale-ebs status=0x8000000000000002")
        m = log.map(1, 0x1D800000, 1)
        log.unmap(m)
        log.ebst("probe step=recheck ok=1")
    log.ebst("ebs-enter mapkey=0x1234")
    # TPL_CALLBACK queue of the EBS group, in creation order (newest first).
    queue: list[str] = []
    if depth is not None:
        queue.append("adv0")
    queue += ["blk", "iommu"]
    stage = 0
    while queue:
        item = queue.pop(0)
        if item.startswith("adv"):
            k = int(item[3:])
            h = log.handler(ADV_STAGE + (0x40 if k else 0), 8)
            log.ebst(f"adversary-stage n={k} of={depth}")
            if k == 0 and nested:
                inner = log.handler(CORE_FN, 16)
                log.end(inner)
            assert depth is not None
            if k < depth:
                queue.append(f"adv{k + 1}")
            else:
                log.adversary_access()
            log.end(h)
        elif item == "blk":
            h = log.handler(BLK_EXIT, 8)
            log.end(h)
        elif item == "iommu":
            h = log.handler(IOMMU_EXIT, 8)
            if scheme == "legacy":
                queue.append("unmapall")
            log.end(h)
        elif item == "unmapall":
            h = log.handler(IOMMU_UNMAP_ALL, 8)
            log.teardown("legacy")
            log.end(h)
        stage += 1
    if scheme == "callback":
        log.ebst("ebs-callback revision=0x2")
        log.teardown("callback")
    log.ebst("ebs-return status=0x0")
    log.ebst("probe-parked")
    out.extend(log.lines)
    return "\r\n".join(out) + "\r\n"


SCENARIOS = {
    "synthetic-callback-depth2.log": {"scheme": "callback", "depth": 2},
    "synthetic-legacy-depth2.log": {"scheme": "legacy", "depth": 2},
    "synthetic-legacy-depth1.log": {"scheme": "legacy", "depth": 1},
    "synthetic-callback-stale.log": {"scheme": "callback", "depth": None, "stale": True},
    "synthetic-none-leak.log": {"scheme": "none", "depth": None, "leak": True},
}


def main() -> None:
    for name, kwargs in SCENARIOS.items():
        (HERE / name).write_bytes(scenario(**kwargs).encode("latin-1"))  # type: ignore[arg-type]
        print(name)


if __name__ == "__main__":
    main()
