"""Smoke test of `make bench`'s verifier section (bench/verifier.py): a tiny run (3 recorded problems, 1 and 2
sessions, well under a second per point) has the report's structure, replays the recorded verdicts exactly,
and saves its recording for the next run. Timings are never asserted: they say nothing on a shared machine.
The run starts two verifiers: conftest marks it integration (it uses the ``slm_onnx`` fixture)."""

from __future__ import annotations

import json

from bench import report, verifier
from bench import verifier_streams as vs

ROW_FIELDS = {"n_sessions", "mode", "verifies_per_s", "tokens_per_s", "p50_ms", "p99_ms",
              "generate_tokens_per_s", "verdict_mismatches", "errors", "mean_batch_rows"}


def tiny_run(slm_onnx, cache):
    return verifier.run(sessions=(1, 2), problems=3, warmup_s=0.1, duration_s=0.4, generate_tokens=4,
                        generate_min_s=0.0, command="test", model=slm_onnx, cache=cache, progress=False)


def test_tiny_section_structure_and_exact_replay(slm_onnx, tmp_path):
    section = tiny_run(slm_onnx, tmp_path / "streams")
    rows = section["rows"]
    assert [(r["n_sessions"], r["mode"]) for r in rows] == [
        (1, "one-at-a-time"), (1, "batched"), (2, "one-at-a-time"), (2, "batched")]
    for r in rows:
        assert ROW_FIELDS <= set(r)
        assert r["verdicts_checked"] > 0 and r["verdict_mismatches"] == 0 and r["errors"] == 0
        assert r["generate_errors"] == 0 and r["generate_tokens"] % (4 * r["n_sessions"]) == 0
        if r["mode"] == "one-at-a-time":  # read from the server's metrics: every forward is one session's
            assert r["mean_batch_rows"] == 1.0 and r["generate_mean_batch_rows"] == 1.0
        else:
            assert r["mean_batch_rows"] >= 1.0
    assert section["batched_speedup_64"] is None  # 64 sessions were not run
    assert section["verdict_mismatches"] == 0
    # p50 comes from the Verifies answered inside the 0.4 s window: on a loaded machine a row may count none
    # (a timing, not a defect), and then the ratio is null rather than a made-up number
    one = [r for r in rows if r["n_sessions"] == 1]
    assert (section["p50_ratio_1"] is not None) == all(r["verifies_counted"] > 0 for r in one)
    assert section["streams"]["from_cache"] is False and section["streams"]["count"] >= 1
    for key in ("command", "load_average", "threads", "machine", "goal"):
        assert key in section
    out = tmp_path / "bench.json"
    report.merge_report(out, "verifier", section)
    assert json.loads(out.read_text())["verifier"]["rows"] == rows  # JSON-serializable as is
    assert "1 session: batched p50" in verifier.format_table(section)

    # The recording is saved where the next run reads it back (under the same key), not made again.
    from edge.hybrid import DEFAULT_THRESHOLD
    from eval.pair import LLM_DIR

    key = vs.cache_key(slm_onnx, LLM_DIR, 3, DEFAULT_THRESHOLD)
    [saved] = (tmp_path / "streams").glob("*.json")
    assert len(vs.load(saved, key)) == section["streams"]["count"] and vs.load(saved, "other") is None


def test_committed_tokens_counts_pending_accepted_and_resample():
    from proto import hybrid_pb2 as pb

    v = pb.Verify(pending_ids=[4, 5, 6])
    assert vs.committed_tokens(v, (True, 9, 1, False, 0)) == 4  # 3 pending + the accepted draft
    assert vs.committed_tokens(v, (False, 9, 0, False, 1)) == 4  # 3 pending + the resampled token
    assert vs.committed_tokens(v, (False, 0, 0, True, 1)) == 0  # stale: nothing decided
