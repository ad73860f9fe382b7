"""`nsmail exec`, as root runs it: from pipes and from a terminal that plays root's.

The command is a small static C program (so it also runs inside `--chroot`, where the
tenant's home holds nothing else) that reports what it is and tries what a hostile
tenant's .bashrc would: TIOCSTI into every terminal it can reach. No supervisor is
needed: the test makes the tenant's namespace itself, named as the supervisor would.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hosting import NSMAIL, V4_ONLY, Hosting
from lab import Lab

from nsmail.host.configfile import load
from nsmail.root import tenant_exec

SENDMAIL = str(Path(sys.executable).with_name("nsmail-sendmail"))
PROBE_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

/* probe report TEXT | probe exit N | probe kill N | probe winsize */
int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "exit")) return atoi(argv[2]);
    if (argc == 3 && !strcmp(argv[1], "kill")) { kill(getpid(), atoi(argv[2])); return 99; }
    if (argc == 2 && !strcmp(argv[1], "winsize")) {
        struct winsize size;
        char key;
        printf("ready\n");
        fflush(stdout);
        if (read(0, &key, 1) != 1 || ioctl(0, TIOCGWINSZ, &size) != 0) return 98;
        printf("{\"rows\": %d, \"cols\": %d}\n", size.ws_row, size.ws_col);
        return 0;
    }
    if (argc != 3 || strcmp(argv[1], "report")) return 97;
    char cwd[4096], fds[8192] = "", tiocsti[8192] = "";
    for (int fd = 3; fd < 1024; fd++)
        if (fcntl(fd, F_GETFD) != -1) sprintf(fds + strlen(fds), "%s%d", *fds ? "," : "", fd);
    struct stat tty_stat;
    int tty = open("/dev/tty", O_RDWR | O_NOCTTY);
    const char *dev_tty = tty < 0 ? strerror(errno) : "open";
    long ctty = tty >= 0 && fstat(tty, &tty_stat) == 0 ? (long)tty_stat.st_rdev : -1;
    /* What a hostile .bashrc does: type TEXT into every terminal within reach. */
    for (int fd = 0; fd < 1024; fd++) {
        if (fcntl(fd, F_GETFD) == -1 || !isatty(fd)) continue;
        const char *result = "ok";
        for (const char *c = argv[2]; *c; c++)
            if (ioctl(fd, TIOCSTI, c) != 0) { result = strerror(errno); break; }
        char name[16];
        snprintf(name, sizeof name, fd == tty ? "/dev/tty" : "%d", fd);
        sprintf(tiocsti + strlen(tiocsti), "%s\"%s\": \"%s\"", *tiocsti ? ", " : "", name, result);
    }
    const char *home = getenv("HOME"), *config = getenv("NSMAIL_CONFIG");
    printf("{\"home\": \"%s\", \"config\": \"%s\", \"cwd\": \"%s\", \"uid\": %d, "
           "\"session_leader\": %s, \"dev_tty\": \"%s\", \"ctty\": %ld, \"open_fds\": [%s], "
           "\"tiocsti\": {%s}}\n",
           home ? home : "", config ? config : "", getcwd(cwd, sizeof cwd) ? cwd : "?",
           getuid(), getsid(0) == getpid() ? "true" : "false", dev_tty, ctty, fds, tiocsti);
    return 0;
}
"""
# Plays root's interactive shell on the terminal the test made: runs `nsmail exec` with
# an extra descriptor of the terminal open, then looks at what the terminal holds.
ROOT_SHELL = """
import fcntl, json, os, struct, subprocess, sys, termios
os.dup2(0, 5)  # inheritable: a descriptor of root's terminal beyond stdio
before = termios.tcgetattr(0)
code = subprocess.call(sys.argv[1:], pass_fds=(5,))
queued = struct.unpack("i", fcntl.ioctl(0, termios.FIONREAD, b"    "))[0]
os.set_blocking(0, False)
typed = os.read(0, 4096).decode(errors="replace") if queued else ""
restored = termios.tcgetattr(0) == before
terminal = os.fstat(0).st_rdev
print("SHELL " + json.dumps(dict(code=code, queued=typed, restored=restored, terminal=terminal)))
"""


@dataclass(frozen=True)
class Tenant:
    hosting: Hosting
    domain: str
    home: Path
    uid: int

    def exec(self, *command: str, chroot: bool = False) -> list[str]:
        return [
            NSMAIL,
            "--config",
            str(self.hosting.config_path),
            "exec",
            *(["--chroot"] if chroot else []),
            self.domain,
            "--",
            *command,
        ]

    @property
    def probe(self) -> str:
        return str(self.home / "probe")


@pytest.fixture(scope="module")
def tenant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenant]:
    with Lab(bridge=False) as lab:
        hosting = Hosting(lab, mode="routed")
        hosting.write_config((V4_ONLY,))
        home = hosting.home(V4_ONLY.domain)
        source = tmp_path_factory.mktemp("probe") / "probe.c"
        source.write_text(PROBE_C)
        compiled = ["gcc", "-static", "-O1", "-o", str(home / "probe"), str(source)]
        subprocess.run(compiled, check=True)
        subprocess.run(["ip", "netns", "add", hosting.namespace(V4_ONLY.domain)], check=True)
        yield Tenant(hosting, V4_ONLY.domain, home, hosting.uid(V4_ONLY.domain))


def report(output: str) -> dict[str, object]:
    (line,) = [line for line in output.splitlines() if line.startswith("{")]
    result: dict[str, object] = json.loads(line)
    return result


def test_from_pipes_a_new_session_without_a_terminal_or_root_descriptors(
    tenant: Tenant,
) -> None:
    leaked = os.open("/dev/null", os.O_RDONLY)  # inherited by nsmail: it must not pass it on
    try:
        result = subprocess.run(
            tenant.exec(tenant.probe, "report", "x"),
            capture_output=True,
            text=True,
            pass_fds=(leaked,),
            timeout=30,
            check=False,
        )
    finally:
        os.close(leaked)
    assert result.returncode == 0, result.stderr
    assert report(result.stdout) == {
        "home": "/nonexistent",  # no start-up file of the tenant's runs
        "config": str(tenant.hosting.config_path),  # nsmail-sendmail finds it
        "cwd": "/",
        "uid": tenant.uid,
        "session_leader": True,
        "dev_tty": "No such device or address",  # no controlling terminal at all
        "ctty": -1,
        "open_fds": [],
        "tiocsti": {},  # stdio are pipes, and nothing else is open
    }


def test_with_chroot_home_and_working_directory_are_the_tenants_home(tenant: Tenant) -> None:
    result = subprocess.run(
        tenant.exec("/probe", "report", "x", chroot=True),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = report(result.stdout)
    assert (seen["home"], seen["cwd"], seen["uid"]) == ("/", "/", tenant.uid)
    assert seen["session_leader"] is True and seen["open_fds"] == []


def test_a_home_swapped_for_a_symlink_after_the_configuration_was_read_is_not_entered(
    tenant: Tenant, capfd: pytest.CaptureFixture[str]
) -> None:
    config = load(tenant.hosting.config_path)
    (cde,) = config.tenants
    elsewhere = tenant.home.with_name("elsewhere")
    tenant.home.rename(elsewhere)
    tenant.home.symlink_to(elsewhere)
    try:
        # The race made deterministic: read before the swap, entered after it.
        code = tenant_exec.run(config, cde, ["/probe", "report", "x"], chroot=True)
        # Read now, the configuration itself is refused.
        refused = subprocess.run(
            tenant.exec("/probe", chroot=True), capture_output=True, text=True, check=False
        )
    finally:
        tenant.home.unlink()
        elsewhere.rename(tenant.home)
    assert (code, capfd.readouterr().err) == (
        70,
        f"nsmail: exec: cannot become {tenant.domain}: cannot enter {tenant.home}: "
        f"{tenant.home}: a symbolic link or not a directory\n",
    )
    assert refused.returncode == 78
    assert f"'{tenant.home}' is a symbolic link" in refused.stderr


@pytest.mark.parametrize(
    ("command", "code"),
    [(["exit", "0"], 0), (["exit", "3"], 3), (["kill", str(int(signal.SIGTERM))], 128 + 15)],
)
def test_the_exit_status_is_the_commands(tenant: Tenant, command: list[str], code: int) -> None:
    result = subprocess.run(tenant.exec(tenant.probe, *command), timeout=30, check=False)
    assert result.returncode == code


def test_nsmail_sendmail_inside_finds_the_configuration(tenant: Tenant) -> None:
    submit = [SENDMAIL, "-i", "-f", f"alice@{tenant.domain}", "bob@rcpt.test"]
    result = subprocess.run(
        tenant.exec(*submit),
        input="Subject: from inside\n\nhi\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    maildrop = tenant.home / "var/spool/nsmail/maildrop"
    (queued,) = list(maildrop.iterdir())
    assert queued.stat().st_uid == tenant.uid
    queued.unlink()


def under_terminal(argv: list[str], rows: int = 24, cols: int = 80) -> tuple[int, bytes]:
    """Run `argv` on a new terminal of its own (as root's login shell would be): its exit
    status and everything it showed there."""
    pid, master = pty.fork()
    if pid == 0:
        os.execv(argv[0], argv)
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's last user is gone
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), shown


def test_from_a_terminal_the_command_cannot_type_into_roots(tenant: Tenant) -> None:
    shell = [sys.executable, "-c", ROOT_SHELL]
    command = tenant.exec(tenant.probe, "report", "echo INJECTED\n")
    code, shown = under_terminal([*shell, *command])
    assert code == 0, shown
    text = shown.decode(errors="replace")
    (shell_line,) = [line for line in text.splitlines() if line.startswith("SHELL ")]
    root = json.loads(shell_line.removeprefix("SHELL "))
    seen = report(text)
    # Nothing arrived in root's terminal's input, and it is as root left it.
    assert root == {"code": 0, "queued": "", "restored": True, "terminal": root["terminal"]}
    # The command has a terminal, a new one: a session of its own, on a fresh pty.
    assert seen["session_leader"] is True and seen["dev_tty"] == "open"
    assert seen["ctty"] not in (-1, root["terminal"])
    assert seen["open_fds"] == []  # root's terminal on descriptor 5 was not passed on
    # It typed into its own terminal only (which echoes, hence "INJECTED" on the screen).
    assert seen["tiocsti"] == {"0": "ok", "1": "ok", "2": "ok", "/dev/tty": "ok"}


def test_from_a_terminal_window_size_changes_reach_the_command(tenant: Tenant) -> None:
    pid, master = pty.fork()
    if pid == 0:
        argv = tenant.exec(tenant.probe, "winsize")
        os.execv(argv[0], argv)
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    shown = b""
    while b"ready" not in shown:
        shown += os.read(master, 65536)
    # nsmail gets SIGWINCH as the terminal's foreground process and resizes the
    # command's pty before it passes on the key typed after the resize.
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
    os.write(master, b"\r")  # Enter: ends the line the command waits for
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, shown
    assert report(shown.decode()) == {"rows": 50, "cols": 132}
