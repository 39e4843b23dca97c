"""The real firmware build: Debian's edk2 source, the series, OVMF DEBUG.

Cold on a fresh machine (fetch, extract, BaseTools, OVMF: a few minutes),
a cache hit after that. Booting the result is the machine layer's test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from elftools.elf.elffile import ELFFile

from harness.build import edk2
from harness.build.series import read_series
from harness.pytestplugin import session_baseline, settings

pytestmark = pytest.mark.build


def test_firmware_has_flash_images(ebs_firmware: edk2.Firmware) -> None:
    # 4 MiB flash: code + vars, and the combined image.
    assert ebs_firmware.code.stat().st_size + ebs_firmware.vars.stat().st_size == 4 << 20
    assert (ebs_firmware.path / "OVMF.fd").stat().st_size == 4 << 20


def test_iommu_module_and_symbols(ebs_firmware: edk2.Firmware) -> None:
    efi = ebs_firmware.module_file("IoMmuDxe", ".efi")
    assert efi.read_bytes()[:2] == b"MZ"
    with open(ebs_firmware.module_file("IoMmuDxe", ".debug"), "rb") as handle:
        symbols = ELFFile(handle).get_section_by_name(".symtab")
        names = {symbol.name for symbol in symbols.iter_symbols()}
    assert {"mMapInfos", "_ModuleEntryPoint"} <= names
    assert "mMapInfos" in ebs_firmware.module_file("IoMmuDxe", ".map").read_text()


def test_manifest_records_inputs(ebs_firmware: edk2.Firmware,
                                 pytestconfig: pytest.Config) -> None:
    manifest = ebs_firmware.manifest
    assert manifest["key"] == ebs_firmware.key == ebs_firmware.path.name
    series = read_series(edk2.BASELINES[ebs_firmware.baseline].series_dir)
    if not settings(pytestconfig).firmware:
        assert ebs_firmware.baseline == session_baseline(pytestconfig).name
    assert [name for name, _ in manifest["patches"]] == [p.name for p in series]  # type: ignore[union-attr]
    assert str(manifest["source"]).startswith(("debian:edk2=", "debian-tarballs:edk2=", "tree:"))
    assert "gcc" in str(manifest["toolchain"])
    assert float(manifest["build_seconds"]) > 0  # type: ignore[arg-type]
    assert int(manifest["modules"]) > 100  # type: ignore[call-overload]
    assert "Build total time" in (ebs_firmware.path / "build.log").read_text()


def test_cli_build_json_is_a_cache_hit_for_the_same_inputs(
        ebs_firmware: edk2.Firmware, pytestconfig: pytest.Config) -> None:
    if settings(pytestconfig).firmware or settings(pytestconfig).edk2_src:
        pytest.skip("--ebs-firmware/--ebs-edk2-src: the cache holds no build of Debian's "
                    "source")
    proc = subprocess.run([sys.executable, "-m", "harness", "-q", "build", "--json",
                           "--edk2", ebs_firmware.baseline],
                          capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["cache_hit"] is True
    assert reply["key"] == ebs_firmware.key
    assert reply["firmware_dir"] == str(ebs_firmware.path)
    assert reply["edk2"] == ebs_firmware.baseline
