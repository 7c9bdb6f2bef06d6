"""The verifier's model side: the large model, per-session context and KV cache, and one verify step.

Per session the cloud keeps the agreed token ids (``context``), its epoch, and a KV cache covering all of
them but the last. Each Verify appends the edge's pending ids and asks for ONE forward over the uncached
tail (last agreed token + pending ids) and the block's drafts but the last, whose last rows are q at the
block's positions (protocol v2: a block of one is a single verified token); ``q`` is formed there with the
session's sampling settings through the same function the edge uses. Forwards of different sessions that
are ready together run as one batched forward (``cloud.batching``); a session's verdicts never depend on
its batch-mates. Logits are sliced to the tokenizer's id space N in the forward itself, before anything
else sees them: the model's padding rows past N can never be sampled, resampled or reported.
The cache is only a cache: under the KV budget it may be dropped between Verifies and is then rebuilt by
prefill from ``context`` (the tail of the next forward simply starts earlier).
A session that asks for prompt conditioning (``Open.conditioning_layer``) has its prompt prefilled at Open,
through the same worker, and gets one layer's hidden states of the prompt from that forward (``condition``).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from cloud.attention import attn_implementation
from cloud.batching import BatchingWorker, BatchStats
from cloud.conditioning import decoder_layer_count
from cloud.kvstore import HFSessionKV, KVBudget, SessionKV
from cloud.rejection import verify_draft
from cloud.validate import Span, Step
from core.cpus import model_threads
from core.sampling import SamplingSettings, next_token, probabilities, softmax
from proto.distribution import Compressed, CodecSpec
from core.stops import ids_containing
from proto.fingerprint import check_logit_width, id_space, tokenizer_hash


@dataclass
class SessionState:
    """One generation session on the verifier."""

    settings: SamplingSettings
    codec: CodecSpec
    seed: int  # the Open's seed, or fresh entropy when it gave none
    context: list[int]  # every token both sides agree on: prompt + generated
    cache: SessionKV | HFSessionKV  # covers a prefix of ``context`` (all of it but the last id after a Verify)
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    epoch: int = 0  # a rejection ends the epoch; a Verify drafted in an older one is stale
    verifies: int = 0
    accepted: int = 0  # drafts accepted, over all blocks
    report_target_prob: bool = False  # Verdicts carry q(draft) (calibration runs ask for it)
    span_stop_ids: frozenset[int] = frozenset()  # Open's: where a span without stop ids of its own ends


@dataclass(frozen=True)
class VerifyOutcome:
    accepted: bool  # every draft of the block
    token: int  # the resampled token at the first rejection, or the last draft when all were accepted
    target_probs: list[float]  # q(draft) per decided position: what calibration needs for beta
    accepted_count: int  # the longest accepted prefix of the block
    queue_seconds: float = 0.0  # waiting for the model worker (behind other sessions' forwards)
    span_ids: tuple[int, ...] = ()  # the LLM's own tokens: a requested span, or a judged step regenerated
    step_accepted: bool = False
    step_score: float = 0.0


class VerifierModel:
    """The large model and the operations sessions need: open, verify, generate, close.

    ``threads``: torch intra-op threads, 0 = the cores this process may use but one (``core.cpus``; torch's
    own default counts every core of the host and oversubscribes a shared one). ``batching=False`` runs every
    forward alone (the one-at-a-time engine, kept as the baseline). ``kv_budget_mb``: 0 = no budget.
    """

    def __init__(self, source: str, device: str = "cpu", threads: int = 0, batching: bool = True,
                 max_batch_tokens: int = 4096, kv_budget_mb: float = 0.0):
        self.threads = threads or model_threads()
        torch.set_num_threads(self.threads)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        config = AutoConfig.from_pretrained(source)
        attn = attn_implementation(config)  # eager where sdpa would drop soft-capping
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                          attn_implementation=attn).eval().to(device)
        self.device = device
        self.logit_width = int(self.model.get_output_embeddings().weight.shape[0])  # recorded, never compared
        self.id_space = id_space(self.tokenizer)  # N: every logit row is sliced to it, every id checked against it
        check_logit_width(self.logit_width, self.id_space, f"the verifier's model {source}")
        self.fingerprint = {"tokenizer_hash": tokenizer_hash(self.tokenizer), "id_space": self.id_space,
                            "logit_width": self.logit_width}
        self._stop_sets: dict[str, frozenset[int]] = {}  # span stop characters -> ids (Open.span_stop_chars)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 4096))
        # Prompt conditioning: the layers a session may ask for are 0..num_layers (0: none can, when the model has
        # no decoder layer list); each row of Opened.conditioning is hidden_size wide.
        self.num_layers = decoder_layer_count(self.model)
        self.hidden_size = int(self.model.get_input_embeddings().weight.shape[1])
        self.budget = KVBudget(int(kv_budget_mb * 2**20))
        self._kv_shape = _batched_kv_shape(self.model)  # None: sliding windows etc., one session at a time
        # One model thread runs every forward: forwards never interleave, and the per-thread state of torch's
        # CPU kernels exists once, not once per gRPC handler thread that ever verified.
        self._worker = BatchingWorker(self.model, self.id_space, device, self._kv_shape, max_batch_tokens, batching,
                                      self.budget)

    def stats(self) -> BatchStats:
        return self._worker.stats()

    def _new_cache(self) -> SessionKV | HFSessionKV:
        kv = SessionKV() if self._kv_shape is not None else HFSessionKV(self.model.config)
        self.budget.register(kv)
        return kv

    def ids_containing(self, chars: str) -> frozenset[int]:
        """The ids whose text (each decoded alone) holds any of ``chars``: a session's span stops given as
        characters. Decoding the vocabulary takes ~0.1 s per 32k ids, so each set is computed once."""
        if chars not in self._stop_sets:
            texts = self.tokenizer.batch_decode([[i] for i in range(self.id_space)], skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False)
            self._stop_sets[chars] = ids_containing(texts, chars)
        return self._stop_sets[chars]

    def open(self, prompt_ids: list[int], settings: SamplingSettings, codec: CodecSpec,
             seed: int | None, epoch: int = 0) -> SessionState:
        seed = secrets.randbits(63) if seed is None else seed
        return SessionState(settings, codec, seed, list(prompt_ids), self._new_cache(), epoch=epoch)

    def prefill(self, state: SessionState) -> None:
        """Cache the session's context but its last id now, instead of at its first Verify."""
        if state.cache.length < len(state.context) - 1:
            self._worker.logits(state.cache, state.context[:-1], rows=1)

    def condition(self, state: SessionState, layer: int) -> np.ndarray:
        """hidden_states[layer] of the session's whole prompt, [prompt_len, hidden_size] float32 (LLM-to-SLM
        conditioning), from a prefill of the prompt through the model worker, batched with whatever is ready. The
        cache is left covering the prompt but its last id, as after a Verify: the first Verify feeds that id."""
        if state.cache.length:
            raise RuntimeError("conditioning needs the prompt's first forward; this session's cache already holds "
                               f"{state.cache.length} positions")
        states, _ = self._worker.hidden_states(state.cache, state.context, layer)
        self._crop(state)
        return states

    def close(self, state: SessionState) -> None:
        """Free the session's cache (its ids go with the state)."""
        self.budget.unregister(state.cache)

    def verify(self, state: SessionState, pending: list[int], block: list[tuple[int, Compressed]],
               span: Span | None = None) -> VerifyOutcome:
        """Append ``pending``, then decide the block's drafted positions in order (multi-token speculative
        sampling): accept the longest prefix, resample at the first rejection, exactly; then, with ``span``,
        continue with the LLM's own tokens (an empty block: right after ``pending``).

        One forward covers the uncached tail, the pending ids and every draft but the last: its last
        ``len(block)`` rows are q at the block's positions. After a rejection at block index j the drafts
        past j never happened: the cache is cropped back to the agreed context and the epoch ends.
        """
        state.context.extend(pending)
        if not block:  # a bare span request
            state.verifies += 1
            return self._with_span(state, VerifyOutcome(True, 0, [], 0), span)
        drafts = [token for token, _ in block]
        logits, queued = self._worker.logits(state.cache, state.context + drafts[:-1], rows=len(block))
        start = len(state.context)  # the first drafted position
        target_probs, accepted_count, final = [], 0, drafts[-1]
        for j, (draft, p_tilde) in enumerate(block):
            q = probabilities(logits[j], state.settings)  # [N], the edge's own rule
            # The randomness of a position depends only on (seed, position), never on the session's history of
            # calls, on how positions were grouped into blocks or on which sessions shared the forward: an edge
            # that reconnects and replays its tokens, or sends its drafts one by one instead of as a block, gets
            # the same verdicts.
            rng = np.random.default_rng([state.seed, start + j])
            accepted, token = verify_draft(draft, p_tilde.dense(self.id_space), q, rng, state.settings.greedy)
            target_probs.append(float(q[draft]))
            state.context.append(token)  # agreed; fed with the next Verify's tail
            if not accepted:
                final = token
                state.epoch += 1
                break
            accepted_count += 1
        self._crop(state)
        state.verifies += 1
        state.accepted += accepted_count
        return self._with_span(state, VerifyOutcome(accepted_count == len(block), final, target_probs,
                                                    accepted_count, queued), span)

    def _crop(self, state: SessionState) -> None:
        """Drafts past a rejection (or a judged step's ids) were cached by the forward; the last agreed id is
        fed with the next forward."""
        with self.budget.lock:
            state.cache.crop(len(state.context) - 1)

    def _with_span(self, state: SessionState, outcome: VerifyOutcome, span: Span | None) -> VerifyOutcome:
        if span is None:
            return outcome
        tokens = self._continue(state, span)
        if tokens:
            state.epoch += 1  # the edge did not draft these: whatever it drafted past this point is stale
        return replace(outcome, span_ids=tuple(tokens))

    def _continue(self, state: SessionState, span: Span) -> list[int]:
        """The LLM's own tokens after the agreed context, one forward each (batched with other sessions), until
        a stop id, ``span.max_tokens`` or the context limit; each draw keyed by (seed, position) like a verdict,
        so a replayed span is the same span."""
        tokens = []
        while len(tokens) < span.max_tokens and len(state.context) < self.max_context:
            logits, _ = self._worker.logits(state.cache, state.context, rows=1)
            rng = np.random.default_rng([state.seed, len(state.context)])
            token = next_token(logits[-1], state.settings, rng)
            state.context.append(token)
            tokens.append(token)
            if token in span.stop_ids:
                break
        return tokens

    def judge(self, state: SessionState, pending: list[int], step: Step) -> VerifyOutcome:
        """Score a drafted step (ids only) with the LLM in one forward and accept it whole, or discard it and
        regenerate it as a span (step judging; INEXACT by design: a step the score accepts is kept whatever
        the LLM would have sampled). Score: min or mean over the step of q(x_t) / max q at t, q the LLM's
        softmax at temperature 1 (the session's own sampling settings do not enter the score)."""
        state.context.extend(pending)
        logits, queued = self._worker.logits(state.cache, state.context + step.ids[:-1], rows=len(step.ids))
        ratios = []
        for row, token in zip(logits, step.ids):
            q = softmax(row)
            ratios.append(float(q[token] / q.max()))
        score = min(ratios) if step.score == "min" else float(np.mean(ratios))
        state.verifies += 1
        if score >= step.threshold:
            state.context.extend(step.ids)
            self._crop(state)
            state.accepted += len(step.ids)
            return VerifyOutcome(True, step.ids[-1], [], len(step.ids), queued, step_accepted=True,
                                 step_score=score)
        self._crop(state)  # the step's ids were cached by the forward: they never happened
        state.epoch += 1  # the edge's step is discarded: whatever it drafted past it is stale
        return VerifyOutcome(False, 0, [], 0, queued, tuple(self._continue(state, step.regenerate)),
                             step_accepted=False, step_score=score)

    def generate(self, prompt_ids: list[int], settings: SamplingSettings, seed: int | None,
                 max_new_tokens: int, stop_ids: set[int]) -> Iterator[int]:
        """The large model's own tokens (cloud-only baseline): one forward per token, batched with whatever
        other sessions and generations are ready."""
        rng, ids, kv = np.random.default_rng(seed), list(prompt_ids), self._new_cache()
        try:
            for i in range(max_new_tokens):
                logits, _ = self._worker.logits(kv, ids, rows=1)
                token = next_token(logits[-1], settings, rng)
                ids.append(token)
                yield token
                if token in stop_ids:
                    return
        finally:
            self.budget.unregister(kv)


def _batched_kv_shape(model) -> tuple[int, int, int, torch.dtype] | None:
    """(layers, kv heads, head dim, dtype) when a one-token forward's cache is a plain stack of equal
    full-attention layers (the batched layout, ``cloud.kvstore.SessionKV``); None otherwise."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=model.device), past_key_values=cache,
              use_cache=True)
    layers = cache.layers
    if not layers or any(type(layer) is not DynamicLayer or layer.keys is None for layer in layers):
        return None
    shapes = {tuple(layer.keys.shape) for layer in layers} | {tuple(layer.values.shape) for layer in layers}
    if len(shapes) != 1:
        return None
    _, heads, _, dim = shapes.pop()
    return len(layers), heads, dim, layers[0].keys.dtype
