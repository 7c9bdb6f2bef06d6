"""Held-out task accuracy of a PyTorch causal LM: batched greedy decoding with transformers `generate`."""

from __future__ import annotations

from models.task import MAX_SOLUTION_TOKENS, Problem, held_out_problems, is_correct


def generate_solutions(model, tokenizer, prompts: list[str], batch_size: int = 125) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches, stop at EOS)."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
            gen = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=MAX_SOLUTION_TOKENS,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def task_accuracy(model, tokenizer, problems: list[Problem] | None = None) -> float:
    """Share of held-out problems whose generated final answer is exactly right."""
    problems = problems if problems is not None else held_out_problems()
    solutions = generate_solutions(model, tokenizer, [p.prompt for p in problems])
    return sum(is_correct(p, s) for p, s in zip(problems, solutions)) / len(problems)


def evaluate_dir(model_dir: str, n: int = 500) -> float:
    """Accuracy of the model saved in ``model_dir`` (loaded in fp32, as the verifier runs it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return task_accuracy(model, tokenizer, held_out_problems(n))
