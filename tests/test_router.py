"""Prompt-level routing: the logistic fit, the edge's features on a fake runtime, the router file, the decision
and the threshold rule (edge/router.py, eval/routing.py). No model, no verifier: tiny arrays only."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from core.sampling import SamplingSettings
from edge.hybrid import HybridConfig, HybridResult, generate_hybrid
from edge.router import (FEATURE_SETS, Router, RouterFileError, RouterSpec, extract_features, load_router,
                         parse_router, prefill_features, save_router, to_cloud)
from edge.uncertainty import get_estimator
from eval.routing import (auroc, calibrate_threshold, candidate_thresholds, fit_logistic, fit_router,
                          routed_outcome, routed_row, threshold_at_share)
from eval.taskeval import ProblemRun
from models.task import Problem
from proto.trace import TokenRecord

V = 8  # a tiny id space


class FakeRuntime:
    """Deterministic logits [n, V] for any ids: row = a fixed function of the token id and its position."""

    id_space = V

    def __init__(self):
        self.length, self.calls = 0, []

    @property
    def cache(self):  # the hybrid loop reads cache.length
        return self

    def prefill(self, ids):
        self.reset()
        return self.forward(ids)[-1]

    def truncate(self, length):
        self.length = length

    @staticmethod
    def row(token: int, position: int) -> np.ndarray:
        return np.cos(np.arange(V) * (token + 1) + position).astype(np.float32) * 3

    def reset(self):
        self.length = 0

    def forward(self, ids):
        self.calls.append(list(ids))
        rows = np.stack([self.row(t, self.length + j) for j, t in enumerate(ids)])
        self.length += len(ids)
        return rows

    def decode(self, token):
        return self.forward([token])[-1]


class FakeModel:
    def __init__(self, eos=frozenset()):
        self.runtime, self.eos_ids = FakeRuntime(), frozenset(eos)

    def context_full(self, total):
        return False

    def encode(self, text):
        return [ord(c) % V for c in text]

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_logistic_recovers_a_separable_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2)) * [1.0, 5.0] + [0.0, 3.0]  # feature 1 is noise on another scale
    y = (x[:, 0] > 0.3).astype(int)
    mean, scale, w, b = fit_logistic(x, y, l2=0.1)
    pred = 1 / (1 + np.exp(-(((x - mean) / scale) @ w + b))) > 0.5
    assert (pred == y).mean() >= 0.97
    assert w[0] > 5 * abs(w[1])  # the rule's feature carries the weight
    assert np.isfinite(w).all() and math.isfinite(b)  # L2 keeps separable data finite
    assert auroc(((x - mean) / scale) @ w, y) > 0.99


def test_prefill_features_are_the_prompt_surprisal_and_last_position():
    ids = [1, 5, 2, 7]
    logits = np.stack([FakeRuntime.row(t, i) for i, t in enumerate(ids)])
    f = prefill_features(ids, logits)
    logp = logits[:-1] - np.log(np.exp(logits[:-1]).sum(axis=1, keepdims=True))
    nll = [-logp[i, ids[i + 1]] for i in range(3)]  # row i predicts token i + 1
    assert f["nll_mean"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert f["nll_max"] == pytest.approx(np.max(nll), rel=1e-5)
    p_last = np.exp(logits[-1]) / np.exp(logits[-1]).sum()
    assert f["last_u"] == pytest.approx(1 - p_last.max(), rel=1e-5)
    assert f["prompt_tokens"] == 4
    assert f["last_entropy"] == pytest.approx(-(p_last * np.log(p_last)).sum() / np.log(V), rel=1e-5)
    with pytest.raises(ValueError, match="must be"):
        prefill_features(ids, logits[:-1])


def test_first_k_features_draft_like_the_hybrid_loop_and_count_their_cost():
    model, prompt = FakeModel(), [3, 1, 4]
    config = HybridConfig(settings=SamplingSettings(temperature=1.0))
    f = extract_features(model, prompt, config, k=3, seed=11)
    assert (f.drafted_tokens, f.forwards) == (3, 3)  # prefill + 2 decodes: the 3rd draft needs no forward
    fed = model.runtime.calls[1:]  # the drafted tokens the SLM was fed
    # u of each drafted position is the default estimator on that position's raw logits
    rows = [FakeRuntime.row(prompt[-1], 2), FakeRuntime.row(fed[0][0], 3), FakeRuntime.row(fed[1][0], 4)]
    us = [get_estimator("max-prob")(r, 0, None) for r in rows]
    assert f.values["draft_u_mean"] == pytest.approx(np.mean(us))
    assert f.values["draft_u_max"] == pytest.approx(np.max(us))
    # the routing drafts are the hybrid loop's own first drafts (same codec, same position-keyed seeds)
    assert f.draft_ids == generate_hybrid(FakeModel(), prompt, config, seed=11).token_ids[:3]
    again = extract_features(FakeModel(), prompt, config, k=3, seed=11)
    assert again.values == f.values  # keyed by (seed, position): reproducible
    prefill_only = extract_features(FakeModel(), prompt, config, k=0, seed=11)
    assert (prefill_only.drafted_tokens, prefill_only.forwards, prefill_only.values["draft_u_max"]) == (0, 1, 0.0)
    first = model.runtime.calls[1][0]
    stopped = extract_features(FakeModel(eos={first}), prompt, config, k=3, seed=11)
    assert stopped.drafted_tokens == 1  # nothing is drafted after EOS


def spec(kind="first-k", threshold=0.5, k=2):
    n = len(FEATURE_SETS[kind])
    return RouterSpec(kind, k if kind != "prefill" else 0, (0.0,) * n, (1.0,) * n, (1.0,) + (0.0,) * (n - 1), 0.0,
                      threshold, {"label": "slm-wrong"})


def test_router_file_round_trips_and_refuses_bad_files(tmp_path):
    path = tmp_path / "router.json"
    save_router(path, spec(threshold=math.inf))
    assert load_router(path) == spec(threshold=math.inf)  # +inf survives JSON as "inf"
    good = json.loads(path.read_text())
    bad = {
        "unknown router kind": {**good, "kind": "oracle"},
        "list of 2 numbers": {**good, "weights": [1.0]},
        "non-number": {**good, "mean": [0.0, "x"]},
        "'scale' must be > 0": {**good, "scale": [1.0, 0.0]},
        "'k' must be an integer >= 1": {**good, "k": 0},
        "unsupported router format": {**good, "format": 99},
        "no 'bias'": {k: v for k, v in good.items() if k != "bias"},
        "do not match kind": {**good, "features": ["nll_mean", "nll_max"]},
        "non-finite": {**good, "weights": [1.0, "nan"]},
    }
    for message, data in bad.items():
        with pytest.raises(RouterFileError, match=message):
            parse_router(data, "r.json")
    path.write_text("{not json")
    with pytest.raises(RouterFileError, match="not JSON"):
        load_router(path)
    with pytest.raises(RouterFileError, match="cannot read"):
        load_router(tmp_path / "missing.json")


def test_routing_decision_is_monotone_in_the_threshold():
    model = FakeModel()
    router = Router(model, spec("both", k=2), HybridConfig())
    prompts = [[i % V, (3 * i) % V, (5 * i + 1) % V] for i in range(12)]
    scores = [router.score(p, seed=i) for i, p in enumerate(prompts)]
    assert all(0 < s < 1 for s in scores)
    shares = [np.mean([to_cloud(s, t) for s in scores]) for t in np.linspace(-0.1, 1.1, 25)]
    assert all(a >= b for a, b in zip(shares, shares[1:]))  # a higher threshold never routes more
    assert (shares[0], shares[-1]) == (1.0, 0.0)
    assert not to_cloud(0.5, 0.5) and to_cloud(0.5000001, 0.5)  # strictly above the threshold
    assert router.route(prompts[0], seed=0, threshold=-math.inf) and not router.route(prompts[0], 0, math.inf)


def test_threshold_rule_picks_the_fewest_routed_prompts_within_the_target():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    local = [0, 0, 1, 0, 1, 1, 1, 1, 1, 1]  # the hybrid fails the 1st, 2nd and 4th prompts
    cloud = [1] * 10
    assert candidate_thresholds([0.2, 0.1, 0.2])[0] == math.inf and len(candidate_thresholds([0.2, 0.1, 0.2])) == 3
    # within 0 points of the cloud: route the top 4 (midpoint between 0.6 and 0.5)
    assert calibrate_threshold(scores, local, cloud, target=0.0) == pytest.approx(0.55)
    # within 10 points: routing the top 2 reaches 0.9 = 1.0 - 0.1
    assert calibrate_threshold(scores, local, cloud, target=0.1) == pytest.approx(0.75)
    assert routed_outcome(scores, 0.75, local, cloud) == (pytest.approx(0.9), pytest.approx(0.2))
    # the hybrid alone is within 30 points: route nothing
    assert calibrate_threshold(scores, local, cloud, target=0.3) == math.inf
    assert threshold_at_share(scores, 0.3) == pytest.approx(0.65)  # at most 3 of 10 routed
    assert threshold_at_share(scores, 0.0) == math.inf


def test_fit_router_refuses_one_class_labels():
    features = {name: [0.1 * i for i in range(6)] for name in FEATURE_SETS["both"]}
    with pytest.raises(ValueError, match="one class"):
        fit_router("prefill", features, [0] * 6, k=2, label="hybrid-wrong")
    router = fit_router("first-k", features, [0, 0, 0, 1, 1, 1], k=2, label="slm-wrong")
    assert router.k == 2 and router.threshold == math.inf and router.weights[0] > 0


def test_routed_row_counts_cloud_tokens_as_sent_and_the_llms():
    problem = Problem((1, 2, 3, 4), ("+", "+", "+"))
    cloud = HybridResult([1], token_ids=[5] * 10, text=problem.solution, uplink_bytes=30, downlink_bytes=80,
                         seconds=1.0)
    records = [TokenRecord.kept(1 + j, 5, 0.0, 1.0, 0.0) for j in range(10)]
    records[3].sent, records[3].accepted = True, False  # one rejected Verify: one LLM token, one round trip
    hybrid = HybridResult([1], token_ids=[5] * 10, records=records, text="wrong", uplink_bytes=50,
                          downlink_bytes=20, seconds=1.0)
    row = routed_row("routed", [ProblemRun(problem, cloud, 1.0), ProblemRun(problem, hybrid, 1.0)], [1, 0], 4, 2.0)
    assert row["accuracy"] == 0.5 and row["correct"] == [1, 0] and row["cloud_share"] == 0.5
    assert row["transmission_rate"] == pytest.approx(11 / 20) and row["llm_token_share"] == pytest.approx(11 / 20)
    assert row["llm_tokens_generated"] == 11 and row["round_trips_per_token"] == pytest.approx(2 / 20)
    assert row["uplink_bytes_per_token"] == pytest.approx(80 / 20)
    assert row["tokens_per_s"] == pytest.approx(20 / 4.0)  # the routing features' 2 s count
    assert row["routing_drafted_tokens"] == 4
