"""Span- and step-level collaboration on the same edge, the same wire and the same verifier (stop-and-wait).

Modes (``CoarseConfig.mode``):

- ``span-uncertainty``: the SLM drafts alone; where a position's uncertainty u exceeds the threshold, its
  draft is dropped and the verifier continues with the LLM's own tokens until the end of the current step
  (a step-end id) or a token budget (``Verify.span``, SplitReason-style offload with a heuristic trigger).
- ``span-learned``: the same offload, triggered when the SLM itself draws the offload marker id (an SLM
  fine-tuned to emit it before the steps it tends to get wrong, as SplitReason does). The marker never
  enters the text; without a verifier it is masked out of the SLM's distribution.
- ``step-judge``: the SLM drafts a whole step and sends its ids (no distributions: the cheapest uplink);
  the verifier scores it with the LLM and keeps it or regenerates it (``Verify.step``, SpecReason-style).
  ``gated``: a step goes up only when one of its positions had u above the threshold. INEXACT by design.
- ``step-exact``: the SLM drafts a whole step; from its first position with u above the threshold to the
  step's end every position's p~ goes up as one block: multi-token speculative sampling, exact (each
  position's send decision depends only on the positions before it, never on its own draft). At a
  rejection the rest of the step is drafted again after the LLM's token.

Randomness is keyed by (seed, position) as in the token-level loop, so runs are reproducible. The SLM's
cache follows the agreed text: tokens that came from the verifier are fed in one forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edge.client import VerdictResult
from edge.hybrid import HybridConfig, SessionOpener, Streams, Verifier, draft_step, open_while_prefilling
from edge.model import EdgeModel
from edge.uncertainty import get_estimator
from proto import hybrid_pb2 as pb
from proto.payload import encode

SPAN_MODES = ("span-uncertainty", "span-learned")
STEP_MODES = ("step-judge", "step-exact")
MODES = SPAN_MODES + STEP_MODES


@dataclass(frozen=True)
class CoarseConfig:
    mode: str
    hybrid: HybridConfig  # sampling settings, codec, estimator, threshold (trigger / gate / first sent), budget
    step_end_ids: frozenset[int]  # ids that end a step (the demo task: ';' and '#'); EOS ends one too
    span_max_tokens: int = 32  # LLM tokens per span or regenerated step
    step_max_tokens: int = 32  # SLM tokens per drafted step
    judge_score: str = "min"  # step-judge: "min" | "mean" of q(x)/max q
    judge_threshold: float = 0.5  # step-judge: accept a step scoring at least this
    gated: bool = False  # step-judge: send only steps with an uncertain position
    marker_id: int | None = None  # span-learned: the offload marker's id

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.mode == "span-learned" and self.marker_id is None:
            raise ValueError("span-learned needs the SLM's offload marker id (its manifest's offload_marker_id)")
        if self.span_max_tokens < 1 or self.step_max_tokens < 1:
            raise ValueError("span_max_tokens and step_max_tokens must be >= 1")

    @property
    def exact(self) -> bool:
        """Only step-exact keeps the LLM's distribution; the others keep unverified SLM text by design."""
        return self.mode == "step-exact"


@dataclass
class CoarseResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    llm_tokens: int = 0  # tokens the LLM chose: span tokens, regenerated steps, resampled tokens
    round_trips: int = 0  # Verify messages
    sent_positions: int = 0  # positions sent for checking: p~ in a block, an id of a judged step, a span's trigger
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    seconds: float = 0.0
    stopped_at_eos: bool = False

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds else 0.0


class _CoarseLoop:
    """One generation: the agreed tokens, the ids kept since the last Verify, the SLM fed up to the text."""

    def __init__(self, model: EdgeModel, prompt: list[int], config: CoarseConfig, seed: int | None,
                 verifier: Verifier | None, logits: np.ndarray, result: CoarseResult):
        self.model, self.prompt, self.config, self.verifier, self.result = model, prompt, config, verifier, result
        self.hc = config.hybrid
        self.estimator = get_estimator(self.hc.estimator, k=self.hc.samples)
        self.streams = Streams(seed)
        self.tokens = result.token_ids
        self.pending: list[int] = []
        self.epoch = 0
        self.logits = logits  # the SLM's logits after the fed text
        self.ends = set(config.step_end_ids) | set(model.eos_ids)

    # -- shared steps ------------------------------------------------------------------------------------
    def position(self) -> int:
        return len(self.prompt) + len(self.tokens)

    def done(self) -> bool:
        return (len(self.tokens) >= self.hc.max_new_tokens or bool(self.tokens and self.tokens[-1] in self.model.eos_ids)
                or self.model.context_full(self.position()))

    def feed(self) -> None:
        """Bring the SLM's cache up to the text (one forward for everything not fed yet)."""
        fed = self.model.runtime.cache.length
        if fed < self.position():
            self.logits = self.model.runtime.forward((self.prompt + self.tokens)[fed:])[-1]

    def rewind(self, length: int) -> None:
        """Drop the SLM's cache past ``length`` positions (tokens the verifier replaced)."""
        if self.model.runtime.cache.length > length:
            self.model.runtime.truncate(length)

    def draft(self):
        self.feed()
        logits = self.logits
        if self.config.marker_id is not None and (self.verifier is None or self.verifier.lost):
            logits = logits.copy()  # no one to offload to: the marker is not a token of the text
            logits[self.config.marker_id] = -np.inf
        return draft_step(logits, self.hc, self.estimator, self.streams, self.position())

    def ask(self, block=(), span: pb.SpanRequest | None = None, step: pb.StepToJudge | None = None) -> VerdictResult:
        """One round trip: Verify{pending, ...} and its verdict."""
        start = self.position() - len(self.pending)
        self.verifier.submit(list(self.pending), start, self.epoch, list(block), span=span, step=step)
        verdict = self.verifier.next_verdict()
        self.pending = []
        self.epoch = verdict.epoch
        self.result.round_trips += 1
        return verdict

    def span_request(self) -> pb.SpanRequest:
        room = self.hc.max_new_tokens - len(self.tokens)
        return pb.SpanRequest(stop_ids=sorted(self.ends), max_tokens=max(1, min(self.config.span_max_tokens, room)))

    def online(self) -> bool:
        return self.verifier is not None and not self.verifier.lost

    # -- span modes --------------------------------------------------------------------------------------
    def span_step(self) -> None:
        d = self.draft()
        trigger = (d.token == self.config.marker_id if self.config.mode == "span-learned"
                   else d.u > self.hc.threshold)
        if not (trigger and self.online()):
            self.tokens.append(d.token)
            self.pending.append(d.token)
            return
        verdict = self.ask(span=self.span_request())  # the draft is dropped: the LLM writes from here
        self.result.sent_positions += 1  # the trigger position
        self.tokens.extend(verdict.span_ids)
        self.result.llm_tokens += len(verdict.span_ids)

    # -- step modes --------------------------------------------------------------------------------------
    def draft_a_step(self) -> list:
        """Draft positions until a step-end id, EOS, the step budget or the generation budget."""
        drafts = []
        while len(drafts) < self.config.step_max_tokens and not self.done():
            d = self.draft()
            drafts.append(d)
            self.tokens.append(d.token)
            if d.token in self.ends:
                break
        return drafts

    def step(self) -> None:
        start = len(self.tokens)
        drafts = self.draft_a_step()
        if self.config.mode == "step-judge":
            self.judge(start, drafts)
        else:
            self.verify_block(start, drafts)

    def judge(self, start: int, drafts: list) -> None:
        uncertain = any(d.u > self.hc.threshold for d in drafts)
        if not self.online() or (self.config.gated and not uncertain):
            self.pending.extend(d.token for d in drafts)
            return
        del self.tokens[start:]  # the step goes up as ids; the pending ids before it stay pending
        step = pb.StepToJudge(step_ids=[d.token for d in drafts], score=self.config.judge_score,
                              threshold=self.config.judge_threshold, regenerate=self.span_request())
        verdict = self.ask(step=step)
        self.result.sent_positions += len(drafts)
        if verdict.step_accepted:
            self.tokens.extend(d.token for d in drafts)
            return
        self.rewind(len(self.prompt) + start)
        self.tokens.extend(verdict.span_ids)
        self.result.llm_tokens += len(verdict.span_ids)

    def verify_block(self, start: int, drafts: list) -> None:
        first = next((i for i, d in enumerate(drafts) if d.u > self.hc.threshold), None)
        if first is None or not self.online():
            self.pending.extend(d.token for d in drafts)
            return
        self.pending.extend(d.token for d in drafts[:first])
        sent = drafts[first:]
        del self.tokens[start + first:]
        block = [(d.token, encode(d.p_tilde, self.hc.codec, self.model.runtime.id_space)) for d in sent]
        verdict = self.ask(block=block)
        self.result.sent_positions += len(sent)
        kept = [d.token for d in sent[: verdict.accepted_count]]
        self.tokens.extend(kept)
        if not verdict.accepted:
            self.rewind(self.position())
            self.tokens.append(verdict.token)
            self.result.llm_tokens += 1

    def run(self) -> None:
        while not self.done():
            if self.config.mode in SPAN_MODES:
                self.span_step()
            else:
                self.step()


def generate_coarse(model: EdgeModel, prompt_ids: list[int], config: CoarseConfig, seed: int | None = None,
                    open_session: SessionOpener | None = None) -> CoarseResult:
    """Generate with one of the span or step modes through the session ``open_session`` opens (SLM alone
    without one)."""
    result = CoarseResult(list(prompt_ids))
    t_start = time.perf_counter()
    verifier, logits, _ = open_while_prefilling(model, prompt_ids, config.hybrid, open_session)
    loop = _CoarseLoop(model, list(prompt_ids), config, seed, verifier, logits, result)
    try:
        loop.run()
    finally:
        if verifier is not None:
            verifier.close()
    del result.token_ids[config.hybrid.max_new_tokens:]  # a span may end past the budget's last token
    if verifier is not None:
        result.uplink_bytes, result.downlink_bytes = verifier.uplink_bytes, verifier.downlink_bytes
    result.seconds = time.perf_counter() - t_start
    result.stopped_at_eos = bool(result.token_ids and result.token_ids[-1] in model.eos_ids)
    result.text = model.decode(result.token_ids)
    return result

