"""The ONNX edge runtime: parity with PyTorch, KV-cached decode = recompute, truncation = never decoded."""

import numpy as np
import pytest

from edge.manifest import load_manifest
from edge.runtime import OnnxCausalLM, choose_providers

from tokenizers import Tokenizer

from tests.conftest import DEMO_PAIR

PROMPT = Tokenizer.from_file(str(DEMO_PAIR / "slm" / "tokenizer.json")).encode("Q:7+5-3+8 A:").ids
TOKEN = PROMPT[3]  # any valid id to feed after the prompt


@pytest.fixture()
def runtime(slm_onnx):
    return OnnxCausalLM(slm_onnx / "model.onnx", providers="cpu")


def test_manifest_records_fingerprint_and_parity(slm_onnx):
    m = load_manifest(slm_onnx)
    assert m.id_space == m.logit_width == 32000 and len(m.tokenizer_hash) == 16
    assert m.fingerprint == {"tokenizer_hash": m.tokenizer_hash, "id_space": 32000, "logit_width": 32000}
    assert m.parity["max_abs_diff"] <= m.parity["tolerance"] and m.parity["top1_agreement"] == 1.0
    assert m.dtype == "fp32" and m.opset >= 14 and "input_ids" in m.inputs


def test_onnx_matches_pytorch_logits(runtime, demo_slm_dir):
    import torch
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(demo_slm_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = ref_model(torch.tensor([PROMPT])).logits[0].numpy()
    got = runtime.forward(PROMPT)
    assert got.shape == ref.shape == (len(PROMPT), 32000)
    np.testing.assert_allclose(got, ref, atol=1e-3)


def test_kv_cached_decode_equals_full_recompute(runtime):
    full = runtime.forward(PROMPT)  # one pass over everything
    runtime.prefill(PROMPT[:3])
    stepwise = [runtime.decode(t) for t in PROMPT[3:]]
    np.testing.assert_allclose(np.stack(stepwise), full[3:], atol=1e-4)
    assert runtime.cache.length == len(PROMPT)


def test_truncate_then_redecode_equals_untruncated(runtime):
    runtime.prefill(PROMPT)
    reference = runtime.decode(TOKEN)  # the path never rolled back
    runtime.prefill(PROMPT)
    runtime.decode(99)
    runtime.decode(100)  # two tokens that get rolled back
    runtime.truncate(len(PROMPT))
    np.testing.assert_allclose(runtime.decode(TOKEN), reference, atol=1e-5)
    with pytest.raises(ValueError):
        runtime.truncate(runtime.cache.length + 1)


def test_providers_reported_and_validated():
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    assert choose_providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="not available"):
        choose_providers("no-such-provider")
