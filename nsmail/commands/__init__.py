"""The `nsmail` command and its verbs: parse arguments, call the core, map errors to exits.

Run by root, the admin group and tenants' users; each verb checks who calls before it acts
and works in a tenant's queue only with that queue's owner's rights.
"""
