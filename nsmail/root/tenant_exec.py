"""`nsmail exec TENANT -- COMMAND...`: any program, speaking with the tenant's identity.

The command runs in the tenant's network namespace (so every connection it makes carries
the tenant's address), as the tenant's uid and gid with no groups, no capabilities (the
bounding set emptied, so nothing it executes gains any) and no_new_privs, in a session of
its own. With `--chroot` it runs inside the tenant's home, which is then its working
directory and HOME ("/"); without, its working directory is "/" and HOME /nonexistent, so
no start-up file of the tenant's (.bashrc, .profile) runs. NSMAIL_CONFIG names the
configuration this command used, so nsmail-sendmail inside finds it. The exit status is
the command's, 128 + n when signal n killed it (as shells say).

Security: run by root; anyone else is refused before anything is done. Of root's
descriptors the command gets only stdin, stdout and stderr, and of those none that is a
terminal: like `su --pty`, each that is one is replaced by a fresh pseudo-terminal, the
command's controlling terminal, and this process relays between it and root's terminal
(raw meanwhile, restored on every way out; window size changes passed on). So nothing
the command does (TIOCSTI, job control, writing to /dev/tty) reaches root's terminal or
root's shell. Pipes and files pass through as they are; with no terminal among them the
command has no controlling terminal at all. The child drops everything before exec; the
command and its arguments are the operator's. With `--chroot` the child's root is the
tenant-writable home, entered without following any symlink, and it reads no file after
the chroot (what the drop needs from /proc is read before it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import sys
import termios
import tty
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from nsmail.core.config import Config, Tenant
from nsmail.core.exitcodes import EX_NOPERM, EX_NOTFOUND, EX_SOFTWARE, EX_UNAVAILABLE, SIGNAL_BASE
from nsmail.root import jail, netns, setns

STDIO = (0, 1, 2)
PATH = "/usr/local/bin:/usr/bin:/bin"
NO_HOME = "/nonexistent"  # Debian Policy 9.2.1: the home of a user who has none
# Signals meant for the command: with a session of its own, a Ctrl-C typed while it
# runs without a terminal, a hangup or a kill reaches only this process.
FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)
CHUNK = 65536


@dataclass(frozen=True, slots=True)
class Command:
    """What the child becomes and runs."""

    tenant: Tenant
    namespace: Path
    argv: tuple[str, ...]
    chroot: bool
    env: dict[str, str]


def run(config: Config, tenant: Tenant, argv: Sequence[str], *, chroot: bool) -> int:
    """Run `argv` as the tenant, in its namespace; the command's exit status."""
    if os.geteuid() != 0:
        print("nsmail: exec: only root may run commands as a tenant", file=sys.stderr)
        return EX_NOPERM
    namespace = netns.names_for(config.network.prefix, tenant.domain).path
    if not namespace.exists():
        print(f"nsmail: {namespace} does not exist: is the supervisor running?", file=sys.stderr)
        return EX_UNAVAILABLE
    terminals = tuple(fd for fd in STDIO if os.isatty(fd))
    term = os.environ.get("TERM") if terminals else None
    env = environment(config.path.absolute(), chroot=chroot, term=term)
    command = Command(tenant, namespace, tuple(argv), chroot, env)
    if not terminals:
        pid = _start(command, (), None)
        with _forwarding(pid):
            return exit_status(os.waitpid(pid, 0)[1])
    return _run_on_pty(command, terminals)


def environment(config_path: Path, *, chroot: bool, term: str | None) -> dict[str, str]:
    """The command's whole environment: nothing else of root's is passed on."""
    env = {
        "PATH": PATH,
        "HOME": "/" if chroot else NO_HOME,
        "LANG": "C.UTF-8",
        "NSMAIL_CONFIG": str(config_path),
    }
    if term is not None:
        env["TERM"] = term
    return env


def exit_status(wait_status: int) -> int:
    """A waitpid() status as shells report it: the exit code, or 128 + n for signal n."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else SIGNAL_BASE - code


# --- the child --------------------------------------------------------------------------


def _start(command: Command, terminals: tuple[int, ...], slave: int | None) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            _become(command, terminals, slave)
        finally:
            os._exit(EX_SOFTWARE)  # the child never returns into the caller's code
    return pid


def _become(command: Command, terminals: tuple[int, ...], slave: int | None) -> None:
    """Set up and exec the command; returns only if it could not become the tenant."""
    try:
        os.setsid()  # no controlling terminal: root's is out of reach from here on
        if slave is not None:
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in terminals:
                os.dup2(slave, fd)
        # Everything else root had open goes, inherited descriptors and the pty's too.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        last_cap = jail.last_capability()
        setns.enter(command.namespace)
        if command.chroot:
            jail.chroot_into(command.tenant.home)
        else:
            os.chdir("/")
        jail.drop(command.tenant.uid, command.tenant.gid, last_cap)
    except (OSError, jail.JailError) as e:
        _say(f"nsmail: exec: cannot become {command.tenant.domain}: {e}")
        return
    try:
        os.execvpe(command.argv[0], list(command.argv), command.env)
    except OSError as e:
        _say(f"nsmail: exec {command.argv[0]}: {e.strerror}")
        os._exit(EX_NOTFOUND)


def _say(line: str) -> None:
    # To descriptor 2 itself: whatever sys.stderr was may be gone with the descriptors.
    os.write(2, f"{line}\n".encode(errors="replace"))


# --- the relay --------------------------------------------------------------------------


def _run_on_pty(command: Command, terminals: tuple[int, ...]) -> int:
    # One terminal: where the command's terminal output is shown (stdout's if it is
    # one), whose settings and size the pty copies. Input is relayed only from a
    # terminal on stdin; a pipe there is the command's own stdin.
    terminal = next(fd for fd in (1, 2, 0) if fd in terminals)
    master, slave = os.openpty()
    try:
        with _raw(terminal, slave):
            try:
                pid = _start(command, terminals, slave)
            finally:
                os.close(slave)
            with _forwarding(pid), _wakeups() as wakeup:
                status = _relay(master, terminal, 0 in terminals, pid, wakeup)
    finally:
        os.close(master)
    return exit_status(status)


def _relay(master: int, terminal: int, typed: bool, pid: int, wakeup: int) -> int:
    """Pass bytes both ways until the command exits, then what it left; its wait status."""
    readers = [master, wakeup, *([0] if typed else [])]
    status = _reaped(pid)  # it may have ended before the wakeups were set up
    while status is None:
        ready = select.select(readers, [], [])[0]
        # Read the wakeups whether or not select saw them: a resize followed at once by a
        # key can find select woken by the key, with the signal delivered (its byte
        # written) only as select returns. The pty is resized before the key is passed.
        signals = _pending_signals(wakeup)
        if signals:
            if signal.SIGWINCH in signals:
                termios.tcsetwinsize(master, termios.tcgetwinsize(terminal))
            status = _reaped(pid)
        for source, target in ((master, terminal), (0, master)):
            # A source at its end (no slave open, a hung-up terminal) is dropped.
            if source in ready and not _pass(source, target):
                readers.remove(source)
    # Output the command wrote just before it ended; a background process it left
    # holding the pty does not keep this command waiting.
    os.set_blocking(master, False)
    while _pass(master, terminal):
        pass
    return status


def _pending_signals(wakeup: int) -> bytes:
    """The signal numbers the wakeup descriptor holds, if any (it does not block)."""
    try:
        return os.read(wakeup, 256)
    except BlockingIOError:
        return b""


def _pass(source: int, target: int) -> bool:
    """Copy what `source` has to `target`; False at an end of either (or nothing now)."""
    try:
        view = memoryview(os.read(source, CHUNK))
        if not view:
            return False
        while view:
            view = view[os.write(target, view) :]
    except OSError:  # EIO: a pty whose other side is gone; EAGAIN: nothing more now
        return False
    return True


def _reaped(pid: int) -> int | None:
    done, status = os.waitpid(pid, os.WNOHANG)
    return status if done else None


@contextlib.contextmanager
def _raw(terminal: int, slave: int) -> Iterator[None]:
    """The pty starts as the caller's terminal was; that terminal is raw meanwhile, so
    every key (Ctrl-C included) goes to the command's pty, and is restored after."""
    saved = termios.tcgetattr(terminal)
    termios.tcsetattr(slave, termios.TCSANOW, saved)
    termios.tcsetwinsize(slave, termios.tcgetwinsize(terminal))
    tty.setraw(terminal, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(terminal, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _forwarding(pid: int) -> Iterator[None]:
    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _wakeups() -> Iterator[int]:
    """A descriptor that turns readable on SIGCHLD and SIGWINCH (and holds their numbers)."""
    readable, writable = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    watched = (signal.SIGCHLD, signal.SIGWINCH)
    # A Python handler, even one doing nothing, is what makes the signal reach the pipe.
    previous = {signum: signal.signal(signum, lambda *_: None) for signum in watched}
    old_wakeup = signal.set_wakeup_fd(writable)
    try:
        yield readable
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(readable)
        os.close(writable)
