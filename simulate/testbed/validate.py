"""Validation against a real shaped link: the real edge and verifier in two network namespaces, then the
simulator's prediction for the same trace and link, compared point by point.

Per point (uplink rate R, round trip RTT, lookahead N):
1. ``tc tbf`` shapes the edge's veth egress to R (``simulate/testbed/netns.py``); the downlink is the bare veth.
2. A delay relay (``simulate/testbed/relay.py``) in the cloud namespace holds every byte RTT/2 each way, in front
   of the verifier (``python -m cloud serve --threads 1`` on the cloud namespace's loopback).
3. The real edge (``simulate/testbed/edge_run.py --lookahead N --threads 1``) runs held-out problems in the
   edge namespace and writes its trace, after one unrecorded warm-up generation (gRPC connection, HTTP/2
   flow-control windows growing by BDP probing, the verifier's first forward passes: one-time costs the
   simulator does not model). N = 0 is stop-and-wait; N > 0 pipelines (protocol v2).
4. The simulator replays that very trace: one device, a fixed-rate uplink R (framing defaults: TCP/IP
   52 B + Ethernet 14 B per packet, which is what tbf counts), a 10 Gbit/s downlink, the RTT, the edge
   compute replayed from the trace, the verifier's time fitted from the trace's ``server_s``, and the
   testbed's own per-Verify latency beyond the RTT (gRPC stacks, relay hop, the relay's timers: ~1.5-2 ms
   with no added delay, ~3-3.5 ms at 20-50 ms) measured per RTT on a separate stop-and-wait pass through
   the relay over the unshaped veth (median of wait - server - RTT there), never fitted to the shaped points.
5. Measured, from the same trace: tokens/s = all tokens / the generations' own wall time (the trace's
   ``seconds``: from before the Open to after Close; the span the simulator replays), and per-token
   latency from the edge's own timers, defined as in the simulator: the trace replayed at its recorded
   round trips (``Simulation(recorded=True)``: each verdict taken ``wait_s`` after its Verify was sent),
   from the start of a token's draft to its commit. Errors: |predicted - measured| / measured for tokens/s
   and for the median per-token latency.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from core.process import ROOT, ChildProcess, VerifierProcess, project_env
from edge.hybrid import DEFAULT_THRESHOLD
from simulate.config import LinkConfig, SimConfig
from simulate.engine import Simulation, simulate
from simulate.testbed.netns import CLOUD_IP, Testbed, unavailable_reason
from simulate.trace import load_trace

THREADS = 1  # ORT threads of the edge, torch threads of the verifier: two processes share the machine's cores


def _config(trace_path: Path, tokens: int, rate_bps: float, rtt_s: float, rpc_overhead_s: float | None) -> SimConfig:
    return SimConfig(traces={"validation": str(trace_path)}, policy="validation", devices=1, tokens_per_device=tokens,
                     rtt_s=rtt_s, uplink=LinkConfig(rate_bps=rate_bps), downlink=LinkConfig(rate_bps=10e9),
                     rpc_overhead_s=rpc_overhead_s)


def predict(trace_path: Path, rate_bps: float, rtt_s: float, rpc_overhead_s: float) -> dict:
    """The simulator's figures for one device replaying ``trace_path`` over the testbed's link."""
    trace = load_trace(trace_path, "validation")
    m = simulate(_config(trace_path, trace.tokens, rate_bps, rtt_s, rpc_overhead_s), trace).metrics
    return {k: m[k] for k in ("tokens_per_s", "latency_p50_s", "latency_p90_s", "latency_mean_s", "service_model",
                              "rolled_back_per_token", "stale_verifies_per_token")}


def measured(trace_path: Path, timing_path: Path | None = None) -> dict:
    """The real run's figures from its trace: tokens/s over the generations' wall time, per-token latency
    from the edge's timers (the trace at its own round trips)."""
    trace = load_trace(trace_path, "validation")
    seconds = sum(g.seconds for g in trace.generations)
    replay = Simulation(_config(trace_path, trace.tokens, 10e9, 0.0, 0.0), trace, recorded=True).run().metrics
    out = {"tokens_per_s": trace.tokens / seconds, "latency_p50_s": replay["latency_p50_s"],
           "latency_p90_s": replay["latency_p90_s"], "latency_mean_s": replay["latency_mean_s"],
           "tokens": trace.tokens, "seconds": seconds, "transmission_rate": trace.transmission_rate,
           "uplink_grpc_bytes_per_token": trace.grpc_up_bytes / trace.tokens,
           "rolled_back_per_token": sum(g.rolled_back for g in trace.generations) / trace.tokens,
           "stale_verifies_per_token": sum(g.stale_verifies for g in trace.generations) / trace.tokens,
           # consistency: the recorded replay's own clock against the wall time it reconstructs
           "recorded_replay_tokens_per_s": replay["tokens_per_s"]}
    if timing_path is not None and timing_path.is_file():
        timing = json.loads(timing_path.read_text())
        if "walls_s" in timing:  # the whole generate_hybrid call, prompt encoding and trace writing included
            out["tokens_per_s_wall"] = sum(timing["tokens"]) / sum(timing["walls_s"])
    return out


def run_edge(bed: Testbed, verifier_port: str, model: Path, rtt_s: float, policy: str, problems: int,
             threshold: float, out: Path, tag: str, lookahead: int = 0) -> tuple[Path, Path]:
    """The real edge through the relay (RTT/2 each way) under the link's current shaping."""
    from simulate.testbed.relay import READY_PREFIX

    trace_path, timing_path = out / f"{tag}.jsonl", out / f"{tag}.timing.json"
    relay_cmd = [*bed.prefix(bed.cloud_ns), sys.executable, "-m", "simulate.testbed.relay", "--listen", f"{CLOUD_IP}:0",
                 "--target", f"127.0.0.1:{verifier_port}", "--delay", str(rtt_s / 2)]
    with ChildProcess(relay_cmd, READY_PREFIX, timeout=60) as relay:
        edge_cmd = [*bed.prefix(bed.edge_ns), sys.executable, "-m", "simulate.testbed.edge_run", "--model", str(model),
                    "--verifier", relay.address, "--policy", policy, "--threshold", str(threshold),
                    "--problems", str(problems), "--lookahead", str(lookahead), "--threads", str(THREADS),
                    "--trace", str(trace_path), "--timing", str(timing_path)]
        done = subprocess.run(edge_cmd, cwd=ROOT, env=project_env(), capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"edge run failed ({done.returncode}): {done.stderr[-1500:]}")
    return trace_path, timing_path


def testbed_overhead(bed: Testbed, verifier_port: str, model: Path, policy: str, problems: int, threshold: float,
                     out: Path, rtt_s: float = 0.0) -> float:
    """The testbed's own latency per Verify round trip beyond the emulated RTT (both gRPC stacks, the relay hop
    and the relay's timers, which wake up to a millisecond late each way): median (Verify wait - verifier
    time) - RTT over a stop-and-wait pass through the relay at ``rtt_s`` on the bare (unshaped) veth."""
    bed.unshape()
    trace_path, _ = run_edge(bed, verifier_port, model, rtt_s, policy, problems, threshold, out,
                             f"{policy}_bare_{rtt_s * 1000:g}ms")
    trace = load_trace(trace_path, "bare")
    waits = np.concatenate([g.wait_s[g.sent] - g.server_s[g.sent] for g in trace.generations])
    return max(0.0, float(np.median(waits)) - rtt_s)


def run_point(bed: Testbed, verifier_port: str, model: Path, rate_bps: float, rtt_s: float, policy: str,
              problems: int, threshold: float, out: Path, rpc_overhead_s: float, lookahead: int = 0) -> dict:
    qdisc = bed.shape(rate_bps)
    tag = f"{policy}_{rate_bps / 1e6:g}mbit_{rtt_s * 1000:g}ms" + (f"_la{lookahead}" if lookahead else "")
    trace_path, timing_path = run_edge(bed, verifier_port, model, rtt_s, policy, problems, threshold, out, tag,
                                       lookahead)
    real, sim = measured(trace_path, timing_path), predict(trace_path, rate_bps, rtt_s, rpc_overhead_s)
    errors = {k: abs(sim[k] - real[k]) / real[k] for k in ("tokens_per_s", "latency_p50_s")}
    return {"policy": policy, "uplink_bps": rate_bps, "rtt_s": rtt_s, "lookahead": lookahead, "qdisc": qdisc,
            "measured": real, "predicted": sim, "errors": errors, "max_error": max(errors.values()),
            "trace": str(trace_path)}


def run_validation(rates_bps: list[float], rtt_s: float | list[float], policy: str = "hlm", problems: int = 4,
                   threshold: float = DEFAULT_THRESHOLD, out: Path = Path("reports/sim/validation"),
                   model: Path | None = None, lookaheads: tuple[int, ...] | list[int] = (0,)) -> dict:
    """Every point (rate x RTT x lookahead) on one testbed and one verifier process; raises RuntimeError if
    the testbed fails."""
    from eval.pair import LLM_DIR, ensure_export
    from tqdm import tqdm

    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    model = (model or ensure_export()).resolve()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rtts = [rtt_s] if isinstance(rtt_s, (int, float)) else list(rtt_s)
    grid = [(rate, rtt, la) for rtt in rtts for la in lookaheads for rate in rates_bps]
    points = []
    with Testbed() as bed:
        with VerifierProcess(str(LLM_DIR), prefix=tuple(bed.prefix(bed.cloud_ns)), startup_timeout=180,
                             extra_args=("--threads", str(THREADS))) as verifier:
            port = verifier.address.rpartition(":")[2]
            overhead = {rtt: testbed_overhead(bed, port, model, policy, problems, threshold, out, rtt) for rtt in rtts}
            for rate, rtt, la in tqdm(grid, desc="validation", unit="point"):
                points.append(run_point(bed, port, model, rate, rtt, policy, problems, threshold, out, overhead[rtt],
                                        la))
    report = {"points": points, "max_error": max(p["max_error"] for p in points),
              "rpc_overhead_s": {f"{rtt * 1000:g}ms": value for rtt, value in overhead.items()},
              "policy": policy, "problems": problems, "threads": THREADS, "load_average": _load_average(),
              "method": "tbf uplink shaping on a veth between two netns; RTT from a userspace delay relay "
                        "(simulate/testbed/relay.py); simulator replays each point's own trace; measured latency "
                        "from the trace's timers (the trace at its recorded round trips)",
              "command": shlex.join(["python", "-m", "simulate", "validate", *sys.argv[2:]])
              if sys.argv[1:2] == ["validate"] else None}
    (out / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _load_average() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _error(p: dict, key: str) -> float:
    return abs(p["predicted"][key] - p["measured"][key]) / p["measured"][key]


def format_report(report: dict) -> str:
    lines = [f"{'uplink':>8} {'RTT':>6} {'look':>4} {'tok/s real':>10} {'sim':>7} {'err':>6} "
             f"{'p50 ms real':>11} {'sim':>6} {'err':>6} {'p90 err':>7} {'mean err':>8}"]
    for p in report["points"]:
        m, s = p["measured"], p["predicted"]
        lines.append(f"{p['uplink_bps'] / 1e6:>5g} Mb {p['rtt_s'] * 1000:>4g}ms {p.get('lookahead', 0):>4} "
                     f"{m['tokens_per_s']:>10.2f} {s['tokens_per_s']:>7.2f} {_error(p, 'tokens_per_s'):>6.1%} "
                     f"{m['latency_p50_s'] * 1000:>11.2f} {s['latency_p50_s'] * 1000:>6.2f} "
                     f"{_error(p, 'latency_p50_s'):>6.1%} {_error(p, 'latency_p90_s'):>7.1%} "
                     f"{_error(p, 'latency_mean_s'):>8.1%}")
    lines.append(f"max error (tokens/s, p50) over all points: {report['max_error']:.1%} (policy {report.get('policy')}, "
                 f"load average {report.get('load_average')})")
    return "\n".join(lines)


def main_validate(args) -> int:
    from core.cli import UserError

    reason = unavailable_reason()
    if reason:
        raise UserError(f"cannot validate here: {reason}")
    rtts = args.rtt_ms if isinstance(args.rtt_ms, list) else [args.rtt_ms]
    if not rtts or min(rtts) < 0:
        raise UserError("--rtt-ms must be >= 0")
    if len(args.rates_mbit) < 1 or min(args.rates_mbit) <= 0:
        raise UserError("--rates-mbit needs positive rates")
    report = run_validation([r * 1e6 for r in args.rates_mbit], [r / 1000 for r in rtts], args.policy, args.problems,
                            out=args.out, lookaheads=tuple(getattr(args, "lookahead", None) or (0,)))
    print(format_report(report))
    print(f"wrote {args.out}/validation.json")
    return 0
