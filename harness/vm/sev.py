"""SEV guests: the modes as a registry, their QEMU object, and what
``query-sev`` and QEMU's stderr say of them.

Each SEV mode is one :class:`SevMode` of :data:`MODES`: the QOM type QEMU
makes, the accelerator it runs under, the host capability that proves it
(``harness.vm.host``), its default policy, whether KVM pins its memory,
whether the host reads its private memory as ciphertext (then the dump
checks D1 and D2 are skipped and D3 scans all RAM), and how a scenario's
label names it. :class:`SevConfig` is one guest's SEV object; the argv, the
launch checks, the host probe, the scenarios and the command line's choices
all read the mode from here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from harness.vm import limits

# SEV guest policy bits (AMD SEV API specification, "Guest Policy").
POLICY_NODBG = 0x01     #: debugging of the guest is disallowed
POLICY_NOKS = 0x02      #: sharing keys with other guests is disallowed
POLICY_ES = 0x04        #: SEV-ES is required
POLICY_NOSEND = 0x08    #: sending the guest to another platform is disallowed
POLICY_DOMAIN = 0x10    #: the guest must not leave the domain
POLICY_SEV = 0x20       #: the guest must not be sent to a non-SEV platform

#: SEV-SNP guest policy (SNP firmware ABI, "Guest Policy"): bit 16 SMT
#: allowed, bit 17 reserved and must be 1 (QEMU's default too).
SNP_POLICY_DEFAULT = 0x30000

#: The CPU of an emulated-SEV guest: TCG's default model, plus RDRAND, which
#: every SEV-capable processor has and Linux's early SEV code uses (its
#: C-bit check, sev_verify_cbit, draws a random value with it).
EMULATED_SEV_CPU = "qemu64,+rdrand"
#: The CPU of an emulated-SNP guest: the same, with its basic CPUID leaves
#: ending at 0xC. Linux's SNP CPUID code refuses a leaf 0xD subleaf 1
#: without XSAVEC or XSAVES (SNP hardware has both); TCG has neither, and a
#: leaf beyond the maximum is one the guest takes for all zero unchecked.
EMULATED_SNP_CPU = "qemu64,+rdrand,level=0xc"

@dataclass(frozen=True)
class SevMode:
    """One way to run a SEV guest.

    :param name: the mode's name (``--sev`` takes it).
    :param qom_type: QEMU's confidential-guest object.
    :param accel: the accelerator it runs under.
    :param capability: the :class:`~harness.vm.host.HostCaps` field that
        proves this host can run it.
    :param emulated: QEMU emulates it under TCG, memory in plaintext
        (``query-sev`` says ``emulated``).
    :param es: the guest state is encrypted (policy bit ES).
    :param snp: SEV-SNP: a u64 policy, a memfd memory backend, the firmware
        as one ``-bios`` image (KVM's SNP VM type has no read-only memory
        slots for pflash), ``query-sev`` of QEMU >= 9.1.
    :param pins_memory: KVM pins the guest's RAM: the locked-memory limit
        must cover it.
    :param cpu: the ``-cpu`` model of its guests.
    :param max_smp: the most vCPUs its guests may have.
    :param stops_on: edk2 baselines whose OVMF does not boot in this mode,
        each with why: ``(baseline, why)``.
    :param label: how a scenario's label names it.
    :param about: one line for help texts.
    """

    name: str
    qom_type: str
    accel: str
    capability: str
    emulated: bool = False
    es: bool = False
    snp: bool = False
    pins_memory: bool = False
    cpu: str = "host"
    max_smp: int = 288
    stops_on: tuple[tuple[str, str], ...] = ()
    label: str = ""
    about: str = ""

    @property
    def encrypted(self) -> bool:
        """The host reads the guest's private memory as ciphertext."""
        return not self.emulated

    def stops(self, baseline: str) -> str | None:
        """Why OVMF of edk2 ``baseline`` does not boot in this mode, or None."""
        return dict(self.stops_on).get(baseline)

    @property
    def default_policy(self) -> int:
        if self.snp:
            return SNP_POLICY_DEFAULT
        base = POLICY_NODBG | POLICY_NOKS
        return base | POLICY_ES if self.es else base


MODES: Mapping[str, SevMode] = {mode.name: mode for mode in (
    SevMode("sev", "sev-guest", "kvm", "sev", pins_memory=True, label="sev",
            about="a SEV guest under KVM (a SEV host)"),
    SevMode("sev-es", "sev-guest", "kvm", "sev_es", es=True, pins_memory=True, label="sev-es",
            about="a SEV-ES guest under KVM (a SEV host)"),
    SevMode("snp", "sev-snp-guest", "kvm", "snp", es=True, snp=True, label="snp",
            about="a SEV-SNP guest under KVM (a SEV-SNP host, QEMU >= 9.1)"),
    SevMode("emulated", "sev-emulated", "tcg", "sev_emulated", emulated=True,
            cpu=EMULATED_SEV_CPU, label="emulated-sev",
            about="the harness's QEMU emulates plain SEV under TCG (built on first use)"),
    # SEV-ES starts APs from a save area the guest sets up: not emulated.
    SevMode("emulated-es", "sev-emulated", "tcg", "sev_es_emulated", emulated=True, es=True,
            cpu=EMULATED_SEV_CPU, max_smp=1, label="emulated-sev-es",
            stops_on=(("2022.11", ("edk2 2022.11's OVMF stops in PEI under the emulated SEV-ES "
                                   "(PeiCore reads its private data through a pointer converted "
                                   "twice after temporary-RAM migration; docs/emulated-sev.md)")),),
            about=("the harness's QEMU emulates SEV-ES under TCG: #VC and the GHCB, one vCPU "
                   "(built on first use)")),
    # SNP is SEV-ES's path and more: 2022.11's OVMF stops where it stops there.
    SevMode("emulated-snp", "sev-emulated", "tcg", "snp_emulated", emulated=True, es=True,
            snp=True, cpu=EMULATED_SNP_CPU, max_smp=1, label="emulated-snp",
            stops_on=(("2022.11", ("edk2 2022.11's OVMF stops in PEI under the emulated SEV-ES, "
                                   "on which SNP builds (docs/emulated-sev.md)")),),
            about=("the harness's QEMU emulates SEV-SNP under TCG: page states, PVALIDATE, "
                   "a launch from the firmware's SEV metadata, one vCPU (built on first use)")),
)}
#: ``off`` and every mode of :data:`MODES`.
SEV_MODES = ("off", *MODES)


#: The values of ``sev-emulated``'s ``x-vc-mismatch`` ("": off).
VC_MISMATCHES = ("", "ioio", "cpuid")


@dataclass(frozen=True)
class SevConfig:
    """The SEV object: mode, C-bit, reduced physical bits, policy.

    ``sev`` and ``sev-es`` are QEMU's ``sev-guest`` under KVM, whose
    ``cbitpos`` and ``reduced_phys_bits`` must match the host (QMP
    ``query-sev-capabilities``); ``snp`` is ``sev-snp-guest`` (QEMU >= 9.1),
    whose memory is a memfd backend and whose firmware is one ``-bios``
    image (KVM's SNP VM type has no read-only memory slots for pflash);
    ``emulated``, ``emulated-es`` and ``emulated-snp`` are ``sev-emulated``
    under TCG, plain SEV, SEV-ES (the policy's ES bit; one vCPU) and SEV-SNP
    (``snp=on``, a u64 ``snp-policy``; one vCPU, one ``-bios`` image).
    ``policy`` defaults to NODBG|NOKS, plus ES for SEV-ES, and to
    :data:`SNP_POLICY_DEFAULT` for SNP; an explicit SEV policy must agree with
    the mode about ES.
    """

    mode: str
    cbitpos: int
    reduced_phys_bits: int
    policy: int | None = None
    #: A negative control of the emulated SEV-ES (``x-vc-mismatch``):
    #: ``ioio`` or ``cpuid``, the instruction whose #VC carries the other's
    #: exit code, which the guest's #VC handler must refuse; "" for none.
    vc_mismatch: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SEV mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.vc_mismatch not in VC_MISMATCHES:
            raise ValueError(f"vc_mismatch {self.vc_mismatch!r}: one of ioio, cpuid, or ''")
        if self.vc_mismatch and not (self.kind.emulated and self.kind.es):
            raise ValueError(f"vc_mismatch: a switch of the emulated SEV-ES, not of {self.mode}")
        if not 32 <= self.cbitpos <= 63:
            raise ValueError(f"cbitpos {self.cbitpos}: not in 32..63")
        if not 1 <= self.reduced_phys_bits <= 63:
            # QEMU's sev-guest refuses 0 ("it should be >=1"), as does ours.
            raise ValueError(f"reduced-phys-bits {self.reduced_phys_bits}: not in 1..63")
        if self.policy is not None and self.kind.snp:
            if not 0 <= self.policy < 1 << 64 or not self.policy & (1 << 17):
                raise ValueError(f"SNP policy {self.policy:#x}: a u64 with bit 17 set")
        elif self.policy is not None:
            if not 0 <= self.policy <= 0xFFFFFFFF:
                raise ValueError(f"policy {self.policy:#x}: not a u32")
            if bool(self.policy & POLICY_ES) != self.kind.es:
                raise ValueError(
                    f"policy {self.policy:#x}: the ES bit (0x4) must be "
                    f"{'set' if self.kind.es else 'clear'} for {self.mode}")

    @property
    def kind(self) -> SevMode:
        return MODES[self.mode]

    @property
    def emulated(self) -> bool:
        return self.kind.emulated

    @property
    def accel(self) -> str:
        """The accelerator this mode runs under."""
        return self.kind.accel

    @property
    def qom_type(self) -> str:
        return self.kind.qom_type

    @property
    def snp(self) -> bool:
        return self.kind.snp

    @property
    def pins_memory(self) -> bool:
        """KVM pins this guest's RAM: the locked-memory limit must cover it."""
        return self.kind.pins_memory

    @property
    def effective_policy(self) -> int:
        return self.kind.default_policy if self.policy is None else self.policy

    @property
    def cbit_mask(self) -> int:
        return 1 << self.cbitpos


#: What QEMU 7.2's ``target/i386/sev.c`` prints when a SEV launch fails, and
#: what to do about it: ``(pattern, reason)``.
SEV_LAUNCH_FAILURES: tuple[tuple[str, str], ...] = (
    (r"failed to register region .*Cannot allocate memory",
     "KVM could not pin the guest's memory: RLIMIT_MEMLOCK is too low for this user; "
     + limits.HOW_TO_GRANT),
    (r"Failed to open /dev/sev 'Permission denied'",
     ("/dev/sev is not read/writable by this user: add the user to the group that owns "
      "/dev/sev (or run as root)")),
    (r"Failed to open /dev/sev",
     "/dev/sev cannot be opened: is the ccp driver loaded with the PSP firmware?"),
    (r"failed to initialize ret=-16",
     ("KVM_SEV_INIT got EBUSY: no free SEV ASID (all in use by other guests, or the BIOS "
      "reserves none for this kind: check the SEV / SEV-ES ASID settings)")),
    (r"failed to initialize ret=",
     "KVM_SEV_INIT failed: the SEV firmware refused the guest (see QEMU's message)"),
    (r"host SEV-ES support unavailable",
     "the SEV firmware has no SEV-ES (CONFIG_ES): update the PSP firmware, or run plain SEV"),
    (r"SEV-ES guests require in-kernel irqchip",
     "SEV-ES needs KVM's in-kernel irqchip (do not pass kernel-irqchip=off)"),
    (r"cbitpos check failed",
     "the sev-guest cbitpos does not match the host's C-bit (query-sev-capabilities)"),
    (r"reduced_phys_bits check failed",
     "reduced-phys-bits must be at least 1"),
)


def sev_launch_reason(stderr: str) -> str | None:
    """The remedy for a SEV launch QEMU refused, from its stderr, or None."""
    for pattern, reason in SEV_LAUNCH_FAILURES:
        if re.search(pattern, stderr):
            return reason
    return None


#: How the harness's QEMU ends a SEV-ES guest that cannot go on (a GHCB
#: termination request with its reason set and code, a #VC the guest's
#: handler refused, a bad GHCB): one line on stderr, then a guest panic.
SEV_ES_TERMINATED_RE = re.compile(r"sev-es: (.+); the guest is terminated")


def sev_es_termination(stderr: str) -> str | None:
    """Why the emulated SEV-ES ended the guest, from QEMU's stderr, or None."""
    found = SEV_ES_TERMINATED_RE.search(stderr)
    return f"SEV-ES guest terminated: {found[1]}" if found else None


#: ``query-sev`` ``state`` before ``cont`` and after: QEMU 7.2 measures the
#: launch when the machine is created (``sev_launch_get_measure``:
#: launch-secret) and finishes it when the guest first runs
#: (``sev_launch_finish``: running); the emulated SEV keeps the same states.
SEV_STATE_PAUSED = "launch-secret"
SEV_STATE_RUNNING = "running"


def sev_info_problem(info: Mapping[str, Any], policy: int, *, emulated: bool = False,
                     state: str | None = None, snp: bool = False) -> str | None:
    """Why a ``query-sev`` reply (QAPI ``SevInfo``) is not SEV with ``policy``.

    None when ``enabled`` is true, the policy matches, the launch is in
    ``state`` (when given), and the reply's ``emulated`` mark (the harness's
    QEMU; absent in other QEMUs, meaning false) is what was asked: a real SEV
    test never runs on an emulation, and an emulated one never on a plain
    guest. ``snp``: QEMU 9.1's reply (``sev-type`` ``sev-snp`` and its
    ``snp-policy``).
    """
    if not info.get("enabled"):
        return "query-sev says enabled=false"
    if state is not None and info.get("state") != state:
        return f"query-sev state {info.get('state')!r}, expected {state!r}"
    if snp and info.get("sev-type") != "sev-snp":
        # QEMU >= 9.1: SevInfo is a union on sev-type; SNP's policy is a u64.
        return f"query-sev sev-type {info.get('sev-type')!r}, expected 'sev-snp'"
    key = "snp-policy" if snp else "policy"
    got = info.get(key)
    if got != policy:
        shown = f"{got:#x}" if isinstance(got, int) else repr(got)
        return f"query-sev {key} {shown}, expected {policy:#x}"
    is_emulated = bool(info.get("emulated", False))
    if not emulated and not is_emulated and (info.get("api-major"), info.get("api-minor")) \
            == (0, 0):
        return "query-sev says SEV API 0.0: no SEV firmware answered the launch"
    if is_emulated != emulated:
        return ("query-sev says the SEV is emulated (sev-emulated), not real"
                if is_emulated else "query-sev does not say emulated=true")
    return None
