"""Metrics and request logging of the web process.

Requests are counted and timed by route *template* (``/studies/{study_id}``), never by
the raw path, so no id of any kind becomes a label value; paths that match no route
count as ``unmatched``. Each app has its own registry (tests make many apps in one
process), with the process and Python collectors beside it, served on ``/metrics``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

logger = logging.getLogger(__name__)

SIGN_IN_OUTCOMES = ("success", "refused")
# Routes whose requests are logged at DEBUG: a study page pulls dozens of images.
_QUIET_PREFIXES = ("/images/", "/static", "/metrics", "/healthz", "/readyz", "/models/")


class WebMetrics:
    """The web process's metric objects, in their own registry."""

    def __init__(self) -> None:
        disable_created_metrics()  # as every thyrocad process: no *_created series
        self.registry = CollectorRegistry(auto_describe=True)
        process_collector.ProcessCollector(registry=self.registry)
        platform_collector.PlatformCollector(registry=self.registry)
        gc_collector.GCCollector(registry=self.registry)
        self.requests = Counter(
            "thyrocad_web_requests",
            "Web requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "thyrocad_web_request_duration_seconds",
            "Time to answer a web request, by route template.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.sign_ins = Counter(
            "thyrocad_web_sign_ins",
            "Sign-in attempts on the web page, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.labels = Counter(
            "thyrocad_web_labels",
            "Labels recorded from the web page.",
            registry=self.registry,
        )
        for outcome in SIGN_IN_OUTCOMES:
            self.sign_ins.labels(outcome)

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


def route_template(scope: dict[str, Any]) -> str:
    """The template of the route that answered (``/studies/{study_id}``), ``/static`` for
    static files, ``unmatched`` for anything else."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if str(scope.get("path", "")).startswith("/static/"):
        return "/static"
    return "unmatched"


class RequestObserver:
    """ASGI middleware: counts, times and logs every HTTP request by route template."""

    def __init__(self, app: Any, metrics: WebMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            route = route_template(scope)
            method = str(scope.get("method", ""))
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            quiet = route == "unmatched" or route.startswith(_QUIET_PREFIXES)
            logger.log(
                logging.DEBUG if quiet and status < 500 else logging.INFO,
                "%s %s %d %.0f ms",
                method,
                route,
                status,
                seconds * 1000,
                extra={"route": route, "status": status, "ms": round(seconds * 1000, 1)},
            )
