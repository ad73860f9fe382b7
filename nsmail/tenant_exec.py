"""`nsmail exec TENANT -- COMMAND...`: any program, speaking with the tenant's identity.

The command runs in the tenant's network namespace (so every connection it makes carries
the tenant's address), as the tenant's uid and gid with no groups, no capabilities (the
bounding set emptied, so nothing it executes gains any) and no_new_privs; with
`--chroot`, inside the tenant's home as well.

Security: run by root; anyone else is refused before anything is done. The child drops
everything before exec; the command and its arguments are the operator's. With `--chroot`
the child's root is the tenant-writable home, so it reads no file after the chroot (what
the drop needs from /proc is read before it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from nsmail import jail, netns
from nsmail.config import Config, Tenant

EX_UNAVAILABLE = 69
EX_NOPERM = 77
EX_NOTFOUND = 127


def run(config: Config, tenant: Tenant, argv: Sequence[str], *, chroot: bool) -> int:
    """Run `argv` as the tenant, in its namespace; the command's exit status."""
    if os.geteuid() != 0:
        print("nsmail: exec: only root may run commands as a tenant", file=sys.stderr)
        return EX_NOPERM
    namespace = netns.names_for(config.network.prefix, tenant.domain).path
    if not namespace.exists():
        print(f"nsmail: {namespace} does not exist: is the supervisor running?", file=sys.stderr)
        return EX_UNAVAILABLE
    pid = os.fork()
    if pid == 0:
        code = EX_NOTFOUND
        try:
            last_cap = jail.last_capability()
            netns.enter(namespace)
            if chroot:
                os.chroot(tenant.home)
            os.chdir("/" if chroot else tenant.home)
            jail.drop(tenant.uid, tenant.gid, last_cap)
            home = "/" if chroot else str(tenant.home)
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"}
            os.execvpe(argv[0], list(argv), env)
        except OSError as e:
            print(f"nsmail: exec {argv[0]}: {e.strerror}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
