"""Where nsmail's configuration lives: one place for every command to find it.

Apart from `nsmail.config` (the parser) so that `nsmail-sendmail` can find its cached
submission profile (`nsmail.submission`) without importing the parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

DEFAULT_PATH = Path("/etc/nsmail/nsmail.toml")
DROPIN_DIR = "tenants.d"  # beside the main file: more [[tenant]] tables, one file each


def locate(cli_path: str | None, environ: Mapping[str, str]) -> Path:
    """--config beats $NSMAIL_CONFIG beats the default; an empty value counts as unset."""
    if cli_path:
        return Path(cli_path)
    from_env = environ.get("NSMAIL_CONFIG")
    return Path(from_env) if from_env else DEFAULT_PATH
