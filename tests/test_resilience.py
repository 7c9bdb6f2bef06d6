"""Faults: a replica killed (SIGKILL) or stopped (SIGTERM, drain) mid-generation, and the only verifier lost.

The edge must finish on another replica with exactly the text of an uninterrupted run (same seeds), no
token lost or duplicated; with ``--on-cloud-loss local`` it must finish alone and mark what it could not
verify; with ``fail`` it must raise and still hand back every token generated so far.
"""

from __future__ import annotations

import dataclasses
import json
import signal

import pytest

from core.process import VerifierProcess
from edge.client import VerifierError
from edge.hybrid import HybridConfig, Verifier, generate_hybrid
from edge.model import EdgeModel
from edge.resilient import CloudLost, Failover, ResilientSession
from core.sampling import SamplingSettings
from proto.distribution import CodecSpec
from tests.conftest import DEMO_PAIR, run_module
from tests.verifier_clients import PROMPT

pytestmark = pytest.mark.fault
SEED = 5
# Verify every token: the most traffic, so a failure always lands on a Verify in flight.
CONFIG = HybridConfig(threshold=float("-inf"), estimator="max-prob", codec=CodecSpec("adaptive"),
                      settings=SamplingSettings(temperature=1.0), max_new_tokens=40)


@pytest.fixture(scope="module")
def model(slm_onnx):
    return EdgeModel(slm_onnx, providers="cpu")


def _replica():
    return VerifierProcess(str(DEMO_PAIR / "llm"), extra_args=("--shutdown-grace", "2"))


class FailAfter:
    """Wraps a session: before its ``n``-th Verify, ``action()`` runs (kills the serving replica)."""

    def __init__(self, session, n: int, action):
        self.session, self.n, self.action, self.calls = session, n, action, 0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def submit(self, *args):
        self.calls += 1
        if self.calls == self.n:
            self.in_flight_at_failure = self.session.in_flight
            self.action()
        return self.session.submit(*args)


def _run(model, failover, wrap=None, lookahead=0):
    sessions, wrapped = [], []

    def open_session(prompt_ids, settings, codec):
        sessions.append(ResilientSession(failover, model.manifest.fingerprint, prompt_ids, settings, codec,
                                         seed=SEED, timeout=10))
        wrapped.append(wrap(sessions[-1]) if wrap else sessions[-1])
        return wrapped[-1]

    config = dataclasses.replace(CONFIG, lookahead=lookahead)
    result = generate_hybrid(model, model.encode(PROMPT), config, seed=SEED, open_session=open_session)
    assert isinstance(sessions[0], Verifier)  # the loop's protocol, satisfied by the failover session
    _run.wrapped = wrapped[0]
    return result, sessions[0]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_replica_lost_mid_generation_edge_finishes_on_the_other_identically(model, how):
    with _replica() as a, _replica() as b:
        reference, _ = _run(model, Failover((a.address,)))
        assert len(reference.token_ids) >= 10

        def lose_a():
            a.proc.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)

        result, session = _run(model, Failover((a.address, b.address), loss_after_s=20),
                               wrap=lambda s: FailAfter(s, 6, lose_a))
        assert a.proc.wait(30) is not None
    assert result.token_ids == reference.token_ids  # identical text, nothing lost or duplicated
    assert session.reconnects == 1 and session.errors
    assert session.history == result.prompt_ids + result.token_ids[:len(session.history) - len(result.prompt_ids)]
    assert result.unverified == 0 and all(r.sent for r in result.records)


def test_replica_killed_with_verifies_in_flight_resends_them_and_finishes_identically(model):
    """Pipelined (lookahead 6, every token verified): the replica dies with at least 3 Verifies in flight; the
    edge reopens on the other replica, replays the agreed text and resends the unresolved Verifies, and the
    tokens are those of an uninterrupted stop-and-wait run."""
    with _replica() as a, _replica() as b:
        reference, _ = _run(model, Failover((a.address,)))
        result, session = _run(model, Failover((a.address, b.address), loss_after_s=20), lookahead=6,
                               wrap=lambda s: FailAfter(s, 9, a.proc.kill))
        assert a.proc.wait(30) is not None
    assert _run.wrapped.in_flight_at_failure >= 3
    assert result.token_ids == reference.token_ids
    assert session.reconnects == 1 and result.unverified == 0 and all(r.sent for r in result.records)


def test_cloud_loss_local_finishes_and_marks_unverified(model):
    with _replica() as only:
        result, session = _run(model, Failover((only.address,), on_cloud_loss="local", loss_after_s=1.0,
                                               connect_timeout_s=0.5),
                               wrap=lambda s: FailAfter(s, 4, only.proc.kill))
    assert session.lost and len(result.token_ids) >= 10
    verified = [r for r in result.records if r.sent]
    unverified = [r for r in result.records if r.unverified]
    assert len(verified) == 3  # the Verifies before the loss
    assert unverified and len(verified) + len(unverified) == len(result.records)
    assert all(not r.sent and r.token == r.draft for r in unverified)


def test_cloud_loss_fail_raises_with_the_partial_text(model):
    with _replica() as only:
        with pytest.raises(CloudLost) as err:
            _run(model, Failover((only.address,), on_cloud_loss="fail", loss_after_s=1.0, connect_timeout_s=0.5),
                 wrap=lambda s: FailAfter(s, 4, only.proc.kill))
    assert "no verifier reachable" in str(err.value)
    assert len(err.value.partial.token_ids) == 3  # the tokens verified before the loss are handed back


def test_non_retryable_refusal_is_not_retried(model):
    with _replica() as only:
        session = ResilientSession(Failover((only.address,), loss_after_s=30),
                                   {"tokenizer_hash": "x", "id_space": 1, "logit_width": 1}, [0], CONFIG.settings,
                                   CONFIG.codec)
        with pytest.raises(VerifierError) as err:  # the refused Open surfaces at the first verdict
            session.verify([], 0, b"\x01\x00")
    assert err.value.code.name == "FAILED_PRECONDITION" and session.reconnects == 0


def test_cli_unreachable_verifier_with_local_policy_generates_unverified(slm_onnx):
    proc = run_module("edge", "generate", "--model", str(slm_onnx), "--prompt", PROMPT, "--verifier",
                      "127.0.0.1:1,127.0.0.1:2", "--on-cloud-loss", "local", "--cloud-loss-after", "0.5",
                      "--threshold=-inf", "--max-new-tokens", "8", "--seed", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["tokens"] == summary["unverified_tokens"] > 0
    assert summary["transmission_rate"] == 0 and any("no verifier reachable" in e for e in summary["cloud_errors"])
