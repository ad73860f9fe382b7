"""The `nsmail` command: parse arguments, call the core, map failures to sysexits codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from nsmail.commands import tenants as tenantadmin
from nsmail.core.addresses import same_domain
from nsmail.core.config import Config, ConfigError, Tenant
from nsmail.core.exitcodes import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
)
from nsmail.core.layout import locate
from nsmail.core.status import RelayStatus, ReloadRefusal, WorkerStatus, render_table
from nsmail.core.text import printable
from nsmail.host.configfile import load, run_dir_of
from nsmail.root import control
from nsmail.root.jail import run_as
from nsmail.root.systemd import log_formatter
from nsmail.tenant.spool import Spool

WATCH_EVERY = 2.0


def _setup_logging(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(os.environ, log_format))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def global_options(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """`--config PATH` (or `--config=PATH`) wherever it stands, before the verb or after
    it, up to a `--` (after which the words are a command's own: `nsmail exec`); and the
    other words. The last one given wins, as with any option (pure)."""
    config, rest = None, []
    words = iter(argv)
    for word in words:
        if word == "--":
            rest += [word, *words]
        elif word == "--config":
            config = next(words, "")
        elif word.startswith("--config="):
            config = word.partition("=")[2]
        else:
            rest.append(word)
    return config, rest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsmail", description=__doc__)
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: $NSMAIL_CONFIG, else /etc/nsmail/nsmail.toml)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("supervise", help="run the supervisor in the foreground (root)")
    status = commands.add_parser("status", help="show per-tenant worker status")
    status.add_argument("tenant", nargs="?", help="only this domain")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--watch", action="store_true", help="refresh every 2 s until interrupted (Ctrl-C)"
    )
    check = commands.add_parser("check", help="validate the configuration (exit 78 on error)")
    check.add_argument(
        "--dns", action="store_true", help="check each tenant's DNS as receivers see it (root)"
    )
    check.add_argument("tenant", nargs="*", help="with --dns: only these domains")
    check.add_argument("--json", action="store_true", help="with --dns: machine-readable output")
    commands.add_parser(
        "newaliases",
        help="check the host's aliases file and have the supervisor apply it (as newaliases(1))",
    )
    tenant = commands.add_parser("tenant", help="add, remove or list hosted domains (root)")
    verbs = tenant.add_subparsers(dest="verb", required=True, metavar="VERB")
    add = verbs.add_parser("add", help="add a tenant as tenants.d/DOMAIN.toml and apply it")
    add.add_argument("domain")
    add.add_argument("--ipv4")
    add.add_argument("--ipv6")
    add.add_argument("--ehlo")
    add.add_argument("--user", help="passwd name (or --uid and --gid)")
    add.add_argument("--uid", type=int)
    add.add_argument("--gid", type=int)
    add.add_argument("--home")
    add.add_argument("--users", default="", help="local mailboxes, comma separated")
    verbs.add_parser("remove", help="remove a tenant added with 'tenant add'").add_argument(
        "domain"
    )
    verbs.add_parser("list", help="list the tenants").add_argument("--json", action="store_true")
    password = verbs.add_parser(
        "passwd", help="set a tenant user's SMTP AUTH password (from the terminal or stdin)"
    )
    password.add_argument("domain")
    password.add_argument("user", help="the local part: USER@DOMAIN logs in")
    verbs.add_parser("resume", help="lift the automatic brake's suspension").add_argument("domain")
    run = commands.add_parser(
        "exec", help="run a command in a tenant's namespace, as the tenant (root)"
    )
    run.add_argument("tenant")
    run.add_argument("--chroot", action="store_true", help="also inside the tenant's home")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    dkim_parser = commands.add_parser("dkim", help="DKIM signing keys (root)")
    dkim_verbs = dkim_parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    keygen = dkim_verbs.add_parser(
        "keygen", help="make a tenant's signing key; print its DNS record and config lines"
    )
    keygen.add_argument("tenant")
    keygen.add_argument("--selector", default="s1")
    keygen.add_argument("--type", dest="kind", choices=("rsa", "ed25519"), default="rsa")
    flush = commands.add_parser("flush", help="retry deferred mail now (root)")
    flush.add_argument("tenant", nargs="*", help="only these domains (default: all)")
    history = commands.add_parser(
        "log", help="delivery history, one line per recipient and attempt (a tenant's own)"
    )
    history.add_argument("tenant", nargs="?", help="only this domain (a tenant's user: its own)")
    history.add_argument(
        "--since", metavar="TIME", help="from this date and time, or a span back (30m, 2h, 7d)"
    )
    history.add_argument("--to", metavar="ADDRESS", help="only attempts for this recipient")
    history.add_argument("--json", action="store_true", help="JSON Lines, one event each")
    completion = commands.add_parser("completion", help="print the shell completion script")
    completion.add_argument("shell", choices=("bash",))
    commands.add_parser(
        "sendmail", help="submit a message, like sendmail(1)", add_help=False
    ).add_argument("args", nargs=argparse.REMAINDER)
    commands.add_parser(
        "demo", help="show what nsmail changes, in a throwaway lab (root)", add_help=False
    ).add_argument("args", nargs=argparse.REMAINDER)
    # prefix_chars="+": every word after `queue` (options too) is queuetool's to parse.
    commands.add_parser(
        "queue",
        help="list, show, hold, release, requeue, delete queued mail",
        add_help=False,
        prefix_chars="+",
    ).add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    config_option, argv = global_options(sys.argv[1:] if argv is None else argv)
    if config_option == "":
        print("nsmail: --config needs a PATH", file=sys.stderr)
        return EX_USAGE
    if "sendmail" in argv[:1]:
        from nsmail.submit import sendmail  # its own options, and kept lean

        if config_option:  # sendmail's own way to be told
            os.environ["NSMAIL_CONFIG"] = config_option
        return sendmail.main(argv[1:])
    if "demo" in argv[:1]:
        from nsmail.lab import demo  # its own options

        return demo.main(argv[1:])
    args = _parser().parse_args(argv)
    if _root_only(args) and os.geteuid() != 0:
        # Refused up front: later, a missing privilege shows as a misleading error.
        print(f"nsmail {args.command}: only root may do this", file=sys.stderr)
        return EX_NOPERM
    path = Path(locate(config_option, os.environ))
    if args.command == "completion":
        print(completion_script(), end="")
        return EX_OK
    if args.command == "log":
        from nsmail.commands import history

        return history.main(path, args.tenant, args.since, args.to, args.json, os.getuid())
    if args.command == "queue":
        from nsmail.commands import (
            queue as queuetool,  # run by tenants' users too: it loads the config itself
        )

        return queuetool.main(path, args.args)
    if args.command == "status":
        try:
            run_dir = run_dir_of(path)
        except ConfigError as e:
            print(f"nsmail: {e}", file=sys.stderr)
            return EX_CONFIG
        if not args.watch:
            return _status(run_dir, args.tenant, args.json)
        return _watch(run_dir, args.tenant, args.json)
    try:
        config = load(path)
    except ConfigError as e:
        print(f"nsmail: {e}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "check":
        return _check(path, config, args)
    if args.command == "newaliases":
        return _newaliases(path, config)
    if args.command == "dkim":
        return _dkim_keygen(path, args)
    if args.command == "flush":
        return _flush(config, args.tenant)
    if args.command == "tenant":
        return _tenant(path, args)
    if args.command == "exec":
        return _exec(config, args)
    assert args.command == "supervise", args.command  # every other verb returned above
    _setup_logging(config.log_format)
    # Root-only imports stay out of `status`. The zygote first: it loads what workers run
    # while the supervisor's own imports load (nsmail.root.children).
    from nsmail.root import children

    zygote, worker_files = children.start_zygote()
    from nsmail.root.supervisor import Supervisor

    return Supervisor(config, zygote, worker_files).run()


def mailq() -> int:
    """`mailq`: the queue, as `nsmail queue list` shows it to the caller."""
    return main(["queue", "list", *sys.argv[1:]])


def completion_script() -> str:
    from nsmail.commands import completion
    from nsmail.commands import queue as queuetool

    parser = _parser()
    inner = {"queue": queuetool.parser()}
    found = list(completion.levels(parser, inner))
    return completion.bash(
        found, {**completion.valued(parser), **completion.valued(inner["queue"])}
    )


def _root_only(args: argparse.Namespace) -> bool:
    if args.command == "tenant":
        return bool(args.verb != "list")  # list shows the configuration, readable by all
    return args.command in ("supervise", "flush", "dkim")  # exec checks for itself


def _check(path: Path, config: Config, args: argparse.Namespace) -> int:
    """Also reads every DKIM key, as the workers will, and checks DNS publishes it."""
    from nsmail.core.dkim import DkimError  # cryptography only where keys are used
    from nsmail.tenant.dkim import load_signer

    signers = []
    for tenant in config.tenants:
        if tenant.dkim_selector is None or tenant.dkim_key is None:
            continue
        try:
            signers.append(load_signer(tenant.domain, tenant.dkim_selector, tenant.dkim_key))
        except DkimError as e:
            print(f"nsmail: {tenant.source}: {tenant.domain}: dkim_key: {e}", file=sys.stderr)
            return EX_CONFIG
    if args.dns:
        from nsmail.commands import preflight  # pyspf loads only for --dns
        from nsmail.core.preflight import DkimKey

        keys = {s.domain: [DkimKey(s.selector, s.public_key())] for s in signers}
        return preflight.main(config, args.tenant, args.json, keys)
    print(f"{path}: OK, {len(config.tenants)} tenants")
    for tenant in config.tenants:
        print(f"{tenant.domain}: {_local_delivery(tenant)}")
    _warn_about_aliases(config)
    return EX_OK


def _local_delivery(tenant: Tenant) -> str:
    if tenant.local_delivery == "mx":
        return 'local_delivery = "mx": its own mail goes to its MX, as any other domain\'s'
    users = ", ".join(tenant.users) or "none"
    aliases = ", ".join(f"{name} -> {', '.join(targets)}" for name, targets in tenant.aliases)
    return f'local_delivery = "maildir": users {users}; aliases {aliases}'


def _warn_about_aliases(config: Config) -> None:
    """The host's aliases file's problems: mail for those names waits (see nsmail.core.aliases)."""
    for problem in config.host_aliases.problems:
        where = (
            f"{config.host.aliases}:{problem.line}" if problem.line else str(config.host.aliases)
        )
        print(f"nsmail: warning: {where}: {printable(problem.text)}", file=sys.stderr)


def _newaliases(path: Path, config: Config) -> int:
    """newaliases(1): nothing to build (the supervisor reads the file itself), but its
    problems are shown, and a running supervisor applies it now (root, the admin group)."""
    _warn_about_aliases(config)
    count = len(config.host_aliases.table)
    try:
        applied = tenantadmin.apply(path)
    except tenantadmin.AdminError as e:
        print(f"nsmail: {e}", file=sys.stderr)
        return e.code
    except control.Denied as e:
        print(f"nsmail: not applied: {e}", file=sys.stderr)
        return EX_NOPERM
    print(f"{config.host.aliases}: {count} aliases; {applied}")
    return EX_OK


def newaliases() -> int:
    """The `newaliases` command that Debian's tools run after they change /etc/aliases."""
    return main(["newaliases"])


def _dkim_keygen(path: Path, args: argparse.Namespace) -> int:
    from nsmail.commands.keygen import keygen
    from nsmail.core.dkim import DkimError

    try:
        print(keygen(path, args.tenant, args.selector, args.kind), end="")
    except DkimError as e:
        print(f"nsmail: {e}", file=sys.stderr)
        return EX_DATAERR
    except OSError as e:
        print(f"nsmail: cannot write the key: {e}", file=sys.stderr)
        return EX_CANTCREAT
    return EX_OK


def _exec(config: Config, args: argparse.Namespace) -> int:
    from nsmail.root import tenant_exec  # netlink's library: not for every command's start

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    tenant = config.tenant(args.tenant)
    if tenant is None or not command:
        print("nsmail: usage: nsmail exec TENANT [--chroot] -- COMMAND [ARG...]", file=sys.stderr)
        return EX_USAGE
    return tenant_exec.run(config, tenant, command, chroot=args.chroot)


def _tenant(path: Path, args: argparse.Namespace) -> int:
    try:
        if args.verb == "list":
            tenants = tenantadmin.listing(path)
            if args.json:
                print(json.dumps(tenants))
            for t in [] if args.json else tenants:
                addresses = " ".join(str(a) for a in (t["ipv4"], t["ipv6"]) if a)
                print(f"{t['domain']:<30} {addresses:<40} uid {t['uid']}")
            return EX_OK
        if args.verb == "remove":
            print(f"nsmail: {tenantadmin.remove(path, args.domain)}")
            return EX_OK
        if args.verb == "passwd":
            secret = _read_password(f"{args.user}@{args.domain}")
            print(f"nsmail: {tenantadmin.passwd(path, args.domain, args.user, secret)}")
            return EX_OK
        if args.verb == "resume":
            print(f"nsmail: {tenantadmin.resume(path, args.domain)}")
            return EX_OK
        new = tenantadmin.NewTenant(
            domain=args.domain,
            ipv4=args.ipv4,
            ipv6=args.ipv6,
            ehlo=args.ehlo,
            user=args.user,
            uid=args.uid,
            gid=args.gid,
            home=args.home,
            users=tuple(u for u in args.users.split(",") if u),
        )
        print(f"nsmail: {tenantadmin.add(path, new)}")
        return EX_OK
    except tenantadmin.AdminError as e:
        print(f"nsmail: {e}", file=sys.stderr)
        return e.code


def _read_password(user: str) -> str:
    """Twice from the terminal, as passwd(1) asks; else one line of stdin (chpasswd's way)."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().removesuffix("\n")
    import getpass

    first = getpass.getpass(f"New SMTP password for {user}: ")
    if getpass.getpass("Again: ") != first:
        raise tenantadmin.AdminError(EX_USAGE, "the passwords differ; nothing changed")
    return first


def _flush(config: Config, domains: list[str]) -> int:
    tenants = [t for t in config.tenants if not domains or t.domain in domains]
    unknown = set(domains) - {t.domain for t in tenants}
    if unknown:
        print(f"nsmail: no such tenant: {printable(', '.join(sorted(unknown)))}", file=sys.stderr)
        return EX_USAGE
    failed = 0
    for tenant in tenants:
        failed += run_as(tenant.uid, tenant.gid, Spool(tenant.spool).request_flush) != 0
    return EX_TEMPFAIL if failed else EX_OK


def _watch(run_dir: Path, tenant: str | None, as_json: bool) -> int:
    try:
        while True:
            if not as_json and sys.stdout.isatty():
                print("\033[H\033[2J", end="")  # clear the screen, like watch(1)
            code = _status(run_dir, tenant, as_json)
            if code != EX_OK:
                return code
            sys.stdout.flush()
            time.sleep(WATCH_EVERY)
    except KeyboardInterrupt:
        return EX_OK


def _status(run_dir: Path, tenant: str | None, as_json: bool) -> int:
    try:
        reply = control.request(run_dir, "status")
    except control.Denied as e:
        print(f"nsmail: permission denied: {e}", file=sys.stderr)
        return EX_NOPERM
    except control.Unavailable as e:
        print(f"nsmail: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    if not reply.get("ok"):
        print(f"nsmail: {reply.get('error', 'status refused')}", file=sys.stderr)
        return EX_NOPERM if reply.get("denied") else EX_UNAVAILABLE
    workers = [w for w in reply["workers"] if tenant is None or same_domain(w["domain"], tenant)]
    if not workers and tenant is not None:
        print(f"nsmail: no such tenant: {printable(tenant)}", file=sys.stderr)
        return EX_USAGE
    relay, refusal = reply.get("relay"), reply.get("reload_refused")
    if as_json:
        shown = {"host": reply["host"], "relay": relay, "reload_refused": refusal}
        print(json.dumps({**shown, "workers": workers}))
    else:
        print(
            render_table(
                [WorkerStatus.from_json(w) for w in workers],
                time.time(),
                relay=RelayStatus.from_json(relay) if relay else None,
                refusal=ReloadRefusal.from_json(refusal) if refusal else None,
            )
        )
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
