"""The platform facts an OVMF log states, for ``explain-log``: one rule per
wording edk2 printed a fact in (the pattern, how to say it, the typed
values of the JSON's ``facts``), applied by
:class:`harness.analysis.explain_reader.Reader` to every line that is not
one of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.logtext import SEV_MASK_RE

#: The stable keys of :attr:`Boot.values` (the JSON's ``facts``), in order.
FACT_KEYS = ("cpu_vendor", "phys_address_bits", "cpus_boot", "cpus_max", "pei_memory_kib",
             "dxe_memory_base", "dxe_memory_length", "sev_mask", "ghcb_pages",
             "vc_mmio_address", "tdx_gpaw", "tdx_shared_bit_mask", "cc_attr", "s3",
             "smbios_version", "flash_mode", "iommu_dma_pool")


def parse_int(text: str) -> int:
    return int(text, 0)


def _cpus(boot: str, most: str) -> str:
    if int(boot, 0) == 0:
        return f"boot CPU count not given, at most {int(most, 0)}"
    return f"{int(boot, 0)} at boot, at most {int(most, 0)}"


#: CONFIDENTIAL_COMPUTING_GUEST_ATTR's types (its low 16 bits).
CC_ATTR = {0: "not encrypted", 0x100: "AMD SEV", 0x101: "AMD SEV-ES", 0x102: "AMD SEV-SNP",
            0x200: "Intel TDX"}
CC_KIND = {0: "none", 0x100: "sev", 0x101: "sev-es", 0x102: "sev-snp", 0x200: "tdx"}

#: CcExitLib's #VC handler refusing MMIO through an encrypted mapping
#: (``ValidateMmioMemory``), just before it raises #GP.
VC_MMIO_REFUSED = re.compile(r"MMIO using encrypted memory: ([0-9A-Fa-f]+)")

@dataclass(frozen=True)
class FactRule:
    """One wording edk2 printed a platform fact in: the label of the text
    list, the pattern, how to say it, and the typed values (``FACT_KEYS``)
    it gives. Several rules share a label when edk2 changed its wording;
    the first line of a label in the log wins."""

    label: str
    pattern: re.Pattern[str]
    say: Callable[[re.Match[str]], str]
    values: Callable[[re.Match[str]], dict[str, Any]]


FACT_RULES: tuple[FactRule, ...] = (
    FactRule("cpu", re.compile(r"PlatformAddressWidthFromCpuid: Signature: '(\w*)', "
                                r"PhysBits: (\d+)"),
              lambda m: (f"{m[1]}, " if m[1] else "") + f"physical address width {m[2]} bits",
              lambda m: {"cpu_vendor": m[1] or None, "phys_address_bits": int(m[2])}),
    # 2022 on: PlatformMaxCpuCountInitialization; 2019-2022: m-prefixed MaxCpuCount
    FactRule("cpus", re.compile(r"MaxCpuCountInitialization: BootCpuCount=(\d+) "
                                 r"m?MaxCpuCount=(\d+)"),
              lambda m: _cpus(m[1], m[2]),
              lambda m: {"cpus_boot": int(m[1]) or None, "cpus_max": int(m[2])}),
    # 2016-2019: the count fw_cfg gave
    FactRule("cpus", re.compile(r"MaxCpuCountInitialization: QEMU reports (\d+) processor"),
              lambda m: f"{m[1]} (as QEMU reports them)",
              lambda m: {"cpus_boot": int(m[1])}),
    # TdxDxe, from the TD HOB, in hex
    FactRule("cpus", re.compile(r"MaxCpuCount=(0x[0-9A-Fa-f]+), BootCpuCount=(0x[0-9A-Fa-f]+)"),
              lambda m: _cpus(m[2], m[1]),
              lambda m: {"cpus_boot": parse_int(m[2]) or None, "cpus_max": parse_int(m[1])}),
    FactRule("cpus", re.compile(r"MpInitLib: Find (\d+) processors in system"),
              lambda m: f"{m[1]} found by MpInitLib",
              lambda m: {"cpus_boot": int(m[1])}),
    # PhysMemAddressWidth since 2022, mPhysMemAddressWidth before
    FactRule("pei memory", re.compile(r"PublishPeiMemory: m?PhysMemAddressWidth=(\d+) "
                                       r"PeiMemoryCap=(\d+) KB"),
              lambda m: f"{m[2]} KiB for PEI; physical address width {m[1]} bits",
              lambda m: {"pei_memory_kib": int(m[2]), "phys_address_bits": int(m[1])}),
    FactRule("dxe memory", re.compile(r"DxeMain: MemoryBaseAddress=(0x[0-9A-Fa-f]+) "
                                       r"MemoryLength=(0x[0-9A-Fa-f]+)"),
              lambda m: f"{m[2]} bytes at {m[1]} for DXE",
              lambda m: {"dxe_memory_base": m[1], "dxe_memory_length": m[2]}),
    FactRule("sev", SEV_MASK_RE,
              lambda m: f"enabled, encryption mask {m[1]}",
              lambda m: {"sev_mask": m[1]}),
    FactRule("sev-es", re.compile(r"SEV-ES is enabled, (\d+) GHCB pages"),
              lambda m: f"enabled ({m[1]} GHCB pages)",
              lambda m: {"ghcb_pages": int(m[1])}),
    # the #VC handler's MMIO check: #VC exists only under SEV-ES and SNP
    FactRule("sev-es", VC_MMIO_REFUSED,
              lambda m: (f"active (inferred: the #VC handler refused MMIO through encrypted "
                         f"memory at 0x{m[1]}; #VC exists only under SEV-ES and SNP)"),
              lambda m: {"vc_mmio_address": f"0x{m[1]}"}),
    # TDVF's SEC (TdxHelper, 2022 on), then the older PEI-less start line
    FactRule("tdx", re.compile(r"Intel Tdx Started with \(GPAW: (\d+), Cpus: (\d+)\)"),
              lambda m: f"TD guest: TDVF started with GPAW {m[1]}, {m[2]} CPUs",
              lambda m: {"tdx_gpaw": int(m[1]), "cpus_boot": int(m[2])}),
    FactRule("tdx", re.compile(r"Tdx started with\s?\(Hob: (0x[0-9A-Fa-f]+), "
                                r"Gpaw: (0x[0-9A-Fa-f]+|\d+), Cpus: (\d+)\)"),
              lambda m: f"TD guest: TDVF started with GPAW {parse_int(m[2])}, {m[3]} CPUs",
              lambda m: {"tdx_gpaw": parse_int(m[2]), "cpus_boot": int(m[3])}),
    FactRule("tdx shared", re.compile(r"TdxSharedBitMask=(0x[0-9A-Fa-f]+)"),
              lambda m: f"shared-bit mask {m[1]}",
              lambda m: {"tdx_shared_bit_mask": m[1]}),
    FactRule("cc attr", re.compile(r"CCAttr=(0x[0-9A-Fa-f]+)"),
              lambda m: f"{m[1]} ({CC_ATTR.get(parse_int(m[1]) & 0xFFFF, 'unknown')})",
              lambda m: {"cc_attr": m[1]}),
    FactRule("s3", re.compile(r"S3 support was detected on QEMU"), lambda m: "supported",
              lambda m: {"s3": True}),
    FactRule("smbios", re.compile(r"DetectSmbiosVersion: SMBIOS version from QEMU: "
                                   r"(0x[0-9A-Fa-f]+)"),
              lambda m: f"version {m[1]} from QEMU", lambda m: {"smbios_version": m[1]}),
    FactRule("flash", re.compile(r"QemuFlashDetected => FD behaves as (\w+)"),
              lambda m: f"pflash behaves as {m[1]}", lambda m: {"flash_mode": m[1]}),
    FactRule("dma pool", re.compile(r"InstallIoMmuProtocol: Feature of reserved memory for "
                                     r"DMA is supported"),
              lambda m: "IoMmuDxe keeps a reserved shared-memory pool for DMA bounce buffers",
              lambda m: {"iommu_dma_pool": True}),
)
