"""Service-time models fitted from the traces' measured times.

Verifier: one forward pass over the tokens it prefills. Its measured time per Verify (``server_s``,
reported by the verifier itself: wait for the model worker + forward + rejection) is fitted by least
squares as ``a + b * tokens`` with tokens = prompt + pending on a session's first Verify, 1 + pending
afterwards (``Generation.prefilled``). The wait for the model worker (``queue_s``, where recorded) is
the simulator's own queue to model: each sample has it replaced by the trace's median wait (the
hand-off to the worker thread, ~0.1 ms in a single-session recording), so contention a recording saw
(other sessions, a starved thread) is not counted twice. Span and step round trips (coarse traces) take
several forwards (``trace.coarse_forwards``: a span of k tokens is k forwards); with them in the trace the
fit is ``a * forwards + b * tokens`` over every Verify (a token-level Verify is one forward), the same
per-forward model ``a + b * tokens``. The cloud-only baseline is fitted the same way from its chunk
inter-arrival times at the client (first chunk: prompt prefill; later: one token each). A batch of
requests served together costs ``a + b * (their tokens summed)``: the fixed cost is paid once. That
batching rule is the model's extrapolation (traces are recorded one session at a time, so they cannot
show batching); runs default to ``max_batch = 1``. The batched engine's measured cost replaces it with
``verifier.service = "batched:PATH"`` (``simulate/batched.py``; the capacity study's default).

Edge: the trace's own per-token compute times are replayed (``edge.compute = "trace"``), or each
replaced by the trace's median (``"median"``) to strip the recording machine's scheduling noise; a sent
token also pays its recorded ``encode_s`` (encoding p~ and submitting the Verify). The work the per-token
timers miss (``Generation.untimed_s``) is, for v2 traces, per-generation work (prefill beyond the Open,
thread hand-offs, closing): it is replayed once, before the first draft (``Generation.head_s``). Older
traces (no ``open_s``) keep the earlier rule, an equal share per token (their loop wrote the trace and
encoded p~ between the timers). A v2 edge's first Verify above the smallest message limit any verifier
may set waits for Opened inside ``encode_s``; the simulator models that wait itself, so that one
``encode_s`` is replaced by the trace's typical one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from simulate.trace import Trace


@dataclass(frozen=True)
class ServiceModel:
    intercept_s: float  # a: per forward pass (or per batch)
    per_token_s: float  # b: per token prefilled
    samples: int
    r2: float | None
    max_batch_tokens: ClassVar[float] = math.inf  # no token budget in this model: a batch is limited by max_batch only

    def time(self, tokens: int) -> float:
        return self.intercept_s + self.per_token_s * tokens

    def batch_time(self, tails) -> float:
        """Requests served together: the fixed cost once (the extrapolation above)."""
        return self.time(sum(tails))

    def plan(self, tails: list[int]) -> list[list[int]]:
        """Requests taken together are one forward."""
        return [list(range(len(tails)))]

    def as_dict(self) -> dict:
        return {"intercept_s": self.intercept_s, "per_token_s": self.per_token_s, "samples": self.samples,
                "r2": self.r2}


def _handoff(trace: Trace) -> float:
    """The trace's median wait for the model worker over every Verify (token-level and coarse)."""
    waits = [g.queue_s[g.sent] for g in trace.generations if g.mode == "hybrid" and g.sent.any()]
    waits += [g.coarse.queue_s for g in trace.generations if g.coarse is not None and g.coarse.rounds]
    return float(np.median(np.concatenate(waits))) if waits else 0.0


def coarse_service_samples(trace: Trace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(forwards, tokens fed, seconds) per span/step/block Verify of the trace's coarse generations."""
    handoff = _handoff(trace)
    forwards, tokens, seconds = [], [], []
    for g in trace.generations:
        if g.coarse is None:
            continue
        c = g.coarse
        forwards += [len(t) for t in c.tails]
        tokens += [sum(t) for t in c.tails]
        seconds += list(c.server_s - c.queue_s + handoff)
    return np.array(forwards, dtype=float), np.array(tokens, dtype=float), np.array(seconds, dtype=float)


def service_samples(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(tokens prefilled, seconds) per verifier call of the trace; empty for SLM-only."""
    xs, ys = [], []
    handoff = _handoff(trace)
    for g in trace.generations:
        if g.mode == "hybrid" and g.sent.any():
            xs.append(g.prefilled()[g.sent])
            ys.append(g.server_s[g.sent] - g.queue_s[g.sent] + handoff)
        elif g.mode == "stream":
            tokens = np.ones(g.tokens, dtype=np.int64)
            tokens[0] = g.prompt_tokens
            xs.append(tokens)
            ys.append(g.step_s)
    if not xs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(xs).astype(float), np.concatenate(ys).astype(float)


def nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares ``x @ c ~ y`` ([S, F], [S]) with c >= 0: a negative cost would let the simulator run
    backwards. The most negative coefficient is dropped (set to 0) and the rest refitted until none is."""
    keep = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while keep:
        sol = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        if sol.min() >= 0:
            coef[keep] = sol
            break
        del keep[int(np.argmin(sol))]
    return coef


def r_squared(y: np.ndarray, fit: np.ndarray) -> float | None:
    total = float(np.sum((y - y.mean()) ** 2))
    return 1 - float(np.sum((y - fit) ** 2)) / total if total > 0 else None


def fit_line(x: np.ndarray, y: np.ndarray) -> ServiceModel:
    """Least squares ``y = a + b x`` with a, b >= 0."""
    if len(x) == 0:
        return ServiceModel(0.0, 0.0, 0, None)
    if len(np.unique(x)) < 2:
        return ServiceModel(float(np.mean(y)), 0.0, len(x), None)
    a, b = nonneg_lstsq(np.column_stack([np.ones_like(x), x]), y)
    return ServiceModel(float(a), float(b), len(x), r_squared(y, a + b * x))


def fit_service(trace: Trace) -> ServiceModel:
    """The trace's verifier cost per forward, ``a + b * tokens`` (module docstring)."""
    x, y = service_samples(trace)
    forwards, tokens, seconds = coarse_service_samples(trace)
    if not len(forwards) or not np.any(forwards != 1):
        return fit_line(np.concatenate([x, tokens]), np.concatenate([y, seconds]))
    f = np.concatenate([np.ones_like(x), forwards])  # [S] forwards per Verify
    t = np.concatenate([x, tokens])  # [S] tokens they fed
    y = np.concatenate([y, seconds])  # [S]
    if len(y) < 2:
        return ServiceModel(float(y.sum() / f.sum()), 0.0, len(y), None)
    a, b = nonneg_lstsq(np.column_stack([f, t]), y)
    return ServiceModel(float(a), float(b), len(y), r_squared(y, a * f + b * t))


def rpc_overhead(trace: Trace) -> float:
    """Per-Verify software latency of the gRPC path: median of (edge's wait - verifier's own time).

    Valid for traces recorded on loopback (``simulate record``), where that difference is only the two
    gRPC stacks' work (serialization, HTTP/2, thread hand-offs); for a trace recorded over a real
    network it would include the network, so give ``verifier.rpc_overhead_s`` as a number instead. In a
    pipelined generation only the verdicts the loop blocked for count (one taken at a later poll, or
    queued behind the session's earlier Verifies, waited for more than the stacks)."""
    diffs = [g.coarse.wait_s - g.coarse.server_s for g in trace.generations if g.coarse is not None]
    for g in trace.generations:
        if g.mode != "hybrid" or not g.sent.any():
            continue
        mask = g.sent
        if g.lookahead and (g.sent & (g.blocked_s > 0)).any():
            mask = g.sent & (g.blocked_s > 0)
        diffs.append(g.wait_s[mask] - g.server_s[mask])
    diffs = np.concatenate(diffs) if diffs else np.zeros(0)
    return max(0.0, float(np.median(diffs))) if len(diffs) else 0.0


# The smallest message limit a verifier may set (``edge.client.MIN_MESSAGE_LIMIT``, protobuf bytes): a larger
# Verify waits for Opened before it goes up (tests check the two agree).
MIN_MESSAGE_LIMIT = 1024
GRPC_PREFIX = 5


def waits_for_opened(grpc_bytes: int) -> bool:
    """A v2 edge's Verify of ``grpc_bytes`` (trace size) waits for Opened when Opened has not arrived."""
    return grpc_bytes - GRPC_PREFIX > MIN_MESSAGE_LIMIT


def replay_encode(trace: Trace) -> list[np.ndarray]:
    """Per generation, [T] ``encode_s`` as replayed: a v2 generation's first Verify, when large enough to wait
    for Opened, gets the trace's median encode_s of the other Verifies of that size instead of its own
    (which holds that wait, modelled by the simulator)."""
    out, firsts, others = [], [], []
    for g in trace.generations:
        enc = g.encode_s.copy()
        out.append(enc)
        sent = np.flatnonzero(g.sent)
        if g.open_s is None or not len(sent):
            continue
        big = [i for i in sent if waits_for_opened(int(g.up_bytes[i]))]
        if big and big[0] == sent[0]:
            firsts.append((enc, big[0]))
            others += [float(g.encode_s[i]) for i in big[1:]]
    if firsts:
        typical = float(np.median(others)) if others else 0.0
        for enc, i in firsts:
            enc[i] = min(enc[i], typical)
    return out


def _slm_steps(trace: Trace, mode: str) -> tuple[list[np.ndarray], float | None]:
    """Per generation, [T] SLM step times as replayed; and the decode step for rolled-back drafts in
    ``median`` mode (None: their own)."""
    if mode == "trace":
        return [g.step_s for g in trace.generations], None
    # the first step of an older trace also prefilled the prompt: keep its own median apart from the decode steps'
    first = float(np.median([g.step_s[0] for g in trace.generations]))
    rest = [g.step_s[1:] for g in trace.generations if len(g.step_s) > 1]  # coarse: [D] per draft
    step = float(np.median(np.concatenate(rest))) if rest else first
    out = []
    for g in trace.generations:
        times = np.full(len(g.step_s), step)
        times[0] = first
        out.append(times)
    return out, step


def edge_step_times(trace: Trace, mode: str) -> list[np.ndarray]:
    """Per generation, [T] edge compute per token as the simulator replays it (older traces: with their
    share of the untimed work; v2 traces: with ``encode_s``, the untimed work going to ``head_s``)."""
    steps, _ = _slm_steps(trace, mode)
    out = []
    for g, step, enc in zip(trace.generations, steps, replay_encode(trace)):
        out.append(step + enc + (g.untimed_s / g.tokens if g.open_s is None else 0.0))
    return out


def rolled_back_times(trace: Trace, mode: str) -> list[np.ndarray]:
    """Per generation, [R] edge compute of each rolled-back draft (SLM step + encode_s when it sent a Verify)."""
    _, decode = _slm_steps(trace, mode)
    return [(g.rb_step_s if decode is None else np.full(g.rolled_back, decode)) + g.rb_encode_s
            for g in trace.generations]
