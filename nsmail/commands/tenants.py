"""`nsmail tenant add|remove|list|passwd|resume`: hosted domains as drop-ins, applied
without a restart; SMTP AUTH passwords of their users; lifting a suspension.

A tenant added here is one file, `tenants.d/<domain>.toml`, validated together with the
whole configuration before it is written (a taken address, a bad domain, an address
outside the bridge's subnet or a shared directory such as /tmp as its home writes
nothing and exits 78, as `nsmail check` would), written atomically, and then applied by
asking the running supervisor to reload: the new tenant's namespace and worker appear,
the others are not disturbed.

`passwd` sets the password a tenant's user authenticates with on 587 and 465 (yescrypt,
in `submission.passwd` beside the configuration, `nsmail.core.credentials`) and has the
running supervisor hand the front the new file. `resume` asks the supervisor to lift
the automatic brake's suspension of a tenant (`nsmail.core.suspend`).

Security: run by root; it writes only in the configuration's own tenants.d directory,
under a name made from a validated domain, and the credentials file (0600, root's).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from nsmail.core import credentials
from nsmail.core.config import ConfigError, parse
from nsmail.core.exitcodes import EX_CANTCREAT, EX_CONFIG, EX_DATAERR, EX_TEMPFAIL, EX_USAGE
from nsmail.core.layout import DROPIN_DIR
from nsmail.host.configfile import load, read_documents, run_dir_of, system_lookup
from nsmail.root import control


class AdminError(Exception):
    """One line for the operator, and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class NewTenant:
    domain: str
    ipv4: str | None = None
    ipv6: str | None = None
    ehlo: str | None = None
    user: str | None = None
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    users: tuple[str, ...] = ()

    def toml(self) -> str:
        """The drop-in's text. Values are written as JSON strings and numbers, which are
        valid TOML; the validation that follows is the real check."""
        lines = ["[[tenant]]"]
        for key in ("domain", "ipv4", "ipv6", "ehlo", "user", "uid", "gid", "home"):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        if self.users:
            lines.append(f"users = {json.dumps(list(self.users))}")
        return "\n".join(lines) + "\n"


def add(path: Path, tenant: NewTenant) -> str:
    """Validate and write the drop-in, then apply it; what happened, for the operator."""
    dropin = _dropin(path, tenant.domain)
    if dropin.exists():
        raise AdminError(EX_DATAERR, f"{dropin} exists already")
    documents = [*read_documents(path), (str(dropin), tenant.toml())]
    try:
        parse(documents, system_lookup())
    except ConfigError as e:
        raise AdminError(EX_CONFIG, str(e)) from None
    _write(dropin, tenant.toml())
    return f"added {tenant.domain} ({dropin}); " + apply(path)


def remove(path: Path, domain: str) -> str:
    config = load(path)
    tenant = config.tenant(domain)
    if tenant is None:
        raise AdminError(EX_DATAERR, f"no tenant {domain!r} in {path}")
    source = Path(tenant.source)
    if source.parent.name != DROPIN_DIR:
        raise AdminError(EX_DATAERR, f"{domain} is defined in {source}: edit that file")
    others = [t.domain for t in config.tenants if t.source == tenant.source and t is not tenant]
    if others:
        raise AdminError(EX_DATAERR, f"{source} also holds {', '.join(others)}: edit that file")
    source.unlink()
    _sync_dir(source.parent)
    return f"removed {domain} ({source}); " + apply(path)


def passwd(path: Path, domain: str, user: str, password: str) -> str:
    """Set `user`@`domain`'s SMTP AUTH password; what happened, for the operator."""
    from nsmail.host.passwords import Crypt, PasswordError  # libcrypt only here

    tenant = load(path).tenant(domain)
    if tenant is None:
        raise AdminError(EX_DATAERR, f"no tenant {domain!r} in {path}")
    try:
        name = credentials.login(user, tenant.domain)
    except credentials.CredentialsError as e:
        raise AdminError(EX_USAGE, str(e)) from None
    if not password:
        raise AdminError(EX_USAGE, "the password is empty")
    target = path.parent / credentials.FILE_NAME
    try:
        entries = credentials.parse(target.read_text()) if target.exists() else {}
        entries[name] = Crypt().hash_password(password)
    except (OSError, credentials.CredentialsError, PasswordError) as e:
        raise AdminError(EX_DATAERR, f"{target}: {e}") from None
    _write(target, credentials.render(entries), mode=0o600)
    return f"password of {name} set ({target}); " + apply(path)


def resume(path: Path, domain: str) -> str:
    """Lift the automatic brake's suspension of `domain` (the running supervisor's)."""
    try:
        reply = control.request(run_dir_of(path), "resume", tenant=domain)
    except control.Unavailable as e:
        raise AdminError(EX_TEMPFAIL, str(e)) from None
    if not reply.get("ok"):
        raise AdminError(EX_DATAERR, str(reply.get("error")))
    return f"{domain} resumed: its held mail goes now"


def listing(path: Path) -> list[dict[str, object]]:
    return [
        {
            "domain": t.domain,
            "ipv4": str(t.ipv4) if t.ipv4 else None,
            "ipv6": str(t.ipv6) if t.ipv6 else None,
            "uid": t.uid,
            "home": str(t.home),
            "source": t.source,
        }
        for t in load(path).tenants
    ]


def _dropin(path: Path, domain: str) -> Path:
    if "/" in domain or domain.startswith("."):
        raise AdminError(EX_DATAERR, f"{domain!r} is not a domain")
    return path.parent / DROPIN_DIR / f"{domain.lower()}.toml"


def _write(target: Path, text: str, mode: int = 0o644) -> None:
    """Write atomically; mode 0644 by default: tenants' sendmail reads the configuration."""
    target.parent.mkdir(mode=0o755, exist_ok=True)
    partial = target.with_name(f".{target.name}.new")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with open(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        partial.chmod(mode)
        os.rename(partial, target)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise AdminError(EX_CANTCREAT, f"cannot write {target}: {e.strerror}") from e
    _sync_dir(target.parent)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply(path: Path) -> str:
    """Have a running supervisor reload the configuration; what came of it, in words."""
    run_dir = run_dir_of(path)
    try:
        reply = control.request(run_dir, "reload")
    except control.Unavailable:
        return "no supervisor is running: it applies at the next start"
    if not reply.get("ok"):
        raise AdminError(EX_TEMPFAIL, f"the supervisor refused to reload: {reply.get('error')}")
    return "the supervisor applied it"
