"""The onnxruntime-genai backend and its export (``python -m models export --builder genai``).

A tiny random-weight Llama (2 layers, hidden 64) over a word-level tokenizer of N = 1,000 ids, with 1,024
logit rows whose padding rows (ids 1,000 and up) are scaled so that an unsliced model would pick a padding id:
exported by optimum (fp32) and by the genai builder (fp32 and int4, in .venv-genai-build: `make
genai-builder`). Checked: the manifest is the optimum path's plus ``runtime: "genai"``; parity; SLM-only
greedy tokens identical to the optimum export's at fp32; logits sliced to N; the rewind pattern (truncate,
then a different continuation) against a fresh prefill; the context limit; verify-all through a real
verifier on the genai backend; the edge CLI's --backend. Models and exports are cached under the pytest
cache directory (~20 s warm, ~1 min cold on 2 cores).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.process import VerifierProcess
from core.sampling import SamplingSettings
from edge.client import VerifierSession, connect, generate_remote
from edge.generate import generate_local
from edge.genai_runtime import GenaiCausalLM
from edge.hybrid import HybridConfig, generate_hybrid
from edge.manifest import ModelFolderError, load_manifest
from edge.model import EdgeModel
from edge.runtime import ContextLimitError
from proto.distribution import CodecSpec
from tests.conftest import run_module

N = 1_000  # the tokenizer's id space: <unk>, w1..w997, <s>, </s>
ROWS = 1_024  # the model's logit rows: 24 padding rows past N
BOS, EOS = N - 2, N - 1
CONTEXT = 256  # max_position_embeddings
SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "max_position_embeddings": CONTEXT}
PADDING_STD = 1.0  # padding rows' weights: their logits dwarf the real rows' (weights ~0.02)
BUILD_STAMP = {"version": 2, "n": N, "rows": ROWS, "shape": SHAPE, "padding_std": PADDING_STD,
               "exports": ["optimum-fp32", "genai-fp32", "genai-int4"]}
PROMPT = "w5 w17 w99 w123 w7 w400"


# -- building and caching ----------------------------------------------------------------------------------


def build_tokenizer(out: Path) -> None:
    """Word-level, N ids, BOS/EOS as added tokens; saved by transformers so both 4.x and 5.x read it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, BOS)}}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(out))


def build_llama(out: Path, tokenizer_dir: Path, seed: int) -> None:
    """A random LlamaForCausalLM (tied embeddings) with ROWS logit rows; rows past N get large weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=ROWS, tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, **SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # [ROWS, hidden], tied to the input embedding
        head[N:] = torch.randn(ROWS - N, head.shape[1]) * PADDING_STD
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))


def _cache_root(pytestconfig, tmp_path_factory) -> Path:
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    return cache.mkdir("genai_tiny") if cache is not None else tmp_path_factory.mktemp("genai_tiny")


@pytest.fixture(scope="module")
def tiny(pytestconfig, tmp_path_factory) -> dict[str, Path]:
    """The SLM, its three exports and an LLM (another seed) for the verifier; rebuilt when the stamp changes."""
    from models.export import export_model
    from models.export_genai import export_genai

    root = _cache_root(pytestconfig, tmp_path_factory)
    paths = {name: root / name for name in ("tokenizer", "slm", "llm", "optimum-fp32", "genai-fp32", "genai-int4")}
    stamp = root / "stamp.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == BUILD_STAMP):
        shutil.rmtree(root)
        root.mkdir()
        build_tokenizer(paths["tokenizer"])
        build_llama(paths["slm"], paths["tokenizer"], seed=0)
        build_llama(paths["llm"], paths["tokenizer"], seed=1)
        stamp.write_text(json.dumps(BUILD_STAMP))
    if not (paths["optimum-fp32"] / "manifest.json").is_file():
        export_model(str(paths["slm"]), paths["optimum-fp32"])
    for precision in ("fp32", "int4"):
        if not (paths[f"genai-{precision}"] / "manifest.json").is_file():
            export_genai(str(paths["slm"]), paths[f"genai-{precision}"], precision)
    return paths


@pytest.fixture(scope="module")
def genai_edge(tiny) -> EdgeModel:
    return EdgeModel(tiny["genai-fp32"], providers="cpu", threads=2)


@pytest.fixture(scope="module")
def ort_edge(tiny) -> EdgeModel:
    return EdgeModel(tiny["optimum-fp32"], providers="cpu", threads=2)


@pytest.fixture(scope="module")
def verifier(tiny):
    with VerifierProcess(str(tiny["llm"])) as proc:
        yield proc


# -- export and manifest -----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_manifest_is_the_optimum_paths_plus_runtime(tiny, precision):
    from models.export_genai import TOLERANCE

    genai, optimum = load_manifest(tiny[f"genai-{precision}"]), load_manifest(tiny["optimum-fp32"])
    assert (genai.runtime, optimum.runtime, genai.dtype) == ("genai", "ort", precision)
    assert (genai.id_space, genai.logit_width, genai.max_positions) == (N, ROWS, CONTEXT)
    same = ("source", "model_file", "model_type", "logit_width", "id_space", "tokenizer_hash", "bos_token_id",
            "eos_token_ids", "max_positions", "format")
    assert {f: getattr(genai, f) for f in same} == {f: getattr(optimum, f) for f in same}
    assert genai.fingerprint == optimum.fingerprint  # pairs with the same verifier
    assert genai.external_data == ["model.onnx.data"] and "input_ids" in genai.inputs and "logits" in genai.outputs
    folder = tiny[f"genai-{precision}"]
    assert all((folder / name).is_file() for name in genai.required_files)
    assert "genai_config.json" in genai.required_files
    parity = genai.parity
    assert parity["tolerance"] == TOLERANCE[precision] and parity["max_abs_diff"] <= parity["tolerance"]
    assert parity["runtime"].startswith("onnxruntime-genai") and 0 <= parity["top1_agreement"] <= 1
    if precision == "fp32":
        assert parity["max_abs_diff"] < 1e-4 and parity["top1_agreement"] == 1.0


def test_a_manifest_without_runtime_loads_as_ort(tiny, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(tiny["optimum-fp32"], folder)
    data = json.loads((folder / "manifest.json").read_text())
    del data["runtime"]
    (folder / "manifest.json").write_text(json.dumps(data))
    assert load_manifest(folder).runtime == "ort"
    assert EdgeModel(folder, providers="cpu").backend == "ort"


def test_a_genai_folder_without_its_config_is_refused_in_one_line(tiny, tmp_path):
    folder = tmp_path / "copied"
    shutil.copytree(tiny["genai-fp32"], folder)
    (folder / "genai_config.json").unlink()
    with pytest.raises(ModelFolderError, match="lacks genai_config.json"):
        load_manifest(folder)


def test_export_cli_refuses_int4_on_optimum_and_a_missing_builder(tiny, tmp_path, monkeypatch):
    from models.export import ExportError
    from models.export_genai import export_genai

    proc = run_module("models", "export", "--model", str(tiny["slm"]), "--out", str(tmp_path / "x"),
                      "--precision", "int4")
    assert proc.returncode == 2 and "int4 needs --builder genai" in proc.stderr
    monkeypatch.setenv("GENAI_BUILDER_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(ExportError, match="make genai-builder"):
        export_genai(str(tiny["slm"]), tmp_path / "y", "fp32")


# -- the runtime -------------------------------------------------------------------------------------------


def test_backend_follows_the_manifest_and_reports_its_provider(tiny, genai_edge, ort_edge):
    assert (genai_edge.backend, ort_edge.backend) == ("genai", "ort")
    assert genai_edge.runtime.providers == ["CPUExecutionProvider"]
    assert (genai_edge.runtime.id_space, genai_edge.runtime.logit_width) == (N, ROWS)
    with pytest.raises(ModelFolderError, match="--backend genai"):
        EdgeModel(tiny["genai-fp32"], providers="cpu", backend="ort")
    with pytest.raises(ModelFolderError, match="not an onnxruntime-genai export"):
        EdgeModel(tiny["optimum-fp32"], providers="cpu", backend="genai")


def test_logits_are_sliced_to_the_id_space(tiny, genai_edge):
    prompt = genai_edge.encode(PROMPT)
    logits = genai_edge.runtime.prefill(prompt)
    unsliced = GenaiCausalLM(tiny["genai-fp32"], providers="cpu").prefill(prompt)
    assert logits.shape == (N,) and logits.dtype == np.float32 and unsliced.shape == (ROWS,)
    assert unsliced.argmax() >= N  # unsliced, a padding row wins: the slice has teeth
    np.testing.assert_array_equal(logits, unsliced[:N])


def test_slm_only_greedy_tokens_equal_the_optimum_exports(genai_edge, ort_edge):
    prompt = ort_edge.encode(PROMPT)
    assert genai_edge.encode(PROMPT) == prompt  # the same tokenizer file, written by the same transformers
    greedy = SamplingSettings(temperature=0)
    ours = generate_local(ort_edge, prompt, 48, greedy, stop_at_eos=False)
    theirs = generate_local(genai_edge, prompt, 48, greedy, stop_at_eos=False)
    assert theirs.token_ids == ours.token_ids and max(theirs.token_ids) < N
    for ids in (prompt, [EOS], [BOS, EOS]):  # a one-token prompt too: a sequence's first append either way
        np.testing.assert_allclose(genai_edge.runtime.prefill(ids), ort_edge.runtime.prefill(ids), atol=1e-4)


def test_a_prompt_ending_in_eos_and_eos_fed_back(genai_edge, ort_edge):
    """EOS is genai's pad id: after a first append ending in it, get_logits would be another position's."""
    prompt = ort_edge.encode(PROMPT) + [EOS]
    for edge in (genai_edge, ort_edge):
        edge.runtime.reset()
    rows = [edge.runtime.forward(prompt) for edge in (genai_edge, ort_edge)]
    np.testing.assert_allclose(rows[0], rows[1], atol=1e-4)
    for ids in (prompt, [EOS], [BOS, EOS]):  # a one-token prompt too: a sequence's first append either way
        np.testing.assert_allclose(genai_edge.runtime.prefill(ids), ort_edge.runtime.prefill(ids), atol=1e-4)
    for token in (EOS, 5, EOS):
        np.testing.assert_allclose(genai_edge.runtime.decode(token), ort_edge.runtime.decode(token), atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_truncate_then_another_continuation_equals_a_fresh_prefill(tiny, precision):
    """The rewind pattern the runtime uses (rewind_to, then append_tokens, then read) against a fresh
    generator: reading logits straight after a rewind would return the pre-rewind position's."""
    runtime = GenaiCausalLM(tiny[f"genai-{precision}"], providers="cpu", id_space=N)
    head, old, new = [5, 17, 99, 123], [400, 401, 402], [7, 8, 9]
    fresh = GenaiCausalLM(tiny[f"genai-{precision}"], providers="cpu", id_space=N)
    fresh.reset()
    reference = fresh.forward(head + new)  # [len(head + new), N] from one prefill
    runtime.prefill(head + old)
    runtime.truncate(len(head))
    assert runtime.cache.length == len(head)
    np.testing.assert_allclose(runtime.forward(new), reference[len(head):], atol=1e-5)
    runtime.truncate(len(head))  # one token at a time after a rewind: the decode path
    for i, token in enumerate(new):
        np.testing.assert_allclose(runtime.decode(token), reference[len(head) + i], atol=1e-5)
    runtime.truncate(len(head) + 1)  # a rewind by fewer positions than were appended last
    np.testing.assert_allclose(runtime.forward(new[1:]), reference[len(head) + 1:], atol=1e-5)
    np.testing.assert_allclose(runtime.prefill(head + new), reference[-1], atol=1e-5)  # reset reuses it
    with pytest.raises(ValueError, match="cannot truncate"):
        runtime.truncate(runtime.cache.length + 1)


def test_the_context_limit_is_the_generators_max_length(genai_edge):
    runtime = genai_edge.runtime
    assert runtime.max_positions == CONTEXT
    runtime.prefill(list(range(1, CONTEXT)))
    runtime.decode(5)  # position CONTEXT - 1: the last one
    with pytest.raises(ContextLimitError, match="context limit of 256"):
        runtime.decode(6)
    runtime.prefill([5, 6])  # a reset after the limit works
    assert runtime.cache.length == 2


# -- end to end --------------------------------------------------------------------------------------------


def _opener(channel, model, sessions=None):
    def open_session(prompt_ids, settings, codec):
        session = VerifierSession(channel, model.manifest.fingerprint, prompt_ids, settings, codec, seed=11)
        if sessions is not None:
            sessions.append(session)
        return session
    return open_session


def test_verify_all_through_a_real_verifier_on_the_genai_backend(tiny, verifier, genai_edge):
    channel = connect(verifier.address)
    try:
        prompt = genai_edge.encode(PROMPT)
        greedy = SamplingSettings(temperature=0)
        config = HybridConfig(threshold=float("-inf"), codec=CodecSpec("topk"), settings=greedy, max_new_tokens=24)
        hybrid = generate_hybrid(genai_edge, prompt, config, seed=0, open_session=_opener(channel, genai_edge))
        remote, _, _ = generate_remote(channel, genai_edge.manifest.fingerprint, prompt, greedy, 24, [EOS])
        assert hybrid.token_ids == remote and hybrid.transmission_rate == 1.0  # greedy verify-all = LLM greedy
        int4 = EdgeModel(tiny["genai-int4"], providers="cpu", threads=2)
        sampled = HybridConfig(threshold=float("-inf"), codec=CodecSpec("adaptive"),
                               settings=SamplingSettings(temperature=1.0), max_new_tokens=24)
        sessions = []
        result = generate_hybrid(int4, prompt, sampled, seed=3, open_session=_opener(channel, int4, sessions))
        assert sessions[0].opened.fingerprint.id_space == N and result.transmission_rate == 1.0
        assert max(result.token_ids + [r.draft for r in result.records]) < N
    finally:
        channel.close()


def test_edge_cli_backend_flag(tiny):
    proc = run_module("edge", "generate", "--model", str(tiny["genai-int4"]), "--prompt", PROMPT, "--temperature",
                      "0", "--max-new-tokens", "8", "--threads", "2", "--backend", "auto", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["backend"] == "genai" and summary["providers"] == ["CPUExecutionProvider"]
    assert 0 < summary["tokens"] <= 8
    proc = run_module("edge", "generate", "--model", str(tiny["genai-int4"]), "--prompt", PROMPT, "--backend", "ort")
    assert proc.returncode == 2 and "--backend genai" in proc.stderr and "Traceback" not in proc.stderr


def test_the_edge_real_bench_measures_a_row(tiny):
    """bench/edge_real.py on the tiny exports: the row's keys and the section summary, never the timings."""
    from bench import edge_real

    exports = {"ort": tiny["optimum-fp32"], "genai": tiny["genai-fp32"]}
    row = edge_real.measure_precision("tiny", "fp32", exports, PROMPT, repeats=1, n_tokens=8, threads=1)
    assert row["backend"] in ("ort", "genai") and row["ours_tok_s"] == row[f"{row['backend']}_backend_tok_s"]
    assert all(row[k] > 0 for k in ("ours_tok_s", "genai_tok_s", "ratio", "ratio_runs", "ratio_steps"))
    summary = edge_real.summarize([row])
    assert summary["min_ratio"] == row["ratio"] and summary["int4_speedup"] is None
    assert "tiny" in edge_real.format_table({**summary, "rows": [row], "threads": 1, "repeats": 1,
                                             "machine": {"load_avg_1min": 0.0}, "load_avg_after": [0.0]})
