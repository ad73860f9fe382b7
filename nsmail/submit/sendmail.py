"""`nsmail-sendmail`: the sendmail(1)-compatible command that queues one message for a tenant.

It runs once per message (PHP `mail()`, cron, MUAs), and a Python start is mostly
imports, so submitting imports only this module, `nsmail.submit.submission`,
`nsmail.submit.maildrop` and the small modules of `nsmail.core` that import nothing
(layout, addresses, text, exitcodes) or built-ins only (queueframe), and through them only
modules built into the interpreter (`tests/loopback/test_sendmail.py` holds it to that list). It
finds its caller's tenant in the cache root keeps beside the configuration, and imports
the configuration parser only when that cache is missing or out of date (a configuration
that is not valid leaves the last good cache serving: see `nsmail.submit.submission`);
listing the queue (-bp, `nsmail.tenant.queuelist`) and SMTP on stdin (-bs,
`nsmail.submit.sendmail_smtp`) import more. The tenant is chosen by the caller's real
uid; the message is streamed into the tenant's `maildrop` as it is read, never held whole
in memory, and exit status 0 means it is on disk (fsynced). Exit codes are sysexits(3):
64 usage (-t finding no recipient in the header included), 65 message over the tenant's
`message_size_limit`, 75 cannot queue now (the queue over its `queue_size_limit`, full
disk, quota, I/O error), 77 not permitted, 78 broken configuration; -bv exits 67
(EX_NOUSER) when an address it checks is not deliverable.

Security: not setuid; it runs as the submitting user, or as root with `--tenant`, in which
case it becomes the tenant (groups, gid, uid) right after finding it, so
root never writes into or reads from the tenant-writable spool tree, and what it creates
belongs to the tenant. Arguments are the caller's own and are checked only to catch
mistakes: the spool is the tenant's, so the sender-domain rule here is a courtesy that the
worker must enforce again. `-bp` decodes tenant-written queue files (`queuefile.decode`
raises only QueueFileError) and escapes every tenant-written string it prints.
"""

from __future__ import annotations

import os
import pwd
import sys
import time

from nsmail.core import addresses, queueframe
from nsmail.core.exitcodes import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_USAGE,
)
from nsmail.core.layout import MAILDROP, locate
from nsmail.core.text import printable
from nsmail.submit import maildrop
from nsmail.submit.submission import Profile, Profiles, cached, profiles_of

TYPE_CHECKING = False  # typing and collections.abc cost a start more than a submission
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence
    from typing import BinaryIO

    from nsmail.core.queueframe import Field

PROG = "nsmail-sendmail"
_CHUNK = 1 << 16
# Enough of a message's start for any header section the worker takes
# (headers.MAX_HEADER_BYTES); -t looks for recipients there.
_HEADER_SCAN = 1 << 20
# RFC 5322 3.2.3 atext, and the dot an obs-phrase (4.1) may hold.
_ATEXT = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~."
)

DELIVER = "deliver"
LIST = "list"
FLUSH = "flush"
SMTP = "smtp"
VERIFY = "verify"

# RFC 5321 4.5.3.1.3: a path is at most 256 octets, including its angle brackets.
_MAX_ADDRESS = 254
# Accepted and ignored, for scripts written for sendmail or Postfix: the body type (-B),
# DSN requests (-N, -R, -V; the default notices are sent instead) and a traffic log (-X).
_IGNORED_WITH_VALUE = frozenset("BNRVX")
_WITH_VALUE = frozenset("bfFro") | _IGNORED_WITH_VALUE


class SendmailError(Exception):
    """A refusal: the exit code and the one line that explains it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Options:
    """What the command line asks for (a plain class: see the module's first paragraph)."""

    __slots__ = (
        "dot_ends",
        "extract",
        "full_name",
        "mode",
        "recipients",
        "sender",
        "tenant",
        "verbose",
    )

    def __init__(
        self,
        # DELIVER (-bm), LIST (-bp), SMTP (-bs), VERIFY (-bv) or FLUSH (-q): the last wins
        mode: str = DELIVER,
        recipients: tuple[str, ...] = (),
        extract: bool = False,  # -t
        dot_ends: bool = True,  # a lone "." line ends the message; -i and -oi turn it off
        sender: str | None = None,  # -f/-r as given; None is the caller's own address
        full_name: str = "",  # -F
        verbose: bool = False,  # -v
        tenant: str | None = None,  # --tenant, root only
    ) -> None:
        self.mode = mode
        self.recipients = recipients
        self.extract = extract
        self.dot_ends = dot_ends
        self.sender = sender
        self.full_name = full_name
        self.verbose = verbose
        self.tenant = tenant

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Options) and self._fields() == other._fields()

    def __repr__(self) -> str:
        pairs = (f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Options({', '.join(pairs)})"


def parse_args(argv: Sequence[str]) -> Options:
    """getopt(3)-style parsing of sendmail's options; raises SendmailError(EX_USAGE).

    Flags cluster (`-ti`), a value may be glued or the next argument (`-fADDR`, `-f ADDR`),
    and options may follow recipients (as with Postfix on glibc) until `--`.
    """
    options = Options()
    recipients: list[str] = []
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            recipients += rest
            break
        if arg.startswith("--"):
            options.tenant = _long_option(arg, rest)
        elif arg.startswith("-") and arg != "-":
            _short_options(options, arg, rest)
        else:
            recipients.append(arg)
    options.recipients = tuple(recipients)
    return options


def _long_option(arg: str, rest: list[str]) -> str:
    name, has_value, value = arg[2:].partition("=")
    if name != "tenant":
        raise _usage(f"unknown option {printable(arg)}")
    if has_value:
        return value
    if not rest:
        raise _usage("--tenant needs a domain")
    return rest.pop(0)


def _short_options(options: Options, arg: str, rest: list[str]) -> None:
    """One argument of clustered single-letter options, taking a value from `rest` if due."""
    for pos in range(1, len(arg)):
        letter = arg[pos]
        if letter in _WITH_VALUE:
            if pos + 1 == len(arg) and not rest:
                raise _usage(f"option -{letter} needs a value")
            _with_value(options, letter, arg[pos + 1 :] if pos + 1 < len(arg) else rest.pop(0))
            return
        _flag(options, letter, glued=arg[pos + 1 :])


def _flag(options: Options, letter: str, glued: str) -> None:
    if letter == "t":
        options.extract = True
    elif letter == "i":
        options.dot_ends = False
    elif letter == "v":
        options.verbose = True
    elif letter == "q":
        if glued:  # -q30m: a queue-run interval, for a daemon this is not
            raise _usage(f"-q{printable(glued)}: only a plain -q (flush the queue) is supported")
        options.mode = FLUSH
    elif letter != "U":  # -U, "initial user submission", is what every use of this is
        raise _usage(f"unknown option -{printable(letter)}")


def _with_value(options: Options, letter: str, value: str) -> None:
    if letter == "b":
        modes = {"m": DELIVER, "p": LIST, "s": SMTP, "v": VERIFY}
        if value not in modes:
            raise _usage(f"-b{printable(value)} is not supported (only -bm, -bp, -bs and -bv)")
        options.mode = modes[value]
    elif letter in "fr":
        options.sender = value
    elif letter == "F":
        if not value.isprintable():  # it may end up in a From: header line
            raise _usage(f"full name {printable(value)} contains control characters")
        options.full_name = value
    elif letter == "o" and value == "i":  # -oi, the old spelling of -i
        options.dot_ends = False
    # any other -o (-odi, -oem, -oQ...) and _IGNORED_WITH_VALUE are accepted and ignored


def qualify(address: str, domain: str) -> str:
    """A recipient or sender as given, with `@domain` added to a bare local part.

    Raises SendmailError(EX_USAGE) for what cannot be an unquoted mailbox: whitespace,
    control characters, angle brackets, an empty local part or domain, or excess length.
    """
    if not address or any(c.isspace() or not c.isprintable() or c in "<>" for c in address):
        raise _usage(f"bad address {printable(address)}")
    if "@" in address:
        local, host = addresses.split(address)
        if not local or not host or host.startswith(".") or host.endswith(".") or ".." in host:
            raise _usage(f"bad address {printable(address)}")
    address = addresses.with_domain(address, domain)
    if len(address) > _MAX_ADDRESS:
        raise _usage(f"address {printable(address[:40])}... is longer than {_MAX_ADDRESS} octets")
    return address


def envelope_sender(given: str | None, login: str, tenant: Profile) -> str:
    """The envelope sender: the caller's own address unless -f/-r named one it may use."""
    if given is None:
        return f"{login}@{tenant.domain}"
    if given.startswith("<") and given.endswith(">"):
        given = given[1:-1]
    if not given:
        return ""  # the null sender (RFC 5321 4.5.5) claims no domain
    sender = qualify(given, tenant.domain)
    domain = addresses.split(sender)[1]
    if not addresses.same_domain(domain, tenant.domain) and not tenant.foreign_senders:
        raise SendmailError(
            EX_NOPERM,
            f"sender {printable(sender)} is not in {tenant.domain}"
            " (the tenant's configuration does not allow foreign_senders)",
        )
    return sender


def read_message(stream: BinaryIO, *, dot_ends: bool, limit: int) -> Iterator[bytes]:
    """The message from `stream` in pieces, up to EOF or, if `dot_ends`, a line holding
    only "."; raises SendmailError(EX_DATAERR) once it is over `limit` bytes (0: none)."""
    size = 0
    for piece in _lines_to_dot(stream) if dot_ends else iter(lambda: stream.read(_CHUNK), b""):
        size += len(piece)
        if limit and size > limit:
            raise SendmailError(
                EX_DATAERR, f"message too large: the limit is {limit} bytes for this domain"
            )
        yield piece


def _lines_to_dot(stream: BinaryIO) -> Iterator[bytes]:
    at_line_start = True
    while True:
        # At most a chunk at a time, so a line without end cannot fill the memory.
        line = stream.readline(_CHUNK)
        # b"." alone: the dot line at end of input, with no newline after it.
        if not line or (at_line_start and line in (b".\n", b".\r\n", b".")):
            return
        at_line_start = line.endswith(b"\n")
        yield line


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except SendmailError as e:
        _complain(e.message)
        return e.code
    except Exception as e:  # a bug: still one line, as PHP and cron log whatever we print
        _complain(f"internal error: {type(e).__name__}: {printable(str(e))}")
        return EX_SOFTWARE


def _run(argv: Sequence[str]) -> int:
    options = parse_args(argv)
    if options.tenant is not None and os.getuid() != 0:
        raise SendmailError(EX_NOPERM, "only root may use --tenant")
    if options.mode == SMTP and (options.recipients or options.extract or options.sender):
        raise _usage("-bs takes the sender and the recipients from MAIL and RCPT only")
    try:
        tenant = _profile(locate(None, os.environ), options.tenant)
    except SendmailError as e:
        if options.mode == SMTP:  # an SMTP client shows a reply, not our stderr
            from nsmail.core.smtp.server import Reply

            maildrop.write_all(1, Reply(421, f"4.3.0 {e.message}").encode())
        raise
    if options.tenant is not None:
        _become(tenant)
    if options.mode == LIST:
        _list(tenant)
    elif options.mode == FLUSH:
        try:
            maildrop.request_flush(tenant.spool)
        except OSError as e:
            raise _tempfail("cannot request a queue run", e) from e
    elif options.mode == VERIFY:
        return _verify(options, tenant)
    elif options.mode == SMTP:
        from nsmail.submit import sendmail_smtp  # only for -bs: a submission imports none of it

        sendmail_smtp.serve_stdio(tenant, _login(os.getuid()), options.full_name)
    else:
        queue_id = _submit(options, tenant)
        if options.verbose:
            _complain(f"queued as {queue_id}")
    return EX_OK


def _verify(options: Options, tenant: Profile) -> int:
    """-bv: whether each recipient can be delivered to, one line each, as far as the
    tenant's own configuration tells (syntax, its local users; no DNS, no mail sent).
    Like sendmail, EX_NOUSER when one cannot (and one line on stderr)."""
    if options.extract or not options.recipients:
        raise _usage("-bv checks the recipients named as arguments")
    envelope_sender(options.sender, _login(os.getuid()), tenant)  # refused as a submission
    mailboxes = {user.casefold(): user for user in tenant.users}
    verdicts = [_verdict(given, tenant, mailboxes) for given in options.recipients]
    for given, (_, verdict) in zip(options.recipients, verdicts, strict=True):
        print(f"{printable(given)}... {verdict}")
    failed = sum(not ok for ok, _ in verdicts)
    if not failed:
        return EX_OK
    sys.stdout.flush()
    _complain(f"{failed} of {len(verdicts)} addresses undeliverable")
    return EX_NOUSER


def _verdict(given: str, tenant: Profile, mailboxes: dict[str, str]) -> tuple[bool, str]:
    try:
        address = qualify(given, tenant.domain)
    except SendmailError as e:
        return False, f"undeliverable: {e.message}"
    local, domain = addresses.split(address)
    if not addresses.same_domain(domain, tenant.domain):
        return True, f"deliverable: mailer smtp, host {printable(domain)}"
    user = mailboxes.get(local.casefold())  # as the worker's local delivery matches it
    if user is None:
        return False, "undeliverable: no such user here"
    return True, f"deliverable: mailer local, user {user}"


def _list(tenant: Profile) -> None:
    # Imported here only: a submission imports none of them (the module's first paragraph).
    from pathlib import Path

    from nsmail.tenant import queuelist
    from nsmail.tenant.spool import Spool

    try:
        listing = queuelist.scan(Spool(Path(tenant.spool)), tenant.domain)
        sys.stdout.write(queuelist.format_listing(listing))
        sys.stdout.flush()
    except OSError as e:
        raise _tempfail("cannot list the queue", e) from e


def _submit(options: Options, tenant: Profile) -> str:
    """Check the envelope, read the message, and store it durably; its queue id."""
    login = _login(os.getuid())
    sender = envelope_sender(options.sender, login, tenant)
    recipients = [qualify(r, tenant.domain) for r in options.recipients]
    if not recipients and not options.extract:
        raise _usage("no recipients given (name them, or use -t to take them from the headers)")
    make_room(tenant)
    message = read_message(
        sys.stdin.buffer, dot_ends=options.dot_ends, limit=tenant.message_size_limit
    )
    if not recipients:
        message = _requiring_recipients(message)
    # The fields of queuefile.Envelope a submission sets; the others keep their defaults.
    envelope: dict[str, Field] = {
        "sender": sender,
        "recipients": recipients,
        "submitter": login,
        "full_name": options.full_name,
        "extract": options.extract,
    }
    return store(tenant, envelope, message)


def make_room(tenant: Profile, queued: int | None = None) -> int:
    """Make the tenant's queue if its worker has not yet, and measure it (or take the
    bytes `queued` the caller knows of); those bytes. SendmailError(EX_TEMPFAIL) when the
    queue already holds `queue_size_limit` bytes, or cannot be made or measured."""
    limit = tenant.queue_size_limit
    if queued is None:
        try:
            # The host's queue is made by its worker alone.
            if not tenant.is_host and not os.path.isdir(os.path.join(tenant.spool, MAILDROP)):
                maildrop.create(tenant.spool)
            queued = maildrop.size(tenant.spool) if limit else 0
        except OSError as e:
            raise _tempfail("cannot queue the message", e) from e
    if limit and queued > limit:
        raise SendmailError(
            EX_TEMPFAIL,
            f"queue full: {queued} bytes queued for {tenant.domain}, over its limit of "
            f"{limit}; try again later",
        )
    return queued


def store(tenant: Profile, envelope: dict[str, Field], message: Iterable[bytes]) -> str:
    """Store `message` durably in the tenant's maildrop with `envelope` (its arrival time
    added here); its queue id. SendmailError(EX_TEMPFAIL) for ENOSPC, EDQUOT, EIO,
    EACCES...: the caller should retry later."""
    now = time.time()
    queue_id = maildrop.new_queue_id(now)
    # drop fsyncs the file and its directory and leaves no partial file on failure (a
    # message over the limit included). The host's worker (another user) must read what
    # the machine's users drop off.
    mode = 0o644 if tenant.is_host else 0o600
    try:
        pieces = queueframe.frame({**envelope, "arrival": now}, message)
        maildrop.drop(tenant.spool, queue_id, pieces, mode)
    except OSError as e:
        raise _tempfail("cannot queue the message", e) from e
    return queue_id


def _requiring_recipients(message: Iterator[bytes]) -> Iterator[bytes]:
    """`message` as it is read (-t without recipient arguments); at its end
    SendmailError(EX_USAGE) if its header names no recipient, as sendmail(8) refuses it,
    so that the worker never takes in mail it cannot send anywhere."""
    head = bytearray()
    size = 0
    for piece in message:
        size += len(piece)
        if len(head) < _HEADER_SCAN:
            head += piece[: _HEADER_SCAN - len(head)]
        yield piece
    if not names_a_recipient(bytes(head), truncated=size > len(head)):
        raise _usage("no recipient addresses found in header")


def names_a_recipient(head: bytes, *, truncated: bool) -> bool:
    """Whether the header section at the start of `head` (the start of a message, cut
    if `truncated`) may name a recipient in To, Cc or Bcc.

    False only when it surely names none: no such field holds more than whitespace,
    comments and empty groups (`undisclosed-recipients:;`). This is the lean look of a
    command that cannot afford the email package; the worker's parser (nsmail.core.headers)
    decides the rest, and bounces what it finds no recipient in after all. Lines end as
    there: at CRLF, CR or LF; the header section ends at an empty line or a line that is
    no header field.
    """
    lines = head.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if truncated:
        lines.pop()  # cut anywhere, even inside a field name
    values: list[bytes] = []  # of the To, Cc and Bcc fields, unfolded
    in_recipient_field = in_field = False
    for line in lines:
        line = line.replace(b"\0", b"")
        if line[:1] in (b" ", b"\t") and in_field:
            if in_recipient_field:
                values[-1] += line
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or not all(0x21 <= c <= 0x7E for c in name):
            truncated = False  # the header section ends here
            break
        in_field, in_recipient_field = True, name.lower() in (b"to", b"cc", b"bcc")
        if in_recipient_field:
            values.append(value)
    # A header section that goes on past `head`: the worker decides alone.
    return truncated or any(_holds_an_address(value) for value in values)


def _holds_an_address(value: bytes) -> bool:
    """Whether an address-list field value holds anything but whitespace, comments
    (RFC 5322 3.2.2), empty angle brackets and empty groups of plain words (3.4:
    `undisclosed-recipients:;`); anything unusual counts as an address."""
    depth = 0  # of nested comments
    quoted = escaped = False
    content = False  # in this comma- or semicolon-separated piece
    plain = True  # and all of it words (atext, RFC 5322 3.2.3) and whitespace
    colons = 0  # in this piece
    after_colon = False  # content after its last colon
    for c in value:
        if escaped:  # the second half of a quoted-pair
            escaped = False
        elif quoted:
            quoted, escaped = c != 0x22, c == 0x5C
        elif depth:
            depth += (c == 0x28) - (c == 0x29)
            escaped = c == 0x5C
        elif c == 0x3A:  # :
            colons, after_colon = colons + 1, False
        elif c in b",;":
            empty_group = c == 0x3B and plain and colons == 1 and not after_colon
            if content and not empty_group:
                return True
            content, plain, colons, after_colon = False, True, 0, False
        elif c in b" \t":
            continue
        else:
            plain = plain and c in _ATEXT
            depth = c == 0x28  # (
            if c not in b"()<>":
                content = after_colon = True
                quoted, escaped = c == 0x22, c == 0x5C  # a quoted-string or a quoted-pair
    return content


def _profile(config_path: str, domain: str | None) -> Profile:
    """The caller's tenant (or, for root, the one named by --tenant), as the cache root
    keeps beside the configuration says while it is current, else as the configuration
    says; the last good cache when the configuration cannot be used (nsmail.submit.submission)."""
    profiles = cached(config_path)
    if profiles is None or not profiles.current:
        profiles = _configured(config_path, profiles)
    if domain is None:
        return profiles.of_uid(os.getuid())
    named = profiles.of_domain(domain)
    if named is None:
        raise _usage(f"--tenant {printable(domain)}: no such tenant in {config_path}")
    return named


def _configured(config_path: str, last_good: Profiles | None) -> Profiles:
    from pathlib import Path

    from nsmail.core.config import ConfigError  # only without a current cache
    from nsmail.host.configfile import load

    try:
        return profiles_of(load(Path(config_path)))
    except ConfigError as e:
        if last_good is not None:
            return last_good
        # A drop-in, or a [[tenant]] table, is some tenant's: its name and its problem
        # are for root and `nsmail check`, not for another tenant's web app.
        main_file_unusable = e.file == str(Path(config_path)) and e.field in ("file", "toml")
        if main_file_unusable or os.getuid() == 0:
            raise SendmailError(EX_CONFIG, str(e)) from e
        raise SendmailError(
            EX_CONFIG,
            f"{config_path} is not a valid configuration (`nsmail check` names the problem)",
        ) from e


def _become(tenant: Profile) -> None:
    """Root acting for a tenant: all of its ids, no supplementary groups, then verified."""
    os.setgroups([])
    os.setresgid(tenant.gid, tenant.gid, tenant.gid)
    os.setresuid(tenant.uid, tenant.uid, tenant.uid)
    ids = (os.getresuid(), os.getresgid(), os.getgroups())
    if ids != ((tenant.uid,) * 3, (tenant.gid,) * 3, []):
        raise SendmailError(EX_SOFTWARE, f"could not become uid {tenant.uid}: {ids}")


def _login(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def _tempfail(action: str, error: OSError) -> SendmailError:
    where = f" ({printable(str(error.filename))})" if error.filename else ""
    return SendmailError(EX_TEMPFAIL, f"{action}: {error.strerror or error}{where}")


def _usage(message: str) -> SendmailError:
    return SendmailError(EX_USAGE, message)


def _complain(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
