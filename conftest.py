"""Top-level pytest configuration: the imgbench plugin and the case fixtures."""

pytest_plugins = [
    "imgbench.pytest_plugin",
    "fixtures.datasets",
    "fixtures.cases",
]
