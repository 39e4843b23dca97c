"""What this host can run: QEMU, TCG, KVM, SEV, SEV-ES, SEV-SNP.

Every capability is proven, not assumed, and comes with its reason:

- **TCG**: QEMU runs the firmware under TCG for a moment without error.
- **KVM**: QEMU boots the firmware under KVM to its first serial output.
  ``/dev/kvm`` can exist and still be useless for firmware (a paravirtual KVM
  that cannot emulate real-mode code stops the guest with "KVM internal
  error ... emulation failure"), so a ``stat`` proves nothing.
- **emulated SEV**: QEMU has the ``sev-emulated`` object type, and its
  ``cbitpos`` and ``reduced-phys-bits`` defaults (QMP ``qom-list-properties``
  under TCG; the harness's QEMU, ``ebs-harness build-qemu``, has it; other
  QEMUs have no such class). ``query-sev-capabilities`` is not asked: it
  describes a host's SEV firmware, and fails under TCG.
- **SEV / SEV-ES / SNP**: the ``kvm_amd`` module parameters ``sev``,
  ``sev_es``, ``sev_snp`` (``Y``/``N`` or ``1``/``0``), ``/dev/sev``, CPUID
  leaf 0x8000001F (``/dev/cpu/0/cpuid``, else the ``sev``/``sev_es``/
  ``sev_snp`` flags of ``/proc/cpuinfo``), usable KVM, and QMP
  ``query-sev-capabilities`` (which gives ``cbitpos`` and
  ``reduced-phys-bits`` for the ``sev-guest`` object). SNP also needs a QEMU
  with ``sev-snp-guest``, which QEMU 7.2 does not have.

The parsers are pure functions of text or of a file tree (``root``), so
they are tested on fabricated trees. :func:`probe` runs everything, or
(``tcg_only``, for a command that runs under TCG) everything but KVM and
what needs it; :func:`cached_probe` keeps one result per process and, for a
few minutes, on disk.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.build.cache import cache_root, identity, remembered
from harness.errors import HarnessError, LaunchError, QmpError, SettingError
from harness.tools import scratch
from harness.vm import limits
from harness.vm.config import MachineConfig
from harness.vm.machine import QemuMachine
from harness.vm.runner import LocalRunner, Runner
from harness.vm.sev import MODES, SEV_MODES, SevConfig, SevMode

LOG = logging.getLogger(__name__)

DEFAULT_QEMU = "qemu-system-x86_64"
STOCK_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
STOCK_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
KVM_AMD_PARAMS = Path("sys/module/kvm_amd/parameters")
SEV_LEAF = 0x8000001F


@dataclass(frozen=True)
class Capability:
    """One yes/no answer and why."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


# ------------------------------------------------------- pure parsers


def parse_module_flag(text: str) -> bool:
    """A boolean module parameter as sysfs shows it: ``Y``/``N`` or ``1``/``0``."""
    value = text.strip()
    if value in ("Y", "y", "1"):
        return True
    if value in ("N", "n", "0"):
        return False
    raise ValueError(f"not a boolean module parameter: {value!r}")


def read_kvm_amd_params(root: Path = Path("/")) -> dict[str, bool | None] | None:
    """``sev``, ``sev_es``, ``sev_snp`` of kvm_amd (None: that file is missing).

    :returns: None when kvm_amd is not loaded (no parameters directory).
    """
    params = root / KVM_AMD_PARAMS
    if not params.is_dir():
        return None
    found: dict[str, bool | None] = {}
    for name in ("sev", "sev_es", "sev_snp"):
        try:
            found[name] = parse_module_flag((params / name).read_text())
        except (OSError, ValueError) as exc:
            LOG.debug("kvm_amd %s: %s", name, exc)
            found[name] = None
    return found


@dataclass(frozen=True)
class SevCpuid:
    """CPUID Fn8000_001F (AMD memory encryption), EAX and EBX."""

    sme: bool
    sev: bool
    sev_es: bool
    snp: bool
    cbitpos: int
    reduced_phys_bits: int


def parse_cpuid_8000001f(eax: int, ebx: int) -> SevCpuid:
    """Decode Fn8000_001F: EAX bit 0 SME, 1 SEV, 3 SEV-ES, 4 SNP; EBX[5:0] the
    C-bit position, EBX[11:6] the physical address bits lost."""
    return SevCpuid(sme=bool(eax & 1), sev=bool(eax & 2), sev_es=bool(eax & 8),
                    snp=bool(eax & 16), cbitpos=ebx & 0x3F,
                    reduced_phys_bits=(ebx >> 6) & 0x3F)


def read_cpuid(root: Path, leaf: int) -> tuple[int, int, int, int] | None:
    """EAX..EDX of ``leaf`` on CPU 0 via the cpuid driver, None if unreadable."""
    try:
        fd = os.open(root / "dev/cpu/0/cpuid", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, 16, leaf)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) != 16:
        return None
    eax, ebx, ecx, edx = struct.unpack("<4I", data)
    return eax, ebx, ecx, edx


def read_sev_cpuid(root: Path = Path("/")) -> SevCpuid | None:
    """Leaf 0x8000001F, or None if the cpuid driver is absent or the leaf is
    beyond the CPU's maximum extended leaf."""
    top = read_cpuid(root, 0x80000000)
    if top is None:
        return None
    if top[0] < SEV_LEAF:
        return parse_cpuid_8000001f(0, 0)
    regs = read_cpuid(root, SEV_LEAF)
    return None if regs is None else parse_cpuid_8000001f(regs[0], regs[1])


def parse_cpuinfo_flags(text: str) -> frozenset[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo``."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@dataclass(frozen=True)
class SevCapabilities:
    """QMP ``query-sev-capabilities`` (QAPI ``SevCapability``), the parts used.

    :param emulated: the harness's QEMU under TCG: SEV can only be emulated.
    :param es: the emulation has SEV-ES too (the ES bit of its policy).
    :param snp: the emulation has SEV-SNP too (its ``snp`` property).
    """

    cbitpos: int
    reduced_phys_bits: int
    emulated: bool = False
    es: bool = False
    snp: bool = False


def parse_sev_capabilities(reply: Mapping[str, Any]) -> SevCapabilities:
    """The ``return`` of ``query-sev-capabilities`` (or the whole response)."""
    body = reply.get("return", reply)
    if "error" in reply:
        error = reply["error"]
        raise ValueError(f"{error.get('class')}: {error.get('desc')}")
    try:
        cbitpos, reduced = body["cbitpos"], body["reduced-phys-bits"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a SevCapability: {reply!r}") from exc
    if not isinstance(cbitpos, int) or not isinstance(reduced, int):
        raise ValueError(  # noqa: TRY004 - a bad reply, as above
            f"cbitpos/reduced-phys-bits are not integers: {reply!r}")
    if not 32 <= cbitpos <= 63 or not 1 <= reduced <= 63:
        # What sev-guest would refuse: no launch could follow this answer.
        raise ValueError(f"cbitpos {cbitpos} / reduced-phys-bits {reduced}: not a C-bit in "
                         "32..63 and a reduction in 1..63")
    return SevCapabilities(cbitpos=cbitpos, reduced_phys_bits=reduced,
                           emulated=body.get("emulated") is True)


def parse_qemu_version(text: str) -> str:
    """``7.2.22`` from ``qemu-system-x86_64 --version``'s first line."""
    match = re.search(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)", text)
    if not match:
        raise ValueError(f"not QEMU's --version output: {text.strip()[:80]!r}")
    return match.group(1)


def qemu_has_snp(version: str) -> bool:
    """QEMU has ``sev-snp-guest`` from 9.1 on."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return (major, minor) >= (9, 1)


def kvm_failure_reason(stderr: str) -> str | None:
    """The gist of a KVM failure in QEMU's stderr, or None."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "KVM internal error" in line:
            what = next((later for later in lines[index + 1:] if "failure" in later), "")
            return f"{line} ({what})" if what else line
    for line in lines:
        if "warning" not in line:
            return line
    return None


def sev_verdicts(params: Mapping[str, bool | None] | None, dev_sev: bool,
                 cpuid: SevCpuid | None, cpu_flags: frozenset[str], kvm: Capability,
                 qmp: SevCapabilities | str | None, qemu_version: str,
                 ) -> tuple[Capability, Capability, Capability]:
    """SEV, SEV-ES and SNP from what was read (a pure decision).

    :param qmp: ``query-sev-capabilities`` parsed, the reason it failed, or
        None when it was not asked (the prerequisites were missing).
    """
    def cpu_says(flag: str, bit: str) -> bool | None:
        if cpuid is not None:
            return bool(getattr(cpuid, bit))
        if cpu_flags:
            return flag in cpu_flags
        return None

    def verdict(name: str, param: str, flag: str, bit: str,
                base: Capability | None) -> Capability:
        if base is not None and not base.available:
            inherited = base.reason
            if not inherited.startswith("needs SEV"):
                inherited = f"needs SEV: {inherited}"
            return Capability(False, inherited)
        cpu = cpu_says(flag, bit)
        if cpu is False:
            source = "CPUID 0x8000001F" if cpuid is not None else "/proc/cpuinfo flags"
            return Capability(False, f"the CPU does not offer {name} ({source})")
        if params is None:
            return Capability(False, "kvm_amd is not loaded "
                                     "(no /sys/module/kvm_amd/parameters)")
        value = params.get(param)
        if value is None:
            return Capability(False, f"kvm_amd has no {param} parameter")
        if not value:
            # The kernel writes back what it really enabled: N despite the
            # option means it turned the feature off itself.
            return Capability(False, f"kvm_amd {param}=N: set kvm_amd.{param}=1; if it is set "
                                     "already, the kernel turned it off (no ASIDs for it "
                                     "from the BIOS, or a missing CPU feature: dmesg | grep "
                                     "-i sev)")
        if not dev_sev:
            return Capability(False, "no /dev/sev (ccp driver / PSP firmware missing)")
        if not kvm.available:
            return Capability(False, f"KVM is not usable: {kvm.reason}")
        if qmp is None:
            return Capability(False, "query-sev-capabilities was not asked")
        if isinstance(qmp, str):
            return Capability(False, f"query-sev-capabilities failed: {qmp}")
        return Capability(True, f"kvm_amd {param}=Y, /dev/sev, CPU and QEMU agree "
                                f"(cbitpos {qmp.cbitpos}, reduced-phys-bits "
                                f"{qmp.reduced_phys_bits})")

    sev = verdict("SEV", "sev", "sev", "sev", None)
    sev_es = verdict("SEV-ES", "sev_es", "sev_es", "sev_es", sev)
    if qemu_version and not qemu_has_snp(qemu_version):
        # Whatever the host, this QEMU cannot launch an SNP guest.
        snp = Capability(False, f"needs sev-snp-guest (QEMU >= 9.1): QEMU {qemu_version} has "
                                "none; pass --qemu with a newer one")
    else:
        snp = verdict("SEV-SNP", "sev_snp", "sev_snp", "snp", sev_es)
    return sev, sev_es, snp


# ------------------------------------------------------------ result

CAPABILITIES = ("tcg", "kvm", "sev", "sev_es", "snp", "sev_emulated", "sev_es_emulated",
                "snp_emulated")


@dataclass(frozen=True)
class HostCaps:
    """The probe's answer."""

    qemu: str
    qemu_version: str
    tcg: Capability
    kvm: Capability
    sev: Capability
    sev_es: Capability
    snp: Capability
    #: The host's C-bit and reduced physical bits (``query-sev-capabilities``).
    sev_geometry: SevCapabilities | None = None
    sev_emulated: Capability = Capability(False, "not probed")
    sev_es_emulated: Capability = Capability(False, "not probed")
    snp_emulated: Capability = Capability(False, "not probed")
    #: The emulated SEV's (the ``sev-emulated`` type's defaults).
    emulated_geometry: SevCapabilities | None = None
    #: Whether this user may lock the memory of the largest SEV guest the
    #: suite boots (KVM pins a SEV guest's RAM).
    memlock: Capability = Capability(False, "not probed")

    def capability(self, name: str) -> Capability:
        """By marker name: ``tcg``, ``kvm``, ``sev``, ``sev_es``, ``snp``,
        ``sev_emulated``, ``sev_es_emulated``, ``snp_emulated``."""
        if name not in CAPABILITIES:
            raise KeyError(name)
        value: Capability = getattr(self, name)
        return value

    def best_accel(self) -> str:
        return "kvm" if self.kvm.available else "tcg"

    def geometry(self, mode: SevMode) -> SevCapabilities | None:
        """The C-bit and reduced physical bits a guest of ``mode`` gets here."""
        return self.emulated_geometry if mode.emulated else self.sev_geometry

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sev_config(mode: str, caps: HostCaps, policy: int | None = None) -> SevConfig | None:
    """A SEV mode (``off`` or one of :data:`~harness.vm.sev.MODES`) as a
    :class:`~harness.vm.sev.SevConfig` with the host's (or the emulation's)
    C-bit and reduced-phys-bits; a mode the host lacks is a
    :class:`~harness.errors.SettingError` naming the reason (a SEV test never
    runs a plain guest)."""
    if mode == "off":
        return None
    if mode not in MODES:
        raise SettingError("sev", mode, f"one of {', '.join(SEV_MODES)}")
    cap = caps.capability(MODES[mode].capability)
    if not cap.available:
        raise SettingError("sev", mode, f"not available here: {cap.reason}")
    geometry = caps.geometry(MODES[mode])
    if geometry is None:
        raise SettingError("sev", mode, "query-sev-capabilities gave no cbitpos")
    return SevConfig(mode=mode, cbitpos=geometry.cbitpos,
                     reduced_phys_bits=geometry.reduced_phys_bits, policy=policy)


def resolve_accel(option: str, caps: HostCaps) -> str:
    """An accelerator setting: ``auto`` is KVM only where the probe proved
    it; an explicit accelerator the host lacks is a
    :class:`~harness.errors.SettingError` naming the reason."""
    if option == "auto":
        return caps.best_accel()
    if option not in ("tcg", "kvm"):
        raise SettingError("accel", option, "auto, tcg or kvm")
    cap = caps.capability(option)
    if not cap.available:
        raise SettingError("accel", option, f"not usable here: {cap.reason}")
    return option


# ------------------------------------------------------------- probes


def _boot_probe(qemu: str, accel: str, code: Path, vars_template: Path,
                need_output: bool, timeout: float, sev: SevConfig | None = None) -> Capability:
    """Run the firmware under ``accel`` (as a ``sev`` guest when given: the
    launch checks ``query-sev``); proven by serial output, or (when
    ``need_output`` is false) by running ``timeout`` seconds without error."""
    config = MachineConfig(code=code, vars_template=vars_template, accel=accel,
                           qemu=qemu, debugcon=False, memory_mib=128, sev=sev,
                           serial_input=False)
    what = accel if sev is None else sev.mode
    with scratch(f"probe-{what}") as tmp:
        vm = QemuMachine(config, tmp, name=f"probe-{what}", launch_timeout=15)
        started = time.monotonic()
        try:
            with vm:
                while True:
                    status = vm.status()
                    elapsed = time.monotonic() - started
                    if status != "running":
                        why = kvm_failure_reason(vm.stderr_log.read_text(errors="replace"))
                        return Capability(False, f"the firmware stopped ({status}) after "
                                                 f"{elapsed:.1f} s: {why or 'no message'}")
                    if vm.serial_log.exists() and vm.serial_log.stat().st_size:
                        return Capability(True, f"booted firmware to serial output in "
                                                f"{elapsed:.1f} s")
                    if elapsed >= timeout:
                        if need_output:
                            return Capability(False, f"no serial output from the firmware "
                                                     f"in {timeout:g} s")
                        return Capability(True, f"ran firmware {elapsed:.1f} s without error")
                    time.sleep(0.1)
        except HarnessError as exc:
            why = kvm_failure_reason(getattr(exc, "log", "") or "") or str(exc)
            return Capability(False, f"QEMU failed under {accel}: {why}")


def bare_qemu_qmp(runner: Runner, qemu: str, accel: str, command: str,
                  arguments: Mapping[str, object] | None = None) -> Any:
    """``command``'s ``return`` from a bare QEMU (``-machine none``) under
    ``accel``, started by ``runner`` (this host, or another over SSH).

    :raises LaunchError: QEMU did not start (its output is the reason).
    :raises QmpError: the command failed (QEMU's error class and message).
    """
    work = runner.open()
    try:
        sock = work / "qmp.sock"
        argv = [qemu, "-machine", "none", "-accel", accel, "-nodefaults", "-display", "none",
                "-chardev", f"socket,id=qmp0,path={sock},server=on,wait=off",
                "-mon", "chardev=qmp0,mode=control"]
        process = runner.start(argv, stderr=work / "stderr.log", memlock=None)
        try:
            deadline = time.monotonic() + 10
            while not runner.has_socket(sock):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise LaunchError(f"QEMU -machine none -accel {accel} did not start: "
                                      f"{process.stderr_text().strip()}")
                time.sleep(0.02)
            from harness.vm.qmp import QmpSession  # asyncio: only when probing

            session = QmpSession(f"bare-{accel}", io.StringIO(), LOG)
            try:
                session.connect(runner.connect(sock), 10)
                return session.execute(command, arguments, 10)
            finally:
                session.close()
        finally:
            process.kill()
    finally:
        runner.close()


def query_sev_capabilities(runner: Runner, qemu: str,
                           accel: str = "kvm") -> SevCapabilities | str:
    """``query-sev-capabilities`` of a bare QEMU (:func:`bare_qemu_qmp`): the
    answer, or why there is none."""
    return _bare_answer(runner, qemu, accel, "query-sev-capabilities", None,
                        parse_sev_capabilities)


def _bare_answer(runner: Runner, qemu: str, accel: str, command: str,
                 arguments: Mapping[str, object] | None,
                 parse: Callable[[Any], SevCapabilities]) -> SevCapabilities | str:
    """``parse`` of a bare QEMU's answer to ``command``, or why there is none
    (QEMU's error, a QEMU that would not start, a reply that does not parse,
    an SSH failure of a remote runner)."""
    try:
        return parse(bare_qemu_qmp(runner, qemu, accel, command, arguments))
    except QmpError as exc:
        return str(exc).removeprefix(f"QMP {command}: ")
    except LaunchError as exc:
        return exc.reason
    except (ValueError, OSError) as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - an SSH failure of the remote runner: the reason
        return f"{type(exc).__name__}: {exc}"


#: The largest guest the suite boots under SEV (the Linux guest), whose
#: memory KVM must be allowed to pin.
LARGEST_SEV_GUEST_MIB = 512


def sev_proven(claimed: Capability, memlock: str | None, boot: Capability | None
               ) -> Capability:
    """SEV (or SEV-ES) as the parameters and QMP claim it, then as this host
    can really launch it: within the locked-memory limit, and a guest booted
    (a pure decision). ``boot`` None: not tried (the claim already failed)."""
    if not claimed.available:
        return claimed
    if memlock is not None:
        return Capability(False, memlock)
    if boot is None or not boot.available:
        why = boot.reason if boot is not None else "not tried"
        return Capability(False, f"{claimed.reason}, but a guest did not boot: {why}")
    return Capability(True, f"{claimed.reason}; {boot.reason}")


#: The QOM type of the harness's emulated SEV (``qemu-patches/``).
EMULATED_SEV_TYPE = MODES["emulated"].qom_type
#: The property that came with the emulated SEV-ES (a test switch that
#: gives a #VC the wrong exit code): a type that has it emulates SEV-ES.
EMULATED_SEV_ES_PROPERTY = "x-vc-mismatch"
#: The switch of the emulated SEV-SNP: a type that has it emulates SNP.
EMULATED_SNP_PROPERTY = "snp"


def parse_emulated_sev_properties(reply: Any) -> SevCapabilities:
    """``qom-list-properties`` of :data:`EMULATED_SEV_TYPE` (its ``return``):
    the ``cbitpos`` and ``reduced-phys-bits`` defaults, as emulated, and
    whether SEV-ES is (:data:`EMULATED_SEV_ES_PROPERTY`) and SEV-SNP
    (:data:`EMULATED_SNP_PROPERTY`)."""
    body = reply.get("return", reply) if isinstance(reply, Mapping) else reply
    if not isinstance(body, list):
        raise ValueError(f"not a property list: {reply!r}")  # noqa: TRY004 - a bad reply
    defaults = {p.get("name"): p.get("default-value") for p in body if isinstance(p, Mapping)}
    parsed = parse_sev_capabilities({"cbitpos": defaults.get("cbitpos"),
                                     "reduced-phys-bits": defaults.get("reduced-phys-bits")})
    return SevCapabilities(parsed.cbitpos, parsed.reduced_phys_bits, emulated=True,
                           es=EMULATED_SEV_ES_PROPERTY in defaults,
                           snp=EMULATED_SNP_PROPERTY in defaults)


def emulated_sev_capabilities(runner: Runner, qemu: str) -> SevCapabilities | str:
    """The emulated SEV of a bare QEMU under TCG (:func:`bare_qemu_qmp`), from
    its :data:`EMULATED_SEV_TYPE` class, or why there is none."""
    return _bare_answer(runner, qemu, "tcg", "qom-list-properties",
                        {"typename": EMULATED_SEV_TYPE}, parse_emulated_sev_properties)


def emulated_sev_verdict(tcg: Capability, qmp: SevCapabilities | str, qemu: str,
                         version: str) -> Capability:
    """Emulated SEV from TCG's proof and the QEMU's :data:`EMULATED_SEV_TYPE`
    class (:func:`emulated_sev_capabilities`; a pure decision)."""
    if not tcg.available:
        return Capability(False, f"needs TCG: {tcg.reason}")
    if isinstance(qmp, SevCapabilities) and qmp.emulated:
        return Capability(True, f"QEMU {version} emulates SEV under TCG ({EMULATED_SEV_TYPE}, "
                                f"cbitpos {qmp.cbitpos}, reduced-phys-bits "
                                f"{qmp.reduced_phys_bits})")
    why = qmp if isinstance(qmp, str) else "not an emulation"
    return Capability(False, f"{qemu} (QEMU {version}) has no emulated SEV "
                             f"(no {EMULATED_SEV_TYPE} object type: {why}); the harness's QEMU "
                             "has it: ebs-harness build-qemu")


def _emulated_layer(below: Capability, below_name: str, has: bool, yes: str,
                    no: str) -> Capability:
    """An emulation built on ``below`` (named ``below_name``): there when
    that is and the type ``has`` it, saying ``yes``; else why not."""
    if not below.available:
        return Capability(False, f"needs {below_name}: {below.reason}")
    return Capability(True, yes) if has else Capability(False, no)


def emulated_sev_es_verdict(sev_emulated: Capability, qmp: SevCapabilities | str,
                            version: str) -> Capability:
    """Emulated SEV-ES: on top of emulated SEV, a type that has it
    (:func:`parse_emulated_sev_properties`; a pure decision)."""
    return _emulated_layer(
        sev_emulated, "emulated SEV", isinstance(qmp, SevCapabilities) and qmp.es,
        f"QEMU {version} emulates SEV-ES under TCG ({EMULATED_SEV_TYPE} with the ES policy "
        "bit, one vCPU)",
        f"QEMU {version}'s {EMULATED_SEV_TYPE} emulates plain SEV only (no "
        f"{EMULATED_SEV_ES_PROPERTY} property); the harness's QEMU has SEV-ES: ebs-harness "
        "build-qemu")


def emulated_snp_verdict(sev_es_emulated: Capability, qmp: SevCapabilities | str,
                         version: str) -> Capability:
    """Emulated SEV-SNP: on top of the emulated SEV-ES, a type with
    :data:`EMULATED_SNP_PROPERTY` (a pure decision)."""
    return _emulated_layer(
        sev_es_emulated, "emulated SEV-ES", isinstance(qmp, SevCapabilities) and qmp.snp,
        f"QEMU {version} emulates SEV-SNP under TCG ({EMULATED_SEV_TYPE} with snp=on, one "
        "vCPU, the firmware as one -bios image)",
        f"QEMU {version}'s {EMULATED_SEV_TYPE} has no SEV-SNP (no {EMULATED_SNP_PROPERTY} "
        "property); the harness's QEMU has it: ebs-harness build-qemu")


#: KVM's capability in a probe that did not look (``tcg_only``).
NOT_PROBED_KVM = "not probed: the command runs under TCG (--accel tcg)"


def probe(qemu: str = DEFAULT_QEMU, root: Path = Path("/"),
          code: Path = STOCK_CODE, vars_template: Path = STOCK_VARS,
          kvm_timeout: float = 10.0, tcg_settle: float = 1.0, *,
          tcg_only: bool = False) -> HostCaps:
    """Probe this host (seconds: it boots firmware).

    :param tcg_only: leave out KVM and what needs it (SEV, SEV-ES): they
        come back unavailable, with :data:`NOT_PROBED_KVM` as the reason.
    """
    path = shutil.which(qemu)
    if path is None:
        missing = Capability(False, f"QEMU {qemu!r} not found")
        return HostCaps(qemu=qemu, qemu_version="", tcg=missing, kvm=missing,
                        sev=missing, sev_es=missing, snp=missing, sev_emulated=missing,
                        sev_es_emulated=missing, snp_emulated=missing)
    out = subprocess.run([path, "--version"], capture_output=True, text=True,
                         check=False).stdout
    try:
        version = parse_qemu_version(out)
    except ValueError as exc:
        bad = Capability(False, str(exc))
        return HostCaps(qemu=path, qemu_version="", tcg=bad, kvm=bad, sev=bad,
                        sev_es=bad, snp=bad, sev_emulated=bad, sev_es_emulated=bad,
                        snp_emulated=bad)

    if not code.is_file() or not vars_template.is_file():
        nofw = f"no firmware to boot ({code}; install Debian's ovmf)"
        tcg = kvm = Capability(False, nofw)
    else:
        tcg = _boot_probe(path, "tcg", code, vars_template, need_output=False,
                          timeout=tcg_settle)
        kvm_dev = root / "dev/kvm"
        if tcg_only:
            kvm = Capability(False, NOT_PROBED_KVM)
        elif not kvm_dev.exists():
            kvm = Capability(False, f"no {kvm_dev}")
        elif not os.access(kvm_dev, os.R_OK | os.W_OK):
            kvm = Capability(False, f"{kvm_dev} is not read/writable by this user")
        else:
            kvm = _boot_probe(path, "kvm", code, vars_template, need_output=True,
                              timeout=kvm_timeout)

    params = read_kvm_amd_params(root)
    dev_sev = (root / "dev/sev").exists()
    cpuid = read_sev_cpuid(root)
    try:
        flags = parse_cpuinfo_flags((root / "proc/cpuinfo").read_text())
    except OSError:
        flags = frozenset()
    qmp: SevCapabilities | str | None = None
    if params and params.get("sev") and dev_sev and kvm.available:
        qmp = query_sev_capabilities(LocalRunner(), path)
    sev, sev_es, snp = sev_verdicts(params, dev_sev, cpuid, flags, kvm, qmp, version)
    memlock = limits.memlock_problem(limits.current(),
                                     limits.sev_memlock_bytes(LARGEST_SEV_GUEST_MIB))
    memlock_cap = Capability(memlock is None, memlock or (
        f"{limits.current().describe()}: enough for SEV guests of {LARGEST_SEV_GUEST_MIB} MiB"))
    if isinstance(qmp, SevCapabilities) and (sev.available or sev_es.available):
        # Claimed: now launch it, as the nightly's first guest would.
        boots: dict[str, Capability | None] = {}
        for mode, claimed in (("sev", sev), ("sev-es", sev_es)):
            boots[mode] = None
            if claimed.available and memlock is None:
                boots[mode] = _boot_probe(
                    path, "kvm", code, vars_template, need_output=True, timeout=kvm_timeout,
                    sev=SevConfig(mode, qmp.cbitpos, qmp.reduced_phys_bits))
        sev = sev_proven(sev, memlock, boots["sev"])
        sev_es = (sev_proven(sev_es, memlock, boots["sev-es"]) if sev.available
                  else Capability(False, f"needs SEV: {sev.reason}"))
    emulation = (emulated_sev_capabilities(LocalRunner(), path) if tcg.available
                 else "TCG is not usable")
    sev_emulated = emulated_sev_verdict(tcg, emulation, path, version)
    sev_es_emulated = emulated_sev_es_verdict(sev_emulated, emulation, version)
    snp_emulated = emulated_snp_verdict(sev_es_emulated, emulation, version)
    emulated = emulation if isinstance(emulation, SevCapabilities) and sev_emulated else None
    caps = HostCaps(
        qemu=path, qemu_version=version, tcg=tcg, kvm=kvm, sev=sev, sev_es=sev_es,
        snp=snp,
        sev_geometry=qmp if isinstance(qmp, SevCapabilities) else None,
        sev_emulated=sev_emulated, sev_es_emulated=sev_es_emulated, snp_emulated=snp_emulated,
        emulated_geometry=emulated, memlock=memlock_cap)
    LOG.info("host: %s", caps)
    return caps


#: How long a probe on disk stays good: long enough for a session of
#: commands, short enough that a host that changed is soon probed again.
PROBE_CACHE_TTL_S = 600.0


def caps_from_json(data: Mapping[str, Any]) -> HostCaps:
    """The inverse of :meth:`HostCaps.to_json`; a :class:`KeyError` for an
    answer that lacks a capability (kept by an older harness: probe again)."""
    missing = [name for name in CAPABILITIES if name not in data]
    if missing:
        raise KeyError(f"no {', '.join(missing)} in the kept probe")
    fields: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("sev_geometry", "emulated_geometry"):
            fields[key] = SevCapabilities(**value) if value is not None else None
        else:
            fields[key] = Capability(**value) if isinstance(value, dict) else value
    return HostCaps(**fields)


def probe_key(qemu: str, root: Path = Path("/")) -> str:
    """What a probe's answer depends on: the QEMU binary, the kernel, this
    user and its groups (access to /dev/kvm, /dev/sev), its locked-memory
    limit, /dev/kvm and /dev/sev, the kvm_amd parameters and the stock
    firmware booted."""
    params = read_kvm_amd_params(root)
    binary = shutil.which(qemu) or qemu
    user = f"{os.geteuid()}:{sorted(os.getgroups())}:{limits.current()}"
    return identity([binary, root / "dev/kvm", root / "dev/sev", STOCK_CODE, STOCK_VARS],
                    f"{qemu}\0{binary}\0{os.uname().release}\0{user}\0"
                    + (repr(sorted(params.items())) if params else "no kvm_amd"))


@functools.lru_cache(maxsize=8)
def cached_probe(qemu: str = DEFAULT_QEMU, *, tcg_only: bool = False) -> HostCaps:
    """:func:`probe`, once per process and QEMU binary, and kept on disk
    (``$EBS_HARNESS_CACHE/host-probe/``) for :data:`PROBE_CACHE_TTL_S` under
    :func:`probe_key`, so that a series of commands probes once. A full
    probe serves a ``tcg_only`` one too."""
    if tcg_only:
        full = _probe_file(qemu, tcg_only=False)
        try:
            if time.time() - full.stat().st_mtime < PROBE_CACHE_TTL_S:
                return caps_from_json(json.loads(full.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            LOG.debug("%s: %s", full, exc)
    return remembered(_probe_file(qemu, tcg_only=tcg_only), PROBE_CACHE_TTL_S,
                      lambda: probe(qemu, tcg_only=tcg_only), HostCaps.to_json,
                      caps_from_json)


def fresh_probe(qemu: str = DEFAULT_QEMU) -> HostCaps:
    """:func:`probe` now, and what the next :func:`cached_probe` reads
    (``host-check``: after a change to the host, the commands see it)."""
    return remembered(_probe_file(qemu, tcg_only=False), 0.0, lambda: probe(qemu),
                      HostCaps.to_json, caps_from_json)


def _probe_file(qemu: str, *, tcg_only: bool) -> Path:
    return cache_root() / "host-probe" / (f"{probe_key(qemu)}"
                                          f"{'-tcg' if tcg_only else ''}.json")
