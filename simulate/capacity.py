"""The capacity study: how many devices one verifier replica sustains at a per-token latency objective.

For one policy's trace: the largest device count whose per-token latency p99 (``latency_p99_s``: over every
token of every device, each token from the start of its draft to its commit; cloud-only, from the previous
chunk's arrival) stays within the objective. Found by doubling from one device until the objective fails,
then bisection between the last count that met it and the first that did not, down to ``resolution``
(relative). The p99 of a seeded run is not strictly monotone in the device count, so the answer is a
count that meets the objective with a larger probed one that does not, within the resolution.

What a replica and its devices are here (``replica_config``): each device has its own uplink and downlink
at the configured rates (TDMA slots of a link N times that rate), so the replica, not a shared access
network, is what saturates; one worker; batching by default: the batched engine's measured cost
(``verifier.service = "batched:PATH"``, ``simulate/batched.py``), up to the largest batch measured. The
simulator's other runs keep their own verifier (trace-fitted, ``max_batch = 1``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from simulate.config import SimConfig, parse_config
from simulate.engine import simulate
from simulate.study import service_for, trace_for


def study_config(traces: dict[str, str], policy: str, service_file: str, uplink_bps: float = 10e6,
                 downlink_bps: float = 100e6, rtt_s: float = 0.05, tokens_per_device: int = 500,
                 start_spread_s: float = 0.1) -> SimConfig:
    """The study's point: per-device rates, RTT, one worker with the measured batched cost. Devices start within
    ``start_spread_s`` of each other, small against a device's run (500 tokens: seconds even unloaded), so
    nearly all of them are active together."""
    return parse_config({"traces": traces, "policy": policy, "tokens_per_device": tokens_per_device,
                         "start_spread_s": start_spread_s,
                         "network": {"rtt_s": rtt_s, "uplink": {"rate_bps": uplink_bps},
                                     "downlink": {"rate_bps": downlink_bps}},
                         "verifier": {"workers": 1, "service": f"batched:{service_file}"}})


def replica_config(config: SimConfig, devices: int) -> SimConfig:
    """``config`` with ``devices`` devices, each on its own fixed-rate uplink and downlink at the configured rates."""
    for name, link in (("uplink", config.uplink), ("downlink", config.downlink)):
        if link.model != "fixed":
            raise ValueError(f"the capacity study gives each device its own fixed-rate {name}; got model {link.model!r}")
    return replace(config, devices=devices,
                   uplink=replace(config.uplink, sharing="tdma", rate_bps=config.uplink.rate_bps * devices),
                   downlink=replace(config.downlink, sharing="tdma", rate_bps=config.downlink.rate_bps * devices))


def largest_meeting(meets: Callable[[int], bool], limit: int, resolution: float = 0.02) -> tuple[int, list[int]]:
    """(the largest n <= limit found with ``meets(n)``, 0 if not even one; the probed counts in order), by
    doubling then bisection until the failing count is within ``resolution`` (relative, at least 1) above it."""
    probed, good, bad, n = [], 0, None, 1
    while n <= limit:  # doubling: bracket the first failing count
        probed.append(n)
        if not meets(n):
            bad = n
            break
        good, n = n, min(2 * n, limit) if n < limit else limit + 1
    if bad is None:
        return good, probed
    while bad - good > max(1, resolution * good):
        mid = (good + bad) // 2
        probed.append(mid)
        good, bad = (mid, bad) if meets(mid) else (good, mid)
    return good, probed


def devices_per_replica(config: SimConfig, objective_s: float = 0.2, limit: int = 20_000,
                        resolution: float = 0.02) -> dict:
    """The search for ``config.policy`` (its other settings as given: rates per device, RTT, verifier)."""
    runs: dict[int, dict] = {}

    def meets(n: int) -> bool:
        point = replica_config(config, n)
        runs[n] = simulate(point, trace_for(point), service_for(point)).metrics
        return runs[n]["latency_p99_s"] <= objective_s

    devices, probed = largest_meeting(meets, limit, resolution)
    keep = ("latency_p99_s", "latency_p50_s", "tokens_per_s", "tokens_per_s_device_p50", "verifier_utilization",
            "verifier_mean_batch", "sim_wall_s")
    return {"policy": config.policy, "devices": devices, "objective_p99_s": objective_s,
            "at_devices": {k: runs[devices][k] for k in keep} if devices else None,
            "probes": [{"devices": n, **{k: runs[n][k] for k in keep}} for n in probed]}
