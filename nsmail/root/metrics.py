"""Prometheus metrics: per-tenant counters, queue sizes, restarts and delivery latency.

Off by default; `[host] metrics = "127.0.0.1:9425"` turns it on. The exposition format
comes from prometheus-client; the values come from the workers' status reports, which
the supervisor already validated (nsmail.core.report). The HTTP side is served from the
supervisor's own event loop without blocking it (`nsmail.root.serving`; no thread: the
supervisor stays single-threaded).

Security: runs as root in the supervisor and reads one bounded HTTP request head per
connection, with a deadline; it answers GET /metrics and nothing else.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from nsmail.core.report import DESTINATION_STATES, LATENCY_BOUNDS
from nsmail.core.status import WorkerStatus

MAX_REQUEST = 4096
TERMINATOR = b"\r\n\r\n"  # the end of the request head (RFC 9112 2.1); GET has no body


class _Workers(Collector):
    def __init__(self, statuses: Sequence[WorkerStatus]) -> None:
        self.statuses = statuses

    def collect(self) -> Iterator[Metric]:
        messages = CounterMetricFamily(
            "nsmail_messages",
            "Recipients handled since the worker started, by outcome",
            labels=["tenant", "outcome"],
        )
        queue = GaugeMetricFamily(
            "nsmail_queue_messages", "Messages in the queue, by state", labels=["tenant", "state"]
        )
        restarts = CounterMetricFamily(
            "nsmail_worker_restarts", "Times the worker was restarted", labels=["tenant"]
        )
        up = GaugeMetricFamily("nsmail_worker_up", "1 when the worker runs", labels=["tenant"])
        latency = HistogramMetricFamily(
            "nsmail_delivery_latency_seconds",
            "From acceptance to delivery, per delivered recipient",
            labels=["tenant"],
        )
        sessions = GaugeMetricFamily(
            "nsmail_smtp_sessions", "SMTP sessions the worker has open", labels=["tenant"]
        )
        double_bounces = CounterMetricFamily(
            "nsmail_double_bounces",
            "Bounces that found no one to take them, told to the host's postmaster instead",
            labels=["tenant"],
        )
        suspended = GaugeMetricFamily(
            "nsmail_tenant_suspended",
            "1 while the automatic brake holds the tenant's mail (suspend_rate)",
            labels=["tenant"],
        )
        held_back = GaugeMetricFamily(
            "nsmail_destinations_held_back",
            "Destinations the worker holds mail back from (as its report names them)",
            labels=["tenant", "state"],
        )
        tls_failures = CounterMetricFamily(
            "nsmail_tls_failures",
            "Sessions a TLS policy failed to have as it demands, since the worker started",
            labels=["tenant", "policy"],
        )
        for s in self.statuses:
            for policy, count in (s.tls_failures or {}).items():
                tls_failures.add_metric([s.domain, policy], count)
            sessions.add_metric([s.domain], s.sessions or 0)
            suspended.add_metric([s.domain], 1 if s.suspended else 0)
            for state in DESTINATION_STATES:
                count = sum(1 for d in s.destinations or () if d.get("state") == state)
                held_back.add_metric([s.domain, state], count)
            restarts.add_metric([s.domain], s.restarts)
            double_bounces.add_metric([s.domain], s.double_bounces or 0)
            up.add_metric([s.domain], 1 if s.pid else 0)
            for outcome, count in (s.total or {}).items():
                messages.add_metric([s.domain, outcome], count)
            for state, count in (s.queue or {}).items():
                queue.add_metric([s.domain, state], count)
            if s.latency_counts is not None:
                latency.add_metric(
                    [s.domain], list(_cumulative(s.latency_counts)), s.latency_sum or 0.0
                )
        yield from (
            messages,
            queue,
            restarts,
            up,
            latency,
            sessions,
            held_back,
            tls_failures,
            double_bounces,
            suspended,
        )


def _cumulative(counts: Sequence[int]) -> Iterator[tuple[str, float]]:
    running = 0
    for bound, count in zip((*LATENCY_BOUNDS, float("inf")), counts, strict=True):
        running += count
        yield ("+Inf" if bound == float("inf") else repr(bound), running)


def render(statuses: Iterable[WorkerStatus]) -> bytes:
    """The metrics page for these workers, in the Prometheus text format."""
    registry = CollectorRegistry()
    registry.register(_Workers(list(statuses)))
    return generate_latest(registry)


def listen(address: str) -> socket.socket:
    """A listening socket on "host:port" or "[v6]:port"."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, int(port)))
    server.listen(16)
    return server


def respond(request: bytes, page: Callable[[], bytes]) -> bytes:
    """The HTTP response to a request head: the metrics `page` for GET /metrics (or /)."""
    if not request.startswith((b"GET /metrics ", b"GET / ")):
        return b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    body = page()  # rendered only for a scrape
    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
