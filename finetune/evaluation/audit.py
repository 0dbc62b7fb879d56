"""Empirical privacy audits: lower bounds on epsilon that hold with a stated confidence.

An audit can only *refute* a privacy claim: if the empirical lower bound exceeds the certified
epsilon, the certificate (or the code that should realise it) is wrong. A lower bound far below the
certificate proves nothing about tightness; it is a smoke test for bugs such as sampling a different
noise than the one that was accounted (docs/soundness.md section 2).

Two audits live here.

1. One-run audit of a training run (Steinke, Nasr, Jagielski, "Privacy Auditing with One (1)
   Training Run", NeurIPS 2023, arXiv 2305.08846). m canaries, each included in the training set
   independently with probability 1/2. The auditor ranks canaries by a membership score, guesses
   "included" for the top k+ and "excluded" for the bottom k-, and abstains on the rest
   (r = k+ + k- guesses). Their Theorem 5.2: if training is (eps, delta)-DP, the number W of correct
   guesses satisfies, for all v,
       P[W >= v] <= f(v) + 2 m delta * max_{1<=i<=v} (f(v-i) - f(v)) / i,
       f(v) = P[Binomial(r, e^eps/(1+e^eps)) >= v].
   The lower bound at confidence 1 - alpha is the largest eps whose p-value is below alpha.
   Trying several (k+, k-) splits is paid for with a Bonferroni correction.

2. Mechanism-level audit of a noise sampler: draw M(0) = Z and M(1) = s + Z many times, pick a
   threshold test "output >= t" on one half of the draws and evaluate it on the other half. For an
   (eps, delta)-DP mechanism every test has TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta
   (Kairouz, Oh, Viswanath 2015); with one-sided Clopper-Pearson bounds on the rates this gives
   eps >= ln((TPR_lo - delta) / FPR_hi) at confidence 1 - alpha (Jagielski, Ullman, Oprea 2020;
   Nasr et al. 2021 use the same estimator).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st

from .stats import cp_lower, cp_upper


# ----------------------------------------------------------------------------- one-run audit
def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of observing >= v correct guesses out of r under (epsilon, delta)-DP (Thm 5.2)."""
    if not (0 <= v <= r <= m):
        raise ValueError("need 0 <= v <= r <= m")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError("need epsilon >= 0 and 0 <= delta <= 1")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    f_v = float(_st.binom.sf(v - 1, r, q))  # P[B >= v]
    p = f_v
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        # f(v - i) - f(v) = P[v - i <= B <= v - 1]
        gap = _st.binom.cdf(v - 1, r, q) - _st.binom.cdf(v - i - 1, r, q)
        p += 2.0 * m * delta * float(np.max(gap / i))
    return min(1.0, p)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float = 0.05,
                                tol: float = 1e-6) -> float:
    """Largest eps with p-value(eps) < alpha: training is not (eps, delta)-DP, confidence 1 - alpha.

    The p-value is non-decreasing in eps, so bisection is exact up to ``tol``. Returns 0 when even
    eps = 0 cannot be rejected.
    """
    if not 0 < alpha < 1:
        raise ValueError("alpha must lie in (0, 1)")
    if one_run_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:
            return float("inf")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_audit(scores, included, delta: float, alpha: float = 0.05,
                  guess_counts=None) -> dict:
    """One-run audit from canary membership scores (higher = more likely included).

    ``included`` is the 0/1 vector of the coin flips that decided which canaries were trained on.
    ``guess_counts`` lists the numbers of guesses r to try (split evenly between top "included" and
    bottom "excluded" guesses); default: 10 values log-spaced up to m. Each is tested at level
    alpha / len(guess_counts) (Bonferroni), so the reported maximum holds at confidence 1 - alpha.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    inc = np.asarray(included).astype(bool).ravel()
    if s.shape != inc.shape or s.size == 0:
        raise ValueError("scores and included must be non-empty and the same length")
    m = s.size
    if guess_counts is None:
        guess_counts = sorted({int(x) for x in np.unique(np.geomspace(2, m, 10).round()) if x >= 2})
    order = np.argsort(-s, kind="stable")
    a = alpha / len(guess_counts)
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0}
    for r in guess_counts:
        kp = r - r // 2
        kn = r // 2
        correct = int(inc[order[:kp]].sum()) + int((~inc[order[m - kn:]]).sum() if kn else 0)
        eps = one_run_epsilon_lower_bound(m, r, correct, delta, a)
        if eps > best["epsilon_lower_bound"] or best["guesses"] == 0:
            best = {"epsilon_lower_bound": eps, "guesses": r, "correct": correct}
    best.update({"canaries": m, "included": int(inc.sum()), "delta": float(delta),
                 "confidence": 1.0 - alpha, "guess_counts_tried": list(map(int, guess_counts)),
                 "method": "Steinke-Nasr-Jagielski 2023 Thm 5.2, Bonferroni over guess counts"})
    return best


# ------------------------------------------------------------------- mechanism-level audit
def epsilon_from_counts(tp, n_pos, fp, n_neg, delta: float, alpha: float = 0.05):
    """Empirical eps lower bound of one threshold test, valid at confidence 1 - alpha.

    tp of n_pos draws of M(1) and fp of n_neg draws of M(0) landed in the rejection region. Both
    DP inequalities are used (region and complement); the four Clopper-Pearson bounds are each at
    level alpha/2 (a union bound over the two directions; within a direction both bounds must hold,
    hence alpha/4 per bound). Vectorised over arrays of counts. Never negative.
    """
    tp, fp = np.asarray(tp, dtype=np.float64), np.asarray(fp, dtype=np.float64)
    a = alpha / 4.0
    tpr_lo, fpr_hi = cp_lower(tp, n_pos, a), cp_upper(fp, n_neg, a)
    tnr_lo, fnr_hi = cp_lower(n_neg - fp, n_neg, a), cp_upper(n_pos - tp, n_pos, a)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.where(tpr_lo - delta > 0, np.log(np.maximum(tpr_lo - delta, 1e-300) / fpr_hi), 0.0)
        e2 = np.where(tnr_lo - delta > 0, np.log(np.maximum(tnr_lo - delta, 1e-300) / fnr_hi), 0.0)
    return np.maximum(0.0, np.maximum(e1, e2))


def _draw(sampler, n, rng):
    draw = sampler.sample if hasattr(sampler, "sample") else sampler
    z = np.asarray(draw(int(n), rng), dtype=np.float64).ravel()
    if z.size != n:
        raise ValueError(f"sampler returned {z.size} values, expected {n}")
    return z


def audit_noise_sampler(sampler, n: int, rng, sensitivity: float = 1.0, delta: float = 0.0,
                        alpha: float = 0.05, n_thresholds: int = 400, chunk: int = 10**6) -> dict:
    """Mechanism-level audit of an additive noise sampler on neighbouring scalar inputs 0 and s.

    ``sampler`` is a callable ``(n, rng) -> float64 array`` or an object with ``.sample(n, rng)``
    (e.g. ``accountant`` noise or the fine-tuning optimiser's table sampler). n draws are made for
    each input; half of them choose the threshold, the other half certify it, so the returned bound
    ``epsilon_lower_bound`` holds at confidence 1 - alpha with no multiple-testing penalty.
    Compare it with the certified epsilon of ONE release of the same noise (q = 1, T = 1).
    """
    if n < 1000:
        raise ValueError("use at least 1000 draws per input")
    half = n // 2
    z0 = np.concatenate([_draw(sampler, min(chunk, n - i), rng) for i in range(0, n, chunk)])
    z1 = sensitivity + np.concatenate([_draw(sampler, min(chunk, n - i), rng)
                                       for i in range(0, n, chunk)])
    sel0, ev0 = np.sort(z0[:half]), np.sort(z0[half:])
    sel1, ev1 = np.sort(z1[:half]), np.sort(z1[half:])
    pooled = np.concatenate([sel0, sel1])
    cand = np.unique(np.quantile(pooled, np.linspace(0.0005, 0.9995, n_thresholds)))

    def counts(a0, a1, t):
        fp = a0.size - np.searchsorted(a0, t, side="left")
        tp = a1.size - np.searchsorted(a1, t, side="left")
        return tp, fp

    tp, fp = counts(sel0, sel1, cand)
    e_sel = epsilon_from_counts(tp, sel1.size, fp, sel0.size, delta, alpha)
    t = float(cand[int(np.argmax(e_sel))])
    tp_e, fp_e = counts(ev0, ev1, np.array([t]))
    eps = float(epsilon_from_counts(tp_e, ev1.size, fp_e, ev0.size, delta, alpha)[0])
    tpr_ci = (float(cp_lower(tp_e, ev1.size, alpha / 4)[0]), float(cp_upper(tp_e, ev1.size, alpha / 4)[0]))
    fpr_ci = (float(cp_lower(fp_e, ev0.size, alpha / 4)[0]), float(cp_upper(fp_e, ev0.size, alpha / 4)[0]))
    return {
        "epsilon_lower_bound": eps,
        "threshold": t,
        "tpr": float(tp_e[0] / ev1.size), "tpr_ci": tpr_ci,
        "fpr": float(fp_e[0] / ev0.size), "fpr_ci": fpr_ci,
        "draws_per_input": int(n), "sensitivity": float(sensitivity), "delta": float(delta),
        "confidence": 1.0 - alpha,
        "method": "threshold test, selection/evaluation split, Clopper-Pearson",
    }
