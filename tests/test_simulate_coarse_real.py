"""Coarse traces recorded through the real span/step loop and a real verifier (2 problems per mode), replayed by
the simulator; and the modes table's ``sim_tokens_per_s`` filled from such traces (``simulate/modes.py``, the
``python -m simulate modes`` command)."""

from __future__ import annotations

import json

import pytest

from core.process import VerifierProcess
from core.sampling import SamplingSettings
from edge.client import connect
from edge.coarse import MODES
from edge.model import EdgeModel
from eval.policies import POLICIES, on_slm
from eval.taskeval import Runner, summarize
from models.task import held_out_problems
from simulate.config import SimConfig
from simulate.engine import Simulation
from simulate.modes import fill_rows, record_rows, replay, trace_path
from simulate.trace import load_trace
from tests.conftest import DEMO_PAIR

THRESHOLD = 0.05  # low enough that every mode sends something on two problems
COARSE = [name for name, p in on_slm("demo").items() if p.route == "coarse" and p.mode in MODES]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, slm_onnx):
    """Every coarse policy of the table on 2 problems at T = 1: (trace path, the runs) per policy."""
    out = tmp_path_factory.mktemp("coarse")
    model = EdgeModel(slm_onnx, threads=1)
    with VerifierProcess(str(DEMO_PAIR / "llm"), extra_args=("--threads", "1")) as verifier:
        channel = connect(verifier.address)
        runner = Runner(model, channel, SamplingSettings(temperature=1.0), 0)
        traces = {}
        for name in COARSE:
            path = out / f"{name}.jsonl"
            with path.open("w") as f:
                traces[name] = (path, runner.coarse(POLICIES[name], held_out_problems(2), THRESHOLD, trace=f,
                                                    progress=False))
        rows = [{"mode": "step-exact", "temperature": 0.0, "threshold": THRESHOLD},
                {"mode": "span-uncertainty", "temperature": 1.0, "threshold": THRESHOLD},
                {"mode": "llm-only", "temperature": 1.0, "threshold": None},
                {"mode": "slm-only", "temperature": 1.0, "threshold": None}]
        record_rows(rows, lambda t, slm="demo": Runner(model, channel, SamplingSettings(temperature=t), 0),
                    held_out_problems(2),
                    out / "modes")
        channel.close()
    return traces, rows, out / "modes"


def test_a_recorded_coarse_trace_is_the_run(recorded):
    """The trace holds what the loop did: its tokens, positions sent, round trips, bytes and wall time."""
    traces, _, _ = recorded
    assert set(traces) == {"span-uncertainty", "step-judge", "step-judge-mean", "step-judge-gated",
                           "step-exact"}
    for name, (path, runs) in traces.items():
        trace = load_trace(path)
        row = summarize(name, runs)
        assert trace.mode == "coarse" and trace.accuracy == row["accuracy"], name
        assert [g.tokens for g in trace.generations] == [len(r.result.token_ids) for r in runs], name
        assert trace.transmission_rate == pytest.approx(row["transmission_rate"]), name
        assert [g.coarse.rounds for g in trace.generations] == [r.result.round_trips for r in runs], name
        assert sum(g.coarse.rounds for g in trace.generations) >= 1, name
        assert [int(g.coarse.llm.sum()) for g in trace.generations] == [r.result.llm_tokens for r in runs], name
        assert trace.grpc_up_bytes == sum(r.result.uplink_bytes for r in runs), name
        assert [g.seconds for g in trace.generations] == [r.result.seconds for r in runs], name


def test_recorded_coarse_traces_replay(recorded):
    """Each mode replays without error: at its recorded round trips in the generations' wall time (untimed work
    replayed once per generation), and over a 10 Mbit/s, 50 ms link slower than over a free one."""
    traces, _, _ = recorded
    for name, (path, _) in traces.items():
        trace = load_trace(path)
        config = SimConfig(traces={"p": str(path)}, policy="p", tokens_per_device=trace.tokens)
        own = Simulation(config, trace, recorded=True).run().metrics
        assert own["makespan_s"] == pytest.approx(sum(g.seconds for g in trace.generations), rel=0.02), name
        far, near = replay(path), replay(path, uplink_bps=1e10, rtt_s=0.0, downlink_bps=1e10)
        assert far["tokens"] == near["tokens"] == trace.tokens, name
        assert 0 < far["tokens_per_s"] < near["tokens_per_s"], name
        assert far["transmission_rate"] == pytest.approx(trace.transmission_rate), name
        assert far["service_model"]["samples"] >= 1, name
        cut = Simulation(SimConfig(traces={"p": str(path)}, policy="p", devices=3, tokens_per_device=25), trace).run()
        assert cut.metrics["tokens"] == 75 and len(cut.latencies) == 75, name


def test_modes_rows_get_sim_tokens_per_s(recorded, tmp_path):
    """Rows of every route (coarse, stream, local) are recorded through eval's Runner and filled, in the file and
    through ``python -m simulate modes`` (traces present: nothing recorded again)."""
    from simulate.cli import main

    _, rows, folder = recorded
    assert all(trace_path(folder, r).is_file() for r in rows)
    section = fill_rows({"rows": [dict(r, sim_tokens_per_s=None) for r in rows]}, folder)
    assert all(r["sim_tokens_per_s"] > 0 and r["sim_trace_tokens_per_s"] > 0 for r in section["rows"])
    assert section["sim"]["rtt_s"] == 0.05 and section["sim"]["uplink_bps"] == 10e6
    modes = tmp_path / "modes.json"
    modes.write_text(json.dumps({"modes": {"rows": [dict(r, sim_tokens_per_s=None) for r in rows]}}))
    assert main(["modes", "--modes", str(modes), "--traces", str(folder)]) == 0
    filled = json.loads(modes.read_text())["modes"]["rows"]
    assert [r["sim_tokens_per_s"] for r in filled] == pytest.approx([r["sim_tokens_per_s"] for r in section["rows"]])
