"""S1 and S2: an emulated SEV-SNP's page states, from QEMU's trace.

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
validated. Neither is judged for a guest whose trace has no page states
(not an emulated SEV-SNP): real SNP hardware keeps its reverse map from the
host, and the emulation is the only place the harness reads it.
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

    def summary(self) -> str:
        return (f"page states (emulated SEV-SNP): the launch validated {len(self.launched)} "
                f"section(s); the teardown made {self.made_private} page(s) private again "
                f"and validated {self.revalidated} of them again")

    def as_json(self) -> dict[str, Any]:
        return {"launched": [{"gpa": gpa, "len": size, "type": kind}
                             for gpa, size, kind in self.launched],
                "made_private": self.made_private, "revalidated": self.revalidated,
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


def judge_page_states(events: Sequence[DeviceEvent], begin: int | None,
                      end: int | None) -> PageStates | None:
    """S1 and S2 of a device trace's page-state events; ``begin`` and ``end``
    are the teardown markers' lines. None when the trace has none (not an
    emulated SEV-SNP guest)."""
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
    launched = tuple((e.num("gpa"), e.num("len"), e.fields["type"]) for e in snp
                     if e.name == "sev_snp_launch_update")
    return PageStates(launched, len(made), len(made) - len(pending), tuple(violations),
                      tuple(notes))
