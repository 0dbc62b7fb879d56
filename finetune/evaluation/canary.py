"""Canary exposure (Carlini, Liu, Erlingsson, Kos, Song, "The Secret Sharer", USENIX Security 2019).

A canary is a template with a random secret drawn uniformly from a randomness space R, e.g.
"my secret code is 493027" with R = all 6-digit strings. After training on k inserted canaries,
each canary's log-perplexity (the model's negative log-likelihood of the secret given the prefix)
is ranked among the log-perplexities of all candidates in R:

    rank(c)     = 1 + #{r in R : logppl(r) < logppl(c)}        (ties count half)
    exposure(c) = log2 |R| - log2 rank(c)                       (Definition 4)

Exposure ranges from 0 (the canary is the least likely candidate) to log2 |R| (it is the most
likely one: fully memorised). A model that never saw the canary has expected exposure ~1/ln 2 bits.

Exact exposure enumerates R (feasible for small R). The extrapolated estimate (Section 4.3 of the
paper) scores a uniform sample of R, fits a skew-normal to the sampled log-perplexities and reads
the canary's rank off the fitted CDF: exposure ~ -log2 F(logppl(c)). It is capped at log2 |R|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

DEFAULT_TEMPLATE = "My secret access code is {secret}."


@dataclass(frozen=True)
class Canary:
    secret: str
    template: str = DEFAULT_TEMPLATE

    @property
    def prefix(self) -> str:
        return self.template.split("{secret}")[0]

    @property
    def text(self) -> str:
        return self.template.format(secret=self.secret)

    def with_secret(self, secret: str) -> str:
        return self.template.format(secret=secret)


def space_size(n_digits: int) -> int:
    """|R| for secrets made of ``n_digits`` decimal digits."""
    return 10 ** int(n_digits)


def format_secret(i: int, n_digits: int) -> str:
    """Secrets are written digit by digit with spaces so BPE tokenises each digit on its own."""
    return " ".join(str(int(i)).zfill(n_digits))


def make_canaries(k: int, n_digits: int, rng, template: str = DEFAULT_TEMPLATE) -> list[Canary]:
    """k canaries with distinct secrets drawn uniformly without replacement from 10^n_digits."""
    size = space_size(n_digits)
    if k > size:
        raise ValueError(f"cannot draw {k} distinct secrets from a space of {size}")
    ids = rng.choice(size, size=k, replace=False) if size <= 10**7 else _distinct(rng, size, k)
    return [Canary(format_secret(i, n_digits), template) for i in ids]


def _distinct(rng, size, k):
    out: set[int] = set()
    while len(out) < k:
        out.update(int(x) for x in rng.integers(0, size, size=k - len(out)))
    return list(out)


def exposure_exact(canary_logppl: float, candidate_logppl, space: int | None = None) -> float:
    """Exposure from the log-perplexities of every *other* candidate of R (the canary excluded).

    ``space`` defaults to len(candidates) + 1 (the whole space was enumerated).
    """
    c = np.asarray(candidate_logppl, dtype=np.float64).ravel()
    size = c.size + 1 if space is None else int(space)
    if size < c.size + 1:
        raise ValueError("space smaller than the number of candidates")
    rank = 1.0 + np.sum(c < canary_logppl) + 0.5 * np.sum(c == canary_logppl)
    return float(math.log2(size) - math.log2(rank))


def exposure_extrapolated(canary_logppl: float, sampled_logppl, space: int) -> dict:
    """Exposure estimated from a uniform sample of R (Secret Sharer Sect. 4.3, skew-normal fit).

    Returns both the skew-normal estimate and the plain sampling estimate
    log2|R| - log2(1 + |R| * fraction of the sample below the canary), which is unbiased for the
    rank but saturates at log2(sample size) when no sampled candidate beats the canary.
    """
    s = np.asarray(sampled_logppl, dtype=np.float64).ravel()
    if s.size < 20:
        raise ValueError("need at least 20 sampled candidates to extrapolate")
    cap = math.log2(space)
    a, loc, scale = _st.skewnorm.fit(s)
    logcdf = float(_st.skewnorm.logcdf(canary_logppl, a, loc, scale))
    fit = min(cap, max(0.0, -logcdf / math.log(2.0)))
    frac = (np.sum(s < canary_logppl) + 0.5 * np.sum(s == canary_logppl)) / s.size
    sampled = cap - math.log2(max(1.0, frac * space))
    return {"exposure": fit, "exposure_sampling": float(sampled), "max_exposure": cap,
            "skewnorm": {"a": float(a), "loc": float(loc), "scale": float(scale)},
            "n_sampled": int(s.size)}


def canary_exposures(score_fn, canaries, n_digits: int, rng, n_candidates: int = 2000,
                     exact_limit: int = 10**4) -> list[dict]:
    """Exposure of each canary under a model.

    ``score_fn(texts) -> array`` returns the log-perplexity (summed negative log-likelihood) of
    each text; only differences between secrets of one template matter, so scoring the full text
    is equivalent to scoring the secret given the prefix. Exact when |R| <= ``exact_limit``,
    otherwise extrapolated from ``n_candidates`` uniformly drawn secrets shared by all canaries.
    """
    size = space_size(n_digits)
    canaries = list(canaries)
    own = np.asarray(score_fn([c.text for c in canaries]), dtype=np.float64)
    out = []
    if size <= exact_limit:
        by_template: dict[str, np.ndarray] = {}
        for c in canaries:
            if c.template not in by_template:
                by_template[c.template] = np.asarray(
                    score_fn([c.with_secret(format_secret(i, n_digits)) for i in range(size)]),
                    dtype=np.float64)
        for c, sc in zip(canaries, own):
            allc = by_template[c.template]
            idx = int(c.secret.replace(" ", ""))
            others = np.delete(allc, idx)
            out.append({"secret": c.secret, "logppl": float(sc), "method": "exact",
                        "exposure": exposure_exact(sc, others, size), "max_exposure": math.log2(size)})
        return out
    ids = rng.integers(0, size, size=n_candidates)
    cache: dict[str, np.ndarray] = {}
    for c, sc in zip(canaries, own):
        if c.template not in cache:
            cache[c.template] = np.asarray(
                score_fn([c.with_secret(format_secret(i, n_digits)) for i in ids]), dtype=np.float64)
        r = exposure_extrapolated(sc, cache[c.template], size)
        r.update({"secret": c.secret, "logppl": float(sc), "method": "extrapolated"})
        out.append(r)
    return out
