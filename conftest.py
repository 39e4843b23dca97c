"""Thin: the harness's pytest plugin (options, markers, fixtures) comes with
the installed package (entry point ``pytest11``); pytester lets tests/unit
check that plugin on inner pytest runs."""

pytest_plugins = ["pytester"]
