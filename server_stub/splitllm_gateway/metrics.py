"""The gateway's Prometheus metrics, on a registry per app (several gateways in one process, as in
the tests, do not share series). Every family has a HELP line and its unit in its name."""

from __future__ import annotations

from collections.abc import Callable

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from prometheus_client.process_collector import ProcessCollector
except ModuleNotFoundError as exc:  # a device-only install: say which extra brings it
    raise ModuleNotFoundError(f"splitllm-gateway needs {exc.name}: pip install 'splitllm[server]'",
                              name=exc.name) from exc

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "generate_latest"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: from a 1 ms answer (/v1/models) to a 60 s reply queued behind others.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """The gateway's own /metrics (a registry per app)."""

    def __init__(self, slots_busy: Callable[[], int]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("splitllm_gateway_requests_total", "HTTP requests answered, by route and status.",
                                ["route", "status"], registry=r)
        self.request_seconds = Histogram("splitllm_gateway_request_seconds",
                                         "Time to the response head (non-streaming: the whole reply).", ["route"],
                                         buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft_seconds = Histogram("splitllm_gateway_ttft_seconds",
                                      "Request received to its first generated text.",
                                      buckets=LATENCY_BUCKETS_S, registry=r)
        self.slot_wait_seconds = Histogram("splitllm_gateway_slot_wait_seconds",
                                           "Time a request waited for a free SplitClient.",
                                           buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("splitllm_gateway_prompt_tokens_total", "Prompt tokens of finished requests.",
                                     registry=r)
        self.completion_tokens = Counter("splitllm_gateway_completion_tokens_total",
                                         "Tokens generated for finished requests.", registry=r)
        busy = Gauge("splitllm_gateway_slots_busy", "SplitClients serving a request now.", registry=r)
        busy.set_function(slots_busy)
        ProcessCollector(registry=r)
