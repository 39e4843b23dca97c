"""A built module as the static check reads it: code, functions, globals, DWARF.

edk2 leaves each module's ELF, before it becomes a PE image, as
``modules/<Name>.debug``: ``.text``, the symbol table and the DWARF. The
static C3 check (:mod:`harness.analysis.teardown_static`) needs four things
from it, read here once with pyelftools into a :class:`ModuleImage`::

    .symtab  --> functions (STT_FUNC with their sizes; NASM's untyped
                 global symbols of .text, each up to the next symbol)
             --> globals by address (gBS, mPcd, ...)
    DWARF    --> which globals point to a tracked table (their types,
                 :mod:`harness.analysis.service_tables`)
             --> the subprogram and inlined-subroutine scopes (the frames
                 the compiler inlined at an address)
             --> the source file of each address (the line programs)

The rest of the check asks the image questions by RVA (the function at an
address, its bytes, the inlined frames and the file there) and never
touches the ELF. A module without DWARF still loads: its table globals are
known by name, and it has no inlined frames or files. This is not
:mod:`harness.analysis.symbols`, which turns a boot log's addresses into
names from a cached index; the check needs the whole module, types
included.
"""

from __future__ import annotations

import bisect
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.analysis.service_tables import TABLES, Table
from harness.analysis.symbols import die_name, die_ranges, file_of
from harness.errors import UsageError

LOG = logging.getLogger(__name__)

_SUFFIX_RE = re.compile(r"(?:\.(?:lto_priv|constprop|isra|part|cold|lto_priv)(?:\.\d+)?)+$")


def plain_name(symbol: str) -> str:
    """``IoMmuUnmapWorker.constprop.0`` -> ``IoMmuUnmapWorker``."""
    return _SUFFIX_RE.sub("", symbol)


@dataclass(frozen=True)
class Function:
    """A function of the module: its symbol name and its RVA range."""

    name: str
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass
class ModuleImage:
    """What the check reads from one ``.debug`` file."""

    path: Path
    code: bytes
    code_start: int
    functions: list[Function]
    #: Global address -> (symbol name, tracked table or None).
    globals_: dict[int, tuple[str, Table | None]]
    #: (low, high, chain outermost first) of DWARF subprograms and inlined
    #: subroutines, for the inlined frames at an address.
    scopes: list[tuple[int, int, tuple[str, ...]]] = field(default_factory=list)
    #: (address, file) rows of the line programs, sorted.
    lines: list[tuple[int, str]] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.functions.sort(key=lambda f: f.start)
        self._starts = [f.start for f in self.functions]

    def function_at(self, rva: int) -> Function | None:
        idx = bisect.bisect_right(self._starts, rva) - 1
        if idx >= 0 and rva < self.functions[idx].end:
            return self.functions[idx]
        return None

    def function_named(self, name: str) -> Function | None:
        exact = [f for f in self.functions if f.name == name]
        if exact:
            return exact[0]
        return next((f for f in self.functions if plain_name(f.name) == name), None)

    def bytes_of(self, function: Function) -> bytes:
        low = function.start - self.code_start
        return self.code[low:low + function.size]

    def file_at(self, rva: int) -> str:
        idx = bisect.bisect_right(self.lines, (rva, "\uffff")) - 1
        return self.lines[idx][1] if idx >= 0 else ""

    def inline_chain(self, rva: int) -> tuple[str, ...]:
        """The DWARF frames at ``rva``, outermost (the subprogram) first."""
        best: tuple[str, ...] = ()
        for low, high, chain in self.scopes:
            if low <= rva < high and len(chain) > len(best):
                best = chain
        return best


def load_image(path: Path) -> ModuleImage:
    """Read ``path`` (an edk2 ``.debug`` ELF).

    :raises UsageError: it is not an ELF with a ``.text`` and a symbol table.
    """
    from elftools.common.exceptions import DWARFError, ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with path.open("rb") as handle:
            elf = ELFFile(handle)
            text = elf.get_section_by_name(".text")
            symtab = elf.get_section_by_name(".symtab")
            if text is None or symtab is None:
                raise UsageError(f"{path}: no .text or no symbol table: not a module "
                                 f"edk2 built with symbols")
            text_index = next(i for i, sec in enumerate(elf.iter_sections())
                              if sec.name == ".text")
            text_end = text["sh_addr"] + text["sh_size"]
            functions: list[Function] = []
            # Assembly routines (NASM ``global``) are untyped, unsized symbols.
            untyped: list[tuple[str, int]] = []
            globals_: dict[int, tuple[str, Table | None]] = {}
            by_name = {name: table for table in TABLES.values() for name in table.globals_}
            for sym in symtab.iter_symbols():  # type: ignore[attr-defined]
                kind = sym["st_info"]["type"]
                if not sym.name or sym["st_shndx"] in ("SHN_UNDEF", "SHN_ABS"):
                    continue
                if kind == "STT_FUNC" and sym["st_size"] > 0:
                    functions.append(Function(sym.name, sym["st_value"], sym["st_size"]))
                elif kind == "STT_NOTYPE" and sym["st_shndx"] == text_index and \
                        sym["st_info"]["bind"] in ("STB_GLOBAL", "STB_WEAK"):
                    untyped.append((sym.name, sym["st_value"]))
                elif kind == "STT_OBJECT":
                    globals_[sym["st_value"]] = (sym.name, by_name.get(plain_name(sym.name)))
            starts = sorted({f.start for f in functions} | {v for _, v in untyped}
                            | {text_end})
            for name, value in untyped:
                end = starts[bisect.bisect_right(starts, value)]
                if not any(f.start <= value < f.end for f in functions):
                    functions.append(Function(name, value, end - value))
            image = ModuleImage(path, text.data(), text["sh_addr"], functions, globals_)
            if elf.has_dwarf_info():
                try:
                    # edk2 links with --emit-relocs: the DWARF is already
                    # relocated, its .rela.debug_* are for post-link tools.
                    _read_dwarf(elf.get_dwarf_info(relocate_dwarf_sections=False), image)
                except (DWARFError, ValueError, KeyError, IndexError, AttributeError) as exc:
                    LOG.warning("%s: DWARF unreadable (%s): no inlined frames, no types",
                                path, exc)
            return image
    except (ELFError, OSError) as exc:
        raise UsageError(f"{path}: not a readable ELF: {exc}") from exc


def _read_dwarf(dwarf: Any, image: ModuleImage) -> None:
    """Types of the globals, subprogram/inlined scopes, file per address."""
    for unit in dwarf.iter_CUs():
        top = unit.get_top_DIE()
        _walk_dies(dwarf, unit, top, (), image)
        program = dwarf.line_program_for_CU(unit)
        if program is None:
            continue
        for entry in program.get_entries():
            state = entry.state
            if state is None or state.end_sequence:
                continue
            image.lines.append((state.address, file_of(unit, program, state.file)))
    image.lines.sort()
    image.scopes.sort()


def _walk_dies(dwarf: Any, unit: Any, die: Any, chain: tuple[str, ...], image: ModuleImage
               ) -> None:
    for child in die.iter_children():
        tag = child.tag
        if tag == "DW_TAG_variable":
            _note_variable(child, image)
        elif tag in ("DW_TAG_subprogram", "DW_TAG_inlined_subroutine"):
            inner = (*chain, die_name(child))
            for low, high in die_ranges(dwarf, unit, child):
                image.scopes.append((low, high, inner))
            _walk_dies(dwarf, unit, child, inner, image)
        elif tag == "DW_TAG_lexical_block":
            _walk_dies(dwarf, unit, child, chain, image)


def _note_variable(die: Any, image: ModuleImage) -> None:
    """A global whose type points to a tracked table: track it by address."""
    location = die.attributes.get("DW_AT_location")
    if location is None or not isinstance(location.value, list) or len(location.value) != 9:
        return
    if location.value[0] != 0x03:           # DW_OP_addr, 8-byte operand
        return
    address = int.from_bytes(bytes(location.value[1:9]), "little")
    table = TABLES.get(_pointee_name(die))
    if table is None or address not in image.globals_:
        return
    name, _ = image.globals_[address]
    image.globals_[address] = (name, table)


def _pointee_name(die: Any) -> str:
    """``EFI_BOOT_SERVICES`` for a variable of type ``EFI_BOOT_SERVICES *``."""
    current = die
    for key in ("DW_AT_specification", "DW_AT_abstract_origin"):
        if "DW_AT_type" not in current.attributes and key in current.attributes:
            current = current.get_DIE_from_attribute(key)
    seen_pointer = False
    for _ in range(8):
        if "DW_AT_type" not in current.attributes:
            return ""
        current = current.get_DIE_from_attribute("DW_AT_type")
        if current.tag == "DW_TAG_pointer_type":
            if seen_pointer:
                return ""
            seen_pointer = True
            continue
        if current.tag in ("DW_TAG_typedef", "DW_TAG_structure_type") and seen_pointer:
            name = current.attributes.get("DW_AT_name")
            if name is not None:
                text = str(name.value.decode(errors="replace"))
                if text in TABLES:
                    return text
                if current.tag == "DW_TAG_structure_type":
                    return text.lstrip("_")
        if current.tag not in ("DW_TAG_typedef", "DW_TAG_const_type",
                               "DW_TAG_volatile_type"):
            return ""
    return ""


