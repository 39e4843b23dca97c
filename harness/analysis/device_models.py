"""The device models the harness traces in QEMU: each one's QEMU type
names, the trace events it enables, what counts as quiesced and the UEFI
driver that drives it.

Apart from :mod:`harness.analysis.devices`, which judges their trace, so
that a boot names the trace events in QEMU's command line without loading
the judging (it loads while the guest boots).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Model:
    """What the harness knows of one device model.

    :param kind: the name reports use (``nvme``, ``virtio-net``, ...).
    :param qom: QEMU's type names (as ``pci_cfg_write`` prints them).
    :param events: the trace events it enables for this model.
    :param quiesced: what counts as quiesced, for reports and docs.
    :param driver: the UEFI driver that drives it.
    :param image: that driver's image name in the debug log, under which its
        EBS handler, if it has one, shows in the firmware timeline.
    """

    kind: str
    qom: tuple[str, ...]
    events: tuple[str, ...]
    quiesced: str
    driver: str
    image: str = ""

    def __post_init__(self) -> None:
        if not self.image:
            object.__setattr__(self, "image", self.driver)


_VIRTIO_EVENTS = ("virtio_set_status", "virtio_queue_notify", "virtqueue_pop",
                  "virtqueue_flush")


def _virtio(kind: str, driver: str, *extra: str) -> Model:
    return Model(kind, (f"{kind}-pci",), (*_VIRTIO_EVENTS, *extra),
                 "device status written 0 (virtio reset), or bus mastering off", driver)


MODELS: tuple[Model, ...] = (
    _virtio("virtio-blk", "VirtioBlkDxe", "virtio_blk_handle_read", "virtio_blk_handle_write"),
    _virtio("virtio-net", "VirtioNetDxe"),
    _virtio("virtio-scsi", "VirtioScsiDxe"),
    _virtio("virtio-rng", "VirtioRngDxe", "virtio_rng_pushed"),
    _virtio("virtio-gpu", "VirtioGpuDxe"),
    Model("nvme", ("nvme",),
          ("pci_nvme_mmio_start_success", "pci_nvme_mmio_stopped", "pci_nvme_mmio_shutdown_set",
           "pci_nvme_admin_cmd", "pci_nvme_io_cmd", "pci_nvme_map_prp",
           "pci_nvme_enqueue_req_completion"),
          "controller disabled (CC.EN cleared) or shutdown set, or bus mastering off",
          "NvmExpressDxe"),
    Model("ahci", ("ich9-ahci",),
          ("ahci_port_write", "ahci_mem_write_host", "ahci_reset", "ahci_start_dma",
           "ahci_dma_rw_buf", "ahci_cmd_done"),
          "every port's command list and FIS receive engines stopped (PxCMD.ST and "
          "PxCMD.FRE clear), or an HBA reset, or bus mastering off", "AtaAtapiPassThruDxe"),
    Model("xhci", ("qemu-xhci",),
          ("usb_xhci_run", "usb_xhci_stop", "usb_xhci_reset", "usb_xhci_fetch_trb",
           "usb_xhci_queue_event"),
          "controller halted (USBCMD.RS cleared) or reset, or bus mastering off", "XhciDxe"),
    Model("e1000e", ("e1000e",),
          ("e1000e_core_ctrl_sw_reset", "e1000e_rx_set_rctl", "e1000e_rx_written_to_guest",
           "e1000e_tx_descr", "e1000e_rx_descr"),
          "receiver disabled (RCTL.EN clear) or a software reset, or bus mastering off",
          # the option ROM's image is named by its PCI vendor and device ID
          "iPXE (option ROM)", "808610d3"),
    Model("pvscsi", ("pvscsi",),
          ("pvscsi_on_cmd_arrived", "pvscsi_process_req_descr", "pvscsi_cmp_ring_put"),
          "PVSCSI_CMD_ADAPTER_RESET after the rings were set up, or bus mastering off",
          "PvScsiDxe"),
    Model("mptsas", ("mptsas1068",),
          ("mptsas_reset", "mptsas_process_message", "mptsas_process_scsi_io_request"),
          "an IOC reset after IOC init, or bus mastering off", "MptScsiDxe"),
    Model("lsi", ("lsi53c895a",), ("lsi_reset", "lsi_do_dma"),
          "no DMA engine stays armed between commands (SCRIPTS run only when started): "
          "judged by W2 alone, or bus mastering off", "LsiScsiDxe"),
)
BY_QOM = {qom: model for model in MODELS for qom in model.qom}
#: q35's chipset functions: the firmware sets their bus master bit, but QEMU
#: gives them no DMA engine; W1 does not count them.
NO_DMA_ENGINE = ("mch", "ICH9-LPC", "ICH9-SMB")
_BY_KIND = {model.kind: model for model in MODELS}
#: Every trace event enabled whatever the devices: the markers and the PCI
#: command register.
BASE_EVENTS = ("fw_cfg_select", "pci_cfg_write")
#: The page-state events of the harness's QEMU under an emulated SEV-SNP,
#: in the same trace (:mod:`harness.analysis.pagestates`: S1 to S3).
PAGE_STATE_EVENTS = ("sev_snp_launch_update", "sev_snp_page_state", "sev_snp_pvalidate",
                     "sev_snp_pvalidate_no_update", "sev_snp_not_validated")


def trace_events(kinds: Iterable[str]) -> tuple[str, ...]:
    """The QEMU trace events to enable for devices of ``kinds``."""
    out = list(BASE_EVENTS)
    for kind in kinds:
        for event in _BY_KIND[kind].events:
            if event not in out:
                out.append(event)
    return tuple(out)
