"""Host-side code that needs no privilege: the DNS relay, and reading the configuration.

Runs as a user of its own (the relay, chrooted, trusting the configured resolvers and only
well-formed queries) or as its caller (configfile, trusting the administrator's files).
"""
