"""MX answers to ordered delivery targets."""

from __future__ import annotations

import random

from nsmail.core.routing import NullMX, Targets, route


def test_ascending_preference_with_names_normalised() -> None:
    mx = [(20, "B.rcpt.test."), (10, "a.rcpt.test."), (30, "c.rcpt.test")]
    assert route("rcpt.test", mx, random.Random(1)) == Targets(
        hosts=("a.rcpt.test", "b.rcpt.test", "c.rcpt.test"), implicit=False
    )


def test_equal_preferences_are_shuffled_by_the_given_rng() -> None:
    mx = [(10, f"mx{i}.rcpt.test.") for i in range(6)] + [(5, "first.rcpt.test.")]
    orders = set()
    for seed in range(20):
        result = route("rcpt.test", mx, random.Random(seed))
        assert isinstance(result, Targets)
        assert result.hosts[0] == "first.rcpt.test"
        assert sorted(result.hosts[1:]) == [f"mx{i}.rcpt.test" for i in range(6)]
        orders.add(result.hosts)
    assert len(orders) > 1
    assert route("rcpt.test", mx, random.Random(7)) == route("rcpt.test", mx, random.Random(7))


def test_duplicate_exchanges_are_tried_once() -> None:
    result = route("rcpt.test", [(10, "mx.rcpt.test."), (20, "MX.rcpt.test.")], random.Random())
    assert result == Targets(hosts=("mx.rcpt.test",), implicit=False)


def test_no_mx_means_the_domain_itself() -> None:
    assert route("Rcpt.Test.", None, random.Random()) == Targets(("rcpt.test",), implicit=True)
    assert route("rcpt.test", [], random.Random()) == Targets(("rcpt.test",), implicit=True)


def test_null_mx() -> None:
    assert route("rcpt.test", [(0, ".")], random.Random()) == NullMX()


def test_null_mx_beside_real_exchanges_is_ignored() -> None:
    result = route("rcpt.test", [(0, "."), (10, "mx.rcpt.test.")], random.Random())
    assert result == Targets(hosts=("mx.rcpt.test",), implicit=False)
