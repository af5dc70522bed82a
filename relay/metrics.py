"""Prometheus metrics, one registry per app so that several relays can live in one process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from .backend import Backend
from .hub import Hub
from .subscriber import PUSH_TRANSPORTS
from .upstream.budget import RateBudget
from .watches.webhooks import OUTCOMES, Outcome

if TYPE_CHECKING:
    from .watches import Watches, Webhooks


class PushedMessages(Collector):
    """`relay_messages_pushed_total`, read from the hub's plain counts when scraped.

    Pushing is the hot path (once per subscriber and change): an int addition there,
    rather than a locked Prometheus counter.
    """

    def __init__(self) -> None:
        self.hub: Hub | None = None

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "relay_messages_pushed",
            "Messages pushed to subscribers, by transport",
            labels=["transport"],
        )
        counts = self.hub.pushed_counts if self.hub is not None else {}
        for transport in PUSH_TRANSPORTS:
            family.add_metric([transport], counts.get(transport, 0))
        yield family


class SlowClientResets(Collector):
    """`relay_slow_clients_reset_total`, read from the watchdog's counts when scraped."""

    def __init__(self) -> None:
        self.counts: Callable[[], Mapping[str, int]] = dict

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "relay_slow_clients_reset",
            "Connections reset because their client stopped reading for RELAY_SEND_TIMEOUT,"
            " by transport",
            labels=["transport"],
        )
        counts = self.counts()
        for transport in PUSH_TRANSPORTS:
            family.add_metric([transport], counts.get(transport, 0))
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.poll_loops = Gauge(
            "relay_poll_loops", "Poll loops running in this process", registry=self.registry
        )
        self.tasks = Gauge(
            "relay_tasks",
            "Tasks held in memory: watched, lingering, or ended and kept for late subscribers",
            registry=self.registry,
        )
        self.subscribers = Gauge(
            "relay_subscribers",
            "Task subscriptions held, by transport",
            ["transport"],
            registry=self.registry,
        )
        self.upstream_calls = Counter(
            "relay_upstream_calls",
            "Upstream calls, by outcome (ok, not_found, unauthorized, error)",
            ["outcome"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "relay_upstream_latency_seconds",
            "Upstream call duration",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.messages = PushedMessages()
        self.registry.register(self.messages)
        self.resets = SlowClientResets()
        self.registry.register(self.resets)
        self.budget_waiting = Gauge(
            "relay_upstream_budget_waiting",
            "Poll loops waiting for their turn in the upstream rate budget",
            registry=self.registry,
        )
        self.budget_paused = Gauge(
            "relay_upstream_paused_seconds",
            "Seconds left of a relay-wide pause asked for by an upstream 429",
            registry=self.registry,
        )
        self.backing_off = Gauge(
            "relay_loops_backing_off",
            "Poll loops waiting out a backoff after upstream faults",
            registry=self.registry,
        )
        self.leases_held = Gauge(
            "relay_leases_held",
            "Task leases this node holds in cluster mode (tasks it polls)",
            registry=self.registry,
        )
        self.lease_takeovers = Counter(
            "relay_lease_takeovers",
            "Leases this node took over from a node that stopped polling",
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "relay_redis_errors",
            "Failed Redis operations, by kind"
            " (heartbeat, publish, subscribe, read, lease, interest)",
            ["operation"],
            registry=self.registry,
        )
        self.asyncio_tasks = Gauge(
            "relay_asyncio_tasks",
            "asyncio tasks alive in the relay's event loop (leak detector)",
            registry=self.registry,
        )
        self.asyncio_tasks.set_function(lambda: len(asyncio.all_tasks()))
        self.watches = Gauge(
            "relay_watches",
            "Server-held watches this process holds (in cluster mode: has claimed)",
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "relay_webhook_deliveries",
            "Webhook delivery attempts, by outcome (delivered, retrying, rejected, abandoned)",
            ["outcome"],
            registry=self.registry,
        )
        self.webhooks_pending = Gauge(
            "relay_webhooks_pending",
            "Webhook events stored and not yet delivered (in cluster mode: the cluster's)",
            registry=self.registry,
        )
        self.webhooks_oldest = Gauge(
            "relay_webhooks_oldest_pending_seconds",
            "Age of the oldest undelivered webhook event; 0 when none waits",
            registry=self.registry,
        )
        self.connections = Gauge(
            "relay_connections",
            "Open /v1/ requests and WebSockets, counted against the connection cap",
            registry=self.registry,
        )
        self.connections_max = Gauge(
            "relay_connections_max",
            "The connection cap (RELAY_MAX_CONNECTIONS)",
            registry=self.registry,
        )
        self.poll_loops_max = Gauge(
            "relay_poll_loops_max",
            "The poll-loop cap (RELAY_MAX_LOOPS)",
            registry=self.registry,
        )
        for delivery in OUTCOMES:
            self.webhook_deliveries.labels(delivery)
        # Bound once: looking a label up costs more than the increment.
        self._subscribers = {t: self.subscribers.labels(t) for t in PUSH_TRANSPORTS}
        for outcome in ("ok", "not_found", "unauthorized", "error"):
            self.upstream_calls.labels(outcome)

    def watch(self, budget: RateBudget, hub: Hub) -> None:
        """Read the budget's and the hub's gauges when scraped, not on every change."""
        self.budget_waiting.set_function(lambda: budget.waiting)
        self.budget_paused.set_function(lambda: budget.paused_for)
        self.backing_off.set_function(lambda: hub.backing_off)
        self.tasks.set_function(lambda: hub.task_count)
        self.messages.hub = hub

    def caps(self, max_connections: int, max_loops: int) -> None:
        self.connections_max.set(max_connections)
        self.poll_loops_max.set(max_loops)

    def connections_changed(self, delta: int) -> None:
        self.connections.inc(delta)

    def watch_redis(self, backend: Backend) -> None:
        """`relay_redis_healthy`, in cluster mode only: 0 while this node cannot reach Redis."""
        healthy = Gauge(
            "relay_redis_healthy",
            "1 while this node reaches Redis, 0 while it cannot (serving what it holds)",
            registry=self.registry,
        )
        healthy.set_function(lambda: 1.0 if backend.healthy else 0.0)

    def watch_webhooks(self, watches: Watches | None, webhooks: Webhooks | None) -> None:
        """Read the watch and outbox gauges when scraped."""
        if watches is not None:
            self.watches.set_function(lambda: watches.count)
        if webhooks is not None:
            self.webhooks_pending.set_function(lambda: webhooks.pending)
            self.webhooks_oldest.set_function(lambda: webhooks.oldest_age)

    def webhook_attempt(self, outcome: Outcome) -> None:
        self.webhook_deliveries.labels(outcome).inc()

    def upstream_call(self, outcome: str, seconds: float) -> None:
        self.upstream_calls.labels(outcome).inc()
        self.upstream_latency.observe(seconds)

    def loops_changed(self, delta: int) -> None:
        self.poll_loops.inc(delta)

    def subscribers_changed(self, transport: str, delta: int) -> None:
        child = self._subscribers.get(transport)
        (child or self.subscribers.labels(transport)).inc(delta)

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
