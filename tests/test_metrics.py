"""`reports.regression_metrics` against hand-derived values and numpy / scipy on known data."""
import math

import numpy as np
import pytest
from scipy import stats

from molfun_jax.reports import regression_metrics


def test_known_values():
    t = [1.0, 2.0, 3.0, 4.0]
    p = [1.5, 1.5, 3.5, 5.0]  # errors 0.5, -0.5, 0.5, 1.0
    m = regression_metrics(t, p)
    assert m["n"] == 4
    assert m["rmse"] == pytest.approx(math.sqrt((0.25 * 3 + 1.0) / 4), rel=1e-12)
    assert m["mae"] == pytest.approx(0.625, rel=1e-12)
    # Pearson by hand: centred t = -1.5,-.5,.5,1.5; centred p = -1.375,-1.375,.625,2.125
    ct, cp = np.array([-1.5, -0.5, 0.5, 1.5]), np.array([-1.375, -1.375, 0.625, 2.125])
    assert m["pearson"] == pytest.approx(ct @ cp / math.sqrt((ct @ ct) * (cp @ cp)), rel=1e-12)
    # Spearman: ranks of p with the tie averaged: 1.5, 1.5, 3, 4
    rt, rp = np.array([1, 2, 3, 4.0]), np.array([1.5, 1.5, 3, 4])
    rt, rp = rt - rt.mean(), rp - rp.mean()
    assert m["spearman"] == pytest.approx(rt @ rp / math.sqrt((rt @ rt) * (rp @ rp)), rel=1e-12)


def test_random_data_against_numpy_and_scipy():
    rng = np.random.default_rng(0)
    t = rng.normal(6.0, 2.0, 200)
    p = t + rng.normal(0.0, 1.0, 200)
    p[:20] = np.round(p[:20])  # some ties
    m = regression_metrics(t, p)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((p - t) ** 2)), rel=1e-12)
    assert m["mae"] == pytest.approx(np.mean(np.abs(p - t)), rel=1e-12)
    assert m["pearson"] == pytest.approx(np.corrcoef(t, p)[0, 1], rel=1e-10)
    assert m["spearman"] == pytest.approx(stats.pearsonr(stats.rankdata(t), stats.rankdata(p))[0], rel=1e-10)
    # a perfect monotone but non-linear relation: rho = 1, r < 1
    e = regression_metrics(t, np.exp(t))
    assert e["spearman"] == pytest.approx(1.0) and e["pearson"] < 0.99


def test_undefined_correlations_are_nan():
    assert math.isnan(regression_metrics([1.0, 2.0], [2.0, 1.0])["pearson"])  # fewer than 3 points
    const = regression_metrics([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    assert math.isnan(const["pearson"]) and math.isnan(const["spearman"])
    assert const["mae"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        regression_metrics([1.0, 2.0], [1.0])
