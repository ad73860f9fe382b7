"""Test tiers by directory, and what their tests need: a pytest plugin (tests/conftest.py
loads it).

A test's tier is the directory its file is in, one of `TIERS`, and the test is marked with
it, so `-m unit` runs the fast tier and `-m "not e2e"` leaves the slowest out. A file
outside them is a usage error: the tree says what each test needs. Tests in root/ need
root, tests in e2e/ root, Postfix and NSD; a test needing more says so with
`@pytest.mark.needs("root")` or a program's name (`needs("swaks")`), and `needs.require`
skips it, or fails it under CI=true, when the machine does not give it.
"""

from __future__ import annotations

import pytest
from needs import require

TIERS = {
    "unit": "pure logic and temporary files: no root, no subprocess, no socket (seconds)",
    "loopback": "real sockets on loopback, subprocesses, forked workers, uid switches",
    "root": "network namespaces, as root",
    "e2e": "real Postfix and NSD in a lab, the real supervisor",
    "fuzz": "hypothesis fuzzers",
}
NEEDS_OF_TIER = {"root": ("root",), "e2e": ("root", "postfix", "nsd")}


def tier_of(item: pytest.Item) -> str:
    tier = item.path.parent.name
    if tier not in TIERS:
        where = ", ".join(f"tests/{t}" for t in TIERS)
        raise pytest.UsageError(f"{item.path}: a test file belongs directly in one of {where}")
    return tier


def pytest_configure(config: pytest.Config) -> None:
    for tier, what in TIERS.items():
        config.addinivalue_line("markers", f"{tier}: {what}; set by the test's directory")
    config.addinivalue_line(
        "markers", 'needs(*what): "root" or programs on PATH the test cannot run without'
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(tier_of(item))


@pytest.hookimpl(tryfirst=True)  # before fixtures are set up: a lab needs root to be made
def pytest_runtest_setup(item: pytest.Item) -> None:
    marked = (need for mark in item.iter_markers("needs") for need in mark.args)
    require(*NEEDS_OF_TIER.get(tier_of(item), ()), *marked)
