"""The simulator on real traces: record every policy through the real edge and verifier (a few problems),
replay them; and one validation point over a real shaped link between two network namespaces."""

from __future__ import annotations

import json

import pytest

from simulate.config import parse_config
from simulate.testbed.netns import unavailable_reason
from eval.policies import COARSE, POLICIES, on_slm
from simulate.testbed.record import record_all
from simulate.study import run_one


@pytest.fixture(scope="module")
def traces(tmp_path_factory, slm_onnx):
    out = tmp_path_factory.mktemp("sim") / "traces"
    record_all(out, problems=2, calibration_problems=3, seed=0, temperature=1.0, extra_thresholds=[0.2],
               model_dir=slm_onnx)
    return out


def test_recorded_traces_replay_for_every_policy(traces):
    manifest = json.loads((traces / "manifest.json").read_text())
    # coarse modes: record --coarse; policies of other edge models or a router: python -m simulate modes
    replayed = {name for name, p in on_slm("demo").items() if p.route != COARSE}
    assert set(manifest["policies"]) == {*replayed, "default@0.2"}
    base = {"traces_dir": str(traces), "devices": 3, "tokens_per_device": 40,
            "network": {"rtt_s": 0.05, "uplink": {"rate_bps": 1e7}}}
    results = {p: run_one(parse_config({**base, "policy": p})) for p in manifest["policies"]}
    for name, m in results.items():
        assert m["tokens"] == 120 and m["tokens_per_s"] > 0, name
        assert m["accuracy"] == pytest.approx(manifest["policies"][name]["accuracy"]), name
    assert results["slm-only"]["uplink_bytes_per_token"] == 0
    assert results["hlm"]["transmission_rate"] == 1.0
    assert results["hlm"]["uplink_grpc_bytes_per_token"] > 4 * 32000  # full32 distributions
    assert results["default"]["uplink_bytes_per_token"] < results["hlm"]["uplink_bytes_per_token"] / 100
    assert results["llm-only"]["service_model"]["samples"] > 0


def test_pipelined_trace_replays(traces):
    """default-pipelined (lookahead 16): the same tokens as default, replayed by the edge loop's replay; at its
    own recorded round trips the replay accounts for the generations' wall time."""
    from simulate.engine import Simulation
    from simulate.trace import load_trace

    pipelined, default = load_trace(traces / "default-pipelined.jsonl"), load_trace(traces / "default.jsonl")
    assert {g.lookahead for g in pipelined.generations} == {POLICIES["default-pipelined"].lookahead} != {0}
    assert [g.tokens for g in pipelined.generations] == [g.tokens for g in default.generations]
    assert pipelined.transmission_rate == default.transmission_rate  # the lookahead never changes the tokens
    config = parse_config({"traces": {"p": str(traces / "default-pipelined.jsonl")}, "policy": "p",
                           "tokens_per_device": pipelined.tokens})
    recorded = Simulation(config, pipelined, recorded=True).run().metrics
    seconds = sum(g.seconds for g in pipelined.generations)
    assert recorded["makespan_s"] == pytest.approx(seconds, rel=0.1)
    assert recorded["rolled_back_per_token"] == pytest.approx(
        sum(g.rolled_back for g in pipelined.generations) / pipelined.tokens, abs=0.2)
    far = run_one(parse_config({**{"traces_dir": str(traces)}, "policy": "default-pipelined",
                                "tokens_per_device": pipelined.tokens, "network": {"rtt_s": 0.05}}))
    near = run_one(parse_config({**{"traces_dir": str(traces)}, "policy": "default-pipelined",
                                 "tokens_per_device": pipelined.tokens, "network": {"rtt_s": 0.0}}))
    assert far["tokens"] == near["tokens"] == pipelined.tokens
    assert far["makespan_s"] > near["makespan_s"]


@pytest.mark.skipif(unavailable_reason() is not None, reason=f"netns validation: {unavailable_reason()}")
def test_validation_point_agrees_with_real_link(tmp_path, slm_onnx):
    """HLM over a 20 Mbit/s tbf-shaped veth with 20 ms RTT, stop-and-wait and pipelined (lookahead 4: Verifies
    queue on the uplink, rejections roll back, stale Verifies go up): simulator within 30% of the real run (the
    full validation, ``make bench``, reports the measured errors)."""
    from simulate.testbed.validate import run_validation

    report = run_validation([20e6], 0.02, "hlm", problems=1, out=tmp_path, model=slm_onnx, lookaheads=(0, 4))
    for point in report["points"]:
        assert point["measured"]["transmission_rate"] == 1.0
        assert point["errors"]["tokens_per_s"] < 0.3 and point["errors"]["latency_p50_s"] < 0.3, point
