"""Failed connections in words: what a person reads in a log line, a bounce or the queue."""

from __future__ import annotations

import smtplib
import ssl

import pytest

from nsmail.tenant.neterror import CONNECTING, GREETING, SENDING, TLS_HANDSHAKE, describe, reply_to


def verify_error(message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] failed (_ssl.c:1)")
    error.verify_message = message
    return error


@pytest.mark.parametrize(
    ("error", "doing", "words"),
    [
        (ConnectionRefusedError(111, "Connection refused"), CONNECTING, "connection refused"),
        (OSError(101, "Network is unreachable"), CONNECTING, "network is unreachable"),
        (TimeoutError("timed out"), CONNECTING, "timed out after 30 s while connecting"),
        (TimeoutError(), GREETING, "timed out after 30 s while waiting for the greeting"),
        (
            ConnectionResetError(104, "Connection reset by peer"),
            reply_to("DATA"),
            "connection reset by peer while waiting for the reply to DATA",
        ),
        (
            smtplib.SMTPServerDisconnected("Connection unexpectedly closed"),
            SENDING,
            "the server closed the connection while sending the message",
        ),
        (
            smtplib.SMTPResponseException(-1, b"malformed reply: b'hello'"),
            reply_to("MAIL"),
            "malformed reply: b'hello' while waiting for the reply to MAIL",
        ),
        (
            ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:992)"),
            TLS_HANDSHAKE,
            "TLS handshake failed: wrong version number",
        ),
        (
            verify_error("certificate has expired"),
            TLS_HANDSHAKE,
            "TLS certificate not accepted: certificate has expired",
        ),
        (ValueError("bad"), "", "bad"),
    ],
)
def test_errors_become_words(error: BaseException, doing: str, words: str) -> None:
    assert describe(error, doing, timeout=30) == words


def test_no_python_names_whatever_the_error() -> None:
    for error in (OSError(), TimeoutError(), ssl.SSLError(), KeyError()):
        text = describe(error, GREETING)
        assert "Error" not in text and "[Errno" not in text, text
    assert describe(TimeoutError()) == "timed out"  # no limit known, none invented
