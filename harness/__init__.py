"""ovmf-ebs-harness: build a patched OVMF, boot it under QEMU, and judge
whether the IOMMU teardown at ExitBootServices came after every EBS handler.

Packages, in the order data flows through them:

- :mod:`harness.build`     cached builds: the patched firmware (``edk2``)
- :mod:`harness.vm`        QEMU machines, their consoles, the host probe,
                           guest images, QEMU on another host over SSH
- :mod:`harness.analysis`  debug log -> EBS timeline -> verdicts, symbols,
                           memory dumps, text and HTML reports; it imports
                           nothing from :mod:`harness.vm`

On top of them: :mod:`harness.scenario` (one boot of the probe guest, from
firmware to verdicts), :mod:`harness.linux` (the Linux guest),
:mod:`harness.cli` (the ``ebs-harness`` command) and
:mod:`harness.pytestplugin`; :mod:`harness.errors` holds the exception tree
and :mod:`harness.tools` runs host tools.

What the harness reads at run time ships inside the package, in
``harness/share/`` (:func:`shared`): the edk2 series (``ovmf-patches``), the
QEMU series (``qemu-patches``) and the guests' sources (``guests``). In a
checkout these are links to the repository's top-level directories of the
same names.
"""

from pathlib import Path

__version__ = "0.1.0"


def shared(*parts: str) -> Path:
    """The path of a file or directory the package ships (``harness/share/``)."""
    root = Path(__file__).parent / "share"
    if not root.is_dir():
        from harness.errors import DependencyError

        raise DependencyError(f"harness has no {root} on disk (installed as an archive?): "
                              "the builds need its files; install it unzipped (pip does)")
    return root.joinpath(*parts).resolve()
