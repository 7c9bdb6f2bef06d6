"""Measured batched service time of the real verifier engine, fitted for the simulator's capacity study.

Builds the demo LLM's engine (``cloud.engine.VerifierModel``, 1 torch thread), prepares one per-session KV
cache per batch row at a realistic past length (the demo's prompts and solutions: 16-48 cached positions,
prefilled through the engine's own ``forward_batch``), then times ``BatchingWorker.forward_batch`` — ONE
padded forward, what the model thread runs for whatever is queued — for every batch shape of the grid:
rows x tail tokens per row (a row's tail is what its forward feeds: 1 for a cloud-only decode step,
1 + pending ids for a Verify, the prompt on a session's first). Blocks of one drafted position, as the edge
sends: one logits row per request. Besides the uniform grid, mixed batches (tails of different lengths in
one forward, padded to the longest) are timed too. Held out of the fit: batches as the simulator forms them (``held_out``): Verify tails drawn from the default policy's
trace (``reports/sim/traces/default.jsonl``, where recorded) and cloud-only decode steps with one prompt
prefill among them; their prediction error is reported.

Every point is timed ``repeats`` times, the points interleaved within each repeat (a load change on the
shared machine hits all alike), after one warm-up of each; the median is kept. Caches are cropped back to
their past length after each forward, so every repeat sees the same shape. ``simulate.batched`` fits the
model (``fit_batched``) and the JSON it writes is what ``verifier.service = "batched:PATH"`` loads; it records
the engine's split constant (``core.batch_plan.FORWARD_OVERHEAD_TOKENS``) and a hash of ``cloud/batching.py`` and ``core/batch_plan.py``
(``engine_sha256``: ``bench/sim.py`` measures again when the engine has changed).

Also measured, not in the model: the per-request work after the forward on the session's own thread
(``probabilities`` over the id space + the rejection rule), ``post_row_s``.

    .venv/bin/python -m bench.verifier_service [--out reports/sim/verifier_batched.json] [--repeats 7]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cloud import batching
from cloud.batching import ForwardJob
from core import batch_plan
from core.batch_plan import FORWARD_OVERHEAD_TOKENS
from cloud.engine import VerifierModel
from cloud.kvstore import SessionKV
from cloud.rejection import verify_draft
from core.sampling import SamplingSettings, probabilities
from proto.distribution import CodecSpec, compress
from simulate.batched import fit_batched

LLM = "models/demo_pair/llm"
OUT = Path("reports/sim/verifier_batched.json")
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # 512 one-token rows took 3x 256 (359 vs 118 ms): not linear, not modelled
TAILS = (1, 2, 4, 8, 16)  # decode steps (1), Verifies (1 + pending: the default policy's median is ~8-16)
MIXED = ((1, 4), (1, 2, 4, 8, 16))  # tails cycled over the rows of a mixed batch
PAST = (16, 48)  # cached positions per row, spread evenly over this range (demo prompt + solution so far)
MAX_BATCH_TOKENS = 4096  # the engine's default padded-token budget: no shape above it is ever run
TRACE = Path("reports/sim/traces/default.jsonl")
HELD_OUT_ROWS = (8, 32, 64)
PROMPT = 12  # the demo's cloud-only prompt (tokens prefilled by a Generate's first step)


def engine_sha256() -> str:
    """A hash of the engine's batching code and split rule: a measurement of another version is stale."""
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (batching, batch_plan))).hexdigest()


def grid() -> list[tuple[int, ...]]:
    """Every measured batch as its rows' tails (uniform shapes, then mixed ones), within the token budget."""
    shapes = [(tail,) * rows for rows in ROWS for tail in TAILS]
    shapes += [tuple(cycle[i % len(cycle)] for i in range(rows)) for cycle in MIXED for rows in ROWS if rows >= 4]
    return [s for s in shapes if len(s) * max(s) <= MAX_BATCH_TOKENS]


def held_out(rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Batches as the simulator forms them: Verify tails from the default trace, and decode steps + one prefill."""
    shapes = [(PROMPT,) + (1,) * (rows - 1) for rows in HELD_OUT_ROWS]
    if TRACE.is_file():
        from simulate.trace import load_trace

        tails = np.concatenate([g.prefilled()[g.sent] for g in load_trace(TRACE).generations if g.sent.any()])
        shapes += [tuple(int(t) for t in rng.choice(tails, size=rows)) for rows in HELD_OUT_ROWS]
    return [s for s in shapes if len(s) * max(s) <= MAX_BATCH_TOKENS]


def prefilled(engine: VerifierModel, rows: int, rng: np.random.Generator) -> list[tuple[SessionKV, list[int]]]:
    """``rows`` session caches, each holding a random context of its past length (a forward per group of 16)."""
    past = np.linspace(*PAST, num=rows).round().astype(int) if rows > 1 else [PAST[0]]
    sessions = [(SessionKV(), rng.integers(100, engine.id_space, size=int(n)).tolist()) for n in past]
    for i in range(0, rows, 16):
        engine._worker.forward_batch([ForwardJob(kv, ids, 1) for kv, ids in sessions[i : i + 16]])
    return sessions


def time_shape(engine, sessions, tails: tuple[int, ...], rng: np.random.Generator) -> tuple[float, float]:
    """(wall, this thread's CPU) seconds of one ``forward_batch`` over the first len(tails) sessions, each fed its
    tail (then cropped back). With 1 torch thread the forward runs on the calling thread, so its CPU time is the
    forward's time on a core of its own, whatever else the machine runs."""
    jobs = [ForwardJob(kv, ids + rng.integers(100, engine.id_space, size=t).tolist(), 1)
            for (kv, ids), t in zip(sessions, tails)]
    wall, cpu = time.perf_counter(), time.thread_time()
    engine._worker.forward_batch(jobs)
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    for kv, ids in sessions[: len(tails)]:
        kv.crop(len(ids))
    return wall, cpu


def post_row_seconds(engine: VerifierModel, sessions, rng: np.random.Generator, n: int = 50) -> float:
    """Median per-request work after the forward (a Verify's q and rejection rule), on one logits row."""
    kv, ids = sessions[0]
    logits = engine._worker.forward_batch([ForwardJob(kv, ids + [101], 1)])[0][-1]
    kv.crop(len(ids))
    settings, spec = SamplingSettings(temperature=1.0), CodecSpec("adaptive")
    p_tilde = compress(probabilities(logits, settings), spec)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        q = probabilities(logits, settings)
        verify_draft(int(p_tilde.support[0]), p_tilde.dense(engine.id_space), q, rng, False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(repeats: int = 7, seed: int = 0) -> dict:
    engine = VerifierModel(LLM, threads=1, batching=True, max_batch_tokens=MAX_BATCH_TOKENS)
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    fitted, check = grid(), held_out(rng)
    shapes = fitted + check
    with torch.inference_mode():
        sessions = prefilled(engine, max(len(s) for s in shapes), rng)
        for tails in shapes:  # warm-up: first use of a shape allocates
            time_shape(engine, sessions, tails, rng)
        times: dict[tuple, list[tuple[float, float]]] = {tails: [] for tails in shapes}
        for _ in range(repeats):
            for i in rng.permutation(len(shapes)):
                times[shapes[i]].append(time_shape(engine, sessions, shapes[i], rng))
        post = post_row_seconds(engine, sessions, rng)

    def point(tails: tuple[int, ...]) -> dict:
        v = times[tails]
        return {"tails": list(tails), "rows": len(tails), "longest": max(tails),
                "median_s": statistics.median(c for _, c in v), "wall_median_s": statistics.median(w for w, _ in v), "wall_min_s": min(w for w, _ in v)}

    return {"points": [point(t) for t in fitted], "held_out": [point(t) for t in check], "post_row_s": post,
            "repeats": repeats, "past": list(PAST), "threads": 1, "max_batch_tokens": MAX_BATCH_TOKENS, "source": LLM,
            "engine_sha256": engine_sha256(), "load_average": list(os.getloadavg())}


def run(out: Path = OUT, repeats: int = 7) -> dict:
    """Measure, fit, write ``out`` (the simulator's ``batched:`` service file); returns what was written."""
    report = measure(repeats)
    model = fit_batched([p["tails"] for p in report["points"]], [p["median_s"] for p in report["points"]],
                        report["max_batch_tokens"], FORWARD_OVERHEAD_TOKENS)
    for p in report["held_out"]:
        p["predicted_s"] = model.batch_time(p["tails"])
    errors = [abs(p["predicted_s"] - p["median_s"]) / p["median_s"] for p in report["held_out"]]
    report = {"model": model.as_dict(), "held_out_max_rel_error": max(errors, default=None), **report,
              "command": f".venv/bin/python -m bench.verifier_service --out {out} --repeats {repeats}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def format_table(report: dict) -> str:
    """Median ms per forward, rows x tail (uniform shapes), and the fitted model."""
    cells = {(p["rows"], p["longest"]): p["median_s"] for p in report["points"] if len(set(p["tails"])) == 1}
    lines = ["rows \\ tail " + "".join(f"{t:>9}" for t in TAILS)]
    for rows in ROWS:
        lines.append(f"{rows:>11} " + "".join(f"{cells[rows, t] * 1e3:9.2f}" if (rows, t) in cells else f"{'':>9}"
                                              for t in TAILS))
    m = report["model"]
    lines.append(f"model: {m['formula']}, R^2 {m['r2']:.4f} over {m['samples']} batch shapes")
    for p in report["held_out"]:
        lines.append(f"held out: {p['rows']:>3} rows, tails {p['tails'][:6]}...: measured {p['median_s'] * 1e3:.2f} ms, "
                     f"model {p['predicted_s'] * 1e3:.2f} ms")
    lines.append(f"post-forward work per request (not in the model): {report['post_row_s'] * 1e3:.3f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(format_table(run(args.out, args.repeats)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
