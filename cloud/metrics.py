"""Prometheus metrics of one verifier: sessions, verifies, acceptance, verify latency, evictions, rejects, and
the engine's batching and KV memory (``EngineCollector``).

Each server gets its own registry (tests run several servers in one process); ``serve_metrics`` exposes
it over HTTP with prometheus_client's own server. The acceptance rate is
``verifier_accepted_total / verifier_drafts_total`` (Prometheus computes rates from counters); a block
of drafted positions is one Verify and several drafts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Verify latency on a CPU verifier ranges from ~1 ms (small model, short tail) to seconds (7B, long prefill).
_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class VerifierMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("verifier_sessions", "sessions open now", registry=r)
        self.sessions_opened = Counter("verifier_sessions_opened", "sessions opened", registry=r)
        self.verifies = Counter("verifier_verifies", "Verify messages answered", registry=r)
        self.accepted = Counter("verifier_accepted", "drafts accepted", registry=r)
        self.drafts = Counter("verifier_drafts", "drafted positions verified (a block counts each)", registry=r)
        self.stale = Counter("verifier_stale_verifies", "Verify messages drafted in an ended epoch", registry=r)
        self.verify_seconds = Histogram("verifier_verify_seconds", "time from receiving a Verify to its Verdict",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.evictions = Counter("verifier_evictions", "sessions ended by the verifier", ["reason"], registry=r)
        self.rejected = Counter("verifier_rejected_messages", "calls refused, by reason", ["reason"], registry=r)
        self.generates = Counter("verifier_generates", "Generate (LLM-only) calls served", registry=r)
        self.span_tokens = Counter("verifier_span_tokens", "tokens the LLM generated in spans and regenerated steps",
                                   registry=r)
        self.steps = Counter("verifier_judged_steps", "drafted steps judged, by outcome", ["outcome"], registry=r)
        self.conditioning_bytes = Counter("verifier_conditioning_bytes", "bytes of prompt hidden states sent in "
                                          "Opened (LLM-to-SLM conditioning)", registry=r)


class EngineCollector:
    """The batched engine's own counts, read when Prometheus scrapes: forwards, rows batched into them (their
    ratio is the mean batch size), KV cache bytes held and caches dropped under the budget."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        yield CounterMetricFamily("verifier_forwards", "model forwards run (a batch is one)", value=stats.forwards)
        yield CounterMetricFamily("verifier_forward_rows", "session forwards run, batched or not", value=stats.rows)
        yield GaugeMetricFamily("verifier_max_batch_rows", "largest batch so far", value=stats.max_rows)
        yield GaugeMetricFamily("verifier_kv_bytes", "KV cache bytes held by all sessions",
                                value=self.engine.budget.total_bytes)
        yield CounterMetricFamily("verifier_kv_drops", "KV caches dropped to stay within --kv-budget-mb (each "
                                  "is rebuilt by prefill when its session resumes)", value=stats.kv_drops)


def serve_metrics(metrics: VerifierMetrics, host: str, port: int) -> int:
    """Expose ``metrics`` at http://HOST:PORT/metrics in a daemon thread; returns the bound port."""
    httpd, _ = start_http_server(port, addr=host, registry=metrics.registry)
    return httpd.server_port
