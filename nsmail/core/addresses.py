"""Mail addresses: a mailbox split into its local part and domain, and domains compared.

An address is local-part@domain (RFC 5321 4.1.2). Its local part is the receiving
domain's to interpret (case-sensitive on the wire, RFC 5321 2.4); its domain is a DNS name,
the same name whatever its case (RFC 4343) and with or without the root's final dot.
`nsmail-sendmail` imports this at every start, so it imports nothing.
"""

from __future__ import annotations


def split(address: str) -> tuple[str, str]:
    """(local part, domain) of `address`, split at its last "@" (a quoted local part may
    hold one, a domain never does); the domain is "" when there is no "@"."""
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


def with_domain(address: str, domain: str) -> str:
    """`address`, or `address`@`domain` when it is a bare local part (no "@" at all)."""
    return address if "@" in address else f"{address}@{domain}"


def same_domain(a: str, b: str) -> bool:
    """Whether `a` and `b` name the same domain."""
    return _canonical(a) == _canonical(b)


def in_domain(name: str, domain: str) -> bool:
    """Whether `name` is `domain` or a name below it (a subdomain, a host in it)."""
    name, domain = _canonical(name), _canonical(domain)
    return bool(domain) and (name == domain or name.endswith("." + domain))


def _canonical(name: str) -> str:
    return name.removesuffix(".").lower()
