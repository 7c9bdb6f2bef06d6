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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol, TextIO, runtime_checkable

import numpy as np

from core.sampling import SamplingSettings, probabilities
from edge.client import VerdictResult, VerifierError
from edge.model import EdgeModel
from edge.uncertainty import DEFAULT_ESTIMATOR, ESTIMATORS, Estimator, get_estimator
from proto import trace as tr
from proto.distribution import CodecSpec, Compressed, compress
from proto.payload import encode
from proto.trace import TokenRecord

# The default policy's threshold on 1 - max p: the lowest transmission rate that kept >= 99% of LLM-only
# accuracy on the demo pair's frontier at both temperatures (README, "Measured frontier").
DEFAULT_THRESHOLD = 0.06


@dataclass(frozen=True)
class HybridConfig:
    threshold: float = DEFAULT_THRESHOLD  # send iff u > threshold; -inf = verify every token (HLM), +inf = SLM-only
    estimator: str = DEFAULT_ESTIMATOR
    codec: CodecSpec = CodecSpec("adaptive")
    settings: SamplingSettings = SamplingSettings()
    max_new_tokens: int = 64
    samples: int = 20  # K of the perturbation estimators
    record_all_estimators: bool = False  # calibration: compute every estimator's u at every position


@runtime_checkable
class Verifier(Protocol):
    """What the loop needs from a verifier session (``VerifierSession``, ``ResilientSession``)."""

    report_target_prob: bool  # the verifier reports q(draft) in each verdict (calibration)
    uplink_bytes: int  # every edge -> cloud message so far, Open included
    downlink_bytes: int

    def verify(self, pending: list[int], draft: int, payload: bytes) -> VerdictResult | None:
        """The verdict on ``draft``; None when the cloud is lost and the policy is to go on locally."""

    def close(self) -> None: ...


SessionOpener = Callable[[list[int], SamplingSettings, CodecSpec], Verifier]
"""Opens a verifier session for (prompt ids, sampling settings, codec)."""


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
    records: list[TokenRecord] = field(default_factory=list)
    text: str = ""
    stopped_at_eos: bool = False
    stopped_at_context_limit: bool = False  # the SLM's max positions were reached before max_new_tokens
    uplink_bytes: int = 0  # every edge->cloud message on the wire: Open, Verify (pending ids included), Close
    downlink_bytes: int = 0
    seconds: float = 0.0

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
    def uplink_bytes_per_token(self) -> float:
        return self.uplink_bytes / len(self.token_ids) if self.token_ids else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds else 0.0


@dataclass
class _Streams:
    """The loop's random streams. Separate generators: the send decision's randomness must not be
    correlated with the draft's."""

    draft: np.random.Generator
    u: np.random.Generator

    @classmethod
    def seeded(cls, seed: int | None) -> _Streams:
        make = (lambda i: np.random.default_rng([seed, i])) if seed is not None else (lambda i: np.random.default_rng())
        return cls(make(0), make(1))


def draft_step(logits: np.ndarray, config: HybridConfig, estimator: Estimator, streams: _Streams) -> Draft:
    """Form p from the SLM's ``logits`` [N] (already sliced to the id space), compress it to p~, draw the draft
    from p~, measure u."""
    p_tilde = compress(probabilities(logits, config.settings), config.codec)
    draft = p_tilde.sample(streams.draft)  # from p~, never from p: the verifier checks against p~
    return Draft(p_tilde, draft, float(estimator(logits, draft, streams.u)))


def should_send(draft: Draft, config: HybridConfig, verifier: Verifier | None) -> bool:
    return verifier is not None and draft.u > config.threshold


def verify_step(verifier: Verifier, pending: list[int], draft: Draft, config: HybridConfig, n: int,
                result: HybridResult) -> VerdictResult | None:
    """Send Verify{pending, x, p~ encoded over the id space ``n``}; a failure carries the tokens generated so
    far (``exc.partial``)."""
    try:
        return verifier.verify(pending, draft.token, encode(draft.p_tilde, config.codec, n))
    except VerifierError as exc:
        exc.partial = result  # nothing is lost: the caller can print what was generated
        verifier.close()
        raise


def _write_open(trace: TextIO, config: HybridConfig, prompt_tokens: int, verifier: Verifier | None) -> None:
    tr.write_open(trace, prompt_tokens, config.estimator, asdict(config.codec), config.threshold,
                  config.settings.temperature, verifier is not None,
                  verifier.uplink_bytes if verifier else 0, verifier.downlink_bytes if verifier else 0)


def generate_hybrid(
    model: EdgeModel,
    prompt_ids: list[int],
    config: HybridConfig,
    seed: int | None = None,
    open_session: SessionOpener | None = None,
    trace: TextIO | None = None,
) -> HybridResult:
    """Generate with the SLM, verifying uncertain tokens through the session ``open_session`` opens.

    Without ``open_session`` (or with threshold +inf) nothing is ever sent: SLM-only generation that
    draws from the same compressed distribution.
    """
    estimator = get_estimator(config.estimator, k=config.samples)
    all_estimators = {n: get_estimator(n, k=config.samples) for n in ESTIMATORS} if config.record_all_estimators else {}
    streams = _Streams.seeded(seed)
    n = model.runtime.id_space  # the width of every logit row the runtime returns
    result = HybridResult(list(prompt_ids))
    verifier = open_session(list(prompt_ids), config.settings, config.codec) if open_session else None
    if trace is not None:
        _write_open(trace, config, len(prompt_ids), verifier)
    t_start = t_step = time.perf_counter()
    logits = model.runtime.prefill(prompt_ids)
    pending: list[int] = []  # kept drafts the verifier has not seen yet
    for _ in range(config.max_new_tokens):
        draft = draft_step(logits, config, estimator, streams)
        record = TokenRecord.kept(len(prompt_ids) + len(result.token_ids), draft.token, draft.u,
                                  draft.p_tilde.prob(draft.token), time.perf_counter() - t_step)
        if all_estimators:  # calibration: every estimator's u at this position, after the loop's own
            record.u_all = {n: float(e(logits, draft.token, streams.u)) for n, e in all_estimators.items()}
        send = should_send(draft, config, verifier)
        verdict = verify_step(verifier, pending, draft, config, n, result) if send else None
        if verdict is not None:
            record.verified(verdict, len(pending), verifier.report_target_prob)
            pending = []
        else:
            record.unverified = send  # sent, but the cloud is lost and the policy is to go on locally
            pending.append(draft.token)
        result.token_ids.append(record.token)
        result.records.append(record)
        if trace is not None:
            tr.write_token(trace, record)
        if record.token in model.eos_ids:
            result.stopped_at_eos = True
            break
        if len(result.token_ids) == config.max_new_tokens:
            break  # the last token needs no forward pass of its own
        if model.context_full(len(prompt_ids) + len(result.token_ids)):
            result.stopped_at_context_limit = True
            break
        t_step = time.perf_counter()
        logits = model.runtime.decode(record.token)  # a rejected draft is replaced before the SLM sees it
    if verifier is not None:
        verifier.close()
        result.uplink_bytes, result.downlink_bytes = verifier.uplink_bytes, verifier.downlink_bytes
    result.seconds = time.perf_counter() - t_start
    result.text = model.decode(result.token_ids)
    if trace is not None:
        tr.write_close(trace, len(result.token_ids), result.uplink_bytes, result.downlink_bytes, result.seconds,
                       result.text)
    return result

