"""C3 over the built code: every path from the IOMMU teardown to a boot service.

The runtime checks (C1..C3, :mod:`harness.analysis.trace`) see the path one
boot takes. This module reads the built IoMmuDxe instead
(``modules/IoMmuDxe.debug``: the ELF edk2 links, with its symbols and DWARF)
and follows every direct call from the function the DXE core calls at the
end of ExitBootServices()::

    modules/IoMmuDxe.debug --pyelftools--> functions (.symtab), globals and
        |                                  their types, inlined frames (DWARF)
        +--capstone--> instructions per function --> per-function dataflow:
                       which registers and stack slots hold gBS, gST, a PCD
                       protocol, a member of one, or a constant that decides
                       a branch (``MemoryMapLocked`` = TRUE)
        --> call graph from the teardown (argument constants passed on),
            one node per branch (TDX/SEV/emulation/none)
        --> findings: teardown -> f -> g -> gBS->LocateProtocol  [TDX]

A *finding* is one of:

- ``boot-service``: a call through a member of ``EFI_BOOT_SERVICES`` (read
  from ``gBS`` or ``gST->BootServices``, directly or through a register or a
  stack slot) or of ``EFI_DXE_SERVICES``; named by its offset in the table
  (:data:`BOOT_SERVICES`, the UEFI specification's layout);
- ``pcd-protocol``: a call through a PCD protocol (DxePcdLib's ``mPcd``,
  ``mPiPcd``, ...): a dynamic ``PcdGet*`` in the teardown;
- ``reference``: a read of one of those tables that no followed call
  consumes (the pointer is passed on, compared, stored);
- ``indirect``: a call through a pointer the check cannot follow (a
  protocol's member, a callback): it may be anything;
- ``unknown-target``: a direct call to an address no function symbol
  covers;
- ``interrupts``: an ``sti``.

Each finding carries the shortest path to it per *branch*: the branch is the
first function on the path (inlined frames included) that belongs to a
confidential-computing family (:data:`BRANCH_FAMILIES`), by its name
(``MemEncryptTdx*`` is TDX, ``MemEncryptSev*`` SEV, ...) or by the library
directory of its source file (``BaseMemEncryptTdxLib``...); ``none`` when
no function on the path does. The rule reads the path, not the conditions
guarding it: a call made on every guest is ``none``.

What it does not see (``docs/static-check.md``): calls through pointers
(reported, not followed), code outside IoMmuDxe (the DXE core, other
drivers' protocols), another compiler or a RELEASE build's inlining (the
check reads the build it is given), and conditions on data (only constants
decide a branch: a path behind a first-use cache or a page split is still
a path).
"""

from __future__ import annotations

import bisect
import collections
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UsageError

LOG = logging.getLogger(__name__)

#: The module whose teardown is checked and the function it registers with
#: the DXE core (``IoMmuRegisterTeardown()`` passes it to
#: ``EDKII_IOMMU_EXIT_BOOT_SERVICES_PROTOCOL.RegisterTeardown()``).
MODULE = "IoMmuDxe"
ENTRY = "IoMmuExitBootServicesTeardown"

#: ``EFI_TABLE_HEADER`` (Signature u64, Revision u32, HeaderSize u32,
#: CRC32 u32, Reserved u32) on X64, then one 8-byte pointer per member.
TABLE_HEADER_SIZE = 24
POINTER_SIZE = 8

#: ``EFI_BOOT_SERVICES`` members in the UEFI specification's order.
BOOT_SERVICES_MEMBERS = (
    "RaiseTPL", "RestoreTPL",
    "AllocatePages", "FreePages", "GetMemoryMap", "AllocatePool", "FreePool",
    "CreateEvent", "SetTimer", "WaitForEvent", "SignalEvent", "CloseEvent", "CheckEvent",
    "InstallProtocolInterface", "ReinstallProtocolInterface", "UninstallProtocolInterface",
    "HandleProtocol", "Reserved", "RegisterProtocolNotify", "LocateHandle",
    "LocateDevicePath", "InstallConfigurationTable",
    "LoadImage", "StartImage", "Exit", "UnloadImage", "ExitBootServices",
    "GetNextMonotonicCount", "Stall", "SetWatchdogTimer",
    "ConnectController", "DisconnectController",
    "OpenProtocol", "CloseProtocol", "OpenProtocolInformation",
    "ProtocolsPerHandle", "LocateHandleBuffer", "LocateProtocol",
    "InstallMultipleProtocolInterfaces", "UninstallMultipleProtocolInterfaces",
    "CalculateCrc32", "CopyMem", "SetMem", "CreateEventEx",
)

#: ``EFI_DXE_SERVICES`` members in the PI specification's order.
DXE_SERVICES_MEMBERS = (
    "AddMemorySpace", "AllocateMemorySpace", "FreeMemorySpace", "RemoveMemorySpace",
    "GetMemorySpaceDescriptor", "SetMemorySpaceAttributes", "GetMemorySpaceMap",
    "AddIoSpace", "AllocateIoSpace", "FreeIoSpace", "RemoveIoSpace",
    "GetIoSpaceDescriptor", "GetIoSpaceMap", "Dispatch", "Schedule", "Trust",
    "ProcessFirmwareVolume", "SetMemorySpaceCapabilities",
)

#: edk2's ``PCD_PROTOCOL`` (MdePkg ``Protocol/Pcd.h``): no table header.
PCD_PROTOCOL_MEMBERS = (
    "SetSku", "Get8", "Get16", "Get32", "Get64", "GetPtr", "GetBool", "GetSize",
    "Get8Ex", "Get16Ex", "Get32Ex", "Get64Ex", "GetPtrEx", "GetBoolEx", "GetSizeEx",
    "Set8", "Set16", "Set32", "Set64", "SetPtr", "SetBool",
    "Set8Ex", "Set16Ex", "Set32Ex", "Set64Ex", "SetPtrEx", "SetBoolEx",
    "CallbackOnSet", "CancelCallback", "GetNextToken", "GetNextTokenSpace",
)

#: The PI specification's ``EFI_PCD_PROTOCOL`` (every member takes a GUID).
PI_PCD_PROTOCOL_MEMBERS = (
    "SetSku", "Get8", "Get16", "Get32", "Get64", "GetPtr", "GetBool", "GetSize",
    "Set8", "Set16", "Set32", "Set64", "SetPtr", "SetBool",
    "CallbackOnSet", "CancelCallback", "GetNextToken", "GetNextTokenSpace",
)


def member_offsets(members: Sequence[str], header: int = TABLE_HEADER_SIZE
                   ) -> dict[int, str]:
    """Offset -> member name of a table of function pointers after ``header`` bytes."""
    return {header + POINTER_SIZE * index: name for index, name in enumerate(members)}


#: Offset of ``BootServices`` in ``EFI_SYSTEM_TABLE`` on X64: the header,
#: FirmwareVendor (pointer), FirmwareRevision (u32, padded to 8), then
#: ConsoleInHandle, ConIn, ConsoleOutHandle, ConOut, StandardErrorHandle,
#: StdErr, RuntimeServices (7 pointers).
SYSTEM_TABLE_BOOT_SERVICES = TABLE_HEADER_SIZE + POINTER_SIZE + 8 + 7 * POINTER_SIZE


@dataclass(frozen=True, eq=False)
class Table:
    """A table of services the teardown must not call into.

    :param type_name: its C type (what DWARF calls the pointee of a global).
    :param kind: the finding kind of a call through it.
    :param members: offset -> member name.
    :param globals_: the names of the library globals that point to it, for
        a module without DWARF types.
    """

    type_name: str
    kind: str
    members: Mapping[int, str]
    globals_: tuple[str, ...] = ()

    def member(self, offset: int) -> str:
        return self.members.get(offset, f"+{offset:#x}")


BOOT_SERVICES = Table("EFI_BOOT_SERVICES", "boot-service",
                      member_offsets(BOOT_SERVICES_MEMBERS), ("gBS",))
SYSTEM_TABLE = Table("EFI_SYSTEM_TABLE", "reference",
                     {SYSTEM_TABLE_BOOT_SERVICES: "BootServices"}, ("gST",))
DXE_SERVICES = Table("EFI_DXE_SERVICES", "boot-service",
                     member_offsets(DXE_SERVICES_MEMBERS), ("gDS",))
PCD_PROTOCOL = Table("PCD_PROTOCOL", "pcd-protocol",
                     member_offsets(PCD_PROTOCOL_MEMBERS, header=0), ("mPcd",))
PI_PCD_PROTOCOL = Table("EFI_PCD_PROTOCOL", "pcd-protocol",
                        member_offsets(PI_PCD_PROTOCOL_MEMBERS, header=0), ("mPiPcd",))
PCD_INFO = Table("GET_PCD_INFO_PROTOCOL", "pcd-protocol", {}, ("mPcdInfo",))
PI_PCD_INFO = Table("EFI_GET_PCD_INFO_PROTOCOL", "pcd-protocol", {}, ("mPiPcdInfo",))

#: Every table the check tracks, by C type.
TABLES: Mapping[str, Table] = {t.type_name: t for t in (
    BOOT_SERVICES, SYSTEM_TABLE, DXE_SERVICES, PCD_PROTOCOL, PI_PCD_PROTOCOL, PCD_INFO,
    PI_PCD_INFO)}

#: What a boot-service member does, for the report.
SERVICE_GROUPS: Mapping[str, str] = {
    **{name: "TPL" for name in ("RaiseTPL", "RestoreTPL")},
    **{name: "allocator" for name in ("AllocatePages", "FreePages", "GetMemoryMap",
                                      "AllocatePool", "FreePool")},
    **{name: "protocol lookup" for name in (
        "HandleProtocol", "LocateHandle", "LocateDevicePath", "OpenProtocol",
        "OpenProtocolInformation", "ProtocolsPerHandle", "LocateHandleBuffer",
        "LocateProtocol")},
}


@dataclass(frozen=True)
class BranchFamily:
    """Functions that run only on one kind of guest.

    :param names: matches a function's name (compiler suffixes cut).
    :param files: searched in its source path (``/``-separated): the
        library directories of the family. IoMmuDxe's own files are in no
        family (2022.11's is ``AmdSevIoMmu.c`` and runs on every guest).
    """

    branch: str
    names: re.Pattern[str]
    files: re.Pattern[str]


#: The branch rule: the first function on a path (inlined frames included)
#: whose name matches a family, else the first whose source path does,
#: gives the path its branch. The names are the edk2 libraries' own
#: prefixes (``MemEncryptTdxLib``'s exports are ``MemEncryptTdx*``,
#: ``TdxLib``'s ``Td*``, SEV's ``MemEncryptSev*``, ``Snp*``, ...).
BRANCH_FAMILIES = (
    BranchFamily("TDX", re.compile(r"(MemEncryptTdx|Tdx|Td[A-Z])"),
                 re.compile(r"/(BaseMemEncryptTdxLib|TdxLib|TdxMailboxLib)/")),
    BranchFamily("SEV", re.compile(r"(MemEncryptSev|InternalMemEncryptSev|Sev[A-Z]|Snp|"
                                   r"AmdSev|AmdSvsm|Svsm|CcExitVmg|VmgExit)"),
                 re.compile(r"/(BaseMemEncryptSevLib|CcExitLib|VmgExitLib|AmdSvsmLib)/")),
    BranchFamily("emulation", re.compile(r"(IoMmuEmu|Emu[A-Z])"),
                 re.compile(r"/EmulatedPageState\.c$")),
)
NO_BRANCH = "none"

_SUFFIX_RE = re.compile(r"(?:\.(?:lto_priv|constprop|isra|part|cold|lto_priv)(?:\.\d+)?)+$")


def plain_name(symbol: str) -> str:
    """``IoMmuUnmapWorker.constprop.0`` -> ``IoMmuUnmapWorker``."""
    return _SUFFIX_RE.sub("", symbol)


# ------------------------------------------------------------- results


@dataclass(frozen=True)
class Hop:
    """One function on a path; ``inlined`` when the compiler inlined it
    into the hop before it (DWARF ``DW_TAG_inlined_subroutine``)."""

    function: str
    inlined: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"function": self.function, "inlined": self.inlined}


@dataclass(frozen=True)
class Finding:
    """One reachable thing the teardown must not do, on one branch.

    :param kind: ``boot-service``, ``pcd-protocol``, ``reference``,
        ``indirect``, ``unknown-target`` or ``interrupts``.
    :param target: what it reaches: ``gBS->LocateProtocol``,
        ``mPcd->Get64``, ``call *%rax``...
    :param path: the functions from the teardown to the one holding the
        site, the teardown first.
    :param site: the instruction's RVA in the module.
    :param group: for a boot service, what it is (``protocol lookup``,
        ``allocator``, ``TPL``), else "".
    """

    kind: str
    target: str
    branch: str
    path: tuple[Hop, ...]
    site: int
    instruction: str
    group: str = ""

    def __post_init__(self) -> None:
        if self.kind not in FINDING_KINDS:
            raise ValueError(f"finding kind {self.kind!r}")
        if not self.path:
            raise ValueError("a finding needs a path")

    @property
    def functions(self) -> tuple[str, ...]:
        return tuple(hop.function for hop in self.path)

    def path_text(self) -> str:
        return " → ".join((*self.functions, self.target))

    def line(self) -> str:
        what = f" ({self.group})" if self.group else ""
        return f"[{self.branch}] {self.path_text()}{what}  @{self.site:#x}"

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "target": self.target, "branch": self.branch,
                "group": self.group, "path": [hop.as_dict() for hop in self.path],
                "text": self.path_text(), "site": f"{self.site:#x}",
                "instruction": self.instruction}


FINDING_KINDS = ("boot-service", "pcd-protocol", "reference", "indirect", "unknown-target",
                 "interrupts")


@dataclass(frozen=True)
class StaticCheck:
    """What :func:`check_module` found in one module."""

    module: Path
    entry: str
    findings: tuple[Finding, ...]
    #: Every function reached from the entry (symbol names).
    functions: tuple[str, ...]
    instructions: int
    seconds: float

    @property
    def verdict(self) -> str:
        return "fail" if self.findings else "pass"

    @property
    def branches(self) -> dict[str, int]:
        counts = collections.Counter(f.branch for f in self.findings)
        return dict(sorted(counts.items()))

    def summary(self) -> str:
        """One line: what ``build`` prints after ``static C3:``."""
        if not self.findings:
            return (f"pass ({self.entry} reaches {len(self.functions)} functions, "
                    f"no boot service, PCD protocol or unfollowed call)")
        per = ", ".join(f"{n} {b}" for b, n in self.branches.items())
        return (f"{len(self.findings)} path(s) from {self.entry} ({per}); "
                f"first: {self.findings[0].line()}")

    def as_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict, "module": str(self.module), "entry": self.entry,
                "findings": [f.as_dict() for f in self.findings],
                "branches": self.branches, "functions": list(self.functions),
                "instructions": self.instructions, "seconds": round(self.seconds, 3)}


# -------------------------------------------------------------- module


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
class _Image:
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


def load_image(path: Path) -> _Image:
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
            image = _Image(path, text.data(), text["sh_addr"], functions, globals_)
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


def _read_dwarf(dwarf: Any, image: _Image) -> None:
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
            image.lines.append((state.address, _file_name(program, state.file)))
    image.lines.sort()
    image.scopes.sort()


def _walk_dies(dwarf: Any, unit: Any, die: Any, chain: tuple[str, ...], image: _Image) -> None:
    for child in die.iter_children():
        tag = child.tag
        if tag == "DW_TAG_variable":
            _note_variable(child, image)
        elif tag in ("DW_TAG_subprogram", "DW_TAG_inlined_subroutine"):
            inner = (*chain, _die_name(child))
            for low, high in _ranges(dwarf, unit, child):
                image.scopes.append((low, high, inner))
            _walk_dies(dwarf, unit, child, inner, image)
        elif tag == "DW_TAG_lexical_block":
            _walk_dies(dwarf, unit, child, chain, image)


def _note_variable(die: Any, image: _Image) -> None:
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


def _die_name(die: Any) -> str:
    for _ in range(4):
        if "DW_AT_name" in die.attributes:
            return str(die.attributes["DW_AT_name"].value.decode(errors="replace"))
        key = next((k for k in ("DW_AT_abstract_origin", "DW_AT_specification")
                    if k in die.attributes), None)
        if key is None:
            break
        die = die.get_DIE_from_attribute(key)
    return "?"


def _ranges(dwarf: Any, unit: Any, die: Any) -> list[tuple[int, int]]:
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


def _file_name(program: Any, index: int) -> str:
    version = program.header.version
    files = program["file_entry"]
    try:
        entry = files[index - 1] if version < 5 else files[index]
    except IndexError:
        return ""
    name = bytes(entry.name).decode(errors="replace")
    dirs = program["include_directory"]
    directory = b""
    if version < 5 and entry.dir_index > 0:
        directory = dirs[entry.dir_index - 1]
    elif version >= 5:
        directory = dirs[entry.dir_index]
    if directory and not name.startswith("/"):
        return f"{bytes(directory).decode(errors='replace').rstrip('/')}/{name}"
    return name


# ------------------------------------------------------- disassembly


@dataclass(frozen=True)
class _Value:
    """What a register or stack slot may hold.

    ``kind``: ``table`` (a pointer to ``table``), ``slot`` (the address of a
    member: the table's address + ``offset``), ``member`` (the function
    pointer at ``offset``), ``global`` (the address of a tracked global),
    ``jumptable`` (a switch's computed target), ``const`` (the integer
    ``offset``), ``flags`` (what the last ``test``/``cmp`` found: ``via``
    is the mnemonic, ``offset`` encodes ZF, SF, CF, OF as bits 0..3).
    """

    kind: str
    table: Table | None = None
    via: str = ""
    origin: int = 0
    offset: int = 0


_State = dict[str, frozenset[_Value]]
_Frozen = tuple[tuple[str, frozenset[_Value]], ...]
_EMPTY: frozenset[_Value] = frozenset()


@dataclass(frozen=True)
class _Site:
    """One thing found in one function: a finding without its path."""

    kind: str
    target: str
    site: int
    instruction: str
    group: str = ""


@dataclass(frozen=True)
class _Edge:
    site: int
    callee: Function
    state: _Frozen


@dataclass
class _Facts:
    """What the dataflow of one function (with one entry state) found."""

    sites: list[_Site] = field(default_factory=list)
    edges: list[_Edge] = field(default_factory=list)
    #: Reads of tracked globals: origin RVA -> (global name, instruction).
    reads: dict[int, tuple[str, str]] = field(default_factory=dict)
    #: Origins consumed by a member call.
    consumed: set[int] = field(default_factory=set)
    #: What the function may return in rax (tracked tables only).
    returns: frozenset[_Value] = _EMPTY
    instructions: int = 0


_REGS64 = {
    **{r: r for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")},
    **{f"e{r[1:]}": r for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")},
    "ax": "rax", "bx": "rbx", "cx": "rcx", "dx": "rdx", "si": "rsi", "di": "rdi",
    "bp": "rbp", "sp": "rsp", "al": "rax", "ah": "rax", "bl": "rbx", "bh": "rbx",
    "cl": "rcx", "ch": "rcx", "dl": "rdx", "dh": "rdx", "sil": "rsi", "dil": "rdi",
    "bpl": "rbp", "spl": "rsp",
    **{f"r{n}{s}": f"r{n}" for n in range(8, 16) for s in ("", "d", "w", "b")},
}
#: What a call or jump passes on to its target (a switch's computed target
#: stays in its function).
_PASSED_KINDS = ("table", "slot", "member", "global", "const")
#: Registers a function may receive a tracked value in (SysV and MS ABI).
_ARGUMENT_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
#: Instructions that leave the flags as they were.
_KEEPS_FLAGS = ("mov", "movabs", "movzx", "movsx", "movsxd", "lea", "push", "pop", "nop",
                "endbr64", "leave", "xchg", "cdqe", "cqo", "cdq", "not", "bswap")
_ZF, _SF, _CF, _OF = 1, 2, 4, 8
#: Entry states analysed per function before its constants are dropped.
_MAX_VARIANTS = 4
#: Conditional jumps the constants can decide: taken when the lambda of
#: (ZF, SF, CF, OF) holds.
_CONDITIONS: Mapping[str, Any] = {
    "je": lambda z, s, c, o: z, "jne": lambda z, s, c, o: not z,
    "js": lambda z, s, c, o: s, "jns": lambda z, s, c, o: not s,
    "jb": lambda z, s, c, o: c, "jae": lambda z, s, c, o: not c,
    "jbe": lambda z, s, c, o: c or z, "ja": lambda z, s, c, o: not c and not z,
    "jl": lambda z, s, c, o: s != o, "jge": lambda z, s, c, o: s == o,
    "jle": lambda z, s, c, o: z or s != o, "jg": lambda z, s, c, o: not z and s == o,
}


def _flags(mnemonic: str, a: int, b: int, bits: int) -> int:
    mask = (1 << bits) - 1
    a, b = a & mask, b & mask
    sign = 1 << (bits - 1)
    if mnemonic == "test":
        result, carry, overflow = a & b, False, False
    else:                                   # cmp: a - b
        result = (a - b) & mask
        carry = a < b
        overflow = bool((a ^ b) & sign) and bool((a ^ result) & sign)
    return ((_ZF if result == 0 else 0) | (_SF if result & sign else 0)
            | (_CF if carry else 0) | (_OF if overflow else 0))


class _CS:
    """capstone's constants, bound when the first disassembler is made (the
    import costs 50 ms that a CLI start need not pay)."""

    CS_GRP_JUMP = CS_GRP_RET = CS_GRP_CALL = 0
    X86_OP_IMM = X86_OP_REG = X86_OP_MEM = X86_REG_RIP = 0


class _Disassembler:
    """capstone over one image, and the dataflow of each function."""

    def __init__(self, image: _Image) -> None:
        import capstone
        import capstone.x86

        for name in ("CS_GRP_JUMP", "CS_GRP_RET", "CS_GRP_CALL"):
            setattr(_CS, name, getattr(capstone, name))
        for name in ("X86_OP_IMM", "X86_OP_REG", "X86_OP_MEM", "X86_REG_RIP"):
            setattr(_CS, name, getattr(capstone.x86, name))
        self.image = image
        self.cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.cs.detail = True
        self._insns: dict[str, list[Any]] = {}
        self._facts: dict[tuple[str, _Frozen], _Facts] = {}
        self._busy: set[tuple[str, _Frozen]] = set()
        self._variants: collections.Counter[str] = collections.Counter()

    def instructions(self, function: Function) -> list[Any]:
        if function.name not in self._insns:
            self._insns[function.name] = list(
                self.cs.disasm(self.image.bytes_of(function), function.start))
        return self._insns[function.name]

    def reg(self, insn: Any, reg: int) -> str:
        name = str(insn.reg_name(reg)) if reg else ""
        return _REGS64.get(name, name)

    # The dataflow ---------------------------------------------------

    def facts(self, function: Function, entry: _Frozen) -> _Facts:
        """The dataflow of ``function`` entered with ``entry`` (memoized;
        a recursive call sees no return value)."""
        key = (function.name, entry)
        if key in self._facts:
            return self._facts[key]
        if self._variants[function.name] >= _MAX_VARIANTS:
            # Called with many different constants (DebugPrint's error
            # levels): past a few, the constants are dropped, which can only
            # follow more branches, never fewer.
            entry = tuple((k, v) for k, v in ((k, frozenset(x for x in v if x.kind != "const"))
                                              for k, v in entry) if v)
            key = (function.name, entry)
            if key in self._facts:
                return self._facts[key]
        self._variants[function.name] += 1
        if key in self._busy:
            return _Facts()
        self._busy.add(key)
        try:
            facts = self._run(function, dict(entry))
        finally:
            self._busy.discard(key)
        self._facts[key] = facts
        return facts

    def _run(self, function: Function, entry: _State) -> _Facts:

        insns = self.instructions(function)
        facts = _Facts(instructions=len(insns))
        if not insns:
            return facts
        index = {insn.address: i for i, insn in enumerate(insns)}
        # Successors inside the function; an indirect jump (a switch) may go
        # to any instruction.
        succ: list[list[int]] = []
        for i, insn in enumerate(insns):
            nxt = [i + 1] if i + 1 < len(insns) else []
            if insn.group(_CS.CS_GRP_RET) or insn.mnemonic in ("hlt", "ud2"):
                succ.append([])
            elif insn.group(_CS.CS_GRP_JUMP):
                target = self._direct_target(insn)
                inside = [index[target]] if target in index else []
                if target is None:
                    inside = list(range(len(insns)))
                succ.append(inside + (nxt if insn.mnemonic != "jmp" else []))
            else:
                succ.append(nxt)
        preds = collections.Counter(j for targets in succ for j in targets)
        states: list[_State | None] = [None] * len(insns)
        states[0] = entry
        work = collections.deque([0])
        queued = {0}
        returns: set[_Value] = set()
        while work:
            i = work.popleft()
            queued.discard(i)
            state = states[i]
            assert state is not None
            insn = insns[i]
            out = self._step(function, insn, dict(state), facts)
            if insn.group(_CS.CS_GRP_RET):
                returns |= {v for v in state.get("rax", _EMPTY) if v.table is not None}
            for j in self._feasible(insn, state, succ[i], i):
                old = states[j]
                # One way in (most instructions): its state is the latest out.
                merged = out if old is None or (preds[j] <= 1 and j) else _join(old, out)
                if old is None or merged != old:
                    states[j] = merged
                    if j not in queued:
                        queued.add(j)
                        work.append(j)
        # Code no edge reaches at all (none should: a switch reaches
        # everything) is still read, from an empty state. Code only the
        # constants made unreachable is not: it cannot run on this path.
        static = _reachable(succ)
        for i, insn in enumerate(insns):
            if i not in static:
                self._step(function, insn, {}, facts)
        facts.returns = frozenset(returns)
        facts.sites = _unique(facts.sites)
        facts.edges = _unique(facts.edges)
        return facts

    def _feasible(self, insn: Any, state: _State, successors: list[int], i: int
                  ) -> list[int]:
        """The successors the constants allow: a conditional jump whose
        flags are known goes one way."""
        condition = _CONDITIONS.get(insn.mnemonic)
        flags = state.get("flags", _EMPTY)
        if condition is None or not flags or len(successors) != 2:
            return successors
        taken = {bool(condition(bool(f.offset & _ZF), bool(f.offset & _SF),
                                bool(f.offset & _CF), bool(f.offset & _OF))) for f in flags}
        if len(taken) != 1:
            return successors
        target, fallthrough = successors
        if fallthrough != i + 1:
            return successors
        return [target] if taken.pop() else [fallthrough]

    def _direct_target(self, insn: Any) -> int | None:

        ops = insn.operands
        if len(ops) == 1 and ops[0].type == _CS.X86_OP_IMM:
            return int(ops[0].imm)
        return None

    def _consts(self, insn: Any, op: Any, state: _State) -> set[int] | None:
        """The possible values of operand ``op``, or None if unknown."""

        if op.type == _CS.X86_OP_IMM:
            return {int(op.imm)}
        if op.type == _CS.X86_OP_REG:
            values = state.get(self.reg(insn, op.reg), _EMPTY)
            if values and all(v.kind == "const" for v in values):
                return {v.offset for v in values}
        return None

    def _step(self, function: Function, insn: Any, state: _State, facts: _Facts) -> _State:

        mnemonic = insn.mnemonic
        ops = insn.operands
        self._note_reads(insn, facts)
        flags_before = state.get("flags")
        if mnemonic not in _KEEPS_FLAGS and not mnemonic.startswith("j"):
            state.pop("flags", None)
        if mnemonic == "sti":
            facts.sites.append(_Site("interrupts", "sti (interrupts enabled)", insn.address,
                                     _text(insn)))
        is_call = insn.group(_CS.CS_GRP_CALL)
        is_jump = insn.group(_CS.CS_GRP_JUMP) and not is_call
        if is_call or (is_jump and mnemonic == "jmp"):
            target = self._direct_target(insn)
            returned: frozenset[_Value] = _EMPTY
            if target is not None:
                returned = self._direct(function, insn, target, state, facts, is_call)
            else:
                self._indirect(insn, state, facts, is_call)
            if is_call:
                state["rax"] = returned
                # The callee may write through a pointer to a local (an OUT
                # parameter): a constant in a stack slot is no longer known.
                for key in [k for k in state if k.startswith("[")]:
                    state[key] = frozenset(v for v in state[key] if v.kind != "const")
            return state
        if is_jump:
            target = self._direct_target(insn)
            if target is not None and not (function.start <= target < function.end):
                self._direct(function, insn, target, state, facts, False)
            if flags_before is not None:
                state["flags"] = flags_before
            return state
        if mnemonic in ("test", "cmp") and len(ops) == 2:
            left, right = self._consts(insn, ops[0], state), self._consts(insn, ops[1], state)
            if left is not None and right is not None:
                bits = 8 * ops[0].size
                state["flags"] = frozenset(_Value("flags", via=mnemonic,
                                                  offset=_flags(mnemonic, a, b, bits))
                                           for a in left for b in right)
            return state
        if len(ops) == 2 and ops[0].type == _CS.X86_OP_REG:
            dest = self.reg(insn, ops[0].reg)
            src = ops[1]
            size = ops[0].size
            if mnemonic in ("mov", "movabs") and src.type == _CS.X86_OP_IMM and size >= 4:
                state[dest] = frozenset([_Value("const", offset=int(src.imm) & _mask(size))])
                return state
            if mnemonic == "xor" and src.type == _CS.X86_OP_REG and src.reg == ops[0].reg \
                    and size >= 4:
                state[dest] = frozenset([_Value("const", offset=0)])
                return state
            if mnemonic in ("mov", "movzx") and src.type == _CS.X86_OP_REG and \
                    (size >= 4 or mnemonic == "movzx"):
                values = state.get(self.reg(insn, src.reg), _EMPTY)
                if src.size < 8:
                    values = frozenset(_Value("const", offset=v.offset & _mask(src.size))
                                       for v in values if v.kind == "const")
                state[dest] = values
                return state
            if mnemonic in ("mov", "lea", "movsxd") and src.type == _CS.X86_OP_MEM:
                mem = src.mem
                base = self.reg(insn, mem.base)
                if mem.base == _CS.X86_REG_RIP:
                    address = insn.address + insn.size + mem.disp
                    state[dest] = self._global(insn, address, mnemonic == "lea", facts)
                    return state
                if mnemonic == "lea":
                    state[dest] = frozenset(
                        _Value("slot", v.table, v.via, v.origin, v.offset + mem.disp)
                        for v in state.get(base, _EMPTY)
                        if v.kind == "table" and not mem.index)
                    return state
                if mem.index:
                    state[dest] = frozenset([_Value("jumptable", origin=insn.address)])
                    return state
                state[dest] = self._load(base, mem.disp, state) if size == 8 else _EMPTY
                return state
            if mnemonic == "add" and src.type == _CS.X86_OP_IMM and size == 8:
                # A pointer into a table: the address of its member.
                state[dest] = frozenset(
                    _Value("slot", v.table, v.via, v.origin, v.offset + int(src.imm))
                    for v in state.get(dest, _EMPTY) if v.kind in ("table", "slot"))
                return state
            if mnemonic == "add":
                values = state.get(dest, _EMPTY)
                if src.type == _CS.X86_OP_REG:
                    values = values | state.get(self.reg(insn, src.reg), _EMPTY)
                state[dest] = frozenset(v for v in values if v.kind == "jumptable")
                return state
        if mnemonic == "mov" and len(ops) == 2 and ops[0].type == _CS.X86_OP_MEM and \
                ops[1].type == _CS.X86_OP_REG:
            base = self.reg(insn, ops[0].mem.base)
            if base in ("rsp", "rbp") and not ops[0].mem.index and ops[0].size == 8:
                state[f"[{base}{ops[0].mem.disp:+#x}]"] = \
                    state.get(self.reg(insn, ops[1].reg), _EMPTY)
            return state
        if ops and ops[0].type == _CS.X86_OP_MEM and not ops[0].mem.index and \
                self.reg(insn, ops[0].mem.base) in ("rsp", "rbp"):
            # Any other write to a stack slot: what it held is gone.
            state.pop(f"[{self.reg(insn, ops[0].mem.base)}{ops[0].mem.disp:+#x}]", None)
        if mnemonic == "xchg" and len(ops) == 2 and all(o.type == _CS.X86_OP_REG for o in ops):
            a, b = self.reg(insn, ops[0].reg), self.reg(insn, ops[1].reg)
            state[a], state[b] = state.get(b, _EMPTY), state.get(a, _EMPTY)
            return state
        # Anything else that writes a register leaves nothing known in it.
        try:
            _, written = insn.regs_access()
        except Exception:  # noqa: BLE001 - capstone raises its own CsError
            written = []
        for reg in written:
            name = self.reg(insn, reg)
            if name in state:
                state[name] = _EMPTY
        return state

    def _note_reads(self, insn: Any, facts: _Facts) -> None:
        """Any RIP-relative operand naming a tracked global, other than a
        ``lea``: a read of the table pointer."""

        if insn.mnemonic == "lea":
            return
        for op in insn.operands:
            if op.type == _CS.X86_OP_MEM and op.mem.base == _CS.X86_REG_RIP:
                known = self.image.globals_.get(insn.address + insn.size + op.mem.disp)
                if known is not None and known[1] is not None:
                    facts.reads[insn.address] = (known[0], _text(insn))

    def _global(self, insn: Any, address: int, is_lea: bool, facts: _Facts
                ) -> frozenset[_Value]:
        """A RIP-relative read (``mov``) or address (``lea``) of ``address``."""
        known = self.image.globals_.get(address)
        if known is None or known[1] is None:
            return _EMPTY
        name, table = known
        kind = "global" if is_lea else "table"
        return frozenset([_Value(kind, table, name, insn.address)])

    def _load(self, base: str, disp: int, state: _State) -> frozenset[_Value]:
        """``mov reg, [base + disp]``."""
        if base in ("rsp", "rbp"):
            return state.get(f"[{base}{disp:+#x}]", _EMPTY)
        out: set[_Value] = set()
        for value in state.get(base, _EMPTY):
            if value.kind == "global" and disp == 0:
                out.add(_Value("table", value.table, value.via, value.origin))
            elif value.kind == "table" and value.table is SYSTEM_TABLE and \
                    disp == SYSTEM_TABLE_BOOT_SERVICES:
                out.add(_Value("table", BOOT_SERVICES, f"{value.via}->BootServices",
                               value.origin))
            elif value.kind == "table":
                out.add(_Value("member", value.table, value.via, value.origin, disp))
            elif value.kind == "slot":
                out.add(_Value("member", value.table, value.via, value.origin,
                               value.offset + disp))
        return frozenset(out)

    def _direct(self, function: Function, insn: Any, target: int, state: _State,
                facts: _Facts, is_call: bool) -> frozenset[_Value]:
        """A call or jump to ``target``; what it returns in rax."""
        callee = self.image.function_at(target)
        if callee is None:
            facts.sites.append(_Site("unknown-target", f"{target:#x} (no function there)",
                                     insn.address, _text(insn)))
            return _EMPTY
        if not is_call and callee == function:
            return _EMPTY
        # A call passes the argument registers on; a jump (a tail call, or
        # into the function's ``.cold`` part) passes every register.
        keys = _ARGUMENT_REGS if is_call else tuple(
            k for k in state if not k.startswith("[") and k != "flags")
        passed = tuple(sorted(
            (k, v) for k, v in ((k, frozenset(x for x in state.get(k, _EMPTY)
                                              if x.kind in _PASSED_KINDS)) for k in keys) if v))
        facts.edges.append(_Edge(insn.address, callee, passed))
        return self.facts(callee, passed).returns if is_call else _EMPTY

    def _indirect(self, insn: Any, state: _State, facts: _Facts, is_call: bool) -> None:

        op = insn.operands[0] if insn.operands else None
        values: frozenset[_Value] = _EMPTY
        if op is not None and op.type == _CS.X86_OP_REG:
            values = frozenset(v for v in state.get(self.reg(insn, op.reg), _EMPTY)
                               if v.kind in ("member", "jumptable"))
        elif op is not None and op.type == _CS.X86_OP_MEM and op.mem.base != _CS.X86_REG_RIP \
                and not op.mem.index:
            values = self._load(self.reg(insn, op.mem.base), op.mem.disp, state)
        members = [v for v in values if v.kind == "member" and v.table is not None]
        if not is_call and not members and any(v.kind == "jumptable" for v in values):
            return                              # a switch inside the function
        if not is_call and op is not None and op.type == _CS.X86_OP_MEM and op.mem.index:
            return                              # jmp *table(,%reg,8): a switch
        if members:
            for value in members:
                assert value.table is not None
                member = value.table.member(value.offset)
                facts.consumed.add(value.origin)
                kind = "boot-service" if value.table.kind == "reference" else value.table.kind
                group = SERVICE_GROUPS.get(member, "") if kind == "boot-service" else ""
                facts.sites.append(_Site(kind, f"{value.via}->{member}", insn.address,
                                         _text(insn), group))
            return
        facts.sites.append(_Site("indirect", f"{insn.mnemonic} {insn.op_str} (not followed)",
                                 insn.address, _text(insn)))


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


def _reachable(succ: Sequence[Sequence[int]]) -> set[int]:
    seen = {0}
    todo = [0]
    while todo:
        for j in succ[todo.pop()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return seen


def _text(insn: Any) -> str:
    return f"{insn.mnemonic} {insn.op_str}".strip()


def _join(a: _State, b: _State) -> _State:
    """Both ways in: tracked tables are kept from either side (a may
    analysis); a constant or the flags only where both sides know them (a
    register missing or empty on one side holds anything there)."""
    if a == b:
        return a
    out = dict(a)
    for key in a.keys() | b.keys():
        left, right = a.get(key, _EMPTY), b.get(key, _EMPTY)
        if left == right:
            continue
        values = left | right
        if not _all_known(left) or not _all_known(right):
            values = frozenset(v for v in values if v.kind not in ("const", "flags"))
        out[key] = values
    return out


def _all_known(values: frozenset[_Value]) -> bool:
    return bool(values) and all(v.kind in ("const", "flags") for v in values)


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


# ------------------------------------------------------------ the check


def branch_of(names: Iterable[str], files: Iterable[str] = ()) -> str | None:
    """The branch of the first name, else of the first source file, that
    belongs to a family of :data:`BRANCH_FAMILIES`; None if none does."""
    for name in names:
        for family in BRANCH_FAMILIES:
            if family.names.match(plain_name(name)):
                return family.branch
    for file in files:
        path = "/" + file.replace("\\", "/").lstrip("/")
        for family in BRANCH_FAMILIES:
            if family.files.search(path):
                return family.branch
    return None


@dataclass(frozen=True)
class _Node:
    function: Function
    state: _Frozen
    branch: str


def check_module(module: Path, entry: str = ENTRY) -> StaticCheck:
    """Every path from ``entry`` in ``module`` (an edk2 ``.debug`` ELF) to a
    boot service, a PCD protocol, a table read, an unfollowed call or an
    ``sti``: one :class:`Finding` per site, branch and path.

    :raises UsageError: ``module`` is not a readable ELF with symbols, or has
        no function ``entry``.
    """
    start = time.monotonic()
    image = load_image(module)
    root = image.function_named(entry)
    if root is None:
        raise UsageError(f"{module}: no function {entry} (is this IoMmuDxe of the series?)")
    dis = _Disassembler(image)
    first = _Node(root, (), NO_BRANCH)
    parent: dict[_Node, tuple[_Node, int] | None] = {first: None}
    queue = collections.deque([first])
    found: dict[tuple[int, str, str], Finding] = {}
    reads_at: dict[tuple[int, str], tuple[_Node, str, str]] = {}
    consumed: set[int] = set()
    reached: dict[str, None] = {}

    def add(finding: Finding) -> None:
        # One finding per site and branch, with the shortest path to it.
        key = (finding.site, finding.target, finding.branch)
        if key not in found or len(finding.path) < len(found[key].path):
            found[key] = finding

    while queue:
        node = queue.popleft()
        reached[node.function.name] = None
        facts = dis.facts(node.function, node.state)
        consumed |= facts.consumed
        for origin, (name, text) in facts.reads.items():
            reads_at.setdefault((origin, _branch_at(image, node, origin)), (node, name, text))
        for site in facts.sites:
            add(Finding(site.kind, site.target, _branch_at(image, node, site.site),
                        _path(image, parent, node, site.site), site.site, site.instruction,
                        site.group))
        for edge in facts.edges:
            child = _Node(edge.callee, edge.state,
                          _branch_at(image, node, edge.site, edge.callee))
            if child not in parent:
                parent[child] = (node, edge.site)
                queue.append(child)
    # A read of a table that no followed call went through: the pointer is
    # compared, passed on or stored; a reference all the same.
    for (origin, _), (node, name, text) in sorted(reads_at.items(), key=lambda kv: kv[0]):
        if origin not in consumed:
            add(Finding("reference", f"{name} (read, not called through)",
                        _branch_at(image, node, origin), _path(image, parent, node, origin),
                        origin, text))
    findings = sorted(found.values(), key=lambda f: (_BRANCH_ORDER.get(f.branch, 9),
                                                     len(f.path), f.site, f.target))
    instructions = sum(len(dis.instructions(image.function_named(name) or root))
                       for name in reached)
    return StaticCheck(module, entry, tuple(findings), tuple(reached), instructions,
                       time.monotonic() - start)


_BRANCH_ORDER = {NO_BRANCH: 0, **{f.branch: i + 1 for i, f in enumerate(BRANCH_FAMILIES)}}


def _branch_at(image: _Image, node: _Node, rva: int, callee: Function | None = None) -> str:
    """The branch of a path through the instruction at ``rva`` of ``node``
    (and on to ``callee``): the node's, once a family function was passed;
    else the first family among the frames inlined at ``rva`` and the
    callee, then the source files of the instruction and of the callee."""
    if node.branch != NO_BRANCH:
        return node.branch
    names = list(image.inline_chain(rva)[1:])
    files = [image.file_at(rva)]
    if callee is not None:
        names.append(callee.name)
        files.append(image.file_at(callee.start))
    return branch_of(names, files) or NO_BRANCH


def _path(image: _Image, parent: Mapping[_Node, tuple[_Node, int] | None], node: _Node,
          rva: int) -> tuple[Hop, ...]:
    """The hops from the entry to the instruction at ``rva`` of ``node``:
    each function, then the frames inlined into it at the call site. A name
    repeated by the DWARF (an out-of-line copy holding its own inlined
    body) is shown once."""
    frames: list[tuple[Function, int]] = [(node.function, rva)]
    link = parent[node]
    while link is not None:
        caller, site = link
        frames.append((caller.function, site))
        link = parent[caller]
    hops: list[Hop] = []
    for function, site in reversed(frames):
        names = [(plain_name(function.name), False)]
        names += [(name, True) for name in image.inline_chain(site)[1:]]
        for name, inlined in names:
            if not hops or hops[-1].function != name:
                hops.append(Hop(name, inlined))
    return tuple(hops)


# ------------------------------------------------------------ firmware


#: Where ``build`` records the check in ``manifest.json``.
MANIFEST_KEY = "static_c3"
#: The check's own version, in that record: a firmware built by an older
#: check keeps the older check's answer (``check-firmware`` gives today's).
CHECK_VERSION = 1


def module_path(firmware_dir: Path) -> Path:
    """``DIR/modules/IoMmuDxe.debug``.

    :raises UsageError: ``firmware_dir`` is no firmware build (no such file).
    """
    path = Path(firmware_dir) / "modules" / f"{MODULE}.debug"
    if not Path(firmware_dir).is_dir():
        raise UsageError(f"{firmware_dir}: not a directory")
    if not path.is_file():
        raise UsageError(f"{firmware_dir} is not a firmware build: modules/{MODULE}.debug "
                         f"is missing")
    return path


def check_firmware(firmware_dir: Path, entry: str = ENTRY) -> StaticCheck:
    """:func:`check_module` on a firmware directory's IoMmuDxe."""
    return check_module(module_path(firmware_dir), entry)


def manifest_record(result: StaticCheck) -> dict[str, object]:
    """What ``build`` writes under :data:`MANIFEST_KEY`: the verdict and the
    paths as text (the whole result is ``ebs-harness check-firmware --json``)."""
    return {"check_version": CHECK_VERSION,
            "verdict": result.verdict, "entry": result.entry, "summary": result.summary(),
            "findings": [f.line() for f in result.findings],
            "branches": result.branches, "functions": len(result.functions),
            "seconds": round(result.seconds, 3)}


def lines(result: StaticCheck) -> Iterator[str]:
    """The report ``check-firmware`` prints."""
    yield (f"{result.module}: {result.entry} reaches {len(result.functions)} functions "
           f"({result.instructions} instructions), {result.seconds:.2f} s")
    if not result.findings:
        yield "static C3: pass: no boot service, PCD protocol, table read or unfollowed call"
        return
    yield f"static C3: fail: {len(result.findings)} path(s)"
    for finding in result.findings:
        yield f"  {finding.line()}"


def to_json(result: StaticCheck) -> str:
    return json.dumps(result.as_dict(), indent=2, sort_keys=True)


def build_record(modules: Path) -> dict[str, object]:
    """The check of a firmware being published (``modules/`` written), as
    ``build`` keeps it in ``manifest.json`` under :data:`MANIFEST_KEY`.
    Never raises for the firmware's sake: a build without the teardown (stock
    OVMF) or without a readable IoMmuDxe is recorded as ``unchecked``, with
    why. A finding does not fail the build (yet): it is recorded."""
    module = modules / f"{MODULE}.debug"
    if not module.is_file():
        why = f"no modules/{MODULE}.debug"
        return {"check_version": CHECK_VERSION, "verdict": "unchecked", "reason": why,
                "summary": f"unchecked: {why}"}
    try:
        result = check_module(module)
    except UsageError as exc:
        return {"check_version": CHECK_VERSION, "verdict": "unchecked", "reason": str(exc),
                "summary": f"unchecked: {exc}"}
    LOG.info("static C3: %s", result.summary())
    return manifest_record(result)
