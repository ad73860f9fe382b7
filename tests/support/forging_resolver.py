"""A resolver that lies about DNSSEC, for the tests, run as a program in a lab namespace:

    python forging_resolver.py ADDRESS UPSTREAM

It answers each UDP query on ADDRESS:53 with UPSTREAM's answer (an authoritative server
of unsigned zones), the AD bit set as if it had validated it: what an attacker on the
path to a remote resolver, or a resolver nobody should trust, hands out. It prints
"ready" once it listens.

Security: test infrastructure; it forwards only to UPSTREAM.
"""

from __future__ import annotations

import socket
import sys

import dns.flags
import dns.message
import dns.query


def main(address: str, upstream: str) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((address, 53))
    print("ready", flush=True)
    while True:
        wire, client = server.recvfrom(65535)
        try:
            query = dns.message.from_wire(wire)
            answer = dns.query.udp(query, upstream, timeout=2)
        except Exception:
            continue
        answer.flags |= dns.flags.AD  # the lie
        server.sendto(answer.to_wire(), client)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
