"""The modes table's arithmetic and plots (``eval/modes.py``, ``eval.plots.plot_modes``): intervals of a rate and
of a paired difference, and two plots per temperature. The table itself runs in ``make bench`` (section modes)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from edge.uncertainty import DEFAULT_ESTIMATOR
from eval.modes import ci95, format_table, paired_diff_ci95
from eval.policies import POLICIES
from eval.plots import plot_modes


def test_the_interval_of_a_rate_shrinks_with_the_square_root_of_n():
    assert math.isclose(ci95([1, 0] * 50), 1.959964 * math.sqrt(0.25 / 100))
    assert math.isclose(ci95([1, 0] * 200), ci95([1, 0] * 50) / 2)


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=2, max_size=200))
def test_identical_runs_differ_by_exactly_zero(pairs):
    a = [x for x, _ in pairs]
    assert paired_diff_ci95(a, a) == (0.0, 0.0)
    diff, half = paired_diff_ci95(a, [y for _, y in pairs])
    assert -1 <= diff <= 1 and half >= 0


def row(mode, t, exact=True, acc=0.9):
    return {"mode": mode, "temperature": t, "exact": exact, "accuracy": acc, "ci95": 0.03, "retention": 1.0,
            "diff_vs_default": 0.0, "diff_vs_default_ci95": 0.01, "transmission_rate": 0.1, "llm_token_share": 0.02,
            "round_trips_per_token": 0.05, "uplink_bytes_per_token": 6.0, "downlink_bytes_per_token": 3.0,
            "tokens_per_s": 200.0}


def test_two_plots_per_temperature_and_a_table_that_names_the_inexact(tmp_path):
    rows = [row("default", 1.0), row("step-judge", 1.0, exact=False), row("default", 0.0), row("slm-only", 0.0)]
    rows[-1]["round_trips_per_token"] = rows[-1]["uplink_bytes_per_token"] = 0.0  # log axes: no crash at zero
    paths = plot_modes(rows, tmp_path)
    assert len(paths) == 4 and all(p.stat().st_size > 0 for p in paths)
    text = format_table({"rows": rows, "problems": 300, "inexact": ["step-judge"]})
    assert "step-judge" in text.splitlines()[-1] and " NO " in text


class FakeRunner:
    """Stands in for eval's Runner: records which edge model ran which policy at which threshold."""

    def __init__(self, slm, log):
        self.slm, self.log = slm, log

    def policy(self, policy, problems, threshold):
        self.log.append((policy.name, self.slm, threshold))
        return {"accuracy": 0.5, "correct": [1, 0], "transmission_rate": 0.1, "llm_token_share": 0.0,
                "round_trips_per_token": 0.1, "uplink_bytes_per_token": 1.0, "downlink_bytes_per_token": 1.0,
                "tokens_per_s": 1.0, "tokens_digest": self.slm}


def test_each_mode_runs_its_own_edge_model_calibrated_once(monkeypatch):
    """span-learned runs the span SLM (no calibration: its trigger is the marker), the others the demo SLM,
    whose thresholds are calibrated once per temperature and shared."""
    import eval.modes as modes

    calibrated, log = [], []
    monkeypatch.setattr(modes, "calibrate", lambda runner, n: calibrated.append(runner.slm) or
                        {DEFAULT_ESTIMATOR: {"empirical": 0.25}})
    rows = modes.run_temperature(lambda t, slm: FakeRunner(slm, log), [object(), object()], 1.0, 4,
                                 ("default", "span-learned", "step-exact"))
    assert calibrated == ["demo"]
    assert [(name, slm) for name, slm, _ in log] == [("llm-only", "demo"), ("default", "demo"),
                                                     ("span-learned", "span"), ("step-exact", "demo")]
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["span-learned"]["slm"] == "span" and by_mode["span-learned"]["threshold"] is None
    monkeypatch.setattr(modes, "routed_policy_row", lambda runner, problems, fits: log.append(("routed", fits)) or
                        {**FakeRunner("demo", []).policy(POLICIES["routed"], problems, None), "cloud_share": 0.25})
    rows = modes.run_temperature(lambda t, slm: FakeRunner(slm, log), [object(), object()], 0.0, 4,
                                 ("default", "routed", "distilled"))
    assert calibrated == ["demo", "demo", "distilled"] and log[-2] == ("routed", {DEFAULT_ESTIMATOR: {"empirical": 0.25}})
    assert log[-1][:2] == ("distilled", "distilled") and rows[1]["cloud_share"] == 0.25
    assert by_mode["step-exact"]["threshold"] == 0.25 and not by_mode["span-learned"]["exact"]


def test_tr_at_99_is_the_first_threshold_from_the_top_that_keeps_99_percent():
    """The scan stops at the largest u_th holding 99% of LLM-only (fewest sends), and says so when none holds."""
    import eval.modes as modes

    accuracy = {0.3: 0.80, 0.2: 0.90, 0.1: 0.95, 0.06: 0.97}
    tried = []

    class ScanRunner:
        def policy(self, policy, problems, threshold):
            tried.append((policy.name, threshold))
            return {"accuracy": accuracy.get(threshold, 0.97), "transmission_rate": 1 - threshold,
                    "uplink_bytes_per_token": 5.0}

    got = modes.tr_at_99(ScanRunner(), POLICIES["default"], [], llm_accuracy=0.95)
    assert got["tr_at_99_threshold"] == 0.1 and got["tr_at_99"] == 0.9
    assert tried == [("default@0.3", 0.3), ("default@0.2", 0.2), ("default@0.1", 0.1)]
    assert modes.tr_at_99(ScanRunner(), POLICIES["default"], [], llm_accuracy=1.0)["tr_at_99"] is None
    assert modes.searches_tr(POLICIES["default"]) and not modes.searches_tr(POLICIES["default-pipelined"])
    assert not modes.searches_tr(POLICIES["step-exact"]) and not modes.searches_tr(POLICIES["slm-only"])
