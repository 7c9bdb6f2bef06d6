"""Service-time models fitted from the traces' measured times.

Verifier: one forward pass over the tokens it prefills. Its measured time per Verify (``server_s``,
reported by the verifier itself: wait for the model lock + forward + rejection) is fitted by least
squares as ``a + b * tokens`` with tokens = prompt + pending on a session's first Verify, 1 + pending
afterwards (``Generation.prefilled``). The cloud-only baseline is fitted the same way from its chunk
inter-arrival times at the client (first chunk: prompt prefill; later: one token each). A batch of
requests served together costs ``a + b * (their tokens summed)``: the fixed cost is paid once. That
batching rule is the model's extrapolation (traces are recorded one session at a time, so they cannot
show batching); runs default to ``max_batch = 1``.

Edge: the trace's own per-token compute times are replayed (``edge.compute = "trace"``), or each
replaced by the trace's median (``"median"``) to strip the recording machine's scheduling noise. Either
way each token also gets an equal share of its generation's untimed loop work (``Generation.untimed_s``:
wall time minus per-token compute and waits; encoding a full32 payload alone is ~1 ms per Verify).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulate.trace import Trace


@dataclass(frozen=True)
class ServiceModel:
    intercept_s: float  # a: per forward pass (or per batch)
    per_token_s: float  # b: per token prefilled
    samples: int
    r2: float | None

    def time(self, tokens: int) -> float:
        return self.intercept_s + self.per_token_s * tokens

    def as_dict(self) -> dict:
        return {"intercept_s": self.intercept_s, "per_token_s": self.per_token_s, "samples": self.samples,
                "r2": self.r2}


def service_samples(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(tokens prefilled, seconds) per verifier call of the trace; empty for SLM-only."""
    xs, ys = [], []
    for g in trace.generations:
        if g.mode == "hybrid" and g.sent.any():
            xs.append(g.prefilled()[g.sent])
            ys.append(g.server_s[g.sent])
        elif g.mode == "stream":
            tokens = np.ones(g.tokens, dtype=np.int64)
            tokens[0] = g.prompt_tokens
            xs.append(tokens)
            ys.append(g.step_s)
    if not xs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(xs).astype(float), np.concatenate(ys).astype(float)


def fit_line(x: np.ndarray, y: np.ndarray) -> ServiceModel:
    """Least squares ``y = a + b x`` with a, b >= 0 (a negative cost would let the simulator run backwards)."""
    if len(x) == 0:
        return ServiceModel(0.0, 0.0, 0, None)
    if len(np.unique(x)) < 2:
        return ServiceModel(float(np.mean(y)), 0.0, len(x), None)
    b, a = np.polyfit(x, y, 1)
    if b < 0:
        a, b = float(np.mean(y)), 0.0
    elif a < 0:
        a, b = 0.0, float(np.dot(x, y) / np.dot(x, x))
    resid = y - (a + b * x)
    total = float(np.sum((y - y.mean()) ** 2))
    return ServiceModel(float(a), float(b), len(x), 1 - float(np.sum(resid**2)) / total if total > 0 else None)


def fit_service(trace: Trace) -> ServiceModel:
    return fit_line(*service_samples(trace))


def rpc_overhead(trace: Trace) -> float:
    """Per-Verify software latency of the gRPC path: median of (edge's wait - verifier's own time).

    Valid for traces recorded on loopback (``simulate record``), where that difference is only the two
    gRPC stacks' work (serialization, HTTP/2, thread hand-offs); for a trace recorded over a real
    network it would include the network, so give ``verifier.rpc_overhead_s`` as a number instead."""
    diffs = [g.wait_s[g.sent] - g.server_s[g.sent] for g in trace.generations if g.mode == "hybrid" and g.sent.any()]
    return max(0.0, float(np.median(np.concatenate(diffs)))) if diffs else 0.0


def edge_step_times(trace: Trace, mode: str) -> list[np.ndarray]:
    """Per generation, [T] edge compute per token as the simulator replays it."""
    if mode == "trace":
        return [g.step_s + g.untimed_s / g.tokens for g in trace.generations]
    # the first step also prefills the prompt: keep its own median apart from the decode steps'
    first = float(np.median([g.step_s[0] for g in trace.generations]))
    rest = [g.step_s[1:] for g in trace.generations if g.tokens > 1]
    step = float(np.median(np.concatenate(rest))) if rest else first
    out = []
    for g in trace.generations:
        times = np.full(g.tokens, step)
        times[0] = first
        times += g.untimed_s / g.tokens
        out.append(times)
    return out
