"""Any OVMF boot log explained: stock or ours, debug port or serial, whole or cut.

``ebs-harness explain-log LOG`` reads what an engineer reads by hand when a
guest hangs, crashes or boots the wrong thing, and says it back in order:

- the firmware, as far as the log states it (OVMF's SEC entry, the build
  path in a crash dump or an ``add-symbol-file`` line, the Arm firmware's
  ``UEFI firmware (version ...)`` banner, the shell's ``UEFI v2.70 (EDK II,
  ...)`` banner, the harness's trace), and the platform facts it prints in
  any of the wordings edk2 used over its releases (CPUs, physical address
  width, memory handed to PEI and DXE, SEV, SEV-ES, SNP and TDX, the IOMMU
  driver and whether it started);
- the phases (SEC, PEI, DXE, BDS) and the load map: every image with its
  base, entry point and load order, nameless ones (an OS loader or kernel
  without debug information) included, and the ones whose entry point failed
  (``Error: Image at ... start failed: Not Found``);
- the boot options BDS tried and what came of each (the debug port's
  ``[Bds]Booting``/``[Bds] Expand`` lines, the console's ``BdsDxe: loading
  / starting / failed to load`` lines);
- every CPU exception dump (``!!!! X64 Exception Type - 0E(#PF ...``) and
  ASSERT, symbolized as ``Image!function+0xoff`` and, with a firmware build
  (``--firmware``), ``file:line`` from the module's DWARF line table;
- where and how the log ends, from its last progress line rather than its
  last image load: a crash, the hand-off to the OS (ExitBootServices, the
  Linux EFI stub, the kernel's own lines), a reset, a boot option running, a
  hang in an image's entry point or in a later activity (BDS enumerating the
  PCI bus), a line cut in the middle;
- when the log carries the harness's trace (``EBST`` lines), the EBS
  timeline and its verdicts, as ``analyze-log`` gives them.

A file is an OVMF log only when at least two distinct lines of it *parse*
as edk2 messages (an image load with its addresses, a BDS line, an
exception header, a PPI or protocol install with its GUID...): a kernel log
with one ``Loading ...`` line, or any text that shares a single line with
edk2's vocabulary, is refused, with what it looks like instead.

Explaining judges nothing: a log without the trace gets no verdict, and the
command's exit status says only whether the log could be read. The reader
is one pass over the lines with bounded state (the last lines, at most
:data:`MAX_IMAGES` images, :data:`MAX_CRASHES` crashes), so a log of any
size costs its read time and little memory. ``docs/explain-log.md`` has the
rules and the JSON keys.

OVMF's ``DEBUG()`` output goes to the debug port (0x402) and its CPU
exception dumps to the serial port, unless it was built with
``DEBUG_ON_SERIAL_PORT``: explain the serial log for a #PF.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.analysis import symbols, trace
from harness.analysis.explain_facts import CC_ATTR, CC_KIND, VC_MMIO_REFUSED, parse_int
from harness.analysis.explain_reader import (
    ACTIVITY,
    CONFIDENTIAL_KINDS,
    FIRMWARE_KEYS,
    MAX_BOOTS,
    MAX_CRASHES,
    MAX_IMAGES,
    MIN_FIRMWARE_LINES,
    PLATFORM_DRIVERS,
    Boot,
    Crash,
    LoadedImage,
    Milestone,
    Reader,
    check_text,
)
from harness.errors import LogFormatError


@dataclass(frozen=True)
class LogEnd:
    """Where and how the log ends."""

    lines: int
    cut_mid_line: bool
    last_lines: tuple[str, ...]
    summary: str
    #: One of :data:`END_KINDS`.
    kind: str = "unknown"
    #: The phase the log ends in, "unknown" when none was recognized.
    phase: str = "unknown"
    #: The last milestone (what the firmware was doing).
    milestone: Milestone | None = None
    #: The last line the firmware printed: (line, text), (0, "") for none.
    last_firmware: tuple[int, str] = (0, "")


@dataclass(frozen=True)
class Confidential:
    """Whether the guest is a confidential one, and what says so."""

    #: One of :data:`CONFIDENTIAL_KINDS`, or None: the log does not say.
    kind: str | None
    #: (what the line says, line number), in log order.
    evidence: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain_log` found."""

    path: str
    lines: int
    crlf: bool
    ansi: bool
    identity: tuple[str, ...]
    boot: Boot
    earlier_boots: tuple[str, ...]
    end: LogEnd
    notes: tuple[str, ...]
    symbolizer: symbols.Symbolizer

    trace_lines: int = 0
    #: The firmware as stable keys (family, version, build...), see to_json.
    firmware: dict[str, str | None] = field(default_factory=dict)

    @property
    def traced(self) -> bool:
        """The log carries the harness's trace (``EBST`` lines), in any run."""
        return self.trace_lines > 0


# ------------------------------------------------------------ explaining


def explain_log(path: Path | str, firmware_dir: Path | None = None) -> Explanation:
    """Read ``path`` once and explain it.

    :param firmware_dir: a firmware build (``modules/*.debug``, the symbol
        index) for ``Image!function`` and ``file:line``.
    :raises LogFormatError: an empty or binary file, or one with fewer than
        :data:`MIN_FIRMWARE_LINES` distinct lines of an OVMF boot log.
    :raises OSError: the file cannot be read.
    """
    path = Path(path)
    reader = Reader()
    number = 0
    ended = True
    with trace.opened_log(path) as handle:
        head = handle.peek(65536)[:65536]      # a pipe is read once: no seek back
        check_text(path, head)
        reader.crlf = b"\r\n" in head
        for number, raw, ended, long in trace.split_lines(handle):
            reader.long_lines += long
            reader.feed(number, raw.decode("latin-1"))
    _gate(path, reader, number)
    boot = reader.boot
    if boot.options:
        attempt = boot.options[-1]
        if not attempt.outcome:
            attempt.outcome = (f"{attempt.image} running when the log ends" if attempt.image
                               else "no outcome in the log")
    images = [symbols.ImageLoad(i.name or i.file, i.base, i.entry, i.line)
              for i in boot.images]
    loaded = {image.base for image in boot.images}
    for crash in boot.crashes:
        # the image the dump names, where the load map lacks it (a serial log)
        name = Path(crash.module_path).stem if "/" in crash.module_path else ""
        if crash.image_base is not None and crash.image_entry is not None and name \
                and crash.image_entry >= crash.image_base and crash.image_base not in loaded:
            images.append(symbols.ImageLoad(name, crash.image_base, crash.image_entry,
                                            crash.line))
    sym = symbols.Symbolizer(images, firmware_dir)
    for crash in boot.crashes:
        _symbolize(crash, sym, firmware_dir)
    firmware = _firmware_keys(reader, boot)
    identity = _identity(reader, boot, firmware)
    notes = []
    if reader.long_lines:
        notes.append(f"{reader.long_lines} line(s) longer than {trace.MAX_LINE_BYTES} bytes "
                     "were cut")
    if boot.images_dropped:
        notes.append(f"{boot.images_dropped} image loads beyond the first {MAX_IMAGES} are "
                     "counted, not listed")
    for dropped, what, cap in ((boot.options_dropped, "boot attempts", MAX_BOOTS),
                               (boot.crashes_dropped, "crashes", MAX_CRASHES)):
        if dropped:
            notes.append(f"{dropped} {what} between the first {cap - 1} and the last are "
                         "counted, not listed")
    if reader.earlier_count > len(reader.earlier):
        notes.append(f"{reader.earlier_count - len(reader.earlier)} earlier runs not listed")
    end = _end(boot, reader, number, not ended)
    return Explanation(str(path), number, reader.crlf, reader.ansi, identity, boot,
                       tuple(reader.earlier), end, tuple(notes), sym, reader.trace_lines,
                       firmware)


def _gate(path: Path, reader: Reader, lines: int) -> None:
    """Refuse a file that is no OVMF log, with what it looks like instead:
    one line shared with edk2's vocabulary is not enough."""
    found = len(reader.evidence)
    if found >= MIN_FIRMWARE_LINES:
        return
    looks = max(reader.foreign.items(), key=lambda kv: kv[1])[0] if reader.foreign else ""
    if found == 0:
        why = (f"looks like {looks}" if looks else
               "no SEC entry, image load, BDS, exception or ASSERT line")
        raise LogFormatError(f"{path}: no line of an OVMF boot log in {lines} lines ({why})")
    line, text = reader.evidence[0]
    why = f"; it looks like {looks}" if looks else ""
    raise LogFormatError(f"{path}: only one line of an OVMF boot log in {lines} lines (line "
                         f"{line}: {text.strip()[:60]!r}), too little to read it as one{why}")


def _symbolize(crash: Crash, sym: symbols.Symbolizer, firmware_dir: Path | None) -> None:
    if crash.teardown is not None:
        line, function = crash.teardown
        crash.during = (f"inside the IOMMU ExitBootServices() teardown {sym.symbolize(function)} "
                        f"(ebs-callback at line {line})")
        if crash.teardown_tpl is not None:
            line, op, tpl, caller = crash.teardown_tpl
            crash.during += (f", after {'RaiseTPL' if op == 'raise' else 'RestoreTPL'}({tpl}) "
                             f"from {sym.symbolize(caller)} at line {line}: a boot service, "
                             "which the teardown may not call (C3)")
    if crash.kind != "exception" or crash.rip is None:
        return
    crash.where = sym.symbolize(crash.rip)
    image = sym.image_for(crash.rip)
    if image is None or firmware_dir is None:
        return
    found = symbols.source_location(firmware_dir / "modules", image.name,
                                    crash.rip - image.base, image.entry - image.base)
    if found is not None:
        crash.source = str(found)
        if found.functions:
            crash.functions = found.functions


#: edk2 platform build directories (``Build/<platform>``) and the firmware
#: family each is (OvmfPkg's platforms are all OVMF).
_FAMILIES = (("ArmVirtQemu", "ArmVirtQemu"), ("ArmVirt", "ArmVirt"), ("Ovmf", "OVMF"),
             ("AmdSev", "OVMF"), ("IntelTdx", "OVMF"), ("CloudHv", "OVMF"),
             ("Microvm", "OVMF"), ("Bhyve", "OVMF"))


def _firmware_keys(reader: Reader, boot: Boot) -> dict[str, str | None]:
    """The firmware as stable keys: family, arch, version, build."""
    ident = reader.identity
    platform = ident.get("build_platform")
    family = next((fam for prefix, fam in _FAMILIES if platform and platform.startswith(prefix)),
                  platform)
    names = {image.name for image in boot.images}
    # OVMF's SEC, its PlatformPei (by name or by the facts only it prints), TDVF
    platform_pei = {"pei_memory_kib", "phys_address_bits", "cpus_max", "tdx_gpaw"}
    if family is None and ("SEC" in boot.phases and ident.get("family") != "edk2-arm"
                           or "PlatformPei" in names or platform_pei & boot.values.keys()):
        family = "OVMF"
    if family is None and ident.get("family") == "edk2-arm":
        family = "edk2-arm"
    found: dict[str, str | None] = {key: ident.get(key) for key in FIRMWARE_KEYS}
    found.update(family=family, build_platform=platform,
                 arch=ident.get("build_arch") or ident.get("exception_arch"))
    return found


_FAMILY_SAYS = {
    "OVMF": "OVMF (edk2's firmware for QEMU/KVM guests)",
    "ArmVirtQemu": "ArmVirtQemu (edk2's firmware for QEMU's Arm virt machine)",
    "ArmVirt": "ArmVirtPkg (edk2's firmware for Arm virtual machines)",
    "edk2-arm": "an edk2 firmware for Arm (ArmPlatformPkg's start banner)",
}


def _identity(reader: Reader, boot: Boot, firmware: dict[str, str | None]) -> tuple[str, ...]:
    out: list[str] = []
    family = firmware["family"]
    if family is not None:
        out.append(_FAMILY_SAYS.get(family, f"edk2 platform {family}"))
    if "version" in reader.identity:
        out.append(f"firmware version {reader.identity['version']}, built at "
                   f"{reader.identity.get('built', '(not said)')}")
    for key in ("build", "source", "uefi", "shell"):
        if key in reader.identity:
            out.append(reader.identity[key])
    if reader.trace_lines:
        out.append(f"instrumented by the ovmf-ebs-harness series ({reader.trace_lines} EBST "
                   "trace lines)")
    return tuple(out)


def confidential(boot: Boot) -> Confidential:
    """What kind of confidential guest the log is of, from every line that
    says so: the firmware's own (SEV's mask, SEV-ES's GHCB pages, the #VC
    handler, TDVF's start line, the shared-bit mask, the CC attribute TdxDxe
    prints in a TD) and the OS's after the hand-off; "none" only where both
    drivers refused to start or the CC attribute says so. TdxDxe merely
    starting is no evidence: outside a TD it installs a protocol and returns
    success. Not stated (None) is not "none": an excerpt may simply lack the
    lines."""
    evidence: list[tuple[str, int, str]] = []
    values = boot.values

    def said(key: str, kind: str, what: str) -> None:
        if key in values:
            evidence.append((kind, values[key][1], what.format(values[key][0])))

    said("sev_mask", "sev", "SEV is enabled (mask {})")
    said("ghcb_pages", "sev-es", "SEV-ES is enabled ({} GHCB pages)")
    said("vc_mmio_address", "sev-es", "the #VC handler ran (MMIO at {})")
    said("tdx_gpaw", "tdx", "TDVF started the TD (GPAW {})")
    said("tdx_shared_bit_mask", "tdx", "TDX shared-bit mask {}")
    if "cc_attr" in values:
        attr, line = values["cc_attr"]
        kind = CC_KIND.get(parse_int(attr) & 0xFFFF)
        if kind is not None:
            evidence.append((kind, line, f"CCAttr={attr} ({CC_ATTR[parse_int(attr) & 0xFFFF]})"))
    for what, line in boot.os_says:
        if what.startswith("tdx") or what.endswith("Intel TDX"):
            evidence.append(("tdx", line, f"the OS says: {what}"))
        elif "AMD SEV" in what:
            words = what.split(": ", 1)[-1].split()
            kind = "sev-snp" if "SEV-SNP" in words else "sev-es" if "SEV-ES" in words else "sev"
            evidence.append((kind, line, f"the OS says: {what}"))
    evidence.sort(key=lambda e: e[1])
    kinds = {kind for kind, _, _ in evidence}
    if "tdx" in kinds:
        result: str | None = "tdx"
    elif kinds - {"none"}:
        result = max(kinds - {"none"}, key=CONFIDENTIAL_KINDS.index)
    elif "none" in kinds:
        result = "none"
    else:
        refused = {PLATFORM_DRIVERS[i.name][0]: i for i in boot.images
                   if i.name in PLATFORM_DRIVERS and i.start_failed}
        # TDVF prints its start line before SEC's: a SEC line without it is no TD
        if "sev" in refused and ("tdx" in refused or "SEC" in boot.phases):
            result = "none"
            evidence.append(("none", refused["sev"].line, "AmdSevDxe refused to start, and "
                             + ("so did TdxDxe" if "tdx" in refused else
                                "SEC began without TDVF's start line")))
        else:
            result = None
    return Confidential(result, tuple((what, line) for _, line, what in evidence))


def platform_facts(boot: Boot) -> list[tuple[str, str, int | None]]:
    """(fact, value, line): what the log says about the platform."""
    facts: list[tuple[str, str, int | None]] = [
        (label, value, line) for label, (value, line) in boot.facts.items()]
    said = {label for label, _, _ in facts}
    for image in boot.images:
        known = PLATFORM_DRIVERS.get(image.name)
        if known is not None and image.start_failed and known[0] not in said:
            facts.append((known[0], known[1].format(status=image.start_failed), image.line))
            said.add(known[0])
    cc = confidential(boot)
    if cc.kind not in (None, "none") and cc.evidence:
        facts.append(("confidential", f"{_CONFIDENTIAL_SAYS[cc.kind]}, from: "
                      + "; ".join(f"{what} (line {line})" for what, line in cc.evidence),
                      cc.evidence[0][1]))
    iommu = [i for i in boot.images if i.name == "IoMmuDxe"]
    if iommu:
        last = iommu[-1]
        if last.start_failed:
            state = f"start failed: {last.start_failed} (it installs no IOMMU protocol)"
        elif boot.last_image is last:
            state = "the log ends before its entry point returned"
        else:
            state = "started (no start failure printed)"
        facts.append(("iommu", f"IoMmuDxe loaded (image #{last.order}), {state}", last.line))
    elif "DXE" in boot.phases:
        facts.append(("iommu", "no IoMmuDxe image loaded in this log", None))
    return facts


_CONFIDENTIAL_SAYS = {"sev": "an AMD SEV guest", "sev-es": "an AMD SEV-ES (or SNP) guest",
                      "sev-snp": "an AMD SEV-SNP guest", "tdx": "an Intel TDX guest (a TD)"}


def _end(boot: Boot, reader: Reader, lines: int, cut: bool) -> LogEnd:
    """Where and how the log ends: from its last milestone and what came
    after the firmware's last line, not from its last image load."""
    tail = tuple(reader.tail)
    last_crash = boot.crashes[-1] if boot.crashes else None
    last_image = boot.last_image
    milestone = boot.milestone
    attempt = boot.options[-1] if boot.options else None

    def end(kind: str, summary: str) -> LogEnd:
        if cut:
            summary += f"; its last line ({lines}) is cut in the middle: {tail[-1][-80:]!r}"
        return LogEnd(lines, cut, tail, summary, kind, boot.phase, milestone,
                      (boot.last_firmware[0], boot.last_firmware[1][:200]))

    if last_crash is not None and (milestone is None or last_crash.line > milestone.line):
        inside = ("" if last_crash.teardown is None else
                  f", inside the IOMMU teardown (ebs-callback at line {last_crash.teardown[0]})")
        if last_crash.kind == "exception":
            return end("crash", f"the log ends after a CPU exception {last_crash.summary} at "
                       f"line {last_crash.line}"
                       + (f" in {last_crash.function}" if last_crash.function else "")
                       + (f" ({last_crash.source})" if last_crash.source else "") + inside
                       + (f"; {last_crash.cause}" if last_crash.cause else ""))
        return end("crash", f"the log ends after an ASSERT at line {last_crash.line}: "
                   f"{last_crash.source}: {last_crash.expression}{inside}")
    refused = VC_MMIO_REFUSED.search(boot.last_firmware[1])
    if refused is not None:
        during = (f", after {last_image.file} (#{last_image.order}, line {last_image.line}) "
                  "loaded" if last_image is not None else "")
        return end("crash", f"the log ends with the #VC handler refusing MMIO through an "
                   f"encrypted mapping at 0x{refused[1]} (line {boot.last_firmware[0]}"
                   f"{during}): it raises #GP, whose dump goes to the serial port, not to this "
                   "log; a driver reached MMIO whose page still has the C-bit set (under "
                   "SEV-ES and SNP every MMIO range must be mapped shared)")
    if boot.ebs_returned:
        booted = attempt.image if attempt is not None and attempt.image else "the OS loader"
        return end("handed-off", f"the log ends after ExitBootServices() returned to {booted} "
                   f"(line {boot.ebs_returned}): boot services are over, the firmware's part "
                   "is done")
    if boot.os_lines or boot.efi_stub_exit:
        started = (f"boot option \"{attempt.description}\" ({attempt.outcome}, line "
                   f"{attempt.line}), then " if attempt is not None else "")
        line, text = boot.first_os_line
        said = (f"the Linux EFI stub said it is exiting boot services (line "
                f"{boot.efi_stub_exit})" if boot.efi_stub_exit else "")
        os_part = f"{boot.os_lines} line(s) of the OS after the firmware's last line " \
                  f"(line {boot.last_firmware[0]}), from line {line}: {text.strip()[:80]!r}"
        return end("handed-off", f"the log ends after the firmware handed over to the OS: "
                   f"{started}{os_part}" + (f"; {said}" if said else "")
                   + ": the firmware's part is done, what follows is the OS's")
    if milestone is not None and milestone.kind == "reset":
        return end("reset", f"the log ends with the firmware resetting the machine (line "
                   f"{milestone.line}: {milestone.text.strip()!r})")
    if attempt is not None and boot.phase == "BDS" and (
            milestone is None or milestone.kind in ("bds", "image", "start-failed")):
        return end("boot-option", f"the log ends in BDS: boot option \"{attempt.description}\" "
                   f"({attempt.outcome})")
    if milestone is not None and milestone.kind == "image" and last_image is not None \
            and milestone.line == last_image.line:
        after = lines - last_image.line
        return end("hang-in-image", f"the log ends in {boot.phase}, {after} line(s) after the "
                   f"last image loaded ({last_image.file}, #{last_image.order}, line "
                   f"{last_image.line}): nothing happened after it; a hang in its entry point "
                   "or in what it started, or a log cut short")
    if milestone is not None:
        activity = ACTIVITY.get(milestone.kind, "")
        returned = ""
        if last_image is not None and last_image.line < milestone.line:
            returned = (f"; the last image loaded ({last_image.file}, line {last_image.line}) "
                        f"had returned: {_after_image(boot, last_image)}")
        last_line, last_text = boot.last_firmware
        return end("stopped", f"the log ends in {boot.phase}, {activity}: its last milestone "
                   f"is line {milestone.line} ({milestone.text.strip()!r}), its last firmware "
                   f"line {last_line} ({last_text.strip()[:80]!r}){returned}; a hang there, or "
                   "a log cut short")
    if boot.phase == "unknown":
        return end("unknown", f"the log ends at line {lines}; no phase and no milestone in it "
                   "(an excerpt of a log)")
    return end("unknown", f"the log ends in {boot.phase} at line {lines}")


def _after_image(boot: Boot, image: LoadedImage) -> str:
    """What shows an image's entry point returned: a later phase."""
    later = [(line, phase) for phase, line in boot.phases.items() if line > image.line]
    if later:
        line, phase = min(later)
        return f"{phase} started at line {line}"
    return "later milestones followed it"
