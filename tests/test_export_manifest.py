"""What an export's manifest records for real chat models, and what the edge does with it.

- End-of-sequence ids: the union of the config's, generation_config.json's and the tokenizer's (Phi-3's
  generation config lists 32000, 32001 and 32007; its tokenizer names one).
- The context limit (``max_positions``): generation stops there with the text kept and a one-line error;
  a prompt that leaves no room is refused in one line; the runtime never feeds a position past it.
- External-data weights (``model.onnx_data``) are listed, and a folder copied without them is refused in
  one line naming the missing file, not with an ONNX Runtime traceback.
"""

from __future__ import annotations

import json
import shutil

import pytest

from edge.manifest import ModelFolderError, load_manifest
from edge.model import EdgeModel
from edge.runtime import ContextLimitError
from models.metadata import eos_token_ids, external_data_files, max_positions
from tests.conftest import DEMO_PAIR, run_module
from tests.test_cli_errors import _assert_one_line_error

PROMPT = "Q:7+5-3+8 A:"


def _config_folder(tmp_path, generation_eos):
    """A transformers folder without weights: the demo SLM's tokenizer (eos 2), a config and a generation
    config."""
    from transformers import GenerationConfig, LlamaConfig

    folder = tmp_path / "chat-model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_PAIR / "slm" / name, folder / name)
    LlamaConfig(vocab_size=32_000, eos_token_id=2).save_pretrained(folder)
    if generation_eos is not None:
        GenerationConfig(eos_token_id=generation_eos).save_pretrained(folder)
    return folder


def test_eos_ids_include_the_generation_configs(tmp_path):
    assert eos_token_ids(str(_config_folder(tmp_path, [2, 31_999, 7]))) == [2, 31_999, 7]


def test_eos_ids_without_a_generation_config(tmp_path):
    assert eos_token_ids(str(_config_folder(tmp_path, None))) == [2]


def test_max_positions_by_architecture():
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    assert max_positions(GPT2Config(n_positions=1024)) == 1024
    assert max_positions(LlamaConfig(max_position_embeddings=4096)) == 4096
    assert max_positions(Qwen2Config(max_position_embeddings=32_768)) == 32_768


def _copy(slm_onnx, tmp_path, **manifest_changes):
    folder = tmp_path / "edge-model"
    shutil.copytree(slm_onnx, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data.update(manifest_changes)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def test_the_export_records_the_context_limit_and_no_external_data(slm_onnx):
    manifest = load_manifest(slm_onnx)
    assert manifest.max_positions == 256 and manifest.external_data == []  # the demo SLM's config; one file
    assert manifest.eos_token_ids == [2]


def test_external_data_is_listed_and_required(slm_onnx, tmp_path):
    import onnx

    folder = _copy(slm_onnx, tmp_path)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx_data")
    assert external_data_files(folder / "model.onnx") == ["model.onnx_data"]
    _copy_manifest_field(folder, external_data=["model.onnx_data"])
    assert EdgeModel(folder, providers="cpu").runtime.prefill([1, 5, 9]).shape == (32_000,)
    (folder / "model.onnx_data").unlink()
    with pytest.raises(ModelFolderError, match=r"lacks model.onnx_data \(an export folder needs model.onnx, "
                                               r"model.onnx_data, tokenizer.json, manifest.json\)"):
        load_manifest(folder)


def _copy_manifest_field(folder, **changes):
    data = json.loads((folder / "manifest.json").read_text())
    data.update(changes)
    (folder / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("bad", [["../model.onnx"], "model.onnx_data", [3]])
def test_external_data_must_name_files_in_the_folder(slm_onnx, tmp_path, bad):
    with pytest.raises(ModelFolderError, match="external_data must be a list of file names"):
        load_manifest(_copy(slm_onnx, tmp_path, external_data=bad))


def test_the_runtime_refuses_a_position_past_the_limit(slm_onnx, tmp_path):
    model = EdgeModel(_copy(slm_onnx, tmp_path, max_positions=8), providers="cpu")
    model.runtime.prefill(list(range(3, 10)))  # 7 positions
    model.runtime.decode(5)  # the 8th
    with pytest.raises(ContextLimitError, match="9 tokens exceed the model's context limit of 8 positions"):
        model.runtime.decode(5)


def test_generation_stops_at_the_context_limit_with_the_text_kept(slm_onnx, tmp_path):
    folder = _copy(slm_onnx, tmp_path)
    n_prompt = len(EdgeModel(folder, providers="cpu").encode(PROMPT))
    _copy_manifest_field(folder, max_positions=n_prompt + 5)
    proc = run_module("edge", "generate", "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "40",
                      "--seed", "1", "--temperature", "0", "--json")
    _assert_one_line_error(proc, "stopped after 5 of --max-new-tokens 40", "context limit of")
    text, summary = proc.stdout.strip().rsplit("\n", 1)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert json.loads(summary)["tokens"] == 5 and json.loads(summary)["stopped"] == "context_limit"


def test_a_prompt_with_no_room_is_one_line(slm_onnx, tmp_path):
    folder = _copy(slm_onnx, tmp_path, max_positions=4)
    proc = run_module("edge", "generate", "--model", str(folder), "--prompt", PROMPT)
    _assert_one_line_error(proc, "no room left in the model's context limit of 4 positions")
