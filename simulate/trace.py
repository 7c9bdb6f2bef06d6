"""Load and validate the JSON-lines traces the real edge records; one ``Generation`` per open…close block.

The format is the contract in ``proto/trace.py`` (row definitions, writers and the field lists checked
here): ``hybrid`` generations (the edge loop with a verifier), ``local`` ones (SLM-only), ``stream``
ones (the cloud-only Generate baseline) and ``coarse`` ones (the span/step loop: SLM drafts and span,
step and block round trips in the order they happened, ``Generation.coarse``), each optionally followed by
a ``task`` line with the answer's correctness, so a run can report the trace's accuracy. Other line kinds
are refused: a trace is a contract, not free text.

Two generations of the hybrid format are read: traces of the protocol-v2 edge (``open_s`` on the open
line; ``encode_s``/``blocked_s`` per token; a pipelined one, ``lookahead`` > 0, also has rolled-back drafts)
and older stop-and-wait traces without those timers (``Generation.open_s`` is None), which the simulator
replays exactly as before. Rolled-back drafts are grouped into the chains the rejections discarded
(``Generation.chains``, see ``_assign_chains``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from proto.trace import (BLOCK_FIELDS, CLOSE_FIELDS, COARSE_TOKEN_FIELDS, KINDS, MODES, OPEN_FIELDS,
                         ROUND_TRIP_FIELDS, ROUND_TRIP_KINDS, SENT_TOKEN_FIELDS, STEP_FIELDS, STREAM_TOKEN_FIELDS,
                         TOKEN_FIELDS)

# gRPC bytes of a stale Verdict (seq, stale, epoch, server_seconds: tests check it against proto/hybrid.proto);
# the trace does not record them, the simulator sends one per stale Verify.
STALE_VERDICT_BYTES = 18


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file, line and field."""


def coarse_forwards(kind: str, uncached: int, pending: int, decided: int, span_tokens: int) -> tuple[list[int], int]:
    """The verifier engine's forwards for one span/step/block Verify (``cloud/engine.py``): (the tokens each
    forward feeds, the agreed ids left uncached after it). ``uncached``: agreed ids not in the session's KV cache
    before it (the prompt before the first forward; 1 after any, the last agreed id being fed with the next).

    - block of n drafted positions: one forward over the uncached ids, the pending ones and the drafts but the
      last (its last n rows are q at the drafted positions);
    - judged step of n ids: the same one forward (the step's ids are scored by their rows);
    - span of k tokens (a bare span request, or a rejected step regenerated): k forwards, the first over what is
      uncached (for a regenerated step: its last agreed id, the step being dropped from the cache), then one per
      token drawn."""
    left = uncached + pending
    tails = []
    if kind in ("block", "step"):
        tails.append(left + decided - 1)
        left = 1
    if span_tokens:
        tails += [left] + [1] * (span_tokens - 1)
        left = 1
    return tails, left


@dataclass
class CoarseLog:
    """A coarse generation (``edge/coarse.py``) as it happened: D SLM drafts and R round trips, in order."""

    kept: np.ndarray  # [D] bool: the draft is in the text
    draft_sent: np.ndarray  # [D] bool: the draft went up in the next message (block position, step id, span trigger)
    draft_step: np.ndarray  # [D] int: the drafted step it belongs to, -1 in span modes (final as drafted)
    kind: tuple[str, ...]  # [R] "span" | "step" | "block"
    after: np.ndarray  # [R] int: drafts made before the round trip
    up_bytes: np.ndarray  # [R] Verify gRPC bytes
    down_bytes: np.ndarray  # [R] Verdict gRPC bytes
    server_s: np.ndarray  # [R] the verifier's time for it (all its forwards)
    queue_s: np.ndarray  # [R] the part of server_s waiting for the model
    wait_s: np.ndarray  # [R] measured Verify -> Verdict round trip
    encode_s: np.ndarray  # [R] building and submitting the Verify
    prefill_s: np.ndarray  # [R] the SLM's forward over what its verdict settled
    sent: np.ndarray  # [R] int: positions sent for checking
    llm: np.ndarray  # [R] int: tokens of the text the LLM chose (span tokens, a block's resampled token)
    tails: tuple[tuple[int, ...], ...]  # [R] the verifier's forwards: tokens each feeds (``coarse_forwards``)
    step: np.ndarray  # [R] int: the drafted step it decides, -1 for spans

    @property
    def rounds(self) -> int:
        return len(self.kind)


@dataclass
class Generation:
    """One generation of a trace, as arrays over its tokens (T = tokens generated)."""

    mode: str  # "hybrid" | "local" | "stream"
    prompt_tokens: int
    open_up: int  # Open (or GenerateRequest) wire bytes, gRPC-level (protobuf + 5-byte prefix)
    open_down: int  # Opened wire bytes
    close_up: int  # Close wire bytes (0 when the session never verified)
    step_s: np.ndarray  # [T] edge compute per token (hybrid/local); chunk inter-arrival (stream)
    sent: np.ndarray  # [T] bool, a Verify was sent at this token
    up_bytes: np.ndarray  # [T] Verify wire bytes (0 when skipped)
    down_bytes: np.ndarray  # [T] Verdict / GenerateChunk wire bytes
    pending: np.ndarray  # [T] kept ids a Verify carried up
    server_s: np.ndarray  # [T] the verifier's own time for a Verify
    wait_s: np.ndarray  # [T] measured Verify -> Verdict round trip (send to the loop taking the verdict)
    seconds: float  # measured wall time of the generation (v2 traces: from before the Open, with prefill)
    correct: bool | None = None
    lookahead: int = 0  # tokens drafted past the oldest unresolved Verify (0 = stop-and-wait)
    open_s: float | None = None  # connecting + sending Open (v2 traces; None: an older trace, blocking handshake)
    encode_s: np.ndarray | None = None  # [T] encoding p~ + submitting the Verify (zeros when not recorded)
    blocked_s: np.ndarray | None = None  # [T] the loop's own wait for this verdict (zeros when not recorded)
    queue_s: np.ndarray | None = None  # [T] the verifier's wait for its model within server_s (zeros when not recorded)
    accepted: np.ndarray | None = None  # [T] bool, False where a sent draft was rejected (True elsewhere)
    rb_index: np.ndarray | None = None  # [R] index (position - prompt) of each rolled-back draft, trace order
    rb_step_s: np.ndarray | None = None  # [R] its SLM compute
    rb_encode_s: np.ndarray | None = None  # [R] its encode + submit time (> 0: its Verify went up, came back stale)
    chains: dict | None = None  # rejected index -> [L] rolled-back rows (into rb_*) it discarded, in drafting order
    stale_verifies: int = 0  # Verifies answered stale (all of them sent by rolled-back drafts)
    stale_up_bytes: int = 0  # their uplink gRPC bytes
    coarse: CoarseLog | None = None  # mode coarse: the drafts and round trips (``step_s`` is then [D], per draft)
    conditioned: bool = False  # a prompt-conditioned SLM: the verifier prefilled the prompt at Open, the edge waited
    open_wait_s: float = 0.0  # ... that wait for Opened, as recorded (replayed as Open up, a forward, Opened down)
    n_tokens: int | None = None  # mode coarse: tokens of the text (the drafts kept and the LLM's)

    def __post_init__(self):
        t = len(self.step_s)
        if self.encode_s is None:
            self.encode_s = np.zeros(t)
        if self.blocked_s is None:
            self.blocked_s = np.zeros(t)
        if self.queue_s is None:
            self.queue_s = np.zeros(t)
        if self.accepted is None:
            self.accepted = np.ones(t, dtype=bool)
        if self.rb_index is None:
            self.rb_index, self.rb_step_s, self.rb_encode_s = np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        if self.chains is None:
            self.chains = {}

    @property
    def tokens(self) -> int:
        return len(self.step_s) if self.n_tokens is None else self.n_tokens

    @property
    def rolled_back(self) -> int:
        return len(self.rb_index)

    @property
    def rb_sent(self) -> np.ndarray:
        """[R] bool: the rolled-back draft's Verify went up (the edge timed an encode + submit for it)."""
        return self.rb_encode_s > 0

    @property
    def stale_verify_bytes(self) -> float:
        """gRPC bytes of one stale Verify: the trace's mean, else its mean Verify (none went stale)."""
        if self.stale_verifies:
            return self.stale_up_bytes / self.stale_verifies
        return float(self.up_bytes[self.sent].mean()) if self.sent.any() else 0.0

    @property
    def untimed_s(self) -> float:
        """Edge time the per-token timers miss: the generation's wall time minus everything they measured.

        - older traces: wall time - per-token compute and Verify waits, i.e. the loop's own work between
          those timers (encoding p~, building the message, writing the trace line);
        - v2 traces: also minus ``open_s`` and ``encode_s``; what is left is the prompt's prefill beyond the
          Open (they overlap), the thread hand-offs around them and closing the session: per-generation work
          (measured on this loop: < 1 ms per generation between the per-token timers, 1-30 ms around them).
          Stop-and-wait: minus the round trips (``wait_s``, the loop waits through each); pipelined: minus
          the rolled-back drafts' compute and the loop's own waits (``blocked_s``; waits for a stale
          verdict are not recorded and stay in here).
        """
        if self.mode == "stream":
            return 0.0
        timed = float(self.step_s.sum() + self.encode_s.sum())
        if self.coarse is not None:  # stop-and-wait, each round trip's encode, wait and prefill timed
            c = self.coarse
            timed += float(c.encode_s.sum() + c.wait_s.sum() + c.prefill_s.sum())
        elif self.open_s is None or self.lookahead == 0:
            timed += float(self.wait_s.sum())
        else:
            timed += float(self.rb_step_s.sum() + self.rb_encode_s.sum() + self.blocked_s.sum())
        return max(0.0, self.seconds - (self.open_s or 0.0) - self.open_wait_s - timed)

    @property
    def head_s(self) -> float | None:
        """v2 traces: the edge's time before its first draft as the simulator replays it, ``open_s`` plus the
        untimed per-generation work (None for older traces, whose untimed work is spread over the tokens)."""
        return None if self.open_s is None else self.open_s + self.untimed_s

    def prefilled(self) -> np.ndarray:
        """[T] tokens the verifier's forward pass covers per Verify: the prompt and the pending ids on the
        first Verify (Open does no forward pass, but for a conditioned SLM's), afterwards the previous verdict's
        token plus pending."""
        out = self.pending + 1
        first = np.flatnonzero(self.sent)
        if len(first) and not self.conditioned:
            out = out.copy()
            out[first[0]] = self.prompt_tokens + self.pending[first[0]]
        return out


@dataclass
class Trace:
    """All generations of one trace file (one policy at one threshold)."""

    name: str
    path: str
    mode: str
    estimator: str
    codec: str
    threshold: float | None
    generations: list[Generation]

    @property
    def tokens(self) -> int:
        return sum(g.tokens for g in self.generations)

    @property
    def accuracy(self) -> float | None:
        marks = [g.correct for g in self.generations if g.correct is not None]
        return sum(marks) / len(marks) if marks and len(marks) == len(self.generations) else None

    @property
    def transmission_rate(self) -> float:
        """Positions sent for checking / tokens (a block counts each position, a judged step each id, a span its
        trigger)."""
        return sum(int(g.sent.sum()) + (int(g.coarse.sent.sum()) if g.coarse else 0)
                   for g in self.generations) / max(self.tokens, 1)

    @property
    def grpc_up_bytes(self) -> int:
        return sum(g.open_up + g.close_up + int(g.up_bytes.sum()) + g.stale_up_bytes
                   + (int(g.coarse.up_bytes.sum()) if g.coarse else 0) for g in self.generations)


def _num(row: dict, key: str, where: str, minimum: float = 0.0) -> float:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise TraceError(f"{where}: field '{key}' must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def _int(row: dict, key: str, where: str) -> int:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TraceError(f"{where}: field '{key}' must be an integer >= 0, got {value!r}")
    return value


def _threshold(value) -> float | None:
    if value is None:
        return None
    return float(value)  # "inf" / "-inf" are written as strings by the edge


def _require(row: dict, fields: tuple[str, ...], where: str) -> None:
    """TraceError naming the first contract field (``proto/trace.py``) that ``row`` lacks."""
    missing = [f for f in fields if f not in row]
    if missing:
        raise TraceError(f"{where}: field '{missing[0]}' is missing (a {row.get('kind')} line needs {', '.join(fields)})")


class _Builder:
    """Accumulates the lines of one generation, then checks and freezes them into a Generation."""

    def __init__(self, head: dict, where: str):
        self.mode = head.get("mode") or ("hybrid" if head.get("verifier") else "local")
        if self.mode not in MODES:
            raise TraceError(f"{where}: field 'mode' must be one of {', '.join(MODES)}, got {self.mode!r}")
        _require(head, OPEN_FIELDS, where)
        self.prompt_tokens = _int(head, "prompt_tokens", where)
        self.open_up = _int(head, "uplink_bytes", where)
        self.open_down = _int(head, "downlink_bytes", where)
        self.lookahead = _int(head, "lookahead", where) if "lookahead" in head else 0
        self.open_s = _num(head, "open_s", where) if "open_s" in head and self.mode != "stream" else None
        self.conditioned = head.get("conditioning_layer") is not None
        self.open_wait_s = _num(head, "open_wait_s", where) if self.conditioned else 0.0
        if self.lookahead and self.open_s is None and self.mode == "hybrid":
            raise TraceError(f"{where}: field 'open_s' is missing (a pipelined generation's replay needs the v2 "
                             "edge's timers)")
        if self.mode == "coarse":
            if self.open_s is None:
                raise TraceError(f"{where}: field 'open_s' is missing (a coarse generation needs the v2 edge's timers)")
            if self.lookahead:
                raise TraceError(f"{where}: field 'lookahead' must be 0 in a coarse generation (stop-and-wait)")
        self.drafts: list[tuple] = []  # coarse: (slm_step_s, kept, sent, step index) per draft
        self.rounds: list[tuple] = []  # coarse: per round trip, see round_trip
        # coarse: agreed ids the verifier has not fed yet (coarse_forwards); a conditioned Open prefilled all but one
        self.uncached = 1 if self.conditioned else self.prompt_tokens
        self.rows: list[tuple] = []
        self.extra: list[tuple] = []  # (encode_s, blocked_s, accepted) per token
        self.rolled: list[tuple] = []  # (index, slm_step_s, encode_s, where) per rolled-back draft

    def coarse_token(self, row: dict, where: str) -> None:
        _require(row, COARSE_TOKEN_FIELDS, where)
        flags = []
        for key in ("sent", "rolled_back"):
            if not isinstance(row[key], bool):
                raise TraceError(f"{where}: field '{key}' must be true or false, got {row[key]!r}")
            flags.append(row[key])
        step = row["step_index"]
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise TraceError(f"{where}: field 'step_index' must be null or an integer >= 0, got {step!r}")
        _int(row, "position", where)
        self.drafts.append((_num(row, "slm_step_s", where), not flags[1], flags[0], -1 if step is None else step))

    def round_trip(self, row: dict, where: str) -> None:
        """A coarse generation's span, step or block line: checked against the drafts it carried up."""
        kind = row["kind"]
        if self.mode != "coarse":
            raise TraceError(f"{where}: a {kind} line in a {self.mode} generation (only coarse ones have them)")
        _require(row, ROUND_TRIP_FIELDS + {"span": (), "step": STEP_FIELDS, "block": BLOCK_FIELDS}[kind], where)
        position, pending, up, down, span = (_int(row, k, where) for k in ("position", "pending", "bytes",
                                                                             "down_bytes", "span_tokens"))
        server, queue, wait, encode, prefill = (_num(row, k, where) for k in ("server_s", "queue_s", "wait_s",
                                                                             "encode_s", "prefill_s"))
        if up == 0:
            raise TraceError(f"{where}: field 'bytes' is 0 for a Verify")
        if queue > server:
            raise TraceError(f"{where}: field 'queue_s' ({queue}) is more than 'server_s' ({server}), which includes it")
        accepted = row.get("accepted")
        if kind != "span" and not isinstance(accepted, bool):
            raise TraceError(f"{where}: field 'accepted' must be true or false, got {accepted!r}")
        if kind == "span":
            decided, llm = 1, span
        elif kind == "step":
            decided, llm = _int(row, "step_tokens", where), span
            if decided == 0:
                raise TraceError(f"{where}: field 'step_tokens' must be >= 1")
        else:
            decided, count = _int(row, "block_tokens", where), _int(row, "accepted_count", where)
            if decided == 0 or count > decided or accepted != (count == decided):
                raise TraceError(f"{where}: field 'accepted_count' ({count}) must be <= 'block_tokens' ({decided}) "
                                 f"and equal to it exactly when 'accepted' is true")
            llm = span + int(not accepted)
        before = self.rounds[-1][1] if self.rounds else 0
        went_up = [d[2] for d in self.drafts[before:]]
        if sum(went_up) != decided or (decided and not all(went_up[-decided:])):
            raise TraceError(f"{where}: a {kind} line sends {decided} drafted position(s) but the {sum(went_up)} "
                             "token line(s) marked 'sent' since the previous round trip are not its last drafts")
        kept = sum(d[1] and not d[2] for d in self.drafts[before:])  # the pending ids are the drafts kept since
        if pending != kept:
            raise TraceError(f"{where}: field 'pending' says {pending}, but {kept} draft(s) were kept without being "
                             "sent since the previous round trip")
        tails, self.uncached = coarse_forwards(kind, self.uncached, pending, decided if kind != "span" else 0, span)
        step = row.get("step_index")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise TraceError(f"{where}: field 'step_index' must be null or an integer >= 0, got {step!r}")
        self.rounds.append((kind, len(self.drafts), up, down, server, queue, wait, encode, prefill, decided, llm,
                            tuple(tails), -1 if step is None else step, position))

    def token(self, row: dict, where: str) -> None:
        if self.mode == "coarse":
            self.coarse_token(row, where)
            return
        if self.mode == "stream":
            _require(row, STREAM_TOKEN_FIELDS, where)
            self.rows.append((_num(row, "chunk_s", where), False, 0, _int(row, "down_bytes", where), 0, 0.0, 0.0))
            return
        _require(row, TOKEN_FIELDS, where)
        sent = row.get("sent")
        if sent is True:
            _require(row, SENT_TOKEN_FIELDS, where)
        if not isinstance(sent, bool):
            raise TraceError(f"{where}: field 'sent' must be true or false, got {sent!r}")
        if sent and self.mode == "local":
            raise TraceError(f"{where}: a token was sent in a generation without a verifier")
        up = _int(row, "bytes", where)
        if sent and up == 0:
            raise TraceError(f"{where}: field 'bytes' is 0 for a sent token")
        encode = _num(row, "encode_s", where) if "encode_s" in row else 0.0
        if row.get("rolled_back", False) is not False:
            if row["rolled_back"] is not True:
                raise TraceError(f"{where}: field 'rolled_back' must be true or false, got {row['rolled_back']!r}")
            index = _int(row, "position", where) - self.prompt_tokens
            if self.lookahead == 0:
                raise TraceError(f"{where}: field 'rolled_back' is true in a stop-and-wait generation (lookahead 0)")
            if index < 1:
                raise TraceError(f"{where}: field 'position' of a rolled-back draft must be after the first draft")
            # a rolled-back draft's Verify (if it sent one) came back stale: the edge records no verdict for it
            self.rolled.append((index, _num(row, "slm_step_s", where), encode if not sent else max(encode, 1e-9),
                                where))
            return
        accepted = row.get("accepted") if sent else True
        if sent and not isinstance(accepted, bool):
            raise TraceError(f"{where}: field 'accepted' must be true or false for a sent token, got {accepted!r}")
        queue = _num(row, "queue_s", where) if sent and "queue_s" in row else 0.0
        if sent and queue > row["server_s"]:
            raise TraceError(f"{where}: field 'queue_s' ({queue}) is more than 'server_s' ({row['server_s']}), "
                             "which includes it")
        self.extra.append((encode, _num(row, "blocked_s", where) if "blocked_s" in row else 0.0, accepted, queue))
        self.rows.append((_num(row, "slm_step_s", where), sent, up, _int(row, "down_bytes", where) if sent else 0,
                          _int(row, "pending", where) if sent else 0, _num(row, "server_s", where) if sent else 0.0,
                          _num(row, "wait_s", where) if sent else 0.0))

    def close_coarse(self, row: dict, where: str) -> Generation:
        _require(row, CLOSE_FIELDS, where)
        tokens = _int(row, "tokens", where)
        kept = sum(d[1] for d in self.drafts)
        llm = sum(r[10] for r in self.rounds)
        if tokens == 0 or tokens != kept + llm:
            raise TraceError(f"{where}: field 'tokens' says {tokens}, the generation's kept drafts and LLM tokens "
                             f"make {kept + llm} (and a generation has at least one)")
        before = self.rounds[-1][1] if self.rounds else 0
        if any(d[2] for d in self.drafts[before:]):
            raise TraceError(f"{where}: a token line marked 'sent' after the last round trip")
        if not self.drafts:
            self.drafts.append((0.0, False, False, -1))  # every token came from the verifier: nothing to replay
        step, kept_, sent, dstep = (np.array(c) for c in zip(*self.drafts))
        n = len(step)
        cols = list(zip(*self.rounds)) if self.rounds else [()] * 14
        up = np.array(cols[2], dtype=np.int64)
        down = np.array(cols[3], dtype=np.int64)
        log = CoarseLog(kept_.astype(bool), sent.astype(bool), dstep.astype(np.int64), tuple(cols[0]),
                        np.array(cols[1], dtype=np.int64), up, down, *(np.array(cols[k], dtype=float) for k in range(4, 9)),
                        np.array(cols[9], dtype=np.int64), np.array(cols[10], dtype=np.int64), tuple(cols[11]),
                        np.array(cols[12], dtype=np.int64))
        total_up = _int(row, "uplink_bytes", where)
        close_up = total_up - self.open_up - int(up.sum())
        if close_up < 0:
            raise TraceError(f"{where}: field 'uplink_bytes' ({total_up}) is less than Open + Verify bytes")
        open_down = self.open_down or max(0, _int(row, "downlink_bytes", where) - int(down.sum()))
        zeros = np.zeros(n)
        return Generation("coarse", self.prompt_tokens, self.open_up, open_down, close_up, step.astype(float),
                          np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64),
                          np.zeros(n, dtype=np.int64), zeros, zeros.copy(), _num(row, "seconds", where),
                          open_s=self.open_s, coarse=log, n_tokens=tokens, conditioned=self.conditioned,
                          open_wait_s=self.open_wait_s)

    def close(self, row: dict, where: str) -> Generation:
        if self.mode == "coarse":
            return self.close_coarse(row, where)
        _require(row, CLOSE_FIELDS, where)
        if _int(row, "tokens", where) != len(self.rows):
            raise TraceError(f"{where}: field 'tokens' says {row['tokens']}, the generation has {len(self.rows)}")
        if not self.rows:
            raise TraceError(f"{where}: a generation with no tokens")
        step, sent, up, down, pend, server, wait = (np.array(c) for c in zip(*self.rows))
        rolled = _int(row, "rolled_back", where) if "rolled_back" in row else 0
        if rolled != len(self.rolled):
            raise TraceError(f"{where}: field 'rolled_back' says {rolled}, the generation has {len(self.rolled)} "
                             "rolled-back token lines")
        stale = _int(row, "stale_verifies", where) if "stale_verifies" in row else 0
        stale_up = _int(row, "stale_uplink_bytes", where) if "stale_uplink_bytes" in row else 0
        total_up = _int(row, "uplink_bytes", where)
        close_up = total_up - self.open_up - int(up.sum()) - stale_up
        if self.mode == "hybrid" and close_up < 0:
            raise TraceError(f"{where}: field 'uplink_bytes' ({total_up}) is less than Open + Verify bytes")
        open_down = self.open_down
        if self.mode == "hybrid" and self.open_s is not None and open_down == 0:
            # the v2 edge does not wait for Opened, so the open line cannot carry its size: it is what the
            # downlink total has beyond the Verdicts
            total_down = _int(row, "downlink_bytes", where)
            open_down = max(0, total_down - int(down.sum()) - stale * STALE_VERDICT_BYTES)
        if self.extra:
            encode, blocked, accepted, queue = (np.array(c) for c in zip(*self.extra))
        else:  # stream: no edge timers
            encode, blocked, queue = np.zeros(len(step)), np.zeros(len(step)), np.zeros(len(step))
            accepted = np.ones(len(step), dtype=bool)
        sent = sent.astype(bool)
        accepted = accepted.astype(bool) | ~sent
        rb = np.array([r[:3] for r in self.rolled], dtype=float).reshape(-1, 3)
        chains = _assign_chains(np.flatnonzero(~accepted), rb[:, 0].astype(np.int64), self.lookahead,
                                [r[3] for r in self.rolled])
        return Generation(self.mode, self.prompt_tokens, self.open_up, open_down,
                          max(close_up, 0) if self.mode == "hybrid" else 0, step.astype(float), sent,
                          up.astype(np.int64), down.astype(np.int64), pend.astype(np.int64), server.astype(float),
                          wait.astype(float), _num(row, "seconds", where), lookahead=self.lookahead,
                          open_s=self.open_s, encode_s=encode.astype(float), blocked_s=blocked.astype(float),
                          queue_s=queue.astype(float),
                          accepted=accepted, rb_index=rb[:, 0].astype(np.int64), rb_step_s=rb[:, 1].copy(),
                          rb_encode_s=rb[:, 2].copy(), chains=chains, stale_verifies=stale, stale_up_bytes=stale_up,
                          conditioned=self.conditioned, open_wait_s=self.open_wait_s)


def _assign_chains(rejected: np.ndarray, rb_index: np.ndarray, lookahead: int, wheres: list[str]) -> dict:
    """Which rejection discarded which rolled-back drafts: {rejected index: [rows of rb_*], in drafting order}.

    A rejection at index r discards the drafts r+1, r+2, ... drafted before its verdict arrived (at most
    ``lookahead``); the trace writes each draft at its position, several drafts at one position in the
    order they were drafted. Chains of successive rejections can overlap, and position counts alone do
    not say where each ends; the rule here: at a position with fewer drafts than open chains, the oldest
    chains end (chains of similar length end in the order they started). It keeps the chains with the
    most room under ``lookahead``, so any trace the loop can write is assigned; a draft no rejection can
    explain is a TraceError."""
    chains: dict[int, list[int]] = {int(r): [] for r in rejected}
    if not len(rb_index):
        return chains
    rows_at: dict[int, list[int]] = {}
    for row, index in enumerate(rb_index):
        rows_at.setdefault(int(index), []).append(row)
    starts = set(int(r) + 1 for r in rejected)
    active: list[int] = []
    for p in range(int(min(rb_index.min(), min(starts, default=rb_index.min()))), int(rb_index.max()) + 1):
        if p in starts:
            active.append(p - 1)
        rows = rows_at.get(p, [])
        if len(rows) > len(active):
            raise TraceError(f"{wheres[rows[0]]}: a rolled-back draft at index {p} that no earlier rejected draft "
                             "explains")
        taking = active[len(active) - len(rows):] if rows else []
        for r, row in zip(taking, rows):
            chains[r].append(row)
        active = [r for r in taking if len(chains[r]) < lookahead]
    return chains


def _parse_line(text: str, where: str) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(row, dict) or row.get("kind") not in KINDS:
        raise TraceError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}")
    return row


def load_trace(path: str | Path, name: str | None = None) -> Trace:
    """Read one trace file; raises TraceError naming the file, the line and the field on any problem."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from None
    generations: list[Generation] = []
    head: dict | None = None
    builder: _Builder | None = None
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        row = _parse_line(text, where)
        kind = row["kind"]
        if kind == "open":
            if builder is not None:
                raise TraceError(f"{where}: an open line inside an unclosed generation")
            builder, head = _Builder(row, where), head or row
        elif kind == "task":
            if not generations or builder is not None or not isinstance(row.get("correct"), bool):
                raise TraceError(f"{where}: a task line must follow a close line and carry 'correct': bool")
            generations[-1].correct = row["correct"]
        elif builder is None:
            raise TraceError(f"{where}: a {kind} line outside a generation (no open line before it)")
        elif kind == "token":
            builder.token(row, where)
        elif kind in ROUND_TRIP_KINDS:
            builder.round_trip(row, where)
        else:
            generations.append(builder.close(row, where))
            builder = None
    if builder is not None:
        raise TraceError(f"{path}: the last generation has no close line (truncated trace?)")
    if not generations:
        raise TraceError(f"{path}: no generations in the trace")
    modes = {g.mode for g in generations}
    if len(modes) > 1:
        raise TraceError(f"{path}: mixes generation modes {sorted(modes)}; record one policy per file")
    codec = head.get("codec")
    return Trace(name or path.stem, str(path), modes.pop(), str(head.get("estimator", "")),
                 codec.get("name", "") if isinstance(codec, dict) else str(codec or ""),
                 _threshold(head.get("threshold")), generations)
