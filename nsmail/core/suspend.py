"""The automatic brake: whether a tenant's last hour of outcomes calls for suspending it.

Pure. `suspend_rate = "30% of 50"` ([delivery], or a tenant's own) reads: once the last
hour holds at least 50 outcomes, and more than 30% of them are deferrals or bounces,
the tenant is suspended. The outcomes are those `nsmail status` shows for the last hour,
one per recipient and attempt (so a message deferred twice counts twice): what a
receiver said to this tenant's mail, which is what a spamming web app or a stale list
gives away first, and what gets a hosting machine's addresses blocklisted. The
supervisor applies it to each worker report (`nsmail.root.supervisor`); a suspended
tenant's mail is held until `nsmail tenant resume`, and its worker then counts afresh.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_RULE = re.compile(r"\s*(\d{1,3}(?:\.\d+)?)\s*%\s+of\s+(\d{1,9})\s*")


@dataclass(frozen=True, slots=True)
class SuspendRule:
    percent: float  # more than this share of failures (0-100) suspends
    minimum: int  # outcomes the last hour must hold before the share counts

    def __str__(self) -> str:
        return f"{self.percent:g}% of {self.minimum}"


def parse(text: str) -> SuspendRule | None:
    """ "30% of 50" as a rule; None if the text is not one."""
    found = _RULE.fullmatch(text)
    if found is None:
        return None
    percent, minimum = float(found.group(1)), int(found.group(2))
    if not 0 <= percent < 100 or minimum < 1:
        return None
    return SuspendRule(percent, minimum)


def exceeded(rule: SuspendRule, hour: Mapping[str, int]) -> str | None:
    """Why the last hour's outcomes (sent, deferred, bounced) suspend the tenant, or None."""
    failed = hour.get("deferred", 0) + hour.get("bounced", 0)
    total = failed + hour.get("sent", 0)
    if total < rule.minimum or failed * 100 <= rule.percent * total:
        return None
    return (
        f"{failed} of {total} outcomes in the last hour were deferrals or bounces,"
        f" over suspend_rate {rule}"
    )
