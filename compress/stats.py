"""Paired comparison of two classifiers scored on the same validation images.

Two students evaluated on the same images are not independent samples: most images are right
(or wrong) for both, and only the discordant ones carry information about the difference. So
the gain of a distilled student over its labels-only baseline is computed from the per-image
correctness of both on the same images:

  gain  = mean(correct_b) - mean(correct_a)                (top-1 points as a fraction)
  CI    = paired bootstrap percentile interval of that mean difference (images resampled with
          replacement, both predictors together; fixed seed, so reports are reproducible)
  p     = McNemar's exact test: under "no difference" the discordant images split 50/50, so
          p = two-sided binomial tail of min(a_only, b_only) out of a_only + b_only.

The bootstrap draws the counts of the three kinds of image (only b right, only a right, both or
neither) from a multinomial instead of resampling indices: the same distribution, in
O(draws) instead of O(draws x images).
"""

from __future__ import annotations

import math

import numpy as np


def paired_difference(correct_a, correct_b, *, confidence: float = 0.95, draws: int = 20_000,
                      seed: int = 0) -> dict:
    """Top-1 difference b - a with a paired bootstrap interval and McNemar's exact p-value.

    Args:
      correct_a, correct_b: per-image correctness (bool or 0/1) of two predictors on the same
        images, in the same order.
      confidence: of the two-sided percentile interval.
      draws: bootstrap resamples.
      seed: of the bootstrap.

    Returns:
      dict with `n`, `top1_a`, `top1_b`, `diff`, `low`, `high` (fractions), `a_only`, `b_only`
      (discordant image counts) and `p_mcnemar`.
    """
    a = np.asarray(correct_a, bool).ravel()
    b = np.asarray(correct_b, bool).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_difference: need two non-empty arrays of the same length, got "
                         f"{a.size} and {b.size}")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_difference: confidence must be in (0, 1), got {confidence}")
    n = a.size
    b_only, a_only = int((b & ~a).sum()), int((a & ~b).sum())
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [b_only / n, a_only / n, 1 - (a_only + b_only) / n], size=draws)
    boot = (counts[:, 0] - counts[:, 1]) / n
    tail = (1 - confidence) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return {"n": n, "top1_a": float(a.mean()), "top1_b": float(b.mean()),
            "diff": (b_only - a_only) / n, "low": float(low), "high": float(high),
            "a_only": a_only, "b_only": b_only, "p_mcnemar": mcnemar_exact(a_only, b_only)}


def seed_interval(values, *, confidence: float = 0.95) -> dict:
    """Mean of one figure over independent training runs (seeds) and its two-sided Student t
    interval: the training noise that a paired interval over validation images does not cover.
    `low`/`high` are None for fewer than two values."""
    from scipy import stats

    v = np.asarray(values, float).ravel()
    if v.size == 0:
        raise ValueError("seed_interval: no values")
    if not 0 < confidence < 1:
        raise ValueError(f"seed_interval: confidence must be in (0, 1), got {confidence}")
    out = {"n": int(v.size), "mean": float(v.mean()), "low": None, "high": None}
    if v.size >= 2:
        half = stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
        out.update(low=float(out["mean"] - half), high=float(out["mean"] + half))
    return out


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the two discordant counts (1.0 when both are 0)."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(m, i) for i in range(k + 1))  # exact integers, any m
    return min(1.0, 2 * tail / 2**m)


def gain_line(paired: dict, *, teacher_top1: float | None, kind: str = "soft") -> str:
    """The report's opening line from `paired_difference(baseline, distilled)`: teacher,
    labels-only and distilled top-1, the gain with its paired interval (and what that interval
    leaves out: the seed's training noise), and a plain warning when the teacher is below the
    labels-only student (distilling from it then teaches the student a worse classifier than
    labels alone)."""
    baseline_top1, distilled_top1 = paired["top1_a"], paired["top1_b"]
    teacher = "n/a" if teacher_top1 is None else f"{100 * teacher_top1:.1f}%"
    line = (f"**Distillation ({kind}):** teacher {teacher}, labels-only {100 * baseline_top1:.1f}%,"
            f" distilled {100 * distilled_top1:.1f}%; gain {100 * paired['diff']:+.1f} points "
            f"[95% CI {100 * paired['low']:+.1f}, {100 * paired['high']:+.1f}; paired bootstrap "
            f"over the same {paired['n']} validation images; McNemar p = "
            f"{paired['p_mcnemar']:.2g}]. The interval covers the choice of validation images,"
            " not the training noise of one seed: `scripts/bench_gain.py` repeats the pair over"
            " seeds.")
    if teacher_top1 is not None and teacher_top1 < baseline_top1:
        line += (" **Warning: the teacher is below the labels-only student; distilling from it "
                 "can only teach a worse classifier (train the teacher longer or give a better "
                 "one).**")
    return line
