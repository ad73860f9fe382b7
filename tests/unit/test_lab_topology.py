"""The lab topology's pure parts and its record, without root: which namespaces a prefix
owns, inventories, and the sweep of what dead runs left (in directories only)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from nsmail.lab.topology import Inventory, Names, Proc, save, sweep


def test_a_fixed_prefix_owns_its_two_namespaces_and_its_tenants_only() -> None:
    demo = Names("demo")
    assert [n for n in ("demohost", "demonet", "demo-bcd.test") if demo.owns(n)] == [
        "demohost",
        "demonet",
        "demo-bcd.test",
    ]
    # Someone else's namespaces that merely begin with the same letters.
    assert not any(demo.owns(n) for n in ("demo", "demos", "demohost2", "demo2net", "dem"))


def test_a_random_prefix_owns_every_name_it_begins() -> None:
    lab = Names("t1a2b", exclusive=True)
    assert all(lab.owns(n) for n in ("t1a2bhost", "t1a2bnet", "t1a2b-bcd.test", "t1a2bpf"))
    assert not any(lab.owns(n) for n in ("t1a2", "t1a2chost", "demohost"))


def test_an_empty_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        Names("")


def test_an_inventory_reads_back_as_written() -> None:
    inventory = Inventory(
        Names("t1a2b", exclusive=True),
        Proc.of("pytest", os.getpid()),
        tmp="/var/cache/nsmail-tests/lab-t1a2b-x",
        kept=True,
        processes=(Proc("dns", 10, 20), Proc("supervisor", 11, 21)),
    )
    assert Inventory.from_json(inventory.to_json()) == inventory


@pytest.mark.parametrize(
    "text", ["", "{", "[]", '{"names": {"prefix": "demo"}}', '{"names": 1, "owner": 2}']
)
def test_a_damaged_inventory_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        Inventory.from_json(text)


def test_a_reused_pid_is_not_the_process_recorded() -> None:
    me = Proc.of("pytest", os.getpid())
    assert me.alive()
    assert not Proc(me.role, me.pid, me.start + 1).alive()
    assert not Proc("none", 0, 0).alive()


def test_sweep_removes_what_dead_owners_left_and_only_that(tmp_path: Path) -> None:
    # Prefixes that no namespace begins with: the sweep has only directories to remove.
    gone, shared = (Names("t" + secrets.token_hex(6), exclusive=True) for _ in range(2))
    me = Proc.of("pytest", os.getpid())
    dead = Proc("pytest", me.pid, me.start + 1)  # this pid, once, for another process
    owners = {"dead": (gone, dead), "live": (shared, me), "dead beside live": (shared, dead)}
    paths = []
    for label, (names, owner) in [*owners.items(), ("kept", (gone, dead))]:
        (tmp_path / label).mkdir()
        paths.append(tmp_path / label / "inventory.json")
        save(Inventory(names, owner, str(tmp_path / label), kept=label == "kept"), paths[-1])
    for label, text in (("half-made", None), ("not a lab's", "1234 5678\n")):
        (tmp_path / label).mkdir()
        paths.append(tmp_path / label / "inventory.json")
        if text is not None:
            paths[-1].write_text(text)

    assert sweep(paths) == sorted([gone.prefix, shared.prefix])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "half-made",
        "kept",
        "live",
        "not a lab's",
    ]
    assert sweep(paths) == []
