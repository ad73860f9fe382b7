"""Where nsmail's files are: the configuration and its drop-ins, a tenant's queue and its states.

Names only, for every zone: the configuration parser, the supervisor, the worker, the
queue tools and `nsmail-sendmail`, which imports this at every start, so it imports
nothing (plain strings: pathlib alone would cost a submission 9 ms per start).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing and collections.abc cost a submission more than this module
if TYPE_CHECKING:
    from collections.abc import Mapping

DEFAULT_CONFIG = "/etc/nsmail/nsmail.toml"
DROPIN_DIR = "tenants.d"  # beside the main file: more [[tenant]] tables, one file each
SPOOL_IN_HOME = "var/spool/nsmail"  # a tenant's queue, inside its home (and jail)

# A queue's states, one directory each (Postfix's names; see `nsmail.tenant.spool`).
MAILDROP = "maildrop"
INCOMING = "incoming"
ACTIVE = "active"
DEFERRED = "deferred"
HOLD = "hold"
CORRUPT = "corrupt"
STATES = (MAILDROP, INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT)
TMP = "tmp"  # the worker's files while they are written, before their rename
FLUSH_TRIGGER = "flush"  # created by `sendmail -q`: retry deferred mail now
HISTORY = "history"  # the tenant's delivery events (`nsmail.tenant.history`), not a state


def locate(cli_path: str | None, environ: Mapping[str, str]) -> str:
    """The configuration file: --config beats $NSMAIL_CONFIG beats the default; an empty
    value counts as unset."""
    return cli_path or environ.get("NSMAIL_CONFIG") or DEFAULT_CONFIG
