"""Train the demo LLM and SLM from scratch on CPU: seeded, both concurrently, one thread each.

Recipe (why each step is there):
- Packed rows of task text; loss only on solution tokens (the prompt is given at inference time).
- A 32,000-entry output layer dominates compute, so for the first ``restricted_share`` of the budget the
  logits are computed only over the token ids the task's solutions use (~20): the model learns the task
  at a fraction of the cost. The final phase uses the full 32k softmax with all weights trainable, which
  pushes the unused tokens' logits down so the distributions' tails are real, small probabilities
  (skipping it leaves tails of several percent, unusable for uncertainty and compression studies).
- Constant learning rate for ``constant_share`` of the budget, then linear decay to zero (held-out
  accuracy jumps during the decay).
- Budgets are step counts, not wall time, so a rebuild with the same seeds is the same computation.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from models.task import sample_problems


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and training budget of one model of the pair."""

    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    lr: float
    steps: int
    batch: int = 32
    seq_len: int = 96
    full_batch: int = 8  # rows per step in the full-softmax phase (32k logits per position are costly)
    restricted_share: float = 0.8
    constant_share: float = 0.7
    weight_decay: float = 0.01
    seed: int = 0


LLM_SPEC = ModelSpec("llm", layers=4, hidden=128, heads=4, ffn=384, lr=3e-3, steps=1500, seed=1)
SLM_SPEC = ModelSpec("slm", layers=2, hidden=64, heads=2, ffn=176, lr=5e-3, steps=1560, seed=2)


def llama_config(spec: ModelSpec, tokenizer):
    from transformers import LlamaConfig

    from proto.fingerprint import id_space

    return LlamaConfig(
        vocab_size=id_space(tokenizer),  # one logit row per id the tokenizer can produce: no padding rows
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,  # the embedding is most of the weights; tying halves the file
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def token_stream(tokenizer, n_problems: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training problems packed into one stream: ids [N] and a mask [N] marking solution tokens.

    Prompt and solution are tokenized separately; that equals tokenizing the whole text because the
    prompt ends in ':' and the solution starts with a digit (always two pre-tokens).
    """
    problems = sample_problems(n_problems, "train", seed)
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=True)["input_ids"]
    solutions = tokenizer([p.solution for p in problems], add_special_tokens=False)["input_ids"]
    ids, mask = [], []
    for prompt, solution in zip(prompts, solutions):
        sol = solution + [tokenizer.eos_token_id]
        ids += prompt + sol
        mask += [0] * len(prompt) + [1] * len(sol)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


def optimizer_step(opt, model, loss, lr: float) -> None:
    """One step at learning rate ``lr``: gradients of ``loss``, clipped to norm 1, applied."""
    import torch

    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def lr_at(step: int, spec: ModelSpec) -> float:
    """Constant, then linear decay to 0 over the last (1 - constant_share) of the budget."""
    start = int(spec.constant_share * spec.steps)
    if step < start:
        return spec.lr
    return spec.lr * max(0.0, (spec.steps - step) / max(1, spec.steps - start))


def train_one(spec: ModelSpec, tokenizer_dir: str, out_dir: str, position: int = 0) -> dict:
    """Train one model with one thread, save it (fp16 safetensors) and return its training record."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = LlamaForCausalLM(llama_config(spec, tokenizer))
    n_problems = max(2000, math.ceil(spec.steps * spec.batch * spec.seq_len / 30))
    ids, mask = token_stream(tokenizer, min(n_problems, 400_000), spec.seed)
    task_ids = torch.as_tensor(np.unique(ids[mask]))  # the ~20 ids a solution can contain
    remap = torch.full((len(tokenizer),), -1, dtype=torch.long)
    remap[task_ids] = torch.arange(len(task_ids))

    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    rng = np.random.default_rng(spec.seed)
    restricted_steps = int(spec.restricted_share * spec.steps)
    head = model.get_output_embeddings()
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(spec.steps), desc=f"train {spec.name}", position=position, leave=True, mininterval=2)
    for step in bar:
        restricted = step < restricted_steps
        rows = spec.batch if restricted else spec.full_batch
        starts = rng.integers(0, len(ids) - spec.seq_len - 1, size=rows)
        window = np.stack([ids[s : s + spec.seq_len + 1] for s in starts])
        wmask = np.stack([mask[s + 1 : s + spec.seq_len + 1] for s in starts])
        x = torch.as_tensor(window[:, :-1])
        y = torch.as_tensor(window[:, 1:])[torch.as_tensor(wmask)]  # targets at solution positions
        hidden = model.model(input_ids=x).last_hidden_state[torch.as_tensor(wmask)]  # [M, H]
        if restricted:
            logits = hidden @ head.weight[task_ids].T  # [M, n_task]
            loss = torch.nn.functional.cross_entropy(logits, remap[y])
        else:
            loss = torch.nn.functional.cross_entropy(head(hidden), y)  # [M, 32000]: real tails
        optimizer_step(opt, model, loss, lr_at(step, spec))
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    bar.close()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.float16).save_pretrained(out_dir)  # fp16: accuracy is re-measured on these weights
    tokenizer.save_pretrained(out_dir)
    return {
        "spec": asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "final_loss": float(np.mean(losses[-50:])),
    }


def _worker(spec: ModelSpec, tokenizer_dir: str, out_dir: str, position: int, queue) -> None:
    try:
        queue.put((spec.name, train_one(spec, tokenizer_dir, out_dir, position)))
    except BaseException as exc:  # surface the failure to the parent instead of hanging it
        queue.put((spec.name, {"error": repr(exc)}))
        raise


def train_pair(tokenizer_dir: Path, out: Path, steps: int | None = None) -> dict[str, dict]:
    """Train LLM and SLM concurrently in two processes (one thread each); returns their records."""
    specs = [LLM_SPEC, SLM_SPEC]
    if steps is not None:
        specs = [replace(s, steps=steps) for s in specs]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(spec, str(tokenizer_dir), str(out / spec.name), i, queue))
        for i, spec in enumerate(specs)
    ]
    for p in procs:
        p.start()
    records = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    failed = {k: v["error"] for k, v in records.items() if "error" in v}
    if failed:
        raise RuntimeError(f"training failed: {failed}")
    return records
