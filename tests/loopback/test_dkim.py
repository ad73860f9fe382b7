"""DKIM: signatures dkimpy verifies, what is (not) signed, keygen, and who can read a key."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy  # the independent verifier
import prctl
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsmail.commands.keygen import keygen
from nsmail.core import dkim, preflight
from nsmail.core.message import Message
from nsmail.root.jail import drop, run_as
from nsmail.tenant.dkim import load_signer

pytestmark = pytest.mark.needs("root")

TENANT_UID = 47311
OTHER_UID = 47312
NOW = 1_700_000_000.0
MESSAGE = (
    b"Received: from localhost by bcd.test\r\n"
    b"From: Ann Example <ann@bcd.test>\r\n"
    b"To: bob@example.test,\r\n"
    b"  carol@example.test\r\n"
    b"Subject:  Hello \t  there  \r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <4Xq7Zb@bcd.test>\r\n"
    b"X-Mailer: unsigned\r\n"
    b"\r\n"
    b"Hi Bob,  \r\n"
    b"\r\n"
    b"a  line\twith   spaces\t\r\n"
    b"\r\n"
    b"\r\n"
)


@dataclass(frozen=True)
class Host:
    config: Path
    home: Path
    other_home: Path


@dataclass(frozen=True)
class Generated:
    signer: dkim.Signer
    output: str
    key_path: Path
    txt: bytes  # the record's strings, joined as a resolver returns them


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    root = Path(tempfile.mkdtemp(prefix="nsmail-dkim-"))
    root.chmod(0o755)
    homes = []
    for uid, domain in ((TENANT_UID, "bcd.test"), (OTHER_UID, "cde.test")):
        home = root / "home" / domain
        home.mkdir(parents=True, mode=0o700)
        os.chown(home, uid, uid)
        homes.append(home)
    config = root / "etc" / "nsmail.toml"
    config.parent.mkdir()
    config.write_text(
        '[host]\nname = "abc.test"\nuser = "nobody"\nresolvers = ["203.0.113.53"]\n'
        '[network]\nmode = "routed"\n'
        + "".join(
            f'[[tenant]]\ndomain = "{home.name}"\nipv4 = "198.51.100.{71 + i}"\n'
            f'uid = {uid}\ngid = {uid}\nhome = "{home}"\n'
            for i, (uid, home) in enumerate(zip((TENANT_UID, OTHER_UID), homes, strict=True))
        )
    )
    try:
        yield Host(config, homes[0], homes[1])
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)


def _generate(host: Host, selector: str, kind: str) -> Generated:
    output = keygen(host.config, "bcd.test", selector, kind)
    key_path = Path(re.findall(r'^dkim_key = "(.*)"$', output, re.M)[0])
    signer = load_signer("bcd.test", selector, key_path)
    record = next(line for line in output.splitlines() if " IN TXT " in line)
    return Generated(signer, output, key_path, "".join(re.findall(r'"([^"]*)"', record)).encode())


@pytest.fixture(scope="module")
def rsa(host: Host) -> Generated:
    return _generate(host, "s1", "rsa")


@pytest.fixture(scope="module")
def ed25519(host: Host) -> Generated:
    return _generate(host, "e1", "ed25519")


@pytest.fixture(params=["rsa", "ed25519"])
def key(request: pytest.FixtureRequest) -> Generated:
    generated: Generated = request.getfixturevalue(request.param)
    return generated


def dns(generated: Generated) -> Callable[..., bytes]:
    expected = f"{generated.signer.selector}._domainkey.bcd.test.".encode()

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        assert name == expected
        return generated.txt

    return lookup


def sent(message: bytes) -> bytes:
    """What the receiver gets: delivery makes every line end in CRLF, smtplib ends the last."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def verifies(generated: Generated, message: bytes) -> bool:
    return bool(dkimpy.verify(sent(message), dnsfunc=dns(generated)))


def signature_tags(message: bytes) -> dict[str, str]:
    field = re.match(rb"DKIM-Signature:.*?\r\n(?![ \t])", message, re.S)
    assert field is not None
    text = re.sub(r"\s+", "", field.group(0).decode().partition(":")[2])
    return dict(tag.split("=", 1) for tag in text.split(";") if tag)


# --- signatures --------------------------------------------------------------------------


def sign(key: Generated, message: bytes, now: float) -> bytes:
    """What delivery sends: `message` as the queue manager signs it, on the wire."""
    return b"".join(key.signer.sign(Message.of(message), now).wire())


def as_sent(message: bytes) -> bytes:
    return b"".join(Message.of(message).wire())


def test_a_signed_message_verifies(key: Generated) -> None:
    signed = sign(key, MESSAGE, NOW)
    assert signed.startswith(b"DKIM-Signature: ") and signed.endswith(MESSAGE)
    assert verifies(key, signed)
    tags = signature_tags(signed)
    assert tags["a"] == ("rsa-sha256" if key.signer.selector == "s1" else "ed25519-sha256")
    assert (tags["c"], tags["d"], tags["s"], tags["t"]) == (
        "relaxed/relaxed",
        "bcd.test",
        key.signer.selector,
        "1700000000",
    )
    # Each present field to sign once, From once more; Received and X-Mailer not at all.
    assert tags["h"] == "from:to:subject:date:message-id:from"
    assert all(len(line) <= 78 for line in signed.split(b"\r\n\r\n")[0].split(b"\r\n"))


def test_a_changed_body_or_signed_field_fails(key: Generated) -> None:
    signed = sign(key, MESSAGE, NOW)
    assert not verifies(key, signed.replace(b"Hi Bob", b"Hi Rob"))
    assert not verifies(key, signed + b"P.S. appended\r\n")
    assert not verifies(key, signed.replace(b"Subject:  Hello", b"Subject:  Jello"))
    assert not verifies(key, signed.replace(b"\r\n\r\nHi", b"\r\nFrom: eve@bcd.test\r\n\r\nHi"))


def test_relays_may_add_fields_and_refold_whitespace(key: Generated) -> None:
    signed = sign(key, MESSAGE, NOW)
    relayed = b"Received: from mx by example.test\r\n" + signed.replace(
        b"Subject:  Hello \t  there  ", b"Subject: Hello\r\n there"
    ).replace(b"a  line\twith", b"a line with")
    assert verifies(key, relayed)


def test_repeated_fields_are_all_signed(key: Generated) -> None:
    message = MESSAGE.replace(b"X-Mailer", b"To: dave@example.test\r\nCc: e@example.test\r\nX")
    signed = sign(key, message, NOW)
    assert signature_tags(signed)["h"] == "from:to:to:cc:subject:date:message-id:from"
    assert verifies(key, signed)
    assert not verifies(key, signed.replace(b"dave@", b"mallory@"))


def test_signing_is_pure(ed25519: Generated) -> None:
    # Ed25519 signatures are deterministic, so equal inputs give equal bytes.
    assert sign(ed25519, MESSAGE, NOW) == sign(ed25519, MESSAGE, NOW)
    assert sign(ed25519, MESSAGE, NOW) != sign(ed25519, MESSAGE, NOW + 1)


def test_bare_line_ends_verify_once_delivery_makes_them_crlf(key: Generated) -> None:
    lf = MESSAGE.replace(b"\r\n", b"\n")
    signed = sign(key, lf, NOW)
    assert signed.endswith(MESSAGE)
    assert verifies(key, signed)


@pytest.mark.parametrize(
    "message",
    [
        b"From: ann@bcd.test\r\n\r\n",
        b"From: ann@bcd.test\r\n",
        b"From: ann@bcd.test\r\nSubject: no body\r\n\r\n\r\n\r\n",
        b"From: ann@bcd.test\r\n\r\n \t",
        b"From: ann@bcd.test",
    ],
)
def test_an_empty_body_verifies(ed25519: Generated, message: bytes) -> None:
    assert verifies(ed25519, sign(ed25519, message, NOW))


@pytest.mark.parametrize(
    "sender",
    [b"ann@bcd.test", b"<ann@Mail.BCD.test>", b'"Ann" <ann@bcd.test>, bob@sub.bcd.test'],
)
def test_mail_from_the_domain_or_its_subdomains_is_signed(
    ed25519: Generated, sender: bytes
) -> None:
    message = b"From: " + sender + b"\r\n\r\nHi\r\n"
    assert verifies(ed25519, sign(ed25519, message, NOW))


@pytest.mark.parametrize(
    "fields",
    [
        b"From: ann@example.test\r\n",
        b"From: ann@test\r\n",  # the parent of a tenant is not the tenant's
        b"From: ann@notbcd.test\r\n",
        b'From: "ann@bcd.test" <eve@example.test>\r\n',
        b"From: ann@bcd.test, eve@example.test\r\n",
        b"From: ann@bcd.test@example.test\r\n",
        b"From: ann@bcd.test\r\nFrom: ann@bcd.test\r\n",
        b"From: undisclosed\r\n",
        b"From:\r\n",
        b" From: ann@bcd.test\r\n",  # continues nothing: not a field
        b"Subject: no From\r\n",
        b"",
    ],
)
def test_other_mail_passes_unsigned_and_unchanged(ed25519: Generated, fields: bytes) -> None:
    message = fields + b"\r\nHi\r\n"
    assert sign(ed25519, message, NOW) == as_sent(message)


_WSP = st.sampled_from([" ", "\t", "  ", " \t "])
_WORD = st.text(alphabet="abcXYZ019.,;<>@-", min_size=1, max_size=8)


@st.composite
def _field(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(["To", "cc", "SUBJECT", "Date", "X-Other", "Reply-To"]))
    words = draw(st.lists(_WORD, min_size=1, max_size=6))
    text = name + ":" + draw(st.sampled_from(["", " ", "\t"]))
    for word in words:
        text += word + draw(st.sampled_from([" ", "\t", "  ", "\r\n ", "\r\n\t"]))
    return text.rstrip("\r\n\t ") + draw(st.sampled_from(["", " ", "\t "]))


@given(
    fields=st.lists(_field(), max_size=8),
    position=st.integers(min_value=0, max_value=8),
    body=st.lists(st.lists(st.one_of(_WORD, _WSP), max_size=6).map("".join), max_size=8),
    line_end=st.sampled_from(["\r\n", "\n", "\r"]),  # delivery makes them all CRLF
    ending=st.sampled_from(["", "\r\n", "\r\n\r\n", " \r\n\t\r\n", "\n\n"]),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_whitespace_and_folding_verifies(
    ed25519: Generated,
    fields: list[str],
    position: int,
    body: list[str],
    line_end: str,
    ending: str,
) -> None:
    fields.insert(min(position, len(fields)), "From: ann@bcd.test")
    message = ("\r\n".join(fields) + "\r\n\r\n" + line_end.join(body) + ending).encode()
    assert verifies(ed25519, sign(ed25519, message, NOW))


@given(
    head=st.sampled_from([b"", b"From: ann@bcd.test\r\n", b"From: <ann@bcd.test>\n", b"From:"]),
    rest=st.binary(max_size=300),
)
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_hostile_bytes_never_break_signing(ed25519: Generated, head: bytes, rest: bytes) -> None:
    message = head + rest
    signed = sign(ed25519, message, NOW)
    assert signed == as_sent(message) or (
        signed.startswith(b"DKIM-Signature: ") and signed.endswith(as_sent(message))
    )


# --- keys and keygen -----------------------------------------------------------------------


def test_keygen_prints_the_record_and_the_config_lines(host: Host, rsa: Generated) -> None:
    lines = rsa.output.splitlines()
    record = next(line for line in lines if " IN TXT " in line)
    assert record.startswith('s1._domainkey.bcd.test. IN TXT "v=DKIM1; k=rsa; p=MII')
    strings = re.findall(r'"([^"]*)"', record)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    quoted = " ".join(f'"{s}"' for s in strings)
    assert record == f"s1._domainkey.bcd.test. IN TXT {quoted}"
    assert 'dkim_selector = "s1"' in lines
    assert f'dkim_key = "{host.config.parent}/dkim/bcd.test.s1.key"' in lines
    assert f"Add to the [[tenant]] table of bcd.test in {host.config}:" in lines
    assert isinstance(rsa.signer.key, RSAPrivateKey) and rsa.signer.key.key_size == 2048


def test_keygen_ed25519_record(ed25519: Generated) -> None:
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", ed25519.txt.decode())


def test_preflight_finds_the_published_record_right(key: Generated) -> None:
    selector = key.signer.selector
    answer = preflight.Answer((key.txt.decode(),))
    finding = preflight.check_dkim("bcd.test", selector, key.signer.public_key(), answer)
    assert finding.ok, finding


def test_a_key_file_is_readable_by_root_only(host: Host, rsa: Generated) -> None:
    info = rsa.key_path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o600)
    assert stat.S_IMODE(rsa.key_path.parent.stat().st_mode) == 0o700
    assert not any(rsa.key_path.is_relative_to(home) for home in (host.home, host.other_home))

    def try_to_read() -> None:
        try:
            rsa.key_path.read_bytes()
        except PermissionError:
            return
        raise AssertionError("read the key")

    # Either tenant's uid, even with the key directory opened up.
    rsa.key_path.parent.chmod(0o755)
    try:
        for uid in (TENANT_UID, OTHER_UID):
            assert run_as(uid, uid, try_to_read) == 0
    finally:
        rsa.key_path.parent.chmod(0o700)


def test_keygen_never_overwrites_a_key(host: Host, rsa: Generated) -> None:
    before = rsa.key_path.read_bytes()
    with pytest.raises(dkim.DkimError, match="exists; choose another selector"):
        keygen(host.config, "bcd.test", "s1", "rsa")
    assert rsa.key_path.read_bytes() == before
    assert sorted(p.name for p in rsa.key_path.parent.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    ("domain", "selector", "kind", "problem"),
    [
        ("example.test", "s1", "rsa", "not a tenant"),
        ("bcd.test", "s_1", "rsa", "not a selector"),
        ("bcd.test", "s1.", "rsa", "not a selector"),
        ("bcd.test", "s2", "dsa", "not a key type"),
    ],
)
def test_keygen_refuses(host: Host, domain: str, selector: str, kind: str, problem: str) -> None:
    with pytest.raises(dkim.DkimError, match=problem):
        keygen(host.config, domain, selector, kind)


def test_keygen_refuses_a_key_directory_inside_a_tenant_home(host: Host) -> None:
    config = host.other_home / "nsmail.toml"
    config.write_text(host.config.read_text())
    try:
        with pytest.raises(dkim.DkimError, match=r"inside the home of cde\.test"):
            keygen(config, "bcd.test", "s9", "ed25519")
        assert not (host.other_home / "dkim").exists()
    finally:
        config.unlink()


@pytest.fixture
def key_file(ed25519: Generated) -> Iterator[Path]:
    path = ed25519.key_path.with_name("copy.key")
    path.write_bytes(ed25519.key_path.read_bytes())
    path.chmod(0o600)
    try:
        yield path
    finally:
        path.unlink()


@pytest.mark.parametrize(
    ("spoil", "problem"),
    [
        (lambda p: p.chmod(0o640), "mode 0640"),
        (lambda p: p.chmod(0o604), "mode 0604"),
        (lambda p: os.chown(p, TENANT_UID, 0), f"uid {TENANT_UID}"),
        (lambda p: p.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnonsense\n"), "not an unencrypted"),
        (
            lambda p: p.write_bytes(
                ec.generate_private_key(ec.SECP256R1()).private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            ),
            "neither an RSA nor an Ed25519 key",
        ),
        (lambda p: p.unlink() or p.symlink_to(p.with_name("e1.key")), "Too many levels"),
        (lambda p: p.unlink(), "No such file"),
    ],
)
def test_load_signer_refuses(key_file: Path, spoil: Callable[[Path], object], problem: str) -> None:
    spoil(key_file)
    with pytest.raises(dkim.DkimError, match=problem):
        load_signer("bcd.test", "e1", key_file)
    key_file.unlink(missing_ok=True)
    key_file.touch()  # for the fixture's clean-up


def test_the_key_stays_out_of_reprs(rsa: Generated) -> None:
    assert repr(rsa.signer) == "Signer(domain='bcd.test', selector='s1')"


def test_a_worker_signs_after_the_jail_with_the_key_read_before(host: Host, rsa: Generated) -> None:
    """As a worker: read the key as root, chroot into an empty home, drop to the tenant's
    uid, sign; nothing OpenSSL needs is left to load from files, and the process cannot be
    read out by other processes of the tenant's uid."""
    empty = Path(tempfile.mkdtemp(prefix="nsmail-dkim-jail-"))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            signer = load_signer("bcd.test", "s1", rsa.key_path)
            last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
            os.chroot(empty)
            os.chdir("/")
            drop(TENANT_UID, TENANT_UID, last_cap)
            signed = b"".join(signer.sign(Message.of(MESSAGE), NOW).wire())
            os.write(write_end, b"%d\n" % prctl.get_dumpable() + signed)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    empty.rmdir()
    assert os.waitstatus_to_exitcode(status) == 0
    dumpable, _, signed = output.partition(b"\n")
    assert dumpable == b"0"
    assert verifies(rsa, signed)


@given(
    lines=st.lists(st.sampled_from([b"", b" ", b"a  b\t", b"\t x", b"text", b" \t "]), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=12), max_size=4),
)
def test_the_body_hash_does_not_depend_on_where_the_body_was_cut(
    lines: list[bytes], cuts: list[int]
) -> None:
    # The body streams from the queue file in pieces of whole lines, cut anywhere.
    whole = [line + b"\r\n" for line in lines]
    points = sorted({min(c, len(whole)) for c in cuts})
    pieces = [
        b"".join(whole[a:b]) for a, b in zip([0, *points], [*points, len(whole)], strict=True)
    ]
    assert dkim._relaxed_body_hash(pieces) == dkim._relaxed_body_hash([b"".join(whole)])
