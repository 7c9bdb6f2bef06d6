"""The id space is the tokenizer's (docs/design.md, "Id space and fingerprint").

Unit tests: the rule N = largest id + 1 (added tokens included), pairing on (tokenizer hash, N) with logit
widths recorded but never compared, the wire form with its deprecated field, the refusal of a client that
predates id-space pairing, and format-1 manifests.

A Qwen2-shaped pair end to end: random-weight Qwen2 models with 151,936 (edge, tied) and 152,064 (cloud,
untied) logit rows over one 151,665-id tokenizer, like Qwen2.5-0.5B and 7B. Their padding rows (ids
151,665 and up) are scaled so that an unsliced model would draw a padding id at almost every position: a
missing slice anywhere (edge runtime, verifier forward, payload width, id checks) fails these tests.
The built models and the SLM's ONNX export are cached under the pytest cache directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from cloud.validate import SessionAbort, check_fingerprint
from core.process import VerifierProcess
from core.sampling import SamplingSettings, probabilities
from edge.client import VerifierError, VerifierSession, connect, generate_remote
from edge.generate import generate_local
from edge.hybrid import HybridConfig, generate_hybrid
from edge.manifest import FORMAT_VERSION, load_manifest
from edge.model import EdgeModel
from edge.runtime import OnnxCausalLM
from proto import hybrid_pb2 as pb
from proto.distribution import CodecSpec, compress
from proto.fingerprint import check_logit_width, describe_mismatch, id_space
from proto.messages import PROTOCOL_VERSION, codec_to_msg, fingerprint_from_msg, fingerprint_to_msg
from proto.payload import encode
from tests.verifier_clients import raw_session

N = 151_665  # Qwen2.5's tokenizer: ids 0..151,664
SLM_ROWS, LLM_ROWS = 151_936, 152_064  # Qwen2.5-0.5B and Qwen2.5-7B logit rows
EOS = N - 1  # an added special token at the top of the id space, as Qwen's are
PADDING_STD = 1.0  # padding rows' weights: their logits (~8σ) dwarf the real rows' (~0.16σ)
SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "max_position_embeddings": 512}
BUILD_STAMP = {"version": 1, "n": N, "slm_rows": SLM_ROWS, "llm_rows": LLM_ROWS, "padding_std": PADDING_STD,
               "shape": SHAPE}
PROMPT = "w5 w17 w99 w1234 w150000"
FP = {"tokenizer_hash": "0123456789abcdef", "id_space": N, "logit_width": SLM_ROWS}


def word_tokenizer(vocab: dict[str, int], added: list[str], unk: str = "<unk>") -> Tokenizer:
    """A WordLevel tokenizer over ``vocab`` with ``added`` special tokens (ids given by `tokenizers`; one already
    in ``vocab`` keeps its id); words not in ``vocab`` become ``unk``."""
    tok = Tokenizer(WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(added)
    return tok


# -- the rule --------------------------------------------------------------------------------------------


def test_id_space_counts_added_tokens(tmp_path):
    tok = word_tokenizer({"<unk>": 0, "a": 1, "b": 2}, ["<eos>", "<pad>"])
    assert tok.get_vocab(with_added_tokens=False) == {"<unk>": 0, "a": 1, "b": 2}
    assert id_space(tok) == 5  # the two added tokens are ids 3 and 4
    tok.save(str(tmp_path / "tokenizer.json"))
    assert id_space(tmp_path / "tokenizer.json") == 5


def test_id_space_is_the_largest_id_plus_one_not_the_count():
    tok = word_tokenizer({"<unk>": 0, "a": 1, "z": 9}, ["<eos>"])  # ids 3..8 (or so) are a hole
    ids = tok.get_vocab(with_added_tokens=True)
    assert len(ids) == 4 < id_space(tok) == max(ids.values()) + 1 >= 10


def test_fewer_logit_rows_than_the_id_space_is_an_error():
    check_logit_width(SLM_ROWS, N, "edge")
    check_logit_width(N, N, "edge")
    with pytest.raises(ValueError, match=f"edge has {N - 1} logit rows but its tokenizer's id space is {N}"):
        check_logit_width(N - 1, N, "edge")


# -- pairing -----------------------------------------------------------------------------------------------


def test_pairing_ignores_logit_widths():
    assert describe_mismatch(FP, {**FP, "logit_width": LLM_ROWS}) is None


def test_a_mismatch_names_both_pairs():
    message = describe_mismatch(FP, {**FP, "id_space": 151_646})
    assert f"(tokenizer_hash={FP['tokenizer_hash']}, id_space={N})" in message
    assert f"(tokenizer_hash={FP['tokenizer_hash']}, id_space=151646)" in message
    assert "ffff" in describe_mismatch(FP, {**FP, "tokenizer_hash": "ffff"})


def test_wire_form_fills_the_deprecated_field_with_the_width():
    msg = fingerprint_to_msg(FP)
    assert (msg.vocab_size, msg.id_space, msg.logit_width) == (SLM_ROWS, N, SLM_ROWS)
    assert fingerprint_from_msg(msg) == FP
    old = pb.Fingerprint(vocab_size=32_000, tokenizer_hash="ab")  # a client from before id-space pairing
    assert fingerprint_from_msg(old) == {"tokenizer_hash": "ab", "id_space": None, "logit_width": 32_000}


def test_verifier_pairs_different_widths_and_refuses_a_client_without_id_space():
    check_fingerprint(fingerprint_to_msg({**FP, "logit_width": LLM_ROWS}), FP, "Open")  # no exception
    with pytest.raises(SessionAbort) as err:
        check_fingerprint(pb.Fingerprint(vocab_size=SLM_ROWS, tokenizer_hash=FP["tokenizer_hash"]), FP, "Open")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "predates id-space pairing" in str(err.value) and "must be upgraded" in str(err.value)
    with pytest.raises(SessionAbort, match="id_space=151664") as err:
        check_fingerprint(fingerprint_to_msg({**FP, "id_space": N - 1}), FP, "Open")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_format_1_manifest_loads_with_the_tokenizers_id_space(tmp_path):
    word_tokenizer({"<unk>": 0, "a": 1, "b": 2}, ["<eos>"]).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "model.onnx").write_bytes(b"")
    old = {"source": "x", "model_file": "model.onnx", "model_type": "llama", "vocab_size": 8,
           "tokenizer_hash": "ab", "bos_token_id": None, "eos_token_ids": [3], "inputs": ["input_ids"],
           "outputs": ["logits"], "dtype": "fp32", "opset": 18, "parity": {}, "format": 1}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    manifest = load_manifest(tmp_path)
    assert (manifest.logit_width, manifest.id_space, manifest.format) == (8, 4, FORMAT_VERSION)
    assert manifest.fingerprint == {"tokenizer_hash": "ab", "id_space": 4, "logit_width": 8}
    manifest.save(tmp_path)
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert "vocab_size" not in saved and load_manifest(tmp_path) == manifest


# -- a Qwen2-shaped pair ------------------------------------------------------------------------------------


def build_tokenizer(out: Path) -> None:
    """Exactly N entries: a WordLevel vocabulary for ids 0..N-2 and one added special token (EOS) at N-1."""
    from transformers import PreTrainedTokenizerFast

    tok = word_tokenizer({"<unk>": 0, **{f"w{i}": i for i in range(1, EOS)}}, ["<eos>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(str(out))


def build_model(out: Path, tokenizer_dir: Path, rows: int, tied: bool, seed: int) -> None:
    """A random Qwen2ForCausalLM with ``rows`` logit rows; rows past N get large weights (see PADDING_STD)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=rows, tie_word_embeddings=tied, bos_token_id=EOS, eos_token_id=EOS, **SHAPE)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # [rows, hidden]; also the input embedding when tied
        head[N:] = torch.randn(max(rows - N, 0), head.shape[1]) * PADDING_STD
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))


def _cache_root(pytestconfig, tmp_path_factory) -> Path:
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    return cache.mkdir("qwen_shaped_pair") if cache is not None else tmp_path_factory.mktemp("qwen_shaped_pair")


@pytest.fixture(scope="module")
def qwen_shaped_tokenizer(pytestconfig, tmp_path_factory) -> Path:
    root = _cache_root(pytestconfig, tmp_path_factory)
    stamp = root / "stamp.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == BUILD_STAMP):
        shutil.rmtree(root)
        root.mkdir()
        build_tokenizer(root / "tokenizer")
        stamp.write_text(json.dumps(BUILD_STAMP))
    return root / "tokenizer"


@pytest.fixture(scope="module")
def qwen_shaped_pair(qwen_shaped_tokenizer) -> dict[str, Path]:
    """The SLM (tied, 151,936 rows) exported to ONNX by the project's export, and the LLM (untied, 152,064)."""
    from models.export import export_model

    root = qwen_shaped_tokenizer.parent
    paths = {"slm": root / "slm", "llm": root / "llm", "slm_onnx": root / "slm-onnx"}
    if not (paths["llm"] / "config.json").is_file():
        build_model(paths["llm"], qwen_shaped_tokenizer, LLM_ROWS, tied=False, seed=1)
    if not (paths["slm_onnx"] / "manifest.json").is_file():
        build_model(paths["slm"], qwen_shaped_tokenizer, SLM_ROWS, tied=True, seed=2)
        export_model(str(paths["slm"]), paths["slm_onnx"])
    return paths


@pytest.fixture(scope="module")
def edge(qwen_shaped_pair) -> EdgeModel:
    return EdgeModel(qwen_shaped_pair["slm_onnx"], providers="cpu")


@pytest.fixture(scope="module")
def channel(qwen_shaped_pair):
    with VerifierProcess(str(qwen_shaped_pair["llm"])) as proc:
        ch = connect(proc.address)
        yield ch
        ch.close()


def test_the_tokenizer_has_exactly_n_ids(qwen_shaped_tokenizer):
    ids = Tokenizer.from_file(str(qwen_shaped_tokenizer / "tokenizer.json")).get_vocab(with_added_tokens=True)
    assert len(ids) == id_space(qwen_shaped_tokenizer / "tokenizer.json") == N and ids["<eos>"] == EOS


def test_export_records_both_numbers_and_the_edge_slices(qwen_shaped_pair, edge):
    assert (edge.manifest.id_space, edge.manifest.logit_width) == (N, SLM_ROWS)
    prompt = edge.encode(PROMPT)
    logits = edge.runtime.prefill(prompt)
    unsliced = OnnxCausalLM(qwen_shaped_pair["slm_onnx"] / "model.onnx", providers="cpu").prefill(prompt)
    assert logits.shape == (N,) and unsliced.shape == (SLM_ROWS,)
    assert unsliced.argmax() >= N  # unsliced, a padding row wins: the checks below have teeth
    np.testing.assert_array_equal(logits, unsliced[:N])
    with pytest.raises(ValueError, match="can never be produced"):
        OnnxCausalLM(qwen_shaped_pair["slm_onnx"] / "model.onnx", providers="cpu", id_space=SLM_ROWS + 1)


def test_slm_only_never_draws_a_padding_id(edge):
    settings, prompt = SamplingSettings(temperature=1.0), edge.encode(PROMPT)
    local = generate_local(edge, prompt, 300, settings, seed=3, stop_at_eos=False)
    assert len(local.token_ids) == 300 and max(local.token_ids) < N
    config = HybridConfig(threshold=float("inf"), codec=CodecSpec("adaptive"), settings=settings,
                          max_new_tokens=100)
    result = generate_hybrid(edge, prompt, config, seed=3)  # drafts from p~, as the loop's SLM-only policy
    assert max(r.draft for r in result.records) < N and max(result.token_ids) < N


def test_verify_all_over_a_pair_whose_widths_differ(edge, channel):
    sessions = []

    def open_session(prompt_ids, settings, codec):
        sessions.append(VerifierSession(channel, edge.manifest.fingerprint, prompt_ids, settings, codec, seed=7))
        return sessions[-1]

    config = HybridConfig(threshold=float("-inf"), codec=CodecSpec("adaptive"),
                          settings=SamplingSettings(temperature=1.0), max_new_tokens=24)
    result = generate_hybrid(edge, edge.encode(PROMPT), config, seed=7, open_session=open_session)
    opened = sessions[0].opened.fingerprint  # the session was accepted although 151,936 != 152,064
    assert (opened.id_space, opened.logit_width, opened.vocab_size) == (N, LLM_ROWS, LLM_ROWS)
    assert opened.tokenizer_hash == edge.manifest.tokenizer_hash
    assert result.records and result.transmission_rate == 1.0
    ids = [r.draft for r in result.records] + [r.returned for r in result.records] + result.token_ids
    assert max(ids) < N


def test_llm_only_generation_never_returns_a_padding_id(edge, channel):
    tokens, _, _ = generate_remote(channel, edge.manifest.fingerprint, edge.encode(PROMPT),
                                   SamplingSettings(temperature=1.0), 64, [EOS], seed=1)
    assert tokens and max(tokens) < N


def test_padding_ids_and_mismatched_clients_are_refused(edge, channel):
    settings, codec, prompt = SamplingSettings(temperature=1.0), CodecSpec("adaptive"), edge.encode(PROMPT)
    with pytest.raises(VerifierError, match=rf"\[0, {N}\)") as err:
        _ = VerifierSession(channel, edge.manifest.fingerprint, [*prompt, N], settings, codec).opened  # N < LLM_ROWS
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    session = VerifierSession(channel, edge.manifest.fingerprint, prompt, settings, codec, seed=1)
    p_tilde = compress(probabilities(edge.runtime.prefill(prompt), settings), codec)
    draft = p_tilde.sample(np.random.default_rng(0))
    with pytest.raises(VerifierError, match="Verify.pending_ids") as err:
        session.verify([LLM_ROWS - 1], draft, encode(p_tilde, codec, N))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    old = pb.Fingerprint(vocab_size=SLM_ROWS, tokenizer_hash=edge.manifest.tokenizer_hash)
    open_old = pb.EdgeMessage(open=pb.Open(fingerprint=old, sampling=pb.Sampling(temperature=1.0),
                                           prompt_ids=prompt, codec=codec_to_msg(codec),
                                           protocol=PROTOCOL_VERSION))
    code, details, _ = raw_session(channel, [open_old])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "must be upgraded" in details


def test_a_verifier_model_with_fewer_rows_than_the_id_space_is_refused(qwen_shaped_tokenizer, tmp_path):
    from cloud.engine import VerifierModel

    build_model(tmp_path / "short", qwen_shaped_tokenizer, 1000, tied=True, seed=0)
    with pytest.raises(ValueError, match=f"has 1000 logit rows but its tokenizer's id space is {N}"):
        VerifierModel(str(tmp_path / "short"))
