"""Membership inference: attacks, ROC, AUC, TPR at low FPR and the DP hypothesis-testing bound.

Attacks (higher score = "member"):
- loss threshold (Yeom et al., CSF 2018): score = -loss(x) under the fine-tuned model;
- reference calibrated (Carlini et al., "Membership Inference Attacks From First Principles",
  S&P 2022, the "LiRA offline / loss-difference" family; Mireshghallah et al. 2022 for LMs):
  score = loss_ref(x) - loss(x), the base model's loss minus the fine-tuned model's loss, which
  removes how intrinsically easy a sentence is.

Metrics follow Carlini et al. 2022: ROC AUC (with a DeLong confidence interval) and the TPR at a
fixed low FPR (0.1% and 1%) with an exact Clopper-Pearson interval on the TPR at the chosen
threshold. The threshold is the most permissive one whose empirical FPR does not exceed the target;
with n non-members an FPR below 1/n cannot be resolved, and the achieved FPR is reported.

DP bound (Kairouz, Oh, Viswanath, ICML 2015, Thm 2.1; Wasserman and Zhou 2010): for an
(eps, delta)-DP training algorithm every membership test satisfies
    TPR <= e^eps * FPR + delta   and   1 - FPR <= e^eps * (1 - TPR) + delta,
i.e. TPR <= min(1, e^eps*FPR + delta, 1 - e^-eps*(1 - delta - FPR)); integrating this curve over
FPR bounds the AUC (``dp_auc_bound``).

Person-level inference: members are the persons named in the training records, non-members persons
never seen in training (a corpus split by person). A person's score combines the reference-calibrated
scores of all their records (mean, and min); ROC, AUC and TPR are over persons, with percentile
bootstrap intervals that resample persons. The DP bound applies with the *person-level* epsilon:
one person in or out, everything else fixed, is exactly the person-level neighbouring relation, and
the population game averages such tests.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st

from .stats import clopper_pearson, cp_lower, cp_upper


def loss_threshold_scores(losses) -> np.ndarray:
    """Score of the loss-threshold attack: -loss (lower loss = more likely a member)."""
    return -np.asarray(losses, dtype=np.float64)


def reference_calibrated_scores(losses, reference_losses) -> np.ndarray:
    """Score of the reference-calibrated attack: reference (base model) loss minus target loss."""
    a = np.asarray(losses, dtype=np.float64)
    b = np.asarray(reference_losses, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"losses {a.shape} and reference losses {b.shape} differ in shape")
    return b - a


def _split(member_scores, nonmember_scores):
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if m.size == 0 or n.size == 0:
        raise ValueError("need at least one member and one non-member score")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(n))):
        raise ValueError("scores must be finite")
    return m, n


def roc_counts(member_scores, nonmember_scores):
    """Empirical ROC as counts for the rule "member iff score >= t", t over all distinct scores.

    Returns (thresholds, true_positives, false_positives, n_members, n_nonmembers), thresholds in
    decreasing order, starting with +inf (nothing flagged) and ending at the smallest score
    (everything flagged).
    """
    m, n = _split(member_scores, nonmember_scores)
    thr = np.unique(np.concatenate([m, n]))[::-1]
    ms, ns = np.sort(m), np.sort(n)
    tp = m.size - np.searchsorted(ms, thr, side="left")
    fp = n.size - np.searchsorted(ns, thr, side="left")
    thr = np.concatenate([[np.inf], thr])
    tp = np.concatenate([[0], tp])
    fp = np.concatenate([[0], fp])
    return thr, tp, fp, m.size, n.size


def roc_curve(member_scores, nonmember_scores):
    """(fpr, tpr, thresholds) of the empirical ROC, fpr and tpr non-decreasing from (0,0) to (1,1)."""
    thr, tp, fp, nm, nn = roc_counts(member_scores, nonmember_scores)
    return fp / nn, tp / nm, thr


def roc_auc(member_scores, nonmember_scores, alpha: float = 0.05):
    """AUC = P(S_member > S_nonmember) + P(tie)/2 (Mann-Whitney) with a DeLong (1 - alpha) interval.

    DeLong, DeLong and Clarke-Pearson (Biometrics 1988): the AUC is a two-sample U-statistic whose
    variance is Var(V10)/m + Var(V01)/n with V10_i the fraction of non-members beaten by member i and
    V01_j the fraction of members beating non-member j. Returns (auc, lower, upper); the normal
    interval is clipped to [0, 1].
    """
    m, n = _split(member_scores, nonmember_scores)
    nm, nn = m.size, n.size
    r_all = _st.rankdata(np.concatenate([m, n]))
    r_m = _st.rankdata(m)
    r_n = _st.rankdata(n)
    v10 = (r_all[:nm] - r_m) / nn
    v01 = 1.0 - (r_all[nm:] - r_n) / nm
    auc = float(v10.mean())
    var = (v10.var(ddof=1) / nm if nm > 1 else 0.0) + (v01.var(ddof=1) / nn if nn > 1 else 0.0)
    z = _st.norm.ppf(1.0 - alpha / 2.0)
    half = z * np.sqrt(max(var, 0.0))
    return auc, float(max(0.0, auc - half)), float(min(1.0, auc + half))


@dataclass(frozen=True)
class TprAtFpr:
    target_fpr: float
    tpr: float
    tpr_lower: float  # two-sided Clopper-Pearson at level 1 - alpha
    tpr_upper: float
    fpr: float  # achieved empirical FPR (<= target)
    threshold: float
    true_positives: int
    n_members: int
    false_positives: int
    n_nonmembers: int
    resolvable: bool  # False when target_fpr < 1/n_nonmembers: only FPR 0 is testable

    def to_dict(self):
        return asdict(self)


def tpr_at_fpr(member_scores, nonmember_scores, target_fpr: float, alpha: float = 0.05) -> TprAtFpr:
    """TPR of the most permissive threshold whose empirical FPR is <= target_fpr.

    The interval is Clopper-Pearson on the member count at that threshold (conditional on the
    threshold, which is chosen using non-member scores only).
    """
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError("target_fpr must lie in [0, 1]")
    thr, tp, fp, nm, nn = roc_counts(member_scores, nonmember_scores)
    ok = np.nonzero(fp <= target_fpr * nn + 1e-9)[0]
    i = ok[-1]  # fp is non-decreasing along thresholds
    lo, hi = clopper_pearson(tp[i], nm, alpha)
    return TprAtFpr(float(target_fpr), float(tp[i] / nm), float(lo), float(hi), float(fp[i] / nn),
                    float(thr[i]), int(tp[i]), int(nm), int(fp[i]), int(nn),
                    bool(target_fpr * nn >= 1.0))


def dp_tpr_bound(fpr, epsilon: float, delta: float):
    """Largest TPR any (epsilon, delta)-DP mechanism allows at false-positive rate fpr (Kairouz 2015)."""
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError("need epsilon >= 0 and 0 <= delta <= 1")
    f = np.clip(np.asarray(fpr, dtype=np.float64), 0.0, 1.0)
    if not np.isfinite(epsilon):
        return np.ones_like(f)
    a = np.exp(epsilon) * f + delta
    b = 1.0 - np.exp(-epsilon) * (1.0 - delta - f)
    return np.minimum(1.0, np.minimum(a, b))


def dp_bound_check(member_scores, nonmember_scores, epsilon: float, delta: float,
                   alpha: float = 0.05) -> dict:
    """Compare the empirical ROC with the (epsilon, delta)-DP region.

    Reports the largest empirical excess max(TPR - bound(FPR)) (sampling noise can make it slightly
    positive even for a DP model) and whether any point violates the bound *significantly*: a
    one-sided Clopper-Pearson lower bound on its TPR above the bound at the Clopper-Pearson upper
    bound on its FPR, with a Bonferroni correction over all ROC points (level alpha overall).
    A significant violation means the model is, with confidence 1 - alpha, not (epsilon, delta)-DP.
    """
    thr, tp, fp, nm, nn = roc_counts(member_scores, nonmember_scores)
    fpr, tpr = fp / nn, tp / nm
    excess = tpr - dp_tpr_bound(fpr, epsilon, delta)
    a = alpha / (2.0 * len(thr))
    t_lo = cp_lower(tp, nm, a)
    f_hi = cp_upper(fp, nn, a)
    sig = t_lo > dp_tpr_bound(f_hi, epsilon, delta) + 1e-15
    j = int(np.argmax(excess))
    return {
        "epsilon": float(epsilon),
        "delta": float(delta),
        "max_excess": float(excess[j]),
        "max_excess_at_fpr": float(fpr[j]),
        "inside_bound": bool(excess[j] <= 0.0),
        "significant_violation": bool(np.any(sig)),
        "n_significant_points": int(np.sum(sig)),
        "alpha": float(alpha),
    }


def attack_report(member_scores, nonmember_scores, fprs=(0.001, 0.01), alpha: float = 0.05) -> dict:
    """AUC with DeLong CI and TPR at each FPR in ``fprs`` with Clopper-Pearson CIs, as a dict."""
    auc, lo, hi = roc_auc(member_scores, nonmember_scores, alpha)
    out = {"auc": auc, "auc_ci": [lo, hi], "auc_ci_method": "DeLong (normal)",
           "tpr_ci_method": "Clopper-Pearson (exact binomial)", "confidence": 1.0 - alpha}
    for f in fprs:
        out[f"tpr_at_{f:g}_fpr"] = tpr_at_fpr(member_scores, nonmember_scores, f, alpha).to_dict()
    return out


def dp_auc_bound(epsilon: float, delta: float) -> float:
    """Largest ROC AUC any (epsilon, delta)-DP mechanism allows: the integral over FPR in [0, 1] of
    ``dp_tpr_bound`` (Kairouz et al. 2015, Thm 2.1, integrated). The bound is e^eps x + delta up to
    x* = (1 - delta) / (1 + e^eps), then 1 - e^-eps (1 - delta - x) up to x = 1 - delta, then 1;
    each piece is linear, so the integral is exact: e^eps / (1 + e^eps) at delta 0."""
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError("need epsilon >= 0 and 0 <= delta <= 1")
    if not math.isfinite(epsilon):
        return 1.0
    x1, x2 = (1.0 - delta) / (1.0 + math.exp(epsilon)), 1.0 - delta
    f = lambda x: float(dp_tpr_bound(x, epsilon, delta))
    return (x1 * (f(0.0) + f(x1)) + (x2 - x1) * (f(x1) + f(x2))) / 2.0 + (1.0 - x2)


def person_scores(record_scores, record_persons):
    """``(persons, mean, minimum)``: for every person named in ``record_persons`` (one tuple of
    person ids per record) the mean and the minimum of the scores of the records naming them, in
    order of first appearance. A record naming two persons counts for both."""
    scores = np.asarray(record_scores, dtype=np.float64).ravel()
    if scores.size != len(record_persons):
        raise ValueError(f"{scores.size} scores for {len(record_persons)} records")
    rows: dict = {}
    for i, who in enumerate(record_persons):
        for x in who:
            rows.setdefault(x, []).append(i)
    persons = list(rows)
    mean = np.array([scores[rows[x]].mean() for x in persons])
    low = np.array([scores[rows[x]].min() for x in persons])
    return persons, mean, low


def bootstrap_interval(member_scores, nonmember_scores, statistic, n_boot: int = 1000,
                       alpha: float = 0.05, seed: int = 0):
    """Percentile bootstrap (1 - alpha) interval of ``statistic(members, nonmembers)``, resampling
    members and non-members (persons) with replacement, each group on its own (Efron and
    Tibshirani 1993, ch. 13)."""
    m, n = _split(member_scores, nonmember_scores)
    rng = np.random.default_rng(seed)
    vals = np.array([statistic(m[rng.integers(0, m.size, m.size)], n[rng.integers(0, n.size, n.size)])
                     for _ in range(int(n_boot))])
    lo, hi = np.quantile(vals, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def person_attack_report(member_scores, nonmember_scores, fprs=(0.001, 0.01), alpha: float = 0.05,
                         n_boot: int = 1000, seed: int = 0) -> dict:
    """``attack_report`` over persons plus bootstrap intervals over persons for the AUC and for the
    TPR at each FPR (the threshold re-chosen in every resample)."""
    out = attack_report(member_scores, nonmember_scores, fprs, alpha)
    out["auc_bootstrap_ci"] = list(bootstrap_interval(
        member_scores, nonmember_scores, lambda a, b: roc_auc(a, b)[0], n_boot, alpha, seed))
    for f in fprs:
        out[f"tpr_at_{f:g}_fpr"]["tpr_bootstrap_ci"] = list(bootstrap_interval(
            member_scores, nonmember_scores, lambda a, b: tpr_at_fpr(a, b, f).tpr, n_boot, alpha,
            seed + 1))
    out["bootstrap"] = {"resamples": int(n_boot), "unit": "person", "method": "percentile"}
    return out


def dp_bound_values(epsilon: float, delta: float, fprs=(0.001, 0.01)) -> dict:
    """The DP limits at ``epsilon``: TPR at each FPR and the AUC."""
    out = {f"tpr_at_{f:g}_fpr": float(dp_tpr_bound(f, epsilon, delta)) for f in fprs}
    out["auc"] = dp_auc_bound(epsilon, delta)
    out.update(epsilon=float(epsilon), delta=float(delta))
    return out
