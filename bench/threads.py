"""Thread count vs forward time of the demo LLM (``verifier.threads`` in reports/bench.json).

torch's default intra-op thread count is the host's core count; on a shared or quota-limited host the
process gets fewer, and the oversubscribed threads spin and wait on each other. This times one
48-token forward (a session's first Verify) and one 16-row batched decode step at 1 thread, at the usable
cores but one (the verifier's default, ``core.cpus.model_threads``), at the usable cores and at 4x that
(what torch's default gives on a host whose cores are mostly someone else's), median over repeats, in
one process, one after the other.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from core.cpus import model_threads, usable_cpus

DEMO_LLM = Path("models/demo_pair/llm")


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm up: first-call allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run(repeats: int = 30, model_dir: Path = DEMO_LLM) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    context = torch.randint(4, 1000, (16, 48))
    with torch.inference_mode():
        out = model(context, use_cache=True)
    cache, step = out.past_key_values, torch.randint(4, 1000, (16, 1))
    cores = usable_cpus()
    rows = []
    for threads in sorted({1, model_threads(), cores, 4 * cores}):
        torch.set_num_threads(threads)

        def single():
            with torch.inference_mode():
                model(context[:1])

        def batch():
            with torch.inference_mode():
                model(step, past_key_values=cache, use_cache=False)

        rows.append({"threads": threads, "default": threads == model_threads(), "single_forward_ms": _median_ms(single, repeats),
                     "batch16_step_ms": _median_ms(batch, repeats)})
    torch.set_num_threads(model_threads())
    return {"usable_cores": cores, "torch_default_threads_on_this_host": os.cpu_count(), "rows": rows,
            "load_average": list(os.getloadavg()), "command": "python -m bench.threads"}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
