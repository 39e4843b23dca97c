"""S1, S2 and S3: an emulated SEV-SNP's page states, from QEMU's trace.

Under SEV-SNP a page made private again is usable only once the guest has
validated it (PVALIDATE); a page validated twice is an integrity hole the
hardware reports and OVMF treats as fatal; a private access to a page not
validated raises #VC 0x404. The harness's QEMU (``sev-emulated,snp=on``)
traces each change in the same ordered stream as the devices' events and
the teardown's fw_cfg markers (``device_models.PAGE_STATE_EVENTS``, enabled
under ``--sev emulated-snp``):

- ``sev_snp_page_state``: pages made private or shared (a page state
  change, or PVALIDATE's implicit conversion);
- ``sev_snp_pvalidate``: consecutive pages validated or rescinded, traced
  before the guest's next exit to its hypervisor, so before the marker that
  follows them;
- ``sev_snp_pvalidate_no_update``: a PVALIDATE that changed nothing (CF);
- ``sev_snp_not_validated``: the #VC 0x404 of an access;
- ``sev_snp_launch_update``: the sections the launch validated.

**S1** holds when every page made private between the teardown's markers
is validated when the end marker comes (validated after it was made
private, and not rescinded since), and no PVALIDATE anywhere in the boot
changed nothing. **S2** holds when no access reached a page not
validated. **S3** holds when every page of the memory map that
ExitBootServices() took (the probe prints it, ``probe step=memmap``) of a
type the OS uses as its memory (:data:`USABLE_TYPES`) is private and
validated when the guest parks: the page states replayed from the launch
on. None is judged for a guest whose trace has no page states (not an
emulated SEV-SNP): real SNP hardware keeps its reverse map from the host,
and the emulation is the only place the harness reads it; S3 not either
without the probe's memory map.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from harness.analysis.checks import Violation
from harness.analysis.devicetrace import DeviceEvent

PAGE = 0x1000

#: ``sev_snp_not_validated``'s ``access``: QEMU's MMUAccessType.
ACCESSES = {0: "read", 1: "write", 2: "instruction fetch"}

#: The memory types the OS is handed as its own memory, accepted (UEFI's
#: "Memory Type Usage after ExitBootServices()"); EfiUnacceptedMemoryType
#: (15) is memory the OS accepts itself, and the others are not RAM it uses.
USABLE_TYPES = {1: "EfiLoaderCode", 2: "EfiLoaderData", 3: "EfiBootServicesCode",
                4: "EfiBootServicesData", 5: "EfiRuntimeServicesCode",
                6: "EfiRuntimeServicesData", 7: "EfiConventionalMemory",
                9: "EfiACPIReclaimMemory", 10: "EfiACPIMemoryNVS"}

#: Why S3 is not judged of a boot whose debug log has no memory map.
NO_MEMORY_MAP = ("no memory map in the debug log: the probe of this series prints the one "
                 "ExitBootServices() took ('probe step=memmap' lines); other guests do not")


@dataclass(frozen=True)
class PageStates:
    """What QEMU's trace says of the page states, and S1/S2's violations.

    :param launched: the sections the launch validated, ``(gpa, len, type)``.
    :param made_private: pages the teardown made private again.
    :param revalidated: of those, the ones it validated again.
    """

    launched: tuple[tuple[int, int, str], ...]
    made_private: int
    revalidated: int
    violations: tuple[Violation, ...]
    notes: tuple[str, ...] = ()
    #: usable pages of the memory map S3 judged, or None without one
    usable_pages: int | None = None
    #: why the log's memory map was not judged ("" when it was, or is absent)
    memmap_cut: str = ""

    def summary(self) -> str:
        handed = (f"; the OS is handed {self.usable_pages} page(s) of usable memory"
                  if self.usable_pages is not None else "")
        return (f"page states (emulated SEV-SNP): the launch validated {len(self.launched)} "
                f"section(s); the teardown made {self.made_private} page(s) private again "
                f"and validated {self.revalidated} of them again{handed}")

    def as_json(self) -> dict[str, Any]:
        return {"launched": [{"gpa": gpa, "len": size, "type": kind}
                             for gpa, size, kind in self.launched],
                "made_private": self.made_private, "revalidated": self.revalidated,
                "usable_pages": self.usable_pages,
                "violations": [v.as_json() for v in self.violations],
                "notes": list(self.notes)}


def _pages(event: DeviceEvent) -> range:
    first = event.num("gpa")
    return range(first, first + event.num("pages") * PAGE, PAGE)


def _ranges(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted pages as ``(first, count)`` runs."""
    runs: list[tuple[int, int]] = []
    for page in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] * PAGE == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def _replay(snp: Sequence[DeviceEvent], top: int) -> tuple[bytearray, bytearray]:
    """The pages below ``top`` after ``snp``, the launch's state first: each
    private, and validated where the launch or PVALIDATE validated it. A
    launch after other events is a reset: the guest is launched again."""
    count = top // PAGE
    private = bytearray(b"\x01" * count)
    validated = bytearray(count)
    launching = False
    for event in snp:
        if event.name == "sev_snp_launch_update":
            if not launching:
                private[:] = b"\x01" * count
                validated[:] = bytes(count)
            launching = True
            first = event.num("gpa") // PAGE
            last = min(count, first + event.num("len") // PAGE)
            validated[first:last] = b"\x01" * max(0, last - first)
            continue
        launching = False
        if event.name not in ("sev_snp_page_state", "sev_snp_pvalidate"):
            continue
        first = event.num("gpa") // PAGE
        last = min(count, first + event.num("pages"))
        if first >= last:
            continue
        ones, zeros = b"\x01" * (last - first), bytes(last - first)
        if event.name == "sev_snp_pvalidate":
            validated[first:last] = ones if event.num("validate") else zeros
        elif event.fields["state"] == "private":
            private[first:last] = ones
        else:
            private[first:last] = zeros
            validated[first:last] = zeros
    return private, validated


def _usable_unvalidated(snp: Sequence[DeviceEvent], memmap: Sequence[tuple[int, int, int]]
                        ) -> tuple[int, list[Violation]]:
    """S3: the usable pages of ``memmap`` (type, start, pages) and the
    violation of those not private and validated at the trace's end."""
    usable = [(kind, start, pages) for kind, start, pages in memmap if kind in USABLE_TYPES]
    top = max((start + pages * PAGE for _, start, pages in usable), default=0)
    private, validated = _replay(snp, top)
    bad: dict[int, set[str]] = {}
    for kind, start, pages in usable:
        for index in range(start // PAGE, start // PAGE + pages):
            if not (private[index] and validated[index]):
                bad.setdefault(index * PAGE, set()).add(USABLE_TYPES[kind])
    handed = sum(pages for _, _, pages in usable)
    if not bad:
        return handed, []
    runs = _ranges(bad)
    where = ", ".join(f"{first:#x}+{count * PAGE:#x}" for first, count in runs[:4])
    more = f" and {len(runs) - 4} more range(s)" if len(runs) > 4 else ""
    kinds = ", ".join(sorted(set().union(*bad.values())))
    return handed, [Violation(
        "S3", f"{len(bad)} page(s) the OS is handed as its memory ({kinds}) are not private "
              f"and validated when the guest parks after ExitBootServices(): {where}{more}")]


def judge_page_states(events: Sequence[DeviceEvent], begin: int | None,
                      end: int | None, memmap: Sequence[tuple[int, int, int]] = (),
                      memmap_cut: str = "") -> PageStates | None:
    """S1, S2 and S3 of a device trace's page-state events; ``begin`` and
    ``end`` are the teardown markers' lines, ``memmap`` the memory map
    ExitBootServices() took (type, start, pages), empty when the log has
    none or ``memmap_cut`` says why it cannot be judged. None when the
    trace has no page states (not an emulated SEV-SNP guest)."""
    snp = [e for e in events if e.name.startswith("sev_snp_")]
    if not snp:
        return None
    violations: list[Violation] = []
    notes: list[str] = []
    for event in snp:
        if event.name == "sev_snp_pvalidate_no_update":
            did = "validated" if event.num("validate") else "rescinded"
            violations.append(Violation(
                "S1", f"page {event.num('gpa'):#x} {did} twice: PVALIDATE at "
                      f"{event.num('addr'):#x} changed nothing (CF set) at line {event.line}"))
    pending: dict[int, int] = {}
    made: set[int] = set()
    if begin is None:
        notes.append("no teardown-begin marker: S1 judges only that no page was validated "
                     "twice")
    else:
        for event in snp:
            if event.line < begin or (end is not None and event.line > end):
                continue
            if event.name == "sev_snp_page_state":
                for page in _pages(event):
                    if event.fields["state"] == "private":
                        made.add(page)
                        pending[page] = event.line
                    else:
                        pending.pop(page, None)
            elif event.name == "sev_snp_pvalidate":
                for page in _pages(event):
                    if event.num("validate"):
                        pending.pop(page, None)
                    elif page in made:
                        # rescinded: private, and no longer validated
                        pending[page] = event.line
        left = _ranges(pending)
        if left:
            where = ", ".join(f"{first:#x}+{count * PAGE:#x}" for first, count in left[:4])
            more = f" and {len(left) - 4} more range(s)" if len(left) > 4 else ""
            until = f"the teardown's end (line {end})" if end is not None else \
                "the trace's end (no teardown-end marker)"
            violations.append(Violation(
                "S1", f"{len(pending)} page(s) the teardown made private were not validated "
                      f"at {until}: {where}{more} (made private, or rescinded, at line "
                      f"{min(pending.values())})"))
    for event in snp:
        if event.name == "sev_snp_not_validated":
            inside = begin is not None and event.line > begin and (end is None or
                                                                    event.line < end)
            access = ACCESSES.get(event.num("access"), f"access {event.num('access')}")
            violations.append(Violation(
                "S2", f"a {access} at {event.num('addr'):#x} reached gpa {event.num('gpa'):#x}, "
                      f"a private page not validated (#VC 0x404) at line {event.line}"
                      + (", inside the teardown" if inside else "")))
    usable: int | None = None
    if memmap:
        usable, s3 = _usable_unvalidated(snp, memmap)
        violations += s3
    launched = tuple((e.num("gpa"), e.num("len"), e.fields["type"]) for e in snp
                     if e.name == "sev_snp_launch_update")
    return PageStates(launched, len(made), len(made) - len(pending), tuple(violations),
                      tuple(notes), usable, memmap_cut)
