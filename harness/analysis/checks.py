"""The checks: one registry entry each, and what a check's outcome can be.

Every verdict the harness gives is one :class:`Check` of :data:`CHECKS`: its
id (``V1``), its short name (``order``), what holding it means, and the
evidence it reads. The verdict functions (:mod:`~harness.analysis.verdicts`
for the debug log, :mod:`~harness.analysis.dump` for the dump,
:mod:`~harness.analysis.devices` for QEMU's device trace) name their checks
by id; the text and HTML reports, the JSON's per-check states, the nightly
and the command line's help read the names and meanings from here. Adding a
check is one entry here and one function where its evidence is judged.

Each check ends a run in one of four :class:`State` s::

    held        judged, no violation
    failed      judged, at least one Violation
    skipped     the evidence was there, but cannot show this check (real
                SEV's ciphertext, no canary given): the reason says which
    not-judged  the evidence was never there (no dump taken, no device
                trace, an older build without the contract lines)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class Evidence(enum.Enum):
    """What a check reads."""

    LOG = "debug log"                   #: the firmware's EBST trace lines
    CONTRACT = "contract lines"         #: the DXE core's own EBST contract lines
    DUMP = "memory dump"                #: dump-guest-memory, parked after EBS
    DEVICE_TRACE = "device trace"       #: QEMU's trace events of the devices
    PAGE_STATES = "page states"         #: an emulated SEV-SNP's, in the same QEMU trace
    MODULES = "built modules"           #: the firmware's modules/*.debug, read statically


@dataclass(frozen=True)
class Check:
    """One verdict.

    :param id: ``V1``: a letter for the evidence family and a number
        (``C3S``: C3, proven statically).
    :param name: the short name reports print after the id (``order``).
    :param means: what holding it means, one sentence (CLI help, docs).
    :param evidence: what it reads.
    """

    id: str
    name: str
    means: str
    evidence: Evidence

    @property
    def title(self) -> str:
        """``V1 order``."""
        return f"{self.id} {self.name}"


CHECKS: Mapping[str, Check] = {check.id: check for check in (
    Check("V1", "order", "the teardown begins after every notification function of that "
          "ExitBootServices() call returned", Evidence.LOG),
    Check("V2", "once", "exactly one teardown per successful ExitBootServices(), none in a "
          "failed one", Evidence.LOG),
    Check("V3", "quiet", "no IOMMU map/unmap and no device access after the teardown began",
          Evidence.LOG),
    Check("V4", "empty", "zero live mappings when the teardown ends and when "
          "ExitBootServices() returns", Evidence.LOG),
    Check("V5", "late maps refused", "no IOMMU Map() or AllocateBuffer() succeeds once the "
          "memory map was terminated: it would allocate pages the OS loader's memory map "
          "shows free", Evidence.CONTRACT),
    Check("V6", "own bounce pages", "no IOMMU mapping is given bounce pages that a live "
          "mapping still holds", Evidence.LOG),
    Check("C1", "interrupts off", "interrupts are disabled when ExitBootServices() returns "
          "success", Evidence.CONTRACT),
    Check("C2", "no allocation", "no memory is allocated or freed after the memory map was "
          "terminated (by another driver's handler: a finding, not a failure)",
          Evidence.CONTRACT),
    Check("C3", "hook enters no boot service", "the IOMMU member CoreExitBootServices() calls "
          "enters no boot service: no TPL change, no allocation", Evidence.CONTRACT),
    Check("C3S", "no boot service on any path", "no function the IOMMU member can reach, "
          "on any vendor's branch, calls a boot service, a PCD protocol or an allocator, or "
          "enables interrupts, but through a reviewed guard (read from the built IoMmuDxe, "
          "not from a boot)",
          Evidence.MODULES),
    Check("D1", "no live mapping", "the dump's IoMmuDxe mapping list is empty", Evidence.DUMP),
    Check("D2", "no shared page", "no page is left shared beyond those shared by design",
          Evidence.DUMP),
    Check("D3", "no canary", "the run's canary is nowhere the host can read", Evidence.DUMP),
    Check("W1", "quiesced", "every device the firmware made a bus master was quiesced when "
          "the teardown began", Evidence.DEVICE_TRACE),
    Check("W2", "no late DMA", "no device did DMA from the teardown's beginning until the OS "
          "first touches it", Evidence.DEVICE_TRACE),
    Check("S1", "revalidated", "every page the teardown made private again it validated "
          "again, and no page was validated twice (an emulated SEV-SNP's page states)",
          Evidence.PAGE_STATES),
    Check("S2", "no unvalidated access", "no guest access reached a private page it had not "
          "validated (#VC 0x404; an emulated SEV-SNP's page states)", Evidence.PAGE_STATES),
    Check("S3", "handed over validated", "every page of the memory map ExitBootServices() "
          "took that the OS uses as its memory is private and validated when the guest parks "
          "(an emulated SEV-SNP's page states and the probe's memory map)",
          Evidence.PAGE_STATES),
)}


def of(evidence: Evidence) -> tuple[str, ...]:
    """The ids of the checks that read ``evidence``, in registry order."""
    return tuple(c.id for c in CHECKS.values() if c.evidence is evidence)


def order(check: str) -> int:
    """A check's place in the registry (reports list violations in it)."""
    return list(CHECKS).index(check)


def help_text() -> str:
    """Every check as ``ID name: meaning``, one per line (the CLI's epilog)."""
    return "\n".join(f"  {c.title}: {c.means}" for c in CHECKS.values())


@dataclass(frozen=True)
class Violation:
    """A failed check.

    :param check: an id of :data:`CHECKS`.
    :param detail: one line a firmware engineer can act on.
    :param seqs: the trace lines involved (for highlighting).
    :param culprit: who broke the rule, where a check names one: the handler
        (``Image!function``), the IOMMU member, the DXE core, a device's driver.
    """

    check: str
    detail: str
    seqs: tuple[int, ...] = ()
    culprit: str = ""

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown check {self.check!r}")

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"check": self.check, "detail": self.detail,
                                "seqs": list(self.seqs)}
        if self.culprit:
            data["culprit"] = self.culprit
        return data


class State(enum.Enum):
    HELD = "held"
    FAILED = "failed"
    SKIPPED = "skipped"
    NOT_JUDGED = "not-judged"


@dataclass(frozen=True)
class Outcome:
    """How one check ended: its state, and why where it was not judged."""

    check: str
    state: State
    reason: str = ""

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown check {self.check!r}")
        if (self.state in (State.SKIPPED, State.NOT_JUDGED)) != bool(self.reason):
            raise ValueError(f"{self.check} {self.state.value}: a reason goes with skipped "
                             "and not-judged, and only with them")

    def as_json(self) -> dict[str, Any]:
        return {"state": self.state.value, **({"reason": self.reason} if self.reason else {})}


def outcomes(judged: Iterable[str], violations: Iterable[Violation],
             skipped: Mapping[str, str]) -> dict[str, Outcome]:
    """The outcome of each check in ``judged``: failed where a violation
    names it, skipped (with its reason) where ``skipped`` names it, else held."""
    failed = {v.check for v in violations}
    out: dict[str, Outcome] = {}
    for check in judged:
        if check in failed:
            out[check] = Outcome(check, State.FAILED)
        elif check in skipped:
            out[check] = Outcome(check, State.SKIPPED, skipped[check])
        else:
            out[check] = Outcome(check, State.HELD)
    return out


def not_judged(checks: Iterable[str], reason: str) -> dict[str, Outcome]:
    """``checks`` as never judged, for ``reason``."""
    return {c: Outcome(c, State.NOT_JUDGED, reason) for c in checks}


def states_json(found: Mapping[str, Outcome]) -> dict[str, Any]:
    """Every check of the registry with its outcome, in registry order; a
    check no evidence of the run reached is ``not-judged``."""
    return {c: (found[c].as_json() if c in found else
                {"state": State.NOT_JUDGED.value, "reason": "not part of this analysis"})
            for c in CHECKS}
