"""Fine-tuning a copy of a trained SLM on task rows: the pieces the span SLM (``models/span_slm.py``) and the
distilled SLM (``models/distill.py``) share.

- ``load_slm`` / ``save_fp16``: fp32 for training, fp16 on disk (as the demo pair is stored);
- ``encode_problem`` / ``pad_batch``: a problem as (input ids, labels) rows, tokenized as models/train.py does;
- ``finetune_loop``: AdamW over seeded random batches of rows, ``batch`` rows per step in the first
  ``restricted_share`` of the steps (the caller's loss computes logits over the task's ids only: cheap learning
  first), then ``full_batch`` rows with the full 32k softmax (real tails at the end), as models/train.py does;
  constant learning rate, then linear decay to zero (``lr_at``); the optimizer step is models/train.py's.

A spec is any object with the fields ``finetune_loop`` reads: steps, batch, full_batch, restricted_share, lr,
weight_decay, constant_share, seed (``SpanSpec``, ``DistillSpec``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from models.span_marker import IGNORE
from models.task import Problem


def load_slm(folder: str | Path):
    """The SLM in fp32 for training or sampling, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model, tokenizer


def save_fp16(model, tokenizer, out: Path) -> None:
    """fp16 weights (as the demo pair is stored, and evaluated as stored) and the tokenizer in ``out``."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def encode_problem(tokenizer, problem: Problem) -> tuple[list[int], list[int]]:
    """(BOS + prompt ids, solution ids + EOS), tokenized as train.py does (prompt and solution separately)."""
    prompt = tokenizer(problem.prompt, add_special_tokens=True)["input_ids"]
    solution = tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, solution


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded [B, L] inputs, attention mask and labels (IGNORE on padding)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])
    return ids, mask, labels


def lr_at(step: int, spec) -> float:
    """Constant for ``constant_share`` of the steps, then linear decay to zero."""
    start = int(spec.constant_share * spec.steps)
    if step < start:
        return spec.lr
    return spec.lr * max(0.0, (spec.steps - step) / max(1, spec.steps - start))


def finetune_loop(model, rows, spec, batch_loss: Callable, desc: str, progress: bool = True) -> dict:
    """Train ``model`` in place for ``spec.steps`` steps; ``batch_loss(batch, restricted)`` is the loss of a list
    of rows, over the task's ids when ``restricted`` else over the full softmax. Returns the time, the final
    loss (mean of the last 25 steps) and every step's loss."""
    import torch
    from tqdm import tqdm

    from models.train import optimizer_step

    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)  # the batches: the same rows in the same order for every loss
    restricted_steps = int(spec.restricted_share * spec.steps)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(spec.steps), desc=desc, disable=not progress, mininterval=2)
    for step in bar:
        restricted = step < restricted_steps
        batch = [rows[i] for i in rng.integers(0, len(rows), size=spec.batch if restricted else spec.full_batch)]
        loss = batch_loss(batch, restricted)
        optimizer_step(opt, model, loss, lr_at(step, spec))
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}")
    bar.close()
    model.eval()
    return {"train_seconds": round(time.perf_counter() - t0, 1), "final_loss": float(np.mean(losses[-25:])),
            "losses": losses}
