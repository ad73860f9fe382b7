"""Fixtures more than one test module uses."""

from test_sendmail import site  # noqa: F401  (a tenant's configuration and home, in a tmp dir)
