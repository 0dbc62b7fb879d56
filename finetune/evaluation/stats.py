"""Exact binomial confidence bounds (Clopper and Pearson, Biometrika 26, 1934).

The Clopper-Pearson interval inverts two one-sided binomial tests; it is conservative: its coverage
is at least the nominal level for every true proportion and every sample size, which is what an
audit that claims "with 95% confidence" needs (normal approximations under-cover near 0 and 1).
"""
from __future__ import annotations

import numpy as np
from scipy import stats as _st


def _check(k, n):
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if np.any(n < 0) or np.any(k < 0) or np.any(k > n):
        raise ValueError("binomial counts need 0 <= k <= n")
    return k, n


def cp_lower(k, n, alpha: float = 0.05):
    """One-sided lower bound p_lo with P(p >= p_lo) >= 1 - alpha: Beta(alpha; k, n-k+1); 0 if k=0."""
    k, n = _check(k, n)
    with np.errstate(invalid="ignore"):
        lo = _st.beta.ppf(alpha, k, n - k + 1)
    return np.where(k <= 0, 0.0, lo)


def cp_upper(k, n, alpha: float = 0.05):
    """One-sided upper bound p_hi with P(p <= p_hi) >= 1 - alpha: Beta(1-alpha; k+1, n-k); 1 if k=n."""
    k, n = _check(k, n)
    with np.errstate(invalid="ignore"):
        hi = _st.beta.ppf(1.0 - alpha, k + 1, n - k)
    return np.where(k >= n, 1.0, hi)


def clopper_pearson(k, n, alpha: float = 0.05):
    """Two-sided (1 - alpha) interval (lower, upper): each side at level alpha/2."""
    return cp_lower(k, n, alpha / 2.0), cp_upper(k, n, alpha / 2.0)
