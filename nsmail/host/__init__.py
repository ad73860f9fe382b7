"""Unprivileged processes on the host side of the jails: the DNS relay.

Runs as a system user of its own, chrooted to an empty directory; it trusts the resolvers
the operator configured and nothing the workers send but well-formed DNS queries.
"""
