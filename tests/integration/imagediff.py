"""How two builds of one module differ: not at all, only in the line
numbers ``ASSERT()`` passes, or in code.

edk2's ``ASSERT (x)`` calls ``DebugAssert (__FILE__, __LINE__, "x")``, an
EFIAPI (Microsoft x64) function: the line number is its second argument,
loaded into ``edx`` by a ``mov edx, imm32`` before the call. Source lines
added above a function (test code under ``#ifdef EBS_HARNESS_TEST``) move
the lines below them, so a DEBUG build of the same code differs in those
immediates and nowhere else; a RELEASE build has no ``ASSERT`` code.

One more difference is the toolchain's own: between read-only strings,
which GCC's edk2 link puts in ``.text``, alignment is filled either with a
zero byte and an 8-byte ``nopl`` or with a 9-byte one (``66 0f 1f 84``):
two links of unchanged sources can differ there (``"padding"``).
"""

from __future__ import annotations

import re
from pathlib import Path

from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsInsn
from elftools.elf.elffile import ELFFile

#: Section flag of what the image loads (``SHF_ALLOC``).
_ALLOC = 0x2
#: ``mov edx, <constant>``, as capstone prints it.
_LINE_ARGUMENT = re.compile(r"edx, (?:0x[0-9a-f]+|[0-9]+)")
#: How far a line number may be loaded before the call that passes it.
_CALL_WITHIN = 12


def _sections(path: Path) -> dict[str, tuple[int, bytes]]:
    """Each loaded section: its address and bytes."""
    with path.open("rb") as handle:
        elf = ELFFile(handle)
        return {s.name: (s["sh_addr"], s.data()) for s in elf.iter_sections()
                if s["sh_flags"] & _ALLOC and s["sh_type"] != "SHT_NOBITS"}


def _debug_assert(path: Path) -> int | None:
    """``DebugAssert``'s address in the module, or None."""
    with path.open("rb") as handle:
        symtab = ELFFile(handle).get_section_by_name(".symtab")
        for symbol in symtab.iter_symbols() if symtab is not None else ():
            if symbol.name == "DebugAssert" and symbol["st_info"]["type"] == "STT_FUNC":
                return int(symbol["st_value"])
    return None


def _passes_a_line(code: list[CsInsn], index: int, debug_assert: int | None) -> bool:
    """``code[index]`` loads a constant into ``edx`` for a call of
    DebugAssert() a few instructions on, before any other call: straight
    on, or through the jump to a call the compiler shares between
    ASSERT()s."""
    if debug_assert is None or code[index].mnemonic != "mov" or \
            not _LINE_ARGUMENT.fullmatch(code[index].op_str):
        return False
    at = {insn.address: number for number, insn in enumerate(code)}
    position = index + 1
    for _ in range(_CALL_WITHIN):
        if position >= len(code):
            return False
        insn = code[position]
        if insn.mnemonic == "call" or (insn.mnemonic == "jmp" and
                                       insn.op_str == hex(debug_assert)):
            return insn.op_str == hex(debug_assert)
        if insn.mnemonic == "jmp":
            target = int(insn.op_str, 16) if insn.op_str.startswith("0x") else None
            if target not in at:
                return False
            position = at[target]
            continue
        if insn.mnemonic == "ret":
            return False
        position += 1
    return False


def difference(a: Path, b: Path) -> str:
    """How the ELF modules ``a`` and ``b`` differ: "" not at all; in
    ``"line numbers"`` passed to DebugAssert() or alignment ``"padding"``
    alone (or both, comma-separated); else the first difference found."""
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
        # .text is the one section that may differ (its name is unique)
        found = _text_difference(addr, data, other, _debug_assert(a), _debug_assert(b))
    return found


#: What :func:`difference` says of builds of the same code.
SAME_CODE = {"", "line numbers", "padding", "line numbers, padding"}


def _text_difference(addr: int, left: bytes, right: bytes, ours_assert: int | None,
                     theirs_assert: int | None) -> str:
    disasm = Cs(CS_ARCH_X86, CS_MODE_64)
    ours, theirs = list(disasm.disasm(left, addr)), list(disasm.disasm(right, addr))
    for index, (x, y) in enumerate(zip(ours, theirs, strict=False)):
        if x.address != y.address or x.size != y.size:
            return f".text: the code moves at {x.address:#x}"
        if x.bytes == y.bytes:
            continue
        if not (_passes_a_line(ours, index, ours_assert)
                and _passes_a_line(theirs, index, theirs_assert)):
            return f".text at {x.address:#x}: {x.mnemonic} {x.op_str} vs {y.mnemonic} {y.op_str}"
    if len(ours) != len(theirs):
        return f".text: {len(ours)} vs {len(theirs)} instructions"
    # capstone stops at bytes it cannot decode (data in .text): the rest raw
    decoded = ours[-1].address + ours[-1].size - addr if ours else 0
    kinds = ["line numbers"] if any(x.bytes != y.bytes for x, y in zip(ours, theirs)) else []
    if left[decoded:] != right[decoded:]:
        if not padding_only(left[decoded:], right[decoded:]):
            return f".text from {addr + decoded:#x}: not code capstone decodes, and it differs"
        kinds.append("padding")
    return ", ".join(kinds)


def padding_only(left: bytes, right: bytes) -> bool:
    """Equal but where one has the zero byte of a fill and the other the
    ``66`` prefix of a multi-byte ``nop`` (``0f 1f /0``: ``66 0f 1f 84 ...``,
    ``66 0f 1f 44 00 00``) instead."""
    if len(left) != len(right):
        return False
    return all(left[i] == right[i] or ({left[i], right[i]} == {0x00, 0x66}
                                       and _a_nop_at(left, i + 1) and _a_nop_at(right, i + 1)
                                       and left[i + 1:i + 4] == right[i + 1:i + 4])
               for i in range(len(left)))


def _a_nop_at(code: bytes, at: int) -> bool:
    """``0f 1f`` with a ModRM whose reg field is 0: the multi-byte ``nop``."""
    return code[at:at + 2] == b"\x0f\x1f" and len(code) > at + 2 and code[at + 2] & 0x38 == 0
