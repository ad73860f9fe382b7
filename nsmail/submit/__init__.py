"""What `nsmail-sendmail` runs, as the submitting user, started once per message.

It trusts the kernel for who the caller is and root's cache beside the configuration for
what that caller may do; it imports only modules built into the interpreter (kept lean).
"""
