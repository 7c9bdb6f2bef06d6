"""The frontier sweep: config validation, a two-point sweep through the real verifier, resuming."""

import csv
import json

import pytest

from eval.sweep import COLUMNS, load_config
from tests.conftest import DEMO_PAIR, run_module


def test_config_errors_name_the_field(tmp_path):
    cases = [({"model": "x", "estimators": ["nope"], "thresholds": [0.1]}, "'estimators'"),
             ({"model": "x", "codecs": ["zip"], "thresholds": [0.1]}, "'codecs'"),
             ({"thresholds": [0.1]}, "'model'"),
             ({"model": "x", "thresholds": [0.1], "colour": 1}, "colour"),
             ({"model": "x"}, "'thresholds'"),
             ({"model": "x", "thresholds": [0.1], "problems": 0}, "'problems'")]
    for raw, needle in cases:
        path = tmp_path / "c.json"
        path.write_text(json.dumps(raw))
        with pytest.raises(ValueError, match=needle):
            load_config(path)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_point_sweep_and_resume(slm_onnx, tmp_path):
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({"model": str(slm_onnx), "verifier_model": str(DEMO_PAIR / "llm"),
                                  "problems": 6, "temperatures": [0.0], "estimators": ["max-prob"],
                                  "codecs": ["adaptive"], "thresholds": [0.01, 0.3]}))
    out = tmp_path / "out"
    proc = run_module("eval", "sweep", "--config", str(config), "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(out / "frontier.csv")
    assert list(rows[0]) == COLUMNS and len(rows) == 4
    by = {(r["estimator"], float(r["u_th"])): r for r in rows}
    slm, llm = float(by[("slm-only", float("inf"))]["accuracy"]), float(by[("llm-only", float("inf"))]["accuracy"])
    points = [by[("max-prob", 0.01)], by[("max-prob", 0.3)]]
    for r in points:
        assert slm - 0.1 <= float(r["accuracy"]) <= llm + 0.1
        assert 0 <= float(r["transmission_rate"]) <= 1 and float(r["uplink_bytes_per_token"]) > 0
    assert float(points[0]["transmission_rate"]) >= float(points[1]["transmission_rate"])  # monotone in u_th
    assert (out / "accuracy_vs_tr_T0.png").is_file() and (out / "accuracy_vs_bytes_T0.png").is_file()
    before = (out / "frontier.csv").read_text()
    proc = run_module("eval", "sweep", "--config", str(config), "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "frontier.csv").read_text() == before  # nothing rerun, nothing appended


def test_invalid_config_is_one_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    proc = run_module("eval", "sweep", "--config", str(path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "cannot read sweep config" in proc.stderr and "Traceback" not in proc.stderr
