"""Addresses in a debug log -> ``Image!function``.

OVMF prints one line per image it loads::

    Loading driver at 0x0001ECC7000 EntryPoint=0x0001ECCA876 IoMmuDxe.efi
    Loading PEIM at 0x0001FE8A000 EntryPoint=0x0001FEA27DC DxeCore.efi

The build leaves ``modules/<Name>.debug`` (ELF with DWARF) and
``modules/<Name>.map`` (GNU ld map) in the firmware directory, and an index
of both, ``modules/symbols.json`` (:func:`write_index`, made when the
firmware is published): reading it costs a few milliseconds where parsing
every ``.debug`` with pyelftools costs a second. Symbol values are RVAs:
runtime address = load base + ``st_value`` (the base of the log's "Loading
driver at" line). A module whose ``_ModuleEntryPoint`` RVA disagrees with
``EntryPoint - base`` in the log belongs to another build: its symbols are
not used, and addresses in it come out as ``Image+0xoff``.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

IMAGE_LOAD_RE = re.compile(
    r"Loading (?:driver|PEIM) at 0x([0-9A-Fa-f]+) EntryPoint=0x([0-9A-Fa-f]+) "
    r"([A-Za-z0-9_.\-]+?)\.efi\b")

#: Without symbol files an address this far above the nearest image base is
#: not attributed to that image.
MAX_IMAGE_GUESS = 4 << 20

_MAP_SECTION_RE = re.compile(
    r"^ \.(?:text|data|rodata|bss)(?:\.rel)?(?:\.ro)?(?:\.local)?\.([A-Za-z_][A-Za-z0-9_]*?)"
    r"(?:\.lto_priv\.\d+|\.part\.\d+|\.constprop\.\d+|\.isra\.\d+)*"
    r"(?:\s+(0x[0-9a-fA-F]+)\s+(0x[0-9a-fA-F]+)\s+\S.*)?$")
_COMPILER_SUFFIX_RE = re.compile(r"(?:\.(?:lto_priv|constprop|isra|part|cold)(?:\.\d+)?)+$")
_MAP_ADDR_RE = re.compile(r"^\s+(0x[0-9a-fA-F]+)\s+(0x[0-9a-fA-F]+)\s+\S")


@dataclass(frozen=True)
class ImageLoad:
    """One "Loading driver at" line of the log."""

    name: str
    base: int
    entry: int
    line: int

    def __post_init__(self) -> None:
        if self.entry < self.base:
            raise ValueError(f"{self.name}: entry {self.entry:#x} below base {self.base:#x}")


def parse_image_load(text: str, line: int) -> ImageLoad | None:
    """The image load on one log line, or None."""
    match = IMAGE_LOAD_RE.search(text)
    if match is None:
        return None
    base, entry = int(match.group(1), 16), int(match.group(2), 16)
    if entry < base:
        return None
    return ImageLoad(name=match.group(3), base=base, entry=entry, line=line)


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int
    size: int
    is_function: bool


@dataclass(frozen=True)
class ModuleSymbols:
    """The symbols of one module, as RVAs, sorted by value."""

    name: str
    source: Path
    symbols: tuple[Symbol, ...]
    image_size: int | None
    entry_rva: int | None
    _values: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_values", tuple(s.value for s in self.symbols))

    def lookup(self, rva: int) -> tuple[Symbol, int] | None:
        """The function containing ``rva`` and the offset into it."""
        idx = bisect.bisect_right(self._values, rva) - 1
        while idx >= 0:
            sym = self.symbols[idx]
            if sym.is_function:
                off = rva - sym.value
                if sym.size == 0 or off < sym.size:
                    return sym, off
                return None
            idx -= 1
        return None

    def value_of(self, name: str) -> int | None:
        for sym in self.symbols:
            if sym.name == name:
                return sym.value
        return None


def _load_debug(path: Path, name: str) -> ModuleSymbols:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    symbols: list[Symbol] = []
    image_end = 0
    with path.open("rb") as fh:
        try:
            elf = ELFFile(fh)
            for section in elf.iter_sections():
                if section["sh_flags"] & 0x2:  # SHF_ALLOC
                    image_end = max(image_end, section["sh_addr"] + section["sh_size"])
            symtab = elf.get_section_by_name(".symtab")
            if symtab is not None:
                for sym in symtab.iter_symbols():  # type: ignore[attr-defined]
                    kind = sym["st_info"]["type"]
                    if kind not in ("STT_FUNC", "STT_OBJECT") or not sym.name:
                        continue
                    if sym["st_shndx"] in ("SHN_UNDEF", "SHN_ABS"):
                        continue
                    symbols.append(Symbol(sym.name, sym["st_value"], sym["st_size"],
                                          kind == "STT_FUNC"))
        except (ELFError, ValueError, KeyError, OSError) as exc:
            LOG.warning("%s: unreadable symbol file: %s", path, exc)
            symbols = []
    symbols.sort(key=lambda s: (s.value, not s.is_function))
    entry = next((s.value for s in symbols if s.name == "_ModuleEntryPoint"), None)
    return ModuleSymbols(name, path, tuple(symbols), image_end or None, entry)


def parse_map(text: str) -> list[Symbol]:
    """Function and data symbols of a GNU ld map (``-Map``) as edk2 writes it."""
    symbols: list[Symbol] = []
    pending: tuple[str, bool] | None = None
    for raw in text.splitlines():
        if pending is not None:
            match = _MAP_ADDR_RE.match(raw)
            if match:
                symbols.append(Symbol(pending[0], int(match.group(1), 16),
                                      int(match.group(2), 16), pending[1]))
            pending = None
            continue
        match = _MAP_SECTION_RE.match(raw)
        if not match:
            continue
        is_function = raw.startswith(" .text.")
        if match.group(2):
            symbols.append(Symbol(match.group(1), int(match.group(2), 16),
                                  int(match.group(3), 16), is_function))
        else:
            pending = (match.group(1), is_function)
    return symbols


def _load_map(path: Path, name: str) -> ModuleSymbols:
    symbols = parse_map(path.read_text(errors="replace"))
    symbols.sort(key=lambda s: (s.value, not s.is_function))
    end = max((s.value + s.size for s in symbols), default=0)
    entry = next((s.value for s in symbols if s.name == "_ModuleEntryPoint"), None)
    return ModuleSymbols(name, path, tuple(symbols), end or None, entry)


#: The symbol index of a firmware's ``modules/`` directory.
INDEX = "symbols.json"
INDEX_VERSION = 1


def load_module(modules: Path, name: str) -> ModuleSymbols | None:
    """Module ``name``'s symbols from its ``.debug`` file, else its ``.map``."""
    result: ModuleSymbols | None = None
    debug = modules / f"{name}.debug"
    mapf = modules / f"{name}.map"
    if debug.is_file():
        result = _load_debug(debug, name)
    if (result is None or not result.symbols) and mapf.is_file():
        result = _load_map(mapf, name)
    return result


def write_index(modules: Path) -> Path:
    """Index every module of ``modules/`` into ``modules/symbols.json``."""
    names = sorted({p.stem for p in modules.iterdir() if p.suffix in (".debug", ".map")})
    index: dict[str, object] = {}
    for name in names:
        mod = load_module(modules, name)
        if mod is None:
            continue
        index[name] = {"image_size": mod.image_size, "entry_rva": mod.entry_rva,
                       "symbols": [[s.name, s.value, s.size, s.is_function]
                                   for s in mod.symbols]}
    path = modules / INDEX
    path.write_text(json.dumps({"version": INDEX_VERSION, "modules": index},
                               separators=(",", ":")))
    return path


class _Index:
    """``modules/symbols.json``: a module's entry becomes its
    :class:`ModuleSymbols` once, when asked for or when :func:`preload`
    builds them all (a boot, while its guest runs: the firmware's 120
    modules and their 17,000 symbols take some 30 ms)."""

    def __init__(self, path: Path, entries: dict[str, Any]) -> None:
        self.path = path
        self._entries = entries
        self._built: dict[str, ModuleSymbols | None] = {}

    @classmethod
    def read(cls, modules: Path) -> _Index | None:
        """The index, or None when it is missing, unreadable or of another
        version (the ``.debug`` files are read instead). Read once per
        process while the file is unchanged."""
        path = modules / INDEX
        try:
            return _read_index(path, path.stat().st_mtime_ns)
        except OSError:
            return None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> ModuleSymbols | None:
        """Module ``name``'s symbols; None when it is absent or its entry is
        malformed. Built once per process."""
        if name in self._built:
            return self._built[name]
        try:
            entry = self._entries[name]
            symbols = tuple(Symbol(n, v, z, bool(f)) for n, v, z, f in entry["symbols"])
            built: ModuleSymbols | None = ModuleSymbols(
                name, self.path, symbols, entry["image_size"], entry["entry_rva"])
        except (KeyError, TypeError, ValueError):
            built = None
        self._built[name] = built
        return built

    def build_all(self) -> None:
        """Build every module's symbols now."""
        for name in self._entries:
            self.get(name)


@functools.lru_cache(maxsize=4)
def _read_index(path: Path, mtime_ns: int) -> _Index | None:
    del mtime_ns    # part of the cache key only
    try:
        data = json.loads(path.read_text())
        if data.get("version") != INDEX_VERSION or not isinstance(data["modules"], dict):
            return None
        return _Index(path, data["modules"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def preload(firmware_dir: Path) -> None:
    """Read ``firmware_dir``'s symbol index and build its modules' symbols
    now, for the judgements of this process (a boot does it while the
    guest runs)."""
    index = _Index.read(firmware_dir / "modules")
    if index is not None:
        index.build_all()


class Symbolizer:
    """Turns runtime addresses into ``Image!function``, ``Image+0xoff`` or hex.

    :param images: the image loads of the log, in log order.
    :param firmware_dir: a firmware directory with ``modules/<Name>.debug``
        or ``.map`` files, or None for image names only.
    """

    def __init__(self, images: Sequence[ImageLoad], firmware_dir: Path | None = None) -> None:
        # A later load over the same range replaces an earlier one.
        self._images = sorted(images, key=lambda i: (i.base, i.line))
        self._bases = [i.base for i in self._images]
        self._firmware_dir = firmware_dir
        self._modules: dict[str, ModuleSymbols | None] = {}
        self._index: _Index | None = None
        if firmware_dir is not None:
            self._index = _Index.read(firmware_dir / "modules")

    @property
    def images(self) -> tuple[ImageLoad, ...]:
        return tuple(self._images)

    def module(self, name: str) -> ModuleSymbols | None:
        """The symbols of module ``name`` from the firmware dir, cached."""
        if name in self._modules:
            return self._modules[name]
        result: ModuleSymbols | None = None
        if self._index is not None and name in self._index:
            result = self._index.get(name)
        if self._firmware_dir is not None and result is None and (
                self._index is None or name in self._index):
            # no index, or a malformed entry: the module's own files
            result = load_module(self._firmware_dir / "modules", name)
        self._modules[name] = result
        return result

    def _usable(self, image: ImageLoad) -> ModuleSymbols | None:
        mod = self.module(image.name)
        if mod is None:
            return None
        if mod.entry_rva is not None and mod.entry_rva != image.entry - image.base:
            LOG.warning("%s: _ModuleEntryPoint RVA %#x in %s but %#x in the log: "
                        "symbols not used", image.name, mod.entry_rva, mod.source,
                        image.entry - image.base)
            self._modules[image.name] = None
            return None
        return mod

    def image_for(self, addr: int) -> ImageLoad | None:
        """The most recently loaded image whose range holds ``addr``."""
        idx = bisect.bisect_right(self._bases, addr) - 1
        best: ImageLoad | None = None
        while idx >= 0:
            image = self._images[idx]
            mod = self._usable(image)
            if mod is not None and mod.image_size is not None:
                limit = mod.image_size
            else:
                nxt = bisect.bisect_right(self._bases, image.base)
                limit = MAX_IMAGE_GUESS
                if nxt < len(self._bases):
                    limit = min(limit, self._bases[nxt] - image.base)
            if addr - image.base < limit and (best is None or image.line > best.line):
                best = image
            if image.base + MAX_IMAGE_GUESS < addr:
                break
            idx -= 1
        return best

    def symbolize(self, addr: int) -> str:
        image = self.image_for(addr)
        if image is None:
            return f"{addr:#x}"
        off = addr - image.base
        mod = self._usable(image)
        if mod is not None:
            hit = mod.lookup(off)
            if hit is not None:
                sym, within = hit
                name = _COMPILER_SUFFIX_RE.sub("", sym.name)
                return f"{image.name}!{name}" + (f"+{within:#x}" if within else "")
        return f"{image.name}+{off:#x}"

    def symbol_address(self, image_name: str, symbol: str) -> int | None:
        """Runtime address of ``symbol`` of the last load of ``image_name``."""
        loads = [i for i in self._images if i.name == image_name]
        if not loads:
            return None
        image = max(loads, key=lambda i: i.line)
        mod = self._usable(image)
        if mod is None:
            return None
        rva = mod.value_of(symbol)
        return None if rva is None else image.base + rva


@dataclass(frozen=True)
class SourceLocation:
    """Where an instruction comes from: ``file:line``, and the functions it
    is in, innermost first (an inlined function, then what it was inlined
    into; LTO inlines a driver's entry point into ``_ModuleEntryPoint``)."""

    file: str
    line: int
    functions: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def source_location(modules: Path, name: str, rva: int,
                    entry_rva: int | None = None) -> SourceLocation | None:
    """The source of the instruction at ``rva`` in module ``name``, from the
    DWARF of ``modules/<name>.debug`` (read for this one module: a few
    tenths of a second), or None without one.

    :param entry_rva: the entry point's RVA as the log gives it: a
        ``.debug`` whose ``_ModuleEntryPoint`` differs is another build's,
        and answers nothing.
    """
    from elftools.common.exceptions import DWARFError, ELFError
    from elftools.elf.elffile import ELFFile

    path = modules / f"{name}.debug"
    try:
        with path.open("rb") as handle:
            elf = ELFFile(handle)
            if entry_rva is not None:
                symtab = elf.get_section_by_name(".symtab")
                entry = next((s["st_value"] for s in symtab.iter_symbols()  # type: ignore[attr-defined]
                              if s.name == "_ModuleEntryPoint"), None) if symtab else None
                if entry is not None and entry != entry_rva:
                    LOG.warning("%s: _ModuleEntryPoint RVA %#x, but %#x in the log: another "
                                "build's; no source line", path, entry, entry_rva)
                    return None
            if not elf.has_dwarf_info():
                return None
            dwarf = elf.get_dwarf_info()
            found = _line_of(dwarf, rva)
            if found is None:
                return None
            return SourceLocation(found[0], found[1], _functions_at(dwarf, rva))
    except (OSError, ELFError, DWARFError, ValueError, KeyError, IndexError,
            AttributeError) as exc:
        LOG.debug("%s: %s", path, exc)
        return None


def _functions_at(dwarf: Any, rva: int) -> tuple[str, ...]:
    """The subprogram and inlined subroutines holding ``rva``, innermost first."""
    aranges = dwarf.get_aranges()
    offset = aranges.cu_offset_at_addr(rva) if aranges is not None else None
    if offset is None:
        return ()
    unit = dwarf.get_CU_at(offset)
    chain: list[str] = []
    die = unit.get_top_DIE()
    while True:
        inner = next((child for child in die.iter_children()
                      if child.tag in ("DW_TAG_subprogram", "DW_TAG_inlined_subroutine",
                                       "DW_TAG_lexical_block")
                      and _die_holds(dwarf, unit, child, rva)), None)
        if inner is None:
            return tuple(reversed(chain))
        if inner.tag != "DW_TAG_lexical_block":
            chain.append(die_name(inner))
        die = inner


def _die_holds(dwarf: Any, unit: Any, die: Any, rva: int) -> bool:
    return any(start <= rva < end for start, end in die_ranges(dwarf, unit, die))


def die_ranges(dwarf: Any, unit: Any, die: Any) -> list[tuple[int, int]]:
    """The address ranges of a DWARF scope (its low/high pc, or its range list)."""
    attrs = die.attributes
    if "DW_AT_low_pc" in attrs and "DW_AT_high_pc" in attrs:
        low = attrs["DW_AT_low_pc"].value
        high = attrs["DW_AT_high_pc"]
        end = low + high.value if high.form.startswith("DW_FORM_data") else high.value
        return [(int(low), int(end))]
    if "DW_AT_ranges" not in attrs:
        return []
    from elftools.dwarf.ranges import BaseAddressEntry, RangeEntry

    top = unit.get_top_DIE().attributes.get("DW_AT_low_pc")
    base = top.value if top is not None else 0
    out: list[tuple[int, int]] = []
    ranges = dwarf.range_lists()
    if ranges is None:
        return out
    for entry in ranges.get_range_list_at_offset(attrs["DW_AT_ranges"].value, cu=unit):
        if isinstance(entry, BaseAddressEntry):
            base = entry.base_address
        elif isinstance(entry, RangeEntry):
            start = entry.begin_offset if entry.is_absolute else base + entry.begin_offset
            end = entry.end_offset if entry.is_absolute else base + entry.end_offset
            out.append((int(start), int(end)))
    return out


def die_name(die: Any) -> str:
    """A DWARF scope's name, through its abstract origin or specification."""
    for _ in range(4):
        if "DW_AT_name" in die.attributes:
            return str(die.attributes["DW_AT_name"].value.decode(errors="replace"))
        key = next((k for k in ("DW_AT_abstract_origin", "DW_AT_specification")
                    if k in die.attributes), None)
        if key is None:
            break
        die = die.get_DIE_from_attribute(key)
    return "?"


def _line_of(dwarf: Any, rva: int) -> tuple[str, int] | None:
    for unit in dwarf.iter_CUs():
        program = dwarf.line_program_for_CU(unit)
        if program is None:
            continue
        previous = None
        for entry in program.get_entries():
            state = entry.state
            if state is None:
                continue
            if previous is not None and previous.address <= rva < state.address:
                return file_of(unit, program, previous.file), previous.line
            previous = None if state.end_sequence else state
    return None


def file_of(unit: Any, program: Any, index: int) -> str:
    """A line program's file ``index`` as a path (DWARF 4 counts from 1,
    DWARF 5 from 0; directory 0 is the unit's compilation directory); ""
    for an index the program does not have."""
    version = program.header.version
    files = program["file_entry"]
    try:
        entry = files[index - 1] if version < 5 else files[index]
    except IndexError:
        return ""
    name = str(entry.name.decode(errors="replace"))
    dirs = program["include_directory"]
    directory = b""
    if version < 5 and entry.dir_index > 0:
        directory = dirs[entry.dir_index - 1]
    elif version >= 5:
        directory = dirs[entry.dir_index]
    if not directory:
        top = unit.get_top_DIE()
        unit_name = top.attributes.get("DW_AT_name")
        if unit_name is not None:
            full = str(unit_name.value.decode(errors="replace"))
            if full.endswith("/" + name):
                return full
        comp = top.attributes.get("DW_AT_comp_dir")
        directory = comp.value if comp is not None else b""
    if not directory or name.startswith("/"):
        return name
    return f"{bytes(directory).decode(errors='replace').rstrip('/')}/{name}"
