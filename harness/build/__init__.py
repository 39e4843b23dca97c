"""Cached builds from source: the patched OVMF (:mod:`harness.build.edk2`)."""
