"""Backoff after failures in a row: a deferred message's retries, a dead process's restarts.

One doubling (`backoff`) under two schedules. A deferred message's (`RetryPolicy`) is like
Postfix's minimal_backoff_time, maximal_backoff_time, maximal_queue_lifetime and
delay_warning_time. Times are seconds on the caller's clock (arrival and now from the
same one); randomness comes in as `jitter`. The caller tries a due message, and after a
temporary failure bounces it if `expired`, else records `next_attempt` before anything
else. So the last try happens at expiry, not one backoff before it.

A supervised process's (`RestartPolicy`, the supervisor's workers and DNS relay) is like
Postfix master's throttle after abnormal exits: it grows only with quick deaths in a
row, so one that ran long before it died comes back at once, and one that cannot start
(or dies at once) is tried ever more rarely. It has no jitter: each process has its own.
"""

from __future__ import annotations

from dataclasses import dataclass

# Doubling past this many times cannot matter below any sane maximum, and 2.0 ** n
# would overflow for large n.
_MAX_DOUBLINGS = 64
# Spread retries by up to this fraction either way, so messages deferred together
# (one receiver down) do not all come back in the same second.
_JITTER = 0.1


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Seconds: first backoff, largest backoff, time in queue, age of the delay warning."""

    first: float = 300
    maximum: float = 4000
    lifetime: float = 5 * 86400
    delay_warning: float = 4 * 3600  # 0 sends none

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.maximum:
            raise ValueError("retry backoff needs 0 < first <= maximum")
        if self.lifetime < 0 or self.delay_warning < 0:
            raise ValueError("queue lifetime and delay warning cannot be negative")


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Seconds: first restart delay, largest one, and the run after which a death is no
    quick death (the count starts afresh)."""

    first: float
    maximum: float
    stable_after: float


def backoff(first: float, maximum: float, failures: int) -> float:
    """The wait after `failures` failures in a row: `first`, doubling up to `maximum`.

    None yet counts as one, not less.
    """
    doublings = min(max(failures - 1, 0), _MAX_DOUBLINGS)
    return min(first * 2.0**doublings, maximum)


def next_attempt(
    policy: RetryPolicy, arrival: float, attempts: int, now: float, jitter: float
) -> float:
    """When to try again after `attempts` failed attempts, `jitter` drawn from [0, 1).

    The backoff doubles from `first` up to `maximum` and is then scaled by 0.9 to 1.1;
    the result is never before `now`, and never after expiry (arrival + lifetime) unless
    `now` already is.
    """
    if not 0 <= jitter < 1:
        raise ValueError(f"jitter must be in [0, 1), not {jitter}")
    wait = backoff(policy.first, policy.maximum, attempts)
    planned = now + wait * (1 + _JITTER * (2 * jitter - 1))
    return max(now, min(planned, arrival + policy.lifetime))


def latest_attempt(policy: RetryPolicy, now: float) -> float:
    """The latest next attempt `next_attempt` can have set at or before `now`.

    A deferred message's next attempt is its file's mtime, which the tenant owns and can
    set to any time: the caller treats a later one as due at this bound, so a planted date
    never puts an attempt (or the worker's wake-up) further off than the largest backoff.
    """
    return now + policy.maximum * (1 + _JITTER)


def expired(policy: RetryPolicy, arrival: float, now: float) -> bool:
    """Whether a message that failed temporarily now has been queued long enough to bounce."""
    return now >= arrival + policy.lifetime


def warn_delay(policy: RetryPolicy, arrival: float, now: float, already_warned: bool) -> bool:
    """Whether to tell the sender now that the message is still undelivered.

    Once per message, and never when it expires anyway: the bounce says it all.
    """
    return (
        not already_warned
        and policy.delay_warning > 0
        and now >= arrival + policy.delay_warning
        and not expired(policy, arrival, now)
    )


def quick_deaths(policy: RestartPolicy, before: int, ran: float) -> int:
    """Quick deaths in a row, counting one that ran `ran` seconds (0: it never started)."""
    return before + 1 if ran < policy.stable_after else 1


def restart_delay(policy: RestartPolicy, crashes: int) -> float:
    """Seconds before the next start after `crashes` quick deaths in a row."""
    return backoff(policy.first, policy.maximum, crashes)
