"""The verifier's model side: the large model, per-session context and KV cache, and one verify step.

Per session the cloud keeps the agreed token ids (``context``), its epoch, and a ``DynamicCache``
covering all of them but the last. Each Verify appends the edge's pending ids and runs ONE forward pass
over the uncached tail (last agreed token + pending ids) and the block's drafts but the last, whose last
rows are q at the block's positions (protocol v2: a block of one is a single verified token); ``q``
is formed there with the session's sampling settings through the same function the edge uses.
Logits are sliced to the tokenizer's id space N in the forward itself (``_forward``), before anything
else sees them: the model's padding rows past N can never be sampled, resampled or reported.
Model calls run on one worker thread, one at a time; sessions only wait on each other there.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from cloud.attention import attn_implementation
from cloud.rejection import verify_draft
from core.sampling import SamplingSettings, next_token, probabilities
from proto.distribution import Compressed, CodecSpec
from proto.fingerprint import check_logit_width, id_space, tokenizer_hash


@dataclass
class SessionState:
    """One generation session on the verifier."""

    settings: SamplingSettings
    codec: CodecSpec
    seed: int  # the Open's seed, or fresh entropy when it gave none
    context: list[int]  # every token both sides agree on: prompt + generated
    cache: DynamicCache = field(default_factory=DynamicCache)
    cached: int = 0  # positions of ``context`` already in ``cache``
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    epoch: int = 0  # a rejection ends the epoch; a Verify drafted in an older one is stale
    verifies: int = 0
    accepted: int = 0  # drafts accepted, over all blocks
    report_target_prob: bool = False  # Verdicts carry q(draft) (calibration runs ask for it)


@dataclass(frozen=True)
class VerifyOutcome:
    accepted: bool  # every draft of the block
    token: int  # the resampled token at the first rejection, or the last draft when all were accepted
    target_probs: list[float]  # q(draft) per decided position: what calibration needs for beta
    accepted_count: int  # the longest accepted prefix of the block
    queue_seconds: float = 0.0  # waiting for the model worker (behind other sessions' forwards)


def _drop_uncommitted(state: SessionState) -> None:
    """Crop the session's cache back to ``state.cached`` positions. A sliding-window layer that has already
    dropped its oldest positions cannot be cropped: the cache is then rebuilt by prefill from the agreed
    ids at the next Verify (the verifier keeps them for exactly this)."""
    try:
        state.cache.crop(state.cached)
    except ValueError:
        state.cache, state.cached = DynamicCache(), 0


class VerifierModel:
    """The large model and the operations sessions need: open, verify, generate."""

    def __init__(self, source: str, device: str = "cpu", threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        attn = attn_implementation(AutoConfig.from_pretrained(source))  # eager where sdpa would drop soft-capping
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                          attn_implementation=attn).eval().to(device)
        self.device = device
        self.logit_width = int(self.model.get_output_embeddings().weight.shape[0])  # recorded, never compared
        self.id_space = id_space(self.tokenizer)  # N: every logit row is sliced to it, every id checked against it
        check_logit_width(self.logit_width, self.id_space, f"the verifier's model {source}")
        self.fingerprint = {"tokenizer_hash": tokenizer_hash(self.tokenizer), "id_space": self.id_space,
                            "logit_width": self.logit_width}
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 4096))
        # One model worker thread runs every forward: forwards never interleave, and the per-thread state
        # of torch's CPU kernels exists once, not once per gRPC handler thread that ever verified.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def open(self, prompt_ids: list[int], settings: SamplingSettings, codec: CodecSpec,
             seed: int | None, epoch: int = 0) -> SessionState:
        seed = secrets.randbits(63) if seed is None else seed
        return SessionState(settings, codec, seed, list(prompt_ids), epoch=epoch)

    def _logits_last(self, cache: DynamicCache, new_ids: list[int], rows: int = 1) -> tuple[np.ndarray, float]:
        """One forward pass over ``new_ids`` after ``cache``, on the model worker: (logits [rows, N] of the last
        ``rows`` positions, seconds spent waiting for the worker before the forward started)."""
        return self._worker.submit(self._forward, cache, new_ids, rows, time.perf_counter()).result()

    def _forward(self, cache: DynamicCache, new_ids: list[int], rows: int, t_submitted: float):
        queued = time.perf_counter() - t_submitted
        ids = torch.tensor([new_ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.logits[0, -rows:, : self.id_space].float().cpu().numpy(), queued  # [rows, N]: no padding row

    def verify(self, state: SessionState, pending: list[int], block: list[tuple[int, Compressed]]) -> VerifyOutcome:
        """Append ``pending``, then decide the block's drafted positions in order (multi-token speculative
        sampling): accept the longest prefix, resample at the first rejection, exactly.

        One forward covers the uncached tail, the pending ids and every draft but the last: its last
        ``len(block)`` rows are q at the block's positions. After a rejection at block index j the drafts
        past j never happened: the cache is cropped back to the agreed context and the epoch ends.
        """
        state.context.extend(pending)
        drafts = [token for token, _ in block]
        logits, queued = self._logits_last(state.cache, state.context[state.cached:] + drafts[:-1], rows=len(block))
        start = len(state.context)  # the first drafted position
        target_probs, accepted_count, final = [], 0, drafts[-1]
        for j, (draft, p_tilde) in enumerate(block):
            q = probabilities(logits[j], state.settings)  # [N], the edge's own rule
            # The randomness of a position depends only on (seed, position), never on the session's history of
            # calls or on how positions were grouped into blocks: an edge that reconnects and replays its tokens,
            # or sends its drafts one by one instead of as a block, gets the same verdicts.
            rng = np.random.default_rng([state.seed, start + j])
            accepted, token = verify_draft(draft, p_tilde.dense(self.id_space), q, rng, state.settings.greedy)
            target_probs.append(float(q[draft]))
            state.context.append(token)  # agreed; fed with the next Verify's tail
            if not accepted:
                final = token
                state.epoch += 1
                break
            accepted_count += 1
        outcome = VerifyOutcome(accepted_count == len(block), final, target_probs, accepted_count, queued)
        state.cached = len(state.context) - 1  # the cache holds every agreed token but the last
        if state.cache.get_seq_length() > state.cached:  # drafts past a rejection were cached by the forward
            _drop_uncommitted(state)
        state.verifies += 1
        state.accepted += outcome.accepted_count
        return outcome

    def generate(self, prompt_ids: list[int], settings: SamplingSettings, seed: int | None,
                 max_new_tokens: int, stop_ids: set[int]) -> Iterator[int]:
        """The large model's own tokens (cloud-only baseline), one forward per token."""
        rng, cache = np.random.default_rng(seed), DynamicCache()
        logits = self._logits_last(cache, list(prompt_ids))[0][-1]  # [N]
        for i in range(max_new_tokens):
            token = next_token(logits, settings, rng)
            yield token
            if token in stop_ids or i + 1 == max_new_tokens:
                return
            logits = self._logits_last(cache, [token])[0][-1]
