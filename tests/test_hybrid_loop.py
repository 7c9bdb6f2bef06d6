"""Exactness of the REAL hybrid loop (``edge.hybrid.generate_hybrid``), not a re-implementation of it.

A fake edge model returns fixed logits over a 6-token vocabulary and an in-process verifier applies the
real rejection rule (``cloud.rejection.verify_draft``) to the payload bytes the loop sends, decoded with
the real codec, against a fixed target q; its randomness is keyed by (seed, position) like the cloud's.
The codec is deliberately coarse (4-bit counts), so p~ differs clearly from p: a loop that drew its
draft from p instead of p~ is off by far more than the statistical tolerance.

- Verify every token (threshold -inf): the tokens follow q.
- Never verify (threshold +inf): the tokens follow p~ exactly (and visibly not p).
- A mix (confident positions kept, uncertain ones sent with the kept drafts as pending ids): kept
  positions follow p~ and sent ones q, and the verifier sees exactly the agreed history.

Everything is seeded: every run is identical. Runs in a few seconds, no model, no process, no network.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from cloud.rejection import verify_draft
from core.sampling import SamplingSettings, probabilities
from edge.client import VerdictResult, VerifierError
from edge.hybrid import HybridConfig, generate_hybrid
from edge.uncertainty import get_estimator
from proto.distribution import CodecSpec, compress
from proto.payload import decode
from tests.test_rejection import ALPHA, chi_square_p

V = 6
PROMPT = [1, 2, 3]
# p at an uncertain position (max-prob u = 0.55) and at a confident one (u = 0.1).
P_UNSURE = np.array([0.45, 0.25, 0.15, 0.08, 0.05, 0.02])
P_SURE = np.array([0.9, 0.06, 0.02, 0.01, 0.005, 0.005])
Q = np.array([0.05, 0.10, 0.15, 0.20, 0.25, 0.25])  # the "large model", fixed at every position
# eps = 0 keeps every token (so a draft from p is never outside p~'s support: only the distribution can
# tell); 4-bit counts make p~ far from p, e.g. p~(5) = 1/16 where p(5) = 0.02.
CODEC = CodecSpec("adaptive", eps=0.0, k_max=V, bits=4)
SETTINGS = SamplingSettings(temperature=1.0)
SEEDS = range(6)
TOKENS = 800  # per generation


class FixedRuntime:
    """The ONNX runtime's interface with fixed logits: ``cycle`` repeats by position, one entry per position."""

    id_space = V  # the width of the logits it returns

    def __init__(self, cycle: list[np.ndarray]):
        self.cycle = [np.log(p).astype(np.float32) for p in cycle]
        self.cache = SimpleNamespace(length=0)  # positions fed
        self.prompt = 0
        self.truncations = 0

    @property
    def position(self) -> int:
        """Generated positions fed so far."""
        return self.cache.length - self.prompt

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.prompt = self.cache.length = len(ids)
        return self.cycle[0]

    def decode(self, token: int) -> np.ndarray:
        assert 0 <= token < V
        self.cache.length += 1
        return self.cycle[self.position % len(self.cycle)]

    def truncate(self, length: int) -> None:
        assert self.prompt <= length <= self.cache.length
        self.cache.length = length
        self.truncations += 1


class FakeModel:
    """What ``generate_hybrid`` uses of an ``EdgeModel``: runtime, eos_ids, context_full, decode."""

    def __init__(self, cycle: list[np.ndarray], max_positions: int | None = None):
        self.runtime = FixedRuntime(cycle)
        self.eos_ids = frozenset()
        self.max_positions = max_positions

    def context_full(self, total_tokens: int) -> bool:
        return self.max_positions is not None and total_tokens >= self.max_positions

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


class InProcessVerifier:
    """A ``Verifier`` that runs the cloud's rules in-process against ``Q``: protocol v2's positions and epochs
    and the rejection rule.

    Like the cloud it keeps the agreed context (prompt + pending + verdicts) and its epoch, keys each
    verdict's randomness by (seed, position), answers a Verify of an ended epoch stale, and decodes the exact
    payload bytes the loop put on the wire. ``delay``: a verdict becomes available only after that many
    polls (``next_verdict(wait=False)``), like a round trip the loop drafts through.
    """

    report_target_prob = False
    lost = False

    def __init__(self, prompt_ids: list[int], settings: SamplingSettings, codec: CodecSpec, seed: int,
                 fail_after: int | None = None, delay: int = 0):
        assert codec == CODEC  # the loop opens with its own configuration
        self.context, self.settings, self.codec, self.seed = list(prompt_ids), settings, codec, seed
        self.uplink_bytes = self.downlink_bytes = 0
        self.epoch = 0
        self.verifies = self.stale = 0
        self.closed = False
        self.fail_after = fail_after  # raise VerifierError on this many + 1st verify
        self.delay = delay
        self.queue: list[list] = []  # [polls left, request]

    def submit(self, pending, position, epoch, block) -> int:
        assert not self.closed and len(block) == 1
        if self.verifies == self.fail_after:
            raise VerifierError("session dropped")
        self.queue.append([self.delay, (list(pending), position, epoch, block)])
        self.uplink_bytes += len(block[0][1])
        return len(block[0][1])

    def next_verdict(self, wait: bool = True) -> VerdictResult | None:
        assert self.queue
        if not wait and self.queue[0][0] > 0:
            self.queue[0][0] -= 1
            return None
        pending, position, epoch, [(draft, payload)] = self.queue.pop(0)[1]
        self.downlink_bytes += 4
        if epoch < self.epoch:
            self.stale += 1
            return VerdictResult(False, 0, 0.0, 0.0, len(payload), 4, 0.0, 0, True, self.epoch)
        assert epoch == self.epoch and position == len(self.context)  # the loop names the agreed position
        self.context.extend(pending)
        p_tilde = decode(payload, self.codec, V).dense(V)  # [V]
        rng = np.random.default_rng([self.seed, len(self.context)])
        accepted, token = verify_draft(draft, p_tilde, Q, rng, self.settings.greedy)
        self.context.append(token)
        self.epoch += not accepted
        self.verifies += 1
        return VerdictResult(accepted, token, float(Q[draft]), 0.0, len(payload), 4, 0.0, int(accepted), False,
                             self.epoch)

    def close(self) -> None:
        self.closed = True


def run(cycle: list[np.ndarray], threshold: float) -> tuple[list, list[InProcessVerifier]]:
    """``generate_hybrid`` once per seed; returns (results, the verifiers they opened)."""
    results, verifiers = [], []
    for seed in SEEDS:
        def open_session(prompt_ids, settings, codec, seed=seed):
            verifiers.append(InProcessVerifier(prompt_ids, settings, codec, seed=1000 + seed))
            return verifiers[-1]

        config = HybridConfig(threshold=threshold, estimator="max-prob", codec=CODEC, settings=SETTINGS,
                              max_new_tokens=TOKENS)
        results.append(generate_hybrid(FakeModel(cycle), PROMPT, config, seed=seed, open_session=open_session))
    return results, verifiers


def p_tilde_of(p: np.ndarray) -> np.ndarray:
    return compress(probabilities(np.log(p), SETTINGS), CODEC).dense(V)


def counts(tokens) -> np.ndarray:
    return np.bincount(np.asarray(list(tokens), dtype=np.int64), minlength=V)  # [V]


def test_the_codec_makes_p_tilde_far_from_p():
    """The premise of the tests below: drafts from p and from p~ are told apart at this sample size."""
    for p in (P_UNSURE, P_SURE):
        assert np.abs(p_tilde_of(p) - p).max() > 0.04
    n = len(SEEDS) * TOKENS
    rng = np.random.default_rng(0)
    from_p = counts(rng.choice(V, size=n, p=P_UNSURE))
    assert chi_square_p(from_p, p_tilde_of(P_UNSURE)) < 1e-12


@pytest.mark.exactness
def test_verify_all_through_the_real_loop_follows_q():
    results, verifiers = run([P_UNSURE], threshold=-math.inf)
    tokens = [t for r in results for t in r.token_ids]
    assert len(tokens) == len(SEEDS) * TOKENS
    assert all(r.sent == TOKENS and all(rec.pending == 0 for rec in r.records) for r in results)
    assert all(v.closed and v.verifies == TOKENS for v in verifiers)
    assert chi_square_p(counts(tokens), Q) > ALPHA
    # the drafts themselves (before verification) are x ~ p~
    drafts = [rec.draft for r in results for rec in r.records]
    assert chi_square_p(counts(drafts), p_tilde_of(P_UNSURE)) > ALPHA


@pytest.mark.exactness
def test_slm_only_through_the_real_loop_follows_p_tilde_not_p():
    results, verifiers = run([P_UNSURE], threshold=math.inf)
    assert all(r.sent == 0 for r in results) and all(v.verifies == 0 for v in verifiers)
    tokens = counts(t for r in results for t in r.token_ids)
    assert chi_square_p(tokens, p_tilde_of(P_UNSURE)) > ALPHA
    assert chi_square_p(tokens, P_UNSURE) < 1e-6
    # no verifier at all: the same draws (the verifier never touches the draft stream)
    config = HybridConfig(threshold=math.inf, estimator="max-prob", codec=CODEC, settings=SETTINGS,
                          max_new_tokens=TOKENS)
    alone = generate_hybrid(FakeModel([P_UNSURE]), PROMPT, config, seed=SEEDS[0])
    assert alone.token_ids == results[0].token_ids


@pytest.mark.exactness
def test_mixed_positions_follow_p_tilde_when_kept_and_q_when_sent():
    """Confident and uncertain positions alternate; only the uncertain ones are sent, carrying the kept
    draft before them as a pending id. Each position is exactly p~ (kept) or q (sent), and the verifier's
    context is the loop's own history at every verify."""
    results, verifiers = run([P_SURE, P_UNSURE], threshold=0.3)
    kept, sent = [], []
    for r, v in zip(results, verifiers):
        assert [rec.sent for rec in r.records] == [i % 2 == 1 for i in range(TOKENS)]
        assert all(rec.pending == 1 for rec in r.records if rec.sent)
        assert v.context == PROMPT + r.token_ids  # TOKENS is even: the last position was sent
        assert all(rec.position == len(PROMPT) + i for i, rec in enumerate(r.records))
        kept += [rec.token for rec in r.records if not rec.sent]
        sent += [rec.token for rec in r.records if rec.sent]
    assert chi_square_p(counts(kept), p_tilde_of(P_SURE)) > ALPHA
    assert chi_square_p(counts(kept), P_SURE) < 1e-6
    assert chi_square_p(counts(sent), Q) > ALPHA


def config_for(threshold: float, estimator: str = "max-prob", tokens: int = TOKENS) -> HybridConfig:
    return HybridConfig(threshold=threshold, estimator=estimator, codec=CODEC, settings=SETTINGS,
                        max_new_tokens=tokens)


def test_send_iff_u_strictly_above_the_threshold():
    """u <= threshold keeps the draft (the calibrated threshold's definition); just below u sends."""
    u = get_estimator("max-prob")(np.log(P_UNSURE).astype(np.float32), 0, np.random.default_rng(0))
    for threshold, sent in ((u, 0), (np.nextafter(u, -np.inf), 20)):
        opened = []
        result = generate_hybrid(FakeModel([P_UNSURE]), PROMPT, config_for(threshold, tokens=20), seed=1,
                                 open_session=lambda *a: opened.append(InProcessVerifier(*a, seed=1)) or opened[-1])
        assert all(rec.u == u for rec in result.records)
        assert result.sent == sent


def test_the_estimator_sees_the_draft_and_its_own_stream():
    """U-HLM's u depends on the draft (drafts of the mode look certain, the others uncertain) and on the
    loop's seeded u stream: the same seed gives the same u's."""
    config = config_for(math.inf, estimator="uhlm", tokens=400)
    a = generate_hybrid(FakeModel([P_UNSURE]), PROMPT, config, seed=3)
    b = generate_hybrid(FakeModel([P_UNSURE]), PROMPT, config, seed=3)
    assert [r.u for r in a.records] == [r.u for r in b.records]
    u_mode = np.mean([r.u for r in a.records if r.draft == 0])
    u_other = np.mean([r.u for r in a.records if r.draft != 0])
    assert u_mode < 0.7 < u_other


def test_a_lost_session_carries_the_tokens_generated_so_far():
    """A VerifierError out of the loop carries the partial result (the CLI prints it) and the session
    is closed."""
    opened = []

    def open_session(prompt_ids, settings, codec):
        opened.append(InProcessVerifier(prompt_ids, settings, codec, seed=5, fail_after=7))
        return opened[-1]

    with pytest.raises(VerifierError) as info:
        generate_hybrid(FakeModel([P_SURE, P_UNSURE]), PROMPT, config_for(0.3), seed=5, open_session=open_session)
    partial = info.value.partial
    assert len(partial.token_ids) == 15  # 7 verified positions and the 8 kept ones before the failing send
    assert partial.token_ids == opened[0].context[len(PROMPT):] + [partial.token_ids[-1]]
    assert opened[0].closed


@pytest.mark.parametrize("limit", [len(PROMPT) + 1, len(PROMPT) + 9])
def test_the_loop_stops_at_the_context_limit_with_the_tokens_so_far(limit):
    """A model with ``max_positions`` positions: prompt + generated never exceeds it, the result says the
    limit stopped it, and the runtime is never asked for a position past the limit."""
    model = FakeModel([P_SURE, P_UNSURE], max_positions=limit)
    result = generate_hybrid(model, PROMPT, config_for(0.3, tokens=50), seed=2,
                             open_session=lambda *a: InProcessVerifier(*a, seed=2))
    assert len(PROMPT) + len(result.token_ids) == limit
    assert result.stopped_at_context_limit and not result.stopped_at_eos
    assert len(PROMPT) + model.runtime.position < limit  # the last fed position is limit - 1


def _pipelined(lookahead: int, delay: int, settings: SamplingSettings, estimator: str, seed: int):
    opened = []

    def open_session(prompt_ids, settings, codec):
        opened.append(InProcessVerifier(prompt_ids, settings, codec, seed=77 + seed, delay=delay))
        return opened[-1]

    config = HybridConfig(threshold=0.3, estimator=estimator, codec=CODEC, settings=settings, max_new_tokens=120,
                          lookahead=lookahead)
    committed = []
    result = generate_hybrid(FakeModel([P_SURE, P_UNSURE, P_SURE, P_SURE]), PROMPT, config, seed=seed,
                             open_session=open_session, on_commit=committed.extend)
    return result, opened[0], committed


SLOW = pytest.mark.slow  # ~7 s each: make test runs every case, make test-fast the default's at T = 1


@pytest.mark.parametrize("settings,estimator", [
    pytest.param(SETTINGS, "max-prob", id="max-prob-T=1"),
    pytest.param(SamplingSettings(temperature=0.0), "max-prob", id="max-prob-T=0", marks=SLOW),
    pytest.param(SETTINGS, "uhlm", id="uhlm-T=1", marks=SLOW),
    pytest.param(SamplingSettings(temperature=0.0), "uhlm", id="uhlm-T=0", marks=SLOW)])
def test_pipelined_runs_give_the_stop_and_wait_tokens(settings, estimator):
    """The pipeline's main correctness property: with the same seeds, any lookahead and any verdict delay
    give the tokens of stop-and-wait, because every draw (draft, estimator noise, verdict) is keyed by
    position. The runs really pipeline: drafts are rolled back and stale Verifies answered."""
    for seed in range(3):
        reference, verifier, _ = _pipelined(0, 0, settings, estimator, seed)
        assert reference.rolled_back == [] and verifier.stale == 0
        wasted = 0
        for lookahead in (4, 16, 64):
            for delay in (0, 3, 20):
                result, verifier, committed = _pipelined(lookahead, delay, settings, estimator, seed)
                assert result.token_ids == reference.token_ids, (lookahead, delay)
                assert committed == result.token_ids  # streamed as committed, never a token taken back
                assert [r.sent for r in result.records] == [r.sent for r in reference.records]
                assert result.stale_verifies == verifier.stale
                wasted += len(result.rolled_back) + result.stale_verifies
        if settings.temperature > 0:
            assert wasted > 0  # rejections happened while drafts were ahead of the verdicts


def test_stop_and_wait_feeds_no_draft_before_its_verdict():
    """Lookahead 0 never feeds a draft to the SLM before its verdict: nothing is rolled back or truncated."""
    result, verifier, _ = _pipelined(0, 5, SETTINGS, "max-prob", 1)
    assert verifier.verifies > 10 and result.rolled_back == [] and result.stale_verifies == 0
