"""SMTP AUTH (RFC 4954) as a server reads it: the PLAIN (RFC 4616) and LOGIN mechanisms.

Pure. `decode_plain` and `decode_text` turn what a client sent, base64, into the identity
and password it claims; `Credentials.user` is what is looked up (the authorization
identity, when there is one, must be the same: nsmail lets no one act for another).
LOGIN is no RFC, but every client that speaks AUTH speaks it (Outlook, PHPMailer, old
WordPress plugins): the server asks "Username:" and "Password:", each answered by one
base64 line.

Security: every byte is the client's. Responses are decoded strictly (no characters
outside base64, padding checked), only as UTF-8, and bounded in length before anything
is decoded; a NUL or control character in a name is refused.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

MECHANISMS = ("PLAIN", "LOGIN")
MAX_RESPONSE = 1024  # base64 octets of one response: a name and a password, generously
MAX_NAME = 255  # RFC 4616 2 leaves it open; an address is at most 254 (RFC 5321 4.5.3.1.3)
MAX_PASSWORD = 255
# The prompts of LOGIN, as every implementation sends them (base64 of the text).
USERNAME_PROMPT = base64.b64encode(b"Username:").decode()
PASSWORD_PROMPT = base64.b64encode(b"Password:").decode()


class AuthError(ValueError):
    """The response cannot be a name and a password (RFC 4954 4: 501)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a client claims: who it is, as whom it would act, and its password."""

    authcid: str  # the authentication identity: the name the password belongs to
    password: str
    authzid: str = ""  # the authorization identity; "" acts as `authcid`

    @property
    def user(self) -> str:
        return self.authcid

    @property
    def acts_as_itself(self) -> bool:
        return self.authzid in ("", self.authcid)

    def __repr__(self) -> str:  # a password never reaches a log through repr()
        return f"Credentials(authcid={self.authcid!r}, authzid={self.authzid!r})"


def decode_plain(response: str) -> Credentials:
    """RFC 4616 2: base64 of `authzid NUL authcid NUL passwd`."""
    authzid, authcid, password = _split(_decode(response), 3)
    return Credentials(_name(authcid), _password(password), _name(authzid, empty=True))


def decode_text(response: str, *, secret: bool = False) -> str:
    """One LOGIN response: the user name, or with `secret` the password."""
    (text,) = _split(_decode(response), 1)
    return _password(text) if secret else _name(text)


def encode_plain(user: str, password: str, authzid: str = "") -> str:
    """The PLAIN response for `user` (for clients and tests)."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def _decode(response: str) -> bytes:
    if len(response) > MAX_RESPONSE:
        raise AuthError("response too long")
    try:
        return base64.b64decode(response.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise AuthError("response is not base64") from None


def _split(data: bytes, parts: int) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthError("response is not UTF-8") from None
    fields = text.split("\0")
    if len(fields) != parts:
        raise AuthError("response has the wrong number of fields")
    return fields


def _name(text: str, *, empty: bool = False) -> str:
    if (not text and not empty) or len(text) > MAX_NAME or not text.isprintable():
        raise AuthError("not a user name")
    return text


def _password(text: str) -> str:
    if not text or len(text) > MAX_PASSWORD or "\0" in text:
        raise AuthError("not a password")
    return text
