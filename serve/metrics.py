"""What the try-on service reports to Ray's metrics (issue 28, item 4): Prometheus text on each
node's metrics endpoint (``ray start --metrics-export-port``; Ray's dashboard and Grafana read it),
names prefixed ``ray_`` by Ray's exporter (a counter's samples end in ``_total``).

    tryon_request_seconds{model, stage}    histogram: decode, prepare, model, call, encode, total
    tryon_requests_total{model, status}    counter: answered requests by HTTP status
    tryon_errors_total{model, reason}      counter: refused or failed requests by the field at fault
    tryon_queue_length{deployment}         gauge: a model replica's passes waiting for the next batch
    tryon_adapter_loads_total{model}       counter: LoRAs loaded onto a replica's base (a registry)
    tryon_adapter_evictions_total{model}   counter: LoRAs removed to make room, least recently used first

Metrics are created on first use inside the process that reports them (a Serve replica), never at
import: an ingress and a model replica each hold their own. ``serve/grafana_dashboard.json`` plots
them; ``docs/serving.md`` lists them.
"""

from __future__ import annotations

import functools
from typing import Any

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120]
"""Seconds: from a decode of a small photo to a full-size FLUX call queued behind a batch."""
STAGES = ("decode", "prepare", "model", "call", "paste", "encode", "total")


@functools.lru_cache(maxsize=None)
def _metrics() -> dict[str, Any]:
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "latency": Histogram("tryon_request_seconds", "Try-on request time by stage", boundaries=LATENCY_BUCKETS_S,
                             tag_keys=("model", "stage")),
        "requests": Counter("tryon_requests", "Answered try-on requests", tag_keys=("model", "status")),
        "errors": Counter("tryon_errors", "Refused or failed try-on requests", tag_keys=("model", "reason")),
        "queue": Gauge("tryon_queue_length", "Passes waiting for the model's next batch", tag_keys=("deployment",)),
        "loads": Counter("tryon_adapter_loads", "LoRA adapters loaded onto a replica's base",
                         tag_keys=("model",)),
        "evictions": Counter("tryon_adapter_evictions", "LoRA adapters removed to make room",
                             tag_keys=("model",)),
    }


def request_done(model: str | None, status: int, spans: dict[str, float] | None = None,
                 reason: str | None = None) -> None:
    """One answered request: its status, its stages' seconds (``Server-Timing``'s spans), and
    for a 4xx or 5xx the field at fault (``reason``)."""
    m, name = _metrics(), model or "default"
    m["requests"].inc(tags={"model": name, "status": str(status)})
    if status >= 400:
        m["errors"].inc(tags={"model": name, "reason": reason or "none"})
    for stage, seconds in (spans or {}).items():
        if stage in STAGES:
            m["latency"].observe(max(0.0, float(seconds)), tags={"model": name, "stage": stage})


def queue_length(n: int, deployment: str = "TryOnModel") -> None:
    _metrics()["queue"].set(n, tags={"deployment": deployment})


def adapter_loaded(model: str) -> None:
    _metrics()["loads"].inc(tags={"model": model})


def adapter_evicted(model: str) -> None:
    _metrics()["evictions"].inc(tags={"model": model})
