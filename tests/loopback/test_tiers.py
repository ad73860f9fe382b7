"""The tiers plugin (tests/support/tiers.py), run by a pytest of its own on a tiny tree of
tests without root: a test that needs root is skipped with its reason, but fails under
CI=true; each test carries its tier's mark; a test outside the tiers is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiers
from sites import unused_ids

TREE = {
    "unit/test_pure.py": "def test_pure():\n    pass\n",
    "root/test_namespaces.py": "def test_namespaces():\n    pass\n",
    "loopback/test_marked.py": (
        "import pytest\n\n\n"
        '@pytest.mark.needs("nsmail-no-such-program")\n'
        "def test_marked():\n    pass\n"
    ),
    "loopback/test_fixture.py": (
        "import pytest\nfrom needs import require\n\n\n"
        '@pytest.fixture\ndef as_root():\n    require("root")\n\n\n'
        "def test_fixture(as_root):\n    pass\n"
    ),
}
# Each test of TREE but the unit one, and why it cannot run without root.
UNMET = (
    ("root/test_namespaces.py::test_namespaces", "needs root"),
    ("loopback/test_marked.py::test_marked", "needs nsmail-no-such-program, which is not"),
    ("loopback/test_fixture.py::test_fixture", "needs root"),
)
# The other uid cannot write where the tree is: no cache, no hypothesis database.
NOTHING_WRITTEN = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")


@pytest.fixture
def tree() -> Iterator[Path]:
    """The tiny tree, in a directory any uid can read."""
    top = Path(tempfile.mkdtemp(prefix="nsmail-tiers-"))
    try:
        top.chmod(0o755)
        for name, text in TREE.items():
            path = top / "tests" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        yield top
    finally:
        shutil.rmtree(top)


def run_pytest(top: Path, *args: str, ci: bool) -> subprocess.CompletedProcess[str]:
    """pytest with the tiers plugin on `top`'s tests, as an unused uid when we are root."""
    uid = unused_ids(1)[0] if os.geteuid() == 0 else None
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(tiers.__file__).parent)}
    env |= {"PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}  # -v shows whole reasons
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tiers", *NOTHING_WRITTEN, *args],
        cwd=top,
        env={**env, "CI": "true"} if ci else env,
        user=uid,
        group=uid,
        extra_groups=None if uid is None else [],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_ci_an_unmet_need_skips_with_its_reason(tree: Path) -> None:
    result = run_pytest(tree, "tests", "-v", ci=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 3 skipped" in result.stdout
    for test, reason in UNMET:
        assert f"tests/{test} SKIPPED ({reason}" in result.stdout


def test_under_ci_an_unmet_need_fails(tree: Path) -> None:
    result = run_pytest(tree, "tests", ci=True)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "1 passed, 3 errors" in result.stdout
    for test, reason in UNMET:
        assert f"ERROR tests/{test} - Failed: {reason}" in result.stdout
    assert "under CI=true a test may not be skipped" in result.stdout


def test_a_tier_is_picked_by_its_mark(tree: Path) -> None:
    # A CI job of the unit tier alone passes without root: what it leaves out cannot fail.
    result = run_pytest(tree, "tests", "-m", "unit", ci=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 3 deselected" in result.stdout
    result = run_pytest(tree, "tests", "-m", "not unit and not loopback", ci=False)
    assert "1 skipped, 3 deselected" in result.stdout


def test_a_test_outside_the_tiers_is_refused(tree: Path) -> None:
    (tree / "tests" / "misc").mkdir()
    (tree / "tests" / "misc" / "test_loose.py").write_text("def test_loose():\n    pass\n")
    result = run_pytest(tree, "tests", ci=False)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "test_loose.py: a test file belongs directly in one of tests/unit," in result.stderr
