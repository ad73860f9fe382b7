"""Where nsmail's configuration lives: one place for every command to find it.

Apart from `nsmail.core.config` (the parser) so that `nsmail-sendmail` can find its cached
submission profile (`nsmail.submit.submission`) without importing the parser; plain strings, as
pathlib alone would cost the submission command 9 ms per start.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

DEFAULT_PATH = "/etc/nsmail/nsmail.toml"
DROPIN_DIR = "tenants.d"  # beside the main file: more [[tenant]] tables, one file each


def locate(cli_path: str | None, environ: Mapping[str, str]) -> str:
    """--config beats $NSMAIL_CONFIG beats the default; an empty value counts as unset."""
    return cli_path or environ.get("NSMAIL_CONFIG") or DEFAULT_PATH
