"""The `nsmail` command and its verbs: parse arguments, call the core, map errors to exits.

Run by root, the admin group and tenants' users; it trusts the configuration, no caller:
each verb checks who calls before it acts, and works in a queue only with its owner's rights.
"""
