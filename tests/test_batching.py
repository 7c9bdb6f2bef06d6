"""The batched verifier engine: a session's verdicts do not depend on its batch-mates, the batched path is
exact (chi-square against the LLM at a position of a padded batch), the KV budget drops and rebuilds caches
invisibly, and the thread default comes from the usable cores.

Sessions are driven in-process, each on its own thread like the gRPC handlers, against the real demo LLM.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from cloud.engine import SessionState, VerifierModel
from core.cpus import model_threads, usable_cpus
from core.sampling import SamplingSettings, probabilities
from proto.distribution import CodecSpec, Compressed
from tests.conftest import DEMO_PAIR

SETTINGS = SamplingSettings(temperature=1.0)
CODEC = CodecSpec("adaptive")
STEPS = 24


@pytest.fixture(scope="module")
def engines():
    """(batched, one at a time) engines of the demo LLM, one thread each."""
    return (VerifierModel(str(DEMO_PAIR / "llm"), threads=1),
            VerifierModel(str(DEMO_PAIR / "llm"), threads=1, batching=False))


def prompt_of(session: int) -> list[int]:
    """Prompts of different lengths, so batched rows have different cached lengths (padding)."""
    return [1] + [5 + (session * 7 + i) % 300 for i in range(3 + session % 5)]


def drafts_at(seed: int, position: int, width: int) -> list[tuple[int, Compressed]]:
    """A block of ``width`` drafts whose ids and p~ depend only on (seed, position): any replay sends the same."""
    rng = np.random.default_rng([seed, position, 99])
    out = []
    for _ in range(width):
        ids = np.sort(rng.choice(400, size=8, replace=False))
        probs = rng.dirichlet(np.ones(8))
        out.append((int(rng.choice(ids, p=probs)), Compressed(ids, probs, 1.0)))
    return out


def drive(engine: VerifierModel, session: int, out: dict, barrier: threading.Barrier | None = None) -> None:
    """One session verifying STEPS blocks (widths 1-3 by position), its context recorded in ``out``."""
    state = engine.open(prompt_of(session), SETTINGS, CODEC, seed=1000 + session)
    for _ in range(STEPS):
        if barrier is not None:
            barrier.wait(timeout=60)  # a bound, not a timing: lines the sessions up so their forwards batch
        position = len(state.context)
        engine.verify(state, [], drafts_at(state.seed, position, 1 + position % 3))
    engine.close(state)
    out[session] = state.context


def run_concurrently(engine: VerifierModel, sessions: list[int]) -> dict:
    out: dict = {}
    barrier = threading.Barrier(len(sessions))
    threads = [threading.Thread(target=drive, args=(engine, s, out, barrier), daemon=True) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(out) == len(sessions), "a session did not finish"
    return out


def test_a_session_gives_the_same_tokens_batched_with_0_or_15_others(engines):
    batched, alone = engines
    lone: dict = {}
    drive(batched, 0, lone)
    rows_before = batched.stats().max_rows
    crowd = run_concurrently(batched, list(range(16)))
    assert batched.stats().max_rows > max(1, rows_before), "the sessions never shared a forward"
    unbatched = run_concurrently(alone, list(range(16)))
    assert alone.stats().max_rows == 1
    assert crowd[0] == lone[0]
    assert crowd == unbatched


def test_generate_is_the_same_batched_or_alone(engines):
    batched, alone = engines
    out: dict = {}

    def generate(engine, key, seed):
        out[key] = list(engine.generate(prompt_of(seed), SETTINGS, seed, 20, set()))

    threads = [threading.Thread(target=generate, args=(batched, ("b", s), s)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for s in range(8):
        generate(alone, ("a", s), s)
    assert all(out[("b", s)] == out[("a", s)] for s in range(8))


def test_batched_verdicts_follow_the_llm_exactly(engines):
    """Verify-all at one position, 1000 sessions in batches with decoy sessions of longer cached contexts (so
    their cached keys are padded): the committed token is distributed as q (chi-square), whatever p~ the draft
    came from."""
    batched, _ = engines
    settings = SamplingSettings(temperature=1.0, top_k=6)  # six outcomes: a sharp test at a modest sample size
    prompt = prompt_of(3)
    with torch.inference_mode():
        q = probabilities(batched.model(torch.tensor([prompt])).logits[0, -1].float().numpy(), settings)
    support = np.flatnonzero(q)
    p_tilde = Compressed(support, np.full(len(support), 1.0 / len(support)), 1.0)  # uniform: far from q
    counts = np.zeros(len(q))
    lock = threading.Lock()

    def sessions(first: int, n: int, decoy: bool) -> None:
        for seed in range(first, first + n):
            ids = prompt_of(seed % 5 + 10) * 3 if decoy else prompt
            state = batched.open(ids, settings, CODEC, seed=seed)
            batched.prefill(state)  # a cached past: the rows of a batch are padded to the decoys' longer one
            draft = int(np.random.default_rng([seed, 7]).choice(support))
            outcome = batched.verify(state, [], [(draft, p_tilde)])
            batched.close(state)
            if not decoy:
                with lock:
                    counts[outcome.token] += 1

    threads = [threading.Thread(target=sessions, args=(i * 125, 125, False)) for i in range(8)]
    threads += [threading.Thread(target=sessions, args=(10_000 + i * 125, 125, True)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert counts.sum() == 1000
    assert chisquare(counts[support], q[support] * counts.sum()).pvalue > 1e-3


def test_a_kv_budget_for_4_sessions_serves_16_with_the_same_tokens():
    probe = VerifierModel(str(DEMO_PAIR / "llm"), threads=1)
    state = probe.open(prompt_of(0), SETTINGS, CODEC, seed=1)
    probe.verify(state, [], drafts_at(1, len(state.context), 1))
    per_session = state.cache.nbytes  # one session's cache at the smallest allocation
    budgeted = VerifierModel(str(DEMO_PAIR / "llm"), threads=1, kv_budget_mb=4 * per_session / 2**20)
    contexts = {}
    for engine in (probe, budgeted):
        states = [engine.open(prompt_of(s), SETTINGS, CODEC, seed=1000 + s) for s in range(16)]
        for _ in range(STEPS // 2):  # interleaved: every session idles while the 15 others verify
            for st in states:
                engine.verify(st, [], drafts_at(st.seed, len(st.context), 1 + len(st.context) % 3))
                assert engine.budget.total_bytes <= engine.budget.budget_bytes + per_session or engine is probe
        contexts[engine is budgeted] = [st.context for st in states]
    assert budgeted.budget.drops > 16, "the budget never dropped a cache"
    assert probe.budget.drops == 0
    assert contexts[True] == contexts[False]


def test_the_thread_default_is_the_usable_cores_but_one(tmp_path: Path):
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")
    assert usable_cpus(quota) == 1
    quota.write_text("max 100000\n")
    assert usable_cpus(quota) == usable_cpus(tmp_path / "absent") >= 1
    quota.write_text("250000 100000\n")
    assert usable_cpus(quota) == min(3, usable_cpus(tmp_path / "absent"))
    quota.write_text("200000 100000\n")
    assert model_threads(quota) == max(1, min(2, usable_cpus(tmp_path / "absent")) - 1)
    engine = VerifierModel(str(DEMO_PAIR / "llm"))
    assert engine.threads == model_threads() == torch.get_num_threads()
    torch.set_num_threads(1)


def test_a_session_state_keeps_its_context_when_its_cache_is_dropped(engines):
    batched, _ = engines
    state: SessionState = batched.open(prompt_of(2), SETTINGS, CODEC, seed=5)
    for _ in range(4):
        batched.verify(state, [], drafts_at(5, len(state.context), 2))
    before = list(state.context)
    state.cache.drop()  # what the budget does to an idle session
    batched.verify(state, [], drafts_at(5, len(state.context), 2))
    assert state.context[: len(before)] == before
    assert state.cache.length == len(state.context) - 1
    batched.close(state)
