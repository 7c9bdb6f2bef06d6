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

With ``trace``, a generation is written as the simulator replays it (``proto/trace.py``, mode ``coarse``):
the open line, a token line per SLM draft and a span/step/block line per round trip, in the order they
happened, then the close line. The lines are kept in memory and written at the end, as the token loop does.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TextIO

import numpy as np

from edge.client import VerdictResult
from edge.hybrid import (HybridConfig, Opening, SessionOpener, Streams, Verifier, conditioning_layer, draft_step,
                         open_while_prefilling)
from edge.model import EdgeModel
from edge.uncertainty import get_estimator
from proto import hybrid_pb2 as pb
from proto import trace as tr
from proto.payload import encode
from proto.trace import RoundTripRecord, TokenRecord

SPAN_MODES = ("span-uncertainty", "span-learned")
STEP_MODES = ("step-judge", "step-exact")
MODES = SPAN_MODES + STEP_MODES


@dataclass(frozen=True)
class CoarseConfig:
    mode: str
    hybrid: HybridConfig  # sampling settings, codec, estimator, threshold (trigger / gate / first sent), budget
    step_end_ids: frozenset[int]  # ids that end a step (the demo task: ';' and '#'); EOS ends one too
    step_end_chars: str = ""  # when step_end_ids are the ids holding these characters: Open sends these instead
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
    open_wait_s: float = 0.0  # a prompt-conditioned SLM's wait for Opened before its prefill (edge/hybrid.py)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds else 0.0


class _CoarseLoop:
    """One generation: the agreed tokens, the ids kept since the last Verify, the SLM fed up to the text."""

    def __init__(self, model: EdgeModel, prompt: list[int], config: CoarseConfig, seed: int | None,
                 verifier: Verifier | None, logits: np.ndarray, result: CoarseResult, record: bool = False):
        self.model, self.prompt, self.config, self.verifier, self.result = model, prompt, config, verifier, result
        self.hc = config.hybrid
        self.estimator = get_estimator(self.hc.estimator, k=self.hc.samples)
        self.streams = Streams(seed)
        self.tokens = result.token_ids
        self.pending: list[int] = []
        self.epoch = 0
        self.logits = logits  # the SLM's logits after the fed text
        self.ends = step_ends(config, model)
        # trace: (TokenRecord, step index) per draft and RoundTripRecord per Verify, in order (None: not recording)
        self.log: list | None = [] if record else None
        self.drafts: list[TokenRecord] = []  # the drafts' records, in drafting order
        self.step_index: int | None = None  # the drafted step under way (step modes)
        self.owed: RoundTripRecord | None = None  # the last round trip, until the SLM has fed what it settled

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
        t0 = time.perf_counter()
        self.feed()
        t1 = time.perf_counter()
        logits = self.logits
        if self.config.marker_id is not None and (self.verifier is None or self.verifier.lost):
            logits = logits.copy()  # no one to offload to: the marker is not a token of the text
            logits[self.config.marker_id] = -np.inf
        d = draft_step(logits, self.hc, self.estimator, self.streams, self.position())
        if self.log is not None:
            start = t0
            if self.owed is not None:  # the feed was the SLM's forward over what the last verdict settled
                self.owed.prefill_s, self.owed, start = t1 - t0, None, t1
            record = TokenRecord.kept(self.position(), d.token, d.u, d.p_tilde.prob(d.token), time.perf_counter() - start)
            self.drafts.append(record)
            self.log.append((record, self.step_index))
        return d

    def mark_sent(self, count: int) -> list[TokenRecord]:
        """The last ``count`` drafts went up in the next message (trace only); their records."""
        if self.log is None:
            return []
        records = self.drafts[len(self.drafts) - count:]
        for record in records:
            record.sent = True
        return records

    def ask(self, block=(), span: pb.SpanRequest | None = None, step: pb.StepToJudge | None = None,
            t_build: float | None = None) -> VerdictResult:
        """One round trip: Verify{pending, ...} and its verdict (``t_build``: when building the message began)."""
        start = self.position() - len(self.pending)
        t_submit = time.perf_counter()
        self.verifier.submit(list(self.pending), start, self.epoch, list(block), span=span, step=step)
        t_sent = time.perf_counter()
        verdict = self.verifier.next_verdict()
        if self.log is not None:
            self.log_round_trip(verdict, start, len(self.pending), block, step, t_sent - (t_build or t_submit))
        self.pending = []
        self.epoch = verdict.epoch
        self.result.round_trips += 1
        return verdict

    def log_round_trip(self, verdict: VerdictResult, start: int, pending: int, block, step, encode_s: float) -> None:
        kind = "block" if block else "step" if step is not None else "span"
        record = RoundTripRecord(
            kind, start + pending, pending, verdict.uplink_bytes, verdict.downlink_bytes, verdict.server_seconds,
            verdict.queue_seconds, verdict.wait_seconds, encode_s, 0.0, len(verdict.span_ids),
            step_tokens=len(step.step_ids) if kind == "step" else 0, block_tokens=len(block),
            accepted=(verdict.step_accepted if kind == "step" else verdict.accepted if kind == "block" else None),
            accepted_count=verdict.accepted_count if kind == "block" else 0, step_index=self.step_index)
        self.log.append(record)
        self.owed = record

    def write_trace(self, trace: TextIO, opening: Opening, open_bytes: tuple[int, int]) -> None:
        """The generation's lines (``proto/trace.py``, mode coarse; local when no verifier was there);
        ``open_bytes``: the session's (uplink, downlink) bytes right after it opened."""
        hc, r, v = self.hc, self.result, self.verifier
        tr.write_open(trace, len(self.prompt), hc.estimator, asdict(hc.codec), hc.threshold, hc.settings.temperature,
                      v is not None, *open_bytes, mode="coarse" if v is not None else None, open_s=opening.open_s,
                      collab=self.config.mode, conditioning_layer=conditioning_layer(self.model) if v else None,
                      open_wait_s=opening.open_wait_s)
        for entry in self.log:
            if isinstance(entry, RoundTripRecord):
                tr.write_round_trip(trace, entry)
            elif v is not None:
                tr.write_coarse_token(trace, *entry)
            else:
                tr.write_token(trace, entry[0])
        tr.write_close(trace, len(r.token_ids), r.uplink_bytes, r.downlink_bytes, r.seconds, r.text)

    def span_request(self) -> pb.SpanRequest:
        """A span up to the step's end: no stop ids of its own, the session's (Open.span_stop_ids) apply."""
        room = self.hc.max_new_tokens - len(self.tokens)
        return pb.SpanRequest(max_tokens=max(1, min(self.config.span_max_tokens, room)))

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
        for record in self.mark_sent(1):
            record.rolled_back = True  # the trigger's draft is dropped
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
        if self.log is not None:
            self.step_index = 0 if self.step_index is None else self.step_index + 1
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
        t_build = time.perf_counter()
        del self.tokens[start:]  # the step goes up as ids; the pending ids before it stay pending
        step = pb.StepToJudge(step_ids=[d.token for d in drafts], score=self.config.judge_score,
                              threshold=self.config.judge_threshold, regenerate=self.span_request())
        records = self.mark_sent(len(drafts))
        verdict = self.ask(step=step, t_build=t_build)
        for record in records:
            record.accepted, record.rolled_back = verdict.step_accepted, not verdict.step_accepted
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
        t_build = time.perf_counter()
        self.pending.extend(d.token for d in drafts[:first])
        sent = drafts[first:]
        del self.tokens[start + first:]
        block = [(d.token, encode(d.p_tilde, self.hc.codec, self.model.runtime.id_space)) for d in sent]
        records = self.mark_sent(len(sent))
        verdict = self.ask(block=block, t_build=t_build)
        for k, record in enumerate(records):  # the accepted prefix stays; the rest was not drafted after all
            record.accepted, record.rolled_back = k < verdict.accepted_count, k >= verdict.accepted_count
            if k == verdict.accepted_count and not verdict.accepted:
                record.returned = verdict.token
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


def step_ends(config: CoarseConfig, model: EdgeModel) -> set[int]:
    """Where a step, and so a span, ends: the task's step-end ids and EOS."""
    return set(config.step_end_ids) | set(model.eos_ids)


def with_span_stops(open_session: SessionOpener | None, config: CoarseConfig, model: EdgeModel) -> SessionOpener | None:
    """The opener, declaring the step ends once in Open instead of in every span request: as characters
    (``span_stop_chars``, the verifier derives the same ids from the shared tokenizer) when the config has them,
    else as ids; a real vocabulary holds hundreds of ids with ';' or '#' in them (154 in the demo BPE)."""
    if open_session is None:
        return None
    ids = step_ends(config, model) - (config.step_end_ids if config.step_end_chars else set())

    def open_with_stops(prompt_ids, settings, codec, **open_args):
        return open_session(prompt_ids, settings, codec, span_stop_ids=sorted(ids),
                            span_stop_chars=config.step_end_chars, **open_args)
    return open_with_stops


def generate_coarse(model: EdgeModel, prompt_ids: list[int], config: CoarseConfig, seed: int | None = None,
                    open_session: SessionOpener | None = None, trace: TextIO | None = None) -> CoarseResult:
    """Generate with one of the span or step modes through the session ``open_session`` opens (SLM alone
    without one); with ``trace``, write the generation's trace lines (mode coarse) when it ends."""
    result = CoarseResult(list(prompt_ids))
    t_start = time.perf_counter()
    opening = open_while_prefilling(model, prompt_ids, config.hybrid,
                                    with_span_stops(open_session, config, model))
    verifier, result.open_wait_s = opening.verifier, opening.open_wait_s
    open_bytes = (verifier.uplink_bytes, verifier.downlink_bytes) if verifier is not None else (0, 0)
    loop = _CoarseLoop(model, list(prompt_ids), config, seed, verifier, opening.logits, result,
                       record=trace is not None)
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
    if trace is not None:
        loop.write_trace(trace, opening, open_bytes)
    return result

