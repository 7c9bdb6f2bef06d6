"""Runs and sweeps: one configuration, or bandwidth x RTT x devices x policy (threshold = policy traces
recorded at other thresholds, e.g. ``default@0.2``), written as CSV + summary.json + plots.

The crossover: for each hybrid policy, RTT and device count, the smallest swept uplink rate from which
its aggregate tokens/s is at least cloud-only's (``llm-only``) at every larger swept rate.
"""

from __future__ import annotations

import csv
import itertools
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from simulate.batched import BatchedServiceModel, load_batched
from simulate.config import SimConfig
from simulate.compute import ServiceModel, fit_service
from simulate.engine import simulate
from simulate.trace import Trace, load_trace

CSV_COLUMNS = ["policy", "estimator", "codec", "threshold", "uplink_bps", "rtt_s", "devices", "tokens_per_s",
               "tokens_per_s_device_p50", "latency_p50_s", "latency_p90_s", "latency_p99_s",
               "uplink_bytes_per_token", "uplink_grpc_bytes_per_token", "uplink_utilization",
               "verifier_utilization", "transmission_rate", "accuracy", "events", "sim_wall_s"]
CLOUD_ONLY = "llm-only"


@lru_cache(maxsize=32)
def _trace(path: str, name: str) -> Trace:
    return load_trace(path, name)


def trace_for(config: SimConfig, policy: str | None = None) -> Trace:
    name = policy or config.policy
    return _trace(config.traces[name], name)


@lru_cache(maxsize=32)
def _service(path: str, name: str) -> ServiceModel:
    return fit_service(_trace(path, name))


@lru_cache(maxsize=8)
def _batched(path: str) -> BatchedServiceModel:
    return load_batched(path)


def service_for(config: SimConfig) -> ServiceModel | BatchedServiceModel | None:
    """The batched engine's measured model (``verifier.service``) or the one fitted from ``verifier.service_trace``
    when set (None: fitted from the policy's own trace)."""
    if config.service_file:
        return _batched(config.service_file)
    name = config.service_trace
    return _service(config.traces[name], name) if name else None


def run_one(config: SimConfig) -> dict:
    return simulate(config, trace_for(config), service_for(config)).metrics


def sweep_points(config: SimConfig) -> list[dict]:
    s = config.sweep
    axes = itertools.product(s.get("policies", [config.policy]), s.get("uplink_bps", [config.uplink.rate_bps]),
                             s.get("rtt_s", [config.rtt_s]), s.get("devices", [config.devices]))
    return [{"policy": p, "uplink_bps": float(b), "rtt_s": float(r), "devices": int(d)} for p, b, r, d in axes]


def reference_point(points: list[dict]) -> dict:
    """The point whose latency CDFs are plotted: the swept rate nearest 10 Mbit/s (log scale), the first
    RTT and device count."""
    rates = sorted({p["uplink_bps"] for p in points})
    rate = min(rates, key=lambda b: abs(np.log10(b) - 7))
    return {"uplink_bps": rate, "rtt_s": points[0]["rtt_s"], "devices": points[0]["devices"]}


def crossovers(rows: list[dict]) -> list[dict]:
    out = []
    groups = {(r["rtt_s"], r["devices"]) for r in rows}
    for rtt, devices in sorted(groups):
        group = [r for r in rows if r["rtt_s"] == rtt and r["devices"] == devices]
        cloud = {r["uplink_bps"]: r["tokens_per_s"] for r in group if r["policy"] == CLOUD_ONLY}
        if not cloud:
            continue
        for policy in sorted({r["policy"] for r in group} - {CLOUD_ONLY}):
            curve = sorted((r["uplink_bps"], r["tokens_per_s"]) for r in group if r["policy"] == policy)
            wins = [b for b, tps in curve if b in cloud and tps >= cloud[b]]
            start = None
            for b, _ in reversed(curve):  # the smallest rate from which it wins at every larger rate
                if b not in wins:
                    break
                start = b
            out.append({"policy": policy, "rtt_s": rtt, "devices": devices, "beats_cloud_from_bps": start})
    return out


def run_sweep(config: SimConfig, out: Path) -> dict:
    from simulate.plots import write_plots

    points = sweep_points(config)
    ref = reference_point(points)
    rows, cdfs = [], {}
    out.mkdir(parents=True, exist_ok=True)
    for point in tqdm(points, desc="sweep", unit="point"):
        point_config = config.with_point(**point)
        result = simulate(point_config, trace_for(point_config), service_for(point_config))
        rows.append({**result.metrics, **point})
        if all(point[k] == ref[k] for k in ref):
            cdfs[point["policy"]] = np.sort(result.latencies)
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = {"points": len(rows), "reference_point": ref, "crossover": crossovers(rows), "rows": rows,
               "traces": config.traces}
    summary["plots"] = write_plots(rows, cdfs, ref, summary["crossover"], out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
