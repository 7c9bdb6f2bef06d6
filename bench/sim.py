"""Simulator section of `make bench` (``sim.*`` in reports/bench.json), from the demo pair's real traces
(``reports/sim/traces``, recorded first if missing: ~3 min).

- ``speedup_vs_hlm``: the default policy's tokens/s over HLM's, one device, 10 Mbit/s uplink, 50 ms RTT,
  each replaying its whole trace once (also ``speedup_vs_hlm_by_policy`` for every hybrid policy).
- ``seconds_10k``: wall time to simulate 10,000 devices x 200 tokens of the default policy (median of 3);
  ``events_per_s``: SimPy events scheduled per wall second in those runs (median).
- ``validation_max_error``: the netns validation (``simulate/testbed/validate.py``, HLM at 5, 20 and 100 Mbit/s,
  20 ms RTT): the largest relative error of predicted vs measured tokens/s and median per-token latency;
  null with ``validation_skipped`` saying why where namespaces cannot be made (not root).
- ``validation_default_max_error``: the same for the default policy at 10 Mbit/s, 20 and 50 ms RTT, stop-and-wait
  and pipelined (lookahead ``PIPELINED_LOOKAHEAD``, default-pipelined's): tokens/s and median per-token latency
  (draft to commit); the points (``validation_default_points``) also carry the p90 latency's error, which is
  where this sparse policy's round trips show (its median token is committed as it is drafted). Null with
  ``validation_default_skipped`` where namespaces cannot be made.
- ``devices_per_replica``: per policy (``CAPACITY_POLICIES``), the devices one verifier replica sustains with the
  per-token latency p99 (over every token of every device) <= 200 ms, each device on its own 10 Mbit/s uplink
  (100 Mbit/s downlink), 50 ms RTT, 500 tokens per device; found by doubling then bisection on the simulator
  (``simulate/capacity.py``). The replica is one worker taking what is queued and splitting it into forwards as
  the engine does, each at the cost measured on the real batched engine (``bench/verifier_service.py`` ->
  ``reports/sim/verifier_batched.json``, measured first if missing or if ``cloud/batching.py`` changed since:
  ~1 min; 1 torch thread), up to the largest batch measured. ``llm-only`` is cloud-only: every token from the
  verifier, one batched decode step each (the ``Generate`` stream).
  ``devices_per_replica_ratio``: default / llm-only (goal >= 10x); ``replica_tokens_per_s`` (and its ratio): the
  tokens/s the replica serves at that device count; ``devices_per_replica_runs``: each search's
  probes (p99, tokens/s, mean batch); ``verifier_service``: the fitted model (coefficients, R², relative errors,
  held-out errors).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from simulate.capacity import devices_per_replica, study_config
from simulate.config import LinkConfig, SimConfig
from simulate.engine import simulate
from simulate.trace import load_trace

TRACES = Path("reports/sim/traces")
HYBRID = ("u-hlm", "cu-hlm", "default")
VALIDATION_RATES = (5e6, 20e6, 100e6)
DEFAULT_VALIDATION_RTTS = (0.02, 0.05)
DEFAULT_VALIDATION_PROBLEMS = 20
SERVICE = Path("reports/sim/verifier_batched.json")
CAPACITY_POLICIES = ("default", "default-pipelined", "default@0.06", "llm-only")
CAPACITY_OBJECTIVE_S = 0.2


def ensure_traces(folder: Path = TRACES) -> Path:
    if not (folder / "manifest.json").is_file():
        from simulate.testbed.record import record_all

        print(f"recording the simulator's traces into {folder} ...")
        record_all(folder, problems=40, calibration_problems=60, seed=0, temperature=1.0, extra_thresholds=[0.06, 0.2])
    return folder


def ensure_service(path: Path = SERVICE) -> Path:
    """The batched engine's measured service model, measured again when missing or of another engine version."""
    from bench import verifier_service

    if not path.is_file() or json.loads(path.read_text()).get("engine_sha256") != verifier_service.engine_sha256():
        print(f"measuring the verifier engine's batched service time into {path} ...")
        verifier_service.run(path)
    return path


def capacity(folder: Path, service: Path, policies=CAPACITY_POLICIES, tokens_per_device: int = 500) -> dict:
    """``devices_per_replica`` and its ratio, the searches, and the service model they used."""
    traces = {p: str(folder / f"{p}.jsonl") for p in policies}
    runs = {p: devices_per_replica(study_config(traces, p, str(service), tokens_per_device=tokens_per_device),
                                   CAPACITY_OBJECTIVE_S) for p in policies}
    found = {p: r["devices"] for p, r in runs.items()}
    # Tokens/s one replica serves at that count: hybrid devices run far faster than cloud-only ones at the same
    # latency objective, so the device ratio alone undersells (or oversells) what a replica delivers.
    served = {p: (r["at_devices"] or {}).get("tokens_per_s") for p, r in runs.items()}
    measured = json.loads(service.read_text())
    return {"devices_per_replica": found,
            "devices_per_replica_ratio": found["default"] / found["llm-only"] if found.get("llm-only") else None,
            "replica_tokens_per_s": served,
            "replica_tokens_per_s_ratio": (served["default"] / served["llm-only"]
                                           if served.get("default") and served.get("llm-only") else None),
            "devices_per_replica_point": {"latency_p99_s": CAPACITY_OBJECTIVE_S, "uplink_bps_per_device": 10e6,
                                          "downlink_bps_per_device": 100e6, "rtt_s": 0.05,
                                          "tokens_per_device": tokens_per_device},
            "devices_per_replica_runs": runs,
            "verifier_service": {**measured["model"], "held_out_max_rel_error": measured.get("held_out_max_rel_error"),
                                 "file": str(service), "load_average": measured.get("load_average")}}


def single_device_tps(path: Path, rate_bps: float, rtt_s: float) -> float:
    trace = load_trace(path)
    config = SimConfig(traces={"p": str(path)}, policy="p", devices=1, tokens_per_device=trace.tokens, rtt_s=rtt_s,
                       uplink=LinkConfig(rate_bps=rate_bps), downlink=LinkConfig(rate_bps=100e6))
    return simulate(config, trace).metrics["tokens_per_s"]


def scale_run(path: Path, devices: int = 10_000, tokens: int = 200) -> dict:
    config = SimConfig(traces={"default": str(path)}, policy="default", devices=devices, tokens_per_device=tokens,
                       start_spread_s=1.0, rtt_s=0.05, uplink=LinkConfig(rate_bps=100e6),
                       downlink=LinkConfig(rate_bps=1e9), workers=8)
    return simulate(config, load_trace(path)).metrics


def validation() -> tuple[float | None, dict]:
    from simulate.testbed.netns import unavailable_reason
    from simulate.testbed.validate import run_validation

    reason = unavailable_reason()
    if reason:
        return None, {"validation_skipped": reason}
    report = run_validation(list(VALIDATION_RATES), 0.02, "hlm", problems=3)
    points = [{"uplink_bps": p["uplink_bps"], "rtt_s": p["rtt_s"], "errors": p["errors"],
               "measured_tokens_per_s": p["measured"]["tokens_per_s"],
               "predicted_tokens_per_s": p["predicted"]["tokens_per_s"]} for p in report["points"]]
    return report["max_error"], {"validation_points": points}


def validation_default() -> tuple[float | None, dict]:
    """The default policy, stop-and-wait and pipelined, at 10 Mbit/s and 20/50 ms RTT."""
    from eval.policies import POLICIES
    from simulate.testbed.netns import unavailable_reason
    from simulate.testbed.validate import run_validation

    reason = unavailable_reason()
    if reason:
        return None, {"validation_default_skipped": reason}
    lookahead = POLICIES["default-pipelined"].lookahead
    report = run_validation([10e6], list(DEFAULT_VALIDATION_RTTS), "default", problems=DEFAULT_VALIDATION_PROBLEMS,
                           out=Path("reports/sim/validation_default"), lookaheads=(0, lookahead))
    points = []
    for p in report["points"]:
        m, s = p["measured"], p["predicted"]
        points.append({"uplink_bps": p["uplink_bps"], "rtt_s": p["rtt_s"], "lookahead": p["lookahead"],
                       "errors": {**p["errors"], "latency_p90_s": abs(s["latency_p90_s"] - m["latency_p90_s"])
                                  / m["latency_p90_s"]},
                       "measured": {k: m[k] for k in ("tokens_per_s", "latency_p50_s", "latency_p90_s")},
                       "predicted": {k: s[k] for k in ("tokens_per_s", "latency_p50_s", "latency_p90_s")}})
    return report["max_error"], {"validation_default_points": points,
                                 "validation_default_load_average": report["load_average"]}


def run(skip_validation: bool = False, service: Path = SERVICE) -> dict:
    folder = ensure_traces()
    hlm = single_device_tps(folder / "hlm.jsonl", 10e6, 0.05)
    by_policy = {p: single_device_tps(folder / f"{p}.jsonl", 10e6, 0.05) / hlm for p in HYBRID}
    runs = [scale_run(folder / "default.jsonl") for _ in range(3)]
    section = {
        "speedup_vs_hlm": by_policy["default"], "speedup_vs_hlm_by_policy": by_policy,
        "speedup_point": {"uplink_bps": 10e6, "rtt_s": 0.05, "devices": 1},
        "seconds_10k": statistics.median(r["sim_wall_s"] for r in runs),
        "events_per_s": statistics.median(r["events_per_s"] for r in runs),
        "scale_point": {"devices": 10_000, "tokens_per_device": 200, "policy": "default", "uplink_bps": 100e6,
                        "rtt_s": 0.05, "workers": 8, "events": runs[0]["events"]},
        "traces": str(folder),
        **capacity(folder, ensure_service(service)),
    }
    if skip_validation:
        section.update(validation_max_error=None, validation_skipped="--skip-validation",
                       validation_default_max_error=None, validation_default_skipped="--skip-validation")
    else:
        section["validation_max_error"], extra = validation()
        section.update(extra)
        section["validation_default_max_error"], extra = validation_default()
        section.update(extra)
    return section


def format_table(section: dict) -> str:
    lines = ["\nsim: trace-driven simulator (demo pair traces)"]
    lines.append(f"  speedup vs HLM at 10 Mbit/s, 50 ms, 1 device: default {section['speedup_vs_hlm']:.1f}x ("
                 + ", ".join(f"{k} {v:.2f}x" for k, v in section["speedup_vs_hlm_by_policy"].items()) + ")")
    lines.append(f"  10,000 devices x 200 tokens: {section['seconds_10k']:.1f} s, {section['events_per_s']:,.0f} events/s")
    dpr, m = section["devices_per_replica"], section["verifier_service"]
    ratio = section["devices_per_replica_ratio"]
    lines.append("  devices per replica (p99 <= 200 ms, 10 Mbit/s, 50 ms): " + ", ".join(f"{k} {v}" for k, v in dpr.items())
                 + (f"; default / cloud-only {ratio:.2f}x" if ratio is not None else ""))
    served = section.get("replica_tokens_per_s_ratio")
    if served is not None:
        lines.append(f"  tokens/s one replica serves at those counts: default / cloud-only {served:.2f}x")
    lines.append(f"  verifier service model: {m['formula']} (R^2 {m['r2']:.3f})")
    err = section.get("validation_max_error")
    lines.append("  validation (HLM): " + (f"max error {err:.1%}" if err is not None
                                           else f"skipped ({section.get('validation_skipped')})"))
    err = section.get("validation_default_max_error")
    lines.append("  validation (default, stop-and-wait and pipelined, 20/50 ms): "
                 + (f"max error {err:.1%}" if err is not None
                    else f"skipped ({section.get('validation_default_skipped')})"))
    return "\n".join(lines)
