"""The verifier's batched service time, fitted from the real engine's measured forwards, and the engine's rule
for what one forward holds.

The engine (``cloud/batching.py``) takes whatever is queued when the model frees up, oldest first, while
the new tokens fit its budget (``max_batch_tokens``), splits that by tail length into forwards
(``plan_forwards``: padding a 40-token prefill onto 30 one-token decode steps costs more than another
forward) and runs them one after the other. A request's tail is the tokens its forward feeds: 1 for a
cloud-only decode step, 1 + pending ids for a Verify, the prompt (+ pending) on a session's first. One
forward left-pads the tails to the longest and runs the output layer on the last column only (blocks of
one drafted position: one logits row per request). So a forward is described by (``batch_features``)::

    batch = 1, multi_row = 1 if more than one request (padded caches) else 0, rows = r,
    padded_tokens = r * longest tail, rows_sq = r^2

(``rows_sq``: on the demo LLM a row costs more in a larger forward, whose padded caches and logits leave
the CPU's caches: 256 one-token rows measured ~3x 128 of them), and its time is a linear model in some of
them, fitted by least squares with non-negative coefficients on the medians that ``bench/verifier_service.py`` measured (uniform and mixed batch shapes). Each
candidate (``CANDIDATES``) is fitted in relative terms (every shape's residual divided by its time: the
shapes span two orders of magnitude, and a single device's latency depends on the small ones); the one
with the smallest Akaike criterion on those relative residuals is kept (``S ln(RSS/S) + 2k``: a term that
only fits noise does not pay), its R² on the plain scale reported.

The JSON written by the measurement (``{"model": BatchedServiceModel.as_dict(), "points": ...}``) is what
``verifier.service = "batched:PATH"`` loads (``load_batched``). ``max_rows``: the largest forward measured;
``max_batch`` defaults to it (no extrapolation past the measured range).

``plan_forwards`` is the engine's own rule (``core.batch_plan``); ``tests/test_simulate_capacity.py`` checks
that the simulator's take-and-split gives the engine's forwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.batch_plan import plan_forwards
from simulate.compute import nonneg_lstsq, r_squared

FEATURES = ("batch", "multi_row", "rows", "padded_tokens", "rows_sq")
OPTIONAL = ("multi_row", "rows", "rows_sq")  # every candidate has batch and padded_tokens, and a subset of these
CANDIDATES = tuple(("batch", *(n for k, n in enumerate(OPTIONAL) if mask >> k & 1), "padded_tokens")
                   for mask in range(2 ** len(OPTIONAL)))


def batch_features(tails) -> dict[str, int]:
    """What one padded forward over requests with these tails computes."""
    rows = len(tails)
    return {"batch": 1, "multi_row": int(rows > 1), "rows": rows, "padded_tokens": rows * max(tails),
            "rows_sq": rows * rows}


@dataclass(frozen=True)
class BatchedServiceModel:
    coefficients: dict[str, float]  # feature -> seconds per unit ("batch": per forward)
    samples: int  # batch shapes fitted
    r2: float | None
    max_rel_error: float  # the largest |fit - measured| / measured over the shapes
    max_batch_tokens: int  # the engine's budget of new tokens taken at once (and of padded tokens per forward)
    max_rows: int  # the largest forward measured
    overhead_tokens: int  # the engine's split rule: a forward's fixed cost in padded tokens (``plan_forwards``)
    rms_rel_error: float | None = None  # RMS of |fit - measured| / measured

    def batch_time(self, tails) -> float:
        """Seconds of one forward over requests with these tails."""
        f = batch_features(tails)
        return sum(c * f[name] for name, c in self.coefficients.items())

    def time(self, tokens: int) -> float:
        """One request alone (the trace model's interface)."""
        return self.batch_time((tokens,))

    def plan(self, tails: list[int]) -> list[list[int]]:
        return plan_forwards(tails, self.max_batch_tokens, self.overhead_tokens)

    @property
    def formula(self) -> str:
        return " + ".join(f"{c * 1e3:.4g} ms" + ("" if name == "batch" else f" x {name}")
                          for name, c in self.coefficients.items())

    def as_dict(self) -> dict:
        return {"kind": "batched", "coefficients": self.coefficients, "formula": self.formula, "samples": self.samples,
                "r2": self.r2, "max_rel_error": self.max_rel_error, "rms_rel_error": self.rms_rel_error,
                "max_batch_tokens": self.max_batch_tokens, "max_rows": self.max_rows,
                "overhead_tokens": self.overhead_tokens}


def _fit_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients c >= 0 minimizing sum(((x c - y) / y)^2): ``x`` [S, F], ``y`` [S] seconds."""
    return nonneg_lstsq(x / y[:, None], np.ones_like(y))


def _aic(x: np.ndarray, y: np.ndarray) -> float:
    """Akaike's criterion of the relative fit (floored: exact fits tie, and the fewest terms win)."""
    rel = (x @ _fit_relative(x, y) - y) / y  # [S]
    return len(y) * float(np.log(max(float(rel @ rel), 1e-20) / len(y))) + 2 * x.shape[1]


def fit_batched(shapes: list, seconds: list[float], max_batch_tokens: int, overhead_tokens: int) -> BatchedServiceModel:
    """The best of ``CANDIDATES`` fitted to (batch shape as its rows' tails, measured seconds)."""
    y = np.asarray(seconds, dtype=float)  # [S]
    table = [batch_features(t) for t in shapes]
    columns = {name: np.array([f[name] for f in table], dtype=float) for name in FEATURES}  # name -> [S]
    names = min(CANDIDATES, key=lambda c: _aic(np.column_stack([columns[n] for n in c]), y))
    x = np.column_stack([columns[n] for n in names])  # [S, F]
    fit = x @ (coef := _fit_relative(x, y))
    rel = np.abs(fit - y) / y  # [S]
    return BatchedServiceModel({n: float(c) for n, c in zip(names, coef) if c > 0}, len(y), r_squared(y, fit),
                               float(rel.max()), int(max_batch_tokens), max(len(t) for t in shapes),
                               int(overhead_tokens), float(np.sqrt(np.mean(rel**2))))


def load_batched(path: str | Path) -> BatchedServiceModel:
    """The model a measurement file holds (ValueError with the reason when it holds none)."""
    try:
        raw = json.loads(Path(path).read_text())["model"]
        coefficients = {str(k): float(v) for k, v in raw["coefficients"].items()}
        if not coefficients or set(coefficients) - set(FEATURES) or min(coefficients.values()) < 0:
            raise ValueError(f"coefficients must be >= 0 and named from {FEATURES}")
        return BatchedServiceModel(coefficients, int(raw["samples"]), raw.get("r2"), float(raw["max_rel_error"]),
                                   int(raw["max_batch_tokens"]), int(raw["max_rows"]), int(raw["overhead_tokens"]),
                                   raw.get("rms_rel_error"))
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} holds no batched service model ({type(exc).__name__}: {exc})") from None
