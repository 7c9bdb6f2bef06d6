"""Protocol v2 and the pipelined edge against a real verifier process, with real round trips.

- The wire rules on a raw stream: a Verify sent while an earlier one is still in flight is answered
  after it; when the earlier one is rejected, the later one (same epoch) is answered stale and changes
  nothing; the next Verify of the new epoch at the agreed position is verified.
- The main correctness property of the pipeline: with the same seeds, the edge gives the same tokens at
  lookahead 0 (stop-and-wait), 4, 16 and 64, straight to the verifier and through a delay relay
  (``simulate/testbed/relay.py``, a real TCP hop that holds every byte 10 ms each way: 20 ms RTT), at
  T = 1 and T = 0, for the default policy and for U-HLM's estimator. The pipelined runs really draft
  ahead (some drafts are rolled back, some Verifies are stale).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from core.process import ChildProcess, VerifierProcess
from core.sampling import SamplingSettings
from edge.client import connect
from edge.hybrid import DEFAULT_THRESHOLD, HybridConfig, generate_hybrid
from edge.model import EdgeModel
from edge.resilient import Failover, ResilientSession
from models.task import held_out_problems
from proto import hybrid_pb2 as pb
from proto.distribution import CodecSpec
from proto.messages import PROTOCOL_VERSION, codec_to_msg, fingerprint_to_msg
from simulate.testbed.relay import READY_PREFIX
from tests.conftest import DEMO_PAIR
from tests.verifier_clients import raw_session

PROBLEMS = [p.prompt for p in held_out_problems(12)]
LOOKAHEADS = (4, 16, 64)
ONE_WAY_DELAY_S = 0.010


@pytest.fixture(scope="module")
def verifier():
    with VerifierProcess(str(DEMO_PAIR / "llm")) as proc:
        yield proc


@pytest.fixture(scope="module")
def relayed(verifier):
    """The verifier's address through a relay that holds every byte ONE_WAY_DELAY_S each way."""
    cmd = [sys.executable, "-m", "simulate.testbed.relay", "--listen", "127.0.0.1:0", "--target", verifier.address,
           "--delay", str(ONE_WAY_DELAY_S)]
    with ChildProcess(cmd, READY_PREFIX, timeout=60) as relay:
        yield relay.address


@pytest.fixture(scope="module")
def model(slm_onnx):
    return EdgeModel(slm_onnx, providers="cpu", threads=1)


# -- the wire rules on a raw stream ----------------------------------------------------------------------


def _verify(seq, position, epoch, draft, p_tilde: np.ndarray) -> pb.EdgeMessage:
    block = [pb.DraftedPosition(token_id=draft, distribution=p_tilde.astype("<f4").tobytes())]
    return pb.EdgeMessage(verify=pb.Verify(seq=seq, position=position, epoch=epoch, block=block))


def test_a_verify_after_a_rejection_in_its_epoch_is_stale_and_changes_nothing(verifier, model):
    prompt = model.encode(PROBLEMS[0])
    n = model.manifest.id_space
    unlikely = int(np.argmin(model.runtime.prefill(prompt)))  # the LLM gives it ~0: a draft sure to be rejected
    one_hot = np.zeros(n)
    one_hot[unlikely] = 1.0
    uniform = np.full(n, 1.0 / n)
    open_msg = pb.EdgeMessage(open=pb.Open(
        fingerprint=fingerprint_to_msg(model.manifest.fingerprint), sampling=pb.Sampling(temperature=1.0),
        prompt_ids=prompt, codec=codec_to_msg(CodecSpec("full32")), seed=3, protocol=PROTOCOL_VERSION))
    p = len(prompt)
    messages = [open_msg,
                _verify(1, p, 0, unlikely, one_hot),  # rejected: the epoch ends
                _verify(2, p + 1, 0, 5, uniform),  # drafted on the rejected branch: stale
                _verify(3, p + 1, 1, 5, uniform),  # the new epoch, right after the resampled token
                pb.EdgeMessage(close=pb.Close())]
    with connect(verifier.address) as channel:
        code, details, responses = raw_session(channel, messages)
    assert code.name == "OK", details
    first, stale, third = (r.verdict for r in responses[1:])
    assert (first.accepted, first.accepted_count, first.epoch, first.stale) == (False, 0, 1, False)
    assert first.token_id != unlikely
    assert stale.stale and stale.epoch == 1 and stale.seq == 2
    assert not third.stale and third.seq == 3 and third.epoch in (1, 2)


# -- token identity at any lookahead and round trip --------------------------------------------------------


def _generate(model, address, prompt, settings, estimator, lookahead, seed):
    config = HybridConfig(threshold=DEFAULT_THRESHOLD if estimator == "max-prob" else 0.3, estimator=estimator,
                          settings=settings, max_new_tokens=48, lookahead=lookahead)

    def open_session(prompt_ids, settings, codec):
        return ResilientSession(Failover((address,)), model.manifest.fingerprint, prompt_ids, settings, codec,
                                seed=seed, timeout=30)

    return generate_hybrid(model, model.encode(prompt), config, seed=seed, open_session=open_session)


@pytest.mark.parametrize("settings,estimator", [(SamplingSettings(temperature=1.0), "max-prob"),
                                                (SamplingSettings(temperature=0.0), "max-prob"),
                                                (SamplingSettings(temperature=1.0), "uhlm")],
                         ids=["T=1-default", "T=0-default", "T=1-uhlm"])
def test_any_lookahead_and_round_trip_gives_the_stop_and_wait_tokens(model, verifier, relayed, settings,
                                                                     estimator):
    problems = PROBLEMS if estimator == "max-prob" else PROBLEMS[:3]
    wasted = 0
    for seed, prompt in enumerate(problems):
        reference = _generate(model, verifier.address, prompt, settings, estimator, 0, seed)
        assert reference.rolled_back == [] and reference.stale_verifies == 0
        for address in (verifier.address, relayed):
            for lookahead in LOOKAHEADS if address == relayed else LOOKAHEADS[:1]:
                result = _generate(model, address, prompt, settings, estimator, lookahead, seed)
                assert result.token_ids == reference.token_ids, (prompt, address, lookahead)
                assert [r.sent for r in result.records] == [r.sent for r in reference.records]
                wasted += len(result.rolled_back) + result.stale_verifies
    if settings.temperature > 0:
        assert wasted > 0  # drafts ran ahead of rejections: the pipeline was exercised


def test_cli_lookahead_streams_the_same_text(verifier, relayed, slm_onnx):
    """`python -m edge generate --lookahead 16` through the relay prints what stop-and-wait prints."""
    from tests.conftest import run_module

    outputs = []
    for lookahead, address in ((0, verifier.address), (16, relayed)):
        proc = run_module("edge", "generate", "--model", str(slm_onnx), "--prompt", PROBLEMS[1], "--verifier",
                          address, "--seed", "4", "--lookahead", str(lookahead), "--max-new-tokens", "40", "--json")
        assert proc.returncode == 0, proc.stderr
        text, summary = proc.stdout.rstrip("\n").rsplit("\n", 1)
        outputs.append(text)
    assert outputs[0] == outputs[1] and outputs[0].startswith(PROBLEMS[1])


