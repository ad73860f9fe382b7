"""Fixtures more than one test module uses, and where temporary files go."""

import os
import tempfile
from collections.abc import Iterator

import pytest
from lab.topology import temp_root
from sites import Site, made_site

if os.geteuid() == 0:
    # Tenant homes made in temporary directories must not be under /tmp (see temp_root).
    tempfile.tempdir = str(temp_root())


@pytest.fixture
def site() -> Iterator[Site]:
    """A tenant's configuration and home for the real nsmail-sendmail, in a tmp dir."""
    if os.geteuid() != 0:
        pytest.skip("runs the command as other uids")
    with made_site() as made:
        yield made
