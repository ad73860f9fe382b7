"""The lab network as `nsmail demo`, the tests and the benchmarks get it: ready at once.

Security: builds and removes a lab's own namespaces, nothing in the machine's own.
"""

from __future__ import annotations

from lab import Lab

from nsmail.lab import topology


def test_the_internet_end_of_the_uplink_is_operational_once_built() -> None:
    # A dump of the links (`ip -o link`) shows the state as it is; asking for the one link
    # by name would settle it, and so hide a lab that did not wait.
    with Lab() as lab:
        links = lab.run(lab.net, ["ip", "-o", "link"]).stdout.splitlines()
    peer = next(
        line for line in links if f" {topology.PEER}:" in line or f" {topology.PEER}@" in line
    )
    assert " state UP " in peer, peer
