"""The hybrid loop end to end: a real verifier subprocess on a free loopback port, the real ONNX edge."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import json
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scipy.stats import chisquare

from core.process import VerifierProcess
from edge.client import VerifierError, VerifierSession, connect, generate_remote
from edge.hybrid import HybridConfig, Verifier, generate_hybrid
from edge.model import EdgeModel
from core.sampling import SamplingSettings, probabilities
from proto.distribution import CodecSpec, compress
from proto.payload import encode
from tests.conftest import DEMO_PAIR, run_module

PROMPT = "Q:7+5-3+8 A:"


@pytest.fixture(scope="module")
def verifier():
    with VerifierProcess(str(DEMO_PAIR / "llm")) as proc:
        yield proc


@pytest.fixture(scope="module")
def channel(verifier):
    ch = connect(verifier.address)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def edge_model(slm_onnx):
    return EdgeModel(slm_onnx, providers="cpu")


def _opener(channel, model, seed=None, report_q=False):
    def open_session(prompt_ids, settings, codec):
        return VerifierSession(channel, model.manifest.fingerprint, prompt_ids, settings, codec, seed=seed,
                               report_target_prob=report_q)
    return open_session


def _llm_distribution(prompt_ids, settings):
    """q computed directly with transformers, independent of the verifier's code path."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(DEMO_PAIR / "llm", dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = llm(torch.tensor([prompt_ids])).logits[0, -1].numpy()
    return probabilities(logits, settings)


def test_health_and_reflection(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    status = stub.Check(health_pb2.HealthCheckRequest(service="hybrid.v1.Verifier"), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.exactness
@pytest.mark.parametrize("prefix", ["", "7+5=1"], ids=["first-token", "later-position"])
def test_verify_all_follows_llm_distribution(channel, edge_model, prefix):
    """Verified tokens are distributed as the LLM's own softmax (chi-square, fixed seeds), through the batched
    engine."""
    settings = SamplingSettings(temperature=1.5)  # flattened, so several tokens carry mass
    codec = CodecSpec("adaptive")
    ids = edge_model.encode(PROMPT + prefix)
    q = _llm_distribution(ids, settings)
    p_tilde = compress(probabilities(edge_model.runtime.prefill(ids), settings), codec)
    payload = encode(p_tilde, codec, edge_model.runtime.id_space)
    rng = np.random.default_rng(7)
    n = 3000
    drafts = [p_tilde.sample(rng) for _ in range(n)]  # drawn up front: the same draws however sessions overlap

    def verified(i: int) -> int:
        session = VerifierSession(channel, edge_model.manifest.fingerprint, ids, settings, codec, seed=1000 + i)
        token = session.verify([], drafts[i], payload).token
        session.close()
        return token

    counts = np.zeros(len(q), dtype=np.int64)
    with ThreadPoolExecutor(8) as pool:  # 8 sessions at a time: the verifier batches their forwards
        for token in pool.map(verified, range(n)):
            counts[token] += 1
    top = np.argsort(-q)[:6]
    observed = np.r_[counts[top], n - counts[top].sum()]
    expected = np.r_[q[top], 1 - q[top].sum()] * n
    keep = expected >= 5
    assert observed[~keep].sum() <= max(5, 3 * expected[~keep].sum())
    stat = chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum())
    assert stat.pvalue > 1e-3, (observed, expected)


def test_infinite_threshold_equals_slm_only_and_sends_nothing(channel, edge_model):
    settings, codec = SamplingSettings(temperature=1.0), CodecSpec("adaptive")
    config = HybridConfig(threshold=float("inf"), codec=codec, settings=settings, max_new_tokens=40)
    prompt = edge_model.encode(PROMPT)
    local = generate_hybrid(edge_model, prompt, config, seed=5)
    opened = []

    def open_session(prompt_ids, settings, codec):
        session = _opener(channel, edge_model)(prompt_ids, settings, codec)
        assert isinstance(session, Verifier)  # the loop's protocol, satisfied by the plain session
        opened.append(session.uplink_bytes)  # bytes of the Open message
        return session

    remote = generate_hybrid(edge_model, prompt, config, seed=5, open_session=open_session)
    assert remote.token_ids == local.token_ids and remote.sent == 0
    assert remote.uplink_bytes == opened[0]  # nothing after Open


def test_verify_all_greedy_equals_llm_greedy(channel, edge_model):
    """Greedy + verify-all yields exactly the LLM's greedy tokens; the Generate RPC agrees too."""
    settings = SamplingSettings(temperature=0)
    config = HybridConfig(threshold=float("-inf"), codec=CodecSpec("topk"), settings=settings, max_new_tokens=40)
    prompt = edge_model.encode(PROMPT)
    hybrid = generate_hybrid(edge_model, prompt, config, seed=0,
                             open_session=_opener(channel, edge_model))
    remote, _, _ = generate_remote(channel, edge_model.manifest.fingerprint, prompt, settings, 40,
                                   sorted(edge_model.eos_ids))
    assert hybrid.token_ids == remote and hybrid.transmission_rate == 1.0
    assert hybrid.text.endswith("#17")


def test_mismatched_fingerprint_refused_while_others_are_served(channel, edge_model):
    settings, codec = SamplingSettings(temperature=1.0), CodecSpec("adaptive")
    prompt = edge_model.encode(PROMPT)
    good = VerifierSession(channel, edge_model.manifest.fingerprint, prompt, settings, codec, seed=1)
    errors = []

    def bad_session():
        wrong = {"tokenizer_hash": "0000000000000000", "id_space": 32000, "logit_width": 32000}
        try:
            _ = VerifierSession(channel, wrong, prompt, settings, codec).opened  # refused at Open
        except VerifierError as exc:
            errors.append(exc)

    t = threading.Thread(target=bad_session)
    t.start()
    t.join(30)
    assert errors and errors[0].code == grpc.StatusCode.FAILED_PRECONDITION
    assert "0000000000000000" in str(errors[0]) and edge_model.manifest.tokenizer_hash in str(errors[0])
    p = compress(probabilities(edge_model.runtime.prefill(prompt), settings), codec)
    verdict = good.verify([], p.sample(np.random.default_rng(0)), encode(p, codec, 32000))
    assert 0 <= verdict.token < 32000
    good.close()


def test_bad_verify_gets_invalid_argument(channel, edge_model):
    settings, codec = SamplingSettings(temperature=1.0), CodecSpec("adaptive")
    session = VerifierSession(channel, edge_model.manifest.fingerprint, edge_model.encode(PROMPT), settings, codec)
    with pytest.raises(VerifierError) as err:
        session.verify([], 5, b"\xff\xff")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_hybrid_with_trace(verifier, slm_onnx, tmp_path):
    trace = tmp_path / "trace.jsonl"
    proc = run_module("edge", "generate", "--model", str(slm_onnx), "--prompt", PROMPT, "--verifier",
                      verifier.address, "--threshold", "0.01", "--seed", "3", "--trace", str(trace), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["tokens"] > 5 and 0 <= summary["transmission_rate"] <= 1
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert lines[0]["kind"] == "open" and lines[0]["prompt_tokens"] > 0 and lines[0]["uplink_bytes"] > 0
    assert lines[-1]["kind"] == "close" and lines[-1]["tokens"] == summary["tokens"]
    rows = [r for r in lines if r["kind"] == "token"]
    assert len(rows) == summary["tokens"] == len(lines) - 2
    assert {"position", "token", "u", "sent", "bytes", "accepted", "returned", "slm_step_s", "wait_s", "pending",
            "down_bytes", "server_s"} <= set(rows[0])
    sent = [r for r in rows if r["sent"]]
    assert all(r["down_bytes"] > 0 and 0 < r["server_s"] <= r["wait_s"] for r in sent)
    assert all(0 <= r["queue_s"] <= r["server_s"] and r["encode_s"] > 0 and r["blocked_s"] > 0 for r in sent)
    assert lines[0]["lookahead"] == 0 and lines[0]["open_s"] > 0
    assert (lines[-1]["rolled_back"], lines[-1]["stale_verifies"], lines[-1]["stale_uplink_bytes"]) == (0, 0, 0)
    assert sum(r["bytes"] for r in rows) < lines[-1]["uplink_bytes"]  # + Open and Close


def test_cli_unreachable_verifier_is_one_line(slm_onnx):
    proc = run_module("edge", "generate", "--model", str(slm_onnx), "--prompt", PROMPT, "--verifier",
                      "127.0.0.1:1", "--timeout", "1")
    assert proc.returncode == 2 and "no verifier reachable" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_calibrate_then_generate_with_calibration(verifier, slm_onnx, tmp_path):
    cal = tmp_path / "calibration.json"
    proc = run_module("eval", "calibrate", "--model", str(slm_onnx), "--verifier", verifier.address,
                      "--prompts", "demo", "--n", "4", "--n-test", "3", "--out", str(cal))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(cal.read_text())
    assert set(data["fits"]) == {"uhlm", "perturb-mode", "entropy", "max-prob", "margin"}
    assert len(data["beta"]) == data["n_calibration_tokens"] > 10 and data["n_test_tokens"] > 5
    for rules in data["test"].values():
        assert {"averse", "prone", "empirical"} == set(rules)
        assert all(0 <= r["transmission_rate"] <= 1 for r in rules.values())
    for risk in ("averse", "0.01"):
        proc = run_module("edge", "generate", "--model", str(slm_onnx), "--prompt", PROMPT, "--verifier",
                          verifier.address, "--calibration", str(cal), "--risk", risk, "--json")
        assert proc.returncode == 0, proc.stderr
        assert "threshold" in json.loads(proc.stdout.strip().splitlines()[-1])
    proc = run_module("edge", "generate", "--model", str(slm_onnx), "--prompt", PROMPT, "--verifier",
                      verifier.address, "--calibration", str(cal), "--risk", "bogus")
    assert proc.returncode == 2 and "--risk" in proc.stderr
