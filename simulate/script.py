"""A trace generation turned into what a simulated device replays: compute runs and network round trips.

Skipped tokens cost no events: a run of them between two Verifies is one summed compute delay, and their
per-token latencies (their own compute) are known before the run starts. Only Verifies, the Open
handshake, Close and the cloud-only stream's chunks become events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulate.framing import Framing
from simulate.trace import Generation


@dataclass(frozen=True)
class Step:
    """One Verify round trip, preceded by the edge compute since the previous committed token."""

    index: int  # the position's index in its generation
    compute_s: float  # skipped tokens' compute + this position's own compute
    own_s: float  # this position's compute (its latency starts when it starts)
    up_wire: int  # Verify link bytes
    up_grpc: int  # Verify gRPC bytes (the trace's)
    tokens: int  # tokens the verifier's forward pass covers
    down_wire: int  # Verdict link bytes


@dataclass(frozen=True)
class Script:
    mode: str  # "hybrid" | "local" | "stream"
    tokens: int
    skipped_latency: np.ndarray  # [S] latencies of skipped tokens known in advance (first token excluded
    #                                when a handshake precedes it: its latency then includes the handshake)
    first_skipped_s: float | None  # compute of token 0 when it is skipped after a handshake, else None
    steps: tuple[Step, ...]
    tail_s: float  # compute of the skipped tokens after the last Verify
    open_up: tuple[int, int]  # (link bytes, gRPC bytes) of Open / GenerateRequest
    open_down: int  # link bytes of Opened
    close_up: tuple[int, int]  # (link bytes, gRPC bytes) of Close
    chunk_tokens: tuple[int, ...] = ()  # stream: verifier tokens per chunk (prompt, then 1 each)
    chunk_down: tuple[int, ...] = ()  # stream: link bytes per chunk
    correct: bool | None = None


def build_script(g: Generation, compute: np.ndarray, framing: Framing, tokens: int | None = None) -> Script:
    """The replay of ``g`` truncated to ``tokens`` tokens; ``compute`` [T] is the edge time per token."""
    n = g.tokens if tokens is None else min(tokens, g.tokens)
    open_up = (framing.wire(g.open_up, first_of_call=True), g.open_up)
    if g.mode == "stream":
        chunk_tokens = (g.prompt_tokens,) + (1,) * (n - 1)
        down = tuple(framing.wire(int(b), first_of_call=(i == 0), up=False) for i, b in enumerate(g.down_bytes[:n]))
        return Script("stream", n, np.zeros(0), None, (), 0.0, open_up, 0, (0, 0), chunk_tokens, down, g.correct)
    sent, comp = g.sent[:n], compute[:n]
    if g.mode == "local":
        return Script("local", n, comp.copy(), None, (), float(comp.sum()), (0, 0), 0, (0, 0), correct=g.correct)
    prefilled = g.prefilled()[:n]
    steps, prev = [], -1
    for i in np.flatnonzero(sent):
        steps.append(Step(int(i), float(comp[prev + 1:i + 1].sum()), float(comp[i]), framing.wire(int(g.up_bytes[i])),
                          int(g.up_bytes[i]), int(prefilled[i]), framing.wire(int(g.down_bytes[i]), up=False)))
        prev = i
    skipped = comp[~sent]
    first_skipped = None
    if not sent[0]:
        first_skipped, skipped = float(comp[0]), skipped[1:]
    close = g.close_up if steps else 0  # a session that never verified half-closes without a Close message
    return Script("hybrid", n, skipped, first_skipped, tuple(steps), float(comp[prev + 1:].sum()), open_up,
                  framing.wire(g.open_down, first_of_call=True, up=False), (framing.wire(close), close),
                  correct=g.correct)
