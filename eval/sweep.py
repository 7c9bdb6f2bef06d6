"""The accuracy–transmission frontier: sweep thresholds × estimators × codecs × temperatures.

Every point is a full hybrid run of the held-out demo problems through the real verifier. Results go to
``frontier.csv`` one row per point as soon as the point finishes, so an interrupted sweep resumes where
it stopped (finished points are never rerun). Plots: accuracy vs transmission rate per estimator, and
accuracy vs uplink bytes per token per codec, with SLM-only, LLM-only and HLM marked.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from edge.hybrid import HybridConfig
from core.sampling import SamplingSettings
from eval.taskeval import Runner, summarize
from edge.uncertainty import ESTIMATORS
from models.task import MAX_SOLUTION_TOKENS, held_out_problems
from proto.distribution import CODEC_NAMES, CodecSpec

COLUMNS = ["temperature", "estimator", "codec", "u_th", "accuracy", "retention", "transmission_rate",
           "acceptance_rate", "uplink_bytes_per_token", "tokens_per_s", "problems", "seed"]
KEY = ("temperature", "estimator", "codec", "u_th", "problems", "seed")
BASELINE_ESTIMATORS = ("slm-only", "llm-only")  # rows that are not threshold points


@dataclass(frozen=True)
class SweepConfig:
    model: str  # edge ONNX folder
    verifier_model: str = "models/demo_pair/llm"  # started locally when ``verifier`` is not given
    verifier: str | None = None  # HOST:PORT of a running verifier
    problems: int = 200
    seed: int = 0
    temperatures: tuple[float, ...] = (0.0, 1.0)
    estimators: tuple[str, ...] = tuple(ESTIMATORS)
    codecs: tuple[str, ...] = ("adaptive", "topk", "full32")
    thresholds: dict | tuple = ()  # one list for all estimators, or {estimator: [u_th, ...]}
    pairs: tuple = ()  # explicit [estimator, codec] curves instead of estimators x codecs

    def curves(self) -> list[tuple[str, str]]:
        return [tuple(p) for p in self.pairs] or list(itertools.product(self.estimators, self.codecs))

    def thresholds_for(self, estimator: str) -> list[float]:
        values = self.thresholds.get(estimator, []) if isinstance(self.thresholds, dict) else self.thresholds
        return [float(v) for v in values]


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep config (JSON); errors name the offending field."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read sweep config {path}: {exc}") from None
    unknown = set(raw) - set(SweepConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"sweep config {path}: unknown field(s) {sorted(unknown)}")
    if "model" not in raw:
        raise ValueError(f"sweep config {path}: field 'model' (edge ONNX folder) is required")
    for field in ("temperatures", "estimators", "codecs", "pairs"):
        if field in raw:
            raw[field] = tuple(tuple(x) if isinstance(x, list) else x for x in raw[field])
    config = SweepConfig(**raw)
    if any(len(p) != 2 for p in config.pairs):
        raise ValueError("sweep config field 'pairs': each entry must be [estimator, codec]")
    bad = [e for e in config.estimators + tuple(p[0] for p in config.pairs) if e not in ESTIMATORS]
    if bad:
        raise ValueError(f"sweep config field 'estimators': unknown {bad}; known: {sorted(ESTIMATORS)}")
    bad = [c for c in config.codecs + tuple(p[1] for p in config.pairs) if c not in CODEC_NAMES]
    if bad:
        raise ValueError(f"sweep config field 'codecs': unknown {bad}; known: {list(CODEC_NAMES)}")
    if not isinstance(config.problems, int) or config.problems < 1:
        raise ValueError("sweep config field 'problems' must be a positive integer")
    for t in config.temperatures:
        SamplingSettings(temperature=t)  # raises with a clear message
    if not any(config.thresholds_for(e) for e, _ in config.curves()):
        raise ValueError("sweep config field 'thresholds': give a list, or {estimator: [u_th, ...]}")
    return config


def _key(row: dict) -> tuple:
    return tuple(str(float(row[k])) if k in ("temperature", "u_th") else str(row[k]) for k in KEY)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")  # per-problem lists stay out
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k) for k in COLUMNS})


def planned_points(config: SweepConfig) -> list[dict]:
    """Every point of the sweep, baselines first (retention needs LLM-only's accuracy)."""
    points = []
    for t in config.temperatures:
        points.append({"temperature": t, "estimator": "llm-only", "codec": "-", "u_th": math.inf})
        points.append({"temperature": t, "estimator": "slm-only", "codec": "full32", "u_th": math.inf})
        for estimator, codec in config.curves():
            for u_th in config.thresholds_for(estimator):
                points.append({"temperature": t, "estimator": estimator, "codec": codec, "u_th": u_th})
    for p in points:
        p.update(problems=config.problems, seed=config.seed)
    return points


def run_point(runner: Runner, point: dict, problems) -> dict:
    settings = SamplingSettings(temperature=point["temperature"])
    runner.settings = settings
    if point["estimator"] == "llm-only":
        row = runner.llm_only(problems)
    else:
        estimator = "max-prob" if point["estimator"] == "slm-only" else point["estimator"]
        config = HybridConfig(threshold=point["u_th"], estimator=estimator, codec=CodecSpec(point["codec"]),
                              settings=settings, max_new_tokens=MAX_SOLUTION_TOKENS)
        row = summarize(point["estimator"], runner.hybrid(point["estimator"], config, problems,
                                                          verify=point["estimator"] != "slm-only"))
    row.pop("config", None)
    return {**point, **row}


def run_sweep(config: SweepConfig, out: Path, runner: Runner) -> list[dict]:
    """Run every planned point not already in ``out/frontier.csv``; returns all rows."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "frontier.csv"
    done = {_key(r) for r in read_rows(csv_path)}
    todo = [p for p in planned_points(config) if _key(p) not in done]
    problems = held_out_problems(config.problems)
    llm_acc = {float(r["temperature"]): float(r["accuracy"]) for r in read_rows(csv_path)
               if r["estimator"] == "llm-only"}
    for point in tqdm(todo, desc="sweep", unit="point"):
        runner.seed = config.seed
        row = run_point(runner, point, problems)
        if row["estimator"] == "llm-only":
            llm_acc[float(row["temperature"])] = row["accuracy"]
        base = llm_acc.get(float(row["temperature"]))
        row["retention"] = row["accuracy"] / base if base else None
        append_row(csv_path, row)
    return read_rows(csv_path)


def lowest_tr_at(rows: list[dict], estimator: str, codec: str, temperature: float, retention: float = 0.99):
    """The lowest-transmission point of one curve whose accuracy is >= ``retention`` x LLM-only's."""
    ok = [r for r in rows if r["estimator"] == estimator and r["codec"] == codec
          and float(r["temperature"]) == temperature and r["retention"] not in ("", None)
          and float(r["retention"]) >= retention]
    return min(ok, key=lambda r: (float(r["transmission_rate"]), float(r["uplink_bytes_per_token"])), default=None)
