"""A coarse trace generation (spans and judged steps, ``edge/coarse.py``) turned into what a simulated device
replays (``engine._coarse``).

The span/step loop is stop-and-wait: the SLM drafts, now and then one Verify goes up (a bare span request, a
judged step, or a block of drafted positions) and the loop waits for its Verdict, then feeds what it settled to
the SLM in one forward and drafts on. The trace records that sequence as it happened (``Generation.coarse``);
the replay cuts it into segments, each the edge's work up to a round trip and the round trip itself:

- the edge's work: the previous verdict's prefill (``prefill_s``), the drafts since (their ``slm_step_s``,
  dropped drafts included: their compute was spent) and the Verify's ``encode_s``: one delay;
- the round trip: the Verify's bytes up the uplink (a Verify above the smallest message limit first waits for
  Opened, as the edge does), the verifier's forwards one after the other, each a job of the simulator's
  verifier (``trace.coarse_forwards``: a block or judged step is one forward over the uncached, pending and
  drafted ids; a span of k tokens k forwards, the first over what is uncached, then one token each; a rejected
  step is its judging forward plus its regenerated span), so each forward queues and batches with other
  sessions' as the engine's do, then the Verdict's bytes down (+ the gRPC stacks' software latency).

Only time comes from the model; which drafts are kept, what goes up and what comes back are the trace's.
Per-token latency (the same definition as the token loop's: from the start of a token's draft to its commit):
a span mode's kept draft commits as it is drafted; a step mode's drafts commit when their step is decided (at
its Verdict, or at its last draft when the step did not go up); the LLM's tokens (a span, a regenerated step, a
block's resampled token) commit when their Verdict arrives, counted from the start of the first draft the
Verify decided (the span's trigger, the step's first draft, the block's first position). A generation's first
token counts from the start of the generation. A generation cut at ``tokens`` keeps whole round trips (the
kept drafts of a span mode are cut at the token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simulate.compute import waits_for_opened
from simulate.framing import Framing
from simulate.trace import Generation


@dataclass(frozen=True)
class Round:
    """One Verify -> Verdict round trip of a coarse generation."""

    up_wire: int  # link bytes up
    up_grpc: int  # the trace's gRPC bytes
    tails: tuple[int, ...]  # the verifier's forwards, tokens each feeds
    down_wire: int  # link bytes of the Verdict
    wait_s: float  # the recorded round trip (the recorded replay)
    waits_opened: bool  # large enough to wait for Opened when Opened has not arrived
    sent: int  # positions sent for checking


@dataclass(frozen=True)
class Segment:
    """The edge's work up to a round trip (or the generation's end), then the round trip."""

    busy_s: float  # prefill of the previous verdict's tokens + the drafts + the Verify's encode
    static_latency: np.ndarray  # [a] latencies of tokens committed without waiting for the verdict
    first_static: int  # index in static_latency of the generation's first draft (segment 0), else -1
    verdict_start: np.ndarray  # [b] offsets from the segment's start of the draft starts of the tokens the verdict commits
    round: Round | None
    text: int  # text tokens it adds


@dataclass(frozen=True)
class CoarseScript:
    tokens: int
    open_s: float
    head_s: float
    segments: tuple[Segment, ...]
    open_up: tuple[int, int]  # (link bytes, gRPC bytes)
    open_down: int
    close_up: tuple[int, int]
    waits_opened: bool
    correct: bool | None = None
    conditioned_prompt: int = 0  # > 0: a conditioned SLM's Open, the verifier prefills these tokens before Opened
    open_wait_s: float = 0.0  # the recorded wait for that Opened (the recorded replay's)
    mode: str = field(default="coarse", init=False)


def _offsets(pre: float, compute: np.ndarray) -> np.ndarray:
    """[k] start of each draft from the segment's start (after the prefill ``pre``)."""
    return pre + np.concatenate([[0.0], np.cumsum(compute)[:-1]]) if len(compute) else np.zeros(0)


def build_coarse_script(g: Generation, compute: np.ndarray, head_s: float, framing: Framing, speed: float = 1.0,
                        tokens: int | None = None) -> CoarseScript:
    """The replay of coarse generation ``g``; ``compute`` [D] is the edge's time per draft (drafting order),
    ``speed`` divides the recorded encode and prefill times; cut at ``tokens`` text tokens."""
    c = g.coarse
    n = g.tokens if tokens is None else min(tokens, g.tokens)
    comp = np.asarray(compute, dtype=float)
    bounds = [int(a) for a in c.after] + [len(comp)]
    segments, text, prev = [], 0, 0
    for j, end in enumerate(bounds):
        has_round = j < c.rounds
        pre = float(c.prefill_s[j - 1]) / speed if j else 0.0
        cc = comp[prev:end]
        kept, dstep, dsent = c.kept[prev:end], c.draft_step[prev:end], c.draft_sent[prev:end]
        off = _offsets(pre, cc)
        ends = off + cc
        decided = int(c.step[j]) if has_round else -2
        held = kept & (dstep >= 0) & (dstep == decided)  # drafts of the step this Verify decides
        static = kept & ~held
        commit = ends.copy()  # span modes: final as drafted; an undecided step's drafts: at the step's last draft
        for s in set(dstep[static & (dstep >= 0)].tolist()):
            commit[dstep == s] = ends[dstep == s].max()
        llm = int(c.llm[j]) if has_round else 0
        first_sent = int(np.argmax(dsent)) if dsent.any() else 0
        need = n - text
        seg_text = int(kept.sum()) + llm
        rnd = None
        if has_round:
            grpc = int(c.up_bytes[j])
            rnd = Round(framing.wire(grpc), grpc, tuple(c.tails[j]), framing.wire(int(c.down_bytes[j]), up=False),
                        float(c.wait_s[j]), waits_for_opened(grpc), int(c.sent[j]))
        busy = pre + float(cc.sum()) + (float(c.encode_s[j]) / speed if has_round else 0.0)
        if tokens is not None and seg_text > need:
            # a cut generation: drafts final as drafted, before anything of this round trip, cut at the token
            k = np.flatnonzero(kept)
            if len(k) >= need and not (dsent[:k[need - 1] + 1].any() or (dstep[k[:need]] >= 0).any()):
                last = int(k[need - 1]) + 1
                cc, off, static, commit = cc[:last], off[:last], static[:last], commit[:last]
                held, llm, rnd, seg_text = held[:last] & False, 0, None, need
                busy = pre + float(cc.sum())
        first = 0 if j == 0 and len(static) and static[0] else -1  # the first draft, committed as drafted
        llm_start = off[first_sent] if llm and len(off) else pre  # the first draft the Verify decided
        segments.append(Segment(busy, (commit - off)[static], first, np.concatenate([off[held], np.full(llm, llm_start)]),
                                rnd, seg_text))
        text += seg_text
        prev = end
        if tokens is not None and text >= n:
            break
    rounds = [s.round for s in segments if s.round is not None]
    close = g.close_up if rounds else 0  # a session that never verified half-closes without a Close message
    return CoarseScript(n, float(g.open_s or 0.0), float(head_s), tuple(segments),
                        (framing.wire(g.open_up, first_of_call=True), g.open_up),
                        framing.wire(g.open_down, first_of_call=True, up=False), (framing.wire(close), close),
                        any(r.waits_opened for r in rounds), g.correct,
                        conditioned_prompt=g.prompt_tokens if g.conditioned else 0, open_wait_s=g.open_wait_s)
