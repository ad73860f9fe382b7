"""Postfix policy service (spawn(8), one process per smtpd connection): refuse mismatched HELO.

Stock ``reject_unknown_helo_hostname`` only wants the HELO name to have an A or MX record,
so a host may claim any existing name. This rejects unless the HELO name equals the
client's verified name (``client_name``: reverse lookup confirmed by a forward lookup).
An unverified client (``unknown``) is left to ``reject_unknown_client_hostname``.

Security: run by Postfix as ``nobody``; reads only the policy protocol on stdin.
"""

import sys


def decide(attributes: dict[str, str]) -> str:
    """The access(5) action for one policy request."""
    helo = attributes.get("helo_name", "").rstrip(".").lower()
    client = attributes.get("client_name", "unknown").rstrip(".").lower()
    if client == "unknown" or helo == client:
        return "DUNNO"
    return f"550 5.7.1 HELO name {helo} does not match client name {client}"


def main() -> None:
    attributes: dict[str, str] = {}
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line:
            key, _, value = line.partition("=")
            attributes[key] = value
            continue
        # An empty line ends a request; the reply is one attribute and an empty line.
        sys.stdout.write(f"action={decide(attributes)}\n\n")
        sys.stdout.flush()
        attributes = {}


if __name__ == "__main__":
    main()
