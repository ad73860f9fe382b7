"""What `nsmail-sendmail` runs, as the submitting user, started once per message.

Runs as any local user; it trusts the kernel for who the caller is and root's cache beside
the configuration for what that caller may do. At start it imports only what is kept lean.
"""
