"""The device side: real boots with QEMU's device trace, W1 and W2 per device.

The default run boots the zoo's representative set once per mode (plain
TCG and the emulated SEV), each device with its expected verdict, and the
negative controls: the adversary driver's armed NIC, without frames (W1
fails, naming it) and with frames injected after the park (W1 and W2 fail;
under the emulated SEV the dump shows where the late frames landed). The
whole zoo, every device alone with the adversary at depth 2, runs with
``-m zoo`` (the nightly).

What each device is expected to show is a finding about OVMF's stock
drivers (docs/devices.md), not a setting of the verdicts: a device that
stays armed is expected to fail W1, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from harness.analysis import devices
from harness.scenario import RunResult, Scenario

Run = Callable[[Scenario], RunResult]

#: Devices whose stock driver leaves them armed at the teardown, and why.
#: Every other device must be quiesced (W1) and quiet (W2).
ARMED = {
    "nvme": "NvmExpressDxe has no ExitBootServices handler: the controller stays "
            "enabled (CC.EN=1) with its queues in guest memory",
    "ahci": "AtaAtapiPassThruDxe has no ExitBootServices handler and leaves FIS "
            "receive on (PxCMD.FRE) on the ports where it found no device",
}
#: Storage devices whose disk gives the probe no volume, and why.
NO_VOLUME = {
    "lsi": "ScsiDiskDxe asks for 260 bytes of VPD pages, the disk sends 255, the "
           "controller reports the short transfer as a phase mismatch and LsiScsiDxe "
           "fails the command: no BlockIo, no file system",
}
#: Kinds of the default run (one boot per mode).
REPRESENTATIVE = ("nvme", "ahci", "xhci-storage", "usb-kbd", "virtio-net", "virtio-gpu",
                  "e1000e")
ZOO = (*REPRESENTATIVE, "pvscsi", "mptsas", "lsi", "virtio-scsi", "virtio-rng")
STORAGE = {"nvme": "nvme", "ahci": "ahci", "xhci-storage": "xhci", "pvscsi": "pvscsi",
           "mptsas": "mptsas", "lsi": "lsi", "virtio-blk": "virtio-blk"}

MODES = [
    pytest.param("off", marks=pytest.mark.tcg, id="plain"),
    pytest.param("emulated", marks=pytest.mark.sev_emulated, id="emulated-sev"),
    pytest.param("emulated-es", marks=pytest.mark.sev_es_emulated, id="emulated-sev-es"),
    pytest.param("emulated-snp", marks=pytest.mark.snp_emulated, id="emulated-snp"),
]


def _model_kind(device: str) -> str:
    return {"xhci-storage": "xhci", "usb-kbd": "xhci"}.get(device, device)


def _detail(result: RunResult) -> str:
    return "\n".join(f"{v.check}: {v.detail}" for v in result.violations) + \
        f"\n(artifacts: {result.artifacts})"


def _expect_zoo(result: RunResult, kinds: tuple[str, ...], sev: str) -> None:
    """Every firmware-side verdict holds; on the device side exactly the
    armed devices fail W1, each named, and nothing DMAs after the teardown."""
    assert result.devices is not None, result.judgement.device_notes
    report = result.devices
    assert report.judged, report.notes
    firmware_side = {v.check for v in result.violations if not v.check.startswith("W")}
    assert not firmware_side, _detail(result)
    expected = {_model_kind(k) for k in kinds if k in ARMED}
    failed = {v.detail.split(" ")[0] for v in report.violations}
    assert {v.check for v in report.violations} <= {"W1"}, _detail(result)
    assert failed == expected, _detail(result)
    driven = {d.kind: d for d in devices.driven(report)}
    for kind in {_model_kind(k) for k in kinds}:
        if kind == "e1000e" and sev != "off":
            # OVMF runs no option ROM in a confidential guest: no iPXE, no driver
            assert kind not in driven or driven[kind].quiesce_text == "never armed"
            continue
        assert kind in driven, f"{kind} never became a bus master\n{_detail(result)}"
        assert not driven[kind].dma_after, _detail(result)
    for kind, model in STORAGE.items():
        if kind in kinds or kind == "virtio-blk":
            assert driven[model].dma_before > 0, f"{kind}: no DMA through it at all"
        if kind in kinds:
            # the probe read the canary through the device's own volume
            # (None: no volume on it at all)
            assert driven[model].canary is (None if kind in NO_VOLUME else True), \
                _detail(result)


@pytest.mark.parametrize("sev", MODES)
def test_representative_zoo(ebs_run_probe: Run, sev: str) -> None:
    result = ebs_run_probe(Scenario(devices=("virtio-blk", *REPRESENTATIVE), requeue_depth=2,
                                    sev=sev, dump=sev == "emulated"))
    _expect_zoo(result, REPRESENTATIVE, sev)
    # the EBS handlers (or their absence) the device lane names
    assert "device lane" in (result.artifacts / "timeline.html").read_text()


@pytest.mark.zoo
@pytest.mark.parametrize("sev", MODES)
@pytest.mark.parametrize("kind", ZOO)
def test_zoo_device_alone(ebs_run_probe: Run, kind: str, sev: str) -> None:
    result = ebs_run_probe(Scenario(devices=("virtio-blk", kind), requeue_depth=2, sev=sev))
    _expect_zoo(result, (kind,), sev)


def _nic(result: RunResult) -> devices.Device:
    assert result.devices is not None, result.judgement.device_notes
    (nic,) = [d for d in result.devices.devices if d.qom == "virtio-net-pci"]
    return nic


@pytest.mark.tcg
def test_armed_nic_fails_w1(ebs_run_probe: Run) -> None:
    """The adversary arms a NIC and never stops it: W1 names it; with no
    frame to receive it does no DMA, so W2 holds."""
    result = ebs_run_probe(Scenario(devices=("virtio-blk", "adversary-nic")))
    nic = _nic(result)
    assert result.failed_checks() == {"W1"}, _detail(result)
    (w1,) = result.violations
    assert w1.detail.startswith(f"virtio-net {nic.bdf} (virtio-net-pci) still armed")
    assert "queues since line" in w1.detail and "bus mastering on" in w1.detail
    assert "EBST adversary-nic state=armed" in result.debug_log.read_text(errors="replace")


@pytest.mark.parametrize("sev", MODES)
def test_late_frames_fail_w2(ebs_run_probe: Run, sev: str) -> None:
    """Frames sent after the park are DMAed into the armed NIC's ring: W2
    names the device and the event."""
    result = ebs_run_probe(Scenario(devices=("virtio-blk", "adversary-nic"), inject_frames=4,
                                    sev=sev, dump=sev == "emulated"))
    nic = _nic(result)
    assert {"W1", "W2"} <= result.failed_checks(), _detail(result)
    (w2,) = [v for v in result.violations if v.check == "W2"]
    assert w2.detail.startswith(f"virtio-net {nic.bdf} (virtio-net-pci) did DMA after the "
                                "teardown began")
    assert "virtqueue_pop at line" in w2.detail
    assert nic.dma_after and nic.dma_after[0].line > result.devices.begin_line
    if sev == "emulated":
        # what the late DMA did: the frames sit in pages the teardown made private
        (late,) = [n for n in result.judgement.device_notes if n.startswith("late DMA")]
        assert "late DMA: 4 injected frame(s)" in late and "4 in private pages" in late, late
