"""Smoke test of the edge decode benchmark on a tiny random Llama: the report's structure, never its timings.

Timings depend on the machine and its load, so nothing here asserts a speed; it checks that the bench
builds, exports, measures both runtimes and writes the keys that `make bench` promises, merging into an
existing report without losing other sections.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench import decode_models, edge_decode, report

REQUIRED_KEYS = ("onnx_tok_s", "torch_tok_s", "speedup", "loop_overhead")
ROW_KEYS = ("onnx_tok_s", "torch_tok_s", "speedup", "forward_ms_per_token", "other_ms_per_token")


def _synthetic_tokenizer(folder: Path) -> Path:
    """A 32k-entry word-level tokenizer with the demo's special tokens, for when the demo pair is not built."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", "<pad>"])}
    vocab.update({f"w{i}": i for i in range(len(vocab), 32_000)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # the parity prompts split into several (unk) ids
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(folder))
    return folder


def _tokenizer_source(tmp_path: Path) -> Path:
    """The demo tokenizer when the demo pair exists (as the issue asks), else a synthetic stand-in."""
    if (decode_models.DEFAULT_SLM_DIR / "tokenizer.json").is_file():
        return decode_models.DEFAULT_SLM_DIR
    return _synthetic_tokenizer(tmp_path / "tokenizer")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def run_smoke(tokenizer_source: Path, tmp_path: Path) -> dict:
    """Build, export (fp32 + int8), measure with 1 repeat and 4 tokens, and merge into a report."""
    config = decode_models.small_llama_config(tokenizer_source, hidden=32, layers=1, heads=2, intermediate=64)
    hf_dir = decode_models.build_random_llama(config, tmp_path / "cache" / "tiny", tokenizer_source)
    model = decode_models.prepare_model("tiny", hf_dir, tmp_path / "cache")
    section = edge_decode.run(
        [model], repeats=1, n_tokens=4, threads=1, command="pytest", headline=("tiny", "fp32")
    )
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"cloud": {"kept": True}}))  # a later issue's section must survive
    report.merge_report(out, "edge", section)
    assert "speedup" in report.format_table(section)
    return json.loads(out.read_text())


def test_bench_report_structure(tmp_path):
    report = run_smoke(_tokenizer_source(tmp_path), tmp_path)
    assert report["cloud"] == {"kept": True}
    edge = report["edge"]
    for key in REQUIRED_KEYS:
        assert _positive(edge[key]), key
    assert edge["loop_overhead"] < 1
    assert edge["threads"] == 1 and edge["repeats"] == 1 and edge["command"] == "pytest"
    assert set(edge["goals"]) == {"speedup_ge_2.5", "loop_overhead_le_0.10"}
    rows = {(r["model"], r["dtype"]): r for r in edge["details"]}
    assert set(rows) == {("tiny", "fp32"), ("tiny", "int8")}
    for row in rows.values():
        for key in ROW_KEYS:
            assert _positive(row[key]) or (key == "other_ms_per_token" and row[key] >= 0), key
        assert 0 <= row["loop_overhead"] < 1
