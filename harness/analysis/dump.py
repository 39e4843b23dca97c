"""The dump's verdicts, D1..D3: one function per check.

The dump is read by :mod:`harness.analysis.memdump` (the ELF core, the page
tables, the mapping list); the boot's trace gives its layout (the mapping
list's head, the C-bit or the emulation's bit).

Checks: D1 no live MAP_INFO records on the mapping list; D2 no page left
shared; D3 no canary in host-readable memory. What "shared" and
"host-readable" mean depends on the guest:

- **emulated SEV** (the harness's QEMU; memory is plaintext): a RAM page is
  shared when its leaf page-table entry has the C-bit clear, exactly as
  hardware decides what the host may read. D2 lists every such page except
  those shared by design (:data:`SHARED_BY_DESIGN`, each with its reason);
  D3 scans every shared page.
- **IOMMU emulation mode** (no SEV): leaf entries with the software bit
  ``sharedbit``; D3 scans those pages.
- **real SEV** (the dump is ciphertext for private pages): the page tables and
  the mapping list are private, so D1 and D2 are skipped with a note and the
  trace's V4 carries the live-mapping evidence; D3 scans all of RAM, since the
  host reads plaintext exactly where the guest shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.analysis import checks
from harness.analysis.checks import Outcome, Violation
from harness.analysis.debuglog import Trace
from harness.analysis.events import IommuMap, TraceEvent
from harness.analysis.memdump import (
    CANARY_NEEDLE,
    CR4_LA57,
    PAGE,
    ListWalk,
    QemuDump,
    SharedRange,
    shared_ranges,
    split_by_design,
    unencrypted_ranges,
    walk_map_list,
)
from harness.analysis.timeline import live_mappings
from harness.errors import UsageError


@dataclass(frozen=True)
class CanaryHit:
    paddr: int
    shared: bool | None

    def as_json(self) -> dict[str, object]:
        return {"paddr": f"{self.paddr:#x}", "shared": self.shared}


@dataclass(frozen=True)
class DumpReport:
    """What ``analyze-dump`` found.

    :param shared: the shared RAM D2 judges (None: not walked).
    :param by_design: shared RAM that D2 does not judge, with the reason
        (:data:`SHARED_BY_DESIGN`); D3 scans it with ``shared``.
    :param scope: what D3 scanned: ``shared`` pages or ``all`` RAM.
    :param notes: checks skipped and why, findings that are not violations.
    """

    path: str
    cr3: int | None
    maphead: int | None
    live: ListWalk | None
    shared: tuple[SharedRange, ...] | None
    canary_hits: tuple[CanaryHit, ...]
    scope: str
    violations: tuple[Violation, ...]
    notes: tuple[str, ...]
    by_design: tuple[tuple[SharedRange, str], ...] = ()
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.violations

    def as_json(self, mapped_at: dict[int, IommuMap] | None = None) -> dict[str, object]:
        recs = self.live.records if self.live else ()
        return {
            "verdict": "pass" if self.passed else "fail",
            "violations": [v.as_json() for v in self.violations],
            "live_mappings": [{
                "map": f"{r.addr:#x}", "op": r.operation, "op_name": r.op_name,
                "bytes": r.number_of_bytes, "pages": r.pages,
                "host": f"{r.crypted:#x}", "dev": f"{r.plain:#x}"} for r in recs],
            "shared_pages": ([s.as_json() for s in self.shared]
                             if self.shared is not None else None),
            "shared_by_design": [{**r.as_json(), "why": why} for r, why in self.by_design],
            "canary_hits": [h.as_json() for h in self.canary_hits],
            "scan_scope": self.scope,
            "cr3": f"{self.cr3:#x}" if self.cr3 is not None else None,
            "maphead": f"{self.maphead:#x}" if self.maphead is not None else None,
            "notes": list(self.notes),
        }


def resolve_maphead(trace: Trace, symbol_address: int | None) -> int | None:
    """``maphead`` from the iommu-config line, cross-checked with the symbols.

    :raises UsageError: the firmware dir's symbols disagree with the log.
    """
    config = trace.config
    from_log = config.maphead if config is not None and config.maphead else None
    if from_log is not None and symbol_address is not None and from_log != symbol_address:
        raise UsageError(f"the log's maphead {from_log:#x} is not IoMmuDxe's mMapInfos "
                         f"({symbol_address:#x}) in the firmware dir: wrong --firmware?")
    return from_log if from_log is not None else symbol_address


def _fmt_ranges(ranges: Sequence[SharedRange], limit: int = 8) -> str:
    parts = [f"{r.paddr:#x}+{r.size:#x}" for r in ranges[:limit]]
    if len(ranges) > limit:
        parts.append(f"and {len(ranges) - limit} more")
    return ", ".join(parts)


@dataclass(frozen=True)
class DumpEvidence:
    """What the dump checks read besides the dump: the boot's trace and the
    caller's knowledge of the guest.

    :param sev: the C-bit decides what is shared (SEV, real or emulated),
        rather than IoMmuDxe's emulation bit.
    """

    trace: Trace
    maphead: int | None
    canary: bytes | None
    scope: str
    cbit: int | None
    encrypted: bool

    @property
    def emulation(self) -> bool:
        config = self.trace.config
        return config is not None and config.emulation == 1

    @property
    def sharedbit(self) -> int:
        config = self.trace.config
        return config.sharedbit if config is not None and config.sharedbit else 52

    @property
    def sev(self) -> bool:
        return self.cbit is not None and not self.emulation


@dataclass(frozen=True)
class DumpJudged:
    """What one dump check found; ``skipped`` is its reason, where it could
    not be judged on this dump."""

    violations: tuple[Violation, ...] = ()
    notes: tuple[str, ...] = ()
    skipped: str = ""


def _skip(check: str, reason: str) -> DumpJudged:
    return DumpJudged(notes=(f"{check} skipped: {reason}",), skipped=reason)


def no_live_mapping(dump: QemuDump, ev: DumpEvidence) -> tuple[DumpJudged, ListWalk | None]:
    """D1: the IoMmuDxe mapping list, walked with bounds and cycle checks,
    is empty; and the walk."""
    if ev.encrypted:
        return _skip("D1", "under real SEV the mapping list is in private memory, which the "
                           "dump holds as ciphertext; V4 (the trace) is the live-mapping "
                           "evidence"), None
    if ev.maphead is None:
        return _skip("D1", "no maphead in the log (no iommu-config line) and no IoMmuDxe "
                           "symbols (no firmware directory)"), None
    notes: list[str] = []
    violations: list[Violation] = []
    walk = walk_map_list(dump, ev.maphead)
    if ev.sev:
        notes.append("D1 reads the mapping list in plaintext memory: emulation-only evidence "
                     "(under real SEV it is ciphertext)")
    by_map = {e.map: e for e in ev.trace.events if isinstance(e, IommuMap)}
    for rec in walk.records:
        event: TraceEvent | None = by_map.get(rec.addr)
        origin = f" (iommu-map seq {event.seq})" if event is not None else ""
        violations.append(Violation(
            "D1", f"live MAP_INFO at {rec.addr:#x}: {rec.op_name} host {rec.crypted:#x} dev "
                  f"{rec.plain:#x} {rec.pages} page(s){origin}",
            (event.seq,) if event is not None else ()))
    for problem in walk.problems:
        violations.append(Violation("D1", f"mapping list at {ev.maphead:#x} cannot be proven "
                                          f"empty: {problem}"))
    mapped = live_mappings(ev.trace.events)
    if mapped and not walk.records and not walk.problems:
        notes.append(f"the log leaves {len(mapped)} mapping(s) live but the dump's list is "
                     f"empty")
    return DumpJudged(tuple(violations), tuple(notes)), walk


#: Why a GHCB page is shared (D2's note).
GHCB_WHY = ("a GHCB page: under SEV-ES every CPU shares one with the hypervisor for the "
            "#VC handler (PlatformPei's 'SEV-ES is enabled, N GHCB pages' line; the "
            "per-CPU variable page beside each stays private)")


def ghcb_by_design(trace: Trace) -> tuple[tuple[int, int, str], ...]:
    """The GHCB pages the log announced, as ranges shared by design."""
    return tuple((page, page + PAGE, GHCB_WHY) for page in trace.ghcb_pages)


@dataclass(frozen=True)
class Shared:
    """The host-readable RAM D2 found: judged, and shared by design."""

    ranges: tuple[SharedRange, ...]
    by_design: tuple[tuple[SharedRange, str], ...] = ()


def no_shared_page(dump: QemuDump, ev: DumpEvidence) -> tuple[DumpJudged, Shared | None]:
    """D2: no page is left shared (C-bit clear under SEV, bit 52 in the
    emulation mode) beyond those shared by design, walked from CR3; and
    what is shared, where it could be walked."""
    cr3 = dump.cpus[0].cr3 if dump.cpus else None
    if ev.encrypted:
        return _skip("D2", "under real SEV the page tables are private (ciphertext in the "
                           "dump)"), None
    if not ev.emulation and not ev.sev:
        return _skip("D2", "neither SEV nor the IOMMU emulation mode: nothing is shared"), None
    if cr3 is None:
        return _skip("D2", "the dump has no QEMU CPU-state note (no CR3)"), None
    if dump.cpus[0].cr4 & CR4_LA57:
        return _skip("D2", "the guest uses 5-level paging (CR4.LA57), which the page walker "
                           "does not read"), None
    findings: list[str] = []
    notes: list[str] = []
    by_design: list[tuple[SharedRange, str]] = []
    if ev.emulation:
        shared = shared_ranges(dump, cr3, ev.sharedbit, findings)
        what = f"bit {ev.sharedbit}"
    else:
        assert ev.cbit is not None
        shared, by_design = split_by_design(unencrypted_ranges(dump, cr3, ev.cbit, findings),
                                            ghcb_by_design(ev.trace))
        for rng, why in by_design:
            notes.append(f"D2: {rng.size // PAGE} page(s) at {rng.paddr:#x} shared by "
                         f"design: {why}")
        what = f"C-bit {ev.cbit.bit_length() - 1} clear"
    notes.extend(f"page walk: {f}" for f in findings[:20])
    violations: list[Violation] = []
    if shared:
        total = sum(r.size for r in shared)
        violations.append(Violation(
            "D2", f"{total // PAGE} page(s) in {len(shared)} range(s) still shared ({what}): "
                  f"{_fmt_ranges(shared)}"))
    return DumpJudged(tuple(violations), tuple(notes)), Shared(tuple(shared), tuple(by_design))


def no_canary(dump: QemuDump, ev: DumpEvidence, shared: Shared | None
              ) -> tuple[DumpJudged, tuple[CanaryHit, ...], str]:
    """D3: the canary is nowhere the host can read: in the shared pages
    where D2 knows them, else (and under real SEV) anywhere in RAM; its
    hits and the scope scanned."""
    use = ev.scope if ev.scope != "auto" else ("all" if ev.encrypted or shared is None
                                               else "shared")
    notes: list[str] = []
    if use == "shared" and shared is None:
        notes.append("D3 scans all RAM: the shared-page set is unknown")
        use = "all"
    skip = ("no canary given" if ev.canary is None else
            "no IOMMU in this boot (no iommu-config line), so no memory is shared and a plain "
            "guest's memory is all host-readable; a scan of all RAM looks anyway"
            if ev.trace.config is None and not ev.sev and ev.scope == "auto" else "")
    if skip or ev.canary is None:
        return DumpJudged(notes=(*notes, f"D3 skipped: {skip}"), skipped=skip), (), use
    canary = ev.canary[:CANARY_NEEDLE]
    if use == "shared":
        assert shared is not None
        readable = [(r.paddr, r.size) for r in shared.ranges]
        readable += [(r.paddr, r.size) for r, _ in shared.by_design]
        found = dump.scan(canary, readable) if readable else []
        hits = [CanaryHit(a, True) for a in found]
        elsewhere = len(dump.scan(canary)) - len(found)
        if elsewhere:
            notes.append(f"the canary is also in {elsewhere} place(s) of private memory (not "
                         f"host-readable under SEV)")
    else:
        hits = [CanaryHit(a, None) for a in dump.scan(canary)]
    violations = [Violation("D3", f"canary at paddr {hit.paddr:#x} in host-readable memory "
                                  f"({use} scanned)") for hit in hits[:8]]
    if len(hits) > 8:
        violations.append(Violation("D3", f"and {len(hits) - 8} more canary hits"))
    return DumpJudged(tuple(violations), tuple(notes)), tuple(hits), use


def analyze_dump(path: Path | str, trace: Trace, *, maphead_symbol: int | None = None,
                 canary: bytes | None = None, scope: str = "auto", cbit: int | None = None,
                 encrypted: bool = False) -> DumpReport:
    """D1..D3 on the dump at ``path``, with the boot's trace for its layout.

    :param maphead_symbol: mMapInfos' runtime address from the symbols, if known.
    :param scope: ``auto`` (the shared pages where they are known, else all
        RAM), ``shared`` or ``all``.
    :param cbit: the SEV C-bit mask; default: from the log's "SEV is enabled
        (mask 0x...)" line.
    :param encrypted: the dump is of a real SEV guest: private memory is
        ciphertext (D1 and D2 are skipped, D3 scans all RAM).
    """
    if scope not in ("auto", "shared", "all"):
        raise UsageError(f"scan scope {scope!r}: use auto, shared or all")
    ev = DumpEvidence(trace, resolve_maphead(trace, maphead_symbol), canary, scope,
                      trace.sev_mask if cbit is None else cbit, encrypted)
    with QemuDump(path) as dump:
        cr3 = dump.cpus[0].cr3 if dump.cpus else None
        d1, walk = no_live_mapping(dump, ev)
        d2, shared = no_shared_page(dump, ev)
        d3, hits, use = no_canary(dump, ev, shared)
    judged = {"D1": d1, "D2": d2, "D3": d3}
    violations = tuple(v for j in judged.values() for v in j.violations)
    return DumpReport(
        str(path), cr3, ev.maphead, walk, shared.ranges if shared is not None else None,
        hits, use, violations, tuple(n for j in judged.values() for n in j.notes),
        shared.by_design if shared is not None else (),
        checks.outcomes(judged, violations, {c: j.skipped for c, j in judged.items()
                                             if j.skipped}))


def load_canary(path: Path | str) -> bytes:
    """The canary bytes of a ``--canary`` file (trailing newlines dropped)."""
    try:
        data = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise UsageError(f"canary file {path}: {exc.strerror or exc}") from exc
    if not 8 <= len(data) <= 1 << 20:
        raise UsageError(f"canary file {path}: {len(data)} bytes; need 8 .. 1 MiB")
    return data
