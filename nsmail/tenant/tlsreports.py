"""TLS reports (RFC 8460) of a tenant's sessions: counted per receiver's policy each day,
and mailed the next day, through the tenant's own queue, to the receivers that ask.

`record` counts one session (nsmail.tenant.remote calls it as each session opens or
fails); the day's tally is kept in the spool (`tlsrpt/<day>`, saved every SAVE_EVERY
seconds and when the worker stops, so a worker that exits when idle or is killed loses
at most that much). `send_due` turns each earlier day's tally into one report per policy
domain whose `_smtp._tls` record names a `mailto:` rua, queued like a bounce (the null
sender, DKIM-signed when the tenant has a key), then removes the tally: a crash in
between repeats a report, never loses one. Off unless `[delivery] tls_reports = true`.

Security: runs as the tenant in its jail; the tally files are the tenant's own and are
parsed strictly (nsmail.core.tlsrpt.load), the records come from receivers' zones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from nsmail.core import dkim, tlsrpt
from nsmail.core.message import Message
from nsmail.core.queuefile import Envelope, frame
from nsmail.core.smtp import Failure, Stage
from nsmail.tenant import statefile
from nsmail.tenant.resolver import Resolver, texts
from nsmail.tenant.spool import INCOMING, Spool, new_queue_id

log = logging.getLogger("nsmail.tenant.tlsreports")

DIRECTORY = "tlsrpt"  # in the tenant's spool
SAVE_EVERY = 60.0  # seconds between saves of the day's tally
MAX_FILE = 4 << 20  # bytes of a tally file read


def result_of(failure: Failure) -> str:
    """The RFC 8460 4.3 result type of a session a policy failed."""
    words = failure.words.lower()
    if failure.stage is not Stage.TLS:
        return tlsrpt.STARTTLS_NOT_SUPPORTED  # not offered, or refused (RFC 8460 4.3.1)
    if "hostname mismatch" in words:
        return tlsrpt.CERTIFICATE_HOST_MISMATCH
    if "expired" in words:
        return tlsrpt.CERTIFICATE_EXPIRED
    if "certificate verify failed" in words:
        return tlsrpt.CERTIFICATE_NOT_TRUSTED
    if "tlsa lookup" in words:
        return tlsrpt.DNSSEC_INVALID
    return tlsrpt.VALIDATION_FAILURE  # a DANE mismatch, an MX the policy does not name


class TlsReports:
    """One tenant's TLS tally and reports."""

    def __init__(
        self,
        spool: Spool,
        domain: str,
        resolver: Resolver,
        signer: dkim.Signer | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._dir = spool.root / DIRECTORY
        self._spool = spool
        self._domain = domain
        self._resolver = resolver
        self._signer = signer
        self._clock = clock
        # Read at the first session, in the jail: made before it, the spool's path would
        # be read on the host's file system.
        self._tally: tlsrpt.Tally | None = None
        self._saved = clock()

    def record(self, policy: tlsrpt.Policy, failure: tlsrpt.Detail | None) -> None:
        today = tlsrpt.day_of(self._clock())
        if self._tally is not None and self._tally.day != today:
            self.save()
            self._tally = None
        if self._tally is None:
            self._tally = self._load(self._dir / today) or tlsrpt.Tally(today)
        self._tally.add(policy, failure)

    def save_if_due(self) -> None:
        if self._clock() - self._saved >= SAVE_EVERY:
            self.save()

    def save(self) -> None:
        self._saved = self._clock()
        tally = self._tally
        if tally is None or not tally.policies:
            return
        try:
            statefile.replace(self._dir / tally.day, tlsrpt.dump(tally))
        except OSError as e:
            log.warning("%s: the TLS report tally was not saved: %s", self._domain, e)

    def due(self) -> list[Path]:
        """The tallies of days before today, not yet reported."""
        today = tlsrpt.day_of(self._clock())
        try:
            names = sorted(p for p in self._dir.iterdir() if not p.name.startswith("."))
        except OSError:
            return []
        return [p for p in names if p.name < today]

    async def send_due(self) -> None:
        """Each earlier day's reports into the queue, then its tally removed."""
        for path in self.due():
            tally = self._load(path)
            if tally is not None:
                for domain in tally.domains():
                    await self._send(tally, domain)
            path.unlink(missing_ok=True)

    async def _send(self, tally: tlsrpt.Tally, domain: str) -> None:
        recipients = await self._rua(domain)
        if not recipients:
            return
        now = self._clock()
        queue_id = new_queue_id(now)
        report_id = f"{tally.day}.{queue_id}@{self._domain}"
        postmaster = f"postmaster@{self._domain}"
        document = tlsrpt.report(
            tally, domain, organization=self._domain, contact=postmaster, report_id=report_id
        )
        mail = Message.of(
            tlsrpt.message(
                document,
                domain=domain,
                submitter=self._domain,
                sender=postmaster,
                recipients=recipients,
                report_id=report_id,
                day=tally.day,
                now=datetime.fromtimestamp(now).astimezone(),
                unique=queue_id,
            )
        )
        if self._signer is not None:
            mail = self._signer.sign(mail, now)
        # The null sender, as for a bounce: a report that cannot be delivered makes none.
        envelope = Envelope(sender="", recipients=recipients, arrival=now, cleaned=True)
        self._spool.put(INCOMING, queue_id, frame(envelope, mail.raw()))
        log.info("%s: TLS report %s for %s to %s", queue_id, tally.day, domain, recipients)

    async def _rua(self, domain: str) -> tuple[str, ...]:
        return tlsrpt.parse_record(await texts(self._resolver, f"_smtp._tls.{domain}")) or ()

    def _load(self, path: Path) -> tlsrpt.Tally | None:
        data = statefile.read(path, MAX_FILE)
        return None if data is None else tlsrpt.load(data)
