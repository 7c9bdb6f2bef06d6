"""What a span-learned SLM buys, measured on held-out problems through the real edge loop and verifier.

Rows (each on the same held-out problems, problem ``i`` with seed ``seed + i``, at the given temperature):

- ``slm-alone base``: the demo SLM's ONNX export alone (``edge/coarse.py`` without a verifier);
- ``slm-alone span``: the span-learned SLM alone: with nobody to offload to, the marker is masked out;
- ``span-learned``: the span-learned SLM with a verifier; where it draws the marker, the LLM writes the rest
  of the step (``Verify.span``). Inexact by design: the SLM's own text is never verified;
- ``llm-only``: the verifier generates every token (``Generate``), the accuracy ceiling;
- with a control SLM (the same fine-tune on the same rows, no marker): ``slm-alone control`` (is any gain the
  marker's, or just more training?) and ``span-uncertainty control`` (SplitReason's trigger learned vs the
  heuristic u > u_th at the same offload rate, on equally trained SLMs).

Reported per row: accuracy (with its 95% interval), the offload rate (marker draws per SLM draw and per
generated token), the LLM's share of the tokens and round trips per token. Step ends for the spans: by
default the ids ``eval`` uses (``models/task.py`` STEP_END_TEXTS encoded: ``;``, `` #``, ``#``); ``all`` adds
every id whose text holds ``;`` or ``#`` (the BPE's merged ``;-`` and `` #-`` end a step too, which the default
set misses: a span that reaches one of them runs on to the next plain step end or EOS).

``models`` may not import ``eval`` (tests/test_layout.py), so the loop over problems is written here in the
way ``eval/taskeval.py`` ``Runner.coarse`` runs them.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.process import VerifierProcess
from core.sampling import SamplingSettings
from edge.client import VerifierSession, connect, generate_remote
from edge.coarse import CoarseConfig, CoarseResult, generate_coarse
from edge.hybrid import HybridConfig, generate_hybrid
from edge.model import EdgeModel
from models.task import MAX_SOLUTION_TOKENS, STEP_END_TEXTS, held_out_problems, is_correct, sample_problems

Z95 = 1.959964
STEP_END_SETS = ("task", "all")
CALIBRATION_SEED = 777  # training-split problems for the matched threshold (as eval's calibration uses)


@dataclass
class Row:
    """One configuration over the problems: per-problem correctness and the summed counters."""

    name: str
    correct: list[int]
    tokens: int
    llm_tokens: int
    triggers: int  # marker draws sent as span requests
    round_trips: int
    seconds: float

    def summary(self) -> dict:
        n, tokens = len(self.correct), max(1, self.tokens)
        accuracy = sum(self.correct) / n
        slm_draws = self.tokens - self.llm_tokens + self.triggers  # a trigger's draft is dropped, but was drawn
        return {
            "config": self.name, "problems": n, "accuracy": accuracy,
            "ci95": Z95 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / n),
            "offload_per_slm_draw": self.triggers / slm_draws if slm_draws else 0.0,
            "offload_per_token": self.triggers / tokens, "llm_token_share": self.llm_tokens / tokens,
            "round_trips_per_token": self.round_trips / tokens, "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0, "correct": self.correct,
        }


def step_end_ids(model: EdgeModel, which: str = "task") -> frozenset[int]:
    """The ids that end a step: ``task`` = STEP_END_TEXTS encoded (as eval does), ``all`` = every id whose
    text holds a step end (``;`` or ``#``)."""
    if which not in STEP_END_SETS:
        raise ValueError(f"step ends must be one of {', '.join(STEP_END_SETS)}, got {which!r}")
    if which == "task":
        return frozenset(i for text in STEP_END_TEXTS for i in model.encode(text, add_special_tokens=False))
    chars = set("".join(STEP_END_TEXTS).replace(" ", ""))
    vocab = model.tokenizer.get_vocab()
    return frozenset(i for i in vocab.values() if set(model.tokenizer.decode([i], skip_special_tokens=False)) & chars)


def span_config(model: EdgeModel, settings: SamplingSettings, marker_id: int, ends: str = "task") -> CoarseConfig:
    hybrid = HybridConfig(threshold=math.inf, settings=settings, max_new_tokens=MAX_SOLUTION_TOKENS)
    return CoarseConfig("span-learned", hybrid, step_end_ids(model, ends), marker_id=marker_id)


def run_coarse(name: str, model: EdgeModel, config: CoarseConfig, problems, seed: int, channel=None,
               progress: bool = True) -> Row:
    """Every problem through ``generate_coarse`` (with a verifier session when ``channel`` is given)."""
    from tqdm import tqdm

    row = Row(name, [], 0, 0, 0, 0, 0.0)
    for i, problem in enumerate(tqdm(problems, desc=name, unit="problem", leave=False, disable=not progress)):
        opener = None
        if channel is not None:
            opener = _opener(channel, model, seed + i)
        result = generate_coarse(model, model.encode(problem.prompt), config, seed=seed + i, open_session=opener)
        _add(row, problem, result, model)
    return row


def _opener(channel, model: EdgeModel, seed: int):
    def open_session(prompt_ids, settings, codec, **open_args):  # span_stop_ids
        return VerifierSession(channel, model.manifest.fingerprint, prompt_ids, settings, codec, seed=seed,
                               **open_args)
    return open_session


def _add(row: Row, problem, result: CoarseResult, model: EdgeModel) -> None:
    row.correct.append(int(is_correct(problem, result.text)))
    row.tokens += len(result.token_ids)
    row.llm_tokens += result.llm_tokens
    row.triggers += result.sent_positions  # span-learned sends exactly its trigger positions
    row.round_trips += result.round_trips
    row.seconds += result.seconds


def run_llm_only(model: EdgeModel, channel, settings: SamplingSettings, problems, seed: int,
                 progress: bool = True) -> Row:
    """The verifier generates every token (Generate), same seeds."""
    from tqdm import tqdm

    row = Row("llm-only", [], 0, 0, 0, 0, 0.0)
    for i, problem in enumerate(tqdm(problems, desc="llm-only", unit="problem", leave=False, disable=not progress)):
        t0 = time.perf_counter()
        ids, _, _ = generate_remote(channel, model.manifest.fingerprint, model.encode(problem.prompt), settings,
                                    MAX_SOLUTION_TOKENS, sorted(model.eos_ids), seed=seed + i)
        row.seconds += time.perf_counter() - t0
        row.correct.append(int(is_correct(problem, model.decode(ids))))
        row.tokens, row.llm_tokens = row.tokens + len(ids), row.llm_tokens + len(ids)
        row.round_trips += 1
    return row


def marker_of(model: EdgeModel) -> int:
    marker = model.manifest.offload_marker_id
    if marker is None:
        raise ValueError(f"{model.folder} has no offload_marker_id in its manifest: export a span-learned SLM "
                         "(python -m models span-slm)")
    return marker


def matched_threshold(model: EdgeModel, settings: SamplingSettings, rate: float, n: int = 200,
                      seed: int = CALIBRATION_SEED) -> float:
    """The u threshold (default estimator) above which a share ``rate`` of the SLM's positions lies, measured on
    ``n`` training-split problems (never the held-out ones): span-uncertainty at the learned marker's rate."""
    config = HybridConfig(threshold=math.inf, settings=settings, max_new_tokens=MAX_SOLUTION_TOKENS)
    us = [r.u for i, p in enumerate(sample_problems(n, "train", seed=seed))
          for r in generate_hybrid(model, model.encode(p.prompt), config, seed=seed + i).records]
    return float(np.quantile(us, 1.0 - rate))


def uncertainty_config(model: EdgeModel, settings: SamplingSettings, threshold: float,
                       ends: str = "task") -> CoarseConfig:
    hybrid = HybridConfig(threshold=threshold, settings=settings, max_new_tokens=MAX_SOLUTION_TOKENS)
    return CoarseConfig("span-uncertainty", hybrid, step_end_ids(model, ends))


def measure(span_onnx: Path, base_onnx: Path, llm: Path, n: int = 300, temperature: float = 1.0, seed: int = 0,
            threads: int = 1, ends: tuple[str, ...] = ("task",), control_onnx: Path | None = None,
            progress: bool = True) -> dict:
    """Every row of the module docstring on ``n`` held-out problems; returns the report (rows and conditions).

    With ``control_onnx`` (the same fine-tune without the marker) two more rows: that SLM alone, and that SLM
    with span-uncertainty at the threshold that offloads as often as span-learned did (``matched_threshold``)."""
    load_before = list(os.getloadavg())
    span, base = EdgeModel(span_onnx, threads=threads), EdgeModel(base_onnx, threads=threads)
    control = EdgeModel(control_onnx, threads=threads) if control_onnx is not None else None
    marker = marker_of(span)
    settings, problems = SamplingSettings(temperature=temperature), held_out_problems(n)
    alone = [("slm-alone base", base), ("slm-alone span", span)] + ([("slm-alone control", control)] if control else [])
    rows = [run_coarse(name, m, span_config(m, settings, marker), problems, seed, progress=progress)
            for name, m in alone]
    extra = {}
    with VerifierProcess(str(llm), extra_args=("--threads", str(threads))) as verifier:
        channel = connect(verifier.address)
        try:
            for which in ends:
                rows.append(run_coarse(f"span-learned (step ends: {which})", span,
                                       span_config(span, settings, marker, which), problems, seed, channel, progress))
            if control is not None:
                rate = rows[len(alone)].summary()["offload_per_slm_draw"]
                extra["matched_threshold"] = threshold = matched_threshold(control, settings, rate)
                rows.append(run_coarse(f"span-uncertainty control u>{threshold:.3g}", control,
                                       uncertainty_config(control, settings, threshold, ends[0]), problems, seed,
                                       channel, progress))
            rows.append(run_llm_only(span, channel, settings, problems, seed, progress))
        finally:
            channel.close()
    return {"rows": [r.summary() for r in rows], "marker_id": marker, "problems": n, "temperature": temperature,
            "seed": seed, "threads": threads, "span_slm": str(span_onnx), "base_slm": str(base_onnx), "llm": str(llm),
            "control_slm": str(control_onnx) if control_onnx else None, **extra,
            "load_average": {"before": load_before, "after": list(os.getloadavg())}}


def format_report(report: dict) -> str:
    head = (f"{'config':<32} {'accuracy':>13} {'offload/draw':>12} {'offload/tok':>11} {'LLM share':>9} "
            f"{'RT/tok':>7} {'tok/s':>7}")
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        lines.append(f"{r['config']:<32} {100 * r['accuracy']:>6.1f}±{100 * r['ci95']:<5.1f} "
                     f"{r['offload_per_slm_draw']:>12.4f} {r['offload_per_token']:>11.4f} {r['llm_token_share']:>9.3f} "
                     f"{r['round_trips_per_token']:>7.3f} {r['tokens_per_s']:>7.1f}")
    lines.append(f"{report['problems']} held-out problems, T={report['temperature']:g}, "
                 f"marker id {report['marker_id']}; "
                 "span-learned is inexact by design (unverified SLM text); load average before/after "
                 f"{report['load_average']['before'][0]:.2f}/{report['load_average']['after'][0]:.2f}")
    return "\n".join(lines)
