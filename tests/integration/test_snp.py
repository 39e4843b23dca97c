"""SEV-SNP at the command-line level: the harness's SNP argv against a QEMU
that has ``sev-snp-guest`` (Debian's 10.0 from bookworm-backports, unpacked
into the cache, never installed), on a host without SNP.

QEMU must accept every option and stop only where KVM lacks SNP: that is the
argv a SNP host would run. The controls: a misspelt option is refused by
QEMU's option parser instead, and Debian 12's QEMU 7.2 does not know the
object at all (the host probe reports SNP only with a QEMU that can launch it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from harness.build import edk2, qemu
from harness.build.progress import StderrProgress
from harness.errors import LaunchError
from harness.vm import host
from harness.vm.config import MachineConfig
from harness.vm.host import HostCaps
from harness.vm.machine import QemuMachine
from harness.vm.sev import SevConfig

pytestmark = pytest.mark.tcg


@pytest.fixture(scope="session")
def newer_qemu() -> str:
    return str(qemu.fetch_newer_qemu(StderrProgress()))


def _snp_config(firmware: edk2.Firmware, binary: str, **kwargs: object) -> MachineConfig:
    return MachineConfig(code=firmware.combined, vars_template=firmware.vars, accel="kvm",
                         sev=SevConfig("snp", cbitpos=51, reduced_phys_bits=1), qemu=binary,
                         debugcon=False, serial_input=False, **kwargs)  # type: ignore[arg-type]


def _refusal(config: MachineConfig, artifacts: Path) -> str:
    with pytest.raises(LaunchError) as failed:
        QemuMachine(config, artifacts).launch()
    return failed.value.log


def test_the_snp_argv_is_whole_and_stops_at_kvm(newer_qemu: str, ebs_firmware: edk2.Firmware,
                                                 ebs_artifacts: Path) -> None:
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm: QEMU would stop before it reads the SNP options")
    config = _snp_config(ebs_firmware, newer_qemu)
    log = _refusal(config, ebs_artifacts / "vm")
    argv = (ebs_artifacts / "vm" / "cmdline.txt").read_text()
    assert "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x30000" in argv
    assert "memory-backend-memfd,id=ram0,size=256M,share=true" in argv
    assert "-bios" in argv and "pflash" not in argv
    assert "vm-type SEV-SNP not supported by KVM" in log, log


def test_a_misspelt_snp_option_is_refused_by_the_parser(newer_qemu: str,
                                                        ebs_firmware: edk2.Firmware,
                                                        ebs_artifacts: Path) -> None:
    """The control: QEMU reads the options before KVM, so a bad one fails there."""
    config = dataclasses.replace(
        _snp_config(ebs_firmware, newer_qemu),
        extra_args=("-object",
                    "sev-snp-guest,id=sev1,cbitpos=51,reduced-phys-bits=1,no-such-option=1"))
    log = _refusal(config, ebs_artifacts / "vm")
    assert "Invalid parameter 'no-such-option'" in log
    assert "not supported by KVM" not in log


def test_debians_qemu_does_not_know_snp(ebs_host_caps: HostCaps, ebs_firmware: edk2.Firmware,
                                        ebs_artifacts: Path, newer_qemu: str) -> None:
    log = _refusal(_snp_config(ebs_firmware, ebs_host_caps.qemu), ebs_artifacts / "vm")
    assert "does not accept value 'sev-snp-guest'" in log
    assert ebs_host_caps.snp.reason.startswith("needs sev-snp-guest (QEMU >= 9.1)")
    newer = host.probe(newer_qemu)
    assert newer.qemu_version.startswith("10.")
    assert not newer.snp.reason.startswith("needs sev-snp-guest"), \
        "with a QEMU that has sev-snp-guest, the host itself decides"
