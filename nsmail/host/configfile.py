"""The configuration as it is on this machine: its files read, and the facts it is checked
against (passwd, group, the file system, /etc/resolv.conf, the bridge) looked up.

The thin IO shell around `nsmail.core.config.parse`: `load` is what every command and the
supervisor call (it reads the host's aliases file too, `[host] aliases`); `read_documents`
and `system_lookup` are its two halves, for `nsmail tenant add`, which validates a drop-in
before it writes it; `run_dir_of` finds the control socket even when the configuration no
longer parses.

Security: run by root (the supervisor, the commands), by tenants' users (`nsmail queue`,
and `nsmail-sendmail` without a current cache) and by no jailed process: none of them
could read the host's files. The files are trusted as the administrator's word
(validation is `parse`'s); a file that cannot be read or decoded is a ConfigError naming
it, as one line.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import tomllib
from pathlib import Path

from nsmail.core.config import (
    DEFAULT_RUN_DIR,
    Account,
    Config,
    ConfigError,
    FileText,
    Inode,
    IPAddress,
    IPNetwork,
    SystemLookup,
    parse,
    parse_resolv_conf,
)
from nsmail.core.layout import DROPIN_DIR

RESOLV_CONF = Path("/etc/resolv.conf")
MAX_ALIASES = 1 << 20  # bytes of an aliases file: Debian's holds a few hundred


def load(path: Path) -> Config:
    """Read the main file and its tenants.d/*.toml drop-ins and `parse` them."""
    return parse(read_documents(path), system_lookup())


def read_documents(path: Path) -> list[tuple[str, str]]:
    """(file name, text) of the main file, then of its drop-ins in name order."""
    documents = [(str(path), _read(path))]
    dropin_dir = path.parent / DROPIN_DIR
    if dropin_dir.is_dir():
        # Hidden names are editor droppings (emacs' .#x.toml lock links), never config.
        names = sorted(p.name for p in dropin_dir.glob("*.toml") if not p.name.startswith("."))
        documents += [(str(dropin_dir / n), _read(dropin_dir / n)) for n in names]
    return documents


def run_dir_of(path: Path) -> Path:
    """Where the supervisor's control socket is, even when the configuration is broken.

    `nsmail status` must still reach a running supervisor after someone broke the file
    it was started with; only `[host] run_dir` is read, and only if it is usable. A file
    that cannot be read at all (a mistyped --config) is a ConfigError naming it.
    """
    data = _read_bytes(path)
    try:
        host = tomllib.loads(data.decode("utf-8")).get("host", {})
    except (ValueError, RecursionError):  # see core.config._decode for RecursionError
        return DEFAULT_RUN_DIR
    run_dir = host.get("run_dir") if isinstance(host, dict) else None
    if isinstance(run_dir, str) and run_dir.startswith("/"):
        return Path(run_dir)
    return DEFAULT_RUN_DIR


def system_lookup() -> SystemLookup:
    """The real machine: passwd, the filesystem, /etc/resolv.conf and the bridge."""
    return SystemLookup(
        user=_passwd_user,
        lstat=_lstat,
        default_resolvers=_resolv_conf,
        group=_group_id,
        bridge_subnets=_bridge_subnets,
        file_text=_file_text,
    )


def _read(path: Path) -> str:
    data = _read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "file", f"not UTF-8 at byte {exc.start}") from exc


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "file", exc.strerror or str(exc)) from exc


def _file_text(path: str) -> FileText:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ALIASES + 1)
    except FileNotFoundError:
        return FileText()
    except OSError as exc:
        return FileText(error=exc.strerror or str(exc))
    if len(data) > MAX_ALIASES:
        return FileText(error=f"over {MAX_ALIASES} bytes")
    return FileText(data.decode("utf-8", "replace"))


def _passwd_user(name: str) -> Account | None:
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, ValueError):  # ValueError: an embedded NUL
        return None
    return Account(entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _lstat(path: str) -> Inode | None:
    try:
        found = os.lstat(path)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    return Inode(found.st_uid, found.st_mode)


def _group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except (KeyError, ValueError):  # ValueError: an embedded NUL
        return None


def _resolv_conf() -> tuple[IPAddress, ...]:
    try:
        return parse_resolv_conf(RESOLV_CONF.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return ()


def _bridge_subnets(name: str) -> tuple[IPNetwork, ...]:
    from pyroute2 import IPRoute  # only bridge mode without subnets needs netlink
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            (index,) = ipr.link_lookup(ifname=name) or [None]
            if index is None:
                return ()
            found = [
                ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network
                for a in ipr.get_addr(index=index)
            ]
    except (OSError, NetlinkError):
        return ()
    return tuple(n for n in found if not n.is_link_local)
