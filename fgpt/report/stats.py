"""The study's statistics: paired t-intervals over seeds, bootstrap intervals over
sequences, log-log slopes, and the verdict rule (fixed before any number is measured).

Verdicts, for an interval [lo, hi] of an effect and a margin m (budget.RULES):
- a claim that the effect is *negative* ("lower loss", "less penalty"):
  supported if hi < 0; contradicted if lo > 0; not detected if -m < lo and hi < m
  (any effect is smaller than the margin); inconclusive otherwise.
- a claim that the effect is *positive* ("degrades", "faster"): the mirror image.
- a claim that the effect is *at most m* ("costs little", "no worse than"): supported if
  hi < m; contradicted if lo > m; inconclusive otherwise.
- "not testable here" when a prerequisite fails (said with its reason by the caller).
"""

from __future__ import annotations

import math
import statistics

import numpy as np

# two-sided 95% Student t quantiles t_{0.975, df}
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}

SUPPORTED, CONTRADICTED, NOT_DETECTED, INCONCLUSIVE, NOT_TESTABLE = (
    "supported", "contradicted", "not detected", "inconclusive", "not testable here")
VERDICTS = (SUPPORTED, NOT_DETECTED, INCONCLUSIVE, CONTRADICTED, NOT_TESTABLE)


def t975(df: int) -> float:
    """t_{0.975, df}, from the table (conservatively the next smaller df; df 30's past 30)."""
    if df < 1:
        raise ValueError("a t-interval needs at least two values")
    return _T975[max(k for k in _T975 if k <= df)]


def paired_interval(values: list[float]) -> dict:
    """Mean and 95% t-interval of paired differences (one per seed); the values themselves
    are kept. A single value has no interval (lo = hi = None)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "sd": None, "n": n, "values": list(values)}
    sd = statistics.stdev(values)
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": n, "values": list(values)}


def bootstrap_interval(samples: np.ndarray, *, resamples: int, seed: int = 0) -> dict:
    """Mean and 95% percentile-bootstrap interval of the mean over the first axis of
    `samples` ([n_units] or [n_units, k]: each unit's values are averaged first; NaN ignored).
    Units are what is resampled: sequences, or targets far apart in the text."""
    samples = np.asarray(samples, dtype=np.float64)
    unit = np.nanmean(samples.reshape(len(samples), -1), axis=1)
    unit = unit[~np.isnan(unit)]
    if len(unit) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = unit[rng.integers(0, len(unit), size=(resamples, len(unit)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(unit.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(unit))}


def verdict(interval: dict, claim: str, margin: float) -> str:
    """The rule in the module docstring. `claim`: "negative", "positive" or "at_most"."""
    lo, hi = interval.get("lo"), interval.get("hi")
    if lo is None or hi is None:
        return INCONCLUSIVE
    if claim == "positive":  # mirror: test -effect as a "negative" claim
        return verdict({"lo": -hi, "hi": -lo}, "negative", margin)
    if claim == "negative":
        if hi < 0:
            return SUPPORTED
        if lo > 0:
            return CONTRADICTED
        if -margin < lo and hi < margin:
            return NOT_DETECTED
        return INCONCLUSIVE
    if claim == "at_most":
        if hi < margin:
            return SUPPORTED
        if lo > margin:
            return CONTRADICTED
        return INCONCLUSIVE
    raise ValueError(f"unknown claim kind {claim!r}")


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x: ~1 for linear growth, ~2 for quadratic."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def bootstrap_ratio(numerators, denominators, *, resamples: int, seed: int = 0) -> dict:
    """sum(numerators) / sum(denominators) and its 95% percentile-bootstrap interval, units
    resampled whole: a token-weighted mean loss over evaluation windows (each window's summed
    NLL, and its scored tokens), so the mean is exactly the pooled one that run.eval prints."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if len(num) == 0 or den.sum() == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(num.sum() / den.sum())
    if len(num) < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": int(len(num))}
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(num), size=(resamples, len(num)))
    ratios = num[pick].sum(axis=1) / np.maximum(den[pick].sum(axis=1), 1e-300)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "n": int(len(num))}
