"""The hybrid decode loop: the SLM drafts every token, sends only the uncertain ones to the verifier.

Per position (DESIGN.md, "The per-token protocol"):
1. p = the SLM's distribution under the session's sampling settings;
2. p~ = compress(p): the exact distribution that would be sent;
3. draft x ~ p~ (never from p: that is what keeps verification exact);
4. u = uncertainty of the position; if u > threshold, send Verify{pending ids, x, p~} and take the
   verifier's token, else keep x and append it to the pending list.
Every token is recorded (``TokenRecord``) and optionally written as a JSON line: the simulator replays
these traces.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TextIO

import numpy as np

from edge.client import VerifierError, VerifierSession
from edge.model import EdgeModel
from edge.sampling import SamplingSettings, probabilities
from edge.uncertainty import DEFAULT_ESTIMATOR, ESTIMATORS, get_estimator
from proto.codec import CodecSpec, compress, encode


@dataclass(frozen=True)
class HybridConfig:
    threshold: float = 0.0  # send iff u > threshold; -inf = verify every token (HLM), +inf = SLM-only
    estimator: str = DEFAULT_ESTIMATOR
    codec: CodecSpec = CodecSpec("adaptive")
    settings: SamplingSettings = SamplingSettings()
    max_new_tokens: int = 64
    samples: int = 20  # K of the perturbation estimators
    record_all_estimators: bool = False  # calibration: compute every estimator's u at every position


@dataclass
class TokenRecord:
    """One generated position, as written to the trace."""

    position: int  # index in the full sequence (prompt included)
    token: int  # the token kept at this position
    draft: int
    u: float
    sent: bool
    bytes: int  # uplink wire bytes of this position's Verify (0 when skipped)
    accepted: bool | None  # None when not sent
    returned: int | None  # the verifier's token when sent
    slm_step_s: float  # SLM forward + sampling + compression + uncertainty for this position
    wait_s: float  # waiting for the verdict (0 when skipped)
    draft_prob: float = 0.0  # p~(draft)
    target_prob: float | None = None  # q(draft), when the verifier reports it (calibration runs)
    u_all: dict | None = None  # every estimator's u at this position (calibration runs)
    pending: int = 0  # kept tokens this Verify carried up (prefilled by the verifier with this position)
    down_bytes: int = 0  # downlink wire bytes of this position's Verdict
    server_s: float = 0.0  # the verifier's own time for this Verify (its share of wait_s)
    unverified: bool = False  # should have been verified, but no verifier was reachable (--on-cloud-loss local)


@dataclass
class HybridResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    records: list[TokenRecord] = field(default_factory=list)
    text: str = ""
    stopped_at_eos: bool = False
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


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def write_trace_line(out: TextIO, record: TokenRecord) -> None:
    row = {"kind": "token", **asdict(record)}
    row["u"] = _json_float(row["u"])
    out.write(json.dumps(row) + "\n")


def write_trace_open(out: TextIO, config: HybridConfig, prompt_tokens: int, session: VerifierSession | None) -> None:
    """The first line of a generation in a trace: its configuration and the Open/Opened sizes."""
    row = {"kind": "open", "prompt_tokens": prompt_tokens, "estimator": config.estimator,
           "codec": asdict(config.codec), "threshold": _json_float(config.threshold),
           "temperature": config.settings.temperature, "verifier": session is not None,
           "uplink_bytes": session.uplink_bytes if session else 0,
           "downlink_bytes": session.downlink_bytes if session else 0}
    out.write(json.dumps(row) + "\n")


def write_trace_close(out: TextIO, result: HybridResult) -> None:
    """The last line of a generation: totals (all messages, Open and Close included) and wall time."""
    row = {"kind": "close", "tokens": len(result.token_ids), "uplink_bytes": result.uplink_bytes,
           "downlink_bytes": result.downlink_bytes, "seconds": result.seconds, "text": result.text}
    out.write(json.dumps(row) + "\n")


def _verify_keeping_partial(session, pending, draft, payload, result: HybridResult):
    """``session.verify``; a failure carries the tokens generated so far (``exc.partial``): nothing is lost."""
    try:
        return session.verify(pending, draft, payload)
    except VerifierError as exc:
        exc.partial = result
        session.close()
        raise


def generate_hybrid(
    model: EdgeModel,
    prompt_ids: list[int],
    config: HybridConfig,
    seed: int | None = None,
    open_session: Callable[[list[int]], VerifierSession] | None = None,
    trace: TextIO | None = None,
) -> HybridResult:
    """Generate with the SLM, verifying uncertain tokens through ``open_session(prompt_ids)``'s session.

    Without ``open_session`` (or with threshold +inf) nothing is ever sent: SLM-only generation that
    draws from the same compressed distribution.
    """
    estimator = get_estimator(config.estimator, k=config.samples)
    all_estimators = {n: get_estimator(n, k=config.samples) for n in ESTIMATORS} if config.record_all_estimators else {}
    # Separate streams: the send decision's randomness must not be correlated with the draft's.
    draft_rng, u_rng = (np.random.default_rng([seed, i]) if seed is not None else np.random.default_rng()
                        for i in (0, 1))
    vocab = model.runtime.vocab_size
    result = HybridResult(list(prompt_ids))
    session = open_session(list(prompt_ids)) if open_session else None
    if trace is not None:
        write_trace_open(trace, config, len(prompt_ids), session)
    t_start = time.perf_counter()
    t_step = time.perf_counter()
    logits = model.runtime.prefill(prompt_ids)
    pending: list[int] = []
    for _ in range(config.max_new_tokens):
        p_tilde = compress(probabilities(logits, config.settings), config.codec)
        draft = p_tilde.sample(draft_rng)
        u = estimator(logits, draft, u_rng)
        slm_step = time.perf_counter() - t_step
        record = TokenRecord(len(prompt_ids) + len(result.token_ids), draft, draft, float(u), False, 0, None,
                             None, slm_step, 0.0, draft_prob=p_tilde.prob(draft))
        if all_estimators:
            record.u_all = {n: float(e(logits, draft, u_rng)) for n, e in all_estimators.items()}
        verdict = None
        if session is not None and u > config.threshold:
            verdict = _verify_keeping_partial(session, pending, draft, encode(p_tilde, config.codec, vocab), result)
            record.unverified = verdict is None  # the cloud is lost and the policy is to go on locally
        if verdict is not None:
            record.pending, record.down_bytes, record.server_s = len(pending), verdict.downlink_bytes, \
                verdict.server_seconds
            pending = []
            record.sent, record.bytes, record.accepted = True, verdict.uplink_bytes, verdict.accepted
            record.returned, record.token, record.wait_s = verdict.token, verdict.token, verdict.wait_seconds
            record.target_prob = verdict.target_prob if session.report_target_prob else None
        else:
            pending.append(draft)
        result.token_ids.append(record.token)
        result.records.append(record)
        if trace is not None:
            write_trace_line(trace, record)
        if record.token in model.eos_ids:
            result.stopped_at_eos = True
            break
        t_step = time.perf_counter()
        if len(result.token_ids) < config.max_new_tokens:
            logits = model.runtime.decode(record.token)  # a rejected draft is replaced before the SLM sees it
    if session is not None:
        session.close()
        result.uplink_bytes, result.downlink_bytes = session.uplink_bytes, session.downlink_bytes
    result.seconds = time.perf_counter() - t_start
    result.text = model.decode(result.token_ids)
    if trace is not None:
        write_trace_close(trace, result)
    return result
