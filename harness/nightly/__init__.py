"""Nightly runs across hosts, remembered: ``ebs-harness nightly --plan PLAN.toml``.

:mod:`.plan` reads the plan (hosts, firmware, scenarios, SEV modes and
accelerators) into cases; :mod:`.cases` runs them as pytest items, one
pytest-xdist worker per host; :mod:`.history` keeps every run and case in
one SQLite file; :mod:`.report` compares a run with the ones before it and
says what regressed, in text, HTML and the exit status.
"""
