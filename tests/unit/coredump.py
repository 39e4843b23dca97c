"""Write small memory dumps in the format of QEMU's ``dump-guest-memory``.

Written from QEMU 7.2 ``dump/dump.c`` and ``target/i386/arch_dump.c`` (not
from harness.analysis.dump, which reads them): ELF64 header, program headers at 64,
one PT_NOTE (a ``CORE`` NT_PRSTATUS and a ``QEMU`` QEMUCPUState note per
CPU), then one PT_LOAD per RAM block, ``p_paddr`` the guest-physical address.
A real dump of a 512 MiB TCG guest has the same layout (checked with
``readelf -lnW``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

PAGE = 4096
PRSTATUS_SIZE = 336


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name0 = name + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)
    return struct.pack("<III", len(name0), len(desc), ntype) + pad(name0) + pad(desc)


def qemu_cpu_state(cr3: int, rip: int = 0x1E6E1A3D, cr4: int = 0x668) -> bytes:
    regs = [0] * 18
    regs[16] = rip
    segments = b"\0" * (24 * 10)
    cr = [0x80010033, 0, 0, cr3, cr4]
    body = struct.pack("<18Q", *regs) + segments + struct.pack("<5Q", *cr) + struct.pack("<Q", 0)
    return struct.pack("<II", 1, 8 + len(body)) + body


@dataclass
class Core:
    """Guest RAM blocks (``paddr -> bytearray``) and the CPU's CR3."""

    blocks: dict[int, bytearray] = field(default_factory=dict)
    cr3: int = 0x1000
    cr4: int = 0x668
    cpus: int = 1

    def ram(self, paddr: int, size: int) -> bytearray:
        self.blocks[paddr] = bytearray(size)
        return self.blocks[paddr]

    def poke(self, paddr: int, data: bytes) -> None:
        for base, block in self.blocks.items():
            if base <= paddr and paddr + len(data) <= base + len(block):
                block[paddr - base:paddr - base + len(data)] = data
                return
        raise ValueError(f"{paddr:#x} not in RAM")

    def u64(self, paddr: int, value: int) -> None:
        self.poke(paddr, struct.pack("<Q", value))

    def image(self) -> bytes:
        notes = b"".join(note(b"CORE", 1, b"\0" * PRSTATUS_SIZE)
                         + note(b"QEMU", 0, qemu_cpu_state(self.cr3, cr4=self.cr4))
                         for _ in range(self.cpus))
        blocks = sorted(self.blocks.items())
        phnum = 1 + len(blocks)
        offset = 64 + 56 * phnum
        phdrs = [struct.pack("<IIQQQQQQ", 4, 0, offset, 0, 0, len(notes), len(notes), 0)]
        offset += len(notes)
        for paddr, block in blocks:
            phdrs.append(struct.pack("<IIQQQQQQ", 1, 0, offset, paddr, paddr, len(block),
                                     len(block), 0))
            offset += len(block)
        ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
        header = ident + struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56,
                                     phnum, 0, 0, 0)
        return header + b"".join(phdrs) + notes + b"".join(bytes(b) for _, b in blocks)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.image())
        return path


def map_info(addr: int, flink: int, blink: int, op: int = 1, pages: int = 1,
             crypted: int = 0, plain: int = 0, signature: bytes = b"MAP_INFO") -> bytes:
    """A 64-byte MAP_INFO as IoMmuDxe (edk2 2022.11 ``AmdSevIoMmu.c``) lays it out."""
    return struct.pack("<8sQQI4xQQQQ", signature, flink, blink, op, pages * PAGE, pages,
                       crypted, plain)
