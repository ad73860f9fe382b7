"""A failed connection in words for people: what went wrong, and what the client was doing.

Delivery outcomes, log lines and bounces say "connection refused" or "timed out after 30 s
while waiting for the greeting", never `ConnectionRefusedError: [Errno 111]`: `describe` is
the one place such text is made, for every SMTP client of nsmail.

Pure: an exception and what was going on in, one line of text out.
"""

from __future__ import annotations

import re
import smtplib
import ssl

# What the client was doing, to complete the sentence (`describe`'s `doing`).
CONNECTING = "while connecting"
GREETING = "while waiting for the greeting"
TLS_HANDSHAKE = "in the TLS handshake"
SENDING = "while sending the message"

# OpenSSL's decoration of its messages: "[SSL: CODE] text (_ssl.c:992)".
_OPENSSL_NOISE = re.compile(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$")


def reply_to(command: str) -> str:
    """`doing` while the client waits for the reply to `command` ("MAIL", "the message")."""
    return f"while waiting for the reply to {command}"


def describe(error: BaseException, doing: str = "", timeout: float | None = None) -> str:
    """`error` as words, followed by `doing` (one of the phrases above) when it helps.

    `timeout` is the limit a timeout ran into, in seconds.
    """
    if isinstance(error, TimeoutError):
        what = f"timed out after {timeout:g} s" if timeout else "timed out"
    elif isinstance(error, ssl.SSLCertVerificationError):
        why = getattr(error, "verify_message", None) or _openssl(error)
        return f"TLS certificate not accepted: {why}"
    elif isinstance(error, ssl.SSLError):
        if doing == TLS_HANDSHAKE:
            return f"TLS handshake failed: {_openssl(error)}"
        what = f"TLS failed: {_openssl(error)}"
    elif isinstance(error, smtplib.SMTPServerDisconnected):
        what = "the server closed the connection"
    elif isinstance(error, smtplib.SMTPResponseException):
        what = _reply(error)
    elif isinstance(error, OSError) and error.strerror:
        what = _lower_first(error.strerror)
        if doing == CONNECTING:
            return what  # "connection refused", "network is unreachable": it goes without saying
    else:
        what = str(error) or "unknown error"
    return f"{what} {doing}" if doing else what


def _openssl(error: ssl.SSLError) -> str:
    reason = getattr(error, "reason", None)  # "WRONG_VERSION_NUMBER", set by OpenSSL only
    if reason:
        return str(reason).lower().replace("_", " ")
    return _OPENSSL_NOISE.sub("", str(error.strerror or error)) or "unknown error"


def _reply(error: smtplib.SMTPResponseException) -> str:
    text = error.smtp_error
    words = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    # Code -1: not a reply at all, but what was wrong with the one read (malformed, too long).
    return words if error.smtp_code < 0 else f"{error.smtp_code} {words}"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]
