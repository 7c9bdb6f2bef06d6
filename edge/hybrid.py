"""The hybrid decode loop: the SLM drafts every token, sends only the uncertain ones to the verifier.

Per position (docs/design.md, "The per-token protocol"):
1. ``draft_step``: p = the SLM's distribution under the session's sampling settings; p~ = compress(p),
   the exact distribution that would be sent; the draft x ~ p~ (never from p: that is what keeps
   verification exact); u = the position's uncertainty.
2. ``should_send``: u > threshold (and a verifier is there).
3. ``verify_step``: send Verify{pending ids, x, p~} and take the verifier's token; otherwise keep x and
   append it to the pending list.
4. Feed the kept token to the SLM (``decode``): a rejected draft is replaced before the SLM sees it.
Every position is recorded (``proto.trace.TokenRecord``) and optionally written as a trace line: the
simulator replays these traces.

The verifier is anything that satisfies :class:`Verifier`: a plain ``VerifierSession`` or a
``ResilientSession`` that fails over. ``generate_hybrid`` opens it itself from the configuration, so the
sampling settings and codec on the wire are always the ones the loop drafts with.

A prompt-conditioned SLM (LLM-to-SLM, arXiv 2402.16844; ``model.conditioning``) is prefilled with the LLM's
hidden states of the prompt, which come in the verifier's Opened: with a verifier, the loop opens the session
asking for them, waits for Opened and only then prefills (the first token is later by a round trip and the
verifier's prefill: ``open_wait_s``); without one (or once the cloud is lost, policy local) it prefills with
zeros. An unconditioned SLM opens on a thread while it prefills, and never waits for Opened.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Protocol, TextIO, runtime_checkable

import numpy as np

from core.sampling import SamplingSettings, probabilities
from edge.client import VerdictResult, VerifierError
from edge.model import EdgeModel
from edge.transport import MAX_RECEIVE_BYTES
from edge.uncertainty import DEFAULT_ESTIMATOR, ESTIMATORS, Estimator, get_estimator
from proto import trace as tr
from proto.distribution import CodecSpec, Compressed, compress
from proto.messages import conditioning_bytes
from proto.payload import encode
from proto.trace import TokenRecord

# The default policy's threshold on 1 - max p: the lowest transmission rate that kept >= 99% of LLM-only
# accuracy on the demo pair's frontier at both temperatures (README, "Measured frontier").
DEFAULT_THRESHOLD = 0.06
# Opened's bytes beside its conditioning states (session id, limits, fingerprint, tags), generously.
OPENED_ENVELOPE_BYTES = 1024


@dataclass(frozen=True)
class HybridConfig:
    threshold: float = DEFAULT_THRESHOLD  # send iff u > threshold; -inf = verify every token (HLM), +inf = SLM-only
    estimator: str = DEFAULT_ESTIMATOR
    codec: CodecSpec = CodecSpec("adaptive")
    settings: SamplingSettings = SamplingSettings()
    max_new_tokens: int = 64
    samples: int = 20  # K of the perturbation estimators
    record_all_estimators: bool = False  # calibration: compute every estimator's u at every position
    lookahead: int = 0  # tokens drafted past the oldest unresolved Verify; 0 = stop-and-wait

    def __post_init__(self):
        if not isinstance(self.lookahead, int) or self.lookahead < 0:
            raise ValueError(f"lookahead must be an integer >= 0, got {self.lookahead!r}")


@runtime_checkable
class Verifier(Protocol):
    """What the loop needs from a verifier session (``VerifierSession``, ``ResilientSession``)."""

    report_target_prob: bool  # the verifier reports q(draft) in each verdict (calibration)
    uplink_bytes: int  # every edge -> cloud message so far, Open included
    downlink_bytes: int
    lost: bool  # the cloud is lost and the policy is to go on locally: nothing more is verified

    def submit(self, pending: list[int], position: int, epoch: int, block: list[tuple[int, bytes]]) -> int:
        """Send a Verify without waiting; returns its wire bytes."""

    def next_verdict(self, wait: bool = True) -> VerdictResult | None:
        """The oldest unresolved Verify's verdict; None if not arrived (``wait`` False) or the cloud is lost."""

    def close(self) -> None: ...


SessionOpener = Callable[..., Verifier]
"""Opens a verifier session for (prompt ids, sampling settings, codec). For a prompt-conditioned SLM it is also
given ``conditioning_layer=k`` (a keyword, only then), to pass on to ``VerifierSession``/``ResilientSession``;
the session it returns then has ``conditioning()``: the prompt's states from Opened (None: the cloud is lost)."""


@dataclass(frozen=True)
class Draft:
    """One drafted position: what would be sent, the draft drawn from it, and its uncertainty."""

    p_tilde: Compressed  # the compressed distribution, exactly as the verifier would decode it
    token: int  # x ~ p~
    u: float


@dataclass
class HybridResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    records: list[TokenRecord] = field(default_factory=list)  # one per generated token, in order
    text: str = ""
    stopped_at_eos: bool = False
    stopped_at_context_limit: bool = False  # the SLM's max positions were reached before max_new_tokens
    uplink_bytes: int = 0  # every edge->cloud message on the wire: Open, Verify (pending ids included), Close
    downlink_bytes: int = 0
    seconds: float = 0.0
    rolled_back: list[TokenRecord] = field(default_factory=list)  # drafts discarded by a rejection before them
    stale_verifies: int = 0  # Verifies sent on a branch a rejection had ended (answered stale)
    stale_uplink_bytes: int = 0
    open_wait_s: float = 0.0  # a conditioned SLM's wait for Opened (its prompt states) before prefilling; else 0
    first_token_s: float = 0.0  # from the call until the prompt's logits are ready (the first draft follows)

    @property
    def sent(self) -> int:
        return sum(r.sent for r in self.records)

    @property
    def transmission_rate(self) -> float:
        return self.sent / len(self.records) if self.records else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return sum(bool(r.accepted) for r in self.records if r.sent) / self.sent if self.sent else None

    @property
    def unverified(self) -> int:
        """Tokens that should have been verified but were kept unchecked because the cloud was lost."""
        return sum(r.unverified for r in self.records)

    @property
    def round_trips(self) -> int:
        """Verify messages sent, stale ones included."""
        return self.sent + self.stale_verifies

    @property
    def uplink_bytes_per_token(self) -> float:
        return self.uplink_bytes / len(self.token_ids) if self.token_ids else 0.0

    @property
    def downlink_bytes_per_token(self) -> float:
        """Every cloud->edge message per generated token: Opened (with a conditioned SLM's prompt states) and Verdicts."""
        return self.downlink_bytes / len(self.token_ids) if self.token_ids else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds else 0.0


class Streams:
    """The loop's randomness, keyed by (seed, stream, position) and never by how many draws came before: a
    position's draft and estimator noise are the same whether it is drafted once (stop-and-wait), redrafted
    after a rollback, or drafted ahead of a verdict (pipelined). Separate streams: the send decision's
    randomness must not be correlated with the draft's."""

    def __init__(self, seed: int | None):
        self.seed = secrets.randbits(63) if seed is None else seed

    def draft(self, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0, position])

    def u(self, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 1, position])


def draft_step(logits: np.ndarray, config: HybridConfig, estimator: Estimator, streams: Streams,
               position: int) -> Draft:
    """Form p from the SLM's ``logits`` [N] (already sliced to the id space), compress it to p~, draw the draft
    from p~, measure u; every draw keyed by ``position``."""
    p_tilde = compress(probabilities(logits, config.settings), config.codec)
    draft = p_tilde.sample(streams.draft(position))  # from p~, never from p: the verifier checks against p~
    return Draft(p_tilde, draft, float(estimator(logits, draft, streams.u(position))))


def should_send(draft: Draft, config: HybridConfig, verifier: Verifier | None) -> bool:
    return verifier is not None and draft.u > config.threshold


@dataclass
class _InFlight:
    """A Verify whose verdict has not been taken: the index of its drafted token, what it carried."""

    index: int  # in the loop's token list
    epoch: int
    pending: int
    dead: bool = False  # a rejection before it ended its epoch: its verdict will be stale


class _Loop:
    """One generation's state: tentative tokens and their records, pending ids, Verifies in flight, epoch.

    Committed = every token before the oldest live Verify in flight: nothing can change those any more.
    """

    def __init__(self, model: EdgeModel, prompt_ids: list[int], config: HybridConfig, seed: int | None,
                 verifier: Verifier | None, result: HybridResult, on_commit: Callable[[list[int]], None] | None):
        self.model, self.prompt, self.config, self.verifier, self.result = model, prompt_ids, config, verifier, result
        self.estimator = get_estimator(config.estimator, k=config.samples)
        self.all_estimators = ({n: get_estimator(n, k=config.samples) for n in ESTIMATORS}
                               if config.record_all_estimators else {})
        self.streams = Streams(seed)
        self.n = model.runtime.id_space  # the width of every logit row the runtime returns
        self.tokens, self.records = result.token_ids, result.records
        self.pending: list[int] = []  # kept drafts of this epoch the verifier has not seen yet
        self.in_flight: deque[_InFlight] = deque()
        self.epoch = 0
        self.logits: np.ndarray | None = None  # the SLM's logits at position len(prompt) + len(tokens)
        self.on_commit, self.committed = on_commit, 0

    # -- drafting ---------------------------------------------------------------------------------------
    def position(self, index: int) -> int:
        return len(self.prompt) + index

    def finished_drafting(self) -> bool:
        t = self.tokens
        return (len(t) >= self.config.max_new_tokens or bool(t and t[-1] in self.model.eos_ids)
                or self.model.context_full(self.position(len(t))))

    def draft_next(self) -> None:
        """Draft the next position (feeding the last token to the SLM first) and send it or keep it."""
        t_step = time.perf_counter()
        if self.model.runtime.cache.length < self.position(len(self.tokens)):  # the last token is not fed yet
            self.logits = self.model.runtime.decode(self.tokens[-1])
        position = self.position(len(self.tokens))
        draft = draft_step(self.logits, self.config, self.estimator, self.streams, position)
        record = TokenRecord.kept(position, draft.token, draft.u, draft.p_tilde.prob(draft.token),
                                  time.perf_counter() - t_step)
        if self.all_estimators:  # calibration: every estimator's u at this position, after the loop's own
            record.u_all = {n: float(e(self.logits, draft.token, self.streams.u(position)))
                            for n, e in self.all_estimators.items()}
        self.tokens.append(draft.token)
        self.records.append(record)
        if should_send(draft, self.config, self.verifier):
            self.send(draft, record)
        else:
            self.pending.append(draft.token)

    def send(self, draft: Draft, record: TokenRecord) -> None:
        """Submit Verify{pending, x, p~} for the token just drafted, unless the cloud is lost."""
        if self.verifier.lost:
            record.unverified = True  # sent, but the cloud is lost and the policy is to go on locally
            self.pending.append(draft.token)
            return
        t0 = time.perf_counter()
        payload = encode(draft.p_tilde, self.config.codec, self.n)
        index = len(self.tokens) - 1
        # In flight before submitting: if that fails, this draft is not committed.
        self.in_flight.append(_InFlight(index, self.epoch, len(self.pending)))
        self.verifier.submit(list(self.pending), self.position(index - len(self.pending)), self.epoch,
                             [(draft.token, payload)])
        record.encode_s = time.perf_counter() - t0
        self.pending = []

    # -- verdicts ---------------------------------------------------------------------------------------
    def must_wait(self) -> bool:
        """Drafting pauses while ``lookahead`` tokens are drafted past the oldest live Verify, and at the end."""
        if not self.in_flight:
            return False
        if self.finished_drafting():
            return True  # drain every verdict (stale ones too) before closing
        live = next((f for f in self.in_flight if not f.dead), None)  # stale verdicts block nothing
        return live is not None and len(self.tokens) - live.index - 1 >= self.config.lookahead

    def take_verdict(self, wait: bool) -> bool:
        """Apply the oldest Verify's verdict; False when it has not arrived (``wait`` False)."""
        t0 = time.perf_counter()
        verdict = self.verifier.next_verdict(wait)
        if verdict is None:
            if self.verifier.lost:
                self.give_up_verifying()
            elif wait:
                raise VerifierError("the verifier session returned no verdict while waiting (client bug)")
            return False
        blocked = time.perf_counter() - t0
        flight = self.in_flight.popleft()
        if flight.dead:
            if not verdict.stale:
                raise VerifierError("the verifier verified a Verify of an ended epoch (protocol error)")
            self.result.stale_verifies += 1
            self.result.stale_uplink_bytes += verdict.uplink_bytes
            return True
        if verdict.stale:
            raise VerifierError(f"the verifier answered a Verify of the current epoch {flight.epoch} stale "
                                "(protocol error)")
        record = self.records[flight.index]
        record.verified(verdict, flight.pending, self.verifier.report_target_prob)
        record.blocked_s = blocked if wait else 0.0
        if not verdict.accepted:
            self.roll_back(flight.index, verdict.token)
        self.commit()
        return True

    def roll_back(self, index: int, token: int) -> None:
        """The draft at ``index`` was rejected: keep ``token`` there, discard everything drafted after it (and
        the SLM's cache of it), end the epoch; Verifies already sent after it will come back stale."""
        discarded = self.records[index + 1:]
        for record in discarded:
            record.rolled_back = True
        self.result.rolled_back.extend(discarded)
        del self.tokens[index + 1:], self.records[index + 1:]
        self.tokens[index] = token
        keep = self.position(index)  # the SLM's cache must not hold the rejected draft or anything after it
        if self.model.runtime.cache.length > keep:
            self.model.runtime.truncate(keep)
        self.pending = []
        self.epoch += 1
        for flight in self.in_flight:
            flight.dead = True

    def give_up_verifying(self) -> None:
        """The cloud is lost (policy local): every live Verify in flight keeps its draft, marked unverified."""
        for flight in self.in_flight:
            if not flight.dead:
                self.records[flight.index].unverified = True
        self.in_flight.clear()
        self.commit()

    def committed_upto(self) -> int:
        """How many tokens are final: those before the oldest live Verify in flight."""
        return next((f.index for f in self.in_flight if not f.dead), len(self.tokens))

    def commit(self) -> None:
        """Hand newly committed tokens to ``on_commit``."""
        upto = self.committed_upto()
        if upto > self.committed and self.on_commit is not None:
            self.on_commit(self.tokens[self.committed:upto])
        self.committed = max(self.committed, upto)

    def keep_committed_only(self) -> None:
        """After a failure: drop the tentative tokens (a verdict that will never come could change them)."""
        upto = self.committed_upto()
        del self.tokens[upto:], self.records[upto:]

    def run(self) -> None:
        while True:
            while self.in_flight and self.take_verdict(wait=False):
                pass  # take every verdict that has arrived before drafting on
            if self.must_wait():
                self.take_verdict(wait=True)
                continue
            if self.finished_drafting():
                break
            self.draft_next()
            if not self.in_flight:
                self.commit()


def _write_open(trace: TextIO, config: HybridConfig, prompt_tokens: int, opening: Opening,
                conditioning_layer: int | None) -> None:
    verifier = opening.verifier
    tr.write_open(trace, prompt_tokens, config.estimator, asdict(config.codec), config.threshold,
                  config.settings.temperature, verifier is not None,
                  verifier.uplink_bytes if verifier else 0, verifier.downlink_bytes if verifier else 0,
                  lookahead=config.lookahead, open_s=opening.open_s,
                  conditioning_layer=conditioning_layer if verifier else None, open_wait_s=opening.open_wait_s)


class Opening(NamedTuple):
    """How a generation started: its verifier session (None: none), the SLM's logits after the prompt, the
    seconds connecting and sending Open took, and the seconds the loop waited for Opened before prefilling (a
    conditioned SLM only; 0 otherwise: the Open overlaps the prefill)."""

    verifier: Verifier | None
    logits: np.ndarray
    open_s: float
    open_wait_s: float = 0.0


def conditioning_layer(model: EdgeModel) -> int | None:
    """The LLM layer a prompt-conditioned SLM takes states of (None: an unconditioned SLM)."""
    spec = getattr(model, "conditioning", None)
    return None if spec is None else spec.layer


def open_while_prefilling(model: EdgeModel, prompt_ids: list[int], config: HybridConfig,
                           open_session: SessionOpener | None) -> Opening:
    """Connect and send Open on a thread while the SLM prefills the prompt (ORT releases the GIL), so the
    handshake costs no time before the first draft. A prompt-conditioned SLM with a verifier cannot overlap
    them: it needs the LLM's prompt states from Opened first (``open_then_prefill``); without a verifier it
    prefills with zeros (the runtime's default)."""
    if open_session is None:
        return Opening(None, model.runtime.prefill(prompt_ids), 0.0)
    if conditioning_layer(model) is not None:
        return open_then_prefill(model, prompt_ids, config, open_session)
    with ThreadPoolExecutor(max_workers=1) as pool:
        t0 = time.perf_counter()
        opening = pool.submit(lambda: (open_session(list(prompt_ids), config.settings, config.codec),
                                       time.perf_counter() - t0))
        try:
            logits = model.runtime.prefill(prompt_ids)
        finally:
            verifier, open_s = opening.result()  # a failure to open is raised here
    return Opening(verifier, logits, open_s)


def open_then_prefill(model: EdgeModel, prompt_ids: list[int], config: HybridConfig,
                      open_session: SessionOpener) -> Opening:
    """A prompt-conditioned SLM: open asking for the LLM's states at the manifest's layer, wait for Opened, check
    them against the manifest, prefill with them (zeros if the cloud is lost before they came, policy local)."""
    spec = model.conditioning
    check_conditioning_receivable(len(prompt_ids), spec.dim)
    t0 = time.perf_counter()
    verifier = open_session(list(prompt_ids), config.settings, config.codec, conditioning_layer=spec.layer)
    open_s = time.perf_counter() - t0
    try:
        states = verifier.conditioning()  # waits for Opened: one round trip and the verifier's prefill
        open_wait_s = time.perf_counter() - t0
        if states is not None:
            check_conditioning_shape(states, spec, len(prompt_ids))
    except BaseException:
        verifier.close()
        raise
    return Opening(verifier, model.runtime.prefill(prompt_ids, conditioning=states), open_s, open_wait_s)


def check_conditioning_receivable(prompt_len: int, dim: int) -> None:
    """The Opened carrying the prompt's states must fit what the edge accepts in one message (gRPC would fail the
    call with RESOURCE_EXHAUSTED, which looks retryable): refuse the generation up front instead."""
    needed = conditioning_bytes(prompt_len, dim)
    room = MAX_RECEIVE_BYTES - OPENED_ENVELOPE_BYTES
    if needed > room:
        raise VerifierError(f"a {prompt_len}-token prompt's conditioning states ({prompt_len} x {dim} float16 = "
                            f"{needed:,} bytes) do not fit the edge's {MAX_RECEIVE_BYTES:,}-byte message limit; "
                            f"shorten the prompt to at most {room // conditioning_bytes(1, dim):,} tokens")


def check_conditioning_shape(states: np.ndarray, spec, prompt_len: int) -> None:
    """The verifier's states are [prompt_len, spec.dim]: a different width means an LLM other than the one the SLM
    was trained against (no retry can fix that)."""
    if states.shape[1] != spec.dim:
        raise VerifierError(f"the verifier's LLM gives {states.shape[1]}-wide states at layer {spec.layer}, but this "
                            f"SLM was trained on {spec.dim}-wide ones (manifest.json conditioning.dim): point the edge "
                            "at the verifier of its own LLM")
    if states.shape[0] != prompt_len:
        raise VerifierError(f"the verifier sent states for {states.shape[0]} positions of a {prompt_len}-token prompt "
                            "(protocol error)")


def generate_hybrid(
    model: EdgeModel,
    prompt_ids: list[int],
    config: HybridConfig,
    seed: int | None = None,
    open_session: SessionOpener | None = None,
    trace: TextIO | None = None,
    on_commit: Callable[[list[int]], None] | None = None,
) -> HybridResult:
    """Generate with the SLM, verifying uncertain tokens through the session ``open_session`` opens.

    Without ``open_session`` (or with threshold +inf) nothing is ever sent: SLM-only generation that
    draws from the same compressed distribution. ``config.lookahead`` > 0 keeps drafting while verdicts
    travel; with the same seeds the tokens are the same at any lookahead. ``on_commit`` receives the token
    ids as they become final (never a token a later rejection could take back).
    """
    result = HybridResult(list(prompt_ids))
    t_start = time.perf_counter()
    opening = open_while_prefilling(model, prompt_ids, config, open_session)
    verifier, result.open_wait_s = opening.verifier, opening.open_wait_s
    result.first_token_s = time.perf_counter() - t_start
    if trace is not None:
        _write_open(trace, config, len(prompt_ids), opening, conditioning_layer(model))
    loop = _Loop(model, list(prompt_ids), config, seed, verifier, result, on_commit)
    loop.logits = opening.logits
    try:
        loop.run()
    except VerifierError as exc:
        loop.keep_committed_only()
        exc.partial = result  # nothing is lost: the caller can print what was generated (and committed)
        if verifier is not None:
            verifier.close()
        raise
    result.stopped_at_eos = bool(result.token_ids and result.token_ids[-1] in model.eos_ids)
    result.stopped_at_context_limit = (not result.stopped_at_eos and len(result.token_ids) < config.max_new_tokens
                                       and model.context_full(len(prompt_ids) + len(result.token_ids)))
    if verifier is not None:
        verifier.close()
        result.uplink_bytes, result.downlink_bytes = verifier.uplink_bytes, verifier.downlink_bytes
    result.seconds = time.perf_counter() - t_start
    result.text = model.decode(result.token_ids)
    if trace is not None:
        for record in sorted(result.records + result.rolled_back, key=lambda r: (r.position, not r.rolled_back)):
            tr.write_token(trace, record)
        tr.write_close(trace, len(result.token_ids), result.uplink_bytes, result.downlink_bytes, result.seconds,
                       result.text, rolled_back=len(result.rolled_back), stale_verifies=result.stale_verifies,
                       stale_uplink_bytes=result.stale_uplink_bytes)
    return result
