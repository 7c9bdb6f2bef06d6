"""The figures one run reports (names as in docs/design.md: tokens/s per device and aggregate, bytes/token).

- ``tokens_per_s``: all devices' tokens / makespan (first start to last finish);
  ``tokens_per_s_device_p50`` / ``_mean``: per device, its tokens / its own busy span.
- ``latency_p50/p90/p99_s``: over every token of every device (see ``engine`` for the definition).
- ``uplink_bytes_per_token``: link bytes (framing included) per generated token;
  ``uplink_grpc_bytes_per_token``: the trace's gRPC bytes only (what the edge reports).
- utilizations: share of the makespan a link had a message in transfer (PS) or, for TDMA, the mean share
  of each device's slot; the verifier's busy worker-seconds / (workers x makespan);
  ``verifier_mean_batch``: requests per forward.
"""

from __future__ import annotations

import numpy as np


def percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(sim, wall_s: float, events: int) -> dict:
    c, logs = sim.config, sim.devices
    tokens = sum(d.tokens for d in logs)
    start, finish = min(d.start for d in logs), max(d.finish for d in logs)
    span = finish - start
    per_device = np.array([d.tokens / (d.finish - d.start) for d in logs if d.finish > d.start])
    lat = sim.latencies()
    up, down = sim.up, sim.down
    return {
        "policy": c.policy, "estimator": sim.trace.estimator, "codec": sim.trace.codec,
        "threshold": sim.trace.threshold, "devices": c.devices, "tokens": tokens,
        "uplink_bps": up.model.nominal_bps(), "downlink_bps": down.model.nominal_bps(), "rtt_s": c.rtt_s,
        "sharing": c.uplink.sharing, "workers": c.workers, "max_batch": c.max_batch,
        "tokens_per_s": tokens / span if span > 0 else None,
        "tokens_per_s_device_p50": float(np.median(per_device)) if len(per_device) else None,
        "tokens_per_s_device_mean": float(per_device.mean()) if len(per_device) else None,
        "latency_mean_s": float(lat.mean()) if len(lat) else None,
        "latency_p50_s": percentile(lat, 50), "latency_p90_s": percentile(lat, 90),
        "latency_p99_s": percentile(lat, 99),
        "uplink_bytes_per_token": up.message_bytes / tokens if tokens else None,
        "uplink_grpc_bytes_per_token": sim.up_grpc / tokens if tokens else None,
        "downlink_bytes_per_token": down.message_bytes / tokens if tokens else None,
        "uplink_utilization": up.link.busy_s / span if span > 0 else None,
        "downlink_utilization": down.link.busy_s / span if span > 0 else None,
        "verifier_utilization": sim.verifier.busy_s / (c.workers * span) if span > 0 else None,
        "verifier_mean_batch": sim.verifier.jobs / sim.verifier.batches if sim.verifier.batches else None,
        "transmission_rate": sim.tokens_sent / tokens if tokens else None,
        "accuracy": sim.trace.accuracy,  # over the trace's generations: a replay cuts and repeats them
        "makespan_s": span, "events": events, "sim_wall_s": wall_s,
        "events_per_s": events / wall_s if wall_s > 0 else None,
        "service_model": sim.service.as_dict(), "rpc_overhead_s": sim.rpc_s,
    }
