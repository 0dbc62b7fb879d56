"""Fast, approximate privacy accounting used only to RANK candidate noises.

Nothing computed here is ever reported as a privacy guarantee: the search certifies its answer with
``accountant.certify`` (two independent accountants, pessimistic error bounds).  This module trades
rigour for speed so that a continuous optimiser can afford hundreds of evaluations.

Model.  The noise is a :class:`~noise_search.families.Binned` law (bins of width ``1/n``), so a shift by
the sensitivity is exactly ``n`` bins and the privacy loss is constant on every bin.  With Poisson
subsampling at rate ``q`` the two neighbouring pairs are (docs/soundness.md rule 3)

* remove: ``P = (1-q) f + q f(. - 1)`` against ``Q = f``,
* add:    ``Q = f`` against ``P``,

and for each pair the privacy-loss random variable ``L = log P(X)/Q(X)``, ``X ~ P`` (Dwork & Rothblum
2016; Sommer, Meiser & Mohammadi 2019) takes the per-bin values computed by the compiled kernel
:func:`_pair_losses`.  One release (``T = 1``) is evaluated exactly on the bins as the hockey-stick
divergence ``delta(eps) = sum_x max(0, P(x) - e^eps Q(x))``.  For ``T > 1`` the loss distribution is put
on a uniform grid by a mean-preserving split between the two neighbouring grid points (so composition
keeps the exact mean and adds at most ``T dl^2 / 4`` of variance) and composed ``T`` times with one FFT
(Koskela, Jalko & Honkela 2020, "Computing tight differential privacy guarantees using FFT";
:mod:`accountant.composition`, the same core as the certificate's, without its error allowance); the
result is ``delta(eps) = E[(1 - e^(eps - L_T))_+] + P(L_T = inf)``, the hockey-stick divergence written
with the privacy loss (e.g. Balle & Wang 2018; Sommer, Meiser & Mohammadi 2019).
Mass that does not fit the window is moved to ``+inf`` (upwards) or clipped to the window floor.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from accountant import composition
from noise_search.families import Binned

#: tail extension stops when the remaining one-sided mass is below this
_EXTEND_TO = 1e-30
_MAX_EXTENSION = 1 << 16


@numba.njit(cache=True)
def _full_density(mass, tail_mass, tail_rate, h):  # pragma: no cover - compiled
    """Two-sided bin masses: the core mirrored, the exponential tails cut into bins of width h."""
    K = mass.shape[0]
    M = 0
    if tail_mass > 0 and tail_rate > 0:
        M = int(math.ceil(math.log(tail_mass / _EXTEND_TO) / (tail_rate * h))) if tail_mass > _EXTEND_TO else 0
        M = min(max(M, 0), _MAX_EXTENSION)
    side = np.empty(K + M)
    side[:K] = mass
    decay = math.exp(-tail_rate * h) if M > 0 else 0.0
    cur = tail_mass
    for i in range(M):
        nxt = cur * decay
        side[K + i] = cur - nxt
        cur = nxt
    N = 2 * (K + M)
    full = np.empty(N)
    for i in range(K + M):
        full[K + M + i] = side[i]
        full[K + M - 1 - i] = side[i]
    return full


@numba.njit(cache=True)
def _pair_losses(full, n, q):  # pragma: no cover - compiled
    """Per-bin privacy losses for remove (P vs Q) and add (Q vs P) with P = (1-q) f + q f(.-n), Q = f.

    Returns (loss_remove, weight_remove, inf_remove, loss_add, weight_add, inf_add); losses with zero
    weight are set to 0.
    """
    N = full.shape[0]
    L = N + n
    lr = np.zeros(L)
    wr = np.zeros(L)
    la = np.zeros(L)
    wa = np.zeros(L)
    inf_r = 0.0
    inf_a = 0.0
    for j in range(L):
        f = full[j] if j < N else 0.0
        g = full[j - n] if j >= n else 0.0
        p = (1.0 - q) * f + q * g
        if f > 0.0:
            if p > 0.0:
                ratio = g / f
                loss = math.log1p(q * (ratio - 1.0))
                lr[j] = loss
                wr[j] = p
                la[j] = -loss
                wa[j] = f
            else:
                inf_a += f
        elif p > 0.0:
            inf_r += p
    return lr, wr, inf_r, la, wa, inf_a


@numba.njit(cache=True)
def _hockey_stick(loss, weight, inf_mass, eps):  # pragma: no cover - compiled
    """delta(eps) = sum_x max(0, P(x) - e^eps Q(x)) written with losses: sum w (1 - e^(eps - l))_+."""
    acc = 0.0
    for j in range(loss.shape[0]):
        if weight[j] > 0.0 and loss[j] > eps:
            acc += weight[j] * -math.expm1(eps - loss[j])
    return acc + inf_mass


@numba.njit(cache=True)
def _discretise(loss, weight, shift, dl, size, lo_index, hi_value):  # pragma: no cover - compiled
    """Mean-preserving split of (loss - shift) onto grid k*dl, k in [-lo_index, size-lo_index), stored
    circularly; values above hi_value go to +inf (returned), below the window are clipped."""
    pmf = np.zeros(size)
    inf_mass = 0.0
    for j in range(loss.shape[0]):
        w = weight[j]
        if w <= 0.0:
            continue
        v = loss[j] - shift
        if v > hi_value:
            inf_mass += w
            continue
        x = v / dl
        k = math.floor(x)
        frac = x - k
        if k < -lo_index:
            k = -lo_index
            frac = 0.0
        i0 = int(k) % size
        i1 = (int(k) + 1) % size
        pmf[i0] += w * (1.0 - frac)
        pmf[i1] += w * frac
    return pmf, inf_mass


def _direction_delta(loss, weight, inf_mass, eps_values, steps, margin=20.0, max_size=1 << 21):
    """delta(eps) for each eps in ``eps_values`` after ``steps`` compositions of one direction."""
    eps_values = np.atleast_1d(np.asarray(eps_values, dtype=np.float64))
    if steps == 1:
        return np.array([_hockey_stick(loss, weight, inf_mass, e) for e in eps_values])
    finite = weight.sum()
    if finite <= 0:
        return np.ones_like(eps_values)
    mean1 = float(np.dot(weight, loss) / finite)
    var1 = float(np.dot(weight, (loss - mean1) ** 2) / finite)
    sd1 = math.sqrt(max(var1, 1e-300))
    mean_t = steps * mean1
    sd_t = math.sqrt(steps) * sd1
    top = max(float(eps_values.max()), mean_t) + margin * sd_t
    lo = mean_t - margin * sd_t
    width = top - lo
    dl = max(min(sd1 / 10.0, width / 1024.0), width / max_size)
    size = 1 << int(math.ceil(math.log2(width / dl + 2)))
    dl = width / (size - 2)
    lo_index = int(math.ceil((mean_t - lo) / dl))
    pmf, extra_inf = _discretise(loss, weight, mean1, dl, size, lo_index, top - mean_t)
    comp = np.maximum(composition.cyclic_self_convolve(pmf, steps, size), 0.0)
    idx = np.arange(size)
    k = np.where(idx >= size - lo_index, idx - size, idx)   # circular index -> signed grid index
    values = mean_t + k * dl
    p_inf = 1.0 - (1.0 - min(1.0, inf_mass + extra_inf)) ** steps
    return np.array([composition.hockey_stick(values, comp, p_inf, e) for e in eps_values])


def delta_for(binned: Binned, eps, sampling_rate: float, steps: int):
    """Approximate delta(eps) (max over add/remove) of the subsampled, composed binned mechanism."""
    full = _full_density(binned.mass, binned.tail_mass, binned.tail_rate, binned.h)
    lr, wr, ir, la, wa, ia = _pair_losses(full, int(binned.n), float(sampling_rate))
    d_rem = _direction_delta(lr, wr, ir, eps, int(steps))
    d_add = _direction_delta(la, wa, ia, eps, int(steps))
    out = np.minimum(np.maximum(d_rem, d_add), 1.0)
    return out if np.ndim(eps) else float(out[0])


def epsilon_for(binned: Binned, delta: float, sampling_rate: float, steps: int, eps_hi: float = 50.0) -> float:
    """Approximate epsilon at ``delta`` by bisection on :func:`delta_for` (ranking only)."""
    lo, hi = 0.0, eps_hi
    if delta_for(binned, hi, sampling_rate, steps) > delta:
        return math.inf
    if delta_for(binned, lo, sampling_rate, steps) <= delta:
        return 0.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if delta_for(binned, mid, sampling_rate, steps) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-5 * hi:
            break
    return hi


class CalibrationError(ValueError):
    """No scale under the cap meets the target."""


def calibrate_scale(make_binned, eps: float, delta: float, sampling_rate: float, steps: int,
                    start: float, rtol: float = 2e-4, max_scale: float = 1e6):
    """Smallest scale s (to ``rtol``) with fast ``delta(eps) <= delta`` for ``make_binned(s)``.

    Solves ``g(log s) = log delta(eps; s) - log delta = 0`` with the one root finder of every
    calibration, :func:`accountant.certify.solve_scale` (secant from ``start`` with the Gaussian
    slope ``2 log delta``, a warm start converges in 3-4 evaluations; bracketing and Brent's method
    when the secant stalls).  Returns ``(scale, binned)`` on the feasible side (``g <= 0``).
    """
    from accountant.certify import solve_scale

    cache = {}

    def gap(log_s):
        if log_s not in cache:
            b = make_binned(math.exp(log_s))
            d = delta_for(b, eps, sampling_rate, steps)
            # far below the target delta the value is tail/rounding noise: flatten it, so that the
            # solver does not follow noise (pure-DP curves then look like a clean step)
            cache[log_s] = (math.log(max(d, 1e-4 * delta)) - math.log(delta), b)
        return cache[log_s][0]

    try:
        x = solve_scale(gap, start, rtol, max_scale, slope=2 * math.log(delta), error=CalibrationError)
    except CalibrationError:
        raise CalibrationError(f"no scale below {max_scale:g} reaches epsilon {eps} at delta {delta}") from None
    return math.exp(x), cache[x][1]
