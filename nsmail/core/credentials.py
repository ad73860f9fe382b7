"""SMTP AUTH credentials of tenants' users: the file's format, one `user@domain:hash` a line.

Pure. The file (`FILE_NAME`, beside the configuration file) is root's, mode 0600, and
written only by `nsmail tenant passwd`; the supervisor opens it and hands the open file
to the submission front, which reads it (`nsmail.host.submission`). Like Dovecot's
passwd-file, each line names a user and a crypt(3) hash of its password: yescrypt, as
Debian's shadow writes it (`$y$...`, `nsmail.host.passwords`). A login name is
case-insensitive (it is lower-cased, as Dovecot's default %Lu), and its domain must be a
tenant's: the front takes no login of a domain that is not configured.

Security: read by root (the command) and by the unprivileged front, never by a tenant.
Parsing refuses, with the line number, anything but the format, so a hand edit gone
wrong cannot pass for another user; a hash is never printed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

FILE_NAME = "submission.passwd"
# RFC 5321 4.1.2 Dot-string local part (atext of RFC 5322 3.2.3), "@", LDH labels.
_USER = re.compile(
    r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+"
)
_HASH = re.compile(r"\$[0-9a-z]{1,4}\$[./0-9A-Za-z$=,]{1,500}")  # crypt(3) "$id$..."
MAX_LOCAL = 64  # RFC 5321 4.5.3.1.1


class CredentialsError(ValueError):
    """A line of the file, or a name, is not what the format allows."""


def login(local: str, domain: str) -> str:
    """The login name of `local` at `domain`; CredentialsError if it cannot be one."""
    name = f"{local}@{domain}".lower()
    if len(local) > MAX_LOCAL or not _USER.fullmatch(name):
        raise CredentialsError(f"{name!r} is not a user name (local part @ domain)")
    return name


def parse(text: str) -> dict[str, str]:
    """The users and their hashes; CredentialsError naming the first bad line."""
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not _USER.fullmatch(user) or not _HASH.fullmatch(hashed):
            raise CredentialsError(f"line {number}: not user@domain:$id$hash")
        if user in entries:
            raise CredentialsError(f"line {number}: {user} is there twice")
        entries[user] = hashed
    return entries


def render(entries: Mapping[str, str]) -> str:
    """The file's text for `entries`, sorted (parse(render(e)) == e)."""
    head = "# nsmail SMTP AUTH users: written by `nsmail tenant passwd DOMAIN USER`\n"
    return head + "".join(f"{user}:{entries[user]}\n" for user in sorted(entries))


def of_domains(entries: Mapping[str, str], domains: frozenset[str]) -> dict[str, str]:
    """The entries whose domain is one of `domains` (the configured tenants')."""
    return {u: h for u, h in entries.items() if u.rpartition("@")[2] in domains}
