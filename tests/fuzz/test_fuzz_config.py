"""Hostile configuration files, fuzzed: through `config.load` (bytes on disk, drop-ins in
tenants.d) and the real `nsmail check` command.

test_config fuzzes `parse` with text; here the input is files: non-UTF-8 bytes, NUL, junk
drop-ins, tenants clashing across files, and the keys test_config leaves out (metrics,
admin_group, DKIM, TLS, limits). Whatever the files hold, the answer is a `Config` or one
`ConfigError` line naming one of the files, and `nsmail status` still finds its run_dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from configs import toml_value
from hosting import NSMAIL
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nsmail.core.config import TABLE_KEYS, ConfigError
from nsmail.host.configfile import load, run_dir_of

HOST = {"name": "abc.test", "resolvers": ["198.51.100.53"], "user": "root"}
TENANT_UID = 47001
# A home the configuration accepts (the tenant's own, under root's directories), so the
# checks after the homes' are reached too; made by the `home` fixture.
HOME = Path(tempfile.gettempdir(), "nsmail-fuzzcfg-home")
NETWORK = {"mode": "routed"}

SCHEMA = {table: sorted(keys) for table, keys in TABLE_KEYS.items()}
HOSTILE_STRINGS = st.sampled_from(
    [
        "",
        "\x00",
        "a\nb",
        "xn--",
        "xn--a-",
        "xn--zz-zzzz.test",
        "xn--bcher-kva.test",
        "-a.test",
        "a" * 64 + ".test",
        ("a" * 63 + ".") * 5 + "test",
        "198.51.100.70",
        "198.51.100.70/24",
        "2001:db8::70",
        "::ffff:198.51.100.70",
        "0.0.0.0",
        "127.0.0.1",
        "224.0.0.1",
        "fe80::1%eth0",
        "203.0.113.1:\u00b2",  # str.isdigit() says yes to a superscript two
        "[2001:db8::1]:9425",
        "[2001:db8::1]:99999",
        "/",
        "/srv/../etc",
        "relative",
        "root",
        "nobody",
        "nogroup",
        "may",
        "verify",
        "routed",
        "bridge",
        "x" * 5000,
        "\ud800",  # a lone surrogate: not encodable as UTF-8
    ]
)
VALUES = st.one_of(
    HOSTILE_STRINGS,
    st.text(max_size=30),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**31, 2**32 - 1, 2**32, 2**63 - 1, -(2**63)]),
    st.booleans(),
    st.floats(),
    st.lists(HOSTILE_STRINGS, max_size=3),
    st.dictionaries(st.sampled_from(["a", "domain"]), HOSTILE_STRINGS, max_size=2),
)


@st.composite
def table_edits(draw: st.DrawFn, table: str) -> dict[str, object]:
    keys = st.sampled_from(SCHEMA[table]) | st.text(max_size=8)
    return draw(st.dictionaries(keys, VALUES, max_size=3))


@st.composite
def documents(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """The main file's bytes and the drop-ins' bytes: mostly good TOML with hostile edits."""
    tenant = {"domain": "bcd.test", "ipv4": "198.51.100.70", "uid": TENANT_UID}
    tenant |= {"gid": TENANT_UID, "home": str(HOME)}
    tables: dict[str, object] = {
        "host": {**HOST, **draw(table_edits("host"))},
        "network": {**NETWORK, **draw(table_edits("network"))},
        "delivery": draw(table_edits("delivery")),
        "tenant": [{**tenant, **draw(table_edits("tenant"))}],
    }
    main = "".join(f"{name} = {toml_value(value)}\n" for name, value in tables.items())
    dropins = [
        "tenant = " + toml_value([{**tenant, **draw(table_edits("tenant"))}]) + "\n"
        for _ in range(draw(st.integers(0, 2)))
    ]
    raw = [text.encode("utf-8", "surrogatepass") for text in [main, *dropins]]
    if draw(st.booleans()):
        # Bytes no TOML parser sees as text: cut, spliced or replaced outright.
        index = draw(st.integers(0, len(raw) - 1))
        junk = draw(st.binary(max_size=40) | st.sampled_from([b"\xff\xfe", b"\x00", b"[[" * 800]))
        cut = draw(st.integers(0, len(raw[index])))
        raw[index] = raw[index][:cut] + junk + raw[index][cut:]
    return raw[0], raw[1:]


@pytest.fixture(scope="module", autouse=True)
def home() -> Iterator[None]:
    HOME.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(HOME, TENANT_UID, TENANT_UID)
    try:
        yield
    finally:
        HOME.rmdir()


@pytest.fixture
def directory() -> Iterator[Path]:
    made = Path(tempfile.mkdtemp(prefix="nsmail-fuzzcfg-"))
    try:
        yield made
    finally:
        shutil.rmtree(made)


def write(directory: Path, main: bytes, dropins: list[bytes]) -> tuple[Path, list[Path]]:
    shutil.rmtree(directory)
    (directory / "tenants.d").mkdir(parents=True)
    path = directory / "nsmail.toml"
    path.write_bytes(main)
    files = [path]
    for index, data in enumerate(dropins):
        files.append(directory / "tenants.d" / f"{index:02}.toml")
        files[-1].write_bytes(data)
    return path, files


DEEP = b'[host]\nrun_dir = "/run/x"\nnested = ' + b"[" * 5000 + b"\n"
METRICS = b'[host]\nname = "abc.test"\nresolvers = ["198.51.100.53"]\nuser = "root"\n'
METRICS += 'metrics = "203.0.113.1:\u00b2"\n[network]\nmode = "routed"\n'.encode()
# Found by this test: a NUL in a group name made grp.getgrnam raise ValueError.
NUL_GROUP = b'[host]\nname = "abc.test"\nresolvers = ["198.51.100.53"]\nuser = "root"\n'
NUL_GROUP += b'admin_group = "\\u0000"\n[network]\nmode = "routed"\n'


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(documents())
@example((DEEP, []))
@example((METRICS, []))
@example((NUL_GROUP, []))
def test_load_gives_a_config_or_one_line_naming_the_file(
    directory: Path, drawn: tuple[bytes, list[bytes]]
) -> None:
    path, files = write(directory, *drawn)
    try:
        config = load(path)
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message and message.isprintable(), message
        assert any(message.startswith(f"{file}: ") for file in files), message
    else:
        assert all(t.uid != 0 and t.gid != 0 for t in config.tenants)
    # `nsmail status` reads run_dir even from a broken file, and must not fall over on it.
    assert run_dir_of(path).is_absolute()


@pytest.mark.needs("root")  # the tenant home must be the tenant's
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(documents())
@example((METRICS, []))
@example((b"\xff\xfe[host]\n", []))
def test_nsmail_check_exits_78_with_one_line(
    directory: Path, drawn: tuple[bytes, list[bytes]]
) -> None:
    path, _ = write(directory, *drawn)
    result = subprocess.run(
        [NSMAIL, "--config", str(path), "check"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    stderr = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    if result.returncode != 0:
        assert result.returncode == 78, stderr
        assert stderr.startswith(f"nsmail: {directory}/") and stderr.count("\n") == 1, stderr
