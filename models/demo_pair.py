"""Build the offline demo pair: tokenizer, LLM and SLM training, fp16 save, held-out evaluation."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from models.evaluate import evaluate_dir
from models.tokenizer import build_tokenizer, save_tokenizer

LLM_TARGET, SLM_MAX, MIN_GAP = 0.95, 0.80, 0.15
COMMITTED_PAIR = Path(__file__).resolve().parent / "demo_pair"


def build_demo_pair(out: Path, steps: int | None = None, n_eval: int = 500) -> dict:
    """Rebuild the pair into ``out`` (``out/llm``, ``out/slm``, ``out/recipe.json``); returns the recipe."""
    from models.train import train_pair  # torch is imported only by the training workers

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok_dir = out / "tokenizer"
    save_tokenizer(build_tokenizer(), tok_dir)
    records = train_pair(tok_dir, out, steps=steps)
    for name in ("llm", "slm"):
        records[name]["heldout_accuracy"] = evaluate_dir(str(out / name), n=n_eval)
    recipe = {
        "models": records,
        "n_heldout": n_eval,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "python": platform.python_version(),
        "command": "python -m models demo-pair --out " + str(out),
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def check_targets(recipe: dict) -> list[str]:
    """The targets the pair must hit to be meaningful; returns the ones missed (empty = all met)."""
    llm = recipe["models"]["llm"]["heldout_accuracy"]
    slm = recipe["models"]["slm"]["heldout_accuracy"]
    missed = []
    if llm < LLM_TARGET:
        missed.append(f"LLM accuracy {llm:.3f} < {LLM_TARGET}")
    if slm > SLM_MAX:
        missed.append(f"SLM accuracy {slm:.3f} > {SLM_MAX}")
    if llm - slm < MIN_GAP:
        missed.append(f"LLM-SLM gap {llm - slm:.3f} < {MIN_GAP}")
    return missed
