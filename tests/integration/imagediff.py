"""How two builds of one module differ: not at all, only in the line
numbers ``ASSERT()`` passes, or in code.

edk2's ``ASSERT (x)`` calls ``DebugAssert (__FILE__, __LINE__, "x")``, an
EFIAPI (Microsoft x64) function: the line number is its second argument,
loaded into ``edx`` by a ``mov edx, imm32`` before the call. Source lines
added above a function (test code under ``#ifdef EBS_HARNESS_TEST``) move
the lines below them, so a DEBUG build of the same code differs in those
immediates and nowhere else; a RELEASE build has no ``ASSERT`` code.
"""

from __future__ import annotations

from pathlib import Path

from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsInsn
from elftools.elf.elffile import ELFFile

#: Section flag of what the image loads (``SHF_ALLOC``).
_ALLOC = 0x2


def _sections(path: Path) -> dict[str, tuple[int, bytes]]:
    """Each loaded section: its address and bytes."""
    with path.open("rb") as handle:
        elf = ELFFile(handle)
        return {s.name: (s["sh_addr"], s.data()) for s in elf.iter_sections()
                if s["sh_flags"] & _ALLOC and s["sh_type"] != "SHT_NOBITS"}


def _is_line_number(insn: CsInsn) -> bool:
    return insn.mnemonic == "mov" and insn.op_str.startswith("edx, ") and \
        insn.op_str[5:].lstrip("-").removeprefix("0x").isalnum()


def difference(a: Path, b: Path) -> str:
    """How the ELF modules ``a`` and ``b`` differ: "" not at all,
    ``"line numbers"`` in ``mov edx, imm`` instructions alone, else the
    first difference found."""
    left, right = _sections(a), _sections(b)
    if left.keys() != right.keys():
        return f"sections {sorted(left)} vs {sorted(right)}"
    found = ""
    for name, (addr, data) in left.items():
        other_addr, other = right[name]
        if (addr, data) == (other_addr, other):
            continue
        if addr != other_addr or len(data) != len(other):
            return f"{name}: at {addr:#x}, {len(data)} bytes vs at {other_addr:#x}, {len(other)}"
        if name != ".text":
            return f"{name}: contents"
        found = _text_difference(addr, data, other)
        if found != "line numbers":
            return found
    return found


def _text_difference(addr: int, left: bytes, right: bytes) -> str:
    disasm = Cs(CS_ARCH_X86, CS_MODE_64)
    ours, theirs = list(disasm.disasm(left, addr)), list(disasm.disasm(right, addr))
    for x, y in zip(ours, theirs, strict=False):
        if x.address != y.address or x.size != y.size:
            return f".text: the code moves at {x.address:#x}"
        if x.bytes == y.bytes:
            continue
        if not (_is_line_number(x) and _is_line_number(y)):
            return f".text at {x.address:#x}: {x.mnemonic} {x.op_str} vs {y.mnemonic} {y.op_str}"
    if len(ours) != len(theirs):
        return f".text: {len(ours)} vs {len(theirs)} instructions"
    # capstone stops at bytes it cannot decode (data in .text): the rest raw
    decoded = ours[-1].address + ours[-1].size - addr if ours else 0
    if left[decoded:] != right[decoded:]:
        return f".text from {addr + decoded:#x}: not code capstone decodes, and it differs"
    return "line numbers"
