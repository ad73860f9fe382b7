"""The trust zones hold: every import in nsmail/, read with ast, goes the way the zones allow.

nsmail/ is one package per trust zone, and each package's `__init__` says who runs it and
what it trusts. An import is an arrow from one zone to another; these tests read every
module's imports (at module level, inside functions, under TYPE_CHECKING and in except
clauses) and fail on each arrow against the zones, naming it as file:line: zone -> zone.

The rules, and why they are cut where they are:
- core imports nothing of nsmail but core, and nothing that does IO: no os, socket,
  clock, processes, threads, terminals or third-party IO (dnspython, netlink, prctl).
  `cryptography` is pure computation and allowed (DKIM signing, key checks). pathlib is
  allowed for its `Path` values (the configuration's paths, which the IO shells use),
  never for its IO: core calls no pathlib method that touches the file system, nor
  open(), print() or input(), nor a clock (`datetime.now()` and the like).
- submit imports submit and core; at start (what `nsmail-sendmail` imports on every
  run, from `nsmail.submit.sendmail` on) only submit, core modules and modules built into
  the interpreter or frozen in it (the same measure `tests/test_sendmail.py` applies to a
  real run). Inside functions only: `nsmail.host.configfile` (the configuration without a
  current cache) and tenant (`-bp` lists the caller's own queue with the tenant's code).
- host imports core, host and submit; tenant imports core, tenant and submit (submit's
  maildrop is the durable-write layer sendmail and the spool share); never root, host,
  commands or lab. root imports all but commands and lab; lab all but commands;
  commands may import all.
"""

from __future__ import annotations

import _imp
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

NSMAIL = Path(__file__).resolve().parents[2] / "nsmail"

ZONES = ("core", "submit", "host", "tenant", "root", "lab", "commands")


@dataclass(frozen=True, slots=True)
class Rule:
    imports: frozenset[str]  # zones, or zone.module, it may import anywhere
    lazily: frozenset[str] = frozenset()  # ... only inside functions


def _rule(imports: str, lazily: str = "") -> Rule:
    return Rule(frozenset(imports.split()), frozenset(lazily.split()))


RULES = {
    "core": _rule("core"),
    "submit": _rule("submit core", lazily="tenant host.configfile"),
    "host": _rule("host core submit"),
    "tenant": _rule("tenant core submit"),
    "root": _rule("root core tenant host submit"),
    "lab": _rule("lab core tenant host submit root"),
    "commands": _rule(" ".join(ZONES)),
}
SUBMISSION = "nsmail.submit.sendmail"  # what `nsmail-sendmail` runs, once per message

# Modules that do IO (files, network, processes, terminals, the clock): none in core.
IO_MODULES = frozenset(
    {
        *("os", "io", "sys", "socket", "ssl", "select", "selectors", "asyncio", "time"),
        *("subprocess", "signal", "threading", "multiprocessing", "concurrent", "ctypes"),
        *("shutil", "tempfile", "glob", "fcntl", "mmap", "resource", "pwd", "grp", "zoneinfo"),
        *("termios", "tty", "pty", "logging", "smtplib", "http", "urllib", "socketserver"),
        *("site", "importlib", "secrets", "uuid", "locale", "getpass", "platform"),
        *("dns", "pyroute2", "prctl", "aiosmtpd", "prometheus_client", "spf"),
    }
)
# pathlib's methods that touch the file system (`lstat` aside: core calls the lstat of
# its injected `SystemLookup`, and a Path's own lstat is caught as a Path method the
# day core calls one under another name).
PATH_IO_METHODS = frozenset(
    {
        *("open", "read_text", "read_bytes", "write_text", "write_bytes", "stat", "exists"),
        *("is_dir", "is_file", "is_symlink", "iterdir", "glob", "rglob", "mkdir", "rmdir"),
        *("unlink", "touch", "chmod", "resolve", "readlink", "symlink_to", "hardlink_to"),
        *("samefile", "expanduser", "absolute", "cwd", "home"),
    }
)
IO_BUILTINS = frozenset({"open", "print", "input"})
CLOCK_METHODS = frozenset({"now", "utcnow", "today"})  # datetime.now(), date.today()


@dataclass(frozen=True, slots=True)
class Import:
    """One imported module, where, and whether it is imported only later, if at all."""

    path: Path
    line: int
    source: str  # the importing module
    target: str  # the imported module (or package)
    lazy: bool  # inside a function, a TYPE_CHECKING block or an except clause


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for p in sorted(root.rglob("*.py"))}


def zone_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "nsmail" else None


class _Reader(ast.NodeVisitor):
    """Every import of one module, and the calls that betray IO."""

    def __init__(self, root: Path, path: Path, known: dict[str, Path]) -> None:
        self.root, self.path, self.known = root, path, known
        self.source = module_name(root, path)
        self.package = self.source if path.name == "__init__.py" else self.source.rpartition(".")[0]
        self.depth = 0  # of functions, TYPE_CHECKING blocks and except clauses around it
        self.imports: list[Import] = []
        self.calls: list[tuple[int, str]] = []  # (line, what) of IO calls

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    # An except clause's import is a fallback, which this interpreter does not run.
    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ExceptHandler = _nested

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            self._nested(node)  # never run: no import at start
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join([*package, *([base] if base else [])])
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(node, submodule if submodule in self.known else base)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        if isinstance(function, ast.Name) and function.id in IO_BUILTINS:
            self.calls.append((node.lineno, f"{function.id}()"))
        elif isinstance(function, ast.Attribute) and function.attr in PATH_IO_METHODS:
            self.calls.append((node.lineno, f".{function.attr}() (pathlib IO)"))
        elif isinstance(function, ast.Attribute) and function.attr in CLOCK_METHODS:
            self.calls.append((node.lineno, f".{function.attr}() (the clock)"))
        self.generic_visit(node)

    def _add(self, node: ast.stmt, target: str) -> None:
        self.imports.append(Import(self.path, node.lineno, self.source, target, self.depth > 0))


def read(root: Path) -> tuple[list[Import], dict[str, list[tuple[int, str]]]]:
    """Every import under `root` (a package directory), and each module's IO calls."""
    known = modules(root)
    imports: list[Import] = []
    calls: dict[str, list[tuple[int, str]]] = {}
    for module, path in known.items():
        reader = _Reader(root, path, known)
        reader.visit(ast.parse(path.read_text(), str(path)))
        imports += reader.imports
        calls[module] = reader.calls
    return imports, calls


def _where(root: Path, found: Import) -> str:
    return f"{found.path.relative_to(root.parent)}:{found.line}"


def _allows(entries: frozenset[str], target: str) -> bool:
    return any(target == f"nsmail.{e}" or target.startswith(f"nsmail.{e}.") for e in entries)


def wrong_arrows(root: Path) -> list[str]:
    """Each import against the zones, as `file:line: zone -> zone (module)`."""
    imports, calls = read(root)
    wrong = []
    for found in imports:
        source, target = zone_of(found.source), zone_of(found.target)
        if source is None or target is None:  # nsmail itself (a docstring), or not nsmail
            continue
        rule = RULES[source]
        if _allows(rule.imports, found.target):
            continue
        if found.lazy and _allows(rule.lazily, found.target):
            continue
        only_lazily = " (only inside a function)" if _allows(rule.lazily, found.target) else ""
        wrong.append(f"{_where(root, found)}: {source} -> {target} ({found.target}){only_lazily}")
    for found in imports:
        if zone_of(found.source) == "core" and found.target.split(".")[0] in IO_MODULES:
            wrong.append(f"{_where(root, found)}: core -> IO ({found.target})")
    for module, seen in calls.items():
        if zone_of(module) == "core":
            path = modules(root)[module].relative_to(root.parent)
            wrong += [f"{path}:{line}: core -> IO ({what})" for line, what in seen]
    return wrong + _heavy_submission(root, imports)


def _heavy_submission(root: Path, imports: list[Import]) -> list[str]:
    """What a submission imports at start beyond submit, core and the interpreter's own."""
    at_start: dict[str, list[Import]] = {}
    for found in imports:
        if not found.lazy:
            at_start.setdefault(found.source, []).append(found)
    heavy = []
    seen: set[str] = set()
    pending = [SUBMISSION]
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        parents = [".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 1)]
        pending += parents
        for found in at_start.get(module, []):
            if zone_of(found.target) in ("submit", "core"):
                pending.append(found.target)
            elif found.target.startswith("nsmail") or not _built_in(found.target):
                where = _where(root, found)
                heavy.append(f"{where}: submission start -> {found.target} (not lean)")
    return heavy


def _built_in(module: str) -> bool:
    # __future__ is a compiler directive as much as a module: every module imports it.
    return module == "__future__" or module in sys.builtin_module_names or _imp.is_frozen(module)


def package_docstrings(root: Path) -> list[str]:
    """Each zone package whose docstring does not say in two lines who runs it and what it
    trusts (the paragraph after its one-line summary)."""
    missing = []
    for zone in ZONES:
        init = root / zone / "__init__.py"
        text = ast.get_docstring(ast.parse(init.read_text())) or ""
        paragraphs = text.split("\n\n")
        says = paragraphs[1] if len(paragraphs) > 1 else ""
        lines = says.splitlines()
        if not (1 <= len(lines) <= 2 and "run" in says.lower() and "trust" in says.lower()):
            missing.append(f"{init.relative_to(root.parent)}: {says or text!r}")
    return missing


# --- the real tree ----------------------------------------------------------------------


def test_no_import_goes_against_the_zones() -> None:
    assert wrong_arrows(NSMAIL) == []


def test_every_zone_says_who_runs_it_and_what_it_trusts() -> None:
    assert package_docstrings(NSMAIL) == []


def test_the_reader_sees_the_real_tree() -> None:
    """A reader that found nothing would pass the tests above."""
    imports, _ = read(NSMAIL)
    arrows = {(zone_of(i.source), zone_of(i.target)) for i in imports if zone_of(i.target)}
    assert {("root", "tenant"), ("commands", "root"), ("tenant", "submit")} <= arrows
    assert any(i.lazy and i.source == SUBMISSION for i in imports)


# --- a planted tree: the checker catches what it must ------------------------------------


def _plant(root: Path, files: dict[str, str]) -> None:
    for zone in ZONES:
        (root / zone).mkdir(parents=True, exist_ok=True)
        (root / zone / "__init__.py").write_text(f'"""The {zone}.\n\nRuns; trusts."""\n')
    (root / "__init__.py").write_text('"""nsmail."""\n')
    for name, text in files.items():
        (root / name).write_text(text)


def test_the_checker_names_each_wrong_arrow(tmp_path: Path) -> None:
    root = tmp_path / "nsmail"
    _plant(
        root,
        {
            "core/ok.py": "import re\nfrom nsmail.core import text\nfrom pathlib import Path\n",
            "core/text.py": "",
            "core/lean.py": "try:\n    from _sha256 import x\nexcept ImportError:\n    import re\n",
            "core/heavy.py": "import re\n",
            "core/wrong.py": "from nsmail.tenant.spool import X\n\ndef f():\n    import os\n",
            "core/io.py": "def f(p):\n    p.read_text()\n    print(open(p))\n",
            "core/clock.py": "from datetime import datetime\nWHEN = datetime.now()\n",
            "tenant/spool.py": "from nsmail.submit import maildrop\nfrom ..core import text\n",
            "tenant/bad.py": "def f():\n    from ..root import jail\n",
            "root/jail.py": "from nsmail.host import relay\nfrom nsmail.lab import demo\n",
            "host/relay.py": "from nsmail.tenant import spool\n",
            "lab/demo.py": "import nsmail.root.jail\nfrom nsmail.commands import cli\n",
            "commands/cli.py": "from nsmail.lab import demo\nfrom nsmail.root import jail\n",
            "submit/maildrop.py": "import os\nfrom nsmail.core import lean\n",
            "submit/sendmail.py": (
                "from __future__ import annotations\n"
                "import pwd\n"
                "from nsmail.submit import maildrop\n"
                "from nsmail.core import heavy\n"
                "from nsmail.host.configfile import load\n"
                "TYPE_CHECKING = False\n"
                "if TYPE_CHECKING:\n"
                "    from nsmail.tenant import spool\n"
                "def f():\n"
                "    from nsmail.tenant import spool\n"
                "    from nsmail.host.configfile import load\n"
                "    from nsmail.root import jail\n"
            ),
        },
    )
    assert sorted(wrong_arrows(root)) == sorted(
        [
            "nsmail/core/wrong.py:1: core -> tenant (nsmail.tenant.spool)",
            "nsmail/core/wrong.py:4: core -> IO (os)",
            "nsmail/core/io.py:2: core -> IO (.read_text() (pathlib IO))",
            "nsmail/core/io.py:3: core -> IO (print())",
            "nsmail/core/io.py:3: core -> IO (open())",
            "nsmail/core/clock.py:2: core -> IO (.now() (the clock))",
            "nsmail/tenant/bad.py:2: tenant -> root (nsmail.root.jail)",
            "nsmail/root/jail.py:2: root -> lab (nsmail.lab.demo)",
            "nsmail/host/relay.py:1: host -> tenant (nsmail.tenant.spool)",
            "nsmail/lab/demo.py:2: lab -> commands (nsmail.commands.cli)",
            "nsmail/submit/sendmail.py:5: submit -> host (nsmail.host.configfile)"
            " (only inside a function)",
            "nsmail/submit/sendmail.py:12: submit -> root (nsmail.root.jail)",
            "nsmail/core/heavy.py:1: submission start -> re (not lean)",
            "nsmail/submit/sendmail.py:5: submission start -> nsmail.host.configfile (not lean)",
        ]
    )


def test_the_checker_wants_two_lines_of_who_and_trust(tmp_path: Path) -> None:
    root = tmp_path / "nsmail"
    _plant(root, {})
    (root / "host" / "__init__.py").write_text('"""The DNS relay."""\n')
    (root / "lab" / "__init__.py").write_text('"""The lab.\n\nRun by root.\nIt is\nlong."""\n')
    assert [line.split(":")[0] for line in package_docstrings(root)] == [
        "nsmail/host/__init__.py",
        "nsmail/lab/__init__.py",
    ]
