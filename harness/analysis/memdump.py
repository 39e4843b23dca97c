"""Reading a QEMU memory dump: the ELF core, the page tables, the IoMmuDxe
mapping list, and scans for bytes.

The dump is what QMP ``dump-guest-memory`` writes with ``paging=false``
(QEMU 7.2, ``dump/dump.c``): an ELF64 core with one ``PT_NOTE`` (``CORE``
NT_PRSTATUS and ``QEMU`` QEMUCPUState notes per CPU) and one ``PT_LOAD``
per RAM block, ``p_paddr`` the guest-physical address. The file is read
through ``mmap``, so memory use does not grow with the dump; every offset
and count in it is checked against the file before use, and a dump that
does not hold together raises :class:`~harness.errors.DumpFormatError`
with one line. Problems inside guest memory (a page table pointing outside
RAM, a cyclic mapping list) are findings, not errors: they are what the
checks (:mod:`harness.analysis.dump`) are looking for.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import mmap
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from harness.errors import DumpFormatError, UsageError

LOG = logging.getLogger(__name__)

PT_LOAD = 1
PT_NOTE = 4
ET_CORE = 4
EM_X86_64 = 62
PN_XNUM = 0xFFFF
MAX_SEGMENTS = 1 << 16
MAX_NOTES_BYTES = 64 << 20
QEMU_CPU_STATE_MIN = 432          # through cr[5]
CR_OFFSET = 8 + 18 * 8 + 10 * 24  # cr[0] in QEMUCPUState

PAGE = 4096
MIB = 1 << 20
GIB = 1 << 30
ADDR_MASK = 0x000F_FFFF_FFFF_F000
ADDR_MASK_2M = 0x000F_FFFF_FFE0_0000
ADDR_MASK_1G = 0x000F_FFFF_C000_0000

#: RAM a SEV guest shares on purpose: ``(start, end, why)``. Pages here are
#: reported in the notes, never as a D2 violation; D3 still scans them.
SHARED_BY_DESIGN: tuple[tuple[int, int, str], ...] = (
    (0xA0000, MIB, ("the legacy VGA and option-ROM window: OVMF's PlatformInitLib "
                    "reports 0xA0000..1 MiB as MMIO, and AmdSevDxe clears the C-bit of "
                    "every MMIO range")),
    (4 * GIB - 16 * MIB, 4 * GIB,
     ("the firmware's flash window below 4 GiB: OVMF reports it as MMIO, and AmdSevDxe clears "
      "the C-bit of every MMIO range; with the firmware as one -bios image (SEV-SNP) it is ROM "
      "in the dump, no RAM the OS is given")),
)

MAX_TABLES = 1 << 16              # 256 MiB of page tables
MAX_LIST_ENTRIES = 1 << 16

MAP_INFO_SIZE = 64
MAP_INFO_SIGNATURE = b"MAP_INFO"
OPERATIONS = ("BusMasterRead", "BusMasterWrite", "BusMasterCommonBuffer",
              "BusMasterRead64", "BusMasterWrite64", "BusMasterCommonBuffer64")

SCAN_WINDOW = 64 << 20
#: D3 searches for the canary's first bytes: every copy of the canary (a
#: bounce buffer of the file read, the probe's leaked buffer) starts with
#: them, and a long needle lets ``find`` skip ahead (about 15 GiB/s at 128
#: bytes against 4 GiB/s at 8).
CANARY_NEEDLE = 128
MAX_HITS = 10_000


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD: guest-physical ``paddr`` .. ``paddr + size`` at file ``offset``."""

    paddr: int
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.paddr + self.size


CR4_LA57 = 1 << 12   #: 5-level paging


@dataclass(frozen=True)
class CpuState:
    """The parts of QEMUCPUState the analysis uses."""

    index: int
    rip: int
    cr0: int
    cr3: int
    cr4: int


class QemuDump:
    """A QEMU ELF core opened read-only through mmap.

    :raises DumpFormatError: not a complete x86-64 QEMU ELF core.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise DumpFormatError(path, "no such file") from exc
        except IsADirectoryError as exc:
            raise DumpFormatError(path, "is a directory, not a dump") from exc
        except PermissionError as exc:
            raise DumpFormatError(path, "permission denied") from exc
        self._mm: mmap.mmap | None = None
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise DumpFormatError(path, "is not a regular file (a directory?)")
            self.size = st.st_size
            if self.size < 64:
                raise DumpFormatError(path, f"{self.size} bytes: too short for an ELF header")
            self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            self.segments, self.cpus = self._parse()
        except BaseException:
            self.close()
            raise
        self._starts = [s.paddr for s in self.segments]

    # -- lifetime

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ELF

    def _bad(self, reason: str) -> DumpFormatError:
        return DumpFormatError(self.path, reason)

    def _bytes(self, offset: int, size: int, what: str) -> bytes:
        assert self._mm is not None
        if offset < 0 or size < 0 or offset + size > self.size:
            raise self._bad(f"{what} at file offset {offset:#x} (+{size:#x}) lies past the "
                            f"end of the file ({self.size:#x} bytes)")
        return self._mm[offset:offset + size]

    def _parse(self) -> tuple[tuple[Segment, ...], tuple[CpuState, ...]]:
        ident = self._bytes(0, 16, "ELF ident")
        if ident[:4] != b"\x7fELF":
            raise self._bad("not an ELF file (QEMU dump-guest-memory writes ELF)")
        if ident[4] != 2 or ident[5] != 1:
            raise self._bad("not a little-endian ELF64 file")
        (e_type, e_machine, _ver, _entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize,
         e_phnum, _shentsize, _shnum, _shstrndx) = struct.unpack(
             "<HHIQQQIHHHHHH", self._bytes(16, 48, "ELF header"))
        if e_type != ET_CORE:
            raise self._bad(f"ELF type {e_type}, not a core dump (ET_CORE)")
        if e_machine != EM_X86_64:
            raise self._bad(f"ELF machine {e_machine}, not x86-64")
        if e_phentsize != 56:
            raise self._bad(f"program header size {e_phentsize}, expected 56")
        if e_phnum == PN_XNUM:
            # More than 65534 segments: the real count is section 0's sh_info.
            e_phnum = struct.unpack("<I", self._bytes(e_shoff + 44, 4, "section header 0"))[0]
        if e_phnum == 0:
            raise self._bad("no program headers")
        if e_phnum > MAX_SEGMENTS:
            raise self._bad(f"{e_phnum} program headers: more than {MAX_SEGMENTS}")
        table = self._bytes(e_phoff, e_phnum * 56, f"program header table ({e_phnum} entries)")
        segments: list[Segment] = []
        cpus: list[CpuState] = []
        for i in range(e_phnum):
            (p_type, _pflags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz,
             _align) = struct.unpack_from("<IIQQQQQQ", table, i * 56)
            if p_type == PT_LOAD:
                if p_filesz > p_memsz:
                    raise self._bad(f"segment {i}: file size {p_filesz:#x} above memory size "
                                    f"{p_memsz:#x}")
                if p_offset + p_filesz > self.size:
                    raise self._bad(f"segment {i} (paddr {p_paddr:#x}, {p_filesz:#x} bytes at "
                                    f"offset {p_offset:#x}) extends past the end of the file "
                                    f"({self.size:#x} bytes): truncated dump?")
                if p_paddr + p_filesz > 1 << 52:
                    raise self._bad(f"segment {i}: paddr {p_paddr:#x} beyond 52 bits")
                if p_filesz:
                    segments.append(Segment(p_paddr, p_offset, p_filesz))
            elif p_type == PT_NOTE:
                if p_filesz > MAX_NOTES_BYTES:
                    raise self._bad(f"note segment of {p_filesz:#x} bytes: implausible")
                cpus.extend(self._parse_notes(self._bytes(p_offset, p_filesz, "note segment"),
                                              len(cpus)))
        if not segments:
            raise self._bad("no PT_LOAD segments: the dump holds no memory")
        segments.sort(key=lambda s: s.paddr)
        for a, b in itertools.pairwise(segments):
            if b.paddr < a.end:
                raise self._bad(f"segments overlap at paddr {b.paddr:#x}")
        return tuple(segments), tuple(cpus)

    def _parse_notes(self, data: bytes, first: int) -> list[CpuState]:
        cpus: list[CpuState] = []
        pos = 0
        while pos + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name_end = pos + 12 + namesz
            desc = (name_end + 3) & ~3
            nxt = (desc + descsz + 3) & ~3
            if desc + descsz > len(data):
                raise self._bad(f"note at offset {pos:#x} of the note segment runs past it "
                                f"(namesz {namesz}, descsz {descsz})")
            name = data[pos + 12:name_end].rstrip(b"\0")
            if name == b"QEMU" and ntype == 0:
                blob = data[desc:desc + descsz]
                if descsz < QEMU_CPU_STATE_MIN:
                    raise self._bad(f"QEMUCPUState note of {descsz} bytes, need "
                                    f"{QEMU_CPU_STATE_MIN}")
                version = struct.unpack_from("<I", blob, 0)[0]
                if version != 1:
                    LOG.warning("%s: QEMUCPUState version %d", self.path, version)
                rip = struct.unpack_from("<Q", blob, 8 + 16 * 8)[0]
                cr = struct.unpack_from("<5Q", blob, CR_OFFSET)
                cpus.append(CpuState(first + len(cpus), rip, cr[0], cr[3], cr[4]))
            pos = nxt
        return cpus

    # -- physical memory

    @property
    def ram_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def _segment(self, paddr: int) -> Segment | None:
        idx = bisect.bisect_right(self._starts, paddr) - 1
        if idx < 0:
            return None
        seg = self.segments[idx]
        return seg if paddr < seg.end else None

    def contains(self, paddr: int, size: int = 1) -> bool:
        return self.read(paddr, size) is not None if size <= PAGE else self._covered(paddr, size)

    def _covered(self, paddr: int, size: int) -> bool:
        while size > 0:
            seg = self._segment(paddr)
            if seg is None:
                return False
            step = min(size, seg.end - paddr)
            paddr += step
            size -= step
        return True

    def read(self, paddr: int, size: int) -> bytes | None:
        """``size`` bytes of guest-physical memory, or None if not all in the dump."""
        assert self._mm is not None
        if paddr < 0 or size < 0:
            return None
        parts = []
        while size > 0:
            seg = self._segment(paddr)
            if seg is None:
                return None
            step = min(size, seg.end - paddr)
            off = seg.offset + (paddr - seg.paddr)
            parts.append(self._mm[off:off + step])
            paddr += step
            size -= step
        return b"".join(parts)

    def read_u64(self, paddr: int) -> int | None:
        data = self.read(paddr, 8)
        return None if data is None else int(struct.unpack("<Q", data)[0])

    def file_ranges(self, ranges: Sequence[tuple[int, int]] | None = None
                    ) -> list[tuple[int, int, int]]:
        """``(file offset, size, paddr)`` pieces of physical ``ranges`` (all RAM if None)."""
        if ranges is None:
            return [(s.offset, s.size, s.paddr) for s in self.segments]
        out = []
        for paddr, size in ranges:
            end = paddr + size
            idx = max(bisect.bisect_right(self._starts, paddr) - 1, 0)
            for seg in self.segments[idx:]:
                if seg.paddr >= end:
                    break
                lo, hi = max(paddr, seg.paddr), min(end, seg.end)
                if lo < hi:
                    out.append((seg.offset + lo - seg.paddr, hi - lo, lo))
        return out

    def scan(self, needle: bytes, ranges: Sequence[tuple[int, int]] | None = None,
             window: int = SCAN_WINDOW, max_hits: int = MAX_HITS) -> list[int]:
        """Physical addresses where ``needle`` starts, in ``ranges`` (all RAM if None).

        Reads through windows of ``window`` bytes, each its own short-lived
        mmap, so resident memory stays near one window whatever the dump's
        size; consecutive windows overlap by ``len(needle) - 1`` bytes.
        Adjacent physical ranges are merged first, so a needle across a
        page boundary of two shared pages is found.
        """
        if not needle:
            raise ValueError("empty needle")
        merged: list[tuple[int, int]] = []
        for paddr, size in sorted(ranges) if ranges is not None else []:
            if merged and merged[-1][0] + merged[-1][1] >= paddr:
                last = merged[-1]
                merged[-1] = (last[0], max(last[1], paddr + size - last[0]))
            else:
                merged.append((paddr, size))
        pieces = self.file_ranges(merged if ranges is not None else None)
        gran = mmap.ALLOCATIONGRANULARITY
        hits: list[int] = []
        overlap = len(needle) - 1
        for offset, size, paddr in pieces:
            if size < len(needle):
                continue
            pos = 0
            while pos < size - overlap:
                length = min(window, size - pos)
                start = offset + pos
                base = start - start % gran
                view = mmap.mmap(self._fd, start - base + length, access=mmap.ACCESS_READ,
                                 offset=base)
                try:
                    lo, hi = start - base, start - base + length
                    found = view.find(needle, lo, hi)
                    while found >= 0:
                        hits.append(paddr + pos + found - lo)
                        if len(hits) >= max_hits:
                            return hits
                        found = view.find(needle, found + 1, hi)
                finally:
                    view.close()
                if pos + length >= size:
                    break
                pos += length - overlap
        return sorted(set(hits))


# ------------------------------------------------------------- page tables


@dataclass(frozen=True)
class Leaf:
    """A present leaf page-table entry: ``size`` bytes at ``vaddr`` -> ``paddr``."""

    vaddr: int
    paddr: int
    size: int
    entry: int
    level: int


def _canonical(vaddr: int) -> int:
    return vaddr | ~((1 << 48) - 1) & ((1 << 64) - 1) if vaddr & (1 << 47) else vaddr


def walk_page_tables(dump: QemuDump, cr3: int, findings: list[str] | None = None,
                     max_tables: int = MAX_TABLES, cbit: int = 0) -> Iterator[Leaf]:
    """Every present leaf of the 4-level tables at ``cr3`` (4K, 2M, 1G pages).

    :param cbit: a SEV guest's C-bit mask (``1 << cbitpos``): an attribute of
        the entry, stripped from every address (CR3 included), as the MMU does.

    Problems (a table outside the dump, a table referenced twice, too many
    tables) go to ``findings`` and the branch is skipped: the walk always
    ends, and reads nothing twice.
    """
    notes = findings if findings is not None else []
    seen: set[int] = set()
    sizes = {3: 1 << 30, 2: 1 << 21, 1: PAGE}
    address = ADDR_MASK & ~cbit
    masks = {3: ADDR_MASK_1G & ~cbit, 2: ADDR_MASK_2M & ~cbit}

    def table(paddr: int, level: int, vbase: int) -> Iterator[Leaf]:
        if paddr in seen:
            notes.append(f"page table at {paddr:#x} (level {level}) referenced twice; "
                         f"walked once")
            return
        if len(seen) >= max_tables:
            if len(seen) == max_tables:
                notes.append(f"page-table walk stopped after {max_tables} tables")
                seen.add(-1)
            return
        seen.add(paddr)
        data = dump.read(paddr, PAGE)
        if data is None:
            notes.append(f"level-{level} page table at {paddr:#x} is not in the dump")
            return
        for i, entry in enumerate(struct.unpack("<512Q", data)):
            if not entry & 1:
                continue
            vaddr = vbase | (i << (12 + 9 * (level - 1)))
            if level == 1:
                yield Leaf(_canonical(vaddr), entry & address, PAGE, entry, 1)
            elif level in (2, 3) and entry & 0x80:
                yield Leaf(_canonical(vaddr), entry & masks[level], sizes[level], entry, level)
            else:
                yield from table(entry & address, level - 1, vaddr)

    yield from table(cr3 & address, 4, 0)


@dataclass(frozen=True)
class SharedRange:
    """Physically contiguous shared memory (merged leaves)."""

    vaddr: int
    paddr: int
    size: int

    def as_json(self) -> dict[str, object]:
        return {"vaddr": f"{self.vaddr:#x}", "paddr": f"{self.paddr:#x}", "bytes": self.size}


def shared_ranges(dump: QemuDump, cr3: int, sharedbit: int,
                  findings: list[str] | None = None) -> list[SharedRange]:
    """Leaves with software bit ``sharedbit`` set, merged where contiguous."""
    if not 52 <= sharedbit <= 62:
        raise UsageError(f"sharedbit {sharedbit} is not a software-available bit (52..62)")
    bit = 1 << sharedbit
    out: list[SharedRange] = []
    for leaf in walk_page_tables(dump, cr3, findings):
        if not leaf.entry & bit:
            continue
        if out and out[-1].vaddr + out[-1].size == leaf.vaddr \
                and out[-1].paddr + out[-1].size == leaf.paddr:
            last = out[-1]
            out[-1] = SharedRange(last.vaddr, last.paddr, last.size + leaf.size)
        else:
            out.append(SharedRange(leaf.vaddr, leaf.paddr, leaf.size))
    return out


def unencrypted_ranges(dump: QemuDump, cr3: int, cbit: int,
                       findings: list[str] | None = None) -> list[SharedRange]:
    """The RAM a SEV guest shares: leaves whose entry has the C-bit (mask
    ``cbit``) clear, clipped to the dump's RAM (MMIO is shared too, but holds
    no guest data), merged where contiguous. Each physical page is counted
    once, however many virtual addresses map it."""
    if cbit == 0 or cbit & (cbit - 1) or not (1 << 32) <= cbit <= (1 << 51):
        raise UsageError(f"C-bit mask {cbit:#x} is not one bit in 32..51")
    pieces: set[tuple[int, int]] = set()
    for leaf in walk_page_tables(dump, cr3, findings, cbit=cbit):
        if leaf.entry & cbit:
            continue
        for _, size, paddr in dump.file_ranges([(leaf.paddr, leaf.size)]):
            pieces.add((paddr, size))
    out: list[SharedRange] = []
    for paddr, size in sorted(pieces):
        if out and out[-1].paddr + out[-1].size >= paddr:
            last = out[-1]
            end = max(last.paddr + last.size, paddr + size)
            out[-1] = SharedRange(last.vaddr, last.paddr, end - last.paddr)
        else:
            out.append(SharedRange(paddr, paddr, size))
    return out


def split_by_design(ranges: Sequence[SharedRange],
                    also: Sequence[tuple[int, int, str]] = (),
                    ) -> tuple[list[SharedRange], list[tuple[SharedRange, str]]]:
    """``ranges`` cut at :data:`SHARED_BY_DESIGN` and at ``also`` (ranges
    this boot's log says it shares, ``(start, end, why)``): what is left to
    judge, and the pieces shared by design with their reason."""
    judged: list[SharedRange] = []
    by_design: list[tuple[SharedRange, str]] = []
    for rng in ranges:
        todo = [(rng.paddr, rng.paddr + rng.size)]
        for start, end, why in (*SHARED_BY_DESIGN, *also):
            rest = []
            for lo, hi in todo:
                if hi <= start or lo >= end:
                    rest.append((lo, hi))
                    continue
                by_design.append((SharedRange(max(lo, start), max(lo, start),
                                              min(hi, end) - max(lo, start)), why))
                if lo < start:
                    rest.append((lo, start))
                if hi > end:
                    rest.append((end, hi))
            todo = rest
        judged += [SharedRange(lo, lo, hi - lo) for lo, hi in todo]
    return judged, by_design


# ------------------------------------------------------------ mapping list


@dataclass(frozen=True)
class MapRecord:
    """A MAP_INFO on the IoMmuDxe list, as edk2 lays it out (2022.11 ``AmdSevIoMmu.c``;
    2025.02 ``CcIoMmu.c`` appends ReservedMemBitmap, which is not read)."""

    addr: int
    operation: int
    number_of_bytes: int
    pages: int
    crypted: int
    plain: int

    @property
    def op_name(self) -> str:
        return OPERATIONS[self.operation] if self.operation < len(OPERATIONS) else "?"


@dataclass(frozen=True)
class ListWalk:
    """The mapping list: its live records, and what was wrong with it."""

    head: int
    records: tuple[MapRecord, ...]
    problems: tuple[str, ...]


def walk_map_list(dump: QemuDump, head: int, max_entries: int = MAX_LIST_ENTRIES) -> ListWalk:
    """Follow ForwardLink from ``head`` (the runtime address of ``mMapInfos``).

    Each entry must lie in the dump, carry the MAP_INFO signature and point
    back at its predecessor; a repeated entry is a cycle. The walk stops at
    the first problem.
    """
    problems: list[str] = []
    records: list[MapRecord] = []
    links = dump.read(head, 16)
    if links is None:
        return ListWalk(head, (), (f"list head {head:#x} is not in the dump",))
    flink, blink = struct.unpack("<QQ", links)
    prev, node = head, flink
    seen: set[int] = {head}
    while node != head:
        if node in seen:
            problems.append(f"cycle: entry link {node:#x} reached twice")
            break
        if len(records) >= max_entries:
            problems.append(f"more than {max_entries} entries; walk stopped")
            break
        seen.add(node)
        raw = dump.read(node - 8, MAP_INFO_SIZE)
        if raw is None:
            problems.append(f"link {node:#x} (after {prev:#x}) is outside the dump's RAM")
            break
        sig, fwd, back, op, nbytes, pages, crypted, plain = struct.unpack(
            "<8sQQI4xQQQQ", raw)
        if sig != MAP_INFO_SIGNATURE:
            problems.append(f"entry at {node - 8:#x} has signature {sig!r}, not "
                            f"{MAP_INFO_SIGNATURE!r}")
            break
        if back != prev:
            problems.append(f"entry at {node - 8:#x}: BackLink {back:#x}, expected {prev:#x}")
            break
        records.append(MapRecord(node - 8, op, nbytes, pages, crypted, plain))
        prev, node = node, fwd
    else:
        if blink != prev:
            problems.append(f"list head BackLink {blink:#x}, expected the last entry {prev:#x}")
    return ListWalk(head, tuple(records), tuple(problems))
