"""The verifier's model side: the large model, per-session context and KV cache, and one verify step.

Per session the cloud keeps the agreed token ids (``context``) and a ``DynamicCache`` covering all of
them but the last. Each Verify appends the edge's pending ids and runs ONE forward pass over the
uncached tail (last agreed token + pending ids), whose last position is the one being verified; ``q``
is formed there with the session's sampling settings through the same function the edge uses.
Logits are sliced to the tokenizer's id space N in the forward itself (``_forward``), before anything
else sees them: the model's padding rows past N can never be sampled, resampled or reported.
Model calls run on one worker thread, one at a time; sessions only wait on each other there.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

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
    verifies: int = 0
    accepted: int = 0
    report_target_prob: bool = False  # Verdicts carry q(draft) (calibration runs ask for it)


@dataclass(frozen=True)
class VerifyOutcome:
    accepted: bool
    token: int
    target_prob: float  # q(draft): what calibration needs for beta = max(0, 1 - q(x)/p~(x))


class VerifierModel:
    """The large model and the operations sessions need: open, verify, generate."""

    def __init__(self, source: str, device: str = "cpu", threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval().to(device)
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
             seed: int | None) -> SessionState:
        seed = secrets.randbits(63) if seed is None else seed
        return SessionState(settings, codec, seed, list(prompt_ids))

    def _logits_last(self, cache: DynamicCache, new_ids: list[int]) -> np.ndarray:
        """One forward pass over ``new_ids`` after ``cache``, on the model worker; logits [N] of the last
        position."""
        return self._worker.submit(self._forward, cache, new_ids).result()

    def _forward(self, cache: DynamicCache, new_ids: list[int]) -> np.ndarray:
        ids = torch.tensor([new_ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.logits[0, -1, : self.id_space].float().cpu().numpy()  # [N]: padding rows never leave here

    def verify(self, state: SessionState, pending: list[int], draft: int, p_tilde: Compressed) -> VerifyOutcome:
        """Append ``pending``, form q at the next position, accept ``draft`` or resample (exactly)."""
        state.context.extend(pending)
        logits = self._logits_last(state.cache, state.context[state.cached :])
        state.cached = len(state.context)
        q = probabilities(logits, state.settings)  # [N], the edge's own rule
        # The randomness of a position depends only on (seed, position), never on the session's history of
        # calls: an edge that reconnects and replays its tokens gets the same verdicts as if nothing broke.
        rng = np.random.default_rng([state.seed, len(state.context)])
        accepted, token = verify_draft(draft, p_tilde.dense(self.id_space), q, rng, state.settings.greedy)
        state.context.append(token)  # agreed; fed with the next Verify's tail
        state.verifies += 1
        state.accepted += accepted
        return VerifyOutcome(accepted, token, float(q[draft]))

    def generate(self, prompt_ids: list[int], settings: SamplingSettings, seed: int | None,
                 max_new_tokens: int, stop_ids: set[int]) -> Iterator[int]:
        """The large model's own tokens (cloud-only baseline), one forward per token."""
        rng, cache = np.random.default_rng(seed), DynamicCache()
        logits = self._logits_last(cache, list(prompt_ids))
        for i in range(max_new_tokens):
            token = next_token(logits, settings, rng)
            yield token
            if token in stop_ids or i + 1 == max_new_tokens:
                return
            logits = self._logits_last(cache, [token])
