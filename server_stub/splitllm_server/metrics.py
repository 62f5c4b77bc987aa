"""The server's Prometheus metrics, on a registry of its own (one per app, so several servers in a
process, as in the tests, do not share series).

Two kinds: plain counters the request path bumps (``Metrics.tokens_in += n`` and so on, read when
/metrics is scraped) and histograms observed as events happen. Every family has a HELP line and
its unit in its name (``_seconds``, ``_bytes``; counts end in ``_total``).

API for the engine (continuous batching): ``state.metrics.observe_batch(n)`` once per batched ORT
run with the number of sequences in it; ``observe_step(compute_s, queue_s)`` is called for every
Result sent, ``observe_ttft(seconds)`` for every prompt answered with a token.
"""

from __future__ import annotations

import collections
import resource
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Histogram,
        generate_latest,
    )
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.process_collector import ProcessCollector
except ModuleNotFoundError as exc:  # a device-only install: say which extra brings it
    raise ModuleNotFoundError(f"splitllm-server needs {exc.name}: "
                              "pip install 'splitllm[server]'", name=exc.name) from exc

if TYPE_CHECKING:
    from splitllm_server.state import ServerState

__all__ = ["CONTENT_TYPE", "Metrics", "StateCollector"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: from a 1 ms decode step on a small model to a 60 s prefill queued behind others.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Metrics:
    """Counters bumped on the request path, and the histograms; ``registry`` is what /metrics shows."""

    bytes_in: int = 0
    bytes_out: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    plans: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry, repr=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.step_seconds = Histogram("splitllm_step_compute_seconds", "ORT compute time of one Run request.",
                                      buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_seconds = Histogram("splitllm_queue_wait_seconds",
                                       "Time a Run request waited for the ORT worker before its compute began.",
                                       buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft_seconds = Histogram("splitllm_ttft_seconds",
                                      "Server time to first token: a prompt's Run frame received to its token sent.",
                                      buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("splitllm_batch_size_sequences",
                                    "Sequences in one batched engine run (observed by the engine).",
                                    buckets=BATCH_BUCKETS, registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def observe_step(self, compute_s: float, queue_s: float) -> None:
        """One Run answered: its compute and its wait for the worker, in seconds."""
        self.step_seconds.observe(max(compute_s, 0.0))
        self.queue_seconds.observe(max(queue_s, 0.0))

    def observe_ttft(self, seconds: float) -> None:
        """A prompt's first token left the server ``seconds`` after its Run frame arrived."""
        self.ttft_seconds.observe(max(seconds, 0.0))

    def observe_batch(self, sequences: int) -> None:
        """An engine run served ``sequences`` sequences at once (for continuous batching)."""
        self.batch_size.observe(sequences)

    def attach(self, state: ServerState) -> None:
        """Add the families read from the server's state at scrape time."""
        self.registry.register(StateCollector(state))

    def exposition(self) -> bytes:
        """The /metrics body (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry)


class StateCollector:
    """Gauges and counters that live in the server's objects, read on every scrape."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        st = self.state
        m, s, e = st.metrics, st.sessions, st.engine.scheduler

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("splitllm_sessions_active", "Sessions currently connected.", len(s))
        yield counter("splitllm_sessions_opened_total", "Sessions opened since start.", s.opened_total)
        yield counter("splitllm_sessions_evicted_total", "Sessions dropped for idling past the TTL.", s.evicted_total)
        yield gauge("splitllm_kv_bytes", "Bytes of KV cache held for all sessions.", s.kv_bytes())
        yield counter("splitllm_tokens_in_total", "Positions run by the server (prompt and decode).", m.tokens_in)
        yield counter("splitllm_tokens_generated_total", "Tokens sampled by the server.", m.tokens_out)
        yield counter("splitllm_bytes_in_total", "WebSocket payload bytes received.", m.bytes_in)
        yield counter("splitllm_bytes_out_total", "WebSocket payload bytes sent.", m.bytes_out)
        yield counter("splitllm_compute_seconds_total", "Seconds spent running segments.", e.compute_seconds)
        yield counter("splitllm_plans_total", "POST /v1/plan answers.", m.plans)
        yield gauge("splitllm_load_factor", "Response-time stretch from the last 10 s of compute (1 = idle).",
                    e.load_factor())
        yield counter("splitllm_runs_total", "Engine runs (one per Run request).", e.runs)
        units = CounterMetricFamily("splitllm_unit_seconds_total",
                                    "Compute seconds attributed to each unit (0 embed, L+1 head).", labels=["unit"])
        for unit, sec in enumerate(e.unit_seconds):
            units.add_metric([str(unit)], float(sec))
        yield units
        errors = CounterMetricFamily("splitllm_errors_total", "Errors reported to peers, by error code.",
                                     labels=["code"])
        for code, n in sorted(m.errors.items()):
            errors.add_metric([code], n)
        yield errors
        yield gauge("splitllm_peak_rss_bytes", "Peak resident set size of the process.",
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        yield gauge("splitllm_ready", "1 when /readyz answers 200 (warm, not draining).", float(st.ready))
        yield gauge("splitllm_draining", "1 while the server drains after SIGTERM.", float(st.draining))
        providers = GaugeMetricFamily("splitllm_execution_provider_info",
                                      "ONNX Runtime execution providers the server's sessions run on.",
                                      labels=["provider"])
        for name in st.providers:
            providers.add_metric([name], 1.0)
        yield providers

    def describe(self) -> list[Any]:
        return []  # collected lazily: registering must not read a half-built state

