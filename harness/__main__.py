"""``python -m harness``: the same as the ``ebs-harness`` command."""

from harness.cli import run

run()
