"""`make demo`'s program end to end at a tiny size: verifier subprocess, calibration, six configurations."""

import json

from eval.policies import on_slm
from tests.conftest import run_module

CONFIGS = list(on_slm("demo"))  # every policy of the one table that runs the demo SLM is a row of the demo


def test_demo_writes_all_configurations(tmp_path):
    out = tmp_path / "demo.json"
    proc = run_module("demo", "--problems", "3", "--calibration-problems", "4", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == CONFIGS
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["transmission_rate"] <= 1 and r["tokens_per_s"] > 0
        assert r["acceptance_rate"] is None or 0 <= r["acceptance_rate"] <= 1
    by_name = {r["config"]: r for r in rows}
    assert by_name["slm-only"]["uplink_bytes_per_token"] == 0 and by_name["hlm"]["transmission_rate"] == 1
    assert by_name["hlm"]["uplink_bytes_per_token"] > 4 * 32000  # full32: 128 KB per token
    # the pipelined row drafts ahead of its verdicts yet gives the default row's tokens, problem by problem
    assert by_name["default-pipelined"]["lookahead"] > 0 == by_name["default"]["lookahead"]
    assert by_name["default-pipelined"]["tokens_digest"] == by_name["default"]["tokens_digest"]
