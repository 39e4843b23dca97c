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

import html
import re
from collections import deque
from collections.abc import Callable
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
#: Distinct edk2 lines a file needs to be read as an OVMF log: one line in
#: common with edk2's vocabulary is chance, two distinct ones are a firmware.
MIN_FIRMWARE_LINES = 2

_ANSI = re.compile(r"\x1b\[[0-9;?=]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b")

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

#: The stable keys of :attr:`Boot.values` (the JSON's ``facts``), in order.
FACT_KEYS = ("cpu_vendor", "phys_address_bits", "cpus_boot", "cpus_max", "pei_memory_kib",
             "dxe_memory_base", "dxe_memory_length", "sev_mask", "ghcb_pages",
             "vc_mmio_address", "tdx_gpaw", "tdx_shared_bit_mask", "cc_attr", "s3",
             "smbios_version", "flash_mode", "iommu_dma_pool")


def _int(text: str) -> int:
    return int(text, 0)


def _cpus(boot: str, most: str) -> str:
    if int(boot, 0) == 0:
        return f"boot CPU count not given, at most {int(most, 0)}"
    return f"{int(boot, 0)} at boot, at most {int(most, 0)}"


#: CONFIDENTIAL_COMPUTING_GUEST_ATTR's types (its low 16 bits).
_CC_ATTR = {0: "not encrypted", 0x100: "AMD SEV", 0x101: "AMD SEV-ES", 0x102: "AMD SEV-SNP",
            0x200: "Intel TDX"}
_CC_KIND = {0: "none", 0x100: "sev", 0x101: "sev-es", 0x102: "sev-snp", 0x200: "tdx"}

@dataclass(frozen=True)
class _FactRule:
    """One wording edk2 printed a platform fact in: the label of the text
    list, the pattern, how to say it, and the typed values (``FACT_KEYS``)
    it gives. Several rules share a label when edk2 changed its wording;
    the first line of a label in the log wins."""

    label: str
    pattern: re.Pattern[str]
    say: Callable[[re.Match[str]], str]
    values: Callable[[re.Match[str]], dict[str, Any]]


_FACT_RULES: tuple[_FactRule, ...] = (
    _FactRule("cpu", re.compile(r"PlatformAddressWidthFromCpuid: Signature: '(\w*)', "
                                r"PhysBits: (\d+)"),
              lambda m: (f"{m[1]}, " if m[1] else "") + f"physical address width {m[2]} bits",
              lambda m: {"cpu_vendor": m[1] or None, "phys_address_bits": int(m[2])}),
    # 2022 on: PlatformMaxCpuCountInitialization; 2019-2022: m-prefixed MaxCpuCount
    _FactRule("cpus", re.compile(r"MaxCpuCountInitialization: BootCpuCount=(\d+) "
                                 r"m?MaxCpuCount=(\d+)"),
              lambda m: _cpus(m[1], m[2]),
              lambda m: {"cpus_boot": int(m[1]) or None, "cpus_max": int(m[2])}),
    # 2016-2019: the count fw_cfg gave
    _FactRule("cpus", re.compile(r"MaxCpuCountInitialization: QEMU reports (\d+) processor"),
              lambda m: f"{m[1]} (as QEMU reports them)",
              lambda m: {"cpus_boot": int(m[1])}),
    # TdxDxe, from the TD HOB, in hex
    _FactRule("cpus", re.compile(r"MaxCpuCount=(0x[0-9A-Fa-f]+), BootCpuCount=(0x[0-9A-Fa-f]+)"),
              lambda m: _cpus(m[2], m[1]),
              lambda m: {"cpus_boot": _int(m[2]) or None, "cpus_max": _int(m[1])}),
    _FactRule("cpus", re.compile(r"MpInitLib: Find (\d+) processors in system"),
              lambda m: f"{m[1]} found by MpInitLib",
              lambda m: {"cpus_boot": int(m[1])}),
    # PhysMemAddressWidth since 2022, mPhysMemAddressWidth before
    _FactRule("pei memory", re.compile(r"PublishPeiMemory: m?PhysMemAddressWidth=(\d+) "
                                       r"PeiMemoryCap=(\d+) KB"),
              lambda m: f"{m[2]} KiB for PEI; physical address width {m[1]} bits",
              lambda m: {"pei_memory_kib": int(m[2]), "phys_address_bits": int(m[1])}),
    _FactRule("dxe memory", re.compile(r"DxeMain: MemoryBaseAddress=(0x[0-9A-Fa-f]+) "
                                       r"MemoryLength=(0x[0-9A-Fa-f]+)"),
              lambda m: f"{m[2]} bytes at {m[1]} for DXE",
              lambda m: {"dxe_memory_base": m[1], "dxe_memory_length": m[2]}),
    _FactRule("sev", re.compile(r"SEV is enabled \(mask (0x[0-9A-Fa-f]+)\)"),
              lambda m: f"enabled, encryption mask {m[1]}",
              lambda m: {"sev_mask": m[1]}),
    _FactRule("sev-es", re.compile(r"SEV-ES is enabled, (\d+) GHCB pages"),
              lambda m: f"enabled ({m[1]} GHCB pages)",
              lambda m: {"ghcb_pages": int(m[1])}),
    # the #VC handler's MMIO check: #VC exists only under SEV-ES and SNP
    _FactRule("sev-es", re.compile(r"MMIO using encrypted memory: ([0-9A-Fa-f]+)"),
              lambda m: (f"active (inferred: the #VC handler refused MMIO through encrypted "
                         f"memory at 0x{m[1]}; #VC exists only under SEV-ES and SNP)"),
              lambda m: {"vc_mmio_address": f"0x{m[1]}"}),
    # TDVF's SEC (TdxHelper, 2022 on), then the older PEI-less start line
    _FactRule("tdx", re.compile(r"Intel Tdx Started with \(GPAW: (\d+), Cpus: (\d+)\)"),
              lambda m: f"TD guest: TDVF started with GPAW {m[1]}, {m[2]} CPUs",
              lambda m: {"tdx_gpaw": int(m[1]), "cpus_boot": int(m[2])}),
    _FactRule("tdx", re.compile(r"Tdx started with\s?\(Hob: (0x[0-9A-Fa-f]+), "
                                r"Gpaw: (0x[0-9A-Fa-f]+|\d+), Cpus: (\d+)\)"),
              lambda m: f"TD guest: TDVF started with GPAW {_int(m[2])}, {m[3]} CPUs",
              lambda m: {"tdx_gpaw": _int(m[2]), "cpus_boot": int(m[3])}),
    _FactRule("tdx shared", re.compile(r"TdxSharedBitMask=(0x[0-9A-Fa-f]+)"),
              lambda m: f"shared-bit mask {m[1]}",
              lambda m: {"tdx_shared_bit_mask": m[1]}),
    _FactRule("cc attr", re.compile(r"CCAttr=(0x[0-9A-Fa-f]+)"),
              lambda m: f"{m[1]} ({_CC_ATTR.get(_int(m[1]) & 0xFFFF, 'unknown')})",
              lambda m: {"cc_attr": m[1]}),
    _FactRule("s3", re.compile(r"S3 support was detected on QEMU"), lambda m: "supported",
              lambda m: {"s3": True}),
    _FactRule("smbios", re.compile(r"DetectSmbiosVersion: SMBIOS version from QEMU: "
                                   r"(0x[0-9A-Fa-f]+)"),
              lambda m: f"version {m[1]} from QEMU", lambda m: {"smbios_version": m[1]}),
    _FactRule("flash", re.compile(r"QemuFlashDetected => FD behaves as (\w+)"),
              lambda m: f"pflash behaves as {m[1]}", lambda m: {"flash_mode": m[1]}),
    _FactRule("dma pool", re.compile(r"InstallIoMmuProtocol: Feature of reserved memory for "
                                     r"DMA is supported"),
              lambda m: "IoMmuDxe keeps a reserved shared-memory pool for DMA bounce buffers",
              lambda m: {"iommu_dma_pool": True}),
)

#: Drivers whose failure to start says what the guest is not.
_PLATFORM_DRIVERS = {
    "AmdSevDxe": ("sev", "AmdSevDxe did not start ({status}): not a SEV guest"),
    "TdxDxe": ("tdx", "TdxDxe did not start ({status}): not a TDX guest"),
}

#: The kinds of :attr:`LogEnd.kind` (the JSON's ``end.kind``).
END_KINDS = ("crash", "handed-off", "reset", "boot-option", "hang-in-image", "stopped",
             "unknown")

#: The confidential-computing kinds (the JSON's ``confidential.kind``), weakest first.
CONFIDENTIAL_KINDS = ("none", "sev", "sev-es", "sev-snp", "tdx")

#: What the firmware was doing when a line of this kind was its last milestone.
_ACTIVITY = {"pci": "while the PCI bus was being enumerated", "bds": "while BDS was at work",
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
    boots: list[BootAttempt] = field(default_factory=list)
    crashes: list[Crash] = field(default_factory=list)
    facts: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: FACT_KEYS -> (value, line).
    values: dict[str, tuple[Any, int]] = field(default_factory=dict)
    #: What the OS said about the guest after the hand-off: (what, line).
    os_says: list[tuple[str, int]] = field(default_factory=list)
    trace_lines: int = 0
    #: The last image loaded (listed or not: :data:`MAX_IMAGES`).
    last_image: LoadedImage | None = None
    boots_dropped: int = 0
    crashes_dropped: int = 0
    #: The line of a successful ExitBootServices() return (the harness's trace).
    ebs_returned: int = 0
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
            text = _ANSI.sub("", text)
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
        attempt = boot.boots[-1] if boot.boots else None
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
        self.boot.boots_dropped += _keep_last(self.boot.boots, attempt, MAX_BOOTS)

    def _add_crash(self, crash: Crash) -> None:
        self.boot.crashes_dropped += _keep_last(self.boot.crashes, crash, MAX_CRASHES)

    def _bds(self, number: int, body: str) -> str | None:
        boot = self.boot
        if body.startswith("BdsDxe: ") and _BDSDXE.match(body) is None:
            return None
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
        return "bds"

    def _close_attempt(self, why: str) -> None:
        if self.boot.boots:
            attempt = self.boot.boots[-1]
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
        for rule in _FACT_RULES:
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
    _gate(path, reader, number)
    boot = reader.boot
    if boot.boots:
        attempt = boot.boots[-1]
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
    for dropped, what, cap in ((boot.boots_dropped, "boot attempts", MAX_BOOTS),
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


def _gate(path: Path, reader: _Reader, lines: int) -> None:
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


def _firmware_keys(reader: _Reader, boot: Boot) -> dict[str, str | None]:
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


def _identity(reader: _Reader, boot: Boot, firmware: dict[str, str | None]) -> tuple[str, ...]:
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
        kind = _CC_KIND.get(_int(attr) & 0xFFFF)
        if kind is not None:
            evidence.append((kind, line, f"CCAttr={attr} ({_CC_ATTR[_int(attr) & 0xFFFF]})"))
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
        refused = {_PLATFORM_DRIVERS[i.name][0]: i for i in boot.images
                   if i.name in _PLATFORM_DRIVERS and i.start_failed}
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
        known = _PLATFORM_DRIVERS.get(image.name)
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


def _end(boot: Boot, reader: _Reader, lines: int, cut: bool) -> LogEnd:
    """Where and how the log ends: from its last milestone and what came
    after the firmware's last line, not from its last image load."""
    tail = tuple(reader.tail)
    last_crash = boot.crashes[-1] if boot.crashes else None
    last_image = boot.last_image
    milestone = boot.milestone
    attempt = boot.boots[-1] if boot.boots else None

    def end(kind: str, summary: str) -> LogEnd:
        if cut:
            summary += f"; its last line ({lines}) is cut in the middle: {tail[-1][-80:]!r}"
        return LogEnd(lines, cut, tail, summary, kind, boot.phase, milestone,
                      (boot.last_firmware[0], boot.last_firmware[1][:200]))

    if last_crash is not None and (milestone is None or last_crash.line > milestone.line):
        if last_crash.kind == "exception":
            return end("crash", f"the log ends after a CPU exception {last_crash.summary} at "
                       f"line {last_crash.line}"
                       + (f" in {last_crash.function}" if last_crash.function else "")
                       + (f" ({last_crash.source})" if last_crash.source else "")
                       + (f"; {last_crash.cause}" if last_crash.cause else ""))
        return end("crash", f"the log ends after an ASSERT at line {last_crash.line}: "
                   f"{last_crash.source}: {last_crash.expression}")
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
        activity = _ACTIVITY.get(milestone.kind, "")
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


# ------------------------------------------------------------ rendering


def _hex(value: int | None) -> str:
    return "" if value is None else f"{value:#x}"


def _crash_json(crash: Crash) -> dict[str, Any]:
    return {"kind": crash.kind, "line": crash.line, "summary": crash.summary,
            "rip": _hex(crash.rip), "where": crash.where, "source": crash.source,
            "module_path": crash.module_path, "module": crash.module,
            "functions": list(crash.functions), "function": crash.function,
            "expression": crash.expression, "last_image": crash.last_image,
            "error_code": crash.error_code, "cause": crash.cause,
            "registers": {k: _hex(v) for k, v in crash.registers.items()}}


def to_json(exp: Explanation) -> dict[str, Any]:
    """The explanation as JSON. ``firmware``, ``facts``, ``confidential``,
    ``end`` and ``crash`` have the stable keys of docs/explain-log.md (every
    key always there, null when the log does not say) for scripts and the
    nightly; the other keys mirror the text."""
    boot = exp.boot
    cc = confidential(boot)
    last_crash = boot.crashes[-1] if boot.crashes else None
    milestone = exp.end.milestone
    return {
        "log": exp.path, "lines": exp.lines, "crlf": exp.crlf, "ansi": exp.ansi,
        "identity": list(exp.identity),
        "firmware": dict(exp.firmware),
        "facts": {key: ({"value": boot.values[key][0], "line": boot.values[key][1]}
                        if key in boot.values else {"value": None, "line": None})
                  for key in FACT_KEYS},
        "confidential": {"kind": cc.kind,
                         "evidence": [{"says": what, "line": line} for what, line in cc.evidence]},
        "platform": [{"fact": f, "value": v, "line": n} for f, v, n in platform_facts(boot)],
        "phases": [{"phase": phase, "line": boot.phases[phase]} for phase in PHASES
                   if phase in boot.phases],
        "images": [{"order": i.order, "name": i.name, "file": i.file, "base": _hex(i.base),
                    "entry": _hex(i.entry), "line": i.line, "phase": i.phase,
                    "start_failed": i.start_failed} for i in boot.images],
        "images_not_listed": boot.images_dropped,
        "boot_options": [{"line": a.line, "option": a.option, "description": a.description,
                          "device_path": a.device_path, "image": a.image,
                          "outcome": a.outcome} for a in boot.boots],
        "crashes": [_crash_json(c) for c in boot.crashes],
        "crash": None if last_crash is None else
        dict(_crash_json(last_crash), ended_log=exp.end.kind == "crash"),
        "earlier_runs": list(exp.earlier_boots),
        "end": {"kind": exp.end.kind, "phase": exp.end.phase, "summary": exp.end.summary,
                "cut_mid_line": exp.end.cut_mid_line,
                "milestone": None if milestone is None else
                {"line": milestone.line, "kind": milestone.kind, "text": milestone.text},
                "last_firmware_line": exp.end.last_firmware[0] or None,
                "last_firmware_text": exp.end.last_firmware[1] or None,
                "os_lines": boot.os_lines,
                "last_image": None if boot.last_image is None else
                {"file": boot.last_image.file, "line": boot.last_image.line},
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
                       f"{image.entry:>#12x} {image.line:>7}  {image.file}{status}")
    else:
        out += [f"  #{i.order} {i.file} (line {i.line}): start failed: {i.start_failed}"
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
    if crash.cause:
        lines.append(f"  cause: {crash.cause}")
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
                         f"<td>{esc(image.file)}</td><td class=mono>{image.base:#x}</td>"
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
                       f'#{image.order} {html.escape(image.file)} {image.base:#x}'
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
