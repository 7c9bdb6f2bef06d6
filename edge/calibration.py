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
