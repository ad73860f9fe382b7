"""Configuration: TOML documents in, one validated frozen `Config` out, or one `ConfigError`.

Pure: the files' text and a `SystemLookup` (passwd, `lstat`, resolv.conf, the bridge)
are passed in; `nsmail.host.configfile` is the thin IO shell that reads them.

Security: read by the root supervisor. The files are trusted as the administrator's
word, but they decide which uid, home and address each tenant gets, so everything is
checked before a namespace or process exists: no tenant may run as uid or gid 0, have
"/" as its home, share a uid, home, domain or address with another tenant, or use an
address that is not a plain unicast one (in bridge mode: one in the bridge's subnet). A
home is a chroot that root enters: it must be a directory of the tenant's own, neither
inside nor above another tenant's home or the host's spool, on a path of directories that
only root can change (no symlinks, no group- or world-writable directory, sticky or not);
nor may a symlink lead to the host's own jails (run_dir, spool). Any value may be echoed
in an error, so errors escape unprintable characters and stay on one line.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import stat
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path, PurePosixPath
from typing import Literal, TypeVar

from nsmail.core import suspend
from nsmail.core.addresses import same_domain, split
from nsmail.core.aliases import (
    POSTMASTER,
    REFUSAL,
    AliasFile,
    Problem,
    Table,
    parse_aliases,
    refused,
)
from nsmail.core.layout import SPOOL_IN_HOME
from nsmail.core.suspend import SuspendRule
from nsmail.core.text import printable

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
_Family = TypeVar("_Family", IPv4Address, IPv6Address)
_Subnet = TypeVar("_Subnet", IPv4Network, IPv6Network)

DEFAULT_RUN_DIR = Path("/run/nsmail")
DEFAULT_HOST_SPOOL = Path("/var/spool/nsmail")
DEFAULT_ALIASES = Path("/etc/aliases")
DEFAULT_MAIL_SPOOL = Path("/var/mail")  # Debian's: drwxrwsr-x root:mail, one mbox per user
HOST_SOURCE = "[host]"  # Tenant.source of the host's own identity

_MAIN_TABLES = frozenset({"host", "network", "delivery", "log", "smtpd", "tenant"})
_DROPIN_TABLES = frozenset({"tenant"})
_HOST_KEYS = frozenset(
    {
        *("name", "resolvers", "user", "dns_user", "run_dir", "spool", "admin_group"),
        *("metrics", "aliases", "mail_spool", "restrict_smtp"),
    }
)
# nsmail's own SMTP listeners (nsmail.root.listener, nsmail.host.submission).
_SMTPD_KEYS = frozenset(
    {
        *("local", "socket", "submission", "submissions", "certificate", "key", "user"),
        *("timeout", "client_limit", "session_limit"),
    }
)
_NETWORK_KEYS = frozenset(
    {"mode", "bridge", "gateway4", "gateway6", "subnet4", "subnet6", "prefix"}
)
_DELIVERY_KEYS = frozenset(
    {
        "scan_interval",
        "idle_exit",
        "timeout",
        "port",
        "retry_first",
        "retry_max",
        "lifetime",
        "delay_warning",
        "tls",
        "tls_verify",
        "tls_reports",
        "hourly_limit",
        "recipient_limit",
        "message_size_limit",
        "queue_size_limit",
        # the delivery engine (nsmail.core.scheduler, nsmail.tenant.engine)
        "initial_destination_concurrency",
        "destination_concurrency_limit",
        "max_sessions",
        "dead_after",
        "mx_address_limit",
        "active_limit",
        "suspend_rate",
        *(f"smtp_{stage}_timeout" for stage in ("connect", "helo", "starttls", "mail")),
        *(f"smtp_{stage}_timeout" for stage in ("rcpt", "data_init", "data_xfer", "data_done")),
        "destination",
    }
)
_DESTINATION_KEYS = frozenset(
    {"match", "initial_destination_concurrency", "destination_concurrency_limit", "family"}
)
_LOG_KEYS = frozenset({"format"})
LOG_FORMATS = ("text", "json")  # the delivery events as Postfix's lines, or JSON objects
TLS_POLICIES = ("may", "verify")
# Where a tenant's own domain's mail goes: its users' Maildirs here, or its MX like any
# other domain's (mailboxes at another provider, the web site here).
LOCAL_DELIVERY = ("maildir", "mx")
FAMILIES = ("any", "ipv4", "ipv6")
_TENANT_KEYS = frozenset(
    {
        "domain",
        "ipv4",
        "ipv6",
        "ehlo",
        "user",
        "uid",
        "gid",
        "home",
        "users",
        "local_delivery",
        "aliases",
        "foreign_senders",
        "tls",
        "hourly_limit",
        "recipient_limit",
        "message_size_limit",
        "queue_size_limit",
        "dkim_selector",
        "dkim_key",
        "initial_destination_concurrency",
        "destination_concurrency_limit",
        "max_sessions",
        "suspend_rate",
    }
)
# The keys each table may hold: the schema, for the parsers below and for tools.
TABLE_KEYS = {
    "host": _HOST_KEYS,
    "network": _NETWORK_KEYS,
    "delivery": _DELIVERY_KEYS,
    "delivery.destination": _DESTINATION_KEYS,
    "log": _LOG_KEYS,
    "smtpd": _SMTPD_KEYS,
    "tenant": _TENANT_KEYS,
}

# RFC 1035 2.3.1 as relaxed by RFC 1123 2.1 (a label may start with a digit).
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# RFC 5321 4.1.2 Dot-string, atext from RFC 5322 3.2.3.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
# RFC 6376 3.1: a DKIM selector is one or more dot-separated labels.
_SELECTOR = re.compile(rf"{_LABEL.pattern}(?:\.{_LABEL.pattern})*")
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,4}")
# A domain pattern of [[delivery.destination]]: LDH labels, "*" and "?" as wildcards.
_PATTERN = re.compile(r"[a-z0-9*?](?:[a-z0-9*?.-]{0,252})")
_MAX_COUNT = 100_000
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to setresuid, so it is never a real id


class ConfigError(Exception):
    """The first problem found, as one line: "<file>: <field>: <message>"."""

    def __init__(self, file: str, field: str, message: str) -> None:
        self.file = printable(file)
        self.field = printable(field)
        self.message = printable(message)
        super().__init__(f"{self.file}: {self.field}: {self.message}")


@dataclass(frozen=True, slots=True)
class HostConfig:
    name: str
    resolvers: tuple[IPAddress, ...]
    user: str  # the host's own worker, which parses every local user's mail
    uid: int
    gid: int
    dns_user: str  # the DNS relay, alone: no other process may signal or trace it
    dns_uid: int
    dns_gid: int
    run_dir: Path
    # The queue of mail from the machine's own users (not of any tenant).
    spool: Path = DEFAULT_HOST_SPOOL
    admin_gid: int | None = None  # members may use the control socket (nsmail status)
    metrics: str | None = None  # "address:port" of the Prometheus endpoint; None: off
    aliases: Path = DEFAULT_ALIASES  # the machine's aliases(5), for its own users' mail
    mail_spool: Path = DEFAULT_MAIL_SPOOL  # their mailboxes, mbox(5) files named by login
    # The host namespace refuses connections to remote ports 25, 465 and 587 from every
    # uid but root's and `user`'s (nsmail.core.firewall): no way around nsmail.
    restrict_smtp: bool = False


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    mode: Literal["bridge", "routed"]
    bridge: str | None
    gateway4: IPv4Address | None
    gateway6: IPv6Address | None
    prefix: str
    # Bridge mode: the on-link subnets of the bridge, which hold every tenant address
    # (a tenant gets its address as a /32 or /128, so nothing else says where it belongs).
    subnet4: IPv4Network | None = None
    subnet6: IPv6Network | None = None


@dataclass(frozen=True, slots=True)
class Concurrency:
    """How many SMTP sessions a tenant's worker opens (Postfix's names and defaults)."""

    initial_destination_concurrency: int = 5  # sessions to a destination at first
    destination_concurrency_limit: int = 20  # ... at most, as it keeps answering
    max_sessions: int = 100  # the tenant's sessions in all


@dataclass(frozen=True, slots=True)
class SmtpTimeouts:
    """Seconds each SMTP stage may take (RFC 5321 4.5.3.2; Postfix's smtp_*_timeout)."""

    connect: float = 30.0
    helo: float = 300.0  # the greeting, and the reply to EHLO/HELO
    starttls: float = 60.0  # the TLS handshake
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0  # the reply to DATA
    data_xfer: float = 180.0  # each block of the message written
    data_done: float = 600.0  # the reply to the final dot: giving up sooner makes duplicates


@dataclass(frozen=True, slots=True)
class DestinationRule:
    """Settings for the destinations whose domain or a mail host matches a `match` pattern
    (shell-style, e.g. "*.google.com"): a lower limit for one provider, one family."""

    match: tuple[str, ...]
    initial_destination_concurrency: int | None = None
    destination_concurrency_limit: int | None = None
    family: str | None = None  # "any", "ipv4" or "ipv6"

    def matches(self, names: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in self.match)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    scan_interval: float = 60.0
    # A worker with nothing to do for this long exits, and the supervisor starts it again
    # when mail arrives or a deferred message falls due (like Postfix's max_idle); 0: never.
    idle_exit: float = 300.0
    timeout: float = 30.0  # DNS lookups
    port: int = 25
    # Retries (like Postfix's minimal/maximal_backoff_time and maximal_queue_lifetime).
    retry_first: float = 300.0
    retry_max: float = 4000.0
    lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    # STARTTLS: "may" encrypts when offered (RFC 7435); "verify" demands a certificate
    # valid for the MX name. tls_verify lists destination domains that always demand it.
    tls: str = "may"
    tls_verify: tuple[str, ...] = ()
    # TLS reports (RFC 8460): each tenant's daily report to the receivers that ask for one.
    tls_reports: bool = False
    # Sending limits of every tenant (0: none); a tenant may set its own. Mail over a
    # limit is held, not lost: an operator releases it (nsmail queue release).
    hourly_limit: int = 0  # messages taken in per hour
    recipient_limit: int = 0  # recipients per message
    # Refused at submission (0: none): a larger message (EX_DATAERR), and any message
    # while the queue's files already hold this many bytes (EX_TEMPFAIL).
    message_size_limit: int = 25 << 20
    queue_size_limit: int = 1 << 30
    # The delivery engine: sessions, dead destinations, what a worker holds in memory.
    concurrency: Concurrency = Concurrency()
    dead_after: int = 3  # failures to reach a destination in a row, and it is dead
    mx_address_limit: int = 5  # addresses tried per attempt, over all its mail hosts
    active_limit: int = 500  # messages a worker holds in memory at once
    smtp_timeouts: SmtpTimeouts = SmtpTimeouts()
    destinations: tuple[DestinationRule, ...] = ()  # the first that matches applies
    # The automatic brake (nsmail.core.suspend); None: no brake.
    suspend_rate: SuspendRule | None = None


Endpoint = tuple[IPAddress, int]
LOCAL_SMTP: tuple[Endpoint, ...] = ((IPv4Address("127.0.0.1"), 25), (IPv6Address("::1"), 25))
SUBMISSION: tuple[Endpoint, ...] = ((IPv4Address("0.0.0.0"), 587), (IPv6Address("::"), 587))
SUBMISSIONS: tuple[Endpoint, ...] = ((IPv4Address("0.0.0.0"), 465), (IPv6Address("::"), 465))


@dataclass(frozen=True, slots=True)
class SmtpdConfig:
    """nsmail's own SMTP service: local submission by the kernel's word on the client's
    uid, and submission with AUTH for remote clients, which needs a certificate."""

    local: tuple[Endpoint, ...] = LOCAL_SMTP  # loopback TCP, no password
    socket: bool = True  # and the Unix socket run_dir/smtp
    certificate: Path | None = None  # 587 and 465 listen only with both (PEM files)
    key: Path | None = None
    submission: tuple[Endpoint, ...] = SUBMISSION  # STARTTLS, then AUTH (RFC 6409)
    submissions: tuple[Endpoint, ...] = SUBMISSIONS  # TLS from the start (RFC 8314)
    user: str = "nsmail-submit"  # the submission front's own user
    uid: int = -1  # looked up only with a certificate
    gid: int = -1
    timeout: float = 300.0  # seconds a client may take per command (RFC 5321 4.5.3.2)
    client_limit: int = 10  # sessions at once per client (a uid, or a remote address)
    session_limit: int = 100  # sessions at once per tenant, and in all on 587 and 465

    @property
    def remote(self) -> bool:
        """Whether 587 and 465 listen: only with a certificate and its key."""
        return self.certificate is not None and bool(self.submission or self.submissions)


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits in force for a tenant (0: none): its own, else those of [delivery]."""

    hourly: int
    recipients: int
    message_size: int
    queue_size: int
    suspend: SuspendRule | None = None


@dataclass(frozen=True, slots=True)
class Tenant:
    domain: str
    ipv4: IPv4Address | None
    ipv6: IPv6Address | None
    ehlo: str
    uid: int
    gid: int
    home: Path
    users: tuple[str, ...]
    source: str
    local_delivery: str = "maildir"  # one of LOCAL_DELIVERY
    # Names of its domain and where their mail goes (nsmail.core.aliases), postmaster
    # always among them with local_delivery = "maildir"; for the host, /etc/aliases'.
    aliases: Table = ()
    # Whether the tenant may submit mail with an envelope sender outside its domain.
    foreign_senders: bool = False
    tls: str | None = None  # this tenant's STARTTLS policy; None: [delivery] tls
    hourly_limit: int | None = None  # None: [delivery] hourly_limit
    recipient_limit: int | None = None  # None: [delivery] recipient_limit
    message_size_limit: int | None = None  # None: [delivery] message_size_limit
    queue_size_limit: int | None = None  # None: [delivery] queue_size_limit
    # This tenant's session limits; None: those of [delivery] (see `concurrency_in`).
    initial_destination_concurrency: int | None = None
    destination_concurrency_limit: int | None = None
    max_sessions: int | None = None
    # DKIM signing (nsmail.core.dkim), both or neither; the key file is root's, 0600, and
    # outside every tenant home.
    dkim_selector: str | None = None
    dkim_key: Path | None = None
    spool_in_home: str = SPOOL_IN_HOME  # where its queue is, inside its home (jail)
    suspend_rate: SuspendRule | None = None  # None: [delivery] suspend_rate

    def limits(self, delivery: DeliveryConfig) -> Limits:
        def own(mine: int | None, default: int) -> int:
            return default if mine is None else mine

        return Limits(
            hourly=own(self.hourly_limit, delivery.hourly_limit),
            recipients=own(self.recipient_limit, delivery.recipient_limit),
            message_size=own(self.message_size_limit, delivery.message_size_limit),
            queue_size=own(self.queue_size_limit, delivery.queue_size_limit),
            suspend=self.suspend_rate or delivery.suspend_rate,
        )

    def concurrency_in(self, delivery: DeliveryConfig) -> Concurrency:
        mine = Concurrency(
            initial_destination_concurrency=self.initial_destination_concurrency
            or delivery.concurrency.initial_destination_concurrency,
            destination_concurrency_limit=self.destination_concurrency_limit
            or delivery.concurrency.destination_concurrency_limit,
            max_sessions=self.max_sessions or delivery.concurrency.max_sessions,
        )
        if mine.initial_destination_concurrency > mine.destination_concurrency_limit:
            # A limit of the tenant's own under [delivery]'s start: the limit wins.
            return replace(mine, initial_destination_concurrency=mine.destination_concurrency_limit)
        return mine

    @property
    def spool(self) -> Path:
        return self.home / self.spool_in_home

    @property
    def is_host(self) -> bool:
        return self.source == HOST_SOURCE

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        return tuple(a for a in (self.ipv4, self.ipv6) if a is not None)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    host: HostConfig
    network: NetworkConfig
    delivery: DeliveryConfig
    tenants: tuple[Tenant, ...]
    log_format: Literal["text", "json"] = "text"  # [log] format (nsmail.root.systemd)
    # The host's aliases file as read, with its problems (for `nsmail check`); apart from
    # `host`, so that editing it restarts only the host's own worker.
    host_aliases: AliasFile = field(default_factory=AliasFile)
    smtpd: SmtpdConfig = SmtpdConfig()

    def tenant(self, domain: str) -> Tenant | None:
        return next((t for t in self.tenants if same_domain(t.domain, domain)), None)


@dataclass(frozen=True, slots=True)
class Account:
    uid: int
    gid: int
    home: str


@dataclass(frozen=True, slots=True)
class Inode:
    """What lstat(2) says of a path: its owner and its mode (file type bits included)."""

    uid: int
    mode: int


@dataclass(frozen=True, slots=True)
class FileText:
    """A file's text, or why it could not be read; a missing file is an empty one."""

    text: str = ""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SystemLookup:
    """The facts about this machine that validation needs, injected so `parse` stays pure."""

    user: Callable[[str], Account | None]
    lstat: Callable[[str], Inode | None]  # None: nothing there (or not reachable)
    default_resolvers: Callable[[], tuple[IPAddress, ...]]
    group: Callable[[str], int | None] = lambda name: None  # group name -> gid
    # The on-link subnets of a bridge of this namespace, for bridge mode without
    # subnet4/subnet6; () when there is no such bridge or it has no address.
    bridge_subnets: Callable[[str], tuple[IPNetwork, ...]] = lambda name: ()
    file_text: Callable[[str], FileText] = lambda path: FileText()  # the aliases file


def host_identity(config: Config) -> Tenant:
    """The machine's own users' mail, sent as the host: a tenant without a namespace
    (the kernel picks the source address), run as `host.user`, its queue `host.spool`;
    its domain's mail goes to the machine's users' mailboxes, after `host.aliases`."""
    host = config.host
    return Tenant(
        domain=host.name,
        ipv4=None,
        ipv6=None,
        ehlo=host.name,
        uid=host.uid,
        gid=host.gid,
        home=host.spool,
        users=(),
        source=HOST_SOURCE,
        aliases=config.host_aliases.table,
        spool_in_home=".",
    )


def parse(documents: Sequence[tuple[str, str]], lookup: SystemLookup) -> Config:
    """Validate (filename, TOML text) pairs, main file first, then drop-ins in order."""
    (main_file, main_text), *dropins = documents
    main = _Table(main_file, "", _decode(main_file, main_text))
    main.reject_unknown(_MAIN_TABLES)
    host = _host(main.table("host", required=True), lookup)
    _check_host_jails(main, host, lookup)
    network = _network(main.table("network", required=False), lookup)
    delivery = _delivery(main.table("delivery", required=False))
    smtpd = _smtpd(main.table("smtpd", required=False), host, lookup)

    registry = _Registry(host, network, smtpd)
    for tenant_table in main.tables("tenant"):
        registry.add(tenant_table, _tenant(tenant_table, lookup))
    for file, text in dropins:
        dropin = _Table(file, "", _decode(file, text))
        dropin.reject_unknown(_DROPIN_TABLES, "a drop-in may hold only [[tenant]] tables")
        for tenant_table in dropin.tables("tenant"):
            registry.add(tenant_table, _tenant(tenant_table, lookup))
    registry.check_dkim_keys()
    _check_gateways(main, network, registry.tenants)
    registry.check_homes(lookup)
    log_format = _log_format(main.table("log", required=False))
    return Config(
        Path(main_file),
        host,
        network,
        delivery,
        tuple(registry.tenants),
        log_format,
        _host_aliases(host, lookup),
        smtpd,
    )


def _log_format(table: _Table) -> Literal["text", "json"]:
    table.reject_unknown(TABLE_KEYS["log"])
    chosen = table.string_or("format", "text")
    if chosen == "json":
        return "json"
    if chosen != "text":
        raise table.error("format", f"{chosen!r} is not one of {', '.join(LOG_FORMATS)}")
    return "text"


def parse_resolv_conf(text: str) -> tuple[IPAddress, ...]:
    """The `nameserver` addresses of a resolv.conf(5), skipping what does not parse."""
    found: list[IPAddress] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                found.append(ipaddress.ip_address(words[1]))
            except ValueError:
                continue
    return tuple(found)


# --- tables --------------------------------------------------------------------------


def _decode(file: str, text: str) -> dict[str, object]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message carries "(at line L, column C)"
        raise ConfigError(file, "toml", str(exc)) from exc
    except RecursionError as exc:  # tomllib recurses once per nested array or inline table
        raise ConfigError(file, "toml", "values nested too deeply") from exc


class _Table:
    """A TOML table under validation that knows its file and field path, for errors."""

    __slots__ = ("_data", "file", "path")

    def __init__(self, file: str, path: str, data: dict[str, object]) -> None:
        self.file = file
        self.path = path
        self._data = data

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(self.file, self.field(key) if key else self.path, message)

    def has(self, key: str) -> bool:
        return key in self._data

    def reject_unknown(self, allowed: frozenset[str], message: str = "unknown key") -> None:
        for key in self._data:
            if key not in allowed:
                raise self.error(key, message)

    def _typed(self, key: str, kinds: tuple[type, ...], wanted: str) -> object | None:
        value = self._data.get(key)
        # bool is a subclass of int, but `port = true` is a mistake, not 1.
        if value is None or (isinstance(value, kinds) and not isinstance(value, bool)):
            return value
        raise self.error(key, f"must be {wanted}, not {_toml_type(value)}")

    def flag(self, key: str) -> bool:
        value = self._data.get(key, False)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {_toml_type(value)}")
        return value

    def string(self, key: str) -> str | None:
        value = self._typed(key, (str,), "a string")
        assert value is None or isinstance(value, str)
        return value

    def integer(self, key: str) -> int | None:
        value = self._typed(key, (int,), "an integer")
        assert value is None or isinstance(value, int)
        return value

    def number(self, key: str) -> float | None:
        value = self._typed(key, (int, float), "a number")
        assert value is None or isinstance(value, int | float)
        return None if value is None else float(value)

    def names(self) -> list[str]:
        """The keys this table holds."""
        return list(self._data)

    def string_or_strings(self, key: str) -> tuple[str, ...]:
        """A string or a non-empty array of strings, as a tuple."""
        value = self._data.get(key)
        if isinstance(value, str):
            return (value,)
        value = self.strings(key)
        if not value:
            raise self.error(key, "must be an address or an array of addresses")
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self._typed(key, (list,), "an array of strings")
        if value is None:
            return None
        assert isinstance(value, list)
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{key}[{index}]", f"must be a string, not {_toml_type(item)}")
        return tuple(value)

    def required_string(self, key: str) -> str:
        value = self.string(key)
        if value is None:
            raise self.error(key, "required")
        return value

    def string_or(self, key: str, default: str) -> str:
        value = self.string(key)
        return default if value is None else value

    def table(self, key: str, *, required: bool) -> _Table:
        value = self._typed(key, (dict,), "a table")
        if value is None and required:
            raise self.error(key, "required table is missing")
        return _Table(self.file, self.field(key), value if isinstance(value, dict) else {})

    def tables(self, key: str) -> list[_Table]:
        value = self._data.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, f"must be an array of [[{key}]] tables")
        return [_Table(self.file, f"{self.field(key)}[{i}]", v) for i, v in enumerate(value)]


# --- sections ------------------------------------------------------------------------


def _host(table: _Table, lookup: SystemLookup) -> HostConfig:
    table.reject_unknown(TABLE_KEYS["host"])
    name = _domain(table, "name", table.required_string("name"))

    resolver_texts = table.strings("resolvers")
    if resolver_texts is None:
        resolvers = lookup.default_resolvers()
        if not resolvers:
            raise table.error("resolvers", "not set and /etc/resolv.conf names no nameserver")
    elif not resolver_texts:
        raise table.error("resolvers", "must not be empty")
    else:
        resolvers = tuple(
            _address(table, f"resolvers[{i}]", text) for i, text in enumerate(resolver_texts)
        )

    user = table.string_or("user", "nsmail")
    account = lookup.user(user)
    if account is None:
        raise table.error("user", f"unknown user {user!r}")
    dns_user = table.string_or("dns_user", "nsmail-dns")
    dns = lookup.user(dns_user)
    if dns is None:
        raise table.error("dns_user", f"unknown user {dns_user!r}")
    if dns.uid == 0:
        raise table.error("dns_user", f"{dns_user!r} has uid 0; the DNS relay never runs as root")
    # The host worker parses mail from every local user; code that made it its own could
    # stop the relay, and with it every tenant's DNS.
    if dns.uid == account.uid:
        raise table.error("dns_user", f"uid {dns.uid} is also the uid of host.user")

    run_dir = _absolute_path(table, "run_dir", DEFAULT_RUN_DIR)
    spool = _absolute_path(table, "spool", DEFAULT_HOST_SPOOL)
    aliases_file = _absolute_path(table, "aliases", DEFAULT_ALIASES)
    mail_spool = _absolute_path(table, "mail_spool", DEFAULT_MAIL_SPOOL)
    admin_gid = None
    if (group := table.string("admin_group")) is not None:
        admin_gid = lookup.group(group)
        if admin_gid is None:
            raise table.error("admin_group", f"unknown group {group!r}")
    metrics = table.string("metrics")
    if metrics is not None:
        _check_endpoint(table, "metrics", metrics)
    restrict_smtp = table.flag("restrict_smtp")
    return HostConfig(
        name,
        resolvers,
        user,
        account.uid,
        account.gid,
        dns_user,
        dns.uid,
        dns.gid,
        run_dir,
        spool,
        admin_gid,
        metrics,
        aliases_file,
        mail_spool,
        restrict_smtp,
    )


def _host_name_known(name: str, lookup: SystemLookup) -> bool:
    return name.lower() == POSTMASTER or lookup.user(name) is not None


def _host_aliases(host: HostConfig, lookup: SystemLookup) -> AliasFile:
    """The host's aliases file; postmaster goes to root unless it says otherwise. Its
    problems are warnings: an unusable entry makes only the mail for that name wait."""
    read = lookup.file_text(str(host.aliases))
    parsed = parse_aliases(read.text, lambda name: _host_name_known(name, lookup))
    table = parsed.table
    if not any(name == POSTMASTER for name, _ in table):
        table += ((POSTMASTER, ("root",)),)
    unread = (Problem(0, f"cannot be read: {read.error}"),) if read.error else ()
    return AliasFile(table, unread + parsed.problems)


def _smtpd(table: _Table, host: HostConfig, lookup: SystemLookup) -> SmtpdConfig:
    table.reject_unknown(TABLE_KEYS["smtpd"])
    defaults = SmtpdConfig()
    certificate, key = (_optional_path(table, name) for name in ("certificate", "key"))
    if (certificate is None) != (key is None):
        missing = "key" if key is None else "certificate"
        raise table.error(missing, "required: give certificate and key together")
    local = _endpoints(table, "local", defaults.local)
    for index, (address, _) in enumerate(local):
        if not address.is_loopback:  # the kernel names only a local peer's uid
            raise table.error(f"local[{index}]", f"'{address}' is not a loopback address")
    config = SmtpdConfig(
        local=local,
        socket=table.flag("socket") if table.has("socket") else defaults.socket,
        certificate=certificate,
        key=key,
        submission=_endpoints(table, "submission", defaults.submission),
        submissions=_endpoints(table, "submissions", defaults.submissions),
        user=table.string_or("user", defaults.user),
        timeout=_seconds(table, "timeout", defaults.timeout),
        client_limit=_count(table, "client_limit", defaults.client_limit),
        session_limit=_count(table, "session_limit", defaults.session_limit),
    )
    if not config.remote:
        return config
    # The front talks to every remote client: a user of its own, no other process's.
    account = lookup.user(config.user)
    if account is None:
        raise table.error("user", f"unknown user {config.user!r}")
    if account.uid == 0:
        raise table.error("user", f"{config.user!r} has uid 0; the front never runs as root")
    for name, uid in (("host.user", host.uid), ("host.dns_user", host.dns_uid)):
        if account.uid == uid:
            raise table.error("user", f"uid {uid} is also the uid of {name}")
    return replace(config, uid=account.uid, gid=account.gid)


def _endpoints(table: _Table, key: str, default: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    texts = table.strings(key)
    if texts is None:
        return default
    found = tuple(_endpoint(table, f"{key}[{i}]", text) for i, text in enumerate(texts))
    if len(set(found)) != len(found):
        raise table.error(key, "an address is listed twice")
    return found


def _endpoint(table: _Table, key: str, text: str) -> Endpoint:
    _check_endpoint(table, key, text)
    host, _, port = text.rpartition(":")
    return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")), int(port)


def _optional_path(table: _Table, key: str) -> Path | None:
    text = table.string(key)
    if text is None:
        return None
    path = PurePosixPath(text)
    if not path.is_absolute() or ".." in path.parts:
        raise table.error(key, f"{text!r} is not an absolute path")
    return Path(path)


def _check_host_jails(main: _Table, host: HostConfig, lookup: SystemLookup) -> None:
    """The DNS relay's jail (in run_dir), the host worker's (spool) and the mailbox
    writers' (mail_spool) are entered without following symlinks too: a symlink on the way
    is refused now, not at every start. The supervisor makes what does not exist yet."""
    for key, path in (
        ("run_dir", host.run_dir),
        ("spool", host.spool),
        ("mail_spool", host.mail_spool),
    ):
        for part in (*reversed(path.parents), path):
            inode = lookup.lstat(str(part))
            if inode is None:
                break
            if stat.S_ISLNK(inode.mode):
                raise main.error(f"host.{key}", f"'{part}' is a symbolic link: give the real path")


def _check_endpoint(table: _Table, key: str, text: str) -> None:
    """ "198.51.100.1:9425" or "[2001:db8::1]:9425"."""
    host, colon, port = text.rpartition(":")
    # Not str.isdigit: it takes "²", which int() refuses.
    if not colon or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise table.error(key, f"{text!r} is not address:port")
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise table.error(key, f"{host!r} is not an IP address") from None


def _absolute_path(table: _Table, key: str, default: Path) -> Path:
    path = PurePosixPath(table.string_or(key, str(default)))
    if not path.is_absolute() or ".." in path.parts:
        raise table.error(key, f"{str(path)!r} is not an absolute path")
    return Path(path)


def _network(table: _Table, lookup: SystemLookup) -> NetworkConfig:
    table.reject_unknown(TABLE_KEYS["network"])
    mode = table.string_or("mode", "bridge")
    if mode not in ("bridge", "routed"):
        raise table.error("mode", f"{mode!r} is neither 'bridge' nor 'routed'")

    prefix = table.string_or("prefix", "nsm")
    if not _PREFIX.fullmatch(prefix):
        raise table.error("prefix", f"{prefix!r} is not 1-5 of [a-z0-9] starting with a letter")

    if mode == "routed":
        for key in ("bridge", "gateway4", "gateway6", "subnet4", "subnet6"):
            if table.has(key):
                raise table.error(key, "only used in bridge mode")
        return NetworkConfig("routed", None, None, None, prefix)

    bridge = table.required_string("bridge")
    if not _is_interface_name(bridge):
        raise table.error("bridge", f"{bridge!r} is not a valid interface name")

    gateway4 = gateway6 = None
    if (text := table.string("gateway4")) is not None:
        gateway4 = _typed_address(table, "gateway4", text, IPv4Address, gateway=True)
    if (text := table.string("gateway6")) is not None:
        gateway6 = _typed_address(table, "gateway6", text, IPv6Address, gateway=True)
    subnet4 = subnet6 = None
    if (text := table.string("subnet4")) is not None:
        subnet4 = _subnet(table, "subnet4", text, IPv4Network)
    if (text := table.string("subnet6")) is not None:
        subnet6 = _subnet(table, "subnet6", text, IPv6Network)
    if subnet4 is None or subnet6 is None:
        # Not configured: the subnets the bridge itself is on (a configuration of the
        # first release has none); with no such bridge here, none is checked.
        on_bridge = lookup.bridge_subnets(bridge)
        subnet4 = subnet4 or _on_link(on_bridge, IPv4Network, gateway4)
        subnet6 = subnet6 or _on_link(on_bridge, IPv6Network, gateway6)
    # A link-local IPv6 router is on every link; any other gateway must be on the subnet.
    for key, gateway, subnet in (("gateway4", gateway4, subnet4), ("gateway6", gateway6, subnet6)):
        if gateway is None or subnet is None or gateway.is_link_local:
            continue
        if gateway not in subnet:
            raise table.error(
                key, f"'{gateway}' is outside the bridge's subnet{key[-1]} ({subnet})"
            )
    return NetworkConfig("bridge", bridge, gateway4, gateway6, prefix, subnet4, subnet6)


def _delivery(table: _Table) -> DeliveryConfig:
    table.reject_unknown(TABLE_KEYS["delivery"])
    defaults = DeliveryConfig()
    port = table.integer("port")
    if port is None:
        port = defaults.port
    elif not 1 <= port <= 65535:
        raise table.error("port", f"{port} is not a port number (1-65535)")
    first = _seconds(table, "retry_first", defaults.retry_first)
    maximum = _seconds(table, "retry_max", defaults.retry_max)
    if first > maximum:
        raise table.error("retry_first", f"{first} is more than retry_max ({maximum})")
    timeouts = defaults.smtp_timeouts
    return DeliveryConfig(
        concurrency=_concurrency(table, defaults.concurrency),
        dead_after=_count(table, "dead_after", defaults.dead_after),
        mx_address_limit=_count(table, "mx_address_limit", defaults.mx_address_limit),
        active_limit=_count(table, "active_limit", defaults.active_limit),
        smtp_timeouts=SmtpTimeouts(
            **{
                stage: _seconds(table, f"smtp_{stage}_timeout", getattr(timeouts, stage))
                for stage in SmtpTimeouts.__dataclass_fields__
            }
        ),
        destinations=tuple(_destination(t) for t in table.tables("destination")),
        suspend_rate=_suspend_rate(table),
        scan_interval=_seconds(table, "scan_interval", defaults.scan_interval),
        idle_exit=_idle_exit(table, defaults.idle_exit),
        timeout=_seconds(table, "timeout", defaults.timeout),
        port=port,
        retry_first=first,
        retry_max=maximum,
        lifetime=_seconds(table, "lifetime", defaults.lifetime),
        delay_warning=_seconds(table, "delay_warning", defaults.delay_warning),
        tls=_tls_policy(table) or defaults.tls,
        tls_reports=table.flag("tls_reports"),
        hourly_limit=_limit(table, "hourly_limit") or 0,
        recipient_limit=_limit(table, "recipient_limit") or 0,
        message_size_limit=_size(table, "message_size_limit", defaults.message_size_limit),
        queue_size_limit=_size(table, "queue_size_limit", defaults.queue_size_limit),
        tls_verify=tuple(
            _domain(table, f"tls_verify[{i}]", name)
            for i, name in enumerate(table.strings("tls_verify") or ())
        ),
    )


def _concurrency(table: _Table, defaults: Concurrency) -> Concurrency:
    chosen = Concurrency(
        initial_destination_concurrency=_count(
            table, "initial_destination_concurrency", defaults.initial_destination_concurrency
        ),
        destination_concurrency_limit=_count(
            table, "destination_concurrency_limit", defaults.destination_concurrency_limit
        ),
        max_sessions=_count(table, "max_sessions", defaults.max_sessions),
    )
    if chosen.initial_destination_concurrency > chosen.destination_concurrency_limit:
        raise table.error(
            "initial_destination_concurrency", "more than destination_concurrency_limit"
        )
    return chosen


def _destination(table: _Table) -> DestinationRule:
    table.reject_unknown(TABLE_KEYS["delivery.destination"])
    patterns = table.strings("match")
    if not patterns and (text := table.string("match")) is not None:
        patterns = (text,)
    if not patterns:
        raise table.error("match", "required: a pattern of domains or mail hosts")
    for i, pattern in enumerate(patterns):
        if not _PATTERN.fullmatch(pattern.lower()):
            raise table.error(f"match[{i}]", f"{pattern!r} is not a domain pattern")
    family = table.string("family")
    if family is not None and family not in FAMILIES:
        raise table.error("family", f"{family!r} is none of {', '.join(FAMILIES)}")
    initial = _count_or_none(table, "initial_destination_concurrency")
    limit = _count_or_none(table, "destination_concurrency_limit")
    if initial is not None and limit is not None and initial > limit:
        raise table.error("initial_destination_concurrency", "over destination_concurrency_limit")
    return DestinationRule(
        match=tuple(p.lower() for p in patterns),
        initial_destination_concurrency=initial,
        destination_concurrency_limit=limit,
        family=family,
    )


def _count(table: _Table, key: str, default: int) -> int:
    value = _count_or_none(table, key)
    return default if value is None else value


def _count_or_none(table: _Table, key: str) -> int | None:
    value = table.integer(key)
    if value is not None and not 1 <= value <= _MAX_COUNT:
        raise table.error(key, f"{value} is not a count of at least 1 (up to {_MAX_COUNT})")
    return value


def _idle_exit(table: _Table, default: float) -> float:
    value = table.number("idle_exit")
    if value == 0:
        return 0.0
    return _seconds(table, "idle_exit", default)


def _limit(table: _Table, key: str) -> int | None:
    value = table.integer(key)
    if value is not None and not 0 <= value < 2**31:
        raise table.error(key, f"{value} is not a limit (0 for none)")
    return value


def _size(table: _Table, key: str, default: int) -> int:
    value = _size_or_none(table, key)
    return default if value is None else value


def _size_or_none(table: _Table, key: str) -> int | None:
    value = table.integer(key)
    if value is not None and not 0 <= value < 2**50:
        raise table.error(key, f"{value} is not a size in bytes (0 for no limit)")
    return value


def _tls_policy(table: _Table) -> str | None:
    policy = table.string("tls")
    if policy is not None and policy not in TLS_POLICIES:
        raise table.error("tls", f"{policy!r} is not one of {', '.join(TLS_POLICIES)}")
    return policy


def _seconds(table: _Table, key: str, default: float) -> float:
    value = table.number(key)
    if value is None:
        return default
    # TOML has inf and nan; neither is a usable number of seconds.
    if not 0 < value < float("inf"):
        raise table.error(key, f"{value!r} is not a positive number of seconds")
    return value


def _tenant(table: _Table, lookup: SystemLookup) -> Tenant:
    table.reject_unknown(TABLE_KEYS["tenant"])
    domain = _domain(table, "domain", table.required_string("domain"))

    ipv4 = ipv6 = None
    if (text := table.string("ipv4")) is not None:
        ipv4 = _typed_address(table, "ipv4", text, IPv4Address, gateway=False)
    if (text := table.string("ipv6")) is not None:
        ipv6 = _typed_address(table, "ipv6", text, IPv6Address, gateway=False)
    if ipv4 is None and ipv6 is None:
        raise table.error(None, "needs an address: ipv4, ipv6 or both")

    ehlo_text = table.string("ehlo")
    ehlo = domain if ehlo_text is None else _domain(table, "ehlo", ehlo_text)
    uid, gid, passwd_home = _identity(table, lookup)
    dkim_selector, dkim_key = _dkim(table)
    users = _users(table)
    local_delivery, alias_table = _local_delivery(table, domain, users)
    return Tenant(
        domain=domain,
        ipv4=ipv4,
        ipv6=ipv6,
        ehlo=ehlo,
        uid=uid,
        gid=gid,
        home=_home(table, passwd_home),
        users=users,
        source=table.file,
        local_delivery=local_delivery,
        aliases=alias_table,
        foreign_senders=table.flag("foreign_senders"),
        tls=_tls_policy(table),
        hourly_limit=_limit(table, "hourly_limit"),
        recipient_limit=_limit(table, "recipient_limit"),
        message_size_limit=_size_or_none(table, "message_size_limit"),
        queue_size_limit=_size_or_none(table, "queue_size_limit"),
        initial_destination_concurrency=_count_or_none(table, "initial_destination_concurrency"),
        destination_concurrency_limit=_count_or_none(table, "destination_concurrency_limit"),
        max_sessions=_count_or_none(table, "max_sessions"),
        dkim_selector=dkim_selector,
        dkim_key=dkim_key,
        suspend_rate=_suspend_rate(table),
    )


def _suspend_rate(table: _Table) -> SuspendRule | None:
    text = table.string("suspend_rate")
    if text is None:
        return None
    rule = suspend.parse(text)
    if rule is None:
        raise table.error("suspend_rate", f"{text!r} is not a rate such as '30% of 50'")
    return rule


def _dkim(table: _Table) -> tuple[str | None, Path | None]:
    selector = table.string("dkim_selector")
    key = table.string("dkim_key")
    if selector is None and key is None:
        return None, None
    if selector is None or key is None:
        missing = "dkim_selector" if selector is None else "dkim_key"
        raise table.error(missing, "required: give dkim_selector and dkim_key together")
    if not _SELECTOR.fullmatch(selector.lower()):
        raise table.error("dkim_selector", f"{selector!r} is not a selector (LDH labels)")
    path = PurePosixPath(key)
    if not path.is_absolute() or ".." in path.parts:
        raise table.error("dkim_key", f"{key!r} is not an absolute path")
    return selector.lower(), Path(path)


def _identity(table: _Table, lookup: SystemLookup) -> tuple[int, int, str | None]:
    """(uid, gid, passwd home or None) from exactly one of `user` or `uid` plus `gid`."""
    user = table.string("user")
    uid = table.integer("uid")
    gid = table.integer("gid")
    if user is not None:
        for key in ("uid", "gid"):
            if table.has(key):
                raise table.error(key, "give either user or uid and gid, not both")
        account = lookup.user(user)
        if account is None:
            raise table.error("user", f"unknown user {user!r}")
        # A tenant worker must never hold root's uid or group.
        if account.uid == 0 or account.gid == 0:
            raise table.error("user", f"{user!r} has uid or gid 0; a tenant never runs as root")
        return account.uid, account.gid, account.home
    if uid is None and gid is None:
        raise table.error("user", "required (or uid and gid)")
    for key, value, other in (("uid", uid, "gid"), ("gid", gid, "uid")):
        if value is None:
            raise table.error(key, f"required with {other}")
        if value == 0:
            raise table.error(key, "0 is root; a tenant never runs as root")
        if not 0 < value <= _MAX_ID:
            raise table.error(key, f"{value} is not a valid id (1-{_MAX_ID})")
    assert uid is not None and gid is not None
    return uid, gid, None


def _home(table: _Table, passwd_home: str | None) -> Path:
    text = table.string("home")
    origin = ""
    if text is None:
        if passwd_home is None:
            raise table.error("home", "required with uid and gid")
        text, origin = passwd_home, " (from passwd)"
    home = PurePosixPath(text)
    if not home.is_absolute():
        raise table.error("home", f"{text!r}{origin} is not an absolute path")
    if ".." in home.parts:
        raise table.error("home", f"{text!r}{origin} contains '..'")
    if len(home.parts) == 1:
        raise table.error("home", f"{text!r}{origin} is the root directory")
    return Path(home)


def _home_problem(home: Path, uid: int, lookup: SystemLookup) -> str | None:
    """Why root must not chroot into `home` for uid, or None.

    Whoever may write to a directory on the way can put something else (a symlink to
    another tenant's home, say) where the home was; the sticky bit does not help, since
    the owner of the home may still rename it, and a world-writable directory is scratch
    space that tmpfiles cleaning or a reboot empties.
    """
    for path in (*reversed(home.parents), home):
        inode = lookup.lstat(str(path))
        if inode is None:
            return f"'{home}' is not an existing directory"
        if stat.S_ISLNK(inode.mode):
            return f"'{path}' is a symbolic link: give the home's real path"
        if not stat.S_ISDIR(inode.mode):
            return f"'{path}' is not a directory"
        if inode.mode & 0o022:
            mode = f"{stat.S_IMODE(inode.mode):04o}"
            return f"'{path}' is writable by group or others (mode {mode}): no place for a home"
        owner = uid if path == home else 0
        if inode.uid != owner:
            whose = f"the tenant's (uid {uid})" if path == home else "root's"
            return f"'{path}' belongs to uid {inode.uid}, not {whose}"
    return None


def _users(table: _Table) -> tuple[str, ...]:
    users = table.strings("users") or ()
    seen: set[str] = set()
    for index, user in enumerate(users):
        field = f"users[{index}]"
        # RFC 5321 4.1.2 Dot-string; 4.5.3.1.1 limits a local part to 64 octets.
        if not _DOT_ATOM.fullmatch(user) or len(user) > 64:
            raise table.error(field, f"{user!r} is not a dot-atom local part of 1-64 characters")
        # Local parts are case-sensitive on the wire (RFC 5321 2.4), but two mailboxes
        # differing only in case would surprise every sender.
        if user.casefold() in seen:
            raise table.error(field, f"{user!r} is listed twice")
        seen.add(user.casefold())
    return users


def _local_delivery(table: _Table, domain: str, users: tuple[str, ...]) -> tuple[str, Table]:
    """The tenant's local_delivery (default: "maildir" with users, else "mx") and its
    aliases, postmaster among them (RFC 5321 4.5.1): its own, else the first user."""
    mode = table.string("local_delivery")
    if mode is not None and mode not in LOCAL_DELIVERY:
        raise table.error("local_delivery", f"{mode!r} is neither 'maildir' nor 'mx'")
    mode = mode or ("maildir" if users else "mx")
    names = table.table("aliases", required=False)
    if mode == "mx":
        for key, given in (("users", users), ("aliases", names.names())):
            if given:
                raise table.error(
                    key,
                    'needs local_delivery = "maildir": with "mx" (the default without users) '
                    "the domain's mail goes to its MX",
                )
        return mode, ()
    local = {user.lower() for user in users} | {name.lower() for name in names.names()}
    found: dict[str, tuple[str, ...]] = {}
    for name in names.names():
        if not _DOT_ATOM.fullmatch(name) or len(name) > 64:
            raise names.error(name, f"{name!r} is not a dot-atom local part of 1-64 characters")
        if name.lower() in found:
            raise names.error(name, f"{name!r} is listed twice")
        targets = names.string_or_strings(name)
        for index, target in enumerate(targets):
            _check_alias_target(names, f"{name}[{index}]", target, domain, local)
        found[name.lower()] = targets
    if POSTMASTER not in local:
        if not users:
            raise table.error(
                "aliases",
                f"postmaster@{domain} must be deliverable (RFC 5321 4.5.1): "
                "give aliases.postmaster or list a user",
            )
        found[POSTMASTER] = (users[0],)
    return mode, tuple(found.items())


def _check_alias_target(
    names: _Table, field: str, target: str, domain: str, local: set[str]
) -> None:
    kind = refused(target)
    if kind is not None:
        raise names.error(field, f"{target!r} is {kind}: {REFUSAL}")
    local_part, target_domain = split(target)
    if "@" not in target or same_domain(target_domain, domain):
        if local_part.lower() not in local:
            raise names.error(field, f"{target!r} is neither a user nor an alias of {domain}")
        return
    if not local_part or any(c.isspace() or not c.isprintable() or c in "<>" for c in target):
        raise names.error(field, f"{target!r} is not an address")
    _domain(names, field, target_domain)


# --- cross-checks ----------------------------------------------------------------------


class _Registry:
    """Tenants accepted so far, and who already claimed each domain, address, uid and home."""

    def __init__(self, host: HostConfig, network: NetworkConfig, smtpd: SmtpdConfig) -> None:
        self.tenants: list[Tenant] = []
        self._host = host
        self._submit_uid = smtpd.uid if smtpd.remote else None
        self._subnets = {"ipv4": network.subnet4, "ipv6": network.subnet6}
        self._gateways: dict[IPAddress, str] = {}
        if network.gateway4 is not None:
            self._gateways[network.gateway4] = "network.gateway4"
        if network.gateway6 is not None:
            self._gateways[network.gateway6] = "network.gateway6"
        self._claims: dict[tuple[str, object], str] = {}
        self._tables: list[_Table] = []

    def add(self, table: _Table, tenant: Tenant) -> None:
        here = f"{table.path} in {table.file}"
        if tenant.domain == self._host.name:
            raise table.error("domain", f"'{tenant.domain}' is the host's own name (host.name)")
        self._claim(table, "domain", tenant.domain, here)
        for key, address in (("ipv4", tenant.ipv4), ("ipv6", tenant.ipv6)):
            if address is None:
                continue
            if address in self._gateways:
                raise table.error(key, f"'{address}' is the {self._gateways[address]}")
            subnet = self._subnets[key]
            if subnet is not None and address not in subnet:
                raise table.error(
                    key, f"'{address}' is outside the bridge's subnet{key[-1]} ({subnet})"
                )
            self._claim(table, key, address, here, kind="address")
        # Processes sharing a uid can signal and ptrace each other: no isolation left.
        id_key = "user" if table.has("user") else "uid"
        if tenant.uid == self._host.uid:
            raise table.error(id_key, f"uid {tenant.uid} is also the uid of host.user")
        if tenant.uid == self._host.dns_uid:
            raise table.error(id_key, f"uid {tenant.uid} is also the uid of host.dns_user")
        if tenant.uid == self._submit_uid:
            raise table.error(id_key, f"uid {tenant.uid} is also the uid of smtpd.user")
        self._claim(table, id_key, tenant.uid, here, kind="uid")
        self._claim(table, "home", tenant.home, here)
        # A home inside another can be replaced by the tenant of the outer one.
        homes = [(self._host.spool, "host.spool"), (self._host.mail_spool, "host.mail_spool")]
        homes += [(t.home, f"the home of {t.domain}") for t in self.tenants]
        for home, what in homes:
            if tenant.home.is_relative_to(home) or home.is_relative_to(tenant.home):
                where = "inside" if tenant.home.is_relative_to(home) else "above"
                raise table.error("home", f"'{tenant.home}' is {where} {what}")
        self.tenants.append(tenant)
        self._tables.append(table)

    def check_dkim_keys(self) -> None:
        """A tenant can read and replace the files in its home: no key may be there."""
        for table, tenant in zip(self._tables, self.tenants, strict=True):
            key = tenant.dkim_key
            owner = next((t for t in self.tenants if key and key.is_relative_to(t.home)), None)
            if owner is not None:
                raise table.error("dkim_key", f"'{key}' is inside the home of {owner.domain}")

    def check_homes(self, lookup: SystemLookup) -> None:
        """Each home as the file system has it now; the jail, at every start, follows no
        symlink on the way (`nsmail.root.jail.chroot_into`)."""
        for table, tenant in zip(self._tables, self.tenants, strict=True):
            problem = _home_problem(tenant.home, tenant.uid, lookup)
            if problem is not None:
                origin = "" if table.has("home") else " (the home from passwd)"
                raise table.error("home", problem + origin)

    def _claim(
        self, table: _Table, key: str, value: object, here: str, *, kind: str | None = None
    ) -> None:
        owner = self._claims.setdefault((kind or key, value), here)
        if owner != here:
            raise table.error(key, f"'{value}' is already used by {owner}")


def _check_gateways(main: _Table, network: NetworkConfig, tenants: list[Tenant]) -> None:
    """Bridge mode: a tenant address of a family needs that family's gateway."""
    if network.mode != "bridge":
        return
    for family, needed in (
        ("ipv4", {"gateway4": network.gateway4}),
        ("ipv6", {"gateway6": network.gateway6}),
    ):
        needing = next((t for t in tenants if getattr(t, family) is not None), None)
        missing = next((key for key, value in needed.items() if value is None), None)
        if needing is not None and missing is not None:
            raise main.error(
                f"network.{missing}",
                f"required in bridge mode: {needing.domain} has an {family} address",
            )


# --- values ----------------------------------------------------------------------------


def _domain(table: _Table, key: str, text: str) -> str:
    """A lower-cased host name of two or more LDH labels; IDNs only as A-labels."""
    if not text.isascii():
        raise table.error(key, f"{text!r} is not ASCII; write an IDN as its xn-- A-label")
    name = text.lower()
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.fullmatch(lb) for lb in labels):
        raise table.error(key, f"{text!r} is not a domain name (two or more LDH labels)")
    # RFC 3696 2: an all-numeric top-level label would read as an IP address.
    if labels[-1].isdigit():
        raise table.error(key, f"{text!r} has an all-numeric top-level label")
    for label in labels:
        if label.startswith("xn--") and not _is_a_label(label):
            raise table.error(key, f"{label!r} is not a valid A-label")
    return name


def _is_a_label(label: str) -> bool:
    try:
        return bool(label[4:].encode("ascii").decode("punycode"))
    except UnicodeError:
        return False


def _is_interface_name(name: str) -> bool:
    # The kernel's dev_valid_name() in net/core/dev.c, with IFNAMSIZ 16 including the NUL.
    return (
        0 < len(name) <= 15
        and name not in (".", "..")
        and not any(c in "/:" or c.isspace() or not c.isprintable() for c in name)
    )


def _address(table: _Table, key: str, text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise table.error(key, f"{text!r} is not an IP address") from None


def _on_link(
    subnets: Sequence[IPNetwork], family: type[_Subnet], gateway: IPAddress | None
) -> _Subnet | None:
    """The bridge's subnet of `family` that holds the gateway, else its only one."""
    mine = [n for n in subnets if isinstance(n, family)]
    holding = [n for n in mine if gateway is not None and gateway in n]
    chosen = holding or (mine if len(mine) == 1 else [])
    return chosen[0] if chosen else None


def _subnet(table: _Table, key: str, text: str, family: type[_Subnet]) -> _Subnet:
    """A network written as address/prefix length, e.g. "198.51.100.0/24"."""
    try:
        subnet = ipaddress.ip_network(text, strict=False)
    except ValueError:
        subnet = None
    if not isinstance(subnet, family) or "/" not in text:
        version = "IPv4" if family is IPv4Network else "IPv6"
        raise table.error(key, f"{text!r} is not an {version} network (address/prefix length)")
    if subnet.network_address != ipaddress.ip_address(text.partition("/")[0]):
        raise table.error(key, f"{text!r} has host bits set: the network is '{subnet}'")
    return subnet


def _typed_address(
    table: _Table, key: str, text: str, family: type[_Family], *, gateway: bool
) -> _Family:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if not isinstance(address, family):
        version = "IPv4" if family is IPv4Address else "IPv6"
        raise table.error(key, f"{text!r} is not an {version} address")
    problem = _unicast_problem(address, allow_link_local=gateway)
    if problem:
        raise table.error(key, f"'{address}' is not a usable unicast address ({problem})")
    return address


def _unicast_problem(address: IPAddress, *, allow_link_local: bool) -> str | None:
    # An IPv6 router is commonly known only by its link-local address, so a gateway may be
    # one; a tenant's own address must be reachable beyond the link.
    for flag, problem in (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_multicast, "multicast"),
        (address.is_link_local and not allow_link_local, "link-local"),
        (address.is_reserved, "reserved"),
    ):
        if flag:
            return problem
    return None


def _toml_type(value: object) -> str:
    kinds: tuple[tuple[type | tuple[type, ...], str], ...] = (
        (bool, "boolean"),
        (int, "integer"),
        (float, "float"),
        (str, "string"),
        (list, "array"),
        (dict, "table"),
        ((datetime, date, time), "date/time"),
    )
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)
