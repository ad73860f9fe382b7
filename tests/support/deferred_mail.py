"""A deferred message as the queue tools show it: three recipients, one greylisted, one
behind a refused connection, one with no reason recorded (written before it was known)."""

from __future__ import annotations

from nsmail.core.queuefile import Deferral, Envelope

MX = "mx.x.test[2001:db8::25]:25"
GREYLISTED = Deferral("bob@x.test", "4.7.1", "4.7.1 greylisted \x1b[2J", 451, MX, 1.7e9 + 60)
REFUSED = Deferral("carol@x.test", "4.4.2", f"4.4.2 {MX}: connection refused", None, "", 1.7e9 + 60)
WAITING = Envelope(
    "alice@a.test",
    ("bob@x.test", "carol@x.test", "dave@x.test"),
    arrival=1.7e9,
    attempts=1,
    deferrals=(GREYLISTED, REFUSED),
)
