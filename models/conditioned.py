"""``python -m models conditioned-slm``: LLM-to-SLM prompt conditioning (arXiv 2402.16844) on the demo pair.

The frozen LLM encodes the prompt once; a projector (Linear -> ReLU -> Linear, LLM width -> hidden -> SLM
embedding width) maps its hidden state at layer ``k`` (transformers' ``output_hidden_states`` index: 0 = the
embeddings, L = the last layer's, final norm applied) and the result is ADDED to the SLM's input embedding at the
same position (the pair shares one tokenizer, so positions align). Only the SLM and the projector are trained.

Glossary:
- *conditioning rows*: ``llm_hidden`` [n, H_llm] float32, one row per SLM position: the LLM's layer-k state at a
  prompt position, zeros at every other position (generated tokens, or all positions with no verifier).
- *projector*: RMS normalization of the row (no parameters; the LLM's inner layers are ~100x its embeddings'
  scale), Linear -> ReLU -> Linear, its last layer zero at the start (the conditioned SLM starts as the SLM).
- *mask*: the projector's output is multiplied by ``any(row != 0)`` per position, so a zero row adds exactly
  nothing whatever the biases (chosen over a bias-free projector: the paper's projector keeps its biases, and the
  edge's "zeros = no conditioning" is exact in the graph, in fp16 too).
- *control*: the same fine-tune (rows, batches, steps, loss) with the conditioning zeroed: separates what the
  conditioning brings from what the extra training brings (a plain fine-tune alone moved the demo SLM from 60%
  to 92% at T=1 in ``reports/span_slm.json``).

Pipeline (each stage a function below):
1. Rows: training-split problems as (BOS + prompt + solution + EOS, labels on the solution only).
2. Layer (``choose_layer``, unless given): a short fine-tune per candidate k (and one with zeros), each scored by
   the full-softmax loss on solution tokens of validation problems (training-split questions the rows do not
   hold; the held-out test split stays untouched); the lowest wins. Recorded in the recipe.
3. Fine-tune (``finetune_conditioned``): ``models/finetune.py``'s loop (restricted logits, then the full softmax;
   constant LR then linear decay; the shared optimizer step), the LLM's states computed per batch (frozen,
   inference mode), loss on solution tokens.
4. Save: the SLM as a plain fp16 transformers folder (loadable by anything, unconditioned), plus
   ``projector.safetensors`` and ``conditioning.json`` (layer, dims, input name) and the recipe.
5. Export (``models/export.py``): a folder with ``conditioning.json`` is exported through optimum's
   ``onnx_export_from_model`` with a custom ONNX config (``conditioned_onnx_config``: LlamaOnnxConfig plus the
   ``llm_hidden`` input [batch, sequence_length, H_llm] and its dummy generator, the route optimum documents for
   changed inputs via ``custom_onnx_configs``), so inputs, outputs and the KV layout are optimum's and the edge
   runtime stays one implementation; parity is checked with non-zero conditioning at prefill and a cached step;
   the manifest gets ``conditioning: {layer, dim, input}``.
6. Measure (``measure``): SLM-only held-out accuracy through the edge runtime (``edge/generate.py``): the demo
   SLM, the conditioned SLM with the LLM's rows (computed here with torch), with zeros, and the control.

Seeded (problems, batches; the initialisation is the source SLM and a seeded projector), one torch thread by
default, budgets are step counts. torch and transformers are imported inside functions (the classes come from
``_classes``): ``python -m models`` starts in 0.1 s, transformers' Llama takes ~8 s to import here.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from edge.runtime import CONDITIONING_INPUT
from models.finetune import encode_problem, finetune_loop, load_slm, pad_batch, save_fp16
from models.span_marker import IGNORE
from models.task import MAX_SOLUTION_TOKENS, held_out_problems, is_correct, sample_problems

CONDITIONING_FILE = "conditioning.json"  # beside the SLM's weights: layer, dims, input name, the LLM it reads
PROJECTOR_FILE = "projector.safetensors"
RECIPE_FILE = "conditioned_recipe.json"
DEMO_PAIR = Path(__file__).resolve().parent / "demo_pair"
DEFAULT_SLM, DEFAULT_LLM = DEMO_PAIR / "slm", DEMO_PAIR / "llm"
VALIDATION_SEED_OFFSET = 1000  # validation problems: training split, another seed, rows' questions removed
Z95 = 1.959964


@dataclass(frozen=True)
class ConditionedSpec:
    """Layer choice and fine-tuning budget (the defaults are the recorded build's)."""

    layer: int | None = None  # None: chosen by measurement among ``candidates``
    candidates: tuple[int, ...] = (1, 2, 3, 4)
    probe_steps: int = 100  # steps of each candidate's short fine-tune
    problems: int = 3000  # training-split problems (as the span SLM's control fine-tune)
    validation: int = 400  # validation problems scoring the candidates
    projector_hidden: int = 256
    steps: int = 400
    batch: int = 32
    full_batch: int = 8
    restricted_share: float = 0.75
    lr: float = 1e-3
    weight_decay: float = 0.0  # a short fine-tune from trained weights: no pull towards zero
    constant_share: float = 0.5
    seed: int = 0


# -- the modules -----------------------------------------------------------------------------------------
@functools.cache
def _classes():
    """(Projector, ConditionedLlama), defined on first use so that importing this module needs no torch."""
    import torch
    from transformers import LlamaForCausalLM

    class Projector(torch.nn.Module):
        """Linear -> ReLU -> Linear from the LLM's width to the SLM's embedding width, masked per position."""

        def __init__(self, dim: int, hidden: int, out: int):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, out))

        def forward(self, rows):  # [B, T, dim] -> [B, T, out]
            # a zero row (no conditioning) adds exactly nothing: amax |row| > 0 is 1.0 on a real state, else 0.0
            present = (rows.abs().amax(-1, keepdim=True) > 0).to(rows.dtype)  # [B, T, 1]
            # parameter-free RMS normalization: the LLM's inner residual streams are ~100x its embeddings' scale
            # (demo LLM: mean row norm 1.2 at layer 0, 142-190 at layers 1-3, 15 at 4 after its final norm)
            rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.net(rows) * present

    class ConditionedLlama(LlamaForCausalLM):
        """The SLM with the projector; ``llm_hidden`` [B, T, dim] is added (projected) to the input embeddings."""

        def __init__(self, config, dim: int, hidden: int):
            super().__init__(config)
            self.projector = Projector(dim, hidden, config.hidden_size)

        def embed(self, input_ids, llm_hidden):
            weight = self.model.embed_tokens.weight
            return self.model.embed_tokens(input_ids) + self.projector(llm_hidden.to(weight.dtype))

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    llm_hidden=None, inputs_embeds=None, use_cache=None, cache_position=None, logits_to_keep=0,
                    **kwargs):
            # the parameter order is the ONNX input order optimum gives (ordered_inputs reads this signature)
            if llm_hidden is not None:
                inputs_embeds, input_ids = self.embed(input_ids, llm_hidden), None
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                   cache_position=cache_position, logits_to_keep=logits_to_keep, **kwargs)

    # optimum's onnx_export_from_model infers the model's library from its class's module name alone (and takes no
    # library argument): this is a transformers Llama with one more input, exported as one.
    ConditionedLlama.__module__ = LlamaForCausalLM.__module__
    return Projector, ConditionedLlama


def make_projector(dim: int, hidden: int, out: int, seed: int = 0):
    """A seeded projector whose last layer starts at zero: the conditioned SLM starts exactly as the source SLM
    (a random last layer adds LLM-scale noise to every prompt embedding: measured on the demo pair, the solution
    loss went from 0.04 to 0.69 nats before any step) and learns how much of the LLM's state to add."""
    import torch

    torch.manual_seed(seed)
    projector = _classes()[0](dim, hidden, out)
    torch.nn.init.zeros_(projector.net[2].weight)
    torch.nn.init.zeros_(projector.net[2].bias)
    return projector


def conditioned_from(slm, dim: int, hidden: int, projector=None, seed: int = 0):
    """A ConditionedLlama holding ``slm``'s weights (fp32) and ``projector`` (a fresh seeded one when None)."""
    import torch

    if projector is None:
        projector = make_projector(dim, hidden, slm.config.hidden_size, seed)
    model = _classes()[1](slm.config, dim, hidden).to(torch.float32)
    model.load_state_dict({**slm.state_dict(), **{f"projector.{k}": v for k, v in projector.state_dict().items()}})
    return model.eval()


# -- the folder ------------------------------------------------------------------------------------------
def read_conditioning(folder: str | Path) -> dict | None:
    """``conditioning.json`` of a conditioned SLM's folder, or None (a plain folder or a hub id)."""
    path = Path(folder) / CONDITIONING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_conditioned(folder: str | Path):
    """The conditioned SLM of ``folder`` in fp32 (with the attention its config needs), projector included."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from cloud.attention import attn_implementation

    spec = read_conditioning(folder)
    if spec is None:
        raise ValueError(f"{folder} has no {CONDITIONING_FILE}: not a conditioned SLM")
    attn = attn_implementation(AutoConfig.from_pretrained(str(folder)))
    slm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn)
    projector = make_projector(spec["dim"], spec["hidden"], slm.config.hidden_size)
    projector.load_state_dict({k: v.float() for k, v in load_file(str(Path(folder) / PROJECTOR_FILE)).items()})
    return conditioned_from(slm, spec["dim"], spec["hidden"], projector)


def save_conditioned(model, tokenizer, out: Path, conditioning: dict) -> None:
    """The SLM as a plain fp16 transformers folder, the projector (fp16) and ``conditioning.json``."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM(model.config)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("projector.")})
    save_fp16(plain, tokenizer, out)
    save_file({k: v.to(torch.float16).contiguous() for k, v in model.projector.state_dict().items()},
              str(out / PROJECTOR_FILE))
    (out / CONDITIONING_FILE).write_text(json.dumps(conditioning, indent=2) + "\n")


# -- the export ------------------------------------------------------------------------------------------
def conditioned_onnx_config(model, dim: int):
    """optimum's Llama ONNX config (text-generation with past, as ``get_decoder_models_for_export`` builds it)
    plus the ``llm_hidden`` input [batch_size, sequence_length, dim] and a generator of its dummy values."""
    from optimum.exporters.onnx.model_configs import LlamaOnnxConfig
    from optimum.utils import DummyTextInputGenerator

    class LlmHiddenGenerator(DummyTextInputGenerator):
        SUPPORTED_INPUT_NAMES = (CONDITIONING_INPUT,)

        def generate(self, input_name, framework="pt", int_dtype="int64", float_dtype="fp32"):
            return self.random_float_tensor([self.batch_size, self.sequence_length, dim], framework=framework,
                                            dtype=float_dtype)

    class ConditionedLlamaOnnxConfig(LlamaOnnxConfig):
        DUMMY_INPUT_GENERATOR_CLASSES = (*LlamaOnnxConfig.DUMMY_INPUT_GENERATOR_CLASSES, LlmHiddenGenerator)

        @property
        def inputs(self):
            inputs = super().inputs
            inputs[CONDITIONING_INPUT] = {0: "batch_size", 1: "sequence_length"}
            return inputs

    return ConditionedLlamaOnnxConfig(model.config, task="text-generation", use_past=True, use_past_in_inputs=True)


def parity_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """[n, dim] float32 conditioning for the export's parity check: LLM-scale random rows, with a zero row in the
    middle and at the end (the end is the cached decode step, where the edge feeds zeros)."""
    rows = np.random.default_rng(seed).normal(0.0, 1.0, (n, dim)).astype(np.float32)
    rows[n // 2] = 0.0
    rows[-1] = 0.0
    return rows


def manifest_conditioning(folder: str | Path) -> dict | None:
    """What the manifest records: {layer, dim, input} (edge/manifest.py ConditioningSpec), or None."""
    spec = read_conditioning(folder) if Path(folder).is_dir() else None
    return None if spec is None else {"layer": spec["layer"], "dim": spec["dim"], "input": spec["input"]}


# -- training data and the LLM's states ------------------------------------------------------------------
def task_rows(tokenizer, problems) -> list[tuple[list[int], list[int]]]:
    """(BOS + prompt + solution + EOS, next-token labels on the solution only) per problem."""
    rows = []
    for problem in problems:
        prompt, solution = encode_problem(tokenizer, problem)
        ids = prompt + solution
        rows.append((ids, [IGNORE] * (len(prompt) - 1) + solution + [IGNORE]))
    return rows


def prompt_length(labels: list[int]) -> int:
    """BOS + prompt tokens of a row: the labels are IGNORE up to the prompt's last position."""
    return next(i for i, label in enumerate(labels) if label != IGNORE) + 1


def load_llm(folder: str | Path):
    import torch
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for p in llm.parameters():
        p.requires_grad_(False)  # frozen: the LLM only encodes
    return llm


def llm_states(llm, prompts: list[list[int]], layer: int, pad_id: int):
    """[B, P, dim] the LLM's ``hidden_states[layer]`` at each prompt position (right-padded; padding rows are
    zeros). Right padding leaves every real position's state as it is alone (causal attention)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    with torch.inference_mode():
        states = llm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
    return (states * mask[..., None]).clone()  # [B, P, dim]


def conditioning_batch(llm, rows, layer: int | None, pad_id: int, width: int, dim: int):
    """[B, width, dim]: the LLM's layer states at each row's prompt positions, zeros elsewhere; all zeros when
    ``layer`` is None (the control)."""
    import torch

    out = torch.zeros(len(rows), width, dim)
    if layer is None:
        return out
    prompts = [ids[: prompt_length(labels)] for ids, labels in rows]
    states = llm_states(llm, prompts, layer, pad_id)
    out[:, : states.shape[1]] = states
    return out


def solution_loss(model, llm, rows, layer: int | None, pad_id: int, head_ids=None):
    """Mean cross-entropy on solution tokens, the conditioning added at prompt positions; ``head_ids`` [n]: logits
    over those ids only (the cheap phase), None: the full softmax."""
    import torch.nn.functional as F

    ids, mask, labels = pad_batch(rows, pad_id)
    cond = conditioning_batch(llm, rows, layer, pad_id, ids.shape[1], model.projector.net[0].in_features)
    keep = labels != IGNORE  # [B, L]
    hidden = model.model(inputs_embeds=model.embed(ids, cond), attention_mask=mask).last_hidden_state[keep]  # [M, H]
    if head_ids is None:
        return F.cross_entropy(model.lm_head(hidden), labels[keep])
    import torch

    return F.cross_entropy(hidden @ model.lm_head.weight[head_ids].T, torch.searchsorted(head_ids, labels[keep]))


def head_ids_of(rows):
    """[n] sorted: every id a label can be (the solutions' tokens), the cheap phase's output rows."""
    import torch

    return torch.tensor(sorted({label for _, labels in rows for label in labels if label != IGNORE}))


def validation_loss(model, llm, rows, layer: int | None, pad_id: int, batch: int = 100) -> float:
    """Full-softmax cross-entropy per solution token over ``rows`` (token-weighted mean)."""
    import torch

    total, tokens = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            n = sum(label != IGNORE for _, labels in chunk for label in labels)
            total += solution_loss(model, llm, chunk, layer, pad_id).item() * n
            tokens += n
    return total / tokens


def finetune_conditioned(slm_source: Path, llm, rows, layer: int | None, spec: ConditionedSpec, pad_id: int,
                         progress: bool = True):
    """A fresh copy of the source SLM with a seeded projector, fine-tuned on ``rows`` reading the LLM's ``layer``
    (None: zeros, the control); returns (model, training record)."""
    slm, _ = load_slm(slm_source)
    model = conditioned_from(slm, llm.config.hidden_size, spec.projector_hidden, seed=spec.seed)
    head_ids = head_ids_of(rows)

    def batch_loss(batch, restricted: bool):
        return solution_loss(model, llm, batch, layer, pad_id, head_ids if restricted else None)

    desc = "fine-tune control (zeros)" if layer is None else f"fine-tune conditioned SLM (layer {layer})"
    record = finetune_loop(model, rows, spec, batch_loss, desc, progress)
    return model, {"train_seconds": record["train_seconds"], "final_loss": record["final_loss"]}


def validation_rows(tokenizer, spec: ConditionedSpec, train_questions: set[str]):
    """Training-split problems drawn with another seed, none of whose questions the fine-tune's rows hold."""
    problems = [p for p in sample_problems(3 * spec.validation, "train", spec.seed + VALIDATION_SEED_OFFSET)
                if p.question not in train_questions]
    return task_rows(tokenizer, problems[: spec.validation])


def choose_layer(slm_source: Path, llm, rows, val_rows, spec: ConditionedSpec, pad_id: int,
                 progress: bool = True) -> tuple[int, dict]:
    """The candidate layer whose short fine-tune (``probe_steps``) reaches the lowest validation loss, and every
    candidate's loss (with the same short fine-tune on zeros as the reference)."""
    short = replace(spec, steps=spec.probe_steps)
    losses = {}
    for layer in [None, *spec.candidates]:
        model, _ = finetune_conditioned(slm_source, llm, rows, layer, short, pad_id, progress)
        loss = validation_loss(model, llm, val_rows, layer, pad_id)
        losses["zeros" if layer is None else str(layer)] = round(loss, 5)
    best = min(spec.candidates, key=lambda k: losses[str(k)])
    return best, {"probe_steps": spec.probe_steps, "validation_problems": len(val_rows),
                  "validation_loss_per_solution_token": losses, "chosen": best}


def build_conditioned_slm(out: Path, spec: ConditionedSpec = ConditionedSpec(), slm_source: Path = DEFAULT_SLM,
                          llm_source: Path = DEFAULT_LLM, threads: int = 1, control_out: Path | None = None,
                          progress: bool = True) -> dict:
    """Choose the layer (unless given), fine-tune the conditioned SLM and save it to ``out``; with
    ``control_out``, the same fine-tune on zeros saved there as a plain SLM. Returns the recipe."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    _, tokenizer = load_slm(slm_source)
    llm = load_llm(llm_source)
    pad_id = tokenizer.pad_token_id
    problems = sample_problems(spec.problems, "train", seed=spec.seed)
    rows = task_rows(tokenizer, problems)
    val_rows = validation_rows(tokenizer, spec, {p.question for p in problems})
    layer, selection = spec.layer, None
    if layer is None:
        layer, selection = choose_layer(slm_source, llm, rows, val_rows, spec, pad_id, progress)
    model, training = finetune_conditioned(slm_source, llm, rows, layer, spec, pad_id, progress)
    dim = llm.config.hidden_size
    conditioning = {"layer": layer, "dim": dim, "input": CONDITIONING_INPUT, "hidden": spec.projector_hidden,
                    "llm": str(llm_source), "mask": "projector(row) * any(row != 0) per position"}
    record = {
        "paper": "LLM-to-SLM (arXiv 2402.16844)", "slm_source": str(slm_source), "llm_source": str(llm_source),
        "spec": asdict(spec), "conditioning": conditioning, "layer_selection": selection, **training,
        "validation_loss": {"llm_rows": validation_loss(model, llm, val_rows, layer, pad_id),
                            "zero_rows": validation_loss(model, llm, val_rows, None, pad_id)},
        "threads": threads,
    }
    save_conditioned(model, tokenizer, Path(out), conditioning)
    if control_out is not None:
        control, record["control"] = finetune_conditioned(slm_source, llm, rows, None, spec, pad_id, progress)
        record["control"]["validation_loss"] = validation_loss(control, llm, val_rows, None, pad_id)
        _save_control(control, tokenizer, Path(control_out), record["control"], spec)
    record["wall_seconds"] = round(time.perf_counter() - t0, 1)
    record["load_average_after"] = list(os.getloadavg())
    (Path(out) / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _save_control(model, tokenizer, out: Path, record: dict, spec: ConditionedSpec) -> None:
    """The control as a plain SLM (its projector only ever saw zeros and is dropped) with its recipe."""
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM(model.config)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("projector.")})
    save_fp16(plain, tokenizer, out)
    (out / RECIPE_FILE).write_text(json.dumps({
        **record, "spec": asdict(spec),
        "what": "control: the conditioned SLM's fine-tune (rows, batches, steps, loss) with the conditioning zeroed"},
        indent=2) + "\n")


# -- the measure -----------------------------------------------------------------------------------------
def prompt_conditioning(llm, prompt_ids: list[int], layer: int) -> np.ndarray:
    """[len(prompt_ids), dim] float32: the LLM's ``hidden_states[layer]`` at each prompt position (what the
    verifier sends a conditioned SLM's edge)."""
    return llm_states(llm, [prompt_ids], layer, 0)[0].numpy().astype(np.float32)


def accuracy_row(name: str, model, problems, temperature: float, seed: int, conditioning=None,
                 progress: bool = True) -> dict:
    """SLM-only accuracy of an edge model over ``problems`` (problem i drawn with seed + i); ``conditioning(i,
    prompt_ids)`` gives problem i's prompt rows (None: zeros)."""
    from tqdm import tqdm

    from core.sampling import SamplingSettings
    from edge.generate import generate_local

    settings = SamplingSettings(temperature=temperature)
    correct, tokens, t0 = [], 0, time.perf_counter()
    for i, problem in enumerate(tqdm(problems, desc=f"{name} T={temperature:g}", disable=not progress, mininterval=2)):
        prompt_ids = model.encode(problem.prompt)
        rows = conditioning(i, prompt_ids) if conditioning is not None else None
        result = generate_local(model, prompt_ids, MAX_SOLUTION_TOKENS, settings, seed=seed + i, conditioning=rows)
        correct.append(int(is_correct(problem, result.text)))
        tokens += len(result.token_ids)
    n, acc = len(correct), sum(correct) / len(correct)
    return {"config": name, "temperature": temperature, "problems": n, "accuracy": acc,
            "ci95": Z95 * math.sqrt(max(acc * (1 - acc), 1e-12) / n), "tokens": tokens,
            "seconds": round(time.perf_counter() - t0, 1), "correct": correct}


def measure(conditioned_onnx: Path, base_onnx: Path, llm_source: Path, control_onnx: Path | None = None,
            n: int = 500, temperatures: tuple[float, ...] = (1.0, 0.0), seed: int = 0, threads: int = 1,
            progress: bool = True) -> dict:
    """SLM-only held-out accuracy (the fixed test split) of: the base SLM, the conditioned SLM fed the LLM's rows,
    the conditioned SLM fed zeros (no verifier), and the control; each with its 95% interval."""
    import torch

    from edge.model import EdgeModel

    torch.set_num_threads(threads)
    load_before = list(os.getloadavg())
    problems = held_out_problems(n)
    conditioned = EdgeModel(conditioned_onnx, providers="cpu", threads=threads)
    spec = conditioned.conditioning
    if spec is None:
        raise ValueError(f"{conditioned_onnx} is not a conditioned export (its manifest names no conditioning)")
    llm = load_llm(llm_source)
    cache: dict[int, np.ndarray] = {}

    def llm_rows(i: int, prompt_ids: list[int]) -> np.ndarray:
        if i not in cache:  # the LLM encodes each prompt once, for every temperature
            cache[i] = prompt_conditioning(llm, prompt_ids, spec.layer)
        return cache[i]

    models = [("slm-alone base", EdgeModel(base_onnx, providers="cpu", threads=threads), None),
              ("conditioned + LLM rows", conditioned, llm_rows), ("conditioned + zeros", conditioned, None)]
    if control_onnx is not None:
        models.append(("control (zeros fine-tune)", EdgeModel(control_onnx, providers="cpu", threads=threads), None))
    rows = [accuracy_row(name, model, problems, t, seed, cond, progress)
            for t in temperatures for name, model, cond in models]
    return {"paper": "LLM-to-SLM (arXiv 2402.16844)", "conditioning": asdict(spec), "problems": n, "seed": seed,
            "threads": threads, "conditioned_slm": str(conditioned_onnx), "base_slm": str(base_onnx),
            "control_slm": str(control_onnx) if control_onnx else None, "llm": str(llm_source),
            "rows": rows, "load_average": {"before": load_before, "after": list(os.getloadavg())}}


def format_report(report: dict) -> str:
    layer = report["conditioning"]["layer"]
    lines = [f"SLM-only held-out accuracy, n={report['problems']} (conditioning: LLM layer {layer})"]
    for row in report["rows"]:
        lines.append(f"  T={row['temperature']:g}  {row['config']:<28} {row['accuracy']:.3f} +- {row['ci95']:.3f}")
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------------------------
def control_paths(out: Path, onnx_out: Path) -> tuple[Path, Path]:
    """The control's folders: OUT-control and, for ONNX-OUT named ``X-onnx``, ``X-control-onnx`` (else
    ``ONNX-OUT-control``): build/conditioned_slm-control(-onnx) for the defaults."""
    name = onnx_out.name
    onnx_name = name[: -len("-onnx")] + "-control-onnx" if name.endswith("-onnx") else name + "-control"
    return out.with_name(out.name + "-control"), onnx_out.with_name(onnx_name)


def llm_layers(llm_source: Path) -> int:
    """The LLM's number of layers (its ``output_hidden_states`` has that many + 1 entries), from config.json."""
    return int(json.loads((Path(llm_source) / "config.json").read_text())["num_hidden_layers"])


def run_conditioned(out: Path, onnx_out: Path, spec: ConditionedSpec, control: bool, n_eval: int, report: Path,
                    temperatures: tuple[float, ...] = (1.0, 0.0), threads: int = 1, eval_only: bool = False,
                    command: str = "", progress: bool = True) -> dict:
    """Build (unless ``eval_only``), export and measure; returns {"recipe", "exports", "measure"}."""
    import tempfile

    from models.export import export_model

    control_out, control_onnx = control_paths(out, onnx_out) if control else (None, None)
    result: dict = {"recipe": None, "exports": {}, "measure": None}
    if not eval_only:
        result["recipe"] = build_conditioned_slm(out, spec, threads=threads, control_out=control_out,
                                                 progress=progress)
        for folder, onnx in [(out, onnx_out)] + ([(control_out, control_onnx)] if control else []):
            manifest = export_model(str(folder), onnx)
            result["exports"][str(onnx)] = {"parity": manifest.parity, "conditioning": manifest.conditioning}
    if n_eval:
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"  # the SLM the fine-tunes started from, exported as the edge runs it
            export_model(str(DEFAULT_SLM), base)
            measured = measure(onnx_out, base, DEFAULT_LLM, control_onnx, n_eval, temperatures, spec.seed, threads,
                               progress)
        measured["command"] = command
        measured["recipe"] = json.loads((out / RECIPE_FILE).read_text()) if (out / RECIPE_FILE).is_file() else None
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(measured, indent=2) + "\n")
        result["measure"] = measured
    return result
