"""nsmail's pure core: formats, protocols and decisions, with no IO, no clock and no OS.

Runs in every process (root, tenant, submitter) and trusts nothing it is given: its inputs
are bytes, numbers and the time, passed in by the thin IO shells around it.
"""
