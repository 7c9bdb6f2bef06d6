"""Threshold calibration (U-HLM): fit beta = a*u + b on verify-all data and turn it into thresholds.

beta = max(0, 1 - q(x)/p~(x)) is the probability that the verifier would reject draft x. It is computed
here on the edge from the verifier's reported q(x) (``Open.report_target_prob``) and the edge's own p~(x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def beta(draft_prob: np.ndarray, target_prob: np.ndarray) -> np.ndarray:
    """Per-token rejection probability max(0, 1 - q(x)/p~(x)); p~(x) > 0 for any drawn draft."""
    return np.maximum(0.0, 1.0 - np.asarray(target_prob) / np.asarray(draft_prob))


@dataclass(frozen=True)
class LineFit:
    a: float
    b: float
    r2: float

    @property
    def risk_averse_threshold(self) -> float:
        """U-HLM's risk-averse u_th = -b/a: where the fitted rejection probability reaches 0."""
        return -self.b / self.a if self.a > 0 else float("inf")

    def risk_prone_threshold(self, tolerated: float) -> float:
        """u_th where the fitted rejection probability reaches ``tolerated``."""
        return (tolerated - self.b) / self.a if self.a > 0 else float("inf")


def fit_line(u: np.ndarray, b: np.ndarray) -> LineFit:
    """Least-squares beta = a*u + b, with r^2."""
    u, b = np.asarray(u, dtype=float), np.asarray(b, dtype=float)
    a, intercept = np.polyfit(u, b, 1)
    resid = b - (a * u + intercept)
    total = ((b - b.mean()) ** 2).sum()
    return LineFit(float(a), float(intercept), float(1 - (resid**2).sum() / total) if total > 0 else 0.0)


def empirical_threshold(u: np.ndarray, b: np.ndarray, target: float) -> float:
    """Largest u_th such that the mean beta of the tokens it skips (u <= u_th) stays <= ``target``."""
    order = np.argsort(u, kind="stable")
    u_sorted, b_sorted = np.asarray(u)[order], np.asarray(b)[order]
    running = np.cumsum(b_sorted) / np.arange(1, len(b_sorted) + 1)  # mean beta of the i+1 smallest u
    # a threshold must not split tokens with equal u: only the last index of each u value is a candidate
    last_of_value = np.r_[u_sorted[1:] != u_sorted[:-1], True]
    ok = np.flatnonzero((running <= target) & last_of_value)
    return float(u_sorted[ok[-1]]) if len(ok) else float("-inf")


# ---------------------------------------------------------------------------------------------------
# calibration.json: the (u, beta) data of a verify-all run, per-estimator fits and thresholds


def estimator_data(records) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """beta [N] and u [N] per estimator from verify-all TokenRecords (``record_all_estimators`` runs)."""
    b = beta([r.draft_prob for r in records], [r.target_prob for r in records])
    names = records[0].u_all if records else {}
    return b, {n: np.array([r.u_all[n] for r in records]) for n in names}


def fit_estimators(b: np.ndarray, us: dict[str, np.ndarray], target: float, tolerated: float) -> dict:
    """Per estimator: the U-HLM line fit and its three thresholds (risk-averse, risk-prone, empirical)."""
    out = {}
    for name, u in us.items():
        fit = fit_line(u, b)
        out[name] = {"a": fit.a, "b": fit.b, "r2": fit.r2, "averse": fit.risk_averse_threshold,
                     "prone": fit.risk_prone_threshold(tolerated), "empirical": empirical_threshold(u, b, target)}
    return out


def check_on_test(fits: dict, b: np.ndarray, us: dict[str, np.ndarray]) -> dict:
    """How well each threshold predicts the skipped tokens' rejection mass on held-out tokens.

    predicted = mean of the fitted line clip(a*u + b, 0, 1) over the test tokens the threshold skips;
    measured = mean beta of those same tokens (beta from the verifier's q(x)); tr = share sent.
    """
    out = {}
    for name, fit in fits.items():
        u = us[name]
        out[name] = {}
        for rule in ("averse", "prone", "empirical"):
            skipped = u <= fit[rule]
            line = np.clip(fit["a"] * u[skipped] + fit["b"], 0.0, 1.0)
            out[name][rule] = {
                "threshold": fit[rule],
                "transmission_rate": float(1 - skipped.mean()),
                "predicted_skipped_beta": float(line.mean()) if skipped.any() else 0.0,
                "measured_skipped_beta": float(b[skipped].mean()) if skipped.any() else 0.0,
            }
    return out


def _finite(x):
    """JSON has no infinities: thresholds of +-inf are written as strings and read back as floats."""
    return x if not isinstance(x, float) or np.isfinite(x) else str(x)


def save_calibration(path, data: dict) -> None:
    import json

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return _finite(float(v)) if isinstance(v, (float, np.floating)) else v

    with open(path, "w") as f:
        json.dump(clean(data), f, indent=1)


def load_calibration(path) -> dict:
    import json

    with open(path) as f:
        data = json.load(f)
    for key in ("fits", "beta", "u", "target", "tolerated"):
        if key not in data:
            raise ValueError(f"{path} is not a calibration file (no {key!r}); create one with python -m eval calibrate")
    return data


def threshold_for(data: dict, estimator: str, risk: str) -> float:
    """Threshold for ``estimator`` from a calibration: ``averse``, ``prone`` or a numeric target (empirical)."""
    if estimator not in data["fits"]:
        raise ValueError(f"calibration has no estimator {estimator!r}; it has {sorted(data['fits'])}")
    if risk in ("averse", "prone"):
        return float(data["fits"][estimator][risk])
    try:
        target = float(risk)
    except ValueError:
        raise ValueError(f"--risk must be averse, prone or a number (tolerated mean rejection), got {risk!r}") from None
    return empirical_threshold(np.array(data["u"][estimator]), np.array(data["beta"]), target)
