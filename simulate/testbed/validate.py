"""Validation against a real shaped link: the real edge and verifier in two network namespaces, then the
simulator's prediction for the same trace and link, compared point by point.

Per point (uplink rate R, round trip RTT):
1. ``tc tbf`` shapes the edge's veth egress to R (``simulate/testbed/netns.py``); the downlink is the bare veth.
2. A delay relay (``simulate/testbed/relay.py``) in the cloud namespace holds every byte RTT/2 each way, in front
   of the verifier (``python -m cloud serve`` on the cloud namespace's loopback).
3. The real edge (``simulate/testbed/edge_run.py``) runs held-out problems in the edge namespace and writes its
   trace and per-generation wall times (Open handshake included), after one unrecorded warm-up
   generation (gRPC connection, HTTP/2 flow-control windows growing by BDP probing, the verifier's first
   forward passes: one-time costs the simulator does not model).
4. The simulator replays that very trace: one device, a fixed-rate uplink R (framing defaults: TCP/IP
   52 B + Ethernet 14 B per packet, which is what tbf counts), a 10 Gbit/s downlink, the RTT, the edge
   compute replayed from the trace, the verifier's time fitted from the trace's ``server_s``, and the
   testbed's per-Verify software latency (gRPC stacks + relay hop) measured once per validation run on a
   separate pass over the bare veth with zero added delay (median of wait - server there), never fitted
   to the shaped points.
5. Errors: |predicted - measured| / measured for tokens/s (all tokens / summed wall time) and for the
   median per-token latency (measured: the edge's compute + Verify wait per token).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from core.process import ROOT, ChildProcess, VerifierProcess, project_env
from simulate.config import LinkConfig, SimConfig
from simulate.engine import simulate
from simulate.testbed.netns import CLOUD_IP, Testbed, unavailable_reason
from simulate.trace import load_trace

def predict(trace_path: Path, rate_bps: float, rtt_s: float, rpc_overhead_s: float) -> dict:
    """The simulator's figures for one device replaying ``trace_path`` over the testbed's link."""
    trace = load_trace(trace_path, "validation")
    config = SimConfig(traces={"validation": str(trace_path)}, policy="validation", devices=1,
                       tokens_per_device=trace.tokens, rtt_s=rtt_s, uplink=LinkConfig(rate_bps=rate_bps),
                       downlink=LinkConfig(rate_bps=10e9), rpc_overhead_s=rpc_overhead_s)
    result = simulate(config, trace)
    return {"tokens_per_s": result.metrics["tokens_per_s"], "latency_p50_s": result.metrics["latency_p50_s"],
            "latency_p90_s": result.metrics["latency_p90_s"], "service_model": result.metrics["service_model"]}


def measured(trace_path: Path, timing_path: Path) -> dict:
    trace = load_trace(trace_path, "validation")
    timing = json.loads(timing_path.read_text())
    lat = np.concatenate([g.step_s + g.wait_s for g in trace.generations])
    return {"tokens_per_s": sum(timing["tokens"]) / sum(timing["walls_s"]), "latency_p50_s": float(np.median(lat)),
            "latency_p90_s": float(np.percentile(lat, 90)), "tokens": trace.tokens,
            "transmission_rate": trace.transmission_rate,
            "uplink_grpc_bytes_per_token": trace.grpc_up_bytes / trace.tokens}


def run_edge(bed: Testbed, verifier_port: str, model: Path, rtt_s: float, policy: str, problems: int,
             threshold: float, out: Path, tag: str) -> tuple[Path, Path]:
    """The real edge through the relay (RTT/2 each way) under the link's current shaping."""
    from simulate.testbed.relay import READY_PREFIX

    trace_path, timing_path = out / f"{tag}.jsonl", out / f"{tag}.timing.json"
    relay_cmd = [*bed.prefix(bed.cloud_ns), sys.executable, "-m", "simulate.testbed.relay", "--listen", f"{CLOUD_IP}:0",
                 "--target", f"127.0.0.1:{verifier_port}", "--delay", str(rtt_s / 2)]
    with ChildProcess(relay_cmd, READY_PREFIX, timeout=60) as relay:
        edge_cmd = [*bed.prefix(bed.edge_ns), sys.executable, "-m", "simulate.testbed.edge_run", "--model", str(model),
                    "--verifier", relay.address, "--policy", policy, "--threshold", str(threshold),
                    "--problems", str(problems), "--trace", str(trace_path), "--timing", str(timing_path)]
        done = subprocess.run(edge_cmd, cwd=ROOT, env=project_env(), capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"edge run failed ({done.returncode}): {done.stderr[-1500:]}")
    return trace_path, timing_path


def testbed_overhead(bed: Testbed, verifier_port: str, model: Path, policy: str, problems: int, threshold: float,
                     out: Path) -> float:
    """Median (Verify wait - verifier time) over the bare veth with no added delay: the software latency
    of one round trip through this testbed (both gRPC stacks and the relay hop)."""
    bed.unshape()
    trace_path, _ = run_edge(bed, verifier_port, model, 0.0, policy, problems, threshold, out, f"{policy}_bare")
    trace = load_trace(trace_path, "bare")
    return float(np.median(np.concatenate([g.wait_s[g.sent] - g.server_s[g.sent] for g in trace.generations])))


def run_point(bed: Testbed, verifier_port: str, model: Path, rate_bps: float, rtt_s: float, policy: str,
              problems: int, threshold: float, out: Path, rpc_overhead_s: float) -> dict:
    qdisc = bed.shape(rate_bps)
    tag = f"{policy}_{rate_bps / 1e6:g}mbit_{rtt_s * 1000:g}ms"
    trace_path, timing_path = run_edge(bed, verifier_port, model, rtt_s, policy, problems, threshold, out, tag)
    real, sim = measured(trace_path, timing_path), predict(trace_path, rate_bps, rtt_s, rpc_overhead_s)
    errors = {k: abs(sim[k] - real[k]) / real[k] for k in ("tokens_per_s", "latency_p50_s")}
    return {"policy": policy, "uplink_bps": rate_bps, "rtt_s": rtt_s, "qdisc": qdisc, "measured": real,
            "predicted": sim, "errors": errors, "max_error": max(errors.values()), "trace": str(trace_path)}


def run_validation(rates_bps: list[float], rtt_s: float, policy: str = "hlm", problems: int = 4,
                   threshold: float = 0.06, out: Path = Path("reports/sim/validation"),
                   model: Path | None = None) -> dict:
    """Every point on one testbed and one verifier process; raises RuntimeError if the testbed fails."""
    from eval.pair import LLM_DIR, ensure_export
    from tqdm import tqdm

    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    model = (model or ensure_export()).resolve()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    points = []
    with Testbed() as bed:
        with VerifierProcess(str(LLM_DIR), prefix=tuple(bed.prefix(bed.cloud_ns)),
                             startup_timeout=180) as verifier:
            port = verifier.address.rpartition(":")[2]
            overhead = testbed_overhead(bed, port, model, policy, problems, threshold, out)
            for rate in tqdm(rates_bps, desc="validation", unit="point"):
                points.append(run_point(bed, port, model, rate, rtt_s, policy, problems, threshold, out, overhead))
    report = {"points": points, "max_error": max(p["max_error"] for p in points), "rpc_overhead_s": overhead,
              "method": "tbf uplink shaping on a veth between two netns; RTT from a userspace delay relay "
                        "(simulate/testbed/relay.py); simulator replays each point's own trace",
              "command": shlex.join(["python", "-m", "simulate", "validate", *sys.argv[2:]])
              if sys.argv[1:2] == ["validate"] else None}
    (out / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict) -> str:
    lines = [f"{'uplink':>10} {'RTT':>6} {'tok/s real':>10} {'tok/s sim':>10} {'p50 ms real':>11} "
             f"{'p50 ms sim':>10} {'max err':>8}"]
    for p in report["points"]:
        m, s = p["measured"], p["predicted"]
        lines.append(f"{p['uplink_bps'] / 1e6:>7g} Mb {p['rtt_s'] * 1000:>4g}ms {m['tokens_per_s']:>10.2f} "
                     f"{s['tokens_per_s']:>10.2f} {m['latency_p50_s'] * 1000:>11.2f} {s['latency_p50_s'] * 1000:>10.2f} "
                     f"{p['max_error']:>8.1%}")
    lines.append(f"max error over all points: {report['max_error']:.1%}")
    return "\n".join(lines)


def main_validate(args) -> int:
    from core.cli import UserError

    reason = unavailable_reason()
    if reason:
        raise UserError(f"cannot validate here: {reason}")
    if not args.rtt_ms >= 0:
        raise UserError("--rtt-ms must be >= 0")
    if len(args.rates_mbit) < 1 or min(args.rates_mbit) <= 0:
        raise UserError("--rates-mbit needs positive rates")
    report = run_validation([r * 1e6 for r in args.rates_mbit], args.rtt_ms / 1000, args.policy, args.problems,
                            out=args.out)
    print(format_report(report))
    print(f"wrote {args.out}/validation.json")
    return 0
