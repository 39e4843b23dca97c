"""Thin: the harness's pytest plugin holds the options and fixtures."""

pytest_plugins = ["harness.pytestplugin"]
