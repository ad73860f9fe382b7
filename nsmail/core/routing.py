"""The MX routing decision: from a domain's MX answer to the ordered hosts to try."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NullMX:
    """The domain publishes that it accepts no mail (RFC 7505): bounce, do not connect."""


@dataclass(frozen=True, slots=True)
class Targets:
    """Mail exchangers to try in this order; `implicit` when the domain had no MX."""

    hosts: tuple[str, ...]
    implicit: bool


def route(
    domain: str, mx: Sequence[tuple[int, str]] | None, rng: random.Random
) -> Targets | NullMX:
    """Order the MX records `mx` of `domain`; None or empty means the domain has no MX.

    Host names come back lower-case without the trailing dot.
    """
    if not mx:
        # RFC 5321 5.1: no MX records, the domain itself is the implicit MX.
        return Targets(hosts=(_host(domain),), implicit=True)
    real = [(preference, _host(exchange)) for preference, exchange in mx if _host(exchange)]
    if not real:
        # RFC 7505 3: a lone MX with the root as exchange means "no mail service".
        return NullMX()
    # RFC 5321 5.1: lowest preference first, random order among equal preferences.
    rng.shuffle(real)
    real.sort(key=lambda record: record[0])
    hosts: list[str] = []
    for _, host in real:
        if host not in hosts:
            hosts.append(host)
    return Targets(hosts=tuple(hosts), implicit=False)


def _host(name: str) -> str:
    return name.rstrip(".").lower()
