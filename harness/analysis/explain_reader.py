"""Reading an OVMF log for ``explain-log``: one pass, bounded state.

The patterns of edk2's messages across its releases and :class:`Reader`
(the platform facts' rules are :mod:`harness.analysis.explain_facts`'s),
which goes over the lines
once and records the :class:`Boot`: images loaded, boot options tried,
crashes, milestones, facts, the confidential-computing evidence. What the
records mean is :mod:`harness.analysis.explain`'s; how they are shown,
:mod:`harness.analysis.explain_render`'s.

It is longer than most modules (about 720 lines) for a reason: each
pattern's meaning is the place the reader applies it, and edk2's wordings
across its releases are many; split apart, a reader of one would need the
other open beside it. The fact rules carry their meaning with them, so
they live apart.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from harness.analysis import symbols
from harness.analysis.explain_facts import FACT_RULES
from harness.errors import LogFormatError
from harness.logtext import strip_ansi

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
#: Distinct edk2 lines a file needs to be read as an OVMF log: one line in
#: common with edk2's vocabulary is chance, two distinct ones are a firmware.
MIN_FIRMWARE_LINES = 2


#: The words the reader dispatches a line on (one search per line); the
#: handler then parses the line and says whether it was an edk2 message.
_DISPATCH = re.compile(
    r"(?:Loading |\[Bds\]|BdsDxe: |!!!! |ASSERT |Error: Image at |EBST |SecCoreStartupWithStack"
    r"|DXE IPL Entry|SEV|TDX|Tdx|PlatformAddressWidthFromCpuid|MaxCpuCount"
    r"|PublishPeiMemory|DxeMain: MemoryBaseAddress|UEFI v|UEFI Interactive Shell|S3 support"
    r"|DetectSmbiosVersion|QemuFlashDetected =>|InstallIoMmuProtocol|UEFI firmware "
    r"|add-symbol-file |MMIO using encrypted memory|CCAttr=|MpInitLib: Find "
    r"|PciBus: |PCI Bus First Scanning|ResetSystem2: "
    # the vocabulary of _EDK2_LINE
    r"|Install PPI: |Reinstall PPI: |Register PPI Notify: |Notify: PPI Guid: "
    r"|InstallProtocolInterface: |ProtectUefiImageCommon - |Select Item: |th FV start address "
    r"|FSOpen: Open |QemuFwCfgProbe: |Platform PEIM Loaded|\[Security\] 3rd party"
    r"|EmuVariablesUpdatedCallback|Saved NV Variables|Tpm2SubmitCommand - |HOBLIST address"
    r"| was discovered but not loaded|BAR\[|Padding: )")

_GUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
#: edk2 messages that say nothing the explanation keeps but that only an
#: edk2 firmware prints: they count towards "this is an OVMF log" and as
#: the last firmware line, never as a milestone.
_EDK2_LINE = re.compile(
    rf"(?:Install PPI: |Reinstall PPI: |Register PPI Notify: |Notify: PPI Guid: "
    rf"|InstallProtocolInterface: |Loading (?:driver|PEIM) ){_GUID}"
    r"|ProtectUefiImageCommon - 0x[0-9A-Fa-f]+|Select Item: 0x[0-9A-Fa-f]+\s*$"
    r"|The \d+th FV start address is 0x|FSOpen: Open '|QemuFwCfgProbe: Supported"
    r"|Platform PEIM Loaded|\[Security\] 3rd party image|EmuVariablesUpdatedCallback"
    r"|Saved NV Variables to NvVars file|Tpm2SubmitCommand - |HOBLIST address in DXE"
    r"|Driver [0-9A-Fa-f-]{36} was discovered but not loaded"
    r"|^\s*(?:BAR\[\d+\]|Padding): Type = ")

_VOCABULARY = frozenset((
    "Install PPI: ", "Reinstall PPI: ", "Register PPI Notify: ", "Notify: PPI Guid: ",
    "InstallProtocolInterface: ", "ProtectUefiImageCommon - ", "Select Item: ",
    "th FV start address ", "FSOpen: Open ", "QemuFwCfgProbe: ", "Platform PEIM Loaded",
    "[Security] 3rd party", "EmuVariablesUpdatedCallback", "Saved NV Variables",
    "Tpm2SubmitCommand - ", "HOBLIST address", " was discovered but not loaded", "BAR[",
    "Padding: "))

_DXE_CORE = re.compile(r"Loading DXE CORE at 0x([0-9A-Fa-f]+) EntryPoint=0x([0-9A-Fa-f]+)")
#: An image without a PDB name: an OS loader or a kernel started as an EFI
#: application (and, on Arm, the PE/COFF extra-action line of any image).
_NAMELESS_LOAD = re.compile(r"Loading (driver|PEIM) at 0x([0-9A-Fa-f]+) "
                            r"EntryPoint=0x([0-9A-Fa-f]+)\s*$")
_START_FAILED = re.compile(r"Error: Image at ([0-9A-Fa-f]+) start failed: (.+)")
_BDS_BOOTING = re.compile(r"\[Bds\]\s?Booting (.+)")
_BDS_EXPAND = re.compile(r"\[Bds\] (?:Expand|DevicePath expand:) (\S+) -> (.+)")
_BDSDXE = re.compile(r'BdsDxe: (loading|starting|failed to load|failed to start) '
                     r'(Boot[0-9A-Fa-f]{4}) "(.*)" from (\S+?)(?:: (.+))?$')
_EXCEPTION = re.compile(r"!!!! (X64|IA32) Exception Type - ([0-9A-Fa-f]{2})\((.*?)\)"
                        r"(?:\s+CPU Apic ID - ([0-9A-Fa-f]+) !!!!)?")
_FIND_IMAGE = re.compile(r"!!!! Find image based on IP\(0x([0-9A-Fa-f]+)\) (.*?)\s*"
                         r"\(ImageBase=([0-9A-Fa-f]+), EntryPoint=([0-9A-Fa-f]+)\) !!!!")
_REGISTER = re.compile(r"\b([A-Z][A-Z0-9_]{1,11})\s+-\s+([0-9A-Fa-f]{8,16})\b")
_EXCEPTION_DATA = re.compile(r"ExceptionData - ([0-9A-Fa-f]+)(.*)")
#: The harness's trace: the DXE core calls an IOMMU teardown; a boot
#: service TPL change while ExitBootServices() runs (docs/trace-format.md).
_TEARDOWN_CALL = re.compile(r"EBST ebs-callback .*\bfn=0x([0-9A-Fa-f]+)")
_TPL_CHANGE = re.compile(r"EBST tpl-change op=(raise|restore) tpl=(\d+) caller=0x([0-9A-Fa-f]+)")
_ASSERT = re.compile(r"ASSERT (?:\[([^\]]+)\] )?(.+?)(?:\((\d+)\))?: (.*)")
#: What a CPU exception dump prints after its header (registers, the image).
_DUMP_LINE = re.compile(r"^(?:[A-Z][A-Z0-9_]{1,11}\s+- [0-9A-Fa-f]|ExceptionData - |FXSAVE_STATE"
                        r"|!!!! (?:Find image|Can't find image))")
_UEFI_BANNER = re.compile(r"UEFI v(\d+\.\d+) \((.+), (0x[0-9A-Fa-f]+)\)")
_SHELL_BANNER = re.compile(r"(UEFI Interactive Shell v[\d.]+)")
#: ArmPlatformPkg's PrePi/PrePeiCore banner (ArmVirtQemu and other Arm
#: platforms print it on the serial port before anything else).
_ARM_BANNER = re.compile(r"UEFI firmware \(version (.*?) built at (.+?)\)|UEFI firmware starting\.")
_ADD_SYMBOL = re.compile(r"add-symbol-file (\S+\.dll) 0x[0-9A-Fa-f]+")
_SOURCE_TREE = re.compile(r"(\S+?)/[A-Za-z0-9]+Pkg/")
_BUILD_PATH = re.compile(r"(\S*?/Build/([A-Za-z0-9_]+)(?:-([A-Za-z0-9]+))?/([A-Z]+)_([A-Z0-9]+)"
                         r"/([A-Z0-9]+))/")
_PCI = re.compile(r"PciBus: [A-Z]|PCI Bus First Scanning")
_RESET = re.compile(r"(?:DXE|PEI) ResetSystem2: ResetType (\w+)")

#: Lines of the OS that follows the firmware: the Linux EFI stub and the
#: kernel's timestamped lines.
_OS_LINE = re.compile(r"\s*(?:\[\s*\d+\.\d+\] |EFI stub: |Linux version \d)")
_EFI_STUB_EXIT = re.compile(r"EFI stub: Exiting boot services")
#: What the OS says about the guest it runs in.
_OS_FACTS = re.compile(r"tdx: Guest detected|Memory Encryption Features active: (.+)")
#: Other logs people take for a firmware log, and how to say what they are.
_FOREIGN = (
    ("a Linux kernel log", re.compile(r"\s*\[\s*\d+\.\d+\] |Linux version \d")),
    ("a SeaBIOS log", re.compile(r"SeaBIOS \(version |Booting from (?:Hard Disk|ROM|DVD)")),
    ("a U-Boot log", re.compile(r"U-Boot \d{4}\.\d{2}|Hit any key to stop autoboot")),
)

#: The stable keys of :attr:`Explanation.firmware` (the JSON's ``firmware``).
FIRMWARE_KEYS = ("family", "arch", "version", "built", "build_platform", "build_target",
                 "build_toolchain", "build_directory", "uefi", "shell")

#: Drivers whose failure to start says what the guest is not.
PLATFORM_DRIVERS = {
    "AmdSevDxe": ("sev", "AmdSevDxe did not start ({status}): not a SEV guest"),
    "TdxDxe": ("tdx", "TdxDxe did not start ({status}): not a TDX guest"),
}

#: The kinds of :attr:`LogEnd.kind` (the JSON's ``end.kind``).
END_KINDS = ("crash", "handed-off", "reset", "boot-option", "hang-in-image", "stopped",
             "unknown")

#: The confidential-computing kinds (the JSON's ``confidential.kind``), weakest first.
CONFIDENTIAL_KINDS = ("none", "sev", "sev-es", "sev-snp", "tdx")

#: What the firmware was doing when a line of this kind was its last milestone.
ACTIVITY = {"pci": "while the PCI bus was being enumerated", "bds": "while BDS was at work",
             "phase": "just after the phase began", "start-failed": "after an image's start "
             "failed", "image": "in an image's entry point"}

PHASES = ("SEC", "PEI", "DXE", "BDS")

_T = TypeVar("_T")


@dataclass
class LoadedImage:
    """One image the log says was loaded."""

    order: int
    name: str               # "" for an image the log gives no name (no PDB)
    base: int
    entry: int
    line: int
    phase: str
    #: ``Error: Image at ... start failed: STATUS`` (None: no such line).
    start_failed: str | None = None

    @property
    def file(self) -> str:
        """``Name.efi``, or what a nameless image is."""
        return f"{self.name}.efi" if self.name else f"nameless image at {self.base:#x}"


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
    #: What the firmware said just before the dump, where it explains it.
    cause: str = ""
    #: Inside the IOMMU ExitBootServices() teardown (the harness's trace):
    #: its ``ebs-callback`` line and function address.
    teardown: tuple[int, int] | None = None
    #: The last boot service TPL change inside that teardown: (line,
    #: "raise"/"restore", TPL, caller address).
    teardown_tpl: tuple[int, str, int, int] | None = None
    #: :attr:`teardown` and :attr:`teardown_tpl` in words, symbolized
    #: where the log's image loads (and ``--firmware``) allow.
    during: str = ""

    @property
    def function(self) -> str:
        """``Image!function`` at RIP, the innermost (inlined) function where
        DWARF says it, else :attr:`where`."""
        if self.functions and self.where:
            image = re.split(r"[!+]", self.where, maxsplit=1)[0]
            return f"{image}!{self.functions[0]}"
        return self.where


@dataclass(frozen=True)
class Milestone:
    """A line that marks something new happening (an image load, a phase,
    BDS, PCI enumeration, a reset): where the firmware was when it went quiet."""

    line: int
    kind: str
    text: str


@dataclass
class Boot:
    """One run of the firmware from SEC on (a log can hold several)."""

    first_line: int
    phases: dict[str, int] = field(default_factory=dict)
    images: list[LoadedImage] = field(default_factory=list)
    images_dropped: int = 0
    options: list[BootAttempt] = field(default_factory=list)
    crashes: list[Crash] = field(default_factory=list)
    facts: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: FACT_KEYS -> (value, line).
    values: dict[str, tuple[Any, int]] = field(default_factory=dict)
    #: What the OS said about the guest after the hand-off: (what, line).
    os_says: list[tuple[str, int]] = field(default_factory=list)
    trace_lines: int = 0
    #: The last image loaded (listed or not: :data:`MAX_IMAGES`).
    last_image: LoadedImage | None = None
    options_dropped: int = 0
    crashes_dropped: int = 0
    #: The line of a successful ExitBootServices() return (the harness's trace).
    ebs_returned: int = 0
    #: An IOMMU teardown the trace shows running: (ebs-callback line, fn).
    teardown: tuple[int, int] | None = None
    #: The last boot service TPL change inside it (see :attr:`Crash.teardown_tpl`).
    teardown_tpl: tuple[int, str, int, int] | None = None
    last_line: int = 0
    milestone: Milestone | None = None
    #: The last line the firmware printed: (line, text).
    last_firmware: tuple[int, str] = (0, "")
    #: Lines of the OS after the last firmware line; the first of them.
    os_lines: int = 0
    first_os_line: tuple[int, str] = (0, "")
    #: The Linux EFI stub's "Exiting boot services" (line), after the firmware.
    efi_stub_exit: int = 0

    @property
    def phase(self) -> str:
        return max(self.phases, key=lambda p: self.phases[p]) if self.phases else "unknown"


# ------------------------------------------------------------- reading


def check_text(path: Path, head: bytes) -> None:
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


class Reader:
    """The one pass: state that grows with what matters, not with the log."""

    def __init__(self) -> None:
        self.boot = Boot(first_line=1)
        self.earlier: list[str] = []
        self.earlier_count = 0
        self.identity: dict[str, str] = {}
        self.tail: deque[str] = deque(maxlen=TAIL)
        #: Up to MIN_FIRMWARE_LINES distinct edk2 lines: (line, text).
        self.evidence: list[tuple[int, str]] = []
        #: Enough of them: the file is an OVMF log (checks that only the gate
        #: needs stop here).
        self._proven = False
        self.foreign: dict[str, int] = {}
        self.crlf = False
        self.ansi = False
        self.long_lines = 0
        self._dump: Crash | None = None
        self._dump_left = 0
        self.trace_lines = 0
        #: The #VC handler's MMIO refusal: (line, address), for the #GP after it.
        self._vc_mmio: tuple[int, str] = (0, "")
        #: Dispatch word -> handler(line number, text, text from the word on);
        #: the words not here are platform facts (_fact).
        self._handlers: dict[str, Callable[[int, str, str], str | None]] = {
            "Loading ": lambda n, t, b: self._load(n, b),
            "EBST ": self._trace,
            "[Bds]": lambda n, t, b: self._bds(n, b),
            "BdsDxe: ": lambda n, t, b: self._bds(n, b),
            "!!!! ": lambda n, t, b: self._exception(n, b),
            "ASSERT ": lambda n, t, b: self._assert(n, b),
            "Error: Image at ": lambda n, t, b: self._start_failed(b),
            "SecCoreStartupWithStack": self._sec_line,
            "DXE IPL Entry": self._dxe_ipl,
            "UEFI v": lambda n, t, b: self._banner(b),
            "UEFI Interactive Shell": lambda n, t, b: self._banner(b),
            "UEFI firmware ": lambda n, t, b: self._arm_banner(n, b),
            "add-symbol-file ": self._symbol_file,
            "PciBus: ": self._pci,
            "PCI Bus First Scanning": self._pci,
            "ResetSystem2: ": self._reset,
        }

    # -------------------------------------------------------- per line

    def feed(self, number: int, text: str) -> None:
        if "\x1b" in text:
            self.ansi = True
            text = strip_ansi(text)
        text = text.replace("\r", "")
        self.tail.append(text)
        boot = self.boot
        boot.last_line = number
        if self._dump is not None and self._dump_line(text):
            self._firmware(number, text, None)
            return
        match = _DISPATCH.search(text)
        if match is None:
            if not self._proven or _OS_LINE.match(text):
                self._other(number, text)
            return
        word = match.group(0)
        if self._proven and word in _VOCABULARY:
            # the common case, kept short: an edk2 line of no consequence
            boot.last_firmware = (number, text)
            if boot.os_lines or boot.efi_stub_exit:
                self._firmware(number, text, None)
            return
        kind = self._handle(number, word, text, text[match.start():])
        if kind is None:
            self._other(number, text)
        else:
            self._firmware(number, text, kind or None)

    def _handle(self, number: int, word: str, text: str, body: str) -> str | None:
        """Parse a dispatched line: the milestone kind it is, "" for an edk2
        line that is no milestone, None for a line that did not parse."""
        if word in _VOCABULARY:
            # checked in full only until the file has shown it is an OVMF log
            if self._proven or _EDK2_LINE.search(text):
                return ""
            return None
        handler = self._handlers.get(word)
        if handler is None:
            return self._fact(number, text)
        return handler(number, text, body)

    def _trace(self, number: int, text: str, body: str) -> str:
        boot = self.boot
        boot.trace_lines += 1
        self.trace_lines += 1
        if body.startswith("EBST ebs-return status=0x0") and body[26:27] in ("", " "):
            boot.ebs_returned = number
        elif (match := _TEARDOWN_CALL.match(body)) is not None:
            boot.teardown, boot.teardown_tpl = (number, int(match.group(1), 16)), None
        elif body.startswith("EBST ebs-callback-end"):
            boot.teardown = boot.teardown_tpl = None
        elif boot.teardown is not None and (match := _TPL_CHANGE.match(body)) is not None:
            boot.teardown_tpl = (number, match.group(1), int(match.group(2)),
                                 int(match.group(3), 16))
        return ""

    def _dxe_ipl(self, number: int, text: str, body: str) -> str:
        self.boot.phases.setdefault("DXE", number)
        return "phase"

    def _sec_line(self, number: int, text: str, body: str) -> str:
        self._sec(number)
        return "phase"

    def _symbol_file(self, number: int, text: str, body: str) -> str | None:
        if (match := _ADD_SYMBOL.match(body)) is None:
            return None
        self._identity_from_path(match.group(1))
        return ""

    def _pci(self, number: int, text: str, body: str) -> str | None:
        return "pci" if _PCI.match(body) else None

    def _reset(self, number: int, text: str, body: str) -> str | None:
        return "reset" if _RESET.search(text) else None

    def _firmware(self, number: int, text: str, milestone: str | None) -> None:
        """A line the firmware printed: evidence, the last firmware line,
        maybe a milestone; the OS has not taken over (yet, or again)."""
        boot = self.boot
        if not self._proven and all(text != seen for _, seen in self.evidence):
            self.evidence.append((number, text))
            self._proven = len(self.evidence) >= MIN_FIRMWARE_LINES
        boot.last_firmware = (number, text)
        if milestone is not None:
            boot.milestone = Milestone(number, milestone, text[:200])
        if boot.os_lines or boot.efi_stub_exit:
            boot.os_lines = 0
            boot.first_os_line = (0, "")
            boot.efi_stub_exit = 0

    def _other(self, number: int, text: str) -> None:
        """A line that is no edk2 message: the OS after the firmware, another
        program's log, or noise."""
        boot = self.boot
        if _OS_LINE.match(text):
            if boot.last_firmware[0]:
                boot.os_lines += 1
                if not boot.first_os_line[0]:
                    boot.first_os_line = (number, text[:200])
                if _EFI_STUB_EXIT.search(text):
                    boot.efi_stub_exit = number
            if (match := _OS_FACTS.search(text)) is not None and len(boot.os_says) < 8:
                boot.os_says.append((match.group(0), number))
        if self._proven:
            return      # an OVMF log: what else it looks like is never asked
        for what, pattern in _FOREIGN:
            if pattern.match(text) or (what != "a Linux kernel log" and pattern.search(text)):
                self.foreign[what] = self.foreign.get(what, 0) + 1
                break

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
        last = boot.last_image
        if last is not None and last.base == base and last.entry == entry and (
                not last.name or not name or last.name == name) \
                and boot.milestone is not None and boot.milestone.line == last.line:
            # the same load said twice (Arm's PE/COFF extra-action line, then the core's)
            last.name = last.name or name
            return
        if phase != "DXE" or "BDS" not in boot.phases:   # BDS loads the OS loader in DXE
            boot.phases.setdefault(phase, number)
        image = LoadedImage(len(boot.images) + boot.images_dropped + 1, name, base, entry,
                            number, phase)
        boot.last_image = image
        if len(boot.images) >= MAX_IMAGES:
            boot.images_dropped += 1
            return
        boot.images.append(image)
        attempt = boot.options[-1] if boot.options else None
        if phase == "DXE" and "BDS" in boot.phases and attempt is not None \
                and not attempt.image and not attempt.outcome:
            attempt.image = image.file

    def _load(self, number: int, body: str) -> str | None:
        load = symbols.parse_image_load(body, number)
        if load is None and _EDK2_LINE.match(body):      # "Loading driver <GUID>"
            return ""
        if load is not None:
            # DxeIpl loads the DXE core with a "Loading PEIM at" line
            phase = "PEI" if body.startswith("Loading PEIM") and load.name != "DxeCore" \
                else "DXE"
            self._image(number, load.name, load.base, load.entry, phase)
            return "image"
        if (nameless := _NAMELESS_LOAD.match(body)) is not None:
            base, entry = int(nameless.group(2), 16), int(nameless.group(3), 16)
            if entry < base:
                return None
            self._image(number, "", base, entry, "PEI" if nameless.group(1) == "PEIM" else "DXE")
            return "image"
        core = _DXE_CORE.match(body)
        if core is not None:
            base, entry = int(core.group(1), 16), int(core.group(2), 16)
            last = self.boot.last_image
            if entry < base or (last is not None and last.name == "DxeCore"
                                and last.base == base):
                self.boot.phases.setdefault("DXE", number)    # DxeIpl said it already
                return "phase"
            self._image(number, "DxeCore", base, entry, "DXE")
            return "image"
        return None

    def _start_failed(self, body: str) -> str | None:
        match = _START_FAILED.match(body)
        if match is None:
            return None
        base = int(match.group(1), 16)
        for image in reversed(self.boot.images):
            if image.base == base:
                image.start_failed = match.group(2).strip()
                break
        return "start-failed"

    def _add_attempt(self, attempt: BootAttempt) -> None:
        self.boot.options_dropped += _keep_last(self.boot.options, attempt, MAX_BOOTS)

    def _add_crash(self, crash: Crash) -> None:
        crash.teardown, crash.teardown_tpl = self.boot.teardown, self.boot.teardown_tpl
        self.boot.crashes_dropped += _keep_last(self.boot.crashes, crash, MAX_CRASHES)

    def _bds(self, number: int, body: str) -> str | None:
        boot = self.boot
        if body.startswith("BdsDxe: ") and _BDSDXE.match(body) is None:
            return None
        boot.phases.setdefault("BDS", number)
        if (match := _BDS_BOOTING.match(body)) is not None:
            self._close_attempt("another boot option was tried next")
            self._add_attempt(BootAttempt(number, match.group(1).strip()))
        elif (match := _BDS_EXPAND.match(body)) is not None and boot.options:
            attempt = boot.options[-1]
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
            previous = boot.options[-1] if boot.options else None
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
        return "bds"

    def _close_attempt(self, why: str) -> None:
        if self.boot.options:
            attempt = self.boot.options[-1]
            if not attempt.outcome:
                attempt.outcome = (f"{attempt.image} returned or failed; {why}" if attempt.image
                                   else f"no outcome printed; {why}")

    def _exception(self, number: int, body: str) -> str | None:
        match = _EXCEPTION.match(body)
        if match is None:
            return "" if _FIND_IMAGE.match(body) or body.startswith("!!!! Can't find") \
                else None
        self.identity.setdefault("exception_arch", match.group(1))
        last = self.boot.last_image
        crash = Crash("exception", number, f"{match.group(2)} ({match.group(3)})",
                      last_image=f"{last.file} (line {last.line})" if last else "")
        line, address = self._vc_mmio
        if line and number - line <= 2:
            crash.cause = (f"the #VC handler refused MMIO through encrypted memory at "
                           f"0x{address} (line {line}) and injected a #GP")
        self._add_crash(crash)
        self._dump, self._dump_left = crash, DUMP_LINES
        return ""

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

    def _assert(self, number: int, body: str) -> str | None:
        match = _ASSERT.match(body)
        if match is None:
            return None
        module, source, line, expression = match.groups()
        self._identity_from_path(source)
        last = self.boot.last_image
        self._add_crash(Crash(
            "assert", number, expression.strip(),
            source=f"{source}:{line}" if line else source, module=module or "",
            expression=expression.strip(),
            last_image=f"{last.file} (line {last.line})" if last else ""))
        return ""

    def _banner(self, body: str) -> str | None:
        if (match := _UEFI_BANNER.search(body)) is not None:
            self.identity.setdefault("uefi", f"UEFI {match.group(1)}, firmware vendor "
                                             f"{match.group(2)}, revision {match.group(3)}")
            return ""
        if (match := _SHELL_BANNER.search(body)) is not None:
            self.identity.setdefault("shell", match.group(1))
            return ""
        return None

    def _arm_banner(self, number: int, body: str) -> str | None:
        match = _ARM_BANNER.match(body)
        if match is None:
            return None
        self.identity.setdefault("family", "edk2-arm")
        if match.group(1) is not None:
            version = match.group(1).strip()
            self.identity.setdefault("version", version or "(empty version string)")
            self.identity.setdefault("built", match.group(2))
        self._sec(number)
        return "phase"

    def _identity_from_path(self, path: str) -> None:
        match = _BUILD_PATH.search(path)
        if match is not None:
            directory, platform, platform_arch, target, toolchain, arch = match.groups()
            self.identity.setdefault(
                "build", f"{platform} {target} build with {toolchain} for {arch} (build "
                         f"directory {directory})")
            self.identity.setdefault("build_platform", platform)
            self.identity.setdefault("build_target", target)
            self.identity.setdefault("build_toolchain", toolchain)
            self.identity.setdefault("build_arch", platform_arch or arch)
            self.identity.setdefault("build_directory", directory)
        elif (match := _SOURCE_TREE.match(path)) is not None:
            self.identity.setdefault("source", f"built from the source tree {match.group(1)}")

    def _fact(self, number: int, text: str) -> str | None:
        boot = self.boot
        for rule in FACT_RULES:
            match = rule.pattern.search(text)
            if match is None:
                continue
            boot.facts.setdefault(rule.label, (rule.say(match), number))
            for key, value in rule.values(match).items():
                if value is not None:
                    boot.values.setdefault(key, (value, number))
            if rule.label == "sev-es" and match.re.pattern.startswith("MMIO"):
                self._vc_mmio = (number, match.group(1))
            return ""
        return None


def _keep_last(items: list[_T], item: _T, cap: int) -> int:
    """Append ``item``, keeping the first ``cap`` - 1 and always the latest;
    1 when an earlier one was dropped for it."""
    if len(items) >= cap:
        items[-1] = item
        return 1
    items.append(item)
    return 0
