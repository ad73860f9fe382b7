"""Failed SMTP logins per client address: how many, and whether to take another try now.

Pure: time is passed in. The submission front (`nsmail.host.submission`) counts each
failed AUTH of a client against its address, an IPv6 client against its /64 (a host
there has a whole /64 to pick addresses from, RFC 4291 2.5.1); once `limit` failures
fall within `window` seconds of each other, AUTH from there is refused until `window`
seconds after the last one (Dovecot's auth_failure penalty and fail2ban's ban, in
small). A success forgets the address.

Memory is bounded whatever the clients do: at most `capacity` addresses are kept, the
one longest without a failure dropped first, so an attacker with more addresses than
that can only make the throttle forget some of them sooner; each address costs one
entry (its key, a count and a time).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field

LIMIT = 5  # failures in a row, each within WINDOW of the one before
WINDOW = 600.0  # seconds
CAPACITY = 4096  # addresses remembered


def client_key(address: str) -> str:
    """The address as the throttle counts it: IPv4 as it is, IPv6 by its /64."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an address (a Unix socket's peer): counted as itself
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


@dataclass
class LoginThrottle:
    limit: int = LIMIT
    window: float = WINDOW
    capacity: int = CAPACITY
    _seen: OrderedDict[str, _Failures] = field(default_factory=OrderedDict)

    def blocked(self, key: str, now: float) -> bool:
        """Whether AUTH from `key` is refused now."""
        failures = self._current(key, now)
        return failures is not None and failures.count >= self.limit

    def failed(self, key: str, now: float) -> None:
        failures = self._current(key, now)
        if failures is None:
            failures = self._seen[key] = _Failures(0, now)
        failures.count += 1
        failures.last = now
        self._seen.move_to_end(key)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self._seen.pop(key, None)

    def __len__(self) -> int:
        return len(self._seen)

    def _current(self, key: str, now: float) -> _Failures | None:
        failures = self._seen.get(key)
        if failures is not None and now - failures.last >= self.window:
            del self._seen[key]  # a window without a failure forgives the rest
            return None
        return failures
