"""Run task problems through one configuration and aggregate the report quantities.

One implementation of "run problems through the hybrid loop" (``Runner.hybrid``) and of how accuracy,
transmission rate, acceptance rate, uplink bytes per token and tokens/s are computed (the names every
report uses), for ``make demo``, ``python -m eval calibrate|sweep``, ``python -m simulate record`` and the
testbed's edge.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import TextIO

from tqdm import tqdm

from core.sampling import SamplingSettings
from core.stops import ids_containing
from edge.calibration import check_on_test, estimator_data, fit_estimators
from edge.client import VerifierSession, generate_remote
from edge.coarse import CoarseResult, generate_coarse
from edge.hybrid import HybridConfig, HybridResult, generate_hybrid
from edge.model import EdgeModel
from eval.policies import COARSE, GENERATE, LOCAL, ROUTED, Policy
from models.span_marker import STEP_END_CHARS
from models.task import MAX_SOLUTION_TOKENS, Problem, held_out_problems, is_correct, sample_problems
from proto import trace as tr

CALIBRATION_SEED = 777  # training-split problems for calibration (held-out problems are for testing)


@dataclass
class ProblemRun:
    """One problem through the edge loop: its result and the wall time of the whole call (Open included)."""

    problem: object
    result: HybridResult
    wall_s: float


class Runner:
    """Runs problems through one configuration against one verifier channel, and aggregates.

    Problem ``i`` of a run uses seed ``seed + i`` (``first_index`` shifts ``i`` when a run is split, e.g.
    into unrecorded warm-up problems and recorded ones), so the same problem gets the same tokens in any
    tool that runs it.
    """

    def __init__(self, model: EdgeModel, channel, settings: SamplingSettings, seed: int, timeout: float = 30.0):
        self.model, self.channel, self.settings, self.seed, self.timeout = model, channel, settings, seed, timeout

    def session_opener(self, seed: int, report_q: bool = False):
        def open_session(prompt_ids, settings, codec, **open_args):  # conditioning_layer, span_stop_ids
            return VerifierSession(self.channel, self.model.manifest.fingerprint, prompt_ids, settings, codec,
                                   seed=seed, report_target_prob=report_q, timeout=self.timeout, **open_args)
        return open_session

    def hybrid(self, name: str, config: HybridConfig, problems, verify: bool = True, report_q: bool = False,
               trace: TextIO | None = None, first_index: int = 0, progress: bool = True) -> list[ProblemRun]:
        """Every problem through ``generate_hybrid``; with ``trace``, each generation's lines and a task line."""
        runs = []
        for i, problem in enumerate(tqdm(problems, desc=name, unit="problem", leave=False, disable=not progress),
                                    first_index):
            seed = self.seed + i
            t0 = time.perf_counter()
            result = generate_hybrid(self.model, self.model.encode(problem.prompt), config, seed=seed,
                                     open_session=self.session_opener(seed, report_q) if verify else None,
                                     trace=trace)
            runs.append(ProblemRun(problem, result, time.perf_counter() - t0))
            if trace is not None and isinstance(problem, Problem):
                tr.write_task(trace, is_correct(problem, result.text))
        return runs

    def step_end_ids(self) -> frozenset[int]:
        """The ids that end a worked step of the task (span offload and step judging split there): every id
        whose text holds ``;`` or ``#``, the BPE's merged ``;-`` and `` #-`` included."""
        return ids_containing((self.model.decode([i]) for i in range(self.model.runtime.id_space)), STEP_END_CHARS)

    def coarse(self, policy: Policy, problems, threshold: float, progress: bool = True,
               trace: TextIO | None = None) -> list[ProblemRun]:
        """Every problem through a span or step mode (``edge/coarse.py``), same seeds as ``hybrid``; with
        ``trace``, each generation's lines (mode coarse, the simulator's input) and a task line. span-learned's
        marker is the one the model's manifest declares."""
        marker_id = self.model.manifest.offload_marker_id if policy.mode == "span-learned" else None
        config = policy.coarse(self.settings, threshold, self.step_end_ids(), marker_id,
                               step_end_chars="".join(sorted(STEP_END_CHARS)))
        runs = []
        for i, problem in enumerate(tqdm(problems, desc=policy.name, unit="problem", leave=False,
                                         disable=not progress)):
            seed = self.seed + i
            t0 = time.perf_counter()
            result = generate_coarse(self.model, self.model.encode(problem.prompt), config, seed=seed,
                                     open_session=self.session_opener(seed), trace=trace)
            runs.append(ProblemRun(problem, result, time.perf_counter() - t0))
            if trace is not None and isinstance(problem, Problem):
                tr.write_task(trace, is_correct(problem, result.text))
        return runs

    def policy(self, policy: Policy, problems, threshold: float, trace: TextIO | None = None) -> dict:
        """One row of a report: ``policy`` at ``threshold`` over ``problems``."""
        if policy.route == GENERATE:
            return self.llm_only(problems)
        if policy.route == ROUTED:
            raise ValueError(f"policy {policy.name!r} needs its router: run it with eval.routing.routed_policy_row")
        if policy.route == COARSE:
            return summarize(policy.name, self.coarse(policy, problems, threshold))
        config = policy.config(self.settings, threshold)
        return summarize(policy.name, self.hybrid(policy.name, config, problems, verify=policy.route != LOCAL,
                                                  trace=trace))

    def llm_only(self, problems):
        correct, tokens, up, down = [], 0, 0, 0
        seconds = 0.0
        for i, problem in enumerate(tqdm(problems, desc="llm-only", unit="problem", leave=False)):
            t0 = time.perf_counter()
            ids, req_bytes, resp_bytes = generate_remote(self.channel, self.model.manifest.fingerprint,
                                                self.model.encode(problem.prompt), self.settings,
                                                MAX_SOLUTION_TOKENS, sorted(self.model.eos_ids), seed=self.seed + i)
            seconds += time.perf_counter() - t0
            correct.append(int(is_correct(problem, self.model.decode(ids))))
            tokens, up, down = tokens + len(ids), up + req_bytes, down + resp_bytes
        return {"config": "llm-only", "accuracy": sum(correct) / len(problems), "transmission_rate": 1.0,
                "acceptance_rate": None, "llm_token_share": 1.0, "round_trips_per_token": len(problems) / tokens,
                "uplink_bytes_per_token": up / tokens, "downlink_bytes_per_token": down / tokens,
                "tokens_per_s": tokens / seconds, "correct": correct}


def summarize(name: str, runs: list[ProblemRun]) -> dict:
    """A report row of token-level (``HybridResult``) or span/step (``CoarseResult``) runs, in the names every
    report uses: TR = positions sent for checking / tokens; LLM token share = tokens the LLM chose (a
    rejection's resampled token, span and regenerated-step tokens) / tokens."""
    tokens = sum(len(run.result.token_ids) for run in runs)
    if isinstance(runs[0].result, CoarseResult):
        sent, llm = sum(run.result.sent_positions for run in runs), sum(run.result.llm_tokens for run in runs)
        trips, acceptance = sum(run.result.round_trips for run in runs), None
    else:
        records = [r for run in runs for r in run.result.records]
        sent_records = [r for r in records if r.sent]
        sent, llm = len(sent_records), sum(not r.accepted for r in sent_records)
        trips = sum(run.result.round_trips for run in runs)
        acceptance = (sum(bool(r.accepted) for r in sent_records) / len(sent_records)) if sent_records else None
    return {
        "config": name,
        "accuracy": sum(is_correct(run.problem, run.result.text) for run in runs) / len(runs),
        "transmission_rate": sent / tokens if tokens else 0.0,
        "acceptance_rate": acceptance,
        "llm_token_share": llm / tokens if tokens else 0.0,
        "round_trips_per_token": trips / tokens if tokens else 0.0,
        "uplink_bytes_per_token": sum(run.result.uplink_bytes for run in runs) / tokens,
        "downlink_bytes_per_token": sum(run.result.downlink_bytes for run in runs) / tokens,
        "tokens_per_s": tokens / sum(run.result.seconds for run in runs),
        "tokens_digest": tokens_digest(runs),
        "correct": [int(is_correct(run.problem, run.result.text)) for run in runs],  # per problem, for paired CIs
        "first_token_ms": first_token_ms(runs),
    }


def first_token_ms(runs: list[ProblemRun]) -> float | None:
    """Median time to the first token (ms): until the prompt's logits are ready, a conditioned SLM's wait for
    Opened included; None for span/step runs (not recorded there)."""
    times = sorted(run.result.first_token_s for run in runs if hasattr(run.result, "first_token_s"))
    return 1e3 * times[len(times) // 2] if times else None


def tokens_digest(runs: list[ProblemRun]) -> str:
    """A short hash of every problem's token ids, in order: two runs gave the same tokens iff it matches
    (e.g. ``default`` and ``default-pipelined``: the lookahead never changes the tokens)."""
    return hashlib.sha256(json.dumps([run.result.token_ids for run in runs]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Prompt:
    """A prompt without a checkable answer (calibration from a user's prompt file)."""

    prompt: str


def load_prompts(source: str, n_calibration: int, n_test: int) -> tuple[list, list]:
    """Calibration and test prompts, disjoint: ``demo`` = training-split vs held-out task problems;
    a file = one prompt per line, the first two thirds for calibration and the rest for testing."""
    if source == "demo":
        return sample_problems(n_calibration, "train", seed=CALIBRATION_SEED), held_out_problems(n_test)
    try:
        lines = [line.strip() for line in open(source, encoding="utf-8") if line.strip()]
    except OSError as exc:
        raise ValueError(f"cannot read prompts file {source}: {exc.strerror}") from None
    if len(lines) < 3:
        raise ValueError(f"{source} holds {len(lines)} prompts; calibration needs at least 3 (one per line)")
    cut = max(1, (2 * len(lines)) // 3)
    return [Prompt(p) for p in lines[:cut][:n_calibration]], [Prompt(p) for p in lines[cut:][:n_test]]


def verify_all_records(runner: Runner, name: str, prompts, codec, max_new_tokens: int) -> list:
    """Every position of a verify-all run over ``prompts``, with each estimator's u and the verifier's q(x):
    the raw material of calibration (beta and u per position)."""
    config = HybridConfig(threshold=float("-inf"), codec=codec, settings=runner.settings,
                          max_new_tokens=max_new_tokens, record_all_estimators=True)
    return [r for run in runner.hybrid(name, config, prompts, report_q=True) for r in run.result.records]


def run_calibration(runner: Runner, cal_prompts, test_prompts, codec, max_new_tokens: int, target: float,
                    tolerated: float) -> dict:
    """Verify-all on both prompt sets (the verifier reports q(x)); fit on one, check on the other."""
    b, us = estimator_data(verify_all_records(runner, "calibration", cal_prompts, codec, max_new_tokens))
    fits = fit_estimators(b, us, target, tolerated)
    tb, tus = estimator_data(verify_all_records(runner, "test", test_prompts, codec, max_new_tokens))
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
