"""LLM-to-SLM prompt conditioning (models/conditioned.py) and the edge plumbing that feeds it.

- The projector adds exactly nothing for a zero row (the mask), whatever its weights; the conditioned SLM with
  zero rows is the plain SLM, logit for logit.
- ``manifest.json``'s ``conditioning`` is validated (ints, dim >= 1, an input the graph declares, ort only).
- The runtime: an unconditioned graph is fed what it always was and refuses conditioning; a conditioned graph
  is fed zeros wherever the caller gives none (decode, a plain prefill), which equals explicit zero rows.
- Export on a tiny random conditioned Llama: optimum's graph gains ``llm_hidden``, its logits match PyTorch with
  non-zero conditioning at prefill and on a KV-cached step, the manifest and ``EdgeModel.conditioning`` say so.
- The command's arguments are validated in one line.

The export tests share one module-scoped export and are marked integration (``make test-fast`` skips them).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge.manifest import ConditioningSpec, ModelFolderError, load_manifest
from tests.conftest import DEMO_PAIR

torch = pytest.importorskip("torch")
DIM = 8  # the tiny "LLM" width


def _tiny_conditioned(seed: int = 0):
    """A tiny random Llama (the demo vocabulary) with a projector whose last layer is NOT zero (so a missing mask
    would show)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.conditioned import conditioned_from, make_projector

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32_000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    slm = LlamaForCausalLM(config).eval()
    projector = make_projector(DIM, 12, 16, seed)
    torch.nn.init.normal_(projector.net[2].weight)
    torch.nn.init.normal_(projector.net[2].bias)
    return conditioned_from(slm, DIM, 12, projector), slm


def test_the_projector_adds_nothing_for_a_zero_row():
    model, _ = _tiny_conditioned()
    rows = torch.randn(2, 5, DIM)
    rows[0, 1] = 0.0
    rows[1, 4] = 0.0
    out = model.projector(rows)  # [2, 5, 16]
    assert torch.equal(out[0, 1], torch.zeros(16)) and torch.equal(out[1, 4], torch.zeros(16))
    assert bool((out[0, 0] != 0).any())  # a real row does add something


def test_zero_rows_give_the_plain_slm():
    model, slm = _tiny_conditioned()
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.inference_mode():
        plain = slm(ids).logits
        zeros = model(ids, llm_hidden=torch.zeros(1, 4, DIM)).logits
        rows = model(ids, llm_hidden=torch.randn(1, 4, DIM)).logits
    assert torch.equal(plain, zeros)
    assert not torch.allclose(plain, rows)


def test_a_fresh_projector_starts_as_the_slm():
    from models.conditioned import make_projector

    assert torch.equal(make_projector(DIM, 12, 16)(torch.randn(1, 3, DIM)), torch.zeros(1, 3, 16))


def test_rows_mark_the_prompt_and_the_control_reads_zeros():
    from models.conditioned import conditioning_batch, prompt_length, task_rows
    from models.finetune import load_slm
    from models.task import sample_problems

    class FakeLLM:  # hidden_states[k] = k + 1 everywhere
        def __call__(self, input_ids, attention_mask, output_hidden_states):
            return type("Out", (), {"hidden_states": [torch.full((*input_ids.shape, DIM), k + 1.0) for k in range(3)]})

    _, tokenizer = load_slm(DEMO_PAIR / "slm")
    rows = task_rows(tokenizer, sample_problems(3, "train", seed=1))
    n_prompt = [prompt_length(labels) for _, labels in rows]
    assert n_prompt == [len(tokenizer(p.prompt)["input_ids"]) for p in sample_problems(3, "train", seed=1)]
    width = max(len(ids) for ids, _ in rows)
    cond = conditioning_batch(FakeLLM(), rows, 2, 0, width, DIM)  # [3, width, DIM]
    for r, n in enumerate(n_prompt):
        assert bool((cond[r, :n] == 3.0).all()) and bool((cond[r, n:] == 0).all())
    assert bool((conditioning_batch(FakeLLM(), rows, None, 0, width, DIM) == 0).all())


# -- the runtime on an unconditioned graph (no session needed) ---------------------------------------------
def _unconditioned_runtime():
    from edge.runtime import KVCache, OnnxCausalLM

    runtime = OnnxCausalLM.__new__(OnnxCausalLM)
    runtime._input_names = {"input_ids", "attention_mask", "position_ids"}
    runtime.conditioning_input, runtime.conditioning_dim = "llm_hidden", None
    runtime.cache, runtime.max_positions = KVCache({}, 3), None
    return runtime


def test_an_unconditioned_graph_is_fed_as_before_and_refuses_conditioning():
    runtime = _unconditioned_runtime()
    feeds = runtime._feeds(np.array([[5, 6]], dtype=np.int64))
    assert set(feeds) == {"input_ids", "attention_mask", "position_ids"}
    assert feeds["position_ids"].tolist() == [[3, 4]]
    with pytest.raises(ValueError, match="takes no conditioning"):
        runtime.forward([5, 6], conditioning=np.ones((2, DIM), np.float32))


# -- manifest validation ----------------------------------------------------------------------------------
def _manifest_folder(tmp_path, **changes):
    from dataclasses import asdict

    from edge.manifest import Manifest

    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    shutil.copy(DEMO_PAIR / "slm" / "tokenizer.json", folder / "tokenizer.json")
    (folder / "model.onnx").write_bytes(b"")
    manifest = Manifest(source="x", model_file="model.onnx", model_type="llama", logit_width=32_000, id_space=32_000,
                        tokenizer_hash="h", bos_token_id=1, eos_token_ids=[2], dtype="fp32", opset=14,
                        inputs=["input_ids", "attention_mask", "llm_hidden"], outputs=["logits"])
    (folder / "manifest.json").write_text(json.dumps({**asdict(manifest), **changes}))
    return folder


def test_the_conditioning_round_trips_through_the_manifest(tmp_path):
    spec = {"layer": 2, "dim": 128, "input": "llm_hidden"}
    assert load_manifest(_manifest_folder(tmp_path, conditioning=spec)).conditioning_spec == ConditioningSpec(**spec)
    assert load_manifest(_manifest_folder(tmp_path)).conditioning_spec is None  # absent: unconditioned


@pytest.mark.parametrize("bad", [
    {"layer": -1, "dim": 128, "input": "llm_hidden"}, {"layer": 1, "dim": 0, "input": "llm_hidden"},
    {"layer": 1, "dim": "128", "input": "llm_hidden"}, {"layer": True, "dim": 128, "input": "llm_hidden"},
    {"layer": 1, "dim": 128}, {"layer": 1, "dim": 128, "input": "nope"}, [1, 128, "llm_hidden"],
])
def test_a_bad_conditioning_is_refused(tmp_path, bad):
    with pytest.raises(ModelFolderError, match="conditioning"):
        load_manifest(_manifest_folder(tmp_path, conditioning=bad))


def test_a_conditioned_genai_folder_is_refused(tmp_path):
    folder = _manifest_folder(tmp_path, runtime="genai", conditioning={"layer": 1, "dim": 8, "input": "llm_hidden"})
    (folder / "genai_config.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="ort runtime only"):
        load_manifest(folder)


# -- export, parity, the conditioned runtime ---------------------------------------------------------------
@pytest.fixture(scope="module")
def conditioned_export(tmp_path_factory):
    """A tiny random conditioned SLM, saved as the command saves one and exported by models/export.py."""
    from transformers import AutoTokenizer

    from models.conditioned import save_conditioned
    from models.export import export_model

    root = tmp_path_factory.mktemp("conditioned")
    model, _ = _tiny_conditioned()
    save_conditioned(model, AutoTokenizer.from_pretrained(str(DEMO_PAIR / "slm")), root / "hf",
                     {"layer": 3, "dim": DIM, "input": "llm_hidden", "hidden": 12})
    manifest = export_model(str(root / "hf"), root / "onnx")
    return root / "onnx", manifest


@pytest.mark.integration  # exports a tiny model (~10-20 s on 2 busy cores)
def test_the_export_takes_llm_hidden_and_matches_pytorch(conditioned_export):
    from edge.model import EdgeModel

    folder, manifest = conditioned_export
    assert "llm_hidden" in manifest.inputs and manifest.conditioning == {"layer": 3, "dim": DIM, "input": "llm_hidden"}
    assert manifest.parity["max_abs_diff"] <= manifest.parity["tolerance"]  # non-zero rows at prefill, a cached step
    model = EdgeModel(folder, providers="cpu", threads=1)
    assert model.conditioning == ConditioningSpec(layer=3, dim=DIM, input="llm_hidden")
    assert model.runtime.conditioning_dim == DIM


@pytest.mark.integration  # exports a tiny model (~10-20 s on 2 busy cores)
def test_the_runtime_feeds_zeros_unless_given_rows(conditioned_export):
    from edge.runtime import OnnxCausalLM

    runtime = OnnxCausalLM(conditioned_export[0] / "model.onnx", providers="cpu", threads=1)
    ids = [1, 50, 60, 70]
    rows = np.random.default_rng(0).normal(size=(4, DIM)).astype(np.float32)
    plain = runtime.prefill(ids)
    assert np.array_equal(plain, runtime.prefill(ids, conditioning=np.zeros((4, DIM), np.float32)))
    conditioned = runtime.prefill(ids, conditioning=rows)
    assert not np.allclose(plain, conditioned)
    fed = []
    run = runtime.session.run
    runtime.session.run = lambda names, feeds: fed.append(feeds) or run(names, feeds)  # spy on the decode's feeds
    runtime.decode(80)
    assert fed[0]["llm_hidden"].shape == (1, 1, DIM) and not fed[0]["llm_hidden"].any()
    with pytest.raises(ValueError, match=r"\[4, 8\]"):
        runtime.prefill(ids, conditioning=rows[:3])


@pytest.mark.integration  # exports a tiny model (~10-20 s on 2 busy cores)
def test_slm_only_generation_takes_the_conditioning(conditioned_export):
    from core.sampling import SamplingSettings
    from edge.generate import generate_local
    from edge.model import EdgeModel

    model = EdgeModel(conditioned_export[0], providers="cpu", threads=1)
    ids = model.encode("Q:1+2-3+4 A:")
    rows = np.random.default_rng(1).normal(size=(len(ids), DIM)).astype(np.float32) * 50
    greedy = SamplingSettings(temperature=0.0)
    assert generate_local(model, ids, 4, greedy, conditioning=rows).token_ids[0] == int(
        np.argmax(model.runtime.prefill(ids, conditioning=rows)))
    assert generate_local(model, ids, 4, greedy).token_ids == generate_local(
        model, ids, 4, greedy, conditioning=np.zeros_like(rows)).token_ids


@pytest.mark.integration  # exports a tiny model (~10-20 s on 2 busy cores)
def test_a_manifest_that_disagrees_with_the_graph_is_refused(conditioned_export, tmp_path):
    from edge.model import EdgeModel

    folder = tmp_path / "copy"
    shutil.copytree(conditioned_export[0], folder)
    data = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**data, "conditioning": {**data["conditioning"], "dim": 9}}))
    with pytest.raises(ModelFolderError, match="9 wide"):
        EdgeModel(folder, providers="cpu", threads=1)
    (folder / "manifest.json").write_text(json.dumps({**data, "conditioning": None}))
    with pytest.raises(ModelFolderError, match="names no conditioning"):
        EdgeModel(folder, providers="cpu", threads=1)


# -- the command's arguments --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--layer", "x"], "must be auto or an integer"),
    (["--layer", "9", "--n-eval", "0"], "--layer must be auto or in 0..4"),
    (["--steps", "0"], "positive integer"), (["--temperatures", "1,x"], "comma-separated numbers"),
    (["--out", "a", "--onnx-out", "a"], "different folders"), (["--seed", "-1"], "integer >= 0"),
])
def test_the_command_refuses_bad_arguments_in_one_line(argv, needle, capsys, tmp_path):
    from models.cli import main

    try:
        code = main(["conditioned-slm", "--eval-only", "--onnx-out", str(tmp_path / "none"), *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
