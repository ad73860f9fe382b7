"""Tests for nsmail.core.config: the good path, a table of bad configurations, and hostile input."""

from __future__ import annotations

import dataclasses
import stat
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path

import pytest
from configs import (
    BCD,
    BRIDGE,
    CDE,
    DROPIN,
    GOOD_MAIN,
    HOST,
    LOOKUP,
    MAIN,
    USERS,
    tenant,
    toml_value,
    tree,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from nsmail.core.aliases import AliasFile, Problem
from nsmail.core.config import (
    Account,
    Config,
    ConfigError,
    DeliveryConfig,
    FileText,
    HostConfig,
    Inode,
    NetworkConfig,
    SystemLookup,
    Tenant,
    host_identity,
    parse,
    parse_resolv_conf,
)
from nsmail.core.layout import DEFAULT_CONFIG, locate
from nsmail.host.configfile import load, system_lookup


def fail(*documents: tuple[str, str], lookup: SystemLookup = LOOKUP) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(documents, lookup)
    return caught.value


def test_good_config_with_all_defaults() -> None:
    config = parse([(MAIN, GOOD_MAIN)], LOOKUP)
    bcd = Tenant(
        domain="bcd.test",
        ipv4=IPv4Address("198.51.100.70"),
        ipv6=None,
        ehlo="bcd.test",
        uid=1001,
        gid=1001,
        home=Path("/srv/tenants/bcd"),
        users=(),
        source=MAIN,
        local_delivery="mx",  # no users: its mailboxes are elsewhere
    )
    assert config == Config(
        path=Path(MAIN),
        host=HostConfig(
            name="abc.test",
            resolvers=(IPv4Address("198.51.100.53"),),
            user="nsmail",
            uid=990,
            gid=990,
            dns_user="nsmail-dns",
            dns_uid=991,
            dns_gid=991,
            run_dir=Path("/run/nsmail"),
        ),
        network=NetworkConfig(
            mode="bridge",
            bridge="nsbr0",
            gateway4=IPv4Address("198.51.100.1"),
            gateway6=IPv6Address("2001:db8:51::1"),
            prefix="nsm",
            subnet4=IPv4Network("198.51.100.0/24"),
            subnet6=IPv6Network("2001:db8:51::/64"),
        ),
        delivery=DeliveryConfig(scan_interval=60.0, timeout=30.0, port=25),
        tenants=(bcd,),
        host_aliases=AliasFile((("postmaster", ("root",)),)),  # no /etc/aliases: the default
    )
    assert config.tenant("BCD.test") == bcd
    assert config.tenant("cde.test") is None
    assert bcd.addresses == (IPv4Address("198.51.100.70"),)


def test_every_key_given() -> None:
    main = """
        [host]
        name = "ABC.test"
        resolvers = ["198.51.100.53", "2001:db8:53::53"]
        user = "nsmail"
        run_dir = "/run/nsm-lab"
        [network]
        mode = "routed"
        prefix = "lab1"
        [delivery]
        scan_interval = 0.5
        timeout = 5
        port = 2525
        [[tenant]]
        domain = "xn--bcher-kva.test"
        ipv4 = "203.0.113.70"
        ipv6 = "2001:db8:51::70"
        ehlo = "Mail.xn--bcher-kva.test"
        uid = 2000
        gid = 2001
        home = "/srv/other/"
        users = ["b1", "first.last", "x+tag"]
    """
    config = parse([(MAIN, main)], LOOKUP)
    assert config.host.name == "abc.test"
    assert config.host.resolvers == (ip_address("198.51.100.53"), ip_address("2001:db8:53::53"))
    assert config.host.run_dir == Path("/run/nsm-lab")
    assert config.network == NetworkConfig("routed", None, None, None, "lab1")
    assert config.delivery == DeliveryConfig(scan_interval=0.5, timeout=5.0, port=2525)
    (only,) = config.tenants
    assert only.domain == "xn--bcher-kva.test"
    assert only.ehlo == "mail.xn--bcher-kva.test"
    assert only.addresses == (IPv4Address("203.0.113.70"), IPv6Address("2001:db8:51::70"))
    assert (only.uid, only.gid, only.home) == (2000, 2001, Path("/srv/other"))
    assert only.users == ("b1", "first.last", "x+tag")


def test_dropins_are_merged_in_order_and_remember_their_file() -> None:
    other = "/etc/nsmail/tenants.d/zz.toml"
    config = parse([(MAIN, GOOD_MAIN), (DROPIN, CDE), (other, "")], LOOKUP)
    assert [(t.domain, t.source) for t in config.tenants] == [
        ("bcd.test", MAIN),
        ("cde.test", DROPIN),
    ]
    assert config.tenant("cde.test") is not None


BAD = [
    # (id, documents, file, field)
    ("toml syntax", [(MAIN, HOST + "x = \n")], MAIN, "toml"),
    ("dropin toml syntax", [(MAIN, GOOD_MAIN), (DROPIN, "[[tenant]\n")], DROPIN, "toml"),
    ("unknown top-level table", [(MAIN, GOOD_MAIN + "[smtp]\n")], MAIN, "smtp"),
    ("unknown host key", [(MAIN, HOST + 'nmae = "x"\n' + BRIDGE)], MAIN, "host.nmae"),
    ("unknown tenant key", [(MAIN, HOST + BRIDGE + tenant(mail="x"))], MAIN, "tenant[0].mail"),
    ("missing host", [(MAIN, BRIDGE + BCD)], MAIN, "host"),
    ("missing host name", [(MAIN, "[host]\n" + BRIDGE)], MAIN, "host.name"),
    ("host not a table", [(MAIN, "host = 1\n")], MAIN, "host"),
    ("bad host name", [(MAIN, '[host]\nname = "abc"\n' + BRIDGE)], MAIN, "host.name"),
    ("unknown host user", [(MAIN, HOST + 'user = "ghost"\n' + BRIDGE)], MAIN, "host.user"),
    ("unknown dns user", [(MAIN, HOST + 'dns_user = "ghost"\n' + BRIDGE)], MAIN, "host.dns_user"),
    ("root dns user", [(MAIN, HOST + 'dns_user = "toor"\n' + BRIDGE)], MAIN, "host.dns_user"),
    (
        "dns user is the host user",
        [(MAIN, HOST + 'dns_user = "nsmail"\n' + BRIDGE)],
        MAIN,
        "host.dns_user",
    ),
    ("relative run_dir", [(MAIN, HOST + 'run_dir = "run"\n' + BRIDGE)], MAIN, "host.run_dir"),
    (
        "resolvers not list",
        [(MAIN, HOST + 'resolvers = "198.51.100.53"\n')],
        MAIN,
        "host.resolvers",
    ),
    ("resolvers not IPs", [(MAIN, HOST + 'resolvers = ["dns.test"]\n')], MAIN, "host.resolvers[0]"),
    ("resolvers ints", [(MAIN, HOST + "resolvers = [1]\n")], MAIN, "host.resolvers[0]"),
    ("resolvers empty", [(MAIN, HOST + "resolvers = []\n")], MAIN, "host.resolvers"),
    ("bad mode", [(MAIN, HOST + '[network]\nmode = "nat"\n')], MAIN, "network.mode"),
    ("bridge mode, no bridge", [(MAIN, HOST + "[network]\n")], MAIN, "network.bridge"),
    ("bridge with /", [(MAIN, HOST + '[network]\nbridge = "br/0"\n')], MAIN, "network.bridge"),
    (
        "bridge too long",
        [(MAIN, HOST + '[network]\nbridge = "b23456789012345x"\n')],
        MAIN,
        "network.bridge",
    ),
    ("bridge with space", [(MAIN, HOST + '[network]\nbridge = "br 0"\n')], MAIN, "network.bridge"),
    (
        "routed with bridge",
        [(MAIN, HOST + '[network]\nmode = "routed"\nbridge = "br0"\n')],
        MAIN,
        "network.bridge",
    ),
    (
        "bad prefix",
        [(MAIN, HOST + '[network]\nmode = "routed"\nprefix = "1ns"\n')],
        MAIN,
        "network.prefix",
    ),
    (
        "long prefix",
        [(MAIN, HOST + '[network]\nmode = "routed"\nprefix = "nsmail"\n')],
        MAIN,
        "network.prefix",
    ),
    (
        "gateway4 is v6",
        [(MAIN, HOST + '[network]\nbridge = "br0"\ngateway4 = "2001:db8::1"\n')],
        MAIN,
        "network.gateway4",
    ),
    (
        "no gateway4 for ipv4 tenant",
        [(MAIN, HOST + '[network]\nbridge = "br0"\n' + BCD)],
        MAIN,
        "network.gateway4",
    ),
    (
        "no gateway6 for ipv6 tenant",
        [(MAIN, HOST + '[network]\nbridge = "br0"\ngateway4 = "198.51.100.1"\n'), (DROPIN, CDE)],
        MAIN,
        "network.gateway6",
    ),
    (
        "scan_interval zero",
        [(MAIN, GOOD_MAIN + "[delivery]\nscan_interval = 0\n")],
        MAIN,
        "delivery.scan_interval",
    ),
    (
        "idle_exit negative",
        [(MAIN, GOOD_MAIN + "[delivery]\nidle_exit = -1\n")],
        MAIN,
        "delivery.idle_exit",
    ),
    ("timeout inf", [(MAIN, GOOD_MAIN + "[delivery]\ntimeout = inf\n")], MAIN, "delivery.timeout"),
    (
        "timeout string",
        [(MAIN, GOOD_MAIN + '[delivery]\ntimeout = "30"\n')],
        MAIN,
        "delivery.timeout",
    ),
    ("port bool", [(MAIN, GOOD_MAIN + "[delivery]\nport = true\n")], MAIN, "delivery.port"),
    ("port range", [(MAIN, GOOD_MAIN + "[delivery]\nport = 65536\n")], MAIN, "delivery.port"),
    ("tenant not array", [(MAIN, HOST + BRIDGE + '[tenant]\ndomain = "b.test"\n')], MAIN, "tenant"),
    ("dropin with host", [(MAIN, GOOD_MAIN), (DROPIN, HOST)], DROPIN, "host"),
    ("dropin with key", [(MAIN, GOOD_MAIN), (DROPIN, "x = 1\n" + CDE)], DROPIN, "x"),
    ("missing domain", [(MAIN, HOST + BRIDGE + tenant(domain=None))], MAIN, "tenant[0].domain"),
    ("domain one label", [(MAIN, HOST + BRIDGE + tenant(domain="bcd"))], MAIN, "tenant[0].domain"),
    (
        "domain underscore",
        [(MAIN, HOST + BRIDGE + tenant(domain="b_d.test"))],
        MAIN,
        "tenant[0].domain",
    ),
    (
        "domain label 64",
        [(MAIN, HOST + BRIDGE + tenant(domain="a" * 64 + ".test"))],
        MAIN,
        "tenant[0].domain",
    ),
    (
        "domain too long",
        [(MAIN, HOST + BRIDGE + tenant(domain=("a" * 63 + ".") * 4 + "test"))],
        MAIN,
        "tenant[0].domain",
    ),
    (
        "domain hyphen edge",
        [(MAIN, HOST + BRIDGE + tenant(domain="-bcd.test"))],
        MAIN,
        "tenant[0].domain",
    ),
    (
        "domain U-label",
        [(MAIN, HOST + BRIDGE + tenant(domain="bücher.test"))],
        MAIN,
        "tenant[0].domain",
    ),
    (
        "domain numeric tld",
        [(MAIN, HOST + BRIDGE + tenant(domain="198.51.100.70"))],
        MAIN,
        "tenant[0].domain",
    ),
    (
        "domain trailing dot",
        [(MAIN, HOST + BRIDGE + tenant(domain="bcd.test."))],
        MAIN,
        "tenant[0].domain",
    ),
    ("domain as int", [(MAIN, HOST + BRIDGE + tenant(domain=7))], MAIN, "tenant[0].domain"),
    ("bad ehlo", [(MAIN, HOST + BRIDGE + tenant(ehlo="mail bcd.test"))], MAIN, "tenant[0].ehlo"),
    ("bad ipv4", [(MAIN, HOST + BRIDGE + tenant(ipv4="198.51.100.999"))], MAIN, "tenant[0].ipv4"),
    ("ipv4 holds v6", [(MAIN, HOST + BRIDGE + tenant(ipv4="2001:db8::7"))], MAIN, "tenant[0].ipv4"),
    (
        "ipv6 holds v4",
        [(MAIN, HOST + BRIDGE + tenant(ipv6="198.51.100.7"))],
        MAIN,
        "tenant[0].ipv6",
    ),
    (
        "ipv6 mapped v4",
        [(MAIN, HOST + BRIDGE + tenant(ipv6="::ffff:198.51.100.7"))],
        MAIN,
        "tenant[0].ipv6",
    ),
    ("multicast", [(MAIN, HOST + BRIDGE + tenant(ipv4="224.0.0.1"))], MAIN, "tenant[0].ipv4"),
    ("loopback", [(MAIN, HOST + BRIDGE + tenant(ipv4="127.0.0.2"))], MAIN, "tenant[0].ipv4"),
    ("unspecified", [(MAIN, HOST + BRIDGE + tenant(ipv6="::"))], MAIN, "tenant[0].ipv6"),
    ("link-local v4", [(MAIN, HOST + BRIDGE + tenant(ipv4="169.254.1.1"))], MAIN, "tenant[0].ipv4"),
    ("link-local v6", [(MAIN, HOST + BRIDGE + tenant(ipv6="fe80::7"))], MAIN, "tenant[0].ipv6"),
    ("no address", [(MAIN, HOST + BRIDGE + tenant(ipv4=None))], MAIN, "tenant[0]"),
    (
        "address is gateway",
        [(MAIN, HOST + BRIDGE + tenant(ipv4="198.51.100.1"))],
        MAIN,
        "tenant[0].ipv4",
    ),
    (
        "duplicate domain",
        [(MAIN, GOOD_MAIN), (DROPIN, tenant(ipv4="198.51.100.71", user="cde"))],
        DROPIN,
        "tenant[0].domain",
    ),
    (
        "duplicate domain by case",
        [(MAIN, GOOD_MAIN + tenant(domain="BCD.TEST", ipv4="198.51.100.71", user="cde"))],
        MAIN,
        "tenant[1].domain",
    ),
    (
        "duplicate address",
        [(MAIN, GOOD_MAIN), (DROPIN, tenant(domain="cde.test", user="cde"))],
        DROPIN,
        "tenant[0].ipv4",
    ),
    (
        "duplicate uid",
        [
            (MAIN, GOOD_MAIN),
            (DROPIN, tenant(domain="cde.test", ipv4="198.51.100.71", user="bcd-twin")),
        ],
        DROPIN,
        "tenant[0].user",
    ),
    (
        "uid of host user",
        [(MAIN, HOST + BRIDGE + tenant(user=None, uid=990, gid=990, home="/srv/other"))],
        MAIN,
        "tenant[0].uid",
    ),
    (
        "uid of dns user",
        [(MAIN, HOST + BRIDGE + tenant(user=None, uid=991, gid=991, home="/srv/other"))],
        MAIN,
        "tenant[0].uid",
    ),
    (
        "duplicate home",
        [
            (MAIN, GOOD_MAIN),
            (
                DROPIN,
                tenant(
                    domain="cde.test", ipv4="198.51.100.71", user="cde", home="/srv/tenants/bcd"
                ),
            ),
        ],
        DROPIN,
        "tenant[0].home",
    ),
    ("unknown user", [(MAIN, HOST + BRIDGE + tenant(user="ghost"))], MAIN, "tenant[0].user"),
    ("user with uid 0", [(MAIN, HOST + BRIDGE + tenant(user="toor"))], MAIN, "tenant[0].user"),
    ("user with gid 0", [(MAIN, HOST + BRIDGE + tenant(user="wheel"))], MAIN, "tenant[0].user"),
    (
        "uid without gid",
        [(MAIN, HOST + BRIDGE + tenant(user=None, uid=2000, home="/srv/other"))],
        MAIN,
        "tenant[0].gid",
    ),
    (
        "gid without uid",
        [(MAIN, HOST + BRIDGE + tenant(user=None, gid=2000, home="/srv/other"))],
        MAIN,
        "tenant[0].uid",
    ),
    ("user and uid", [(MAIN, HOST + BRIDGE + tenant(uid=2000))], MAIN, "tenant[0].uid"),
    (
        "uid 0",
        [(MAIN, HOST + BRIDGE + tenant(user=None, uid=0, gid=2000, home="/srv/other"))],
        MAIN,
        "tenant[0].uid",
    ),
    (
        "gid 0",
        [(MAIN, HOST + BRIDGE + tenant(user=None, uid=2000, gid=0, home="/srv/other"))],
        MAIN,
        "tenant[0].gid",
    ),
    (
        "uid -1",
        [(MAIN, HOST + BRIDGE + tenant(user=None, uid=-1, gid=2000, home="/srv/other"))],
        MAIN,
        "tenant[0].uid",
    ),
    (
        "uid as string",
        [(MAIN, HOST + BRIDGE + tenant(user=None, uid="2000", gid=2000))],
        MAIN,
        "tenant[0].uid",
    ),
    ("no user or uid", [(MAIN, HOST + BRIDGE + tenant(user=None))], MAIN, "tenant[0].user"),
    (
        "uid form without home",
        [(MAIN, HOST + BRIDGE + tenant(user=None, uid=2000, gid=2000))],
        MAIN,
        "tenant[0].home",
    ),
    (
        "relative home",
        [(MAIN, HOST + BRIDGE + tenant(home="srv/tenants/bcd"))],
        MAIN,
        "tenant[0].home",
    ),
    ("home is /", [(MAIN, HOST + BRIDGE + tenant(home="/"))], MAIN, "tenant[0].home"),
    ("home is //", [(MAIN, HOST + BRIDGE + tenant(home="//"))], MAIN, "tenant[0].home"),
    (
        "home with ..",
        [(MAIN, HOST + BRIDGE + tenant(home="/srv/other/.."))],
        MAIN,
        "tenant[0].home",
    ),
    (
        "missing home dir",
        [(MAIN, HOST + BRIDGE + tenant(home="/srv/gone"))],
        MAIN,
        "tenant[0].home",
    ),
    (
        "passwd home missing",
        [(MAIN, HOST + BRIDGE + tenant(user="nohome"))],
        MAIN,
        "tenant[0].home",
    ),
    ("users not list", [(MAIN, HOST + BRIDGE + tenant(users="b1"))], MAIN, "tenant[0].users"),
    (
        "users bad local part",
        [(MAIN, HOST + BRIDGE + tenant(users=["b1", "a..b"]))],
        MAIN,
        "tenant[0].users[1]",
    ),
    (
        "users with @",
        [(MAIN, HOST + BRIDGE + tenant(users=["b1@bcd.test"]))],
        MAIN,
        "tenant[0].users[0]",
    ),
    (
        "users too long",
        [(MAIN, HOST + BRIDGE + tenant(users=["b" * 65]))],
        MAIN,
        "tenant[0].users[0]",
    ),
    (
        "duplicate users",
        [(MAIN, HOST + BRIDGE + tenant(users=["b1", "B1"]))],
        MAIN,
        "tenant[0].users[1]",
    ),
    (
        "second tenant bad",
        [(MAIN, GOOD_MAIN), (DROPIN, CDE + tenant(domain="x", user="cde"))],
        DROPIN,
        "tenant[1].domain",
    ),
]


@pytest.mark.parametrize(
    ("documents", "file", "field"), [case[1:] for case in BAD], ids=[case[0] for case in BAD]
)
def test_bad_configuration(documents: list[tuple[str, str]], file: str, field: str) -> None:
    error = fail(*documents)
    assert (error.file, error.field) == (file, field)
    assert str(error).startswith(f"{file}: {field}: ")
    assert error.message
    assert "\n" not in str(error)


def test_messages_quote_the_value() -> None:
    error = fail((MAIN, HOST + BRIDGE + tenant(ipv4="198.51.100.999")))
    assert str(error) == f"{MAIN}: tenant[0].ipv4: '198.51.100.999' is not an IPv4 address"
    assert "line 3, column 5" in fail((MAIN, HOST + "x = \n")).message


def test_no_resolvers_anywhere() -> None:
    lookup = SystemLookup(user=USERS.get, lstat=LOOKUP.lstat, default_resolvers=tuple)
    with pytest.raises(ConfigError, match=r"host\.resolvers"):
        parse([(MAIN, GOOD_MAIN)], lookup)


def test_unprintable_values_stay_on_one_line() -> None:
    error = fail((MAIN, '"bad\\nkey\\u2028" = 1\n' + HOST))
    assert "\n" not in str(error) and "\u2028" not in str(error)
    assert error.field == "bad\\nkey\\u2028"


def test_parse_resolv_conf() -> None:
    text = "# comment\nnameserver 198.51.100.53\nnameserver bogus\nsearch test\nnameserver ::1\n"
    assert parse_resolv_conf(text) == (IPv4Address("198.51.100.53"), IPv6Address("::1"))


def test_locate() -> None:
    env = {"NSMAIL_CONFIG": "/srv/env.toml"}
    assert locate("/srv/cli.toml", env) == "/srv/cli.toml"
    assert locate(None, env) == "/srv/env.toml"
    assert locate(None, {}) == DEFAULT_CONFIG == "/etc/nsmail/nsmail.toml"
    assert locate(None, {"NSMAIL_CONFIG": ""}) == DEFAULT_CONFIG


# --- tenant homes and bridge subnets -----------------------------------------------------

DIR = stat.S_IFDIR
HOME_PROBLEMS = [
    # (id, home, inodes that differ from HOMES' tree, what the message says)
    ("sticky /tmp", "/tmp", {"/tmp": Inode(0, DIR | 0o1777)}, "'/tmp' is writable by group"),
    (
        "under sticky /tmp",
        "/tmp/bcd",
        {"/tmp": Inode(0, DIR | 0o1777), "/tmp/bcd": Inode(1001, DIR | 0o700)},
        "'/tmp' is writable by group or others (mode 1777)",
    ),
    (
        "group-writable ancestor",
        "/srv/tenants/bcd",
        {"/srv/tenants": Inode(0, DIR | 0o775)},
        "'/srv/tenants' is writable by group or others (mode 0775)",
    ),
    (
        "ancestor not root's",
        "/srv/tenants/bcd",
        {"/srv/tenants": Inode(1002, DIR | 0o755)},
        "'/srv/tenants' belongs to uid 1002, not root's",
    ),
    (
        "symlink above",
        "/srv/tenants/bcd",
        {"/srv": Inode(0, stat.S_IFLNK | 0o777)},
        "'/srv' is a symbolic link",
    ),
    (
        "symlink home",
        "/srv/tenants/bcd",
        {"/srv/tenants/bcd": Inode(1001, stat.S_IFLNK | 0o777)},
        "'/srv/tenants/bcd' is a symbolic link",
    ),
    (
        "another's home",
        "/srv/tenants/bcd",
        {"/srv/tenants/bcd": Inode(1002, DIR | 0o700)},
        "belongs to uid 1002, not the tenant's (uid 1001)",
    ),
    (
        "group-writable home",
        "/srv/tenants/bcd",
        {"/srv/tenants/bcd": Inode(1001, DIR | 0o770)},
        "'/srv/tenants/bcd' is writable by group or others (mode 0770)",
    ),
    (
        "home a file",
        "/srv/tenants/bcd",
        {"/srv/tenants/bcd": Inode(1001, stat.S_IFREG | 0o600)},
        "'/srv/tenants/bcd' is not a directory",
    ),
    ("missing", "/srv/tenants/gone", {}, "'/srv/tenants/gone' is not an existing directory"),
]


@pytest.mark.parametrize(
    ("home", "inodes", "message"),
    [case[1:] for case in HOME_PROBLEMS],
    ids=[case[0] for case in HOME_PROBLEMS],
)
def test_a_home_only_root_can_replace(home: str, inodes: dict[str, Inode], message: str) -> None:
    def lstat(path: str) -> Inode | None:
        return inodes[path] if path in inodes else LOOKUP.lstat(path)

    lookup = SystemLookup(USERS.get, lstat, LOOKUP.default_resolvers)
    with pytest.raises(ConfigError) as caught:
        parse([(MAIN, HOST + BRIDGE + tenant(home=home))], lookup)
    assert caught.value.field == "tenant[0].home"
    assert message in caught.value.message


def test_a_home_from_passwd_says_so() -> None:
    lookup = SystemLookup(USERS.get, tree({"/srv/tenants/bcd": 1002}), LOOKUP.default_resolvers)
    with pytest.raises(
        ConfigError, match=r"not the tenant's \(uid 1001\) \(the home from passwd\)"
    ):
        parse([(MAIN, GOOD_MAIN)], lookup)


def test_the_real_tmp_is_no_home() -> None:
    lookup = SystemLookup(USERS.get, system_lookup().lstat, LOOKUP.default_resolvers)
    text = HOST + BRIDGE + tenant(user=None, uid=2000, gid=2000, home="/tmp")
    with pytest.raises(ConfigError, match=r"tenant\[0\]\.home: '/tmp' is writable by group or"):
        parse([(MAIN, text)], lookup)


def test_host_jails_are_not_reached_through_a_symlink() -> None:
    def lstat(path: str) -> Inode | None:
        return Inode(0, stat.S_IFLNK | 0o777) if path == "/var/run" else LOOKUP.lstat(path)

    lookup = SystemLookup(USERS.get, lstat, LOOKUP.default_resolvers)
    for key, path in (("run_dir", "/var/run/nsmail"), ("spool", "/var/run/spool")):
        with pytest.raises(ConfigError) as caught:
            parse([(MAIN, HOST + f'{key} = "{path}"\n' + BRIDGE + BCD)], lookup)
        assert caught.value.field == f"host.{key}"
        assert caught.value.message == "'/var/run' is a symbolic link: give the real path"


NESTED = [
    # (id, the second tenant's home, message)
    ("inside another home", "/srv/tenants/bcd/cde", "is inside the home of bcd.test"),
    ("above another home", "/srv/tenants", "'/srv/tenants' is above the home of bcd.test"),
    ("inside the host spool", "/var/spool/nsmail/cde", "is inside host.spool"),
    ("above the host spool", "/var/spool", "'/var/spool' is above host.spool"),
]


@pytest.mark.parametrize(
    ("home", "message"), [case[1:] for case in NESTED], ids=[case[0] for case in NESTED]
)
def test_no_home_inside_or_above_another(home: str, message: str) -> None:
    cde = tenant(domain="cde.test", ipv4="198.51.100.71", user="cde", home=home)
    error = fail((MAIN, GOOD_MAIN), (DROPIN, cde))
    assert (error.file, error.field) == (DROPIN, "tenant[0].home")
    assert message in error.message


NETWORK = '[network]\nbridge = "nsbr0"\n'
GATEWAYS = 'gateway4 = "198.51.100.1"\ngateway6 = "2001:db8:51::1"\n'
SUBNETS = 'subnet4 = "198.51.100.0/24"\nsubnet6 = "2001:db8:51::/64"\n'
SUBNET_PROBLEMS = [
    # (id, [network] lines after `bridge`, tenant fields, field, message)
    (
        "ipv4 outside",
        GATEWAYS + SUBNETS,
        {"ipv4": "203.0.113.70"},
        "tenant[0].ipv4",
        "'203.0.113.70' is outside the bridge's subnet4 (198.51.100.0/24)",
    ),
    (
        "ipv6 outside",
        GATEWAYS + SUBNETS,
        {"ipv6": "2001:db8:52::70"},
        "tenant[0].ipv6",
        "'2001:db8:52::70' is outside the bridge's subnet6 (2001:db8:51::/64)",
    ),
    (
        "gateway4 outside",
        GATEWAYS.replace("198.51.100.1", "203.0.113.1") + SUBNETS,
        {},
        "network.gateway4",
        "outside the bridge's subnet4",
    ),
    (
        "host bits",
        GATEWAYS + SUBNETS.replace(".0/24", ".1/24"),
        {},
        "network.subnet4",
        "has host bits set: the network is '198.51.100.0/24'",
    ),
    (
        "no prefix length",
        GATEWAYS + SUBNETS.replace("/24", ""),
        {},
        "network.subnet4",
        "is not an IPv4 network",
    ),
    (
        "v4 as subnet6",
        GATEWAYS + 'subnet4 = "198.51.100.0/24"\nsubnet6 = "198.51.100.0/24"\n',
        {},
        "network.subnet6",
        "is not an IPv6 network",
    ),
]


@pytest.mark.parametrize(
    ("network", "fields", "field", "message"),
    [case[1:] for case in SUBNET_PROBLEMS],
    ids=[case[0] for case in SUBNET_PROBLEMS],
)
def test_bridge_mode_addresses_are_in_the_bridges_subnets(
    network: str, fields: dict[str, object], field: str, message: str
) -> None:
    error = fail((MAIN, HOST + NETWORK + network + tenant(**fields)))
    assert error.field == field
    assert message in error.message


BRIDGE_SUBNETS = (IPv4Network("198.51.100.0/24"), IPv6Network("2001:db8:51::/64"))


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        (
            {"ipv4": "203.0.113.70"},
            "tenant[0].ipv4",
            "outside the bridge's subnet4 (198.51.100.0/24)",
        ),
        ({"ipv6": "2001:db8:52::70"}, "tenant[0].ipv6", "subnet6 (2001:db8:51::/64)"),
    ],
)
def test_without_subnets_those_of_the_bridge_itself_hold(
    fields: dict[str, object], field: str, message: str
) -> None:
    """A bridge-mode configuration of the first release names no subnet: it still loads,
    and the bridge's own addresses say where tenant addresses belong."""
    lookup = dataclasses.replace(LOOKUP, bridge_subnets={"nsbr0": BRIDGE_SUBNETS}.get)
    good = parse([(MAIN, HOST + NETWORK + GATEWAYS + tenant(ipv6="2001:db8:51::70"))], lookup)
    assert (good.network.subnet4, good.network.subnet6) == BRIDGE_SUBNETS
    error = fail((MAIN, HOST + NETWORK + GATEWAYS + tenant(**fields)), lookup=lookup)
    assert (error.field, message in error.message) == (field, True), error


def test_without_subnets_and_without_the_bridge_no_subnet_is_checked() -> None:
    config = parse([(MAIN, HOST + NETWORK + GATEWAYS + tenant(ipv4="203.0.113.70"))], LOOKUP)
    assert config.network.subnet4 is None


def test_subnets_only_in_bridge_mode_and_a_link_local_gateway6_is_on_every_link() -> None:
    routed = HOST + '[network]\nmode = "routed"\nsubnet4 = "198.51.100.0/24"\n'
    assert fail((MAIN, routed + BCD)).field == "network.subnet4"
    network = NETWORK + GATEWAYS.replace("2001:db8:51::1", "fe80::1") + SUBNETS
    config = parse([(MAIN, HOST + network + tenant(ipv6="2001:db8:51::70"))], LOOKUP)
    assert config.network.gateway6 == IPv6Address("fe80::1")


def test_load_rejects_root_tenant_and_missing_file(tmp_path: Path) -> None:
    main = tmp_path / "nsmail.toml"
    with pytest.raises(ConfigError, match=r"nsmail\.toml: file: "):
        load(main)
    main.write_text(
        '[host]\nname = "abc.test"\nresolvers = ["198.51.100.53"]\nuser = "root"\n'
        f'[network]\nmode = "routed"\n[[tenant]]\ndomain = "a.test"\nipv4 = "203.0.113.2"\n'
        f'user = "root"\nhome = "{tmp_path}"\n'
    )
    with pytest.raises(ConfigError, match=r"tenant\[0\]\.user: 'root' has uid or gid 0"):
        load(main)


# --- hostile input -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    for documents in ([(MAIN, text)], [(MAIN, GOOD_MAIN), (DROPIN, text)]):
        try:
            parse(documents, LOOKUP)
        except ConfigError as error:
            assert "\n" not in str(error)


INTERESTING = st.sampled_from(
    [
        "",
        "bcd",
        "bcd.test",
        "BCD.TEST",
        "xn--",
        "xn--bcher-kva.test",
        "198.51.100.70",
        "2001:db8:51::70",
        "198.51.100.1",
        "::",
        "fe80::1",
        "/",
        "/srv/other",
        "bcd",
        "cde",
        "toor",
        "routed",
        "bridge",
        "nsbr0",
        "b1",
    ]
)
SCALARS = st.one_of(
    INTERESTING,
    st.text(max_size=20),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.floats(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
KEYS = st.sampled_from(
    [
        "name",
        "resolvers",
        "user",
        "run_dir",
        "mode",
        "bridge",
        "gateway4",
        "gateway6",
        "prefix",
        "scan_interval",
        "timeout",
        "port",
        "domain",
        "ipv4",
        "ipv6",
        "ehlo",
        "uid",
        "gid",
        "home",
        "users",
    ]
) | st.text(max_size=5)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["host", "network", "delivery", "tenant"]), KEYS, VALUES),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_good_config_raises_only_config_error(
    edits: list[tuple[str, str, object]],
) -> None:
    document: dict[str, dict[str, object]] = {
        "host": {"name": "abc.test"},
        "network": {"bridge": "nsbr0", "gateway4": "198.51.100.1", "gateway6": "2001:db8:51::1"},
        "delivery": {},
        "tenant": {"domain": "bcd.test", "ipv4": "198.51.100.70", "user": "bcd"},
    }
    for table, key, value in edits:
        document[table][key] = value
    text = "".join(
        f"{name} = {toml_value([table] if name == 'tenant' else table)}\n"
        for name, table in document.items()
    )
    try:
        config = parse([(MAIN, text)], LOOKUP)
    except ConfigError as error:
        assert "\n" not in str(error)
    else:
        assert all(t.uid != 0 and t.gid != 0 and t.home != Path("/") for t in config.tenants)


@pytest.mark.parametrize(
    ("text", "expected"), [("", 300.0), ("idle_exit = 0", 0.0), ("idle_exit = 2.5", 2.5)]
)
def test_idle_exit(text: str, expected: float) -> None:
    config = parse([(MAIN, GOOD_MAIN + f"[delivery]\n{text}\n")], LOOKUP)
    assert config.delivery.idle_exit == expected


# -- local delivery and aliases (issue 16) ----------------------------------------------


def bcd_of(*fields: tuple[str, object]) -> Tenant:
    (bcd,) = parse([(MAIN, HOST + BRIDGE + tenant(**dict(fields)))], LOOKUP).tenants
    return bcd


def test_without_users_a_tenants_own_domain_goes_to_its_mx() -> None:
    assert bcd_of().local_delivery == "mx"
    assert bcd_of().aliases == ()
    assert bcd_of(("local_delivery", "mx")).local_delivery == "mx"


def test_with_users_it_is_delivered_here_and_postmaster_goes_to_the_first() -> None:
    bcd = bcd_of(("users", ["b1", "b2"]))
    assert bcd.local_delivery == "maildir"
    assert bcd.aliases == (("postmaster", ("b1",)),)


def test_aliases_name_users_aliases_and_addresses_elsewhere() -> None:
    given = {
        "Info": ["b1", "b2@BCD.test", "sales"],
        "sales": "someone@example.org",
        "postmaster": "b2",
    }
    bcd = bcd_of(("users", ["b1", "b2"]), ("aliases", given))
    assert bcd.aliases == (
        ("info", ("b1", "b2@BCD.test", "sales")),
        ("sales", ("someone@example.org",)),
        ("postmaster", ("b2",)),
    )


def test_a_postmaster_user_needs_no_alias_and_aliases_alone_need_maildir() -> None:
    assert bcd_of(("users", ["postmaster", "b1"])).aliases == ()
    only = bcd_of(("local_delivery", "maildir"), ("aliases", {"postmaster": "ops@example.org"}))
    assert only.users == () and only.aliases == (("postmaster", ("ops@example.org",)),)


LOCAL_PROBLEMS = [
    # (id, tenant fields, field, message)
    ("unknown mode", {"local_delivery": "mbox"}, "local_delivery", "'mbox' is neither"),
    ("users with mx", {"users": ["b1"], "local_delivery": "mx"}, "users", "needs local_delivery"),
    ("aliases without users", {"aliases": {"a": "x@y.test"}}, "aliases", "the default without"),
    (
        "no postmaster",
        {"local_delivery": "maildir", "aliases": {"a": "x@y.test"}},
        "aliases",
        "postmaster@bcd.test must be deliverable (RFC 5321 4.5.1)",
    ),
    ("not a table", {"users": ["b1"], "aliases": "b1"}, "aliases", "must be a table"),
    ("bad name", {"users": ["b1"], "aliases": {"a b": "b1"}}, "aliases.a b", "not a dot-atom"),
    ("twice", {"users": ["b1"], "aliases": {"a": "b1", "A": "b1"}}, "aliases.A", "listed twice"),
    ("empty", {"users": ["b1"], "aliases": {"a": []}}, "aliases.a", "an address or an array"),
    ("unknown name", {"users": ["b1"], "aliases": {"a": "b9"}}, "aliases.a[0]", "neither a user"),
    (
        "unknown here",
        {"users": ["b1"], "aliases": {"a": "b9@bcd.test"}},
        "aliases.a[0]",
        "neither a user nor an alias of bcd.test",
    ),
    ("command", {"users": ["b1"], "aliases": {"a": "|/bin/x"}}, "aliases.a[0]", "is a command"),
    ("file", {"users": ["b1"], "aliases": {"a": "/var/x"}}, "aliases.a[0]", "is a file"),
    (
        "include",
        {"users": ["b1"], "aliases": {"a": ":include:/etc/list"}},
        "aliases.a[0]",
        "is an :include: list",
    ),
    ("no address", {"users": ["b1"], "aliases": {"a": "b1 <x@y.test>"}}, "aliases.a[0]", "not an"),
    ("bad domain", {"users": ["b1"], "aliases": {"a": "x@y"}}, "aliases.a[0]", "not a domain"),
]


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [case[1:] for case in LOCAL_PROBLEMS],
    ids=[case[0] for case in LOCAL_PROBLEMS],
)
def test_local_delivery_problems(fields: dict[str, object], field: str, message: str) -> None:
    error = fail((MAIN, HOST + BRIDGE + tenant(**fields)))
    assert error.field == f"tenant[0].{field}"
    assert message in error.message


def aliases_lookup(text: str | None, error: str | None = None) -> SystemLookup:
    files = {"/etc/aliases": FileText(text or "", error)} if text is not None or error else {}
    users = {**USERS, "root": Account(0, 0, "/root")}
    return dataclasses.replace(
        LOOKUP, user=users.get, file_text=lambda path: files.get(path, FileText())
    )


def test_the_hosts_aliases_file_is_read_with_its_problems_and_postmaster_defaults_to_root() -> None:
    text = (
        "# Debian's\n"
        "MAILER-DAEMON: postmaster\n"
        "abuse: root,\n"
        "  ops@example.org\n"
        'list: "|/usr/lib/mailman/mail/mailman post list"\n'
        "typo: nosuchuser\n"
    )
    config = parse([(MAIN, GOOD_MAIN)], aliases_lookup(text))
    assert config.host_aliases.table == (
        ("mailer-daemon", ("postmaster",)),
        ("abuse", ("root", "ops@example.org")),
        ("list", ("|/usr/lib/mailman/mail/mailman post list",)),
        ("typo", ("nosuchuser",)),
        ("postmaster", ("root",)),
    )
    assert [p.line for p in config.host_aliases.problems] == [5, 6]
    assert "is a command" in config.host_aliases.problems[0].text
    assert host_identity(config).aliases == config.host_aliases.table


def test_an_aliases_file_that_cannot_be_read_is_a_problem_not_an_error() -> None:
    config = parse([(MAIN, GOOD_MAIN)], aliases_lookup(None, "Permission denied"))
    assert config.host_aliases == AliasFile(
        (("postmaster", ("root",)),), (Problem(0, "cannot be read: Permission denied"),)
    )
    mine = parse([(MAIN, HOST + 'aliases = "/srv/other/aliases"\n' + BRIDGE + BCD)], LOOKUP)
    assert mine.host.aliases == Path("/srv/other/aliases")


def test_the_mail_spool_is_no_tenant_home_and_not_reached_through_a_symlink() -> None:
    assert parse([(MAIN, GOOD_MAIN)], LOOKUP).host.mail_spool == Path("/var/mail")
    error = fail((MAIN, HOST + 'mail_spool = "/srv/tenants"\n' + BRIDGE + BCD))
    assert (error.field, error.message) == (
        "tenant[0].home",
        "'/srv/tenants/bcd' is inside host.mail_spool",
    )

    def lstat(path: str) -> Inode | None:
        return Inode(0, stat.S_IFLNK | 0o777) if path == "/var/mail" else LOOKUP.lstat(path)

    lookup = SystemLookup(USERS.get, lstat, LOOKUP.default_resolvers)
    with pytest.raises(ConfigError, match=r"host\.mail_spool: '/var/mail' is a symbolic link"):
        parse([(MAIN, GOOD_MAIN)], lookup)
