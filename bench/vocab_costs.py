"""Per-token work outside the model forward at a large vocabulary, stage by stage (goal <= 2% of a step).

At every position the edge forms ``p`` from the logits with the session's sampling settings
(``core.sampling.probabilities``), compresses it (``proto.distribution.compress``), draws the draft from
``p~`` (``Compressed.sample``) and computes the uncertainty ``u`` from the raw logits
(``edge.uncertainty``). None of that touches the model, so it is measured here alone, on synthetic
float32 logits ``[V]`` at Qwen2.5-0.5B's ``V = 151,936``, without building a model:

- ``normal``: standard normal * 3, a flat position (top-p needs thousands of ids to reach its mass);
- ``peaked``: standard normal * 2 with a handful of ids far above the rest, a confident position.

Each stage is timed alone, median µs over ``repeats`` calls. ``total_us`` adds up the stages one step
runs (p, compress, draw, u) for each codec, with the slowest closed-form estimator; the perturbation
estimators (U-HLM's K = 20 samples and its mode variant) are reported but left out of the goal, which
is ``GOAL_SHARE`` of the fastest measured 0.5B decode step (``STEP_MS``).

Timings depend on the machine and its load: run with one BLAS/OpenMP thread on a quiet machine.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable

import numpy as np

from core.sampling import SamplingSettings, probabilities
from edge.uncertainty import ESTIMATORS
from proto.distribution import CODEC_NAMES, CodecSpec, compress

QWEN_VOCAB = 151_936  # Qwen2.5-0.5B's logit rows
STEP_MS = {"fp32": 60.0, "int8": 23.0, "genai-int4": 14.0}  # 0.5B forward per token on the 2-core CPU
GOAL_SHARE = 0.02
GOAL_US = GOAL_SHARE * min(STEP_MS.values()) * 1e3  # ~280 µs: the budget on the fastest step
PERTURBATION = ("uhlm", "perturb-mode")  # K forward-free softmaxes each: outside the goal
SETTINGS = {
    "temp1": SamplingSettings(1.0),
    "temp1_topk50": SamplingSettings(1.0, top_k=50),
    "temp1_topp0.9": SamplingSettings(1.0, top_p=0.9),
    "temp1_topk50_topp0.9": SamplingSettings(1.0, top_k=50, top_p=0.9),
    "greedy": SamplingSettings(0.0),
}


def synthetic_logits(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """{case: float32 logits [vocab]}: a flat ``normal`` position and a confident ``peaked`` one."""
    rng = np.random.default_rng(seed)
    normal = (rng.standard_normal(vocab) * 3).astype(np.float32)
    peaked = rng.standard_normal(vocab) * 2
    top = rng.choice(vocab, size=min(5, vocab), replace=False)
    peaked[top] += np.array([20.0, 16.0, 14.0, 12.0, 10.0])[: top.size]
    return {"normal": normal, "peaked": peaked.astype(np.float32)}


def median_us(fn: Callable[[], object], repeats: int) -> float:
    """Median wall µs of ``fn()`` over ``repeats`` calls, after one untimed warm-up call."""
    fn()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return float(np.median(times)) * 1e6


def _case(logits: np.ndarray, repeats: int) -> dict:
    """Every stage on one logit row: u per estimator, then p, compress and draw per settings and codec."""
    rng = np.random.default_rng(1)
    draft = int(np.argmax(logits))
    u_us = {name: median_us(lambda e=e: e(logits, draft, rng), repeats) for name, e in ESTIMATORS.items()}
    closed_form = max(us for name, us in u_us.items() if name not in PERTURBATION)
    out = {"uncertainty_us": u_us, "settings": {}}
    for label, settings in SETTINGS.items():
        p = probabilities(logits, settings)
        row = {"probabilities_us": median_us(lambda s=settings: probabilities(logits, s), repeats),
               "compress_us": {}, "sample_us": {}, "total_us": {}}
        for name in CODEC_NAMES:
            spec = CodecSpec(name)
            p_tilde = compress(p, spec)
            row["compress_us"][name] = median_us(lambda s=spec: compress(p, s), repeats)
            row["sample_us"][name] = median_us(lambda c=p_tilde: c.sample(rng), repeats)
            row["total_us"][name] = (row["probabilities_us"] + row["compress_us"][name]
                                     + row["sample_us"][name] + closed_form)
        out["settings"][label] = row
    return out


def measure(vocab: int = QWEN_VOCAB, repeats: int = 200) -> dict:
    """Per-stage median µs at ``vocab``: {"cases": {case: {"uncertainty_us": {estimator: µs},
    "settings": {settings: {"probabilities_us", "compress_us": {codec: µs}, "sample_us": {codec: µs},
    "total_us": {codec: µs}}}}}, "worst_total_us", "goal_us", "over_goal": ["case/settings/codec", ...],
    "goal_met", the machine's load and thread settings}.
    """
    load = os.getloadavg()[0]
    cases = {name: _case(logits, repeats) for name, logits in synthetic_logits(vocab).items()}
    totals = {f"{case}/{label}/{codec}": us for case, c in cases.items()
              for label, row in c["settings"].items() for codec, us in row["total_us"].items()}
    over = [name for name, us in totals.items() if us > GOAL_US]
    return {
        "vocab": vocab,
        "repeats": repeats,
        "load_avg_1min": load,  # before the run: a busy machine inflates every number
        "cpu_count": os.cpu_count(),
        "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "cases": cases,
        "worst_total_us": max(totals.values()),
        "goal_us": GOAL_US,
        "over_goal": over,
        "goal_met": not over,
        "excluded_from_goal": list(PERTURBATION),
    }


def format_table(result: dict) -> str:
    """The section as plain text: u per estimator, then p and the per-codec step totals per settings."""
    lines = [f"\nper-token work outside the forward at V = {result['vocab']:,} (median µs; goal <= "
             f"{result['goal_us']:.0f} µs without {' / '.join(result['excluded_from_goal'])}; "
             f"load {result['load_avg_1min']:.2f})"]
    for case, c in result["cases"].items():
        lines.append(f"  {case}: u " + ", ".join(f"{n} {us:.0f}" for n, us in c["uncertainty_us"].items()))
        for label, row in c["settings"].items():
            totals = ", ".join(f"{n} {us:.0f}" for n, us in row["total_us"].items())
            lines.append(f"    {label:<21} p {row['probabilities_us']:>5.0f}  total: {totals}")
    lines.append(f"  goal met: {result['goal_met']}" + (f" (over: {len(result['over_goal'])} rows)"
                                                        if result["over_goal"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    repeats = int(argv[0]) if argv else 200
    result = measure(repeats=repeats)
    result["command"] = shlex.join(["python", "-m", "bench.vocab_costs", *argv])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
