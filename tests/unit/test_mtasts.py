"""MTA-STS's pure parts (RFC 8461): the record (3.1), the policy (3.2), MX matching (4.1),
the cache's decisions (5.1) and the HTTPS answer (3.3)."""

from __future__ import annotations

import pytest

from nsmail.core import mtasts
from nsmail.core.mtasts import Cached, FetchError, Mode, Policy, Record, Step

POLICY = (
    "version: STSv1\r\nmode: enforce\r\nmx: mx1.rcpt.test\r\nmx: *.mail.rcpt.test\r\n"
    "max_age: 86400\r\n"
)


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["v=STSv1; id=20240101T000000;"], Record("20240101T000000")),
        (["v=STSv1;id=abc"], Record("abc")),
        (["v=spf1 -all", "v=STSv1; id=abc; ext=1"], Record("abc")),  # others are ignored
        (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # two records: no policy
        (["v=STSv1; id=not-alnum"], None),
        (["v=STSv1; id=" + "a" * 33], None),  # 1*32 characters
        (["v=STSv1;"], None),  # no id
        (["v=STSv1; id=a; id=b"], None),
        ([], None),
    ],
)
def test_the_txt_record(texts: list[str], expected: Record | None) -> None:
    assert mtasts.parse_record(texts) == expected


def test_a_policy() -> None:
    policy = mtasts.parse_policy(POLICY)
    assert policy == Policy(Mode.ENFORCE, 86400, ("mx1.rcpt.test", "*.mail.rcpt.test"))
    assert policy is not None and mtasts.parse_policy(policy.text()) == policy
    # LF alone ends a line too, and unknown keys are ignored.
    assert mtasts.parse_policy(POLICY.replace("\r\n", "\n") + "future: yes\n") == policy


@pytest.mark.parametrize(
    "text",
    [
        POLICY.replace("STSv1", "STSv2"),
        POLICY.replace("enforce", "strict"),
        POLICY.replace("86400", "31557601"),  # over a year
        POLICY.replace("86400", "-1"),
        POLICY.replace("mx: mx1.rcpt.test\r\nmx: *.mail.rcpt.test\r\n", ""),  # enforce, no mx
        POLICY.replace("mx1.rcpt.test", "mx1 rcpt test"),
        POLICY + "mode: testing\r\n",  # mode twice
        POLICY + "garbage\r\n",
        "<html>not found</html>",
    ],
)
def test_a_policy_that_is_not_one(text: str) -> None:
    assert mtasts.parse_policy(text) is None


def test_mode_none_needs_no_mx() -> None:
    assert mtasts.parse_policy("version: STSv1\nmode: none\nmax_age: 0\n") == Policy(
        Mode.NONE, 0, ()
    )


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("mx1.rcpt.test", True),
        ("MX1.Rcpt.Test.", True),  # case and a final dot do not matter
        ("a.mail.rcpt.test", True),  # "*." stands for one label
        ("a.b.mail.rcpt.test", False),  # ... never two
        ("mail.rcpt.test", False),  # ... nor none
        ("mx2.rcpt.test", False),
        ("mx1.rcpt.test.evil.test", False),
    ],
)
def test_mx_matching(host: str, allowed: bool) -> None:
    policy = mtasts.parse_policy(POLICY)
    assert policy is not None and policy.allows(host) is allowed


CACHED = Cached(Policy(Mode.ENFORCE, 1000, ("mx.rcpt.test",)), "id1", fetched=10_000.0)


@pytest.mark.parametrize(
    ("cached", "record", "now", "step"),
    [
        (None, None, 10_100.0, Step.NONE),
        (None, Record("id1"), 10_100.0, Step.FETCH),
        (CACHED, Record("id1"), 10_100.0, Step.CACHED),
        (CACHED, Record("id2"), 10_100.0, Step.FETCH),  # a new id: the policy changed
        (CACHED, Record("id1"), 10_600.0, Step.FETCH),  # half its max_age gone: refreshed
        # The record stripped (or its lookup failed): the cached policy goes on applying,
        (CACHED, None, 10_900.0, Step.CACHED),
        # ... until it expires.
        (CACHED, None, 11_000.0, Step.NONE),
        (CACHED, Record("id1"), 11_000.0, Step.FETCH),
    ],
)
def test_what_to_do_with_the_cache(
    cached: Cached | None, record: Record | None, now: float, step: Step
) -> None:
    assert mtasts.plan(cached, record, now) is step


def test_the_cache_file_round_trips_and_refuses_what_it_did_not_write() -> None:
    assert mtasts.load(mtasts.dump(CACHED)) == CACHED
    for data in (b"", b"[]", b'{"id": "x"}', b"\xff", mtasts.dump(CACHED).replace(b"id1", b"i-d")):
        assert mtasts.load(data) is None


def response(status: str = "200 OK", media: str = "text/plain", body: bytes = b"x") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {media}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_the_https_answer() -> None:
    assert mtasts.parse_response(response(media="text/plain; charset=utf-8", body=b"abc")) == "abc"
    with pytest.raises(FetchError, match="answered 301, not 200"):
        mtasts.parse_response(response("301 Moved Permanently"))  # 3.3: never followed
    with pytest.raises(FetchError, match="not text/plain"):
        mtasts.parse_response(response(media="text/html"))
    with pytest.raises(FetchError, match="larger than"):
        mtasts.parse_response(response(body=b"x" * (mtasts.MAX_POLICY + 1)))
    with pytest.raises(FetchError, match="no end of header"):
        mtasts.parse_response(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(FetchError, match="not HTTP"):
        mtasts.parse_response(b"SSH-2.0\r\n\r\n")


def test_the_request_is_http_1_0_for_the_policy_host() -> None:
    assert mtasts.request("rcpt.test") == (
        b"GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: mta-sts.rcpt.test\r\n"
        b"User-Agent: nsmail\r\n\r\n"
    )
