"""`config.load` on real files: the main file and its drop-ins in order, with homes given
to their tenants (as root; parsing and validation are tests/unit/test_config.py's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nsmail.host.configfile import load


@pytest.mark.needs("root")  # gives the homes to their tenants
def test_load_reads_main_file_and_sorted_dropins(tmp_path: Path) -> None:
    main = tmp_path / "nsmail.toml"
    main.write_text(
        '[host]\nname = "abc.test"\nresolvers = ["198.51.100.53"]\nuser = "root"\n'
        '[network]\nmode = "routed"\n'
    )
    dropins = tmp_path / "tenants.d"
    dropins.mkdir()
    homes = {}
    for name, uid in (("b", 65533), ("a", 65534)):
        homes[name] = tmp_path / f"home-{name}"
        homes[name].mkdir()
        os.chown(homes[name], uid, uid)
    # nobody has one uid, so the second tenant names it numerically with another.
    (dropins / "b.toml").write_text(
        f'[[tenant]]\ndomain = "b.test"\nipv4 = "203.0.113.2"\nuid = 65533\ngid = 65533\n'
        f'home = "{homes["b"]}"\n'
    )
    (dropins / "a.toml").write_text(
        f'[[tenant]]\ndomain = "a.test"\nipv6 = "2001:db8:51::1"\nuser = "nobody"\n'
        f'home = "{homes["a"]}"\n'
    )
    (dropins / ".#a.toml").write_text("not toml at all [")
    (dropins / "notes.txt").write_text("not toml at all [")

    config = load(main)

    assert config.path == main
    assert (config.host.user, config.host.uid) == ("root", 0)
    assert [(t.domain, t.uid, t.home, t.source) for t in config.tenants] == [
        ("a.test", 65534, homes["a"], str(dropins / "a.toml")),
        ("b.test", 65533, homes["b"], str(dropins / "b.toml")),
    ]
