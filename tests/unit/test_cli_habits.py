"""CLI habits (issue 19): global options before or after the verb, a completion script that
offers every verb and option, and man pages with an entry for every verb, option, exit
code and configuration key (so a new one without an entry fails here)."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

from nsmail.commands import cli, completion
from nsmail.commands import queue as queuetool
from nsmail.core.config import TABLE_KEYS
from nsmail.submit import sendmail

MAN = Path(__file__).resolve().parents[2] / "man"
OWN_PARSERS = {"sendmail", "demo"}  # nsmail-sendmail(8) and `nsmail demo --help`


@pytest.mark.parametrize(
    ("argv", "config", "rest"),
    [
        (["--config", "/x.toml", "status"], "/x.toml", ["status"]),
        (["status", "--config", "/x.toml", "--json"], "/x.toml", ["status", "--json"]),
        (["queue", "list", "--config=/x.toml"], "/x.toml", ["queue", "list"]),
        (["--config", "/a", "check", "--config", "/b"], "/b", ["check"]),
        (
            ["exec", "t", "--", "cmd", "--config", "x"],
            None,
            ["exec", "t", "--", "cmd", "--config", "x"],
        ),
        (["status", "--config"], "", ["status"]),
    ],
)
def test_global_options_before_or_after_the_verb(
    argv: list[str], config: str | None, rest: list[str]
) -> None:
    assert cli.global_options(argv) == (config, rest)


def _levels() -> list[completion.Level]:
    return list(completion.levels(cli._parser(), {"queue": queuetool.parser()}))


def test_completion_offers_every_verb_and_option() -> None:
    script = cli.completion_script()
    for level in _levels():
        assert f'"{level.path}") words="{" ".join(level.words)}"' in script
        for option in level.options:
            assert option in script
    assert "log" in next(level.words for level in _levels() if level.path == "")


def _sections(page: str, underline: str) -> dict[str, str]:
    """Headings (underlined with `underline`) and the text under each."""
    found: dict[str, str] = {}
    lines = page.splitlines()
    title, body = "", []
    for line, below in zip(lines, [*lines[1:], ""], strict=True):
        if below and set(below) == {underline} and len(below) >= len(line) > 0:
            found[title] = "\n".join(body)
            title, body = line, []
        else:
            body.append(line)
    found[title] = "\n".join(body)
    return found


def _terms(text: str) -> set[str]:
    """Definition-list terms: ``word`` at the start of a line."""
    return {m.group(1) for m in re.finditer(r"^``([^`]+)``", text, re.MULTILINE)}


def test_nsmail_8_has_every_verb_and_option() -> None:
    sections = _sections((MAN / "nsmail.8.rst").read_text(), "~")
    for level in _levels():
        if not level.path or level.path in OWN_PARSERS or level.words:
            continue  # the top (OPTIONS), other parsers, verbs that only hold verbs
        name = "nsmail " + level.path.replace("/", " ")
        title = next((t for t in sections if t == name or t.startswith(name + " ")), None)
        assert title is not None, f"nsmail(8) has no section {name!r}"
        missing = {o for o in level.options if o.startswith("--")} - {"--help"}
        assert missing <= _terms(sections[title]), f"{name}: {missing - _terms(sections[title])}"
    assert "--config" in _terms((MAN / "nsmail.8.rst").read_text())


def test_nsmail_sendmail_8_has_every_option_and_exit_code() -> None:
    page = (MAN / "nsmail-sendmail.8.rst").read_text()
    terms = _terms(page)
    accepted = set()
    for letter in string.ascii_letters:
        try:
            sendmail.parse_args([f"-{letter}", "m"])  # "m": a value, a mode, or a recipient
        except sendmail.SendmailError:
            continue
        accepted.add(letter)
    assert accepted > set("tifrF")
    for letter in accepted - {"b"}:
        assert f"-{letter}" in terms, f"-{letter} has no entry"
    for mode in "mpsv":
        sendmail.parse_args([f"-b{mode}"])
        assert f"-b{mode}" in terms
    assert "--tenant" in terms
    codes = {value for name, value in vars(sendmail).items() if name.startswith("EX_")}
    assert {str(c) for c in codes} <= terms


def test_nsmail_toml_5_has_every_key() -> None:
    sections = _sections((MAN / "nsmail.toml.5.rst").read_text(), "=")
    for table, keys in TABLE_KEYS.items():
        title = next((t for t in sections if t.strip("[]") == table), None)
        assert title is not None, f"nsmail.toml(5) has no section [{table}]"
        assert keys <= _terms(sections[title]), f"[{table}]: {keys - _terms(sections[title])}"
