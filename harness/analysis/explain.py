"""Any OVMF boot log explained: stock or ours, debug port or serial, whole or cut.

``ebs-harness explain-log LOG`` reads what an engineer reads by hand when a
guest hangs, crashes or boots the wrong thing, and says it back in order:

- the firmware, as far as the log states it (OVMF's SEC entry, the build
  path in a crash dump, the shell's ``UEFI v2.70 (EDK II, ...)`` banner,
  the harness's trace), and the platform facts it prints (CPU, physical
  address width, memory handed to PEI and DXE, SEV and SEV-ES, TDX, the
  IOMMU driver and whether it started);
- the phases (SEC, PEI, DXE, BDS) and the load map: every image with its
  base, entry point and load order, and the ones whose entry point failed
  (``Error: Image at ... start failed: Not Found``);
- the boot options BDS tried and what came of each (the debug port's
  ``[Bds]Booting``/``[Bds] Expand`` lines, the console's ``BdsDxe: loading
  / starting / failed to load`` lines);
- every CPU exception dump (``!!!! X64 Exception Type - 0E(#PF ...``) and
  ASSERT, symbolized as ``Image!function+0xoff`` and, with a firmware build
  (``--firmware``), ``file:line`` from the module's DWARF line table;
- where and how the log ends (a crash, a hang after the last image loaded,
  a boot option running, a line cut in the middle);
- when the log carries the harness's trace (``EBST`` lines), the EBS
  timeline and its verdicts, as ``analyze-log`` gives them.

Explaining judges nothing: a log without the trace gets no verdict, and the
command's exit status says only whether the log could be read. The reader
is one pass over the lines with bounded state (the last lines, at most
:data:`MAX_IMAGES` images, :data:`MAX_CRASHES` crashes), so a log of any
size costs its read time and little memory.

OVMF's ``DEBUG()`` output goes to the debug port (0x402) and its CPU
exception dumps to the serial port, unless it was built with
``DEBUG_ON_SERIAL_PORT``: explain the serial log for a #PF.
"""

from __future__ import annotations

import html
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from harness.analysis import symbols, trace
from harness.errors import LogFormatError

#: At most this many image loads are kept (a log of a reboot loop can hold
#: millions); the rest are counted.
MAX_IMAGES = 5000
#: At most this many exceptions and ASSERTs are kept.
MAX_CRASHES = 50
#: At most this many boot option attempts are kept.
MAX_BOOTS = 200
#: The last lines of the log quoted at its end.
TAIL = 12
#: Lines of an exception dump after its header.
DUMP_LINES = 24

_ANSI = re.compile(r"\x1b\[[0-9;?=]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b")

_DISPATCH = re.compile(
    r"(?:Loading |\[Bds\]|BdsDxe: |!!!! |ASSERT |Error: Image at |EBST |SecCoreStartupWithStack"
    r"|DXE IPL Entry|SEV|TDX|Tdx|PlatformAddressWidthFromCpuid|PlatformMaxCpuCount"
    r"|PublishPeiMemory|DxeMain: MemoryBaseAddress|UEFI v|UEFI Interactive Shell|S3 support"
    r"|DetectSmbiosVersion|QemuFlashDetected =>|InstallIoMmuProtocol)")

_DXE_CORE = re.compile(r"Loading DXE CORE at 0x([0-9A-Fa-f]+) EntryPoint=0x([0-9A-Fa-f]+)")
_START_FAILED = re.compile(r"Error: Image at ([0-9A-Fa-f]+) start failed: (.+)")
_BDS_BOOTING = re.compile(r"\[Bds\]\s?Booting (.+)")
_BDS_EXPAND = re.compile(r"\[Bds\] Expand (\S+) -> (.+)")
_BDSDXE = re.compile(r'BdsDxe: (loading|starting|failed to load|failed to start) '
                     r'(Boot[0-9A-Fa-f]{4}) "(.*)" from (\S+?)(?:: (.+))?$')
_EXCEPTION = re.compile(r"!!!! (X64|IA32) Exception Type - ([0-9A-Fa-f]{2})\((.*?)\)"
                        r"(?:\s+CPU Apic ID - ([0-9A-Fa-f]+) !!!!)?")
_FIND_IMAGE = re.compile(r"!!!! Find image based on IP\(0x([0-9A-Fa-f]+)\) (.*?)\s*"
                         r"\(ImageBase=([0-9A-Fa-f]+), EntryPoint=([0-9A-Fa-f]+)\) !!!!")
_REGISTER = re.compile(r"\b([A-Z][A-Z0-9_]{1,11})\s+-\s+([0-9A-Fa-f]{8,16})\b")
_EXCEPTION_DATA = re.compile(r"ExceptionData - ([0-9A-Fa-f]+)(.*)")
_ASSERT = re.compile(r"ASSERT (?:\[([^\]]+)\] )?(.+?)(?:\((\d+)\))?: (.*)")
#: What a CPU exception dump prints after its header (registers, the image).
_DUMP_LINE = re.compile(r"^(?:[A-Z][A-Z0-9_]{1,11}\s+- [0-9A-Fa-f]|ExceptionData - |FXSAVE_STATE"
                        r"|!!!! (?:Find image|Can't find image))")
_UEFI_BANNER = re.compile(r"UEFI v(\d+\.\d+) \((.+), (0x[0-9A-Fa-f]+)\)")
_SHELL_BANNER = re.compile(r"(UEFI Interactive Shell v[\d.]+)")
_SOURCE_TREE = re.compile(r"(\S+?)/[A-Za-z0-9]+Pkg/")
_BUILD_PATH = re.compile(r"(\S*?/Build/([A-Za-z0-9_]+)/([A-Z]+)_([A-Z0-9]+)/([A-Z0-9]+))/")

#: Platform facts: (label, pattern, how to say the match).
_FACTS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("cpu", re.compile(r"PlatformAddressWidthFromCpuid: Signature: '(\w+)', PhysBits: (\d+)"),
     "{0}, physical address width {1} bits"),
    ("cpus", re.compile(r"PlatformMaxCpuCountInitialization: BootCpuCount=(\d+) "
                        r"MaxCpuCount=(\d+)"), "{0} at boot, at most {1}"),
    ("pei memory", re.compile(r"PublishPeiMemory: PhysMemAddressWidth=(\d+) "
                              r"PeiMemoryCap=(\d+) KB"), "{1} KiB for PEI"),
    ("dxe memory", re.compile(r"DxeMain: MemoryBaseAddress=(0x[0-9A-Fa-f]+) "
                              r"MemoryLength=(0x[0-9A-Fa-f]+)"), "{1} bytes at {0} for DXE"),
    ("sev", re.compile(r"SEV is enabled \(mask (0x[0-9A-Fa-f]+)\)"),
     "enabled, encryption mask {0}"),
    ("sev-es", re.compile(r"SEV-ES is enabled, (\d+) GHCB pages"),
     "enabled ({0} GHCB pages)"),
    ("s3", re.compile(r"S3 support was detected on QEMU"), "supported"),
    ("smbios", re.compile(r"DetectSmbiosVersion: SMBIOS version from QEMU: (0x[0-9A-Fa-f]+)"),
     "version {0} from QEMU"),
    ("flash", re.compile(r"QemuFlashDetected => FD behaves as (\w+)"), "pflash behaves as {0}"),
    ("dma pool", re.compile(r"InstallIoMmuProtocol: Feature of reserved memory for DMA is "
                            r"supported"),
     "IoMmuDxe keeps a reserved shared-memory pool for DMA bounce buffers"),
)

#: Drivers whose failure to start says what the guest is not.
_PLATFORM_DRIVERS = {
    "AmdSevDxe": ("sev", "AmdSevDxe did not start ({status}): not a SEV guest"),
    "TdxDxe": ("tdx", "TdxDxe did not start ({status}): not a TDX guest"),
}

PHASES = ("SEC", "PEI", "DXE", "BDS")

_T = TypeVar("_T")


@dataclass
class LoadedImage:
    """One image the log says was loaded."""

    order: int
    name: str
    base: int
    entry: int
    line: int
    phase: str
    #: ``Error: Image at ... start failed: STATUS`` (None: no such line).
    start_failed: str | None = None


@dataclass
class BootAttempt:
    """One boot option BDS tried."""

    line: int
    description: str
    option: str = ""
    device_path: str = ""
    image: str = ""
    outcome: str = ""


@dataclass
class Crash:
    """A CPU exception dump or an ASSERT."""

    kind: str               # "exception" or "assert"
    line: int
    summary: str            # "#PF - Page-Fault" / the ASSERT's expression
    registers: dict[str, int] = field(default_factory=dict)
    error_code: str = ""
    module_path: str = ""   # the image the dump names, as the log names it
    image_base: int | None = None
    image_entry: int | None = None
    rip: int | None = None
    where: str = ""         # Image!function+0xoff, Image+0xoff or hex
    source: str = ""        # file:line (DWARF), or the ASSERT's
    module: str = ""        # the ASSERT's module, where the log names it
    expression: str = ""
    #: From DWARF: the functions at RIP, innermost first (inlined ones too).
    functions: tuple[str, ...] = ()
    #: The last image loaded before the crash line (its likely owner in DXE dispatch).
    last_image: str = ""

    @property
    def function(self) -> str:
        """``Image!function`` at RIP, the innermost (inlined) function where
        DWARF says it, else :attr:`where`."""
        if self.functions and self.where:
            image = re.split(r"[!+]", self.where, maxsplit=1)[0]
            return f"{image}!{self.functions[0]}"
        return self.where


@dataclass
class Boot:
    """One run of the firmware from SEC on (a log can hold several)."""

    first_line: int
    phases: dict[str, int] = field(default_factory=dict)
    images: list[LoadedImage] = field(default_factory=list)
    images_dropped: int = 0
    boots: list[BootAttempt] = field(default_factory=list)
    crashes: list[Crash] = field(default_factory=list)
    facts: dict[str, tuple[str, int]] = field(default_factory=dict)
    trace_lines: int = 0
    #: The last image loaded (listed or not: :data:`MAX_IMAGES`).
    last_image: LoadedImage | None = None
    boots_dropped: int = 0
    crashes_dropped: int = 0
    #: The line of a successful ExitBootServices() return (the harness's trace).
    ebs_returned: int = 0
    last_line: int = 0

    @property
    def phase(self) -> str:
        return max(self.phases, key=lambda p: self.phases[p]) if self.phases else "unknown"


@dataclass(frozen=True)
class LogEnd:
    """Where and how the log ends."""

    lines: int
    cut_mid_line: bool
    last_lines: tuple[str, ...]
    summary: str


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

    @property
    def traced(self) -> bool:
        """The log carries the harness's trace (``EBST`` lines), in any run."""
        return self.trace_lines > 0


# ------------------------------------------------------------- reading


def _check_text(path: Path, head: bytes) -> None:
    """Refuse an empty or binary file with one line."""
    if not head:
        raise LogFormatError(f"{path}: empty file: no boot log to explain")
    sample = head[:65536]
    nul = sample.count(0)
    printable = sum(1 for b in sample if 32 <= b < 127 or b in (9, 10, 13, 27))
    if nul > len(sample) // 100 or printable < len(sample) * 0.7:
        offset = sample.find(0)
        where = f"NUL byte at offset {offset}" if offset >= 0 else \
            f"{len(sample) - printable} of its first {len(sample)} bytes are not text"
        raise LogFormatError(f"{path}: a binary file ({where}), not a text boot log")


class _Reader:
    """The one pass: state that grows with what matters, not with the log."""

    def __init__(self) -> None:
        self.boot = Boot(first_line=1)
        self.earlier: list[str] = []
        self.earlier_count = 0
        self.identity: dict[str, str] = {}
        self.tail: deque[str] = deque(maxlen=TAIL)
        self.recognized = 0
        self.crlf = False
        self.ansi = False
        self.long_lines = 0
        self._dump: Crash | None = None
        self._dump_left = 0
        self.trace_lines = 0

    # -------------------------------------------------------- per line

    def feed(self, number: int, text: str) -> None:
        if "\x1b" in text:
            self.ansi = True
            text = _ANSI.sub("", text)
        text = text.replace("\r", "")
        self.tail.append(text)
        boot = self.boot
        boot.last_line = number
        if self._dump is not None and self._dump_line(text):
            return
        match = _DISPATCH.search(text)
        if match is None:
            return
        self.recognized += 1
        start = match.start()
        word = match.group(0)
        body = text[start:]
        if word == "Loading ":
            self._load(number, body)
        elif word == "EBST ":
            boot.trace_lines += 1
            self.trace_lines += 1
            if body.startswith("EBST ebs-return status=0x0") and body[26:27] in ("", " "):
                boot.ebs_returned = number
        elif word in ("[Bds]", "BdsDxe: "):
            self._bds(number, body)
        elif word == "!!!! ":
            self._exception(number, body)
        elif word == "ASSERT ":
            self._assert(number, body)
        elif word == "Error: Image at ":
            self._start_failed(body)
        elif word == "SecCoreStartupWithStack":
            self._sec(number)
        elif word == "DXE IPL Entry":
            boot.phases.setdefault("DXE", number)
        elif word in ("UEFI v", "UEFI Interactive Shell"):
            self._banner(body)
        else:
            self._fact(number, body)

    def _sec(self, number: int) -> None:
        boot = self.boot
        if boot.phases or boot.images:
            self.earlier_count += 1
            if len(self.earlier) < 20:
                self.earlier.append(f"lines {boot.first_line}-{number - 1}: reached "
                                    f"{boot.phase}, {len(boot.images)} images, then the "
                                    "firmware started again (a reset)")
            self.boot = Boot(first_line=number)
        self._dump = None
        self.boot.phases.setdefault("SEC", number)

    def _image(self, number: int, name: str, base: int, entry: int, phase: str) -> None:
        boot = self.boot
        boot.phases.setdefault(phase, number)
        image = LoadedImage(len(boot.images) + boot.images_dropped + 1, name, base, entry,
                            number, phase)
        boot.last_image = image
        if len(boot.images) >= MAX_IMAGES:
            boot.images_dropped += 1
            return
        boot.images.append(image)
        attempt = boot.boots[-1] if boot.boots else None
        if phase == "DXE" and "BDS" in boot.phases and attempt is not None \
                and not attempt.image and not attempt.outcome:
            attempt.image = f"{name}.efi"

    def _load(self, number: int, body: str) -> None:
        load = symbols.parse_image_load(body, number)
        if load is not None:
            # DxeIpl loads the DXE core with a "Loading PEIM at" line
            phase = "PEI" if body.startswith("Loading PEIM") and load.name != "DxeCore" \
                else "DXE"
            self._image(number, load.name, load.base, load.entry, phase)
            return
        core = _DXE_CORE.match(body)
        if core is not None:
            base, entry = int(core.group(1), 16), int(core.group(2), 16)
            last = self.boot.last_image
            if entry < base or (last is not None and last.name == "DxeCore"
                                and last.base == base):
                self.boot.phases.setdefault("DXE", number)    # DxeIpl said it already
                return
            self._image(number, "DxeCore", base, entry, "DXE")

    def _start_failed(self, body: str) -> None:
        match = _START_FAILED.match(body)
        if match is None:
            return
        base = int(match.group(1), 16)
        for image in reversed(self.boot.images):
            if image.base == base:
                image.start_failed = match.group(2).strip()
                return

    def _add_attempt(self, attempt: BootAttempt) -> None:
        self.boot.boots_dropped += _keep_last(self.boot.boots, attempt, MAX_BOOTS)

    def _add_crash(self, crash: Crash) -> None:
        self.boot.crashes_dropped += _keep_last(self.boot.crashes, crash, MAX_CRASHES)

    def _bds(self, number: int, body: str) -> None:
        boot = self.boot
        boot.phases.setdefault("BDS", number)
        if (match := _BDS_BOOTING.match(body)) is not None:
            self._close_attempt("another boot option was tried next")
            self._add_attempt(BootAttempt(number, match.group(1).strip()))
        elif (match := _BDS_EXPAND.match(body)) is not None and boot.boots:
            attempt = boot.boots[-1]
            if match.group(2).strip() == "<null string>":
                attempt.device_path = match.group(1)
                attempt.outcome = "no boot file found on the device"
            else:
                attempt.device_path = match.group(2).strip()
        elif body.startswith("[Bds] Unable to boot!"):
            self._close_attempt("another boot option was tried next")
            self._add_attempt(BootAttempt(number, "(none left)", outcome="BDS: unable to boot"))
        elif (match := _BDSDXE.match(body)) is not None:
            verb, option, description, path, status = match.groups()
            description = description.strip()
            previous = boot.boots[-1] if boot.boots else None
            # the same attempt: its "loading" line, or the debug port's [Bds]Booting
            if previous is not None and not previous.outcome and (
                    previous.option == option
                    or (not previous.option and previous.description == description)):
                attempt = previous
            else:
                attempt = BootAttempt(number, description)
                self._add_attempt(attempt)
            attempt.option = option
            attempt.device_path = attempt.device_path or path
            if verb == "starting":
                attempt.outcome = "started"
            elif verb.startswith("failed"):
                attempt.outcome = f"{verb}: {status or 'no status given'}"

    def _close_attempt(self, why: str) -> None:
        if self.boot.boots:
            attempt = self.boot.boots[-1]
            if not attempt.outcome:
                attempt.outcome = (f"{attempt.image} returned or failed; {why}" if attempt.image
                                   else f"no outcome printed; {why}")

    def _exception(self, number: int, body: str) -> None:
        match = _EXCEPTION.match(body)
        if match is None:
            return
        last = self.boot.last_image
        crash = Crash("exception", number, f"{match.group(2)} ({match.group(3)})",
                      last_image=f"{last.name}.efi (line {last.line})" if last else "")
        self._add_crash(crash)
        self._dump, self._dump_left = crash, DUMP_LINES

    def _dump_line(self, text: str) -> bool:
        """Take a line of the open exception dump; False (and the dump ends)
        for a line that is not part of one: it is read as any other."""
        crash = self._dump
        assert crash is not None
        self._dump_left -= 1
        if self._dump_left < 0 or not _DUMP_LINE.match(text):
            self._dump = None
            return False
        if (match := _FIND_IMAGE.search(text)) is not None:
            crash.rip = int(match.group(1), 16)
            crash.module_path = match.group(2)
            crash.image_base = int(match.group(3), 16)
            crash.image_entry = int(match.group(4), 16)
            self._identity_from_path(crash.module_path)
            self._dump = None
            return True
        if "Can't find image information" in text:
            self._dump = None
            return True
        if (match := _EXCEPTION_DATA.search(text)) is not None:
            crash.error_code = (match.group(1) + match.group(2)).strip()
        for name, value in _REGISTER.findall(text):
            crash.registers[name] = int(value, 16)
        if crash.rip is None:
            crash.rip = crash.registers.get("RIP", crash.registers.get("EIP"))
        return True

    def _assert(self, number: int, body: str) -> None:
        match = _ASSERT.match(body)
        if match is None:
            return
        module, source, line, expression = match.groups()
        self._identity_from_path(source)
        last = self.boot.last_image
        self._add_crash(Crash(
            "assert", number, expression.strip(),
            source=f"{source}:{line}" if line else source, module=module or "",
            expression=expression.strip(),
            last_image=f"{last.name}.efi (line {last.line})" if last else ""))

    def _banner(self, body: str) -> None:
        if (match := _UEFI_BANNER.search(body)) is not None:
            self.identity.setdefault("uefi", f"UEFI {match.group(1)}, firmware vendor "
                                             f"{match.group(2)}, revision {match.group(3)}")
        elif (match := _SHELL_BANNER.search(body)) is not None:
            self.identity.setdefault("shell", match.group(1))

    def _identity_from_path(self, path: str) -> None:
        match = _BUILD_PATH.search(path)
        if match is not None:
            self.identity.setdefault(
                "build", f"{match.group(2)} {match.group(3)} build with {match.group(4)} "
                         f"for {match.group(5)} (build directory {match.group(1)})")
        elif (match := _SOURCE_TREE.match(path)) is not None:
            self.identity.setdefault("source", f"built from the source tree {match.group(1)}")

    def _fact(self, number: int, body: str) -> None:
        for label, pattern, say in _FACTS:
            match = pattern.search(body)
            if match is not None:
                self.boot.facts.setdefault(label, (say.format(*match.groups()), number))
                return


def _keep_last(items: list[_T], item: _T, cap: int) -> int:
    """Append ``item``, keeping the first ``cap`` - 1 and always the latest;
    1 when an earlier one was dropped for it."""
    if len(items) >= cap:
        items[-1] = item
        return 1
    items.append(item)
    return 0


# ------------------------------------------------------------ explaining


def explain_log(path: Path | str, firmware_dir: Path | None = None) -> Explanation:
    """Read ``path`` once and explain it.

    :param firmware_dir: a firmware build (``modules/*.debug``, the symbol
        index) for ``Image!function`` and ``file:line``.
    :raises LogFormatError: an empty or binary file, or one with no line of
        an OVMF boot log.
    :raises OSError: the file cannot be read.
    """
    path = Path(path)
    reader = _Reader()
    number = 0
    ended = True
    with trace.opened_log(path) as handle:
        head = handle.peek(65536)[:65536]      # a pipe is read once: no seek back
        _check_text(path, head)
        reader.crlf = b"\r\n" in head
        for number, raw, ended, long in trace.split_lines(handle):
            reader.long_lines += long
            reader.feed(number, raw.decode("latin-1"))
    if reader.recognized == 0:
        raise LogFormatError(f"{path}: no line of an OVMF boot log in {number} lines (no "
                             "SEC entry, image load, BDS, exception or ASSERT line)")
    boot = reader.boot
    if boot.boots:
        attempt = boot.boots[-1]
        if not attempt.outcome:
            attempt.outcome = (f"{attempt.image} running when the log ends" if attempt.image
                               else "no outcome in the log")
    images = [symbols.ImageLoad(i.name, i.base, i.entry, i.line) for i in boot.images]
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
    identity = _identity(reader, boot)
    notes = []
    if reader.long_lines:
        notes.append(f"{reader.long_lines} line(s) longer than {trace.MAX_LINE_BYTES} bytes "
                     "were cut")
    if boot.images_dropped:
        notes.append(f"{boot.images_dropped} image loads beyond the first {MAX_IMAGES} are "
                     "counted, not listed")
    for dropped, what, cap in ((boot.boots_dropped, "boot attempts", MAX_BOOTS),
                               (boot.crashes_dropped, "crashes", MAX_CRASHES)):
        if dropped:
            notes.append(f"{dropped} {what} between the first {cap - 1} and the last are "
                         "counted, not listed")
    if reader.earlier_count > len(reader.earlier):
        notes.append(f"{reader.earlier_count - len(reader.earlier)} earlier runs not listed")
    end = _end(boot, reader, number, not ended)
    return Explanation(str(path), number, reader.crlf, reader.ansi, identity, boot,
                       tuple(reader.earlier), end, tuple(notes), sym, reader.trace_lines)


def _symbolize(crash: Crash, sym: symbols.Symbolizer, firmware_dir: Path | None) -> None:
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


def _identity(reader: _Reader, boot: Boot) -> tuple[str, ...]:
    out: list[str] = []
    names = {image.name for image in boot.images}
    if "SEC" in boot.phases or "PlatformPei" in names:
        out.append("OVMF (edk2's firmware for QEMU/KVM guests)")
    for key in ("build", "source", "uefi", "shell"):
        if key in reader.identity:
            out.append(reader.identity[key])
    if reader.trace_lines:
        out.append(f"instrumented by the ovmf-ebs-harness series ({reader.trace_lines} EBST "
                   "trace lines)")
    return tuple(out)


def platform_facts(boot: Boot) -> list[tuple[str, str, int | None]]:
    """(fact, value, line): what the log says about the platform."""
    facts: list[tuple[str, str, int | None]] = [
        (label, value, line) for label, (value, line) in boot.facts.items()]
    said = {label for label, _, _ in facts}
    for image in boot.images:
        known = _PLATFORM_DRIVERS.get(image.name)
        if known is not None and image.start_failed and known[0] not in said:
            facts.append((known[0], known[1].format(status=image.start_failed), image.line))
            said.add(known[0])
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


def _end(boot: Boot, reader: _Reader, lines: int, cut: bool) -> LogEnd:
    tail = tuple(reader.tail)
    last_crash = boot.crashes[-1] if boot.crashes else None
    last_image = boot.last_image
    if last_crash is not None and (last_image is None or last_crash.line > last_image.line):
        if last_crash.kind == "exception":
            summary = (f"the log ends after a CPU exception {last_crash.summary} at line "
                       f"{last_crash.line}"
                       + (f" in {last_crash.function}" if last_crash.function else "")
                       + (f" ({last_crash.source})" if last_crash.source else ""))
        else:
            summary = (f"the log ends after an ASSERT at line {last_crash.line}: "
                       f"{last_crash.source}: {last_crash.expression}")
    elif boot.ebs_returned:
        booted = boot.boots[-1].image if boot.boots and boot.boots[-1].image else "the OS loader"
        summary = (f"the log ends after ExitBootServices() returned to {booted} (line "
                   f"{boot.ebs_returned}): boot services are over, the firmware's part is done")
    elif boot.boots and boot.phase == "BDS":
        attempt = boot.boots[-1]
        summary = (f"the log ends in BDS: boot option \"{attempt.description}\" "
                   f"({attempt.outcome})")
    elif last_image is not None:
        after = lines - last_image.line
        summary = (f"the log ends in {boot.phase}, {after} line(s) after the last image "
                   f"loaded ({last_image.name}.efi, #{last_image.order}, line "
                   f"{last_image.line}): no output after that; a hang in its entry point "
                   "or in what it started, or a log cut short")
    else:
        summary = f"the log ends in {boot.phase} at line {lines}"
    if cut:
        summary += f"; its last line ({lines}) is cut in the middle: {tail[-1][-80:]!r}"
    return LogEnd(lines, cut, tail, summary)


# ------------------------------------------------------------ rendering


def _hex(value: int | None) -> str:
    return "" if value is None else f"{value:#x}"


def to_json(exp: Explanation) -> dict[str, Any]:
    boot = exp.boot
    return {
        "log": exp.path, "lines": exp.lines, "crlf": exp.crlf, "ansi": exp.ansi,
        "identity": list(exp.identity),
        "platform": [{"fact": f, "value": v, "line": n} for f, v, n in platform_facts(boot)],
        "phases": [{"phase": phase, "line": boot.phases[phase]} for phase in PHASES
                   if phase in boot.phases],
        "images": [{"order": i.order, "name": i.name, "base": _hex(i.base),
                    "entry": _hex(i.entry), "line": i.line, "phase": i.phase,
                    "start_failed": i.start_failed} for i in boot.images],
        "images_not_listed": boot.images_dropped,
        "boot_options": [{"line": a.line, "option": a.option, "description": a.description,
                          "device_path": a.device_path, "image": a.image,
                          "outcome": a.outcome} for a in boot.boots],
        "crashes": [{"kind": c.kind, "line": c.line, "summary": c.summary,
                     "rip": _hex(c.rip), "where": c.where, "source": c.source,
                     "module_path": c.module_path, "module": c.module,
                     "functions": list(c.functions), "function": c.function,
                     "expression": c.expression,
                     "last_image": c.last_image,
                     "error_code": c.error_code,
                     "registers": {k: _hex(v) for k, v in c.registers.items()}}
                    for c in boot.crashes],
        "earlier_runs": list(exp.earlier_boots),
        "end": {"summary": exp.end.summary, "cut_mid_line": exp.end.cut_mid_line,
                "last_lines": list(exp.end.last_lines)},
        "notes": list(exp.notes),
        "traced": exp.traced,
    }


def render_text(exp: Explanation, *, all_images: bool = True) -> str:
    boot = exp.boot
    out = [f"{exp.path}: {exp.lines} lines" + (", CRLF" if exp.crlf else "")
           + (", with console escape sequences" if exp.ansi else "")]
    out.append("")
    out.append("Firmware:")
    out += [f"  {line}" for line in exp.identity] or ["  not stated in this log"]
    facts = platform_facts(boot)
    if facts:
        out.append("Platform:")
        out += [f"  {fact:<11} {value}" + (f"  (line {line})" if line else "")
                for fact, value, line in facts]
    out.append("Phases: " + (", ".join(f"{p} from line {boot.phases[p]}" for p in PHASES
                                        if p in boot.phases) or "none recognized"))
    for earlier in exp.earlier_boots:
        out.append(f"  earlier run, {earlier}")
    failed = [i for i in boot.images if i.start_failed]
    out.append("")
    out.append(f"Images: {len(boot.images) + boot.images_dropped} loaded, {len(failed)} failed "
               "to start")
    if all_images:
        out.append(f"  {'#':>4} {'phase':<5} {'base':>12} {'entry':>12} {'line':>7}  image")
        for image in boot.images:
            status = f"  start failed: {image.start_failed}" if image.start_failed else ""
            out.append(f"  {image.order:>4} {image.phase:<5} {image.base:>#12x} "
                       f"{image.entry:>#12x} {image.line:>7}  {image.name}.efi{status}")
    else:
        out += [f"  #{i.order} {i.name}.efi (line {i.line}): start failed: {i.start_failed}"
                for i in failed]
    if boot.boots:
        out.append("")
        out.append("Boot options tried:")
        for attempt in boot.boots:
            option = f"{attempt.option} " if attempt.option else ""
            path = f" from {attempt.device_path}" if attempt.device_path else ""
            out.append(f"  line {attempt.line}: {option}\"{attempt.description}\"{path}: "
                       f"{attempt.outcome}")
    out.append("")
    if boot.crashes:
        out.append("Crashes:")
        for crash in boot.crashes:
            out += ["  " + line for line in _crash_lines(crash)]
    else:
        out.append("Crashes: no CPU exception dump and no ASSERT in the log")
    out.append("")
    out.append("End: " + exp.end.summary)
    out += [f"  | {line}" for line in exp.end.last_lines]
    for note in exp.notes:
        out.append(f"Note: {note}")
    return "\n".join(out) + "\n"


def _crash_lines(crash: Crash) -> list[str]:
    if crash.kind == "assert":
        module = f" in {crash.module}" if crash.module else ""
        lines = [f"line {crash.line}: ASSERT{module} at {crash.source}: {crash.expression}"]
        if crash.last_image and not crash.module:
            lines.append(f"  the last image loaded before it: {crash.last_image}")
        return lines
    lines = [f"line {crash.line}: CPU exception {crash.summary}"
             + (f", error code {crash.error_code}" if crash.error_code else "")]
    if crash.rip is not None:
        lines.append(f"  RIP {crash.rip:#x} = {crash.where or 'not in any image of the log'}"
                     + (f"  ({crash.source})" if crash.source else ""))
    if len(crash.functions) > 1:
        lines.append("  in " + ", inlined into ".join(crash.functions))
    if "CR2" in crash.registers:
        lines.append(f"  CR2 (the faulting address) {crash.registers['CR2']:#x}")
    if crash.module_path:
        lines.append(f"  image as the log names it: {crash.module_path}")
    return lines


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; }
tr:nth-child(even) { background: #f4f4f4; } .failed { color: #b00; }
.crash { border-left: 4px solid #b00; padding-left: 8px; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; }
code, pre, td.mono { font-family: ui-monospace, monospace; font-size: 12px; }
"""


def render_html(exp: Explanation) -> str:
    """One self-contained page: facts, the load map drawn, crashes, the end."""
    esc = html.escape
    boot = exp.boot
    parts = [f"<!doctype html><meta charset=utf-8><title>{esc(exp.path)}</title>",
             f"<style>{_CSS}</style><h1>{esc(exp.path)}</h1>",
             f"<p>{exp.lines} lines. {esc(exp.end.summary)}</p>", "<h2>Firmware</h2>"]
    parts.append("<ul>" + "".join(f"<li>{esc(line)}</li>" for line in exp.identity) + "</ul>"
                 if exp.identity else "<p>Not stated in this log.</p>")
    parts.append("<h2>Platform</h2>")
    facts = platform_facts(boot)
    parts.append("<table>" + "".join(
        f"<tr><th>{esc(f)}</th><td>{esc(v)}</td><td>{'' if n is None else n}</td></tr>"
        for f, v, n in facts) + "</table>" if facts else "<p>Not stated in this log.</p>")
    parts += ["<h2>Load map</h2>", _svg_map(exp)]
    if boot.images:
        parts.append("<table><tr><th>#</th><th>phase</th><th>image</th><th>base</th>"
                     "<th>entry</th><th>line</th><th>start</th></tr>")
        for image in boot.images:
            failed = (f"<td class=failed>{esc(image.start_failed)}</td>" if image.start_failed
                      else "<td></td>")
            parts.append(f"<tr><td>{image.order}</td><td>{image.phase}</td>"
                         f"<td>{esc(image.name)}.efi</td><td class=mono>{image.base:#x}</td>"
                         f"<td class=mono>{image.entry:#x}</td><td>{image.line}</td>{failed}"
                         "</tr>")
        parts.append("</table>")
    if boot.boots:
        parts.append("<h2>Boot options tried</h2><table>")
        parts += [f"<tr><td>{a.line}</td><td>{esc(a.option)}</td><td>{esc(a.description)}</td>"
                  f"<td class=mono>{esc(a.device_path)}</td><td>{esc(a.outcome)}</td></tr>"
                  for a in boot.boots]
        parts.append("</table>")
    parts.append("<h2>Crashes</h2>")
    if not boot.crashes:
        parts.append("<p>No CPU exception dump and no ASSERT in the log.</p>")
    for crash in boot.crashes:
        regs = " ".join(f"{k}={v:#x}" for k, v in crash.registers.items())
        parts.append("<div class=crash>" + "<br>".join(esc(line) for line in _crash_lines(crash))
                     + (f"<pre>{esc(regs)}</pre>" if regs else "") + "</div>")
    parts.append("<h2>End of the log</h2><pre>"
                 + esc("\n".join(exp.end.last_lines)) + "</pre>")
    parts += [f"<p>Note: {esc(note)}</p>" for note in exp.notes]
    return "\n".join(parts) + "\n"


#: Address gaps wider than this are drawn as a fixed break in the load map.
MAP_GAP = 16 << 20


def _svg_map(exp: Explanation, width: int = 1000) -> str:
    """The images of each phase as bars at their addresses (a gap of more
    than :data:`MAP_GAP` is drawn as a break, so the flash and RAM copies of
    PEI both show), failed ones red, the crashes' RIPs as red marks."""
    boot = exp.boot
    placed = list(boot.images)
    for crash in boot.crashes:
        if crash.image_base is not None and not any(i.base == crash.image_base for i in placed):
            placed.append(LoadedImage(0, Path(crash.module_path).stem or "image",
                                      crash.image_base, crash.image_entry or crash.image_base,
                                      crash.line, "dump"))
    rows = [p for p in ("PEI", "DXE", "dump") if any(i.phase == p for i in placed)]
    if not rows:
        return "<p>No image loads in the log.</p>"
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 60}" '
            f'height="{len(rows) * 80 + 10}" role="img" aria-label="load map">')]
    for row, phase in enumerate(rows):
        images = sorted((i for i in placed if i.phase == phase), key=lambda i: i.base)
        sizes = {id(i): _size(exp.symbolizer, i, images) for i in images}
        where = _Axis([(i.base, i.base + sizes[id(i)]) for i in images], width)
        y = row * 80 + 10
        out.append(f'<text x="0" y="{y + 25}" font-size="12">{phase}</text>')
        for image in images:
            x = where.x(image.base)
            w = max(1.5, where.x(image.base + sizes[id(image)]) - x)
            colour = "#d66" if image.start_failed else "#69c"
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="40" '
                       f'fill="{colour}" stroke="#fff" stroke-width="0.5"><title>'
                       f'#{image.order} {html.escape(image.name)}.efi {image.base:#x}'
                       f'</title></rect>')
        for x, label in where.labels():
            out.append(f'<text x="{x:.1f}" y="{y + 54}" font-size="10">{label}</text>')
        for crash in boot.crashes:
            if crash.rip is not None and where.holds(crash.rip):
                x = where.x(crash.rip)
                name = html.escape(crash.function or hex(crash.rip))
                out.append(f'<line x1="{x:.1f}" y1="{y - 5}" x2="{x:.1f}" y2="{y + 46}" '
                           f'stroke="#b00" stroke-width="2"><title>{html.escape(crash.summary)}'
                           f' at {crash.rip:#x} {name}</title></line>')
                out.append(f'<text x="{x + 3:.1f}" y="{y + 68}" font-size="11" fill="#b00">'
                           f'{html.escape(crash.summary)} in {name}</text>')
    out.append("</svg>")
    return "\n".join(out)


class _Axis:
    """Addresses to x: the ranges' clusters side by side, each as wide as its
    span, with a fixed break between clusters."""

    BREAK = 24.0

    def __init__(self, ranges: list[tuple[int, int]], width: int) -> None:
        clusters: list[list[int]] = []
        for low, high in sorted(ranges):
            if clusters and low - clusters[-1][1] <= MAP_GAP:
                clusters[-1][1] = max(clusters[-1][1], high)
            else:
                clusters.append([low, high])
        spans = sum(high - low for low, high in clusters) or 1
        scale = (width - self.BREAK * (len(clusters) - 1)) / spans
        self._segments: list[tuple[int, int, float]] = []
        x = 40.0
        for low, high in clusters:
            self._segments.append((low, high, x))
            x += (high - low) * scale + self.BREAK
        self._scale = scale

    def holds(self, address: int) -> bool:
        return any(low <= address < high for low, high, _ in self._segments)

    def x(self, address: int) -> float:
        for low, high, start in self._segments:
            if address <= high:
                return start + (max(address, low) - low) * self._scale
        low, high, start = self._segments[-1]
        return start + (high - low) * self._scale

    def labels(self) -> list[tuple[float, str]]:
        return [(start, f"{low:#x}") for low, _, start in self._segments]


def _size(sym: symbols.Symbolizer, image: LoadedImage, images: list[LoadedImage]) -> int:
    module = sym.module(image.name)
    if module is not None and module.image_size:
        return module.image_size
    # Without symbols: up to the next image, unless that is far (another region).
    gap = min((i.base for i in images if i.base > image.base), default=0) - image.base
    return gap if 0 < gap <= 0x100000 else 0x10000
