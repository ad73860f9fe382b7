"""Hostile submissions, fuzzed: drawn messages through the real `nsmail-sendmail` command.

Each example runs the console script as a tenant uid (see test_sendmail) on a message built
from hostile parts: huge header lines, thousands of fields, NUL, bare CR and LF, 8-bit and
UTF-8 fields, no blank line, an early lone dot, -t with hostile To and Cc. The command exits
0, 64, 65 or 75 with one line on stderr, never a traceback; what it queued decodes, and
header completion (what the worker does at pick-up) completes it or raises HeaderError.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sites import SENDMAIL, Site, assert_nothing_queued, sendmail

from nsmail.core.headers import Completion, HeaderError, complete
from nsmail.core.queuefile import decode

pytestmark = pytest.mark.needs("root")  # runs the command as a tenant uid

EX_OK, EX_USAGE, EX_DATAERR, EX_TEMPFAIL = 0, 64, 65, 75


FIELDS = st.sampled_from(
    [
        b"Subject: plain",
        b"Subject: " + b"x" * 100_000,  # one header line of 100 kB, no whitespace to fold at
        b"Subject: " + b"word " * 20_000,
        b"X-Many: 1\n" * 5000 + b"X-Last: 1",
        b"Subject: nul\x00inside",
        b"Subject: bare\rcr",
        b"Subject: caf\xe9 latin-1",
        "Subject: caf\u00e9 \U0001f600 utf-8".encode(),
        b"Subject: =?utf-8?b?Y2Fmw6k=?= =?bogus?q?x?=",
        b"\x00: nul name",
        b" leading continuation",
        b"No colon at all",
        b"From: \xff\xfe <a@b.test>",
        b"To: undisclosed-recipients:;",
        b'To: group: a@b.test, (comment) b@c.test;, "q\\"uoted"@d.test',
        b"To: =?utf-8?q?J=C3=B6rg?= <jorg@e.test>, bare, <>, @, a@",
        b"Cc: " + b", ".join(b"r%d@f.test" % i for i in range(10_000)),
        b"Bcc: x@g.test\r\nBcc: \xe9@h.test",
        b"To: a@b.test\r\n (folded comment) c@d.test",
    ]
)
LINE_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\r"])
BODIES = st.sampled_from(
    [b"", b"body\n", b".\nafter the dot\n", b"..\n.x\n", b"\x00\x00", b"y" * 5000, b"\r\r\n\n"]
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(FIELDS, max_size=4))
    end = draw(LINE_ENDS)
    head = end.join(fields)
    separator = draw(st.sampled_from([end + end, end, b"", b"\n.\n", end + b"\x00" + end]))
    return head + separator + draw(BODIES) + draw(st.binary(max_size=50))


ARGUMENTS = st.sampled_from([["bob@cde.test"], ["-i", "bob@cde.test"], ["-t"], ["-t", "-i"]])


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(arguments=ARGUMENTS, message=messages())
@example(arguments=["-t"], message=b"")
@example(arguments=["-t", "-i"], message=b"To: \xe9\xff@x.test\n\nhi\n")
def test_any_submission_is_queued_whole_or_refused_in_one_line(
    site: Site, arguments: list[str], message: bytes
) -> None:
    shutil.rmtree(site.spool, ignore_errors=True)
    result = sendmail(site, arguments, message)  # checks: one stderr line when refused
    assert result.returncode in (EX_OK, EX_USAGE, EX_DATAERR, EX_TEMPFAIL), result.stderr
    if result.returncode != EX_OK:
        assert_nothing_queued(site)
        return
    (path,) = site.queued()
    envelope, body = decode(path.read_bytes())
    expected = message if "-i" in arguments else _up_to_dot(message)
    assert body == expected
    completion = Completion(
        domain=site.domain,
        local_user=envelope.submitter,
        full_name=envelope.full_name or None,
        envelope_sender=envelope.sender,
        now=datetime(2025, 1, 1, tzinfo=UTC),
        unique=path.name,
        extract_recipients=envelope.extract,
    )
    try:
        completed = complete(body, completion)
    except HeaderError as error:
        assert str(error).isprintable(), error
        return
    assert b"\x00" not in completed.message
    assert all(len(line) <= 998 for line in completed.message.split(b"\r\n"))


def _up_to_dot(message: bytes) -> bytes:
    """What sendmail keeps without -i: everything before the first line holding only "."."""
    *lines, last = message.split(b"\n")
    kept = b""
    for line in lines:
        if line in (b".", b".\r"):
            return kept
        kept += line + b"\n"
    return kept if last == b"." else message


@pytest.mark.parametrize("limit", ["", "message_size_limit = 0\n"], ids=["default", "none"])
def test_a_50_mb_body_is_queued_or_refused_naming_the_limit(site: Site, limit: str) -> None:
    site.write_config(tenant_extra=limit)
    chunk = (b"0123456789" * 100 + b"\n") * 1024  # about 1 MiB of 1001-byte lines
    with subprocess.Popen(
        [str(SENDMAIL), "-i", "bob@cde.test"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        bufsize=0,  # nothing left in a buffer to flush into a pipe the command closed
        cwd=site.root,
        env={"NSMAIL_CONFIG": str(site.config), "PATH": "/usr/bin:/bin"},
        user=site.uid,
        group=site.uid,
        extra_groups=[],
    ) as process:
        assert process.stdin is not None and process.stderr is not None
        sent = 0
        try:
            while sent < 50 << 20:
                sent += process.stdin.write(chunk) or 0
            process.stdin.close()
        except BrokenPipeError:
            pass  # refused before the end: it stopped reading
        stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) in (EX_OK, EX_DATAERR), stderr
    if process.returncode == EX_DATAERR:
        assert stderr.startswith("nsmail-sendmail: ") and stderr.count("\n") == 1, stderr
        assert "limit" in stderr, stderr
        assert_nothing_queued(site)
    else:
        (path,) = site.queued()
        assert len(decode(path.read_bytes())[1]) == sent
    if limit:  # 0: no limit, so it must have been taken
        assert process.returncode == EX_OK, stderr
