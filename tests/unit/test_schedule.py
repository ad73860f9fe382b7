"""The retry schedule: backoff growth, jitter bounds, expiry, and the delay warning."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsmail.core.retry import RetryPolicy, expired, latest_attempt, next_attempt, warn_delay

POLICY = RetryPolicy()
MIDDLE = 0.5  # no jitter


def test_backoff_doubles_from_first_up_to_maximum() -> None:
    delays = [next_attempt(POLICY, 0, attempts, 1000, MIDDLE) - 1000 for attempts in range(1, 8)]
    assert delays == [300, 600, 1200, 2400, 4000, 4000, 4000]
    # Not yet tried counts as the first backoff, not less.
    assert next_attempt(POLICY, 0, 0, 1000, MIDDLE) == 1300


def test_jitter_spreads_by_ten_percent_either_way() -> None:
    assert next_attempt(POLICY, 0, 1, 1000, 0.0) == pytest.approx(1270)
    assert next_attempt(POLICY, 0, 1, 1000, 0.999999) == pytest.approx(1330, abs=0.01)
    assert next_attempt(POLICY, 0, 9, 1000, 0.0) == pytest.approx(4600)


def test_last_try_is_at_expiry() -> None:
    lifetime = POLICY.lifetime
    assert next_attempt(POLICY, 0, 40, lifetime - 100, MIDDLE) == lifetime
    assert not expired(POLICY, 0, lifetime - 0.001)
    assert expired(POLICY, 0, lifetime)
    # Called late (the caller should have bounced), it does not schedule into the past.
    assert next_attempt(POLICY, 0, 40, lifetime + 50, MIDDLE) == lifetime + 50


def test_zero_lifetime_means_one_attempt() -> None:
    policy = RetryPolicy(lifetime=0)
    assert expired(policy, 100, 100)


def test_huge_attempt_counts_do_not_overflow() -> None:
    assert next_attempt(POLICY, 0, 10**9, 0, MIDDLE) == 4000


def test_delay_warning_once_after_its_age_and_never_with_expiry() -> None:
    age = POLICY.delay_warning
    assert not warn_delay(POLICY, 0, age - 1, already_warned=False)
    assert warn_delay(POLICY, 0, age, already_warned=False)
    assert not warn_delay(POLICY, 0, age, already_warned=True)
    assert not warn_delay(POLICY, 0, POLICY.lifetime, already_warned=False)
    assert not warn_delay(RetryPolicy(delay_warning=0), 0, age, already_warned=False)
    late = RetryPolicy(lifetime=3600, delay_warning=7200)
    assert not any(warn_delay(late, 0, now, False) for now in range(0, 10000, 100))


@pytest.mark.parametrize(
    "fields",
    [{"first": 0}, {"first": 5000}, {"maximum": 100}, {"lifetime": -1}, {"delay_warning": -1}],
)
def test_policy_rejects_nonsense(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**fields)


def test_jitter_out_of_range_is_refused() -> None:
    for jitter in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="jitter"):
            next_attempt(POLICY, 0, 1, 0, jitter)


policies = st.builds(
    lambda first, factor, lifetime, warning: RetryPolicy(first, first * factor, lifetime, warning),
    st.floats(1, 3600),
    st.floats(1, 100),
    st.floats(0, 30 * 86400),
    st.floats(0, 30 * 86400),
)
times = st.floats(0, 1e9)
attempt_counts = st.integers(0, 10_000)
jitters = st.floats(0, 1, exclude_max=True)


@given(policies, times, attempt_counts, st.floats(0, 30 * 86400), jitters)
def test_next_attempt_is_bounded(
    policy: RetryPolicy, arrival: float, attempts: int, age: float, jitter: float
) -> None:
    now = arrival + age
    at = next_attempt(policy, arrival, attempts, now, jitter)
    assert at >= now
    assert at <= max(now, arrival + policy.lifetime)
    assert at <= now + policy.maximum * 1.1 + 1e-6
    if now + policy.first * 2 <= arrival + policy.lifetime:
        assert at >= now + policy.first * 0.9 - 1e-6


@given(policies, times, attempt_counts, st.floats(0, 30 * 86400), jitters, st.floats(0, 1e6))
def test_the_latest_attempt_bounds_every_next_attempt_made_before(
    policy: RetryPolicy, arrival: float, attempts: int, age: float, jitter: float, later: float
) -> None:
    """What the worker set is never cut short by the bound on planted dates."""
    made = arrival + age
    assert next_attempt(policy, arrival, attempts, made, jitter) <= latest_attempt(
        policy, made + later
    )


@given(policies, times, attempt_counts, st.floats(0, 30 * 86400), jitters)
def test_next_attempt_is_monotone_in_attempts(
    policy: RetryPolicy, arrival: float, attempts: int, age: float, jitter: float
) -> None:
    now = arrival + age
    assert next_attempt(policy, arrival, attempts, now, jitter) <= next_attempt(
        policy, arrival, attempts + 1, now, jitter
    )


@given(policies, times, st.floats(0, 60 * 86400), st.floats(0, 60 * 86400))
def test_expiry_and_warning_are_monotone_in_time(
    policy: RetryPolicy, arrival: float, age: float, later: float
) -> None:
    now = arrival + age
    if expired(policy, arrival, now):
        assert expired(policy, arrival, now + later)
        assert not warn_delay(policy, arrival, now, already_warned=False)
