"""SLM-only generation on the edge: the decode loop, with its step time split into ORT forward vs the rest."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edge.model import EdgeModel
from core.sampling import SamplingSettings, next_token


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stopped_at_eos: bool = False
    stopped_at_context_limit: bool = False  # the model's max positions were reached before max_new_tokens
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # all decode steps, wall time
    forward_seconds: float = 0.0  # ORT forward time within the decode steps

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens per second of decoding (prefill excluded)."""
        return len(self.token_ids) / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def loop_overhead(self) -> float:
        """Share of decode time spent outside the ORT forward (sampling, feeds, bookkeeping)."""
        return 1.0 - self.forward_seconds / self.decode_seconds if self.decode_seconds else 0.0


def generate_local(
    model: EdgeModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    settings: SamplingSettings = SamplingSettings(),
    seed: int | None = None,
    stop_at_eos: bool = True,
    conditioning: np.ndarray | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` with the SLM alone.

    ``conditioning`` [len(prompt_ids), dim]: a prompt-conditioned SLM's LLM hidden-state rows for the prompt
    (``model.conditioning`` says which); None = zeros, the SLM alone without a verifier. Generated positions are
    never conditioned (decode feeds zeros)."""
    rng = np.random.default_rng(seed)
    result = GenerationResult(list(prompt_ids))
    t0 = time.perf_counter()
    logits = model.runtime.prefill(prompt_ids, conditioning=conditioning)
    result.prefill_seconds = time.perf_counter() - t0
    t_decode = time.perf_counter()
    for step in range(max_new_tokens):
        token = next_token(logits, settings, rng)  # a draw from probabilities(logits, settings); greedy = argmax
        result.token_ids.append(token)
        if stop_at_eos and token in model.eos_ids:
            result.stopped_at_eos = True
            break
        if step + 1 == max_new_tokens:
            break  # the last token needs no forward pass of its own
        if model.context_full(len(prompt_ids) + len(result.token_ids)):
            result.stopped_at_context_limit = True
            break
        t_fwd = time.perf_counter()
        logits = model.runtime.decode(token)
        result.forward_seconds += time.perf_counter() - t_fwd
    result.decode_seconds = time.perf_counter() - t_decode
    result.text = model.decode(result.token_ids)
    return result
