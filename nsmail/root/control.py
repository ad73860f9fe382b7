"""The supervisor's control socket: one JSON request line in, one JSON reply line out.

Security: the socket lives in the run directory, owned by root, mode 0600 (0660 with the
configured admin group), and the server also checks the peer's credentials (SO_PEERCRED):
only root and members of the admin group are served. Connections are served without
blocking the supervisor (`nsmail.root.serving`: size-bounded, with a deadline), so a stuck
client cannot stall it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

SOCKET_NAME = "control"
MAX_REQUEST = 4096
TERMINATOR = b"\n"

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class Unavailable(Exception):
    """No supervisor answers on the control socket."""


class Denied(Exception):
    """The caller may not use the control socket (root and the admin group only)."""


def listen(run_dir: Path, admin_gid: int | None) -> socket.socket:
    """Bind the control socket, replacing a stale one from an earlier run."""
    run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = run_dir / SOCKET_NAME
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old_umask)
    if admin_gid is not None:
        os.chown(path, 0, admin_gid)
        os.chmod(path, 0o660)
    server.listen(16)
    return server


def _allowed(conn: socket.socket, admin_gid: int | None) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    if uid == 0:
        return True
    if admin_gid is None:
        return False
    return gid == admin_gid or admin_gid in _supplementary_groups(pid)


def _supplementary_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next((line for line in f if line.startswith("Groups:")), "Groups:")
    except OSError:
        return set()
    return {int(g) for g in line.split()[1:] if g.isdigit()}


def respond(peer: socket.socket, raw: bytes, handle: Handler, admin_gid: int | None) -> bytes:
    """The reply line to the request line `raw` (without its newline) from `peer`."""
    if not _allowed(peer, admin_gid):
        reply: dict[str, Any] = {"ok": False, "denied": True, "error": "permission denied"}
    else:
        reply = _dispatch(raw, handle)
    return json.dumps(reply).encode() + b"\n"


def _dispatch(raw: bytes, handle: Handler) -> dict[str, Any]:
    try:
        request = json.loads(raw)
    except ValueError:
        return {"ok": False, "error": "request is not JSON"}
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        return {"ok": False, "error": "request needs a 'cmd'"}
    return handle(request)


def request(run_dir: Path, cmd: str, **args: Any) -> dict[str, Any]:
    """Send one request to the supervisor and return its reply."""
    path = run_dir / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10.0)
        try:
            sock.connect(str(path))
        except PermissionError as e:
            raise Denied(f"{path}: only root and the admin group may ask") from e
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise Unavailable(f"no supervisor is running ({path}: {e.strerror})") from e
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    try:
        result: dict[str, Any] = json.loads(reply)
    except ValueError as e:
        raise Unavailable(f"the supervisor gave no valid answer on {path}") from e
    return result
