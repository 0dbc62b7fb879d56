"""Report figures (matplotlib, Agg backend: no display needed).

- ``plot_roc``: membership-inference ROC curves on log-log axes with the (eps, delta)-DP region
  TPR <= min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)) (Kairouz et al. 2015) shaded; low FPR
  is where privacy attacks matter (Carlini et al. 2022), hence log axes.
- ``plot_perplexity_vs_epsilon``: utility cost of privacy; the non-private run is drawn at the right
  edge (eps = infinity).
- ``plot_noise_density``: the sampled noise density against the calibrated Gaussian.

Every axis carries a label and every figure a title.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .membership import dp_tpr_bound  # noqa: E402


def plot_roc(curves: dict, path, epsilon: float | None = None, delta: float = 0.0,
             title: str = "Membership inference ROC") -> str:
    """``curves``: label -> (fpr, tpr). Draws the DP bound when ``epsilon`` is finite."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    positive = [np.asarray(f, dtype=float) for f, _ in curves.values()]
    positive = [f[f > 0].min() for f in positive if np.any(f > 0)]
    floor = min([1e-3] + [f / 2 for f in positive])
    grid = np.geomspace(floor, 1.0, 400)
    ax.plot(grid, grid, color="0.6", ls=":", lw=1, label="random guess")
    if epsilon is not None and math.isfinite(epsilon):
        b = dp_tpr_bound(grid, epsilon, delta)
        ax.fill_between(grid, floor, b, color="0.5", alpha=0.12)
        ax.plot(grid, b, color="black", ls="--", lw=1.5,
                label=f"DP region eps={epsilon:.3g}, delta={delta:.0e}")
    for label, (fpr, tpr) in curves.items():
        f = np.clip(np.asarray(fpr, dtype=float), floor, 1)
        t = np.clip(np.asarray(tpr, dtype=float), floor, 1)
        ax.step(f, t, where="post", lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_perplexity_vs_epsilon(points, path, base_perplexity: float | None = None,
                               title: str = "Utility vs privacy",
                               ylabel: str = "validation perplexity") -> str:
    """``points``: iterable of (label, epsilon or None/inf for non-private, perplexity).

    Non-private runs are drawn at the right edge (tick "non-private", only when there is one);
    ``base_perplexity`` (the model before fine-tuning) is a dashed horizontal line. The y axis is
    logarithmic only when the values span more than a factor 10 (a log axis inside one decade has
    no labelled tick).
    """
    pts = list(points)
    finite = [e for _, e, _ in pts if e is not None and math.isfinite(e)]
    has_nonprivate = len(finite) < len(pts)
    right = (max(finite) * 3 if finite else 10.0)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, e, ppl in pts:
        private = e is not None and math.isfinite(e)
        x = e if private else right
        ax.plot([x], [ppl], marker="o" if private else "s", ls="none", ms=7, label=label)
        ax.annotate(f"{ppl:.1f}", (x, ppl), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if base_perplexity is not None:
        ax.axhline(base_perplexity, color="0.4", ls="--", lw=1,
                   label=f"base model ({base_perplexity:.1f})")
    ys = [p for _, _, p in pts] + ([base_perplexity] if base_perplexity is not None else [])
    log_y = min(ys) > 0 and max(ys) / min(ys) > 10
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ticks = []
    for t in sorted(set(finite)):  # skip ticks that would overlap (within 15%)
        if not ticks or t > 1.15 * ticks[-1]:
            ticks.append(t)
    labels = [f"{t:.3g}" for t in ticks]
    if has_nonprivate or not ticks:
        ticks.append(right)
        labels.append("non-private")
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)
    ax.minorticks_off()
    ax.set_xlim(min(ticks) / 2, max(ticks) * 2)
    ax.set_xlabel("certified epsilon")
    ax.set_ylabel(ylabel + (" (log scale)" if log_y else ""))
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_noise_density(noise, path, gaussian_sigma: float | None = None, label: str | None = None,
                       x_max: float | None = None, title: str | None = None) -> str:
    """Density of ``noise`` (any object with ``.pdf``) against N(0, gaussian_sigma^2), linear and log."""
    if x_max is None:
        s = gaussian_sigma or math.sqrt(float(noise.variance()))
        x_max = 4.0 * s
    x = np.linspace(-x_max, x_max, 2001)
    p = np.asarray(noise.pdf(x), dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    name = label or f"{getattr(noise, 'family', 'noise')} (sampled)"
    fig.suptitle(title or ("Noise density" + (" vs the Gaussian" if gaussian_sigma else "")))
    for ax, log in zip(axes, (False, True)):
        ax.set_title("log scale" if log else "linear scale", fontsize=10)
        ax.plot(x, p, lw=1.6, label=name)
        if gaussian_sigma:
            g = np.exp(-0.5 * (x / gaussian_sigma) ** 2) / (gaussian_sigma * math.sqrt(2 * math.pi))
            ax.plot(x, g, lw=1.2, ls="--", label=f"Gaussian sigma={gaussian_sigma:.3g}")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(max(1e-12, p[p > 0].min() if np.any(p > 0) else 1e-12), None)
        ax.set_xlabel("noise (units of the clipping norm)")
        ax.set_ylabel("density" + (" (log)" if log else ""))
        ax.grid(True, alpha=0.2)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
