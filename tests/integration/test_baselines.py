"""The edk2 baselines beside the series' 2022.11: Debian 13's 2025.02,
fetched as its tarballs (this host's mirror does not serve its .dsc),
checked against the signed Sources index, patched as Debian patches it,
built, booted to its shell and explained."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from shellboot import boot_to_shell, explain_json

from harness.build import cache, edk2
from harness.build.progress import StderrProgress
from harness.errors import SourceError, UsageError
from harness.pytestplugin import session_emulated_caps
from harness.vm import host

pytestmark = pytest.mark.tcg


def test_an_unknown_baseline_lists_the_known_ones() -> None:
    with pytest.raises(UsageError, match=r"'2099\.01' .*; known: 2025\.02, 2022\.11$"):
        edk2.build_unpatched(baseline="2099.01")


def test_a_pin_the_signed_index_disagrees_with_is_refused(tmp_path: Path) -> None:
    """A wrong sha256 pinned for the orig tarball: refused before any
    download, naming both sums (the control is the build below)."""
    wrong = dataclasses.replace(edk2.TRIXIE, orig_sha256="0" * 64, downloads=tmp_path)
    with pytest.raises(SourceError, match="is not the trixie Sources index's "
                                          + edk2.TRIXIE.orig_sha256):
        wrong.fetch(StderrProgress())
    assert not any(tmp_path.iterdir()), "nothing downloaded"


def test_2025_02_builds_and_boots_to_its_shell(tmp_path: Path) -> None:
    firmware = edk2.build_unpatched(progress=StderrProgress(), baseline="2025.02").output
    assert firmware.manifest["source"] == edk2.BASELINES["2025.02"].source.identity()
    assert firmware.manifest["source"].startswith(edk2.TRIXIE.identity() + ":fixes=")
    data = explain_json(boot_to_shell(firmware, tmp_path))
    assert [p["phase"] for p in data["phases"]] == ["SEC", "PEI", "DXE", "BDS"]
    assert data["boot_options"][-1]["image"] == "Shell.efi"
    assert any(i["name"] == "IoMmuDxe" for i in data["images"])
    assert "dma pool" not in {f["fact"] for f in data["platform"]}    # no SEV, no pool


@pytest.mark.sev_emulated
def test_2025_02_takes_its_sev_path_with_the_reserved_dma_pool(pytestconfig: pytest.Config,
                                                               tmp_path: Path) -> None:
    """Stock 2025.02 under the emulated SEV: SEV on, and IoMmuDxe (CcIoMmu.c)
    sets up the reserved shared-memory pool the series must release at
    ExitBootServices; the control is the plain boot above, which has none."""
    caps = session_emulated_caps(pytestconfig)
    firmware = edk2.build_unpatched(progress=StderrProgress(), baseline="2025.02").output
    log = boot_to_shell(firmware, tmp_path, sev=host.sev_config("emulated", caps),
                        qemu=caps.qemu)
    facts = {f["fact"]: f["value"] for f in explain_json(log)["platform"]}
    assert facts["sev"] == "enabled, encryption mask 0x800000000000"
    assert "reserved shared-memory pool" in facts["dma pool"]


def test_a_file_the_archive_lacks_is_one_line(tmp_path: Path) -> None:
    from harness.build.debian import PrivateApt
    from harness.errors import DependencyError

    apt = PrivateApt(cache.cache_root() / "apt")
    with pytest.raises(DependencyError, match=r"could not download pool/main/e/edk2/"
                                              r"no-such\.tar\.xz: ") as info:
        apt.download_file("pool/main/e/edk2/no-such.tar.xz", tmp_path / "x", "0" * 64)
    assert "\n" not in str(info.value) and not (tmp_path / "x").exists()


def test_the_2022_11_series_on_2025_02_names_baseline_patch_file_and_hunk() -> None:
    """A series that does not fit its tree (2022.11's, on 2025.02's source)
    stops at the first patch that does not apply, and says where, before the
    workspace (2025.02's own series builds there) is touched (the control:
    each series builds on its own baseline, as the rest of the suite shows)."""
    from harness.errors import PatchError

    builder = edk2.Builder(edk2.BASELINES["2025.02"].source, baseline=edk2.BASELINES["2022.11"],
                           progress=StderrProgress())
    state = builder.workspace_dir / "state.json"
    before = state.read_bytes() if state.exists() else None
    with pytest.raises(PatchError) as info:
        builder.firmware()
    message = str(info.value)
    assert message.startswith("patch 0002-MdeModulePkg-Core-Dxe-call-the-IOMMU-teardown-at-Exi"
                              ".patch does not apply to debian-tarballs:edk2=2025.02-8+deb13u1: "
                              "MdeModulePkg/Core/Dxe/DxeMain/DxeMain.c hunk #"), message
    assert "\n" not in message
    assert (state.read_bytes() if state.exists() else None) == before
    assert not builder.published_dir.exists()
