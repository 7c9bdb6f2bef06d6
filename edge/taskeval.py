"""Run demo-task problems through one hybrid configuration and aggregate the report quantities.

Used by `make demo`, `python -m edge calibrate` and `python -m edge sweep`: one implementation of how a
configuration is run against a verifier and how accuracy, transmission rate, acceptance rate, uplink
bytes per token and tokens/s are computed (the names DESIGN.md fixes for every report).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from edge.client import VerifierSession, generate_remote
from edge.hybrid import HybridConfig, generate_hybrid
from edge.model import EdgeModel
from edge.sampling import SamplingSettings
from edge.calibration import check_on_test, estimator_data, fit_estimators
from models.task import MAX_SOLUTION_TOKENS, held_out_problems, is_correct, sample_problems


class Runner:
    """Runs problems through one configuration against one verifier channel, and aggregates."""

    def __init__(self, model: EdgeModel, channel, settings: SamplingSettings, seed: int):
        self.model, self.channel, self.settings, self.seed = model, channel, settings, seed

    def session_opener(self, config: HybridConfig, seed: int, report_q: bool = False):
        def open_session(prompt_ids):
            return VerifierSession(self.channel, self.model.manifest.fingerprint, prompt_ids, self.settings,
                                   config.codec, seed=seed, report_target_prob=report_q)
        return open_session

    def hybrid(self, name: str, config: HybridConfig, problems, verify: bool = True, report_q: bool = False):
        rows = []
        for i, problem in enumerate(tqdm(problems, desc=name, unit="problem", leave=False)):
            seed = self.seed + i
            opener = self.session_opener(config, seed, report_q) if verify else None
            result = generate_hybrid(self.model, self.model.encode(problem.prompt), config, seed=seed,
                                     open_session=opener)
            rows.append((problem, result))
        return rows

    def llm_only(self, problems):
        correct = tokens = up = 0
        seconds = 0.0
        for i, problem in enumerate(tqdm(problems, desc="llm-only", unit="problem", leave=False)):
            t0 = time.perf_counter()
            ids, req_bytes, _ = generate_remote(self.channel, self.model.manifest.fingerprint,
                                                self.model.encode(problem.prompt), self.settings,
                                                MAX_SOLUTION_TOKENS, sorted(self.model.eos_ids), seed=self.seed + i)
            seconds += time.perf_counter() - t0
            correct += is_correct(problem, self.model.decode(ids))
            tokens, up = tokens + len(ids), up + req_bytes
        return {"config": "llm-only", "accuracy": correct / len(problems), "transmission_rate": 1.0,
                "acceptance_rate": None, "uplink_bytes_per_token": up / tokens, "tokens_per_s": tokens / seconds}


def summarize(name: str, rows) -> dict:
    records = [r for _, res in rows for r in res.records]
    sent = [r for r in records if r.sent]
    tokens = sum(len(res.token_ids) for _, res in rows)
    return {
        "config": name,
        "accuracy": sum(is_correct(p, res.text) for p, res in rows) / len(rows),
        "transmission_rate": len(sent) / len(records),
        "acceptance_rate": (sum(bool(r.accepted) for r in sent) / len(sent)) if sent else None,
        "uplink_bytes_per_token": sum(res.uplink_bytes for _, res in rows) / tokens,
        "tokens_per_s": tokens / sum(res.seconds for _, res in rows),
    }


@dataclass(frozen=True)
class Prompt:
    """A prompt without a checkable answer (calibration from a user's prompt file)."""

    prompt: str


def load_prompts(source: str, n_calibration: int, n_test: int) -> tuple[list, list]:
    """Calibration and test prompts, disjoint: ``demo`` = training-split vs held-out task problems;
    a file = one prompt per line, the first two thirds for calibration and the rest for testing."""
    if source == "demo":
        return sample_problems(n_calibration, "train", seed=777), held_out_problems(n_test)
    try:
        lines = [line.strip() for line in open(source, encoding="utf-8") if line.strip()]
    except OSError as exc:
        raise ValueError(f"cannot read prompts file {source}: {exc.strerror}") from None
    if len(lines) < 3:
        raise ValueError(f"{source} holds {len(lines)} prompts; calibration needs at least 3 (one per line)")
    cut = max(1, (2 * len(lines)) // 3)
    return [Prompt(p) for p in lines[:cut][:n_calibration]], [Prompt(p) for p in lines[cut:][:n_test]]


def run_calibration(runner: Runner, cal_prompts, test_prompts, codec, max_new_tokens: int, target: float,
                    tolerated: float) -> dict:
    """Verify-all on both prompt sets (the verifier reports q(x)); fit on one, check on the other."""
    config = HybridConfig(threshold=float("-inf"), codec=codec, settings=runner.settings,
                          max_new_tokens=max_new_tokens, record_all_estimators=True)
    records = {}
    for name, prompts in (("calibration", cal_prompts), ("test", test_prompts)):
        rows = runner.hybrid(name, config, prompts, report_q=True)
        records[name] = [r for _, res in rows for r in res.records]
    b, us = estimator_data(records["calibration"])
    fits = fit_estimators(b, us, target, tolerated)
    tb, tus = estimator_data(records["test"])
    s = runner.settings
    return {
        "fingerprint": runner.model.manifest.fingerprint,
        "settings": {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p},
        "codec": codec.name, "target": target, "tolerated": tolerated,
        "n_calibration_tokens": len(b), "n_test_tokens": len(tb),
        "beta_source": "the verifier reports q(x) (Open.report_target_prob); the edge computes beta",
        "fits": fits, "test": check_on_test(fits, tb, tus),
        "beta": b.tolist(), "u": {n: u.tolist() for n, u in us.items()},
    }
