"""``python -m models span-slm``: a copy of the demo SLM fine-tuned to emit the offload marker before the steps
it tends to get wrong (SplitReason, arXiv 2504.16379, its SFT stage; the RL stage that follows it there is out
of scope here).

Pipeline (each stage a function below):
1. Marker: an existing id no task text can contain (``models/span_marker.py``), written to ``span_marker.json``.
2. Annotation (``annotate``): on training-split problems only, the demo SLM samples each step of the correct
   solution m times at temperature 1, from the correct prefix (the context the marker decision is trained in);
   a step is *hard* when at least k of the m samples differ from the correct step's text.
3. SFT data (``sft_rows``): the correct text as input; the label at a hard step's first token becomes the
   marker (label substitution); problems without a hard step stay unmarked, so the data mixes both.
4. Fine-tune (``finetune``): the loss is factored as the SLM's distribution is (``sft_loss``): whether to draw
   the marker here (a binary term on the marker's logit alone) and the correct token with the marker masked out
   (what the SLM draws from when it keeps the step, or when nobody can take a span). The plain cross-entropy
   towards the marker flattens the SLM at the very steps it learns to hand off; this loss keeps most of that
   skill (measured alone at T=1: 88.8% vs 81.4%, and 92.4% for the same fine-tune without the marker).
5. Save fp16 (as the demo pair is stored) with ``span_marker.json`` and ``span_recipe.json``; export to ONNX
   through ``models/export.py`` (parity-checked; the manifest gets ``offload_marker_id``).

Why k of m (default 2 of 8): the demo SLM's per-step error counts are bimodal (of 13,501 training steps, 70.5%
had no wrong sample of 8, the rest spread up to 8 of 8); 2 of 8 marks 19.1% of the steps, which hold 88% of all
wrong samples, while a step the SLM gets wrong 5% of the time is marked with probability 0.06 and one it gets
wrong 30% of the time with probability 0.74. k = 1 would mark 29.5% of the steps, a third of them on a single
wrong sample in eight. Samples start from the correct prefix because that is the context the marker is trained in.

Seeded throughout (problems, samples, batches; the initialisation is the source SLM itself), one torch thread by
default, budgets are step counts: a rebuild gives the same weights. The annotation is kept beside the weights
(``span_annotation.json``, keyed by the source's weights and the sampling settings), so a rebuild that changes
only the fine-tune skips it. ``probe``: the offload decision trains the marker's output row alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.finetune import encode_problem, finetune_loop, load_slm, lr_at, pad_batch, save_fp16  # noqa: F401
from models.span_marker import (IGNORE, choose_marker_id, marker_record, split_steps, step_end_ids, step_starts,
                                substitute_labels, write_marker_file)
from models.task import Problem, sample_problems

RECIPE_FILE = "span_recipe.json"
ANNOTATION_FILE = "span_annotation.json"  # per problem, per step: wrong samples (reused by a rebuild)
DEFAULT_SOURCE = Path(__file__).resolve().parent / "demo_pair" / "slm"


@dataclass(frozen=True)
class SpanSpec:
    """Annotation rule and fine-tuning budget (the defaults are the recorded build's)."""

    problems: int = 3000  # training-split problems annotated (every one becomes an SFT row)
    samples: int = 8  # m: samples of each step at T=1
    min_wrong: int = 2  # k: a step is hard when at least k of its m samples are wrong
    steps: int = 600  # optimizer steps
    batch: int = 32  # rows per step over the task's ids
    full_batch: int = 8  # rows per step in the full-softmax phase
    restricted_share: float = 0.75  # share of the steps with logits over the task's ids and the marker only
    lr: float = 1e-3
    weight_decay: float = 0.0  # a short fine-tune from trained weights: no pull towards zero
    constant_share: float = 0.5  # constant LR, then linear decay to zero
    marker_weight: float = 1.0  # weight of the offload decision's loss against the next-token loss
    probe: bool = False  # True: the decision trains the marker's output row only (a probe on the hidden state)
    max_step_tokens: int = 16  # sampled tokens per step at most (the longest step has ~10)
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_wrong <= self.samples:
            raise ValueError(f"min_wrong must be in 1..samples ({self.samples}), got {self.min_wrong}")


@dataclass
class Annotation:
    """One problem's correct ids and, per step, how many of the m samples got it wrong."""

    problem: Problem
    prompt_ids: list[int]  # BOS + prompt
    solution_ids: list[int]  # correct solution + EOS
    wrong: list[int]  # per step (``split_steps`` order)

    def hard_starts(self, min_wrong: int, ends: frozenset[int]) -> list[int]:
        starts = step_starts(self.solution_ids, ends)
        return [s for s, w in zip(starts, self.wrong) if w >= min_wrong]


# -- annotation ----------------------------------------------------------------------------------------
def left_pad(prefixes: list[list[int]], pad_id: int):
    """[B, L] ids, attention mask and position ids of left-padded ``prefixes`` (positions count real tokens)."""
    import torch

    width = max(len(p) for p in prefixes)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prefixes])  # [B, L]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes])  # [B, L]
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def sample_continuations(model, prefixes: list[list[int]], stop_ids: frozenset[int], max_new: int,
                         generator, pad_id: int) -> list[list[int]]:
    """One T=1 sample (full softmax) per prefix, each until a stop id (kept) or ``max_new`` tokens.

    Left-padded batch with a KV cache; positions count real tokens only, so padding changes nothing.
    """
    import torch

    ids, mask, positions = left_pad(prefixes, pad_id)
    stops = torch.tensor(sorted(stop_ids))
    out = torch.empty(len(prefixes), 0, dtype=torch.long)  # [B, t]
    done = torch.zeros(len(prefixes), dtype=torch.bool)  # [B]
    past = None
    with torch.inference_mode():
        for _ in range(max_new):
            res = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                        use_cache=True, logits_to_keep=1)
            token = draw(res.logits[:, -1].float(), generator)  # [B]
            token = torch.where(done, torch.full_like(token, pad_id), token)
            out = torch.cat([out, token[:, None]], 1)
            done |= torch.isin(token, stops)
            if bool(done.all()):
                break
            past, ids = res.past_key_values, token[:, None]
            mask = torch.cat([mask, torch.ones(len(prefixes), 1, dtype=mask.dtype)], 1)
            positions = positions[:, -1:] + 1
    return [_until_stop(row.tolist(), stop_ids) for row in out]


def draw(logits, generator):
    """One id per row from softmax(``logits``) [B, V] (T=1, full vocabulary) by inverse CDF: exact up to float32
    rounding of the cumulative sums, and ~10x cheaper than torch.multinomial over 32k ids on CPU."""
    import torch

    cdf = torch.softmax(logits, -1).cumsum(-1)  # [B, V]
    u = torch.rand(len(logits), 1, generator=generator) * cdf[:, -1:]  # [B, 1]
    return torch.searchsorted(cdf, u)[:, 0].clamp(max=logits.shape[-1] - 1)  # [B]


def _until_stop(row: list[int], stop_ids: frozenset[int]) -> list[int]:
    """A sampled row cut after its first stop id."""
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[: i + 1]
    return row


def step_jobs(tokenizer, problems: list[Problem], ends: frozenset[int]) -> tuple[list[tuple], list[Annotation]]:
    """Every (problem index, step index, correct prefix, correct step) to sample, and empty annotations."""
    jobs, annotations = [], []
    for index, problem in enumerate(problems):
        prompt, solution = encode_problem(tokenizer, problem)
        steps = split_steps(solution, ends)
        annotations.append(Annotation(problem, prompt, solution, [0] * len(steps)))
        start = 0
        for k, step in enumerate(steps):
            jobs.append((index, k, prompt + solution[:start], step))
            start += len(step)
    return jobs, annotations


def annotate(model, tokenizer, problems: list[Problem], samples: int, max_step_tokens: int, seed: int,
             batch_rows: int = 512, progress: bool = True) -> list[Annotation]:
    """Count, for every step of every problem, the samples (of ``samples`` at T=1, drawn from the correct
    prefix) whose text differs from the correct step's text."""
    import torch
    from tqdm import tqdm

    ends = step_end_ids(tokenizer)
    stops = ends | {tokenizer.eos_token_id}
    jobs, annotations = step_jobs(tokenizer, problems, ends)
    # each step repeated m times; sorted by the correct step's length so a batch's rows stop at about the same time
    rows = sorted((job for job in jobs for _ in range(samples)), key=lambda job: (len(job[3]), len(job[2])))
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    for i in tqdm(range(0, len(rows), batch_rows), desc="annotate (T=1 step samples)", unit="batch",
                  disable=not progress, mininterval=2):
        chunk = rows[i : i + batch_rows]
        drawn = sample_continuations(model, [r[2] for r in chunk], stops, max_step_tokens, generator,
                                     tokenizer.pad_token_id)
        for (index, k, _, correct), got in zip(chunk, drawn):
            annotations[index].wrong[k] += int(tokenizer.decode(got) != tokenizer.decode(correct))
    return annotations


def annotation_summary(annotations: list[Annotation], spec: SpanSpec, ends: frozenset[int]) -> dict:
    """Counts that justify the rule: the spread of per-step error counts and how many steps are marked."""
    wrong = [w for a in annotations for w in a.wrong]
    histogram = np.bincount(wrong, minlength=spec.samples + 1).tolist()
    marked = [len(a.hard_starts(spec.min_wrong, ends)) for a in annotations]
    in_hard = sum(w for w in wrong if w >= spec.min_wrong)
    return {
        "problems": len(annotations), "steps": len(wrong), "samples_per_step": spec.samples,
        "wrong_histogram": histogram,  # [steps with 0 wrong samples, 1, ..., m]
        "step_error_rate": float(np.mean(wrong)) / spec.samples,
        "hard_steps": int(sum(marked)), "hard_step_share": float(sum(marked)) / len(wrong),
        "wrong_in_hard_share": in_hard / max(1, sum(wrong)),  # the share of all wrong samples the hard steps hold
        "problems_unmarked": int(sum(m == 0 for m in marked)),
    }


# -- SFT data ------------------------------------------------------------------------------------------
def sft_rows(annotations: list[Annotation], min_wrong: int, marker_id: int,
             ends: frozenset[int]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per problem: the correct text, labels substituted at hard steps' first tokens."""
    rows = []
    for a in annotations:
        ids = a.prompt_ids + a.solution_ids
        rows.append((ids, substitute_labels(ids, len(a.prompt_ids), a.hard_starts(min_wrong, ends), marker_id)))
    return rows


def plain_rows(annotations: list[Annotation]) -> list[tuple[list[int], list[int]]]:
    """The same rows with no substitution: the control fine-tune (same data, budget and batches, no marker)."""
    return [(a.prompt_ids + a.solution_ids, substitute_labels(a.prompt_ids + a.solution_ids, len(a.prompt_ids), [], 0))
            for a in annotations]


def correct_targets(rows: list[tuple[list[int], list[int]]], width: int):
    """[B, L] the correct next token at every position (IGNORE where no loss), ignoring substitutions."""
    import torch

    out = torch.full((len(rows), width), IGNORE)
    for r, (ids, labels) in enumerate(rows):
        for t, label in enumerate(labels):
            if label != IGNORE:
                out[r, t] = ids[t + 1]
    return out


def sft_loss(model, rows, marker_id: int, pad_id: int, marker_weight: float = 1.0, head_ids=None,
             probe: bool = False):
    """The substituted labels' loss, factored as the SLM's distribution is: p(marker) and p(x | not marker).

    At every solution position, mean over positions:
    - *decision*: binary cross-entropy of offloading here (target 1 where the label is the marker, else 0) on
      z_marker - logsumexp(z_others), the others' logsumexp held constant (detached): moving the marker's
      logit must not reshape the others. Without that, the plain cross-entropy towards the marker pushes each
      other id down by its own probability, the correct id most, and the SLM loses the very steps it marks
      (measured on the demo SLM: 0.44 nats on the correct first token of hard steps and 81.4% alone, against
      0.20 nats and 88.8% with this loss and 92-93% for the control fine-tune without the marker). The
      decision still trains the hidden state, which costs that remaining skill; ``probe`` trains the marker's
      row alone (0.0001 nats, 93.4% alone, a less precise marker);
    - *conditional*: cross-entropy of the correct token with the marker masked out, which is what the SLM
      draws from when it keeps the step (and all it draws from when nobody can take a span).
    Where no label is the marker this is the plain cross-entropy up to the detached part of its marker term.

    ``head_ids`` [n] (sorted, holding every label and the marker): logits over those ids only, the cheap phase;
    None: the full 32k softmax, which also keeps every other id's probability down."""
    import torch

    ids, mask, labels = pad_batch(rows, pad_id)
    keep = labels != IGNORE  # [B, L]
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[keep]  # [M, H]
    offload = (labels[keep] == marker_id).float()  # [M]
    correct = correct_targets(rows, ids.shape[1])[keep]  # [M]
    if head_ids is None:
        logits, column = model.lm_head(hidden), marker_id  # [M, V]
    else:
        logits = hidden @ model.lm_head.weight[head_ids].T  # [M, n]
        correct, column = _index_in(head_ids, correct), int(_index_in(head_ids, torch.tensor([marker_id]))[0])
    marker_logit = None
    if probe:  # the decision trains the marker's row alone, reading the hidden state as it is
        marker_logit = hidden.detach() @ model.lm_head.weight[marker_id]  # [M]
    return factored_loss(logits, column, correct, offload, marker_weight, marker_logit)


def factored_loss(logits, column: int, correct, offload, marker_weight: float = 1.0, marker_logit=None):
    """``sft_loss`` on logits [M, n]: the marker's column, the correct ids [M] (columns), offload targets [M]
    (1.0 where the label is the marker); ``marker_logit`` [M] replaces the marker's column in the decision."""
    import torch
    import torch.nn.functional as F

    others = logits.clone()
    others[:, column] = float("-inf")  # [M, n]: the distribution with the marker masked out
    marker_logit = logits[:, column] if marker_logit is None else marker_logit
    margin = marker_logit - torch.logsumexp(others, -1).detach()  # [M]: log-odds of the marker
    decision = F.binary_cross_entropy_with_logits(margin, offload)
    return marker_weight * decision + F.cross_entropy(others, correct)


def _index_in(sorted_ids, values):
    """Positions of ``values`` in the sorted id list ``sorted_ids`` (every value is in it)."""
    import torch

    return torch.searchsorted(sorted_ids, values)


def head_ids_of(rows, marker_id: int):
    """[n] the sorted ids that can be a target (the solutions' tokens) and the marker: the cheap phase's head."""
    import torch

    ids = {t for row_ids, labels in rows for t, label in zip(row_ids[1:], labels) if label != IGNORE}
    return torch.tensor(sorted(ids | {marker_id}))


def finetune(model, rows, marker_id: int, pad_id: int, spec: SpanSpec, progress: bool = True) -> dict:
    """AdamW over random batches of ``rows`` (seeded): logits over the task's ids and the marker for the first
    ``restricted_share`` of the steps, then the full 32k softmax on ``full_batch`` rows (as models/train.py
    does: cheap learning first, real tails at the end); returns the training record."""
    head_ids = head_ids_of(rows, marker_id)

    def batch_loss(batch, restricted: bool):
        return sft_loss(model, batch, marker_id, pad_id, spec.marker_weight, head_ids if restricted else None,
                        spec.probe)

    record = finetune_loop(model, rows, spec, batch_loss, "fine-tune span SLM", progress)
    return {"train_seconds": record["train_seconds"], "final_loss": record["final_loss"], "head_ids": len(head_ids)}


# -- the annotation, kept beside the weights ------------------------------------------------------------
def annotation_key(spec: SpanSpec, source: Path) -> dict:
    """What the annotation depends on: a rebuild with the same key reuses it (only the fine-tune reruns)."""
    weights = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(source).glob("*.safetensors"))))
    return {"source": str(source), "weights_sha256": weights.hexdigest(), "problems": spec.problems,
            "samples": spec.samples, "max_step_tokens": spec.max_step_tokens, "seed": spec.seed}


def cached_annotations(out: Path, model, tokenizer, spec: SpanSpec, source: Path,
                       progress: bool = True) -> tuple[list[Annotation], float]:
    """The annotations of ``spec`` (from ``out/span_annotation.json`` when its key matches, else sampled and
    written there) and the seconds the sampling took."""
    path, key = out / ANNOTATION_FILE, annotation_key(spec, source)
    problems = sample_problems(spec.problems, "train", seed=spec.seed)
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("key") == key:
        annotations = [Annotation(p, *encode_problem(tokenizer, p), w) for p, w in zip(problems, saved["wrong"])]
        return annotations, saved["seconds"]
    t0 = time.perf_counter()
    annotations = annotate(model, tokenizer, problems, spec.samples, spec.max_step_tokens, spec.seed,
                           progress=progress)
    seconds = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "seconds": seconds, "wrong": [a.wrong for a in annotations]}) + "\n")
    return annotations, seconds


# -- the whole build -----------------------------------------------------------------------------------
def save_span_slm(model, tokenizer, out: Path, record: dict) -> None:
    """fp16 weights (as the demo pair is stored), tokenizer, marker file, recipe."""
    save_plain(model, tokenizer, out, record)
    write_marker_file(out, record["marker"])


def build_span_slm(out: Path, spec: SpanSpec = SpanSpec(), source: Path = DEFAULT_SOURCE, threads: int = 1,
                   control_out: Path | None = None, progress: bool = True) -> dict:
    """Annotate, build the SFT rows, fine-tune a copy of ``source`` and save it to ``out``; with ``control_out``,
    also fine-tune another copy on the same rows without substitution (no marker). Returns the record."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tokenizer = load_slm(source)
    marker_id = choose_marker_id(tokenizer)
    ends = step_end_ids(tokenizer)
    annotations, annotate_seconds = cached_annotations(Path(out), model, tokenizer, spec, source, progress)
    training = finetune(model, sft_rows(annotations, spec.min_wrong, marker_id, ends), marker_id,
                        tokenizer.pad_token_id, spec, progress=progress)
    record = {
        "source": str(source), "spec": asdict(spec), "marker": marker_record(tokenizer, marker_id),
        "annotation": annotation_summary(annotations, spec, ends), "annotate_seconds": annotate_seconds,
        **training, "threads": threads, "load_average_after": list(os.getloadavg()),
        "scope": "the SFT stage of SplitReason only; its RL stage is not implemented",
    }
    save_span_slm(model, tokenizer, Path(out), record)
    if control_out is not None:
        control, _ = load_slm(source)
        record["control"] = finetune(control, plain_rows(annotations), marker_id, tokenizer.pad_token_id, spec,
                                     progress=progress)
        save_plain(control, tokenizer, Path(control_out), {
            **record["control"], "spec": asdict(spec),
            "what": "control: the same fine-tune (rows, loss, budget, batches) with no label substituted"})
    record["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (Path(out) / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def save_plain(model, tokenizer, out: Path, record: dict) -> None:
    """A control copy: fp16 weights, tokenizer and its recipe, no marker file."""
    save_fp16(model, tokenizer, out)
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
