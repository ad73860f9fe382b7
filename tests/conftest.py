"""Fixtures more than one test module uses, and where temporary files go; the tiers and
what tests need of the machine are the `tiers` plugin's (tests/support/tiers.py)."""

import os
import tempfile
from collections.abc import Iterator

import pytest
from lab.topology import temp_root
from needs import require
from sites import Site, made_site

pytest_plugins = ("tiers",)

if os.geteuid() == 0:
    # Tenant homes made in temporary directories must not be under /tmp (see temp_root).
    tempfile.tempdir = str(temp_root())


@pytest.fixture
def site() -> Iterator[Site]:
    """A tenant's configuration and home for the real nsmail-sendmail, in a tmp dir."""
    require("root")  # the command runs as the tenant's uid
    with made_site() as made:
        yield made
