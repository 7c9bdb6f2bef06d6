"""Prompt-level routing: before generating, decide from the SLM alone whether a prompt goes to the cloud.

The router runs on the edge, before the first drafted token, and sends the whole request to the verifier's
``Generate`` (cloud-only) when the prompt looks hard; otherwise the prompt runs hybrid (the default
policy). Its features come from the SLM only (numpy; never torch):

- prefill features, from the logits [n, N] of one forward pass over the prompt: the prompt's own surprisal
  (mean and max negative log-likelihood of prompt token i+1 given the tokens before it), the entropy
  and 1 - max p of the last position (the first drafted token's distribution), and the prompt length;
- first-k features: the SLM drafts the first ``k`` tokens alone (the hybrid loop's own ``draft_step`` with
  the same position-keyed seeds, so they are the default's first drafts) and the router keeps the mean
  and max of their uncertainty u (the default estimator, 1 - max p). The drafts are then thrown away.

A router is a tiny logistic regression over one feature set: standardize (x - mean) / scale, dot with
the weights, add the bias, squash: score = sigmoid(w . z + b) in (0, 1). Route to the cloud iff
score > threshold. The fitted numbers live in a JSON file (``save_router`` / ``load_router``), written by
``eval/routing.py`` which trains and calibrates it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge.hybrid import HybridConfig, Streams, draft_step
from edge.model import EdgeModel
from edge.uncertainty import get_estimator

ROUTER_FORMAT = 1  # the JSON layout's version
PREFILL_FEATURES = ("prompt_tokens", "nll_mean", "nll_max", "last_entropy", "last_u")
FIRST_K_FEATURES = ("draft_u_mean", "draft_u_max")
FEATURE_SETS = {  # router kind -> the features it reads
    "prefill": PREFILL_FEATURES,
    "first-k": FIRST_K_FEATURES,
    "both": PREFILL_FEATURES + FIRST_K_FEATURES,
}


class RouterFileError(ValueError):
    """A router JSON file that cannot be used (one-line message naming the file and the problem)."""


# --- features ---------------------------------------------------------------------------------------------

def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """log softmax of every row of ``logits`` [n, N], in float64; returns [n, N]."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def prefill_features(prompt_ids: list[int], logits: np.ndarray) -> dict[str, float]:
    """The prompt's features from the prefill logits [n, N] (row i = the distribution after prompt token i).

    Row i predicts prompt token i + 1, so the prompt's surprisal uses rows 0..n-2 against ids 1..n-1; the
    last row is the first drafted position's distribution (its entropy and 1 - max p, as the estimators
    compute them on raw logits).
    """
    logits = np.asarray(logits)
    n = len(prompt_ids)
    if logits.ndim != 2 or logits.shape[0] != n:
        raise ValueError(f"prefill logits must be [{n}, N] for a {n}-token prompt, got {list(logits.shape)}")
    if n > 1:
        logp = log_softmax_rows(logits[:-1])  # [n-1, N]
        nll = -logp[np.arange(n - 1), np.asarray(prompt_ids[1:])]  # [n-1]
        nll_mean, nll_max = float(nll.mean()), float(nll.max())
    else:
        nll_mean = nll_max = 0.0  # a one-token prompt predicts none of its own tokens
    last = logits[-1]
    rng = np.random.default_rng(0)  # closed-form estimators ignore it
    return {"prompt_tokens": float(n), "nll_mean": nll_mean, "nll_max": nll_max,
            "last_entropy": get_estimator("entropy")(last, 0, rng), "last_u": get_estimator("max-prob")(last, 0, rng)}


def draft_features(us: list[float]) -> dict[str, float]:
    """Mean and max u over the first drafted positions (0 when none was drafted)."""
    return {"draft_u_mean": float(np.mean(us)) if us else 0.0, "draft_u_max": float(np.max(us)) if us else 0.0}


@dataclass
class PromptFeatures:
    """One prompt's routing features and what computing them cost on the edge."""

    values: dict[str, float]
    draft_ids: list[int] = field(default_factory=list)  # SLM tokens drafted for routing only (thrown away)
    forwards: int = 1  # SLM forward passes: the prefill plus one per drafted token after the first
    seconds: float = 0.0

    @property
    def drafted_tokens(self) -> int:
        return len(self.draft_ids)


def extract_features(model: EdgeModel, prompt_ids: list[int], config: HybridConfig, k: int,
                     seed: int | None) -> PromptFeatures:
    """Prefill the prompt (every row's logits) and draft the first ``k`` tokens SLM-only with ``config``'s
    settings, codec and estimator, keyed by ``seed`` like the hybrid loop (``Streams``): every feature of
    ``FEATURE_SETS``. ``k`` = 0 drafts nothing (the prefill router). Leaves the SLM's cache dirty: the
    generation that follows starts with its own prefill (``runtime.prefill`` resets)."""
    t0 = time.perf_counter()
    runtime = model.runtime
    runtime.reset()
    rows = runtime.forward(list(prompt_ids))  # [n, N]
    values = prefill_features(prompt_ids, rows)
    estimator, streams, logits = get_estimator(config.estimator, k=config.samples), Streams(seed), rows[-1]
    us, ids, forwards = [], [], 1
    for j in range(k):
        position = len(prompt_ids) + j
        draft = draft_step(logits, config, estimator, streams, position)
        us.append(draft.u)
        ids.append(draft.token)
        if draft.token in model.eos_ids or j + 1 == k or model.context_full(position + 1):
            break  # nothing to draft after EOS; the last draft needs no forward of its own
        logits = runtime.decode(draft.token)
        forwards += 1
    values.update(draft_features(us))
    return PromptFeatures(values, draft_ids=ids, forwards=forwards, seconds=time.perf_counter() - t0)


# --- the classifier and its JSON file ----------------------------------------------------------------------

def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class RouterSpec:
    """A fitted router: feature set, standardization, logistic weights and the calibrated threshold."""

    kind: str  # a key of FEATURE_SETS
    k: int  # tokens drafted for the first-k features (0 when the kind reads none)
    mean: tuple[float, ...]  # [F] standardization: z = (x - mean) / scale
    scale: tuple[float, ...]  # [F] > 0
    weights: tuple[float, ...]  # [F]
    bias: float
    threshold: float = math.inf  # route to the cloud iff score > threshold; +inf = never
    meta: dict = field(default_factory=dict)  # how it was trained and calibrated (free-form, for reports)

    @property
    def features(self) -> tuple[str, ...]:
        return FEATURE_SETS[self.kind]

    def score_values(self, values: dict[str, float]) -> float:
        """sigmoid(w . (x - mean) / scale + b) for a prompt's feature ``values``; a plain loop over F (a few
        numbers: no BLAS call)."""
        logit = self.bias
        for name, m, s, w in zip(self.features, self.mean, self.scale, self.weights):
            logit += w * (values[name] - m) / s
        return sigmoid(logit)

    def with_threshold(self, threshold: float, **meta) -> RouterSpec:
        return RouterSpec(self.kind, self.k, self.mean, self.scale, self.weights, self.bias, float(threshold),
                          {**self.meta, **meta})


def to_cloud(score: float, threshold: float) -> bool:
    """The routing decision: the whole prompt goes to Generate iff its score is above the threshold."""
    return score > threshold


def _json_number(x: float):
    return x if math.isfinite(x) else str(x)  # JSON has no infinities: "inf" / "-inf"


def save_router(path: str | Path, spec: RouterSpec) -> None:
    data = {"format": ROUTER_FORMAT, **asdict(spec), "features": list(spec.features)}
    data["threshold"] = _json_number(spec.threshold)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def _number_list(data: dict, key: str, length: int, source: str) -> tuple[float, ...]:
    values = data.get(key)
    if not isinstance(values, list) or len(values) != length:
        raise RouterFileError(f"{source}: {key!r} must be a list of {length} numbers (one per feature)")
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise RouterFileError(f"{source}: {key!r} holds a non-number") from None
    if not all(math.isfinite(v) for v in out):
        raise RouterFileError(f"{source}: {key!r} holds a non-finite number")
    return out


def parse_router(data, source: str = "router") -> RouterSpec:
    """A RouterSpec from parsed JSON, every field checked; RouterFileError names the first problem."""
    if not isinstance(data, dict):
        raise RouterFileError(f"{source}: a router file is a JSON object, got {type(data).__name__}")
    if data.get("format") != ROUTER_FORMAT:
        raise RouterFileError(f"{source}: unsupported router format {data.get('format')!r} (expected {ROUTER_FORMAT})")
    kind = data.get("kind")
    if kind not in FEATURE_SETS:
        raise RouterFileError(f"{source}: unknown router kind {kind!r}; known: {', '.join(FEATURE_SETS)}")
    if "features" in data and list(data["features"]) != list(FEATURE_SETS[kind]):
        raise RouterFileError(f"{source}: features {data['features']} do not match kind {kind!r} "
                              f"({list(FEATURE_SETS[kind])})")
    k = data.get("k")
    needs_drafts = any(f in FIRST_K_FEATURES for f in FEATURE_SETS[kind])
    if not isinstance(k, int) or isinstance(k, bool) or k < 0 or (needs_drafts and k < 1):
        raise RouterFileError(f"{source}: 'k' must be an integer >= {1 if needs_drafts else 0} for kind {kind!r}, "
                              f"got {k!r}")
    n = len(FEATURE_SETS[kind])
    mean, scale, weights = (_number_list(data, key, n, source) for key in ("mean", "scale", "weights"))
    if any(s <= 0 for s in scale):
        raise RouterFileError(f"{source}: every 'scale' must be > 0")
    try:
        bias, threshold = float(data["bias"]), float(data.get("threshold", math.inf))
    except KeyError:
        raise RouterFileError(f"{source}: no 'bias'") from None
    except (TypeError, ValueError):
        raise RouterFileError(f"{source}: 'bias' and 'threshold' must be numbers (threshold may be \"inf\")") from None
    if not math.isfinite(bias) or math.isnan(threshold):
        raise RouterFileError(f"{source}: 'bias' must be finite and 'threshold' a number")
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise RouterFileError(f"{source}: 'meta' must be an object")
    return RouterSpec(kind, k, mean, scale, weights, bias, threshold, meta)


def load_router(path: str | Path) -> RouterSpec:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RouterFileError(f"cannot read router file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RouterFileError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_router(data, str(path))


class Router:
    """A fitted router on an edge model: ``score(prompt_ids)`` in (0, 1), ``route`` = score > threshold.

    ``config`` gives the first-k drafts their sampling settings, codec and estimator (the hybrid loop's);
    ``last`` holds the most recent prompt's features and their cost (drafted tokens, forwards, seconds).
    """

    def __init__(self, model: EdgeModel, spec: RouterSpec, config: HybridConfig):
        self.model, self.spec, self.config = model, spec, config
        self.last: PromptFeatures | None = None

    @property
    def threshold(self) -> float:
        return self.spec.threshold

    def score(self, prompt_ids: list[int], seed: int | None = 0) -> float:
        k = self.spec.k if any(f in FIRST_K_FEATURES for f in self.spec.features) else 0
        self.last = extract_features(self.model, prompt_ids, self.config, k, seed)
        return self.spec.score_values(self.last.values)

    def route(self, prompt_ids: list[int], seed: int | None = 0, threshold: float | None = None) -> bool:
        """True: send the whole request to the cloud (Generate); False: run it hybrid."""
        return to_cloud(self.score(prompt_ids, seed), self.threshold if threshold is None else threshold)
