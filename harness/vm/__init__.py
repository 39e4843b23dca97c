"""QEMU guests: :mod:`~harness.vm.machine` (a QEMU process and its QMP),
:mod:`~harness.vm.console` (expect over its logs), :mod:`~harness.vm.host`
(what this host can run), :mod:`~harness.vm.guest` (guest images),
:mod:`~harness.vm.ssh` and :mod:`~harness.vm.remote` (QEMU on another host)."""
