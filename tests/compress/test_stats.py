"""The paired gain of the report (compress.stats) on synthetic predictors."""

import numpy as np
import pytest
from scipy import stats as sps

from compress.stats import gain_line, mcnemar_exact, paired_difference, seed_interval


def test_identical_predictors_give_zero_with_zero_width_interval(rng):
    a = rng.random(500) < 0.7
    r = paired_difference(a, a.copy())
    assert r["diff"] == 0 and r["low"] == 0 and r["high"] == 0
    assert r["a_only"] == r["b_only"] == 0 and r["p_mcnemar"] == 1.0


def test_strictly_better_predictor_has_interval_above_zero(rng):
    a = rng.random(1000) < 0.6
    b = a.copy()
    b[np.flatnonzero(~a)[:60]] = True  # right on 60 more images, wrong on none a gets right
    r = paired_difference(a, b)
    assert r["diff"] == pytest.approx(0.06)
    assert 0 < r["low"] < 0.06 < r["high"]
    assert r["p_mcnemar"] < 1e-10
    worse = paired_difference(b, a)  # the other way round: the mirror image
    assert worse["high"] < 0 and worse["diff"] == pytest.approx(-0.06)


def test_interval_matches_index_resampling_bootstrap(rng):
    """The multinomial shortcut against a plain bootstrap that resamples image indices."""
    a, b = rng.random(400) < 0.6, rng.random(400) < 0.65
    r = paired_difference(a, b, draws=20_000)
    idx = np.random.default_rng(1).integers(0, 400, (20_000, 400))
    plain = (b[idx].astype(float) - a[idx]).mean(1)
    lo, hi = np.quantile(plain, [0.025, 0.975])
    assert abs(r["low"] - lo) < 0.006 and abs(r["high"] - hi) < 0.006


@pytest.mark.parametrize("a_only, b_only", [(3, 9), (0, 5), (20, 20), (40, 61)])
def test_mcnemar_is_the_exact_binomial_test(a_only, b_only):
    want = sps.binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue
    assert mcnemar_exact(a_only, b_only) == pytest.approx(want, rel=1e-9)


def test_gain_line_warns_when_teacher_is_below_baseline():
    a = np.r_[np.ones(60, bool), np.zeros(40, bool)]
    b = np.r_[np.ones(70, bool), np.zeros(30, bool)]
    r = paired_difference(a, b)
    good = gain_line(r, teacher_top1=0.8)
    assert "teacher 80.0%, labels-only 60.0%, distilled 70.0%; gain +10.0 points" in good
    assert "Warning" not in good
    assert "not the training noise of one seed" in good  # a single run's interval says so
    bad = gain_line(r, teacher_top1=0.5)
    assert "Warning: the teacher is below the labels-only student" in bad
    with pytest.raises(ValueError, match="same length"):
        paired_difference(a, b[:10])


def test_seed_interval_covers_the_mean_of_simulated_seeds():
    """Runs drawn around a known mean: the 95% t interval over 3 of them holds it about 95% of
    the time, and one run gives the mean with no interval."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        r = seed_interval(rng.normal(0.05, 0.02, 3))
        hits += r["low"] <= 0.05 <= r["high"]
    assert 0.93 < hits / 2000 < 0.97
    one = seed_interval([0.04])
    assert one == {"n": 1, "mean": 0.04, "low": None, "high": None}
    with pytest.raises(ValueError, match="no values"):
        seed_interval([])
