"""MTA-STS (RFC 8461): the `_mta-sts` TXT record, the policy, which MX hosts it allows, and
what a sender does with a cached policy and a fresh record.

Pure: records and policy text in, values and decisions out; the time is passed in.
`parse_record` reads the TXT record (3.1), `parse_policy` the policy file (3.2),
`Policy.allows` matches an MX host against it (4.1), `plan` decides between a cached
policy, a fetch and no policy (3.3, 5.1), and `parse_response` takes the HTTPS answer
apart (3.3: 200 only, no redirects, text/plain). The fetch itself is the worker's
(`nsmail.tenant.policies`).

Security: the record and the policy are written by whoever controls the recipient's
zone and web server, and the cached copy lives in the tenant's own spool; all of it is
parsed with bounds, and anything malformed counts as no policy (RFC 8461 3.1, 3.2),
never as an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

MAX_POLICY = 64 * 1024  # bytes of policy body read (RFC 8461 3.3 lets senders bound it)
MAX_AGE = 31557600  # RFC 8461 3.2: max_age is at most a year, in seconds
WELL_KNOWN = "/.well-known/mta-sts.txt"  # RFC 8461 3.3
# 3.1: sts-id = 1*32(ALPHA / DIGIT).
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
# 3.2: max_age = 1*10DIGIT; mx = a host name, the leftmost label possibly "*".
_AGE = re.compile(r"[0-9]{1,10}")
_MX = re.compile(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)+\.?")
# Refreshed once less than this share of its max_age is left (5.1: "proactively").
REFRESH_SHARE = 0.5


class Mode(StrEnum):
    ENFORCE = "enforce"  # no delivery to a host that does not match or fails to verify
    TESTING = "testing"  # delivered anyway; failures reported (RFC 8460)
    NONE = "none"  # the domain withdraws its policy


@dataclass(frozen=True, slots=True)
class Record:
    """The `_mta-sts.<domain>` TXT record: a policy exists, and its id (3.1)."""

    id: str


@dataclass(frozen=True, slots=True)
class Policy:
    """A policy file (3.2)."""

    mode: Mode
    max_age: int  # seconds it may be cached
    mx: tuple[str, ...]  # host names, "*.example.net" for one label of any name

    def allows(self, host: str) -> bool:
        """Whether MX `host` matches the policy (4.1): exactly, or a "*." pattern standing
        for its leftmost label only; case-insensitive, a trailing dot ignored."""
        name = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, dot, rest = name.partition(".")
                if label and dot and rest == pattern[2:]:
                    return True
            elif name == pattern:
                return True
        return False

    def text(self) -> str:
        """The policy as a policy file, for the cache and for TLS reports (RFC 8460 4.4)."""
        lines = ["version: STSv1", f"mode: {self.mode}", f"max_age: {self.max_age}"]
        return "\r\n".join(lines + [f"mx: {mx}" for mx in self.mx]) + "\r\n"


@dataclass(frozen=True, slots=True)
class Cached:
    """A policy as fetched: with the record id it came under and when (epoch seconds)."""

    policy: Policy
    id: str
    fetched: float

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.policy.max_age

    def due_for_refresh(self, now: float) -> bool:
        return now >= self.fetched + self.policy.max_age * REFRESH_SHARE


class Step(StrEnum):
    """What to do before delivering to a domain (5.1)."""

    NONE = "none"  # no policy: deliver as before
    CACHED = "cached"  # apply the cached policy as it is
    FETCH = "fetch"  # fetch; on failure apply the cached one if any, else none


def parse_record(texts: Sequence[str]) -> Record | None:
    """The record among the TXT records of `_mta-sts.<domain>` (each given as its joined
    strings), or None: records not starting "v=STSv1;" are ignored, and anything but
    exactly one valid record left means no policy (3.1)."""
    candidates = [t for t in texts if t.startswith("v=STSv1;") or t == "v=STSv1"]
    if len(candidates) != 1:
        return None
    fields = _fields(candidates[0], ";", "=")
    if fields is None or fields.get("v") != "STSv1":
        return None
    found = fields.get("id", "")
    return Record(found) if _ID.fullmatch(found) else None


def parse_policy(text: str) -> Policy | None:
    """The policy in a policy file's text, or None if it is not a valid one (3.2).

    Lines are "key: value", ended by LF or CRLF; unknown keys are ignored; `mx` may
    repeat; `version`, `mode` and `max_age` must be there, and `mx` too unless the mode
    is none.
    """
    values: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            return None
        values.setdefault(key.strip(), []).append(value.strip())
    single = {k: v[0] for k, v in values.items() if len(v) == 1}
    if single.get("version") != "STSv1" or "mode" not in single or "max_age" not in single:
        return None
    try:
        mode = Mode(single["mode"])
    except ValueError:
        return None
    age = single["max_age"]
    if not _AGE.fullmatch(age) or int(age) > MAX_AGE:
        return None
    mx = tuple(m.lower().rstrip(".") for m in values.get("mx", ()))
    if any(not _MX.fullmatch(m) for m in mx) or (not mx and mode is not Mode.NONE):
        return None
    return Policy(mode, int(age), mx)


def plan(cached: Cached | None, record: Record | None, now: float) -> Step:
    """Whether to fetch, use what is cached, or deliver without a policy (3.3, 5.1).

    A cached policy that has not expired applies even when the record is gone or the
    lookup failed: that is what protects against an attacker who strips the record. A
    record whose id differs from the cached one, or a cached policy due for refresh,
    means fetching again.
    """
    usable = cached is not None and not cached.expired(now)
    if record is None:
        return Step.CACHED if usable else Step.NONE
    if not usable or cached is None or cached.id != record.id or cached.due_for_refresh(now):
        return Step.FETCH
    return Step.CACHED


def parse_response(data: bytes) -> str:
    """The policy text of an HTTP/1.0 response, read to its end; raises `FetchError`.

    3.3: only a 200 counts (redirects are not followed), the media type must be
    text/plain, and the body is bounded (MAX_POLICY).
    """
    head, blank, body = data.partition(b"\r\n\r\n")
    if not blank:
        raise FetchError("the HTTPS response has no end of header")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1."):
        raise FetchError("the HTTPS response is not HTTP")
    if status[1] != "200":
        raise FetchError(f"the policy server answered {status[1][:3]}, not 200")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "text/plain":
        raise FetchError(f"the policy is of type {media[:40] or 'none'!r}, not text/plain")
    length = headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit():
        body = body[: int(length)]
    if len(body) > MAX_POLICY:
        raise FetchError(f"the policy is larger than {MAX_POLICY} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise FetchError("the policy is not UTF-8") from None


def dump(cached: Cached) -> bytes:
    """The cache file of a policy."""
    fields = {"id": cached.id, "fetched": cached.fetched, "policy": cached.policy.text()}
    return json.dumps(fields, sort_keys=True).encode()


def load(data: bytes) -> Cached | None:
    """The policy in a cache file, or None if it is not one (the file is the tenant's)."""
    try:
        fields = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(fields, dict) or set(fields) != {"id", "fetched", "policy"}:
        return None
    found, fetched, text = fields["id"], fields["fetched"], fields["policy"]
    if not isinstance(found, str) or not _ID.fullmatch(found) or not isinstance(text, str):
        return None
    if type(fetched) not in (int, float) or not 0 <= fetched < 2**40:
        return None
    policy = parse_policy(text)
    return None if policy is None else Cached(policy, found, float(fetched))


class FetchError(Exception):
    """The policy could not be had: one line saying why."""


def request(domain: str) -> bytes:
    """The HTTP request for `domain`'s policy: HTTP/1.0, so the answer is never chunked
    and ends with the connection (RFC 9112 7.1: no chunked coding for an HTTP/1.0 client)."""
    host = f"mta-sts.{domain}"
    return f"GET {WELL_KNOWN} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: nsmail\r\n\r\n".encode()


def _fields(text: str, separator: str, equals: str) -> dict[str, str] | None:
    fields: dict[str, str] = {}
    for part in text.split(separator):
        if not part.strip():
            continue
        key, eq, value = part.partition(equals)
        if not eq or key.strip() in fields:
            return None
        fields[key.strip()] = value.strip()
    return fields
