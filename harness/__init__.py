"""ovmf-ebs-harness: build a patched OVMF, boot it under QEMU, and judge
whether the IOMMU teardown at ExitBootServices came after every EBS handler.

Modules, in the order data flows through them:

- :mod:`harness.edk2`    edk2 source, patch series, cached firmware builds
- :mod:`harness.host`    what this host can run (TCG, KVM, SEV, SEV-ES)
- :mod:`harness.machine` a QEMU process and its QMP connection
- :mod:`harness.console` expect over serial and debug logs
- :mod:`harness.guest`   per-run guest images (FAT image, canary)
- :mod:`harness.trace`   debug log -> EBS timeline -> verdicts
- :mod:`harness.dump`    QEMU ELF core -> page tables, mapping list, canary
- :mod:`harness.cli`     the ``ebs-harness`` command
"""

__version__ = "0.1.0"
