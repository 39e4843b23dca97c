"""Thin: the harness's pytest plugin holds the options and fixtures;
pytester lets tests/unit check that plugin on inner pytest runs."""

pytest_plugins = ["harness.pytestplugin", "pytester"]
