"""SMTP TLS Reporting (RFC 8460): the `_smtp._tls` record, a day's tally of TLS sessions
per policy, the aggregate report (JSON) and the mail that carries it.

Pure: sessions, records and the time in; JSON and message bytes out. `parse_record` reads
a receiver's record (3), `Tally` counts successes and failures per policy and failure
detail (4.3, 4.4) and survives a round trip through `dump`/`load` (the worker keeps one
per day in its spool), `report` gives the JSON report of one policy domain (4.4), and
`message` the mail to a `mailto:` rua (5.3: multipart/report, report-type=tlsrpt, the
report gzipped). The worker's side is `nsmail.tenant.tlsreports`.

Security: records come from receivers' zones, the tally file from the tenant's spool:
both are parsed with bounds, and what does not parse is dropped (no report, or a fresh
tally), never an exception. Names and addresses reach the report only as JSON strings.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

# RFC 8460 4.3 result types nsmail reports.
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
DNSSEC_INVALID = "dnssec-invalid"
RESULT_TYPES = frozenset(
    {
        STARTTLS_NOT_SUPPORTED,
        CERTIFICATE_HOST_MISMATCH,
        CERTIFICATE_EXPIRED,
        CERTIFICATE_NOT_TRUSTED,
        VALIDATION_FAILURE,
        DNSSEC_INVALID,
    }
)
POLICY_TYPES = frozenset({"sts", "tlsa", "no-policy-found"})  # RFC 8460 4.4
MAX_POLICIES = 1000  # policy entries a day's tally holds; more are not counted
MAX_DETAILS = 100  # failure details per policy
_TEXT = 300  # characters of any string kept
_MAILTO = re.compile(r"mailto:([^@\s,;<>]+@[A-Za-z0-9.-]+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Policy:
    """A policy as RFC 8460 4.4 names it: what applied to sessions to a domain."""

    domain: str  # the recipient (policy) domain
    type: str  # "sts", "tlsa" or "no-policy-found"
    strings: tuple[str, ...] = ()  # the policy's lines, or the TLSA records as text
    mx: tuple[str, ...] = ()  # MTA-STS: the policy's mx patterns


@dataclass(frozen=True, slots=True)
class Detail:
    """One kind of failure (4.3), where it happened."""

    result: str  # one of RESULT_TYPES
    sending_ip: str
    mx_host: str
    receiving_ip: str


@dataclass
class _Counts:
    successes: int = 0
    failures: dict[Detail, int] = field(default_factory=dict)


@dataclass
class Tally:
    """A day's sessions (UTC), per policy."""

    day: str  # "YYYY-MM-DD"
    policies: dict[Policy, _Counts] = field(default_factory=dict)

    def add(self, policy: Policy, failure: Detail | None) -> None:
        """One session under `policy`: a success, or `failure`."""
        counts = self.policies.get(policy)
        if counts is None:
            if len(self.policies) >= MAX_POLICIES:
                return
            counts = self.policies[policy] = _Counts()
        if failure is None:
            counts.successes += 1
        elif failure in counts.failures or len(counts.failures) < MAX_DETAILS:
            counts.failures[failure] = counts.failures.get(failure, 0) + 1

    def domains(self) -> list[str]:
        return sorted({p.domain for p in self.policies})


def day_of(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def parse_record(texts: Sequence[str]) -> tuple[str, ...] | None:
    """The `mailto:` addresses of the `_smtp._tls.<domain>` record (RFC 8460 3), or None:
    exactly one record must start "v=TLSRPTv1", and it must name a rua. (https: ruas are
    not used: nsmail reports by mail only.)"""
    records = [t for t in texts if t.startswith("v=TLSRPTv1")]
    if len(records) != 1:
        return None
    parts = (part.partition("=") for part in records[0].split(";"))
    fields = {key.strip(): value.strip() for key, _, value in parts if key.strip()}
    if fields.get("v") != "TLSRPTv1" or "rua" not in fields:
        return None
    found = [_MAILTO.fullmatch(uri.strip()) for uri in fields["rua"].split(",")]
    return tuple(m.group(1) for m in found if m is not None)


# --- the tally on disk --------------------------------------------------------------------


def dump(tally: Tally) -> bytes:
    policies = [
        {
            "policy": _policy_json(policy),
            "successes": counts.successes,
            "failures": [[*_detail_json(d).values(), n] for d, n in counts.failures.items()],
        }
        for policy, counts in tally.policies.items()
    ]
    return json.dumps({"day": tally.day, "policies": policies}).encode()


def load(data: bytes) -> Tally | None:
    """The tally in a file `dump` wrote; None for anything else (the spool is the tenant's)."""
    try:
        fields = json.loads(data.decode("utf-8"))
        tally = Tally(_day(fields["day"]))
        for item in fields["policies"][:MAX_POLICIES]:
            policy = _policy(item["policy"])
            counts = tally.policies.setdefault(policy, _Counts())
            counts.successes = _count(item["successes"])
            for result, sending, mx_host, receiving, n in item["failures"][:MAX_DETAILS]:
                detail = Detail(*(_text(v) for v in (result, sending, mx_host, receiving)))
                if detail.result not in RESULT_TYPES:
                    raise ValueError("unknown result type")
                counts.failures[detail] = _count(n)
    except (UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
        return None
    return tally


def _policy(value: object) -> Policy:
    if not isinstance(value, dict):
        raise ValueError("not a policy")
    kind = value["policy-type"]
    if kind not in POLICY_TYPES:
        raise ValueError("unknown policy type")
    strings = tuple(_text(s) for s in value.get("policy-string", ())[:50])
    mx = tuple(_text(s) for s in value.get("mx-host", ())[:50])
    return Policy(_text(value["policy-domain"]), kind, strings, mx)


def _day(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError("not a day")
    datetime.strptime(value, "%Y-%m-%d")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or len(value) > _TEXT or not value.isprintable():
        raise ValueError("not a text")
    return value


def _count(value: object) -> int:
    if type(value) is not int or not 0 <= value < 2**53:
        raise ValueError("not a count")
    return value


# --- the report -----------------------------------------------------------------------------


def report(tally: Tally, domain: str, *, organization: str, contact: str, report_id: str) -> bytes:
    """The aggregate report (RFC 8460 4.4) of `domain`'s policies over the tally's day."""
    start = datetime.strptime(tally.day, "%Y-%m-%d").replace(tzinfo=UTC)
    policies = [
        {
            "policy": _policy_json(policy),
            "summary": {
                "total-successful-session-count": counts.successes,
                "total-failure-session-count": sum(counts.failures.values()),
            },
            "failure-details": [
                {**_detail_json(d), "failed-session-count": n} for d, n in counts.failures.items()
            ],
        }
        for policy, counts in sorted(tally.policies.items(), key=lambda item: item[0].type)
        if policy.domain == domain
    ]
    document = {
        "organization-name": organization,
        "date-range": {
            "start-datetime": _zulu(start),
            "end-datetime": _zulu(start + timedelta(days=1) - timedelta(seconds=1)),
        },
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }
    return json.dumps(document, indent=1).encode()


def _policy_json(policy: Policy) -> dict[str, object]:
    found: dict[str, object] = {"policy-type": policy.type, "policy-domain": policy.domain}
    if policy.strings:
        found["policy-string"] = list(policy.strings)
    if policy.mx:
        found["mx-host"] = list(policy.mx)
    return found


def _detail_json(detail: Detail) -> dict[str, str]:
    return {
        "result-type": detail.result,
        "sending-mta-ip": detail.sending_ip,
        "receiving-mx-hostname": detail.mx_host,
        "receiving-ip": detail.receiving_ip,
    }


def _zulu(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def message(
    document: bytes,
    *,
    domain: str,
    submitter: str,
    sender: str,
    recipients: Sequence[str],
    report_id: str,
    day: str,
    now: datetime,
    unique: str,
) -> bytes:
    """The mail carrying `document` to `recipients` (RFC 8460 5.3): a multipart/report
    of report-type tlsrpt, a note for people, and the report as application/tlsrpt+gzip."""
    boundary = f"tlsrpt-{unique}"
    name = f"{submitter}!{domain}!{day}!{report_id}.json.gz"
    attachment = gzip.compress(document, mtime=0)
    encoded = _base64_lines(attachment)
    head: Mapping[str, str] = {
        "From": f"<{sender}>",
        "To": ", ".join(f"<{r}>" for r in recipients),
        "Date": format_datetime(now),
        "Message-ID": f"<{unique}@{submitter}>",
        "Subject": f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>",
        "TLS-Report-Domain": domain,
        "TLS-Report-Submitter": submitter,
        "MIME-Version": "1.0",
        "Content-Type": f'multipart/report; report-type="tlsrpt"; boundary="{boundary}"',
    }
    note = (
        f"This is an aggregate TLS report (RFC 8460) from {submitter} for {domain},\r\n"
        f"covering {day} (UTC).\r\n"
    )
    lines = [f"{k}: {v}" for k, v in head.items()]
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        note,
        f"--{boundary}",
        "Content-Type: application/tlsrpt+gzip",
        "Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment; filename="{name}"',
        "",
        *encoded,
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(lines).encode("ascii")


def _base64_lines(data: bytes) -> list[str]:
    text = base64.b64encode(data).decode("ascii")
    return [text[i : i + 76] for i in range(0, len(text), 76)]
