"""Aliases and .forward files: where the mail of a local name goes (aliases(5), local(8)).

Three sources say it: the host's /etc/aliases in its usual syntax (`parse_aliases`), a
tenant's `aliases` table in its configuration, and a .forward a tenant's user may keep
(`parse_forward`). `resolve` follows a recipient's local part through them to the
mailboxes to write and the addresses elsewhere to forward to, or says why it cannot.

Choices, each as sendmail or Postfix makes it:
- Names match case-insensitively (Postfix folds them to lower case), and an alias wins
  over a user of the same name.
- A name reached again on its own way is that user's mailbox (`alice: alice, bob` keeps
  alice a copy), or a loop (5.4.6) when it is no user; `\\name` in a .forward is name's
  own mailbox, without further aliases or forwarding.
- `|command`, `/file` and `:include:` are refused: running a command or writing a file
  as the right user needs privileges no worker has (a root helper that becomes each
  user, as Postfix's local(8) is), and an include file is read with the rights of the
  alias file's owner. Mail to such an entry waits (4.3.5: the system is configured
  wrongly) and its queue entry says why; `nsmail check` and `newaliases` name the line.
- A recipient is delivered to all it expands to or to none: a target that cannot be had
  fails the recipient, the temporary failure first, so fixing it lets all of it through.
- At most MAX_DEPTH names deep and MAX_TARGETS addresses wide (Postfix's expansion_limit).

Pure. Security: /etc/aliases is root's and a tenant's table the administrator's, but a
.forward is tenant-written: it is bounded by the reader (nsmail.tenant.forward), and what
it names is only ever a mailbox of the tenant's own users or an address to send to.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nsmail.core.addresses import same_domain, split

MAX_DEPTH = 20
MAX_TARGETS = 1000
POSTMASTER = "postmaster"  # RFC 5321 4.5.1: every domain has one, matched in any case

# (name folded to lower case, its targets), in file order.
Table = tuple[tuple[str, tuple[str, ...]], ...]
# aliases(5): targets are separated by commas or white space; one holding either (a
# command with arguments) is double-quoted.
REFUSAL = "nsmail delivers no mail to commands, files or :include: lists"
_TARGET = re.compile(r'"(?:[^"\\]|\\.)*"|[^",\s]+')
_NAME = re.compile(r"[^\s:,\"\\]{1,64}")


@dataclass(frozen=True, slots=True)
class Problem:
    """A line of an aliases file that is not used as it says, and why."""

    line: int  # 0: the file as a whole
    text: str


@dataclass(frozen=True, slots=True)
class AliasFile:
    """An aliases file as parsed: its entries and what is wrong with it."""

    table: Table = ()
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a recipient comes to: the mailboxes to write and the addresses to forward to."""

    mailboxes: tuple[str, ...]  # users' own names
    forward: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Undeliverable:
    """Why a recipient cannot be delivered; `text` starts with its RFC 3463 code."""

    temporary: bool
    text: str


Forward = tuple[str, ...] | Undeliverable | None  # a user's .forward: targets, unusable, none


@dataclass(frozen=True, slots=True)
class Book:
    """What `resolve` looks names up in."""

    domain: str  # addresses in it are local
    aliases: Mapping[str, tuple[str, ...]]  # by folded name
    mailbox: Callable[[str], str | None]  # a user's own name for a name, if one has a mailbox
    forward: Callable[[str], Forward] = lambda user: None


def refused(target: str) -> str | None:
    """What kind of target nsmail never delivers to (see the module docstring), if any."""
    if target.startswith("|"):
        return "a command"
    if target.startswith("/"):
        return "a file"
    if target.lower().startswith(":include:"):
        return "an :include: list"
    return None


def parse_aliases(text: str, known: Callable[[str], bool] = lambda name: False) -> AliasFile:
    """/etc/aliases (aliases(5)): `name: target, target`, lines starting with white space
    continuing the one before, `#` lines comments; the first entry of a name counts. A
    bare target must be an alias or a name `known` (a user of the machine)."""
    table: dict[str, tuple[str, ...]] = {}
    first_line: dict[str, int] = {}
    problems: list[Problem] = []
    for number, line in _logical_lines(text):
        name, colon, rest = line.partition(":")
        name = _unquoted(name.strip())
        if not colon or not _NAME.fullmatch(name):
            problems.append(Problem(number, "not 'name: target, ...'"))
            continue
        key = name.lower()
        if key in table:
            problems.append(
                Problem(number, f"{name!r} again: the entry of line {first_line[key]} counts")
            )
            continue
        targets = split_targets(rest)
        if not targets:
            problems.append(Problem(number, f"{name!r} has no target"))
            continue
        problems += [
            Problem(number, f"{target!r} is {kind}: {REFUSAL}")
            for target in targets
            if (kind := refused(target))
        ]
        table[key], first_line[key] = targets, number
    for key, targets in table.items():
        problems += [
            Problem(first_line[key], f"{target!r} is neither a user nor an alias")
            for target in targets
            if "@" not in target
            and not refused(target)
            and (name := target.removeprefix("\\")).lower() not in table
            and not known(name)
        ]
    problems.sort(key=lambda problem: problem.line)
    return AliasFile(tuple(table.items()), tuple(problems))


def parse_forward(text: str) -> tuple[str, ...]:
    """A .forward: targets separated by commas or line ends, `#` lines comments."""
    return tuple(
        target
        for line in text.splitlines()
        if not line.lstrip().startswith("#")
        for target in split_targets(line)
    )


def split_targets(text: str) -> tuple[str, ...]:
    """The targets in `text`, a double-quoted one ("|cmd with, commas") unquoted."""
    return tuple(
        target for match in _TARGET.finditer(text) if (target := _unquoted(match.group(0).strip()))
    )


def resolve(local_part: str, book: Book) -> Delivery | Undeliverable:
    """Where the mail for `local_part` goes, after aliases and .forward files."""
    walk = _Walk(book)
    walk.name(local_part, ())
    return walk.result()


class _Walk:
    """One expansion: the mailboxes and addresses found, and the first failures."""

    def __init__(self, book: Book) -> None:
        self.book = book
        self.mailboxes: dict[str, None] = {}
        self.forward: dict[str, None] = {}
        self.temporary: Undeliverable | None = None
        self.permanent: Undeliverable | None = None

    def result(self) -> Delivery | Undeliverable:
        failed = self.temporary or self.permanent
        if failed is not None:
            return failed
        return Delivery(tuple(self.mailboxes), tuple(self.forward))

    def fail(self, temporary: bool, text: str) -> None:
        if temporary and self.temporary is None:
            self.temporary = Undeliverable(True, text)
        elif not temporary and self.permanent is None:
            self.permanent = Undeliverable(False, text)

    def name(self, name: str, path: tuple[str, ...]) -> None:
        key = name.lower()
        user = self.book.mailbox(name)
        if key in path:
            if user is None:
                self.fail(False, f"5.4.6 alias loop: {' -> '.join((*path, key))}")
            else:
                self._mailbox(user)
            return
        if len(path) >= MAX_DEPTH:
            self.fail(False, f"5.4.6 aliases nested more than {MAX_DEPTH} deep at {key}")
            return
        targets = self.book.aliases.get(key)
        source = f"aliases: {key}"
        if targets is None:
            if user is None:
                where = f": {key} (from {path[-1]})" if path else ""
                self.fail(False, f"5.1.1 no such user here{where}")
                return
            forward = self.book.forward(user)
            if forward is None:
                self._mailbox(user)
                return
            if isinstance(forward, Undeliverable):
                self.fail(forward.temporary, forward.text)
                return
            targets, source = forward, f"the .forward of {user}"
        for target in targets:
            self._target(target, (*path, key), source)

    def _target(self, target: str, path: tuple[str, ...], source: str) -> None:
        kind = refused(target)
        if kind is not None:
            self.fail(True, f"4.3.5 {source}: {target!r} is {kind}: {REFUSAL}")
        elif target.startswith("\\"):
            user = self.book.mailbox(target[1:])
            if user is None:
                self.fail(False, f"5.1.1 no such user here: {target[1:]} (from {path[-1]})")
            else:
                self._mailbox(user)
        elif "@" not in target:
            self.name(target, path)
        elif same_domain(split(target)[1], self.book.domain):
            self.name(split(target)[0], path)
        else:
            self._add(self.forward, target)

    def _mailbox(self, user: str) -> None:
        self._add(self.mailboxes, user)

    def _add(self, found: dict[str, None], item: str) -> None:
        if len(self.mailboxes) + len(self.forward) >= MAX_TARGETS and item not in found:
            self.fail(False, f"5.3.0 the alias expands to more than {MAX_TARGETS} recipients")
            return
        found[item] = None


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(number of its first line, text) of each entry: continuations joined, comments and
    blank lines dropped."""
    entries: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if line[0] in " \t" and entries:
            first, joined = entries[-1]
            entries[-1] = (first, f"{joined} {line.strip()}")
        else:
            entries.append((number, line.strip()))
    return entries


def _unquoted(text: str) -> str:
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text
