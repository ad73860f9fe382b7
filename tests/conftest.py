"""Fixtures more than one test module uses, and where temporary files go."""

import os
import tempfile

from lab.topology import temp_root
from test_sendmail import site  # noqa: F401  (a tenant's configuration and home, in a tmp dir)

if os.geteuid() == 0:
    # Tenant homes made in temporary directories must not be under /tmp (see temp_root).
    tempfile.tempdir = str(temp_root())
