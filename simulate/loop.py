"""A protocol-v2 trace generation turned into what the simulated edge loop replays (``engine._loop``).

The replay follows the edge loop (``edge/hybrid.py``, ``_Loop.run``) step by step, with the trace's own
decisions: which positions are drafted, in what order, which send a Verify, which verdicts reject. Only
time comes from the model (links, RTT, verifier). What the loop does, and the replay with it:

- it drafts the next position (its recorded compute: ``slm_step_s`` + ``encode_s`` when it sends) and,
  if the position is uncertain, submits a Verify without waiting (a Verify above the smallest message
  limit any verifier may set first waits for Opened);
- before every draft it takes the verdicts that have arrived, oldest first; it blocks for the oldest
  when ``lookahead`` tokens are drafted past the oldest unresolved Verify, and at the end (every verdict,
  stale ones too, is taken before Close);
- a rejected draft at index r rolls back: the drafts after r are discarded and their Verifies come back
  stale (the verifier answers them without a forward pass). Until that verdict arrives the edge drafts
  on the doomed branch: the replay uses the drafts the trace recorded there (``Generation.chains``);
  when the replay's verdict comes later than the recording's, the branch goes on with the final tokens'
  compute and send decisions at the same positions (the doomed branch's own drafts beyond the recorded
  ones were never seen); it never runs past the generation's last position.
- a token is committed when no unresolved Verify precedes it (or is its own); its latency runs from
  the start of its draft to its commit (the first token's from the start of the generation).

With lookahead 0 this is the stop-and-wait loop: one Verify at a time, no drafting while it travels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simulate.compute import waits_for_opened
from simulate.framing import Framing
from simulate.trace import STALE_VERDICT_BYTES, Generation


@dataclass(frozen=True)
class Verify:
    up_wire: int  # link bytes up
    up_grpc: int  # the trace's gRPC bytes
    tokens: int  # tokens the verifier's forward pass covers; 0 = stale, answered without one
    down_wire: int  # link bytes of its Verdict
    wait_s: float  # the recorded round trip (send -> the loop taking the verdict), for the recorded replay
    waits_opened: bool  # large enough to wait for Opened when Opened has not arrived


@dataclass(frozen=True)
class Draft:
    compute_s: float
    verify: Verify | None


@dataclass(frozen=True)
class LoopScript:
    tokens: int
    lookahead: int
    open_s: float  # connecting and sending Open (the Open leaves then)
    head_s: float  # the edge's time before its first draft (>= open_s)
    final: tuple[Draft, ...]  # [n] the generation's own drafts, the tokens it kept
    compute: np.ndarray  # [n] their compute
    cum: np.ndarray  # [n + 1] prefix sums of compute
    next_sent: np.ndarray  # [n + 1] the first index >= i whose draft sends a Verify (n when none)
    rejected: frozenset  # indices whose Verify is rejected
    chains: dict  # rejected index -> tuple[Draft, ...]: the recorded doomed drafts at r + 1, r + 2, ...
    doomed: tuple[Draft, ...]  # [n] final[p] as a doomed branch's draft (its Verify, if any, stale)
    open_up: tuple[int, int]  # (link bytes, gRPC bytes)
    open_down: int
    close_up: tuple[int, int]
    correct: bool | None = None
    waits_opened: bool = False  # some Verify of it is large enough to wait for Opened
    conditioned_prompt: int = 0  # > 0: a conditioned SLM's Open, the verifier prefills these tokens before Opened
    open_wait_s: float = 0.0  # the recorded wait for that Opened (the recorded replay's)
    runs: dict = field(default_factory=dict)  # {i: run(i)} where stop-and-wait starts a run of skipped drafts
    mode: str = field(default="loop", init=False)

    def __post_init__(self):
        # the first index, and each after a Verify: where a run of skipped drafts starts with nothing in flight
        starts = [0] + [i + 1 for i in range(self.tokens) if self.final[i].verify is not None]
        self.runs.update({i: self.run(i) for i in starts if i < self.tokens and self.next_sent[i] > i})

    def run(self, i: int) -> tuple[int, float, np.ndarray]:
        """The skipped drafts from ``i`` to the next Verify: (its index, their summed compute, their computes)."""
        j = int(self.next_sent[i])
        return j, float(self.cum[j] - self.cum[i]), self.compute[i:j].copy()

    def chain_draft(self, rejected: int, index: int) -> Draft | None:
        """The doomed branch's draft at ``index`` after the rejection at ``rejected``; None: it ends."""
        recorded = self.chains.get(rejected, ())
        k = index - rejected - 1
        if k < len(recorded):
            return recorded[k]
        return self.doomed[index] if index < self.tokens else None


def build_loop_script(g: Generation, compute: np.ndarray, rb_compute: np.ndarray, head_s: float, framing: Framing,
                      stale_rtt_s: float, tokens: int | None = None) -> LoopScript:
    """The replay of ``g`` (a v2 hybrid generation) truncated to ``tokens`` tokens; ``compute`` [T] and
    ``rb_compute`` [R] are the edge times of its drafts and rolled-back drafts, ``stale_rtt_s`` the round
    trip a stale Verify is given in the recorded replay (its own is not recorded)."""
    n = g.tokens if tokens is None else min(tokens, g.tokens)
    prefilled = g.prefilled()
    stale_down = framing.wire(STALE_VERDICT_BYTES, up=False)

    def verify(grpc: int, i: int | None) -> Verify:
        if i is None:  # stale
            return Verify(framing.wire(grpc), grpc, 0, stale_down, stale_rtt_s, waits_for_opened(grpc))
        return Verify(framing.wire(grpc), grpc, int(prefilled[i]), framing.wire(int(g.down_bytes[i]), up=False),
                      float(g.wait_s[i]), waits_for_opened(grpc))

    comp = np.asarray(compute[:n], dtype=float)
    final = tuple(Draft(float(comp[i]), verify(int(g.up_bytes[i]), i) if g.sent[i] else None) for i in range(n))
    doomed = tuple(Draft(float(comp[i]), verify(int(g.up_bytes[i]), None) if g.sent[i] else None) for i in range(n))
    stale_bytes = int(round(g.stale_verify_bytes))
    rb_sent = g.rb_sent
    chains = {}
    for r, rows in g.chains.items():
        if r >= n:
            continue
        drafts = []
        for k, row in enumerate(rows):
            if n < g.tokens and r + 1 + k >= n:
                break  # a cut generation ends at n: so does its doomed branch
            drafts.append(Draft(float(rb_compute[row]), verify(stale_bytes, None) if rb_sent[row] else None))
        chains[r] = tuple(drafts)
    sent = np.flatnonzero(g.sent[:n])
    next_sent = np.full(n + 1, n, dtype=np.int64)
    for i in sent[::-1]:
        next_sent[:i + 1] = i
    any_verify = bool(len(sent)) or any(d.verify for c in chains.values() for d in c)
    close = g.close_up if any_verify else 0  # a session that never verified half-closes without a Close
    return LoopScript(n, g.lookahead, float(g.open_s or 0.0), float(head_s), final, comp,
                      np.concatenate([[0.0], np.cumsum(comp)]), next_sent,
                      frozenset(int(i) for i in np.flatnonzero(~g.accepted[:n])), chains, doomed,
                      (framing.wire(g.open_up, first_of_call=True), g.open_up),
                      framing.wire(g.open_down, first_of_call=True, up=False), (framing.wire(close), close),
                      g.correct, any(d.verify.waits_opened for d in final + doomed if d.verify)
                      or any(d.verify.waits_opened for c in chains.values() for d in c if d.verify),
                      conditioned_prompt=g.prompt_tokens if g.conditioned else 0, open_wait_s=g.open_wait_s)
