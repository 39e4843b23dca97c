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

The check is four modules, one idea each:

- :mod:`~harness.analysis.moduleimage`: the ``.debug`` ELF read once
  (functions, globals and their types, inlined frames, source files);
- :mod:`~harness.analysis.service_tables`: the tables the teardown must not
  call into, their members and X64 offsets;
- :mod:`~harness.analysis.dataflow`: one function's dataflow over capstone
  (tables, members and constants in registers and stack slots, branches
  the constants decide);
- this module: the check itself (the call graph from the entry, the branch
  of each path, the findings) and its report and manifest record. It
  re-exports the tables, so that ``teardown_static.BOOT_SERVICES`` stays one
  import away.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.analysis.dataflow import Disassembler, FrozenState
from harness.analysis.moduleimage import Function, ModuleImage, load_image, plain_name
from harness.analysis.service_tables import (
    BOOT_SERVICES,
    BOOT_SERVICES_MEMBERS,
    DXE_SERVICES,
    DXE_SERVICES_MEMBERS,
    PCD_INFO,
    PCD_PROTOCOL,
    PCD_PROTOCOL_MEMBERS,
    PI_PCD_INFO,
    PI_PCD_PROTOCOL,
    PI_PCD_PROTOCOL_MEMBERS,
    POINTER_SIZE,
    SERVICE_GROUPS,
    SYSTEM_TABLE,
    SYSTEM_TABLE_BOOT_SERVICES,
    TABLE_HEADER_SIZE,
    TABLES,
    Table,
    member_offsets,
)
from harness.errors import UsageError

LOG = logging.getLogger(__name__)

#: The module whose teardown is checked and the function it registers with
#: the DXE core (``IoMmuRegisterTeardown()`` passes it to
#: ``EDKII_IOMMU_EXIT_BOOT_SERVICES_PROTOCOL.RegisterTeardown()``).
MODULE = "IoMmuDxe"
ENTRY = "IoMmuExitBootServicesTeardown"

__all__ = [
    "BOOT_SERVICES",
    "BOOT_SERVICES_MEMBERS",
    "BRANCH_FAMILIES",
    "CHECK_VERSION",
    "DXE_SERVICES",
    "DXE_SERVICES_MEMBERS",
    "ENTRY",
    "FINDING_KINDS",
    "GUARDS",
    "MANIFEST_KEY",
    "MODULE",
    "NO_BRANCH",
    "PCD_INFO",
    "PCD_PROTOCOL",
    "PCD_PROTOCOL_MEMBERS",
    "PI_PCD_INFO",
    "PI_PCD_PROTOCOL",
    "PI_PCD_PROTOCOL_MEMBERS",
    "POINTER_SIZE",
    "SERVICE_GROUPS",
    "SYSTEM_TABLE",
    "SYSTEM_TABLE_BOOT_SERVICES",
    "TABLES",
    "TABLE_HEADER_SIZE",
    "BranchFamily",
    "Finding",
    "Function",
    "Guard",
    "Hop",
    "StaticCheck",
    "Table",
    "branch_of",
    "build_record",
    "check_firmware",
    "check_module",
    "guard_of",
    "lines",
    "load_image",
    "manifest_record",
    "member_offsets",
    "module_path",
    "plain_name",
    "to_json",
]

# ------------------------------------------------------------ branches


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
class Guard:
    """A call on a path whose callee keeps state that stops the path at the
    teardown: a value read on first use and kept, a large page split when a
    range first changes, an interrupt state restored as it was found. Each
    is read in the edk2 source, not proven from the code: a path through
    ``caller`` calling ``callee`` (adjacent hops, plain names) is reported
    as guarded, with ``why``, and does not fail the check.

    :param why: the state, and what set it before the teardown runs.
    """

    caller: str
    callee: str
    why: str

    def covers(self, finding: Finding) -> bool:
        names = [plain_name(name) for name in finding.functions]
        return (self.caller, self.callee) in itertools.pairwise(names)

    def as_dict(self) -> dict[str, str]:
        return {"caller": self.caller, "callee": self.callee, "why": self.why}


_MADE_SHARED_BEFORE = ("the teardown makes private only what IoMmuDxe made shared "
                       "before, through the same library call")
_INTERRUPTS_OFF = "the DXE core calls the teardown with interrupts disabled"
#: The reviewed guards (docs/static-check.md has each one's source lines).
#: A path no guard covers fails the check: the TDX protocol lookup of the
#: series before its BaseMemEncryptTdxLib patch and the PCD read of round
#: one among them.
GUARDS = (
    Guard("MemEncryptSevGetEncryptionMask", "LibPcdGet64",
          "reads PcdPteMemoryEncryptionAddressOrMask on its first call only and keeps it "
          f"(mSevEncryptionMaskSaved); {_MADE_SHARED_BEFORE}, which made that first call"),
    Guard("ConfidentialComputingGuestHas", "LibPcdGet64",
          "reads PcdConfidentialComputingGuestAttr on its first call only and keeps it "
          f"(mCurrentAttrRead); {_MADE_SHARED_BEFORE}, which made that first call"),
    Guard("Split1GPageTo2M", "AllocatePageTableMemory",
          "splits a 1 GiB page the first time part of it changes encryption; "
          f"{_MADE_SHARED_BEFORE}, which split it"),
    Guard("Split2MPageTo4K", "AllocatePageTableMemory",
          "splits a 2 MiB page the first time part of it changes encryption; "
          f"{_MADE_SHARED_BEFORE}, which split it"),
    Guard("SetPageTablePoolReadOnly", "AllocatePageTableMemory",
          "splits the large page holding a page-table pool the first time the pool is made "
          "read-only; each pool was, at the end of the call that split pages into it (CR0.WP "
          "set then as at the teardown), and the teardown splits nothing, so adds no pool"),
    Guard("SetMemoryEncDec", "AllocateReservedPages",
          "allocates the SEV-SNP page state change buffer on its first use (mPscBuffer is "
          f"NULL); {_MADE_SHARED_BEFORE}, which allocated it"),
    Guard("CcExitVmgDone", "EnableInterrupts",
          f"re-enables interrupts only if CcExitVmgInit found them enabled; {_INTERRUPTS_OFF}"),
    Guard("SvsmMsrProtocol", "EnableInterrupts",
          f"re-enables interrupts only if it found them enabled; {_INTERRUPTS_OFF}"),
    Guard("EmuSetRangeState", "SetInterruptState",
          f"restores the interrupt state it found on entry; {_INTERRUPTS_OFF}"),
)


def guard_of(finding: Finding, guards: Iterable[Guard] = GUARDS) -> Guard | None:
    """The first of ``guards`` that covers ``finding``, or None."""
    return next((guard for guard in guards if guard.covers(finding)), None)


@dataclass(frozen=True)
class StaticCheck:
    """What :func:`check_module` found in one module: the paths no guard
    covers (``findings``, which fail it) and those one does (``guarded``)."""

    module: Path
    entry: str
    findings: tuple[Finding, ...]
    #: Every function reached from the entry (symbol names).
    functions: tuple[str, ...]
    instructions: int
    seconds: float
    guarded: tuple[tuple[Finding, Guard], ...] = ()

    @property
    def verdict(self) -> str:
        return "fail" if self.findings else "pass"

    @property
    def every_path(self) -> tuple[Finding, ...]:
        """The paths found, guarded or not."""
        return self.findings + tuple(finding for finding, _ in self.guarded)

    @property
    def branches(self) -> dict[str, int]:
        counts = collections.Counter(f.branch for f in self.findings)
        return dict(sorted(counts.items()))

    def summary(self) -> str:
        """One line: what ``build`` prints after ``static C3:``."""
        guarded = f", {len(self.guarded)} guarded" if self.guarded else ""
        if not self.findings:
            return (f"pass ({self.entry} reaches {len(self.functions)} functions, "
                    f"no unguarded boot service, PCD protocol or unfollowed call{guarded})")
        per = ", ".join(f"{n} {b}" for b, n in self.branches.items())
        return (f"{len(self.findings)} path(s) from {self.entry} ({per}{guarded}); "
                f"first: {self.findings[0].line()}")

    def as_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict, "module": str(self.module), "entry": self.entry,
                "findings": [f.as_dict() for f in self.findings],
                "guarded": [{**f.as_dict(), "guard": g.as_dict()} for f, g in self.guarded],
                "branches": self.branches, "functions": list(self.functions),
                "instructions": self.instructions, "seconds": round(self.seconds, 3)}


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
    state: FrozenState
    branch: str


def check_module(module: Path, entry: str = ENTRY,
                 guards: Sequence[Guard] = GUARDS) -> StaticCheck:
    """Every path from ``entry`` in ``module`` (an edk2 ``.debug`` ELF) to a
    boot service, a PCD protocol, a table read, an unfollowed call or an
    ``sti``: one :class:`Finding` per site, branch and path.

    The call graph is walked first without crossing a call one of
    ``guards`` covers, then on from those calls: a site the first walk
    reaches is a finding, whatever else reaches it; one only the second
    walk reaches is guarded.

    :raises UsageError: ``module`` is not a readable ELF with symbols, or has
        no function ``entry``.
    """
    start = time.monotonic()
    image = load_image(module)
    root = image.function_named(entry)
    if root is None:
        raise UsageError(f"{module}: no function {entry} (is this IoMmuDxe of the series?)")
    dis = Disassembler(image)
    first = _Node(root, (), NO_BRANCH)
    parent: dict[_Node, tuple[_Node, int] | None] = {first: None}
    # (site, target, branch) -> the finding with the shortest path, and
    # whether a guard stands on every way to it
    found: dict[tuple[int, str, str], tuple[Finding, bool]] = {}
    reads_at: dict[tuple[int, str], tuple[_Node, str, str, bool]] = {}
    consumed: set[int] = set()
    reached: dict[str, None] = {}
    held: list[tuple[_Node, _Node, int]] = []     # (callee, caller, site) of guarded calls

    def add(finding: Finding, guarded: bool) -> None:
        key = (finding.site, finding.target, finding.branch)
        if key in found:
            known, known_guarded = found[key]
            if (known_guarded, len(known.path)) <= (guarded, len(finding.path)):
                return
        found[key] = (finding, guarded)

    def walk(queue: collections.deque[_Node], guarded: bool) -> None:
        while queue:
            node = queue.popleft()
            reached[node.function.name] = None
            facts = dis.facts(node.function, node.state)
            consumed.update(facts.consumed)
            for origin, (name, text) in facts.reads.items():
                behind = guarded or _guard_at(image, node, origin, None, guards) is not None
                reads_at.setdefault((origin, _branch_at(image, node, origin)),
                                    (node, name, text, behind))
            for site in facts.sites:
                behind = guarded or _guard_at(image, node, site.site, None, guards) is not None
                add(Finding(site.kind, site.target, _branch_at(image, node, site.site),
                            _path(image, parent, node, site.site), site.site,
                            site.instruction, site.group), behind)
            for edge in facts.edges:
                child = _Node(edge.callee, edge.state,
                              _branch_at(image, node, edge.site, edge.callee))
                if child in parent:
                    continue
                if not guarded and _guard_at(image, node, edge.site, edge.callee,
                                             guards) is not None:
                    held.append((child, node, edge.site))
                    continue
                parent[child] = (node, edge.site)
                queue.append(child)

    walk(collections.deque([first]), guarded=False)
    behind_guards: collections.deque[_Node] = collections.deque()
    for child, caller, site in held:
        if child not in parent:
            parent[child] = (caller, site)
            behind_guards.append(child)
    walk(behind_guards, guarded=True)
    # A read of a table that no followed call went through: the pointer is
    # compared, passed on or stored; a reference all the same.
    for (origin, _), (node, name, text, behind) in sorted(reads_at.items(),
                                                          key=lambda kv: kv[0]):
        if origin not in consumed:
            add(Finding("reference", f"{name} (read, not called through)",
                        _branch_at(image, node, origin), _path(image, parent, node, origin),
                        origin, text), behind)
    every = sorted(found.values(), key=lambda fg: (_BRANCH_ORDER.get(fg[0].branch, 9),
                                                   len(fg[0].path), fg[0].site, fg[0].target))
    findings: list[Finding] = []
    guarded_paths: list[tuple[Finding, Guard]] = []
    for finding, behind in every:
        guard = guard_of(finding, guards) if behind else None
        if guard is None:
            findings.append(finding)
        else:
            guarded_paths.append((finding, guard))
    instructions = sum(len(dis.instructions(image.function_named(name) or root))
                       for name in reached)
    return StaticCheck(module, entry, tuple(findings), tuple(reached), instructions,
                       time.monotonic() - start, tuple(guarded_paths))


def _guard_at(image: ModuleImage, node: _Node, rva: int, callee: Function | None,
              guards: Sequence[Guard]) -> Guard | None:
    """The guard covering a call at ``rva`` of ``node`` (to ``callee``, or
    the site itself): among the function, the frames inlined at ``rva``
    and the callee, two adjacent that one of ``guards`` names."""
    names = [plain_name(node.function.name)]
    names += [plain_name(name) for name in image.inline_chain(rva)[1:]]
    if callee is not None:
        names.append(plain_name(callee.name))
    pairs = set(itertools.pairwise(names))
    return next((g for g in guards if (g.caller, g.callee) in pairs), None)


_BRANCH_ORDER = {NO_BRANCH: 0, **{f.branch: i + 1 for i, f in enumerate(BRANCH_FAMILIES)}}


def _branch_at(image: ModuleImage, node: _Node, rva: int, callee: Function | None = None) -> str:
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


def _path(image: ModuleImage, parent: Mapping[_Node, tuple[_Node, int] | None], node: _Node,
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
#: 2: guarded paths apart.
CHECK_VERSION = 2


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
            "guarded": [f.line() for f, _ in result.guarded],
            "branches": result.branches, "functions": len(result.functions),
            "seconds": round(result.seconds, 3)}


def lines(result: StaticCheck) -> Iterator[str]:
    """The report ``check-firmware`` prints."""
    yield (f"{result.module}: {result.entry} reaches {len(result.functions)} functions "
           f"({result.instructions} instructions), {result.seconds:.2f} s")
    if not result.findings:
        yield ("static C3: pass: no unguarded boot service, PCD protocol, table read or "
               "unfollowed call")
    else:
        yield f"static C3: fail: {len(result.findings)} path(s)"
        for finding in result.findings:
            yield f"  {finding.line()}"
    if result.guarded:
        yield f"guarded (reviewed, not failed): {len(result.guarded)} path(s)"
        for guard in dict.fromkeys(g for _, g in result.guarded):
            yield f"  {guard.caller} → {guard.callee}: {guard.why}"
            for finding, _ in (pair for pair in result.guarded if pair[1] == guard):
                yield f"    {finding.line()}"


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
