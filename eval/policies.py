"""The one table of collaboration policies: every configuration the project measures is one row here.

A policy says where tokens come from (``route``), how the edge decides to send (estimator, threshold)
and what it sends (codec). Span- and step-level modes (route ``coarse``, ``edge/coarse.py``) use the same
threshold as their trigger, gate or first verified position. Thresholds are either fixed numbers or a calibration rule applied to the
policy's own estimator (``averse``: U-HLM's -b/a; ``empirical``: the largest u_th whose skipped tokens'
mean rejection stays under the target). ``make demo``, ``python -m simulate record``, the testbed's
edge and the tests all read this table; none keeps a list of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from core.sampling import SamplingSettings
from edge.coarse import CoarseConfig
from edge.hybrid import HybridConfig
from edge.uncertainty import DEFAULT_ESTIMATOR
from models.task import MAX_SOLUTION_TOKENS
from proto.distribution import CodecSpec

# routes: SLM alone, SLM + verifier token by token, LLM alone, SLM + verifier by spans or steps, and a router
# choosing per prompt between the LLM alone and token-level hybrid (eval/routing.py)
LOCAL, HYBRID, GENERATE, COARSE, ROUTED = "local", "hybrid", "generate", "coarse", "routed"
PIPELINED_LOOKAHEAD = 16  # default-pipelined's lookahead


@dataclass(frozen=True)
class Policy:
    name: str
    route: str
    summary: str
    estimator: str = DEFAULT_ESTIMATOR
    codec: str = "adaptive"
    threshold: float | str = math.inf  # a number, or a calibration rule name ("averse", "empirical")
    exact: bool = True  # verified tokens follow the LLM exactly; False = draft-dependent sending (biased)
    lookahead: int = 0  # protocol v2: tokens drafted past the oldest unresolved Verify; 0 = stop-and-wait
    mode: str = ""  # route coarse: span-uncertainty | span-learned | step-judge | step-exact
    gated: bool = False  # step-judge: send only steps with a position above the threshold
    judge_score: str = "min"  # step-judge: the step's score, "min" or "mean" over the step of q(x)/max q
    judge_threshold: float = 0.5  # step-judge: keep a step scoring at least this
    slm: str = "demo"  # the edge model it runs (eval/slms.py): demo, span, conditioned, distilled

    @property
    def calibrated(self) -> bool:
        return isinstance(self.threshold, str)

    def threshold_from(self, fits: dict | None) -> float:
        """The policy's u_th: its fixed number, or its rule read from calibration ``fits`` (per estimator)."""
        if not self.calibrated:
            return float(self.threshold)
        if fits is None:
            raise ValueError(f"policy {self.name!r} needs calibration fits for its {self.threshold} threshold")
        return float(fits[self.estimator][self.threshold])

    def config(self, settings: SamplingSettings, threshold: float,
               max_new_tokens: int = MAX_SOLUTION_TOKENS) -> HybridConfig:
        """The edge loop's configuration for this policy (not for the ``generate`` route)."""
        if self.route == GENERATE:
            raise ValueError(f"policy {self.name!r} runs on the verifier (Generate), not in the edge loop")
        return HybridConfig(threshold=threshold, estimator=self.estimator, codec=CodecSpec(self.codec),
                            settings=settings, max_new_tokens=max_new_tokens, lookahead=self.lookahead)

    def coarse(self, settings: SamplingSettings, threshold: float, step_end_ids: frozenset[int],
               marker_id: int | None = None, max_new_tokens: int = MAX_SOLUTION_TOKENS,
               step_end_chars: str = "") -> CoarseConfig:
        """The span/step loop's configuration for this policy (route ``coarse`` only)."""
        if self.route != COARSE:
            raise ValueError(f"policy {self.name!r} is not a span or step mode")
        hybrid = HybridConfig(threshold=threshold, estimator=self.estimator, codec=CodecSpec(self.codec),
                              settings=settings, max_new_tokens=max_new_tokens)
        return CoarseConfig(self.mode, hybrid, step_end_ids, gated=self.gated, marker_id=marker_id,
                            judge_score=self.judge_score, judge_threshold=self.judge_threshold,
                            step_end_chars=step_end_chars)

    def at(self, threshold: float) -> Policy:
        """The same policy at a fixed threshold, named ``name@u_th`` (threshold sweeps)."""
        return replace(self, name=f"{self.name}@{threshold:g}", threshold=float(threshold))


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("slm-only", LOCAL, "the SLM alone: nothing is sent", codec="full32"),
    Policy("llm-only", GENERATE, "the verifier generates every token (Generate, cloud-only)"),
    Policy("hlm", HYBRID, "HLM: verify every token, full float32 distribution", codec="full32",
           threshold=-math.inf),
    Policy("u-hlm", HYBRID, "U-HLM: K=20 perturbed samples vs the draft, full32, risk-averse threshold",
           estimator="uhlm", codec="full32", threshold="averse", exact=False),
    Policy("cu-hlm", HYBRID, "CU-HLM-like: U-HLM's rule, top-30 with 8-bit counts", estimator="uhlm",
           codec="topk", threshold="averse", exact=False),
    Policy("default", HYBRID, "this project: 1 - max p (draft-independent), adaptive codec, empirical threshold",
           estimator=DEFAULT_ESTIMATOR, codec="adaptive", threshold="empirical"),
    Policy("default-pipelined", HYBRID, f"default, drafting up to {PIPELINED_LOOKAHEAD} tokens past the oldest "
           "unresolved Verify (protocol v2; the same tokens as default)", estimator=DEFAULT_ESTIMATOR, codec="adaptive",
           threshold="empirical", lookahead=PIPELINED_LOOKAHEAD),
    Policy("span-uncertainty", COARSE, "SplitReason-style span offload: where u > u_th the LLM writes the rest of the "
           "step (inexact: unverified SLM text)", threshold="empirical", exact=False, mode="span-uncertainty"),
    Policy("step-judge", COARSE, "SpecReason-style: every drafted step's ids are scored by the LLM, kept or "
           "regenerated (inexact by design)", threshold="empirical", exact=False, mode="step-judge"),
    # the mean at 0.9: a ~6-token step with one token below 0.5 (what min rejects) has a mean below ~0.92; at 0.5
    # the mean kept every step (measured: the SLM's own accuracy, 60.7% at T = 1 on 1000 problems)
    Policy("step-judge-mean", COARSE, "step-judge scoring a step by the mean of q(x)/max q, kept at >= 0.9 "
           "(inexact by design)", threshold="empirical", exact=False, mode="step-judge", judge_score="mean",
           judge_threshold=0.9),
    Policy("step-judge-gated", COARSE, "step-judge, sending only steps with a position above u_th (inexact by design)",
           threshold="empirical", exact=False, mode="step-judge", gated=True),
    Policy("span-learned", COARSE, "SplitReason-style span offload triggered by the span SLM drawing its offload "
           "marker (python -m models span-slm; inexact: unverified SLM text)", threshold=math.inf, exact=False,
           mode="span-learned", slm="span"),
    Policy("conditioned-slm-only", HYBRID, "LLM-to-SLM: the conditioned SLM alone, fed the LLM's prompt encoding "
           "(returned by Open; no Verify is ever sent)", threshold=math.inf, slm="conditioned"),
    Policy("conditioned-slm-zeros", LOCAL, "the conditioned SLM with no verifier: zero conditioning", codec="full32",
           slm="conditioned"),
    Policy("conditioned", HYBRID, "default on the conditioned SLM (its own calibrated threshold)",
           threshold="empirical", slm="conditioned"),
    Policy("distilled-slm-only", LOCAL, "the distilled SLM alone (python -m models distill)", codec="full32",
           slm="distilled"),
    Policy("distilled", HYBRID, "default on the distilled SLM (its own calibrated threshold)", threshold="empirical",
           slm="distilled"),
    Policy("routed", ROUTED, "a router on the SLM's prompt features sends whole prompts to Generate, the rest run "
           "default (eval/routing.py)", threshold="empirical"),
    Policy("step-exact", COARSE, "exact step verification: from a step's first position above u_th to its end, "
           "every p~ as one block (multi-token speculative sampling)", threshold="empirical", mode="step-exact"),
)}


def on_slm(slm: str = "demo") -> dict[str, Policy]:
    """The policies that run edge model ``slm`` with nothing else trained, in table order (``make demo`` and
    ``simulate record`` run the demo SLM's; the others need their own model built first, ``eval/slms.py``, and
    ``routed`` its router trained, ``eval/routing.py``)."""
    return {name: p for name, p in POLICIES.items() if p.slm == slm and p.route != ROUTED}


def get_policy(name: str) -> Policy:
    """A policy by name; ``NAME@U`` is policy NAME at the fixed threshold U (e.g. ``default@0.06``)."""
    base, _, at = name.partition("@")
    if base not in POLICIES:
        raise ValueError(f"unknown policy {base!r}; known: {', '.join(POLICIES)}")
    if not at:
        return POLICIES[base]
    try:
        return POLICIES[base].at(float(at))
    except ValueError:
        raise ValueError(f"policy {name!r}: the part after @ must be a threshold, e.g. default@0.06") from None
