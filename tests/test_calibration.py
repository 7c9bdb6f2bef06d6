"""Threshold calibration: the line fit recovers a known line; thresholds follow their formulas."""

import numpy as np
import pytest

from edge.calibration import beta, empirical_threshold, fit_line


def test_fit_recovers_known_line():
    rng = np.random.default_rng(0)
    u = rng.uniform(0, 1, 5000)
    b = 0.8 * u - 0.1 + rng.normal(0, 0.01, u.size)
    fit = fit_line(u, b)
    assert fit.a == pytest.approx(0.8, abs=0.01) and fit.b == pytest.approx(-0.1, abs=0.01) and fit.r2 > 0.95
    assert fit.risk_averse_threshold == pytest.approx(0.125, abs=0.01)
    assert fit.risk_prone_threshold(0.1) == pytest.approx(0.25, abs=0.01)


def test_beta_formula():
    np.testing.assert_allclose(beta([0.5, 0.2, 1.0], [0.25, 0.4, 0.0]), [0.5, 0.0, 1.0])


def test_empirical_threshold_is_largest_meeting_target():
    u = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    b = np.array([0.0, 0.0, 0.03, 0.5, 0.9])
    assert empirical_threshold(u, b, target=0.01) == 0.2  # mean beta of {0, 0, 0.03} = 0.01
    assert empirical_threshold(u, b, target=0.0) == 0.1
    assert empirical_threshold(np.array([0.5, 0.5]), np.array([0.0, 1.0]), 0.1) == float("-inf")
