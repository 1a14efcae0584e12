"""Statistics of repeated runs (seeds), computed once here with scipy: the report's tables and plots
read them from this module.

A configuration's runs are summarised by their mean and its 95% Student-t interval; each configuration
is compared with the best one by the difference of means and its 95% Welch interval.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
COMPARISON_COLUMNS = (
    "config",
    "n",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "diff_vs_best",
    "diff_ci_low",
    "diff_ci_high",
    "verdict",
)


@dataclass(frozen=True)
class Summary:
    """Runs of one configuration: std and interval are NaN for a single run (no spread to estimate)."""

    n: int
    mean: float
    std: float  # sample standard deviation (n - 1 in the denominator)
    ci_low: float
    ci_high: float


@contextmanager
def _identical_values_allowed():
    # Runs with identical values (memory across seeds) make scipy warn of precision loss; the
    # interval it then returns, [mean, mean], is the right one.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        yield


def summarize(values: list[float]) -> Summary:
    """Mean and the 95% Student-t interval of the mean."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return Summary(len(values), mean, math.nan, math.nan, math.nan)
    with _identical_values_allowed():
        interval = stats.ttest_1samp(values, 0.0).confidence_interval(CONFIDENCE)
    return Summary(len(values), mean, float(values.std(ddof=1)), float(interval.low), float(interval.high))


def welch_interval(values: list[float], reference: list[float]) -> tuple[float, float]:
    """95% Welch interval of mean(values) - mean(reference); NaN where either has a single run."""
    if len(values) < 2 or len(reference) < 2:
        return math.nan, math.nan
    with _identical_values_allowed():
        test = stats.ttest_ind(values, reference, equal_var=False)
        interval = test.confidence_interval(CONFIDENCE)
    return float(interval.low), float(interval.high)


def noise_floor(samples: list[list[float]]) -> tuple[float, int]:
    """The seed-to-seed spread: the within-configuration std pooled over the repeated configurations,
    and its degrees of freedom (NaN and 0 without a repeated configuration)."""
    repeated = [np.asarray(s, dtype=float) for s in samples if len(s) >= 2]
    df = sum(len(s) - 1 for s in repeated)
    if not df:
        return math.nan, 0
    return math.sqrt(sum(float(((s - s.mean()) ** 2).sum()) for s in repeated) / df), df


def _verdict(n: int, best_n: int, diff_ci: tuple[float, float], is_best: bool, alone: bool) -> str:
    """best, worse (the interval excludes 0), within noise, or unconfirmed (a single run on either side,
    or no other configuration to compare with)."""
    if alone or n < 2 or best_n < 2:
        return "unconfirmed"
    if is_best:
        return "best"
    low, high = diff_ci
    return "worse" if low > 0 or high < 0 else "within noise"


def compare(groups: dict[str, list[float]], direction: str) -> list[dict]:
    """One row per configuration (COMPARISON_COLUMNS), best first by mean in the objective's direction."""
    summaries = {config: summarize(values) for config, values in groups.items()}
    sign = {"maximize": -1, "minimize": 1}[direction]
    order = sorted(summaries, key=lambda c: sign * summaries[c].mean)
    best = order[0]
    rows = []
    for config in order:
        s = summaries[config]
        diff_ci = (math.nan, math.nan) if config == best else welch_interval(groups[config], groups[best])
        row = {"config": config, "n": s.n, "mean": s.mean, "std": s.std, "ci_low": s.ci_low}
        row |= {"ci_high": s.ci_high, "diff_vs_best": s.mean - summaries[best].mean}
        row |= {"diff_ci_low": diff_ci[0], "diff_ci_high": diff_ci[1]}
        row["verdict"] = _verdict(s.n, summaries[best].n, diff_ci, config == best, len(groups) == 1)
        rows.append(row)
    return rows
