"""`python -m nsmail.submit.launcher PATH`: install the `nsmail-sendmail` command at PATH.

The command starts once per message, so it is not pip's console script (which a plain
`pip install` still gives, working but slower): that runs `site` first (every .pth file
of the venv, 2-3 ms of a 12 ms submission) and imports `re`. The launcher
starts the interpreter with -I -S instead and puts nsmail's own directory first on
sys.path, which is all a submission needs (it uses built-in modules only; see
`nsmail.submit.sendmail`), and the installation's site-packages last, for the rarer modes (-bp)
that import more. -I also keeps a caller's PYTHONPATH, PYTHONSTARTUP and the like,
set by a tenant's web app or shell, out of the command.

`scripts/bootstrap` runs it after installing nsmail: the launcher names this interpreter
and this installation of nsmail. The Debian package writes one for every console script
(`debian/launchers`), naming the paths it installs to.
"""

from __future__ import annotations

import os
import site
import sys

import nsmail
from nsmail.core.exitcodes import EX_CANTCREAT, EX_OK, EX_USAGE
from nsmail.submit.maildrop import write_all

SENDMAIL = "nsmail.submit.sendmail:main"


def launcher(python: str, home: str, packages: list[str], entry: str = SENDMAIL) -> str:
    """The launcher's text: `python` with -I -S, importing nsmail from `home` and anything
    else from `packages`, calling `entry` ("module:function", as a console script's) (pure)."""
    module, _, function = entry.partition(":")
    return (
        f"#!{python} -IS\n"
        "# Written by nsmail.submit.launcher.\n"
        "import sys\n"
        f"sys.path.insert(0, {home!r})\n"
        f"sys.path += {packages!r}\n"
        f"from {module} import {function}\n"
        f"sys.exit({function}())\n"
    )


def install(path: str) -> None:
    """Write the launcher for this interpreter and this nsmail at `path` (0755), atomically."""
    home = os.path.dirname(os.path.dirname(os.path.abspath(nsmail.__file__)))
    packages = [p for p in site.getsitepackages() if os.path.isdir(p)]
    text = launcher(sys.executable, home, packages).encode()
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
    try:
        os.fchmod(fd, 0o755)
        write_all(fd, text)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m nsmail.submit.launcher PATH", file=sys.stderr)
        return EX_USAGE
    try:
        install(argv[0])
    except OSError as e:
        print(f"nsmail.submit.launcher: cannot write {argv[0]}: {e.strerror}", file=sys.stderr)
        return EX_CANTCREAT
    return EX_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
