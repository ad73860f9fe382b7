"""An HTTPS server of MTA-STS policies (RFC 8461 3.3) for the tests, run as a program so
that a test can start it in any network namespace:

    python policy_server.py ADDRESS PORT DIRECTORY

`serving` runs it on loopback for the tests of that tier. It serves
`/.well-known/mta-sts.txt` for the host `mta-sts.<domain>` from
`DIRECTORY/<domain>.txt` (text/plain), with the certificate `DIRECTORY/<domain>.crt` and
key `.key` chosen by SNI (so one server can stand for many domains, and a test can give
one a wrong certificate); 404 for anything else. It prints "ready" once it listens.

Security: test infrastructure; serves only files of its directory, named by a domain of
LDH characters.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pki import Pki

_DOMAIN = re.compile(r"mta-sts\.([a-z0-9-]+(\.[a-z0-9-]+)+)")


def main(address: str, port: int, directory: Path) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = _DOMAIN.fullmatch((self.headers.get("Host") or "").lower())
            policy = directory / f"{found.group(1)}.txt" if found else None
            if self.path != "/.well-known/mta-sts.txt" or policy is None or not policy.exists():
                self.send_error(404)
                return
            body = policy.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    def by_name(tls: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        found = _DOMAIN.fullmatch(name or "")
        if found and (directory / f"{found.group(1)}.crt").exists():
            tls.context = context_for(found.group(1))

    def context_for(domain: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(directory / f"{domain}.crt", directory / f"{domain}.key")
        return context

    default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    first = sorted(directory.glob("*.crt"))[0]
    default.load_cert_chain(first, first.with_suffix(".key"))
    default.sni_callback = by_name  # type: ignore[assignment]

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

    server = Server((address, port), Handler)
    server.socket = default.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


def publish(pki: Pki, directory: Path, policies: Mapping[str, str | None]) -> None:
    """Policies (None: a 404) and certificates for `mta-sts.<domain>` into `directory`."""
    for domain, policy in policies.items():
        issued = pki.issue(f"mta-sts.{domain}")
        (directory / f"{domain}.crt").write_bytes(issued.cert.read_bytes())
        (directory / f"{domain}.key").write_bytes(issued.key.read_bytes())
        if policy is not None:
            (directory / f"{domain}.txt").write_text(policy)


@contextlib.contextmanager
def serving(pki: Pki, directory: Path, policies: Mapping[str, str | None]) -> Iterator[int]:
    """The server on 127.0.0.1 for `policies` (see `publish`); yields its port."""
    publish(pki, directory, policies)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    command = [sys.executable, __file__, "127.0.0.1", str(port), str(directory)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None and server.stdout.readline() == "ready\n"
            yield port
        finally:
            server.kill()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
