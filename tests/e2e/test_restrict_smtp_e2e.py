"""`[host] restrict_smtp`: no way around nsmail from the hosting machine.

A tenant's user with a shell (`attacker.Attacker`, on the lab's host namespace, where the
real supervisor runs) and any other local user cannot connect to port 25, 465 or 587 of
another machine: the connection is refused at once (a reset from the host itself). Root
can, the host's own mail worker delivers, the tenants' workers deliver from their own
namespaces, and nsmail's own listener on loopback takes the user's mail. Other ports
are untouched. On a reload without the key the chain goes, on stop the table with it.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from attacker import Attacker
from hosting import DUAL, V4_ONLY, Hosting, dns_records
from lab import MX_V4, MX_V6, Lab, Nsd, Postfix

PORTS = (25, 465, 587, 2525)
LISTEN = """
import socket, sys, time
servers = []
for port in map(int, sys.argv[1:]):
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port)); s.listen(64); servers.append(s)
time.sleep(3600)
"""
CONNECT = """
results = {}
for host in sys.argv[1:3]:
    for port in map(int, sys.argv[3:]):
        def attempt():
            with socket.create_connection((host, port), timeout=5):
                pass
        results[f"{host} {port}"] = outcome(attempt)
print(json.dumps(results))
"""


@dataclass
class Site:
    lab: Lab
    hosting: Hosting
    postfix: Postfix
    tenant_user: Attacker
    other_user: Attacker

    def reach(self, who: Attacker) -> dict[str, str]:
        found = who.python(CONNECT, MX_V4, MX_V6, *PORTS[1:])
        assert isinstance(found, dict)
        return found


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with Lab() as lab:
        Nsd(lab, dns_records())
        postfix = Postfix(lab)
        # Something listens on the other SMTP ports and on one more, at the "MX".
        lab.popen(lab.net, ["python3", "-c", LISTEN, *map(str, PORTS[1:])])
        hosting = Hosting(lab)
        hosting.write_config((DUAL, V4_ONLY), host_extra="restrict_smtp = true\n")
        hosting.start()
        uid = hosting.uid(V4_ONLY.domain)
        user = Attacker(
            lab, V4_ONLY.domain, uid, uid, hosting.home(V4_ONLY.domain), hosting.config_path
        )
        nobody = dataclasses.replace(user, domain="abc.test", uid=65534, gid=65534)
        yield Site(lab, hosting, postfix, user, nobody)


def _refused_but_2525(results: dict[str, str]) -> bool:
    return all(
        (v == "ok") if k.endswith(" 2525") else (v == "ECONNREFUSED") for k, v in results.items()
    )


def test_users_are_refused_remote_smtp_ports_root_is_not(site: Site) -> None:
    # Postfix listens on 25, the listener above on 465, 587 and 2525, IPv4 and IPv6.
    time.sleep(0.5)
    for who in (site.tenant_user, site.other_user):
        port25 = who.python(CONNECT, MX_V4, MX_V6, 25)
        assert port25 == {f"{MX_V4} 25": "ECONNREFUSED", f"{MX_V6} 25": "ECONNREFUSED"}
        assert _refused_but_2525(site.reach(who)), site.reach(who)
    as_root = site.lab.python(
        site.lab.host,
        "import socket, sys\n"
        "for port in (25, 465, 587):\n"
        f"    socket.create_connection(('{MX_V4}', port), timeout=5).close()\n"
        "print('ok')",
    )
    assert as_root.stdout.strip() == "ok"


def test_nsmail_still_delivers_and_its_listener_takes_the_users_mail(site: Site) -> None:
    sent = site.tenant_user.run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--from",
            "carol@cde.test",
            "--to",
            "x1@rcpt.test",
            "--header",
            "Subject: restricted tenant",
        ]
    )
    assert sent.returncode == 0, sent.stdout
    site.postfix.arrived("restricted tenant")  # the tenant's worker, from its own namespace
    other = site.other_user.run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--from",
            "nobody@abc.test",
            "--to",
            "x1@rcpt.test",
            "--header",
            "Subject: restricted host user",
        ]
    )
    assert other.returncode == 0, other.stdout
    site.postfix.arrived("restricted host user")  # the host's worker, an exempt uid


def test_the_chain_follows_reloads_and_goes_on_stop(site: Site) -> None:
    site.hosting.write_config((DUAL, V4_ONLY))
    site.hosting.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "restrict_smtp" in _ruleset(site.lab):
        assert time.monotonic() < deadline, _ruleset(site.lab)
        time.sleep(0.1)
    assert site.reach(site.tenant_user)[f"{MX_V4} 587"] == "ok"
    site.hosting.write_config((DUAL, V4_ONLY), host_extra="restrict_smtp = true\n")
    site.hosting.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "restrict_smtp" not in _ruleset(site.lab):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert site.hosting.stop() == 0
    assert "nsmail" not in _ruleset(site.lab)


def _ruleset(lab: Lab) -> str:
    done = lab.run(lab.host, ["nft", "list", "ruleset"], check=False)
    return str(done.stdout)
