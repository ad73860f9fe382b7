"""DKIM signing (RFC 6376) of a tenant's outgoing mail, and the DNS record of its key.

A tenant with `dkim_selector` and `dkim_key` in its configuration has its mail signed by
its own worker. Decisions:
- Signed once, when the queue manager takes a message in (after header completion) and
  when it writes a bounce: the stored message is the message sent, every retry carries
  the same signature, and `t=` is the time the message was accepted.
- Only mail whose From addresses are all in the tenant's domain or a subdomain of it is
  signed (the DMARC relaxed alignment of RFC 7489 3.1.1, seen from the parent side): a
  signature with d=tenant on mail claiming to be from someone else would give DMARC
  nothing and lend the tenant's reputation to the claim. A tenant serving a subdomain
  does not sign for the parent. Other mail goes out unsigned and unchanged.
- relaxed/relaxed canonicalization (it survives the re-folding and trailing-space
  changes relays make); `h=` lists each present field of `SIGNED_FIELDS` as often as it
  occurs, and From once more (oversigned, RFC 6376 8.15) so that no From can be added.
  No `l=` (it lets anyone append to the body), no `x=`, no `i=` (defaults to @d).
- rsa-sha256 (RSA keys of 1024 bits or more, RFC 8301 3.2; keygen makes 2048) or
  ed25519-sha256 (RFC 8463), told apart by the PEM key itself.
- The signing is done here with `cryptography` (OpenSSL), not by dkimpy: dkimpy's
  signer reads the clock itself and wants Ed25519 keys as raw base64 seeds through
  PyNaCl. dkimpy is the tests' independent verifier instead.

Pure: the key and the time are passed in. The key files are read by
`nsmail.tenant.dkim.load_signer` (the worker, before its jail) and written by
`nsmail.commands.keygen` (`nsmail dkim keygen`).

Security: `sign` reads tenant-written messages: parsing is linear and never raises on
malformed input; a message whose From is not aligned is passed on unsigned.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import getaddresses

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from nsmail.core.addresses import in_domain, split
from nsmail.core.message import Message

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
MIN_RSA_BITS = 1024  # RFC 8301 3.2: verifiers ignore smaller keys
# RFC 6376 5.4.1: the fields a receiver expects signed, in the order h= lists them.
SIGNED_FIELDS = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"in-reply-to",
    b"references",
)
OVERSIGNED = (b"from",)
FOLD_AT = 76
TXT_STRING = 255  # RFC 1035 3.3.14: one <character-string> holds at most 255 octets

_WSP = re.compile(rb"[ \t]+")
_SPACE_AT_END = re.compile(rb" \r\n")
# RFC 6376 3.1: a selector is one or more dot-separated LDH labels.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class DkimError(Exception):
    """A key that cannot be used or written; one line for the operator."""


@dataclass(frozen=True, slots=True)
class Signer:
    """Signs one tenant's mail as d=`domain`, s=`selector`."""

    domain: str
    selector: str
    key: PrivateKey = field(repr=False)

    @property
    def algorithm(self) -> str:
        return "ed25519-sha256" if isinstance(self.key, ed25519.Ed25519PrivateKey) else "rsa-sha256"

    def sign(self, message: Message, now: float) -> Message:
        """`message` with a DKIM-Signature field prepended, or unchanged if its From is
        not the tenant's (see the module docstring). The body is hashed as it streams."""
        fields, _ = _split(message.head)
        if not _aligned(fields, self.domain):
            return message
        names = [name for name in SIGNED_FIELDS for f in fields if f[0] == name]
        names += OVERSIGNED
        body_hash = _relaxed_body_hash(message.body_wire())
        tags = [
            ("v", "1"),
            ("a", self.algorithm),
            ("c", "relaxed/relaxed"),
            ("d", self.domain),
            ("s", self.selector),
            ("t", str(int(now))),
            ("h", ":".join(n.decode() for n in names)),
            ("bh", base64.b64encode(body_hash).decode()),
        ]
        unsigned = _fold_tags(tags)
        # RFC 6376 3.7: the header hash ends with this field itself, its b= value empty.
        data = b"".join(_relaxed_header(raw) for raw in _select(fields, names))
        data += _relaxed_header(unsigned.removesuffix(b"\r\n")).removesuffix(b"\r\n")
        signature = base64.b64encode(self._signature(data)).decode()
        field = _fold_value(unsigned.removesuffix(b"\r\n"), signature) + b"\r\n"
        return Message(field + message.head, message.rest)

    def public_key(self) -> bytes:
        """The public key as DER SubjectPublicKeyInfo (what `nsmail.core.preflight` checks)."""
        return self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def _signature(self, data: bytes) -> bytes:
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            # RFC 8463 3: Ed25519 signs the SHA-256 hash of the data, not the data.
            return self.key.sign(hashlib.sha256(data).digest())
        return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def signer_from_pem(domain: str, selector: str, pem: bytes) -> Signer:
    """A Signer for a PEM private key (RSA or Ed25519, unencrypted); DkimError if unusable."""
    if not _SELECTOR.fullmatch(selector):
        raise DkimError(f"{selector!r} is not a selector (dot-separated LDH labels)")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise DkimError(f"not an unencrypted PEM private key: {e}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimError(f"a {key.key_size}-bit RSA key is too small (at least {MIN_RSA_BITS})")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DkimError(f"a {type(key).__name__} is neither an RSA nor an Ed25519 key")
    return Signer(domain, selector, key)


def dns_record(signer: Signer) -> str:
    """The zone file line publishing the signer's public key (RFC 6376 3.6.1, 3.6.2.1)."""
    public = signer.key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        # RFC 8463 4.2: the bare 32-octet key.
        kind = "ed25519"
        data = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        # RFC 6376 3.6.1 with erratum 3017: the SubjectPublicKeyInfo everyone publishes.
        kind, data = "rsa", signer.public_key()
    text = f"v=DKIM1; k={kind}; p={base64.b64encode(data).decode()}"
    strings = " ".join(f'"{text[i : i + TXT_STRING]}"' for i in range(0, len(text), TXT_STRING))
    return f"{signer.selector}._domainkey.{signer.domain}. IN TXT {strings}"


# --- message parsing and canonicalization (pure) ---------------------------------------


def _split(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """((lower-cased name, raw field without its last CRLF), ...), body) of a CRLF message."""
    head, _, body = (b"\r\n" + message).partition(b"\r\n\r\n")
    fields: list[list[bytes]] = []
    for line in head.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            if fields:  # a continuation line with nothing to continue is no field
                fields[-1].append(line)
        elif b":" in line:
            fields.append([line])
    raws = [b"\r\n".join(lines) for lines in fields]
    return [(raw.partition(b":")[0].strip(b" \t").lower(), raw) for raw in raws], body


def _aligned(fields: list[tuple[bytes, bytes]], domain: str) -> bool:
    from_fields = [raw for name, raw in fields if name == b"from"]
    if len(from_fields) != 1:  # RFC 5322 3.6: exactly one From
        return False
    value = from_fields[0].partition(b":")[2].decode("utf-8", "replace")
    addresses = [split(address) for _, address in getaddresses([value])]
    return bool(addresses) and all(
        bool(local) and in_domain(host, domain) for local, host in addresses
    )


def _select(fields: list[tuple[bytes, bytes]], names: list[bytes]) -> list[bytes]:
    """The fields `names` sign, in h= order; a repeated name takes its instances from the
    bottom up, and a name with none left signs nothing (RFC 6376 5.4.2)."""
    left = {name: [raw for n, raw in fields if n == name] for name in set(names)}
    return [left[name].pop() for name in names if left[name]]


def _relaxed_header(raw: bytes) -> bytes:
    """RFC 6376 3.4.2: lower-case name, unfolded, whitespace runs as one space, trimmed."""
    name, _, value = raw.partition(b":")
    value = _WSP.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value + b"\r\n"


def _relaxed_body_hash(lines: Iterable[bytes]) -> bytes:
    """RFC 6376 3.4.4 and 3.7: the SHA-256 of the body canonicalized relaxed: whitespace
    runs as one space, none at line ends, no trailing empty lines; a non-empty body ends
    in CRLF. `lines` come in pieces of whole CRLF lines."""
    digest = hashlib.sha256()
    empty = b""  # a run of empty lines, written only if more text follows
    for piece in lines:
        canonical = _SPACE_AT_END.sub(b"\r\n", _WSP.sub(b" ", piece))
        text = canonical.rstrip(b"\r\n")
        if text:
            digest.update(empty + text + b"\r\n")
            empty = canonical[len(text) + 2 :]
        else:
            empty += canonical
    return digest.digest()


def _fold_tags(tags: list[tuple[str, str]]) -> bytes:
    """ "DKIM-Signature: tag=value; ... b=" folded before FOLD_AT, with its CRLF."""
    pieces: list[tuple[str, str]] = []  # (glue if not folded, text)
    for name, value in tags:
        # h= may fold before any colon (RFC 6376 3.5): a long list keeps within the limit.
        first, *rest = value.split(":") if name == "h" else [value]
        texts = [f"{name}={first}", *(f":{n}" for n in rest)]
        texts[-1] += ";"
        pieces += [(" ", texts[0]), *(("", text) for text in texts[1:])]
    pieces.append((" ", "b="))
    lines = ["DKIM-Signature:"]
    for glue, text in pieces:
        if len(lines[-1]) + len(glue) + len(text) > FOLD_AT:
            lines.append("\t" + text)
        else:
            lines[-1] += glue + text
    return "\r\n".join(lines).encode() + b"\r\n"


def _fold_value(unsigned: bytes, signature: str) -> bytes:
    """The field with the b= value appended; base64 may fold anywhere (RFC 6376 3.5)."""
    last_line = len(unsigned) - (unsigned.rfind(b"\n") + 1)
    room = max(FOLD_AT - last_line, 0)
    chunks = [signature[:room]] + [
        signature[i : i + FOLD_AT - 1] for i in range(room, len(signature), FOLD_AT - 1)
    ]
    return unsigned + "\r\n\t".join(chunks).encode()
