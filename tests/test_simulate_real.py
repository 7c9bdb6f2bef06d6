"""The simulator on real traces: record every policy through the real edge and verifier (a few problems),
replay them; and one validation point over a real shaped link between two network namespaces."""

from __future__ import annotations

import json

import pytest

from simulate.config import parse_config
from simulate.testbed.netns import unavailable_reason
from eval.policies import POLICIES
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
    assert set(manifest["policies"]) == {*POLICIES, "default@0.2"}
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


@pytest.mark.skipif(unavailable_reason() is not None, reason=f"netns validation: {unavailable_reason()}")
def test_validation_point_agrees_with_real_link(tmp_path, slm_onnx):
    """HLM over a 20 Mbit/s tbf-shaped veth with 20 ms RTT: simulator within 30% of the real run (the
    full validation, ``make bench``, reports the measured error at three rates)."""
    from simulate.testbed.validate import run_validation

    report = run_validation([20e6], 0.02, "hlm", problems=1, out=tmp_path, model=slm_onnx)
    point = report["points"][0]
    assert point["measured"]["transmission_rate"] == 1.0
    assert point["errors"]["tokens_per_s"] < 0.3 and point["errors"]["latency_p50_s"] < 0.3, point
