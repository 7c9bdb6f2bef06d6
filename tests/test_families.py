"""Conformance across model families: each architecture a real pair uses, at its real vocabulary size, through
the project's export, the edge runtime, SLM-only generation and a real verifier process.

Tiny random-weight models (2 layers, hidden 64) with the real models' logit widths and WordLevel tokenizers of
the real tokenizers' id spaces N (``tokenizers``, saved so ``AutoTokenizer`` loads them, BOS/EOS set):

| family  | what it exercises |
| ------- | ----------------- |
| llama   | GQA, untied head, 32,000 ids, BOS prepended by the tokenizer |
| qwen2   | tests/test_id_space.py's Qwen2-shaped pair (tied 151,936 rows -> untied 152,064 rows over 151,665 ids), reused: its end-to-end tests live there, here only parity with truncation and the first-token χ² |
| phi3    | 32,064 rows over a 32,011-id tokenizer (11 added tokens; the 53 padding rows win when unsliced); EOS ids [32000, 32001, 32007] from generation_config.json |
| gemma2  | attention soft-capping (cap 2.0: small enough to bite at this size; sdpa would drop it, so everything loads eager) and final-logit soft-capping (30.0, Gemma-2's), sliding window 8, tied 256,000 rows, no position_ids input |
| gpt2    | learned positions (n_positions 64), LayerNorm, tied 50,257 rows, no BOS |
| mistral | sliding window 8, 32,000 ids |
| smollm2 | Llama architecture, tied 49,152 rows, ChatML-style BOS/EOS |

Per family: (1) the project's export (``models.export.export_model``) matches PyTorch's eager attention (the
reference implementation) over every logit row, in a prefill, in KV-cached steps past the sliding window, and
after ``truncate`` then a different continuation (which must also equal a fresh prefill of the same ids);
(2) SLM-only generation never produces an id >= N; (3) a verify-all hybrid loop through a real verifier
process returns first tokens distributed as the LLM's softmax sliced to N (χ²).

The final norm's gain is scaled so that the logits spread like a trained model's (q carries its mass on a few
ids, so the χ² test has power; a tied model's shared embedding is shrunk first, or it would predict its input
token); padding rows past N are scaled to win when unsliced. Tokenizers, models and
exports are built once into the pytest cache (``families/<name>``); a stamp of the recipe rebuilds them when it
changes, a stamp of the export code and package versions re-exports.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from core.process import VerifierProcess
from core.sampling import SamplingSettings, probabilities
from edge.client import VerifierSession, connect
from edge.generate import generate_local
from edge.hybrid import HybridConfig, generate_hybrid
from edge.model import EdgeModel
from edge.runtime import OnnxCausalLM
from models.export import TOLERANCE as EXPORT_TOLERANCE
from proto.distribution import CodecSpec
from proto.fingerprint import id_space
from tests import test_id_space as qwen
from tests.test_id_space import qwen_shaped_pair, qwen_shaped_tokenizer, word_tokenizer  # noqa: F401 (fixtures)
from tests.test_rejection import ALPHA, chi_square_p

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 128, "max_position_embeddings": 256}
LLAMA_SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}
PHI3_ADDED = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")
LOGIT_STD = 4.5  # the real rows' logit spread, set through the final norm's gain (a trained model's magnitude)
PADDING_FACTOR = 5.0  # padding rows' weights / real rows' weights: unsliced, a padding id wins
# A tied random model's last hidden state is mostly its input token's own embedding, so it predicts that token
# with near certainty; shrinking the (shared) embedding leaves the residual stream to the blocks.
TIED_EMBEDDING_SCALE = 0.01
SEEDS = {"slm": 1, "llm": 2}
BUILD_VERSION = 2
PROMPT = "w5 w17 w31000"  # short: every first-token session prefills it on both sides (256k-row heads)
WINDOW = 8  # the sliding window of gemma2 and mistral
LENGTH, CUT, OTHER = 16, 5, 11  # parity: 16 positions (twice the window), truncate to 5, continue with 11 others
NEW_TOKENS = 40  # SLM-only: prompt + 40 stays inside GPT-2's 64 positions
SESSIONS = 300  # first-token draws per family for the χ² test
GREEDY_TOKENS = 2 * WINDOW  # greedy verify-all: prompt + 16 positions, past the sliding window
TOLERANCE = EXPORT_TOLERANCE["fp32"]  # max |ONNX - PyTorch| logit difference


@dataclass(frozen=True)
class Family:
    name: str
    config: str  # transformers config class
    n: int  # the tokenizer's id space
    rows: int  # the SLM's logit rows
    tied: bool  # the SLM's head is its input embedding
    specials: dict  # special tokens inside the base vocabulary: token -> id
    added: tuple = ()  # special tokens added after the base vocabulary (ids n - len(added) ... n - 1)
    unk: str = "<unk>"
    bos: str | None = "<s>"
    eos: str = "</s>"
    prepend_bos: bool = True  # the tokenizer's post-processor puts BOS first
    generation_eos: tuple = ()  # generation_config.json's eos_token_id, when it lists several
    shape: dict = field(default_factory=lambda: dict(COMMON))
    llm_rows: int | None = None  # the LLM's logit rows, when not ``rows``
    temperature: float = 1.0  # the χ² test's sampling temperature

    @property
    def sliding_window(self) -> int | None:
        return self.shape.get("sliding_window")


FAMILIES = {f.name: f for f in [
    Family("llama", "LlamaConfig", 32_000, 32_000, False, LLAMA_SPECIALS),
    Family("phi3", "Phi3Config", 32_011, 32_064, False, LLAMA_SPECIALS, added=PHI3_ADDED, eos="<|endoftext|>",
           generation_eos=(32_000, 32_001, 32_007),
           shape={**COMMON, "num_key_value_heads": 4, "original_max_position_embeddings": 256}),
    Family("gemma2", "Gemma2Config", 256_000, 256_000, True,
           {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 106, "<end_of_turn>": 107},
           bos="<bos>", eos="<eos>", generation_eos=(1, 107),
           shape={**COMMON, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW,
                  "attn_logit_softcapping": 2.0, "final_logit_softcapping": 30.0, "initializer_range": 0.2}),
    Family("gpt2", "GPT2Config", 50_257, 50_257, True, {"<|endoftext|>": 50_256}, unk="<|endoftext|>",
           bos="<|endoftext|>", eos="<|endoftext|>", prepend_bos=False,
           shape={"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    Family("mistral", "MistralConfig", 32_000, 32_000, False, LLAMA_SPECIALS,
           shape={**COMMON, "head_dim": 16, "sliding_window": WINDOW}),
    Family("smollm2", "LlamaConfig", 49_152, 49_152, True, {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2},
           unk="<|endoftext|>", bos="<|im_start|>", eos="<|im_end|>", prepend_bos=False),
    # last, the six built here first in the same order: the one test that leaves qwen2 out (BUILT_HERE) then
    # groups with the others (pytest groups by parameter index)
    Family("qwen2", "Qwen2Config", qwen.N, qwen.SLM_ROWS, True, {}, llm_rows=qwen.LLM_ROWS, bos=None,
           eos="<eos>", prepend_bos=False, shape=qwen.SHAPE,
           temperature=0.04),  # test_id_space's pair keeps default-init logits (std ~0.16): 0.04 spreads them as 1.0 does here
]}
BUILT_HERE = [name for name in FAMILIES if name != "qwen2"]


# -- building --------------------------------------------------------------------------------------------------


def build_tokenizer(fam: Family, out: Path) -> None:
    """Exactly ``fam.n`` ids: words w<i> and the specials in the base vocabulary, then the added tokens."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    n_base = fam.n - len(fam.added)
    by_id = {i: f"w{i}" for i in range(n_base)} | {i: token for token, i in fam.specials.items()}
    tok = word_tokenizer({token: i for i, token in by_id.items()}, [*fam.specials, *fam.added], unk=fam.unk)
    if fam.prepend_bos:
        tok.post_processor = TemplateProcessing(single=f"{fam.bos} $A", special_tokens=[(fam.bos, fam.specials[fam.bos])])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=fam.unk, bos_token=fam.bos,
                            eos_token=fam.eos).save_pretrained(str(out))


def _final_norm_gain(model, factor: float) -> None:
    """Multiply the logits by ``factor`` through the final norm's gain (the head may be the input embedding)."""
    norm = getattr(model.base_model, "norm", None) or model.base_model.ln_f  # ln_f: GPT-2
    if type(norm).__name__.startswith("Gemma"):  # Gemma's RMSNorm scales by (1 + weight)
        norm.weight.copy_((1 + norm.weight) * factor - 1)
    else:
        norm.weight.mul_(factor)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(factor)


def build_model(fam: Family, tokenizer_dir: Path, out: Path, rows: int, tied: bool, seed: int) -> None:
    """A random model of the family whose real rows' logits spread like LOGIT_STD; padding rows past N
    PADDING_FACTOR times larger."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = getattr(transformers, fam.config)(vocab_size=rows, tie_word_embeddings=tied, bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id, **fam.shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    probe = torch.randint(0, fam.n, (1, LENGTH), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # [rows, hidden]; the input embedding too when tied
        if tied:
            head *= TIED_EMBEDDING_SCALE
        head[fam.n :] = torch.randn(rows - fam.n, head.shape[1]) * head[: fam.n].std() * PADDING_FACTOR
        _final_norm_gain(model, LOGIT_STD / float(model(probe).logits[0, :, : fam.n].std()))
    model.save_pretrained(str(out))
    if fam.generation_eos:
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=list(fam.generation_eos)).save_pretrained(str(out))
    tok.save_pretrained(str(out))


def _export_stamp() -> dict:
    """What an export depends on besides the model: the export code and the exporting packages."""
    code = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in ("models/export.py", "cloud/attention.py")))
    return {"code": code.hexdigest()[:16], **{p: version(p) for p in ("torch", "transformers", "optimum-onnx", "onnx")}}


def ensure_built(fam: Family, root: Path) -> dict[str, Path]:
    """The family's tokenizer, SLM, LLM and the SLM's export under ``root/fam.name``, rebuilt when stale."""
    from models.export import export_model

    folder = root / fam.name
    paths = {"tokenizer": folder / "tokenizer", "slm": folder / "slm", "llm": folder / "llm",
             "slm_onnx": folder / "slm-onnx"}
    recipe = json.loads(json.dumps({"version": BUILD_VERSION, "logit_std": LOGIT_STD, "padding_factor": PADDING_FACTOR,
                                    "tied_embedding_scale": TIED_EMBEDDING_SCALE, "length": LENGTH, "seeds": SEEDS,
                                    "family": asdict(fam)}))
    stamp, export_stamp = folder / "stamp.json", folder / "export-stamp.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == recipe):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        build_tokenizer(fam, paths["tokenizer"])
        build_model(fam, paths["tokenizer"], paths["slm"], fam.rows, fam.tied, SEEDS["slm"])
        build_model(fam, paths["tokenizer"], paths["llm"], fam.llm_rows or fam.rows, fam.tied, SEEDS["llm"])
        stamp.write_text(json.dumps(recipe))  # written last: an interrupted build starts over
    if not (export_stamp.is_file() and json.loads(export_stamp.read_text()) == _export_stamp()):
        export_stamp.unlink(missing_ok=True)
        export_model(str(paths["slm"]), paths["slm_onnx"])
        export_stamp.write_text(json.dumps(_export_stamp()))
    return paths


@dataclass
class Built:
    fam: Family
    paths: dict[str, Path]
    edge: EdgeModel
    verifier: Future | None  # the LLM's VerifierProcess, starting in the background; None when no test needs it


@pytest.fixture(scope="module")
def families_root(pytestconfig, tmp_path_factory) -> Path:
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    return cache.mkdir("families") if cache is not None else tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, families_root):
    """One family, built (or taken from the cache); module-scoped and parametrized, so pytest runs every test
    of one family before the next and only one family's verifier is up at a time. The verifier starts in the
    background while the edge-only tests run."""
    fam = FAMILIES[request.param]
    if fam.name == "qwen2":
        paths = {**request.getfixturevalue("qwen_shaped_pair"), "tokenizer": request.getfixturevalue("qwen_shaped_tokenizer")}
    else:
        paths = ensure_built(fam, families_root)
    needed = any("channel" in item.fixturenames and getattr(item, "callspec", None) is not None
                 and item.callspec.params.get("family") == fam.name for item in request.session.items)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # One torch thread: on a 2-core machine torch's default pool spins against the gRPC threads and the edge,
        # and a first-token round trip takes ~5x longer.
        verifier = pool.submit(VerifierProcess, str(paths["llm"]), extra_args=("--threads", "1")) if needed else None
        try:
            yield Built(fam, paths, EdgeModel(paths["slm_onnx"], providers="cpu", threads=1), verifier)
        finally:
            if verifier is not None:
                verifier.result().stop()


@pytest.fixture(scope="module")
def channel(family):
    ch = connect(family.verifier.result().address)
    yield ch
    ch.close()


def torch_model(model_dir: Path, attn: str = "eager", **config):
    """The transformers model with ``attn`` attention (eager: the reference implementation, soft-capping
    included); ``config`` overrides config attributes."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attn,
                                                **config).eval()


def torch_logits(model, ids: list[int]) -> np.ndarray:
    """Logits [T, rows]: every row, padding included."""
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


# -- the tests -------------------------------------------------------------------------------------------------


def test_tokenizer_and_manifest(family):
    fam, manifest = family.fam, family.edge.manifest
    assert id_space(family.paths["tokenizer"] / "tokenizer.json") == fam.n
    assert (manifest.id_space, manifest.logit_width) == (fam.n, fam.rows)
    prompt = family.edge.encode(PROMPT)
    assert len(prompt) == len(PROMPT.split()) + fam.prepend_bos and max(prompt) < fam.n
    if fam.prepend_bos:
        assert prompt[0] == fam.specials[fam.bos] == manifest.bos_token_id
    eos = set(fam.generation_eos) or {family.edge.tokenizer.token_to_id(fam.eos)}
    assert eos <= set(manifest.eos_token_ids), manifest.eos_token_ids


def test_export_parity_prefill_cached_steps_and_truncation(family):
    """ONNX (every logit row) against PyTorch eager: a prefill of 4, cached steps up to 16 positions (past the
    sliding window), then truncate to 5 and continue with 11 other ids: equal to a fresh prefill and to PyTorch."""
    fam, paths = family.fam, family.paths
    assert family.edge.manifest.parity["max_abs_diff"] <= TOLERANCE  # the export's own check
    rng = np.random.default_rng(0)
    ids = rng.integers(0, fam.n, LENGTH).tolist()
    rewritten = ids[:CUT] + rng.integers(0, fam.n, OTHER).tolist()
    reference = torch_model(paths["slm"])
    ref, ref_rewritten = torch_logits(reference, ids), torch_logits(reference, rewritten)
    runtime = OnnxCausalLM(paths["slm_onnx"] / "model.onnx", providers="cpu")
    got = np.concatenate([runtime.forward(ids[:4]), *[runtime.decode(t)[None] for t in ids[4:]]])
    assert got.shape == ref.shape == (LENGTH, fam.rows)
    assert np.abs(got - ref).max() <= TOLERANCE, np.abs(got - ref).max(axis=1)
    runtime.truncate(CUT)
    continued = runtime.forward(rewritten[CUT:])
    assert runtime.cache.length == len(rewritten)
    runtime.reset()
    fresh = runtime.forward(rewritten)[CUT:]
    np.testing.assert_allclose(continued, fresh, rtol=1e-6, atol=1e-5)  # float32 rounding: other kernel shapes
    assert np.abs(continued - ref_rewritten[CUT:]).max() <= TOLERANCE
    if fam.sliding_window:  # the window bites on this model: a graph without it would fail above
        unwindowed = torch_logits(torch_model(paths["slm"], sliding_window=4 * LENGTH), ids)
        assert np.abs(unwindowed[:WINDOW] - ref[:WINDOW]).max() < 1e-4
        assert np.abs(unwindowed[WINDOW + 1 :] - ref[WINDOW + 1 :]).max() > 0.1
    if fam.shape.get("attn_logit_softcapping"):  # soft-capping bites: sdpa (which drops it) is visibly different
        from transformers import AutoConfig

        from cloud.attention import attn_implementation

        assert attn_implementation(AutoConfig.from_pretrained(str(paths["slm"]))) == "eager"
        assert np.abs(torch_logits(torch_model(paths["slm"], attn="sdpa"), ids) - ref).max() > 0.5


@pytest.mark.parametrize("family", BUILT_HERE, indirect=True)  # qwen2: tests/test_id_space.py covers it
def test_slm_only_never_produces_an_id_outside_the_id_space(family):
    fam, edge = family.fam, family.edge
    prompt = edge.encode(PROMPT)
    local = generate_local(edge, prompt, NEW_TOKENS, SamplingSettings(temperature=1.0), seed=3, stop_at_eos=False)
    assert len(local.token_ids) == NEW_TOKENS and max(local.token_ids) < fam.n
    config = HybridConfig(threshold=float("inf"), codec=CodecSpec("adaptive"), settings=SamplingSettings(temperature=1.0),
                          max_new_tokens=NEW_TOKENS)
    hybrid = generate_hybrid(edge, prompt, config, seed=3)  # the loop's SLM-only policy: drafts from p~
    assert hybrid.token_ids and max(hybrid.token_ids + [r.draft for r in hybrid.records]) < fam.n
    if fam.rows > fam.n:  # unsliced, a padding row wins: the check above has teeth
        assert OnnxCausalLM(family.paths["slm_onnx"] / "model.onnx", providers="cpu").prefill(prompt).argmax() >= fam.n


def test_verify_all_first_token_follows_the_llm(family, channel):
    """A verify-all hybrid loop (threshold -inf) through a real verifier: every token verified and inside
    [0, N); over SESSIONS seeds, the first token is distributed as softmax(LLM logits[:N]) (χ²)."""
    fam, edge = family.fam, family.edge
    settings, codec = SamplingSettings(temperature=fam.temperature), CodecSpec("adaptive")
    prompt = edge.encode(PROMPT)
    llm = torch_logits(torch_model(family.paths["llm"]), prompt)[-1]
    q = probabilities(llm[: fam.n], settings)
    if len(llm) > fam.n:
        assert llm.argmax() >= fam.n  # unsliced, the verifier would return a padding id

    def run(config: HybridConfig, seed: int):
        def open_session(prompt_ids, settings, codec):
            return VerifierSession(channel, edge.manifest.fingerprint, prompt_ids, settings, codec, seed=seed)

        return generate_hybrid(edge, prompt, config, seed=seed, open_session=open_session)

    config = HybridConfig(threshold=float("-inf"), codec=codec, settings=settings, max_new_tokens=8)
    result = run(config, 0)
    assert result.transmission_rate == 1.0 and len(result.token_ids) >= 1
    assert max(result.token_ids + [r.draft for r in result.records]) < fam.n
    counts = np.zeros(fam.n, dtype=np.int64)
    for seed in range(1000, 1000 + SESSIONS):  # the first token of SESSIONS sessions, each with its own seeds
        counts[run(replace(config, max_new_tokens=1), seed).token_ids[0]] += 1
    assert (SESSIONS * q >= 5).sum() >= 3, "q too flat for the χ² test to have power"
    p_slm = probabilities(edge.runtime.prefill(prompt), settings)
    assert 0.5 * np.abs(p_slm - q).sum() > 0.3  # the SLM disagrees: verdicts resample, not just accept
    assert chi_square_p(counts, q) > ALPHA, (np.argsort(-q)[:6], np.sort(q)[::-1][:6], np.argsort(-counts)[:6])


def test_verify_all_greedy_equals_the_llm_greedy_past_the_window(family, channel):
    """Greedy verify-all returns the LLM's own greedy tokens (argmax over [0, N), recomputed here without a
    cache), for GREEDY_TOKENS tokens: the verifier's KV-cached forwards run past the sliding window."""
    fam, edge = family.fam, family.edge
    prompt = edge.encode(PROMPT)
    config = HybridConfig(threshold=float("-inf"), codec=CodecSpec("topk"), settings=SamplingSettings(temperature=0),
                          max_new_tokens=GREEDY_TOKENS)

    def open_session(prompt_ids, settings, codec):
        return VerifierSession(channel, edge.manifest.fingerprint, prompt_ids, settings, codec)

    hybrid = generate_hybrid(edge, prompt, config, open_session=open_session)
    llm, expected = torch_model(family.paths["llm"]), []
    while len(expected) < len(hybrid.token_ids):
        expected.append(int(torch_logits(llm, prompt + expected)[-1, : fam.n].argmax()))
    assert hybrid.transmission_rate == 1.0 and hybrid.token_ids == expected
    assert len(hybrid.token_ids) == GREEDY_TOKENS or hybrid.token_ids[-1] in edge.eos_ids
