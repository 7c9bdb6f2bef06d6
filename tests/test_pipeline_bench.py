"""The ``pipeline`` bench section, the testbed edge's ``--lookahead`` and the ``default-pipelined`` policy, without
a testbed: rows and the table from small hand-made timing files and traces (the measurement itself is
``make bench``'s, seconds to minutes on namespaces)."""

from __future__ import annotations

import math

import pytest

from bench import pipeline
from demo.__main__ import pipelined_notes
from eval.policies import POLICIES
from simulate.testbed import edge_run

ROW_KEYS = {"rtt_ms", "stop_and_wait_tok_s", "pipelined_tok_s", "lookahead", "round_trips_per_token",
            "rolled_back_per_token", "stale_uplink_bytes_per_token", "identical"}
SECTION_KEYS = {"rows", "speedup_50ms", "identical", "fraction_of_slm_50ms", "command", "load_average", "problems"}


def _timing(walls, tokens=(10, 20), ids=None, round_trips=(2, 3), rolled_back=(0, 0), stale_bytes=(0, 0),
            stale=(0, 0)) -> dict:
    """One variant of an interleaved edge_run --timing file, two problems."""
    ids = ids or [list(range(n)) for n in tokens]
    return {"walls_s": list(walls), "tokens": list(tokens), "token_ids": ids, "round_trips": list(round_trips),
            "rolled_back": list(rolled_back), "stale_verifies": list(stale), "stale_uplink_bytes": list(stale_bytes),
            "uplink_bytes": [100, 200]}


def _token(sent=False, accepted=None, wait=0.0) -> dict:
    return {"kind": "token", "sent": sent, "accepted": accepted, "slm_step_s": 0.001, "wait_s": wait, "encode_s": 0.0}


def _rows():
    stop = _timing((0.2, 0.4))  # 30 tokens in 0.6 s: 50 tok/s
    la4 = _timing((0.15, 0.25), round_trips=(3, 3), rolled_back=(2, 1), stale=(1, 0), stale_bytes=(40, 0))
    la16 = _timing((0.1, 0.2), round_trips=(4, 5), rolled_back=(3, 3), stale=(2, 2), stale_bytes=(60, 60))
    la64 = _timing((0.1, 0.2), ids=[list(range(10)), [*range(19), 7]])  # problem 2's last token differs
    slm = _timing((0.05, 0.1))  # 30 tokens in 0.15 s: 200 tok/s, 5 ms a token
    gens = [[_token(), _token(True, True, wait=0.02)], [_token(True, False, wait=0.01), _token()]]
    row50 = pipeline.build_row(50, {"la0": stop, "la4": la4, "la16": la16, "slm-only": slm}, gens)
    row20 = pipeline.build_row(20, {"la0": stop, "la4": la4, "la64": la64})
    return row20, row50


def test_rows_pick_the_fastest_lookahead_and_count_per_token():
    row20, row50 = _rows()
    assert ROW_KEYS <= set(row50)
    assert row50["stop_and_wait_tok_s"] == pytest.approx(50.0)
    assert row50["lookahead"] == 16 and row50["pipelined_tok_s"] == pytest.approx(100.0)
    assert row50["speedup"] == pytest.approx(2.0) and row50["median_problem_speedup"] == pytest.approx(2.0)
    assert row50["round_trips_per_token"] == pytest.approx(9 / 30)
    assert row50["rolled_back_per_token"] == pytest.approx(6 / 30)
    assert row50["stale_uplink_bytes_per_token"] == pytest.approx(120 / 30)
    assert row50["identical"] is True and set(row50["by_lookahead"]) == {"4", "16"}
    assert row50["slm_only_tok_s"] == pytest.approx(200.0) and row50["fraction_of_slm"] == pytest.approx(0.5)
    # a perfect pipeline at 5 ms a token: problem 1 waits for its last verdict (10 + 20 ms), problem 2 for its
    # rejection (5 + 10 + 5 ms): 4 tokens in 50 ms
    assert row50["ideal"]["tok_s"] == pytest.approx(4 / 0.050) and row50["ideal"]["rejected"] == 1
    assert row50["ideal"]["speedup"] == pytest.approx(80 / 50)
    # one lookahead gave a different token: the row is not identical, even where it was the fastest
    assert row20["lookahead"] == 64 and row20["by_lookahead"]["64"]["identical"] is False
    assert row20["by_lookahead"]["4"]["identical"] is True and row20["identical"] is False
    assert row20["ideal"] is None and row20["slm_only_tok_s"] is None


def test_section_keys_and_table():
    row20, row50 = _rows()
    section = pipeline.summarize([row20, row50], 2, "python -m bench", {"before": [1, 1, 1]})
    assert SECTION_KEYS <= set(section)
    assert section["speedup_50ms"] == pytest.approx(2.0)
    assert section["fraction_of_slm_50ms"] == pytest.approx(0.5)
    assert section["identical"] is False  # the 20 ms row was not
    table = pipeline.format_table(section)
    assert "50ms" in table and "20ms" in table and "NO" in table and "50.0% of SLM-only" in table
    assert "1.60x" in table  # the ideal at 50 ms
    section_ok = pipeline.summarize([row50], 2, "c", {})
    assert section_ok["identical"] is True and "meets the goal" in pipeline.format_table(section_ok)


def test_skipped_section_says_why():
    section = pipeline.skipped("network namespaces need root", 50, "python -m bench")
    assert SECTION_KEYS <= set(section) and section["rows"] == [] and section["speedup_50ms"] is None
    assert "skipped (network namespaces need root)" in pipeline.format_table(section)


def test_run_is_skipped_where_namespaces_cannot_be_made(monkeypatch):
    import simulate.testbed.netns as netns

    monkeypatch.setattr(netns, "unavailable_reason", lambda: "network namespaces need root (CAP_NET_ADMIN)")
    section = pipeline.run(problems=3, command="python -m bench")
    assert section["skipped"].startswith("network namespaces need root") and section["rows"] == []
    assert section["identical"] is None and section["problems"] == 3 and section["command"] == "python -m bench"


def test_ideal_pipeline_hides_accepted_round_trips_but_not_rejections_or_the_last_verdict():
    open_line = {"kind": "open"}
    # 10 tokens of 1 ms; an accepted Verify at token 2 (5 ms: hidden), a rejected one at token 5 (4 ms: paid), an
    # accepted one at token 9 (3 ms: the last verdict, 1 ms of drafting after it, so 2 ms paid)
    tokens = [_token() for _ in range(10)]
    tokens[1] = _token(True, True, wait=0.005)
    tokens[4] = _token(True, False, wait=0.004)
    tokens[8] = _token(True, True, wait=0.003)
    gens = pipeline.generations([open_line, *tokens, {"kind": "close"}, open_line, _token(), {"kind": "task"}])
    assert [len(g) for g in gens] == [10, 1]
    ideal = pipeline.ideal_pipeline(gens, 0.001)
    assert ideal["tok_s"] == pytest.approx(11 / (0.010 + 0.004 + 0.002 + 0.001))
    assert ideal["verifies"] == 3 and ideal["rejected"] == 1 and ideal["acceptance_rate"] == pytest.approx(2 / 3)


def _args(*extra: str):
    return edge_run.parse_args(["--model", "m", "--trace", "t", "--timing", "j", *extra])


def test_edge_run_takes_lookahead_into_the_hybrid_config():
    _, _, config = edge_run.hybrid_config(_args("--verifier", "h:1", "--policy", "default", "--lookahead", "16",
                                                "--threads", "1"))
    assert config.lookahead == 16
    _, threshold, config = edge_run.hybrid_config(_args("--verifier", "h:1", "--policy", "default"))
    assert config.lookahead == 0 and threshold == pytest.approx(0.06)
    assert edge_run.hybrid_config(_args("--verifier", "h:1", "--policy", "default-pipelined"))[2].lookahead == 16
    _, threshold, config = edge_run.hybrid_config(_args("--policy", "slm-only"))  # no verifier needed
    assert math.isinf(threshold) and threshold > 0


@pytest.mark.parametrize("extra", [("--verifier", "h:1", "--lookahead", "-1"), ("--verifier", "h:1", "--lookahead", "x"),
                                   ("--policy", "default")])  # a hybrid policy without --verifier
def test_edge_run_refuses_bad_arguments(extra, capsys):
    with pytest.raises(SystemExit) as exc:
        _args(*extra)
    assert exc.value.code == 2


def test_default_pipelined_is_default_with_a_lookahead():
    from core.sampling import SamplingSettings

    settings = SamplingSettings(temperature=1.0)
    base, piped = POLICIES["default"], POLICIES["default-pipelined"]
    assert piped.lookahead > 0 and base.lookahead == 0 and piped.exact
    a, b = base.config(settings, 0.06), piped.config(settings, 0.06)
    assert b.lookahead == piped.lookahead and a.lookahead == 0
    assert (a.threshold, a.estimator, a.codec, a.settings) == (b.threshold, b.estimator, b.codec, b.settings)
    assert piped.threshold == base.threshold  # the same calibration rule, so the same u_th in the demo


def test_demo_notes_compare_a_pipelined_row_with_its_base():
    rows = [{"config": "default", "lookahead": 0, "tokens_per_s": 100.0, "tokens_digest": "ab"},
            {"config": "default-pipelined", "lookahead": 16, "tokens_per_s": 110.0, "tokens_digest": "ab"},
            {"config": "llm-only", "lookahead": 0, "tokens_per_s": 50.0}]
    (note,) = pipelined_notes(rows)
    assert "1.10x default's" in note and "same tokens: yes" in note
    rows[1]["tokens_digest"] = "cd"
    assert "same tokens: NO" in pipelined_notes(rows)[0]


def test_edge_run_lookahead_list_is_parsed():
    assert _args("--verifier", "h:1", "--lookahead", "0,4,64").lookahead == [0, 4, 64]
    with pytest.raises(SystemExit):
        _args("--verifier", "h:1", "--lookahead", "4,4")


def test_edge_run_interleaves_lookaheads_with_identical_tokens(tmp_path, slm_onnx):
    """The real edge_run on loopback (no namespaces): lookahead 0 and 16 and SLM-only on the same problems."""
    import json

    from core.process import VerifierProcess
    from tests.conftest import DEMO_PAIR

    with VerifierProcess(str(DEMO_PAIR / "llm")) as verifier:
        assert edge_run.main(["--model", str(slm_onnx), "--verifier", verifier.address, "--policy", "default",
                              "--problems", "3", "--lookahead", "0,16", "--with-slm-only", "--threads", "1",
                              "--trace", str(tmp_path / "t.jsonl"), "--timing", str(tmp_path / "t.json")]) == 0
    variants = json.loads((tmp_path / "t.json").read_text())["variants"]
    assert set(variants) == {"la0", "la16", "slm-only"}
    assert variants["la16"]["lookahead"] == 16 and variants["la0"]["lookahead"] == 0
    assert variants["la16"]["token_ids"] == variants["la0"]["token_ids"] and len(variants["la0"]["walls_s"]) == 3
    assert sum(variants["slm-only"]["round_trips"]) == 0 and sum(variants["la0"]["round_trips"]) > 0
    for label, v in variants.items():
        assert (tmp_path / f"t.{label}.jsonl").is_file() and v["trace"].endswith(f"t.{label}.jsonl")
    row = pipeline.build_row(0, {k: v for k, v in variants.items()},
                             pipeline.generations((tmp_path / "t.la0.jsonl").read_text().splitlines()))
    assert row["identical"] and row["lookahead"] == 16 and row["ideal"]["verifies"] > 0
