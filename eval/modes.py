"""`python -m eval modes`: every collaboration mode on the same held-out problems, seeds and verifier.

One row per mode x temperature with the quantities every report uses (``modes.rows`` in make bench):
accuracy with its 95% interval, retention vs LLM-only, transmission rate (positions sent for checking per
token), the LLM's share of the tokens, round trips, uplink and downlink bytes per token, tokens/s on
loopback, whether the mode is exact, and the paired 95% interval of its accuracy difference to ``default``
(the same problems and seeds: far tighter than two independent intervals). Thresholds come from the same
calibration as ``make demo`` (the ``empirical`` rule on the default estimator), at each temperature.

``sim_tokens_per_s`` (the same modes' traces replayed by the simulator at 10 Mbit/s, 50 ms RTT, one device)
is null here: eval does not import the simulator; ``make bench``'s modes section and ``python -m simulate
modes`` fill it (``simulate/modes.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from core.sampling import SamplingSettings
from eval.pair import calibrate
from eval.policies import HYBRID, POLICIES, ROUTED
from eval.routing import routed_policy_row
from eval.slms import SlmCache
from eval.taskeval import Runner

MODES = ("slm-only", "llm-only", "default", "default-pipelined", "span-uncertainty", "span-learned", "step-judge",
         "step-judge-mean", "step-judge-gated", "step-exact", "conditioned-slm-only", "conditioned-slm-zeros",
         "conditioned", "distilled-slm-only", "distilled", "routed")
Z95 = 1.959964
RETENTION_TARGET = 0.99  # tr_at_99: the lowest transmission rate keeping this share of LLM-only's accuracy
TR_GRID = (0.3, 0.2, 0.1, 0.06, 0.03, 0.01, 0.003)  # u_th scanned for it, from the fewest sends down


def ci95(correct: list[int]) -> float:
    """Half-width of the normal-approximation 95% interval of a success rate."""
    n = len(correct)
    p = sum(correct) / n
    return Z95 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def paired_diff_ci95(a: list[int], b: list[int]) -> tuple[float, float]:
    """(mean of a - b, half-width of its 95% interval) over paired problems."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(1, n - 1)
    return mean, Z95 * math.sqrt(var / n)


def tr_at_99(runner, policy, problems, llm_accuracy: float, grid: tuple[float, ...] = TR_GRID) -> dict:
    """The lowest transmission rate at >= 99% retention of a token-level policy: the policy at each u_th of
    ``grid`` from the largest (fewest tokens sent) down, stopping at the first that keeps 99% of LLM-only's
    accuracy (TR falls as u_th rises, accuracy wanders within its noise: the scan reports the first grid point
    that holds, as a user choosing a threshold would). None when no grid point holds."""
    for threshold in grid:
        row = runner.policy(policy.at(threshold), problems, threshold)
        if row["accuracy"] >= RETENTION_TARGET * llm_accuracy:
            return {"tr_at_99": row["transmission_rate"], "tr_at_99_threshold": threshold,
                    "tr_at_99_accuracy": row["accuracy"],
                    "tr_at_99_uplink_bytes_per_token": row["uplink_bytes_per_token"]}
    return {"tr_at_99": None, "tr_at_99_threshold": None, "tr_at_99_accuracy": None,
            "tr_at_99_uplink_bytes_per_token": None}


def searches_tr(policy) -> bool:
    """tr_at_99 applies to token-level policies with a calibrated threshold, pipelining aside (same tokens)."""
    return policy.route == HYBRID and policy.calibrated and not policy.lookahead


def run_temperature(runner_for: Callable, problems, temperature: float, calibration_problems: int,
                    modes: tuple[str, ...] = MODES) -> list[dict]:
    """Every mode at one temperature, in order; llm-only first (retention needs it). ``runner_for(temperature,
    slm)`` gives a Runner of edge model ``slm`` (``Policy.slm``) on the shared channel and seed; each edge model's
    thresholds are calibrated on its own estimates, once."""
    fits, rows = {}, {}
    for name in ("llm-only", *(m for m in modes if m != "llm-only")):
        policy = POLICIES[name]
        runner = runner_for(temperature, policy.slm)
        if policy.calibrated and policy.slm not in fits:
            fits[policy.slm] = calibrate(runner, calibration_problems)
        if policy.route == ROUTED:
            rows[name] = routed_policy_row(runner, problems, fits[policy.slm])
        else:
            rows[name] = runner.policy(policy, problems, policy.threshold_from(fits.get(policy.slm)))
    llm = rows["llm-only"]["accuracy"]
    out = []
    for name in modes:
        row, policy = rows[name], POLICIES[name]
        diff, half = paired_diff_ci95(row["correct"], rows["default"]["correct"]) if "default" in rows else (None, None)
        out.append({"mode": name, "temperature": temperature, "exact": policy.exact, "slm": policy.slm,
                    "threshold": policy.threshold_from(fits.get(policy.slm)) if policy.calibrated else None,
                    "accuracy": row["accuracy"], "ci95": ci95(row["correct"]),
                    "retention": row["accuracy"] / llm if llm else None,
                    "diff_vs_default": diff, "diff_vs_default_ci95": half,
                    **{k: row.get(k) for k in ("transmission_rate", "acceptance_rate", "llm_token_share",
                                               "round_trips_per_token",
                                               "uplink_bytes_per_token", "downlink_bytes_per_token",
                                               "tokens_per_s", "tokens_digest", "correct", "cloud_share",
                                               "llm_tokens_per_problem", "router_threshold", "first_token_ms")},
                    "sim_tokens_per_s": None, "problems": len(problems)})
    return out


def add_tr_at_99(rows: list[dict], runner_for: Callable, problems) -> None:
    """``tr_at_99`` into every row it applies to (``searches_tr``); the others get None."""
    n = len(problems)
    llm = {r["temperature"]: sum(r["correct"][:n]) / n for r in rows if r["mode"] == "llm-only"}  # same problems
    for row in rows:
        policy = POLICIES[row["mode"]]
        if searches_tr(policy) and row["temperature"] in llm:
            row.update(tr_at_99(runner_for(row["temperature"], policy.slm), policy, problems, llm[row["temperature"]]))
        else:
            row.setdefault("tr_at_99", None)


def run_modes(runner_for: Callable, problems, temperatures: tuple[float, ...], calibration_problems: int,
              command: str, modes: tuple[str, ...] = MODES, tr_problems: int = 0) -> dict:
    """The section: ``runner_for(temperature, slm)`` gives a Runner at that temperature (same channel, same seed).
    ``tr_problems`` > 0: each token-level row's ``tr_at_99`` on the first that many problems (a threshold scan)."""
    load_before = list(os.getloadavg())
    rows = [row for t in temperatures for row in run_temperature(runner_for, problems, t, calibration_problems,
                                                                  modes)]
    if tr_problems:
        add_tr_at_99(rows, runner_for, problems[:tr_problems])
    return {"rows": rows, "problems": len(problems), "temperatures": list(temperatures), "command": command,
            "tr_at_99": {"problems": min(tr_problems, len(problems)), "grid": list(TR_GRID),
                         "retention": RETENTION_TARGET} if tr_problems else None,
            "load_average": {"before": load_before, "after": list(os.getloadavg())},
            "inexact": [m for m in modes if not POLICIES[m].exact]}


def runner_factory(slms: SlmCache, channel, seed: int) -> Callable:
    """``runner_for(temperature, slm="demo")``: a Runner of that edge model on ``channel`` with ``seed``."""
    def runner_for(temperature: float, slm: str = "demo") -> Runner:
        return Runner(slms.get(slm), channel, SamplingSettings(temperature=temperature), seed)
    return runner_for


@contextmanager
def modes_runners(threads: int = 1, provider: str = "auto", verifier: str | None = None, seed: int = 0,
                  timeout: float = 30.0, demo_model: str | None = None) -> Iterator[Callable]:
    """``runner_for`` against ``verifier`` (HOST:PORT) or a local demo-LLM verifier started here (``threads``
    threads), each edge model loaded once (``demo_model``: another export in place of the demo SLM's)."""
    from core.process import VerifierProcess
    from edge.client import connect
    from eval.pair import LLM_DIR

    with ExitStack() as stack:
        address = verifier or stack.enter_context(VerifierProcess(
            str(LLM_DIR), extra_args=("--threads", str(threads)))).address
        channel = connect(address, timeout=timeout)
        stack.callback(channel.close)
        overrides = {"demo": Path(demo_model)} if demo_model else None
        yield runner_factory(SlmCache(threads, provider, overrides), channel, seed)


def format_table(section: dict) -> str:
    head = (f"{'mode':<22} {'T':>3} {'exact':>5} {'accuracy':>15} {'vs default':>15} {'retention':>9} {'TR':>6} "
            f"{'TR@99':>6} {'LLM share':>9} {'RT/tok':>7} {'up B/tok':>8} {'down B/tok':>10} {'tok/s':>7}")
    lines = [head, "-" * len(head)]
    for r in section["rows"]:
        diff = ("-" if r["diff_vs_default"] is None
                else f"{100 * r['diff_vs_default']:+.1f}±{100 * r['diff_vs_default_ci95']:.1f}")
        tr99 = "-" if r.get("tr_at_99") is None else f"{r['tr_at_99']:.3f}"
        lines.append(f"{r['mode']:<22} {r['temperature']:>3g} {'yes' if r['exact'] else 'NO':>5} "
                     f"{100 * r['accuracy']:>8.1f}±{100 * r['ci95']:<5.1f} {diff:>15} {r['retention']:>9.3f} "
                     f"{r['transmission_rate']:>6.3f} {tr99:>6} {r['llm_token_share']:>9.3f} "
                     f"{r['round_trips_per_token']:>7.3f} {r['uplink_bytes_per_token']:>8.1f} "
                     f"{r['downlink_bytes_per_token']:>10.1f} {r['tokens_per_s']:>7.1f}")
    lines.append(f"{section['problems']} held-out problems per row; accuracy in points with its 95% interval; "
                 f"'vs default': paired difference on the same problems and seeds; TR@99: lowest transmission rate "
                 f"at >= 99% retention (threshold scan). Inexact by design: {', '.join(section['inexact'])}")
    return "\n".join(lines)
