"""Certified LOWER bounds on the true epsilon of product noise under L2 clipping.

Any one pair of neighbouring data sets lower-bounds the supremum that defines epsilon. The pair used
here (docs/privacy.md, section "Audit"): every other example has zero gradient, the added one has the
constant clipped gradient ``v`` spread evenly over ``k`` coordinates (``v_i = C / sqrt(k)``). A step
releases ``B v + Z`` with ``B ~ Bernoulli(q)`` and ``Z`` the product noise; the privacy loss depends
on the release only through ``L = sum_i l(x_i)``, ``l(x) = log p(x - s) - log p(x)``, ``s = C/sqrt(k)``.

Every stage below keeps the result a lower bound (Theorem A of docs/privacy.md):

1. one coordinate: the loss ``l(X)`` is *garbled* into cells of a fine grid (exact cell masses
   under ``P`` and ``P_s`` from the law's survival functions, :func:`coordinate_cells`, shared by
   both relations); a garbling (a Markov kernel applied to the release) can only lower every
   hockey-stick divergence;
2. the cells are garbled again onto a lattice by merging neighbouring mass so that every merged
   bin's likelihood ratio is *exactly* a lattice value (:func:`garble_to_lattice`: a sweep from the
   bottom up, whose unbalanced rest at the top is merged from the top down); cells that share an
   end loss up to float noise are first rounded to one value the relation's safe way (down for
   remove, up for add: delta is monotone in the loss), and anything still unmergeable is rounded
   the same way or dropped (dropping mass lowers delta, an expectation of a non-negative function);
3. ``k = 4^j`` coordinates: ``2j`` squarings by FFT convolution, re-garbled onto a coarser lattice
   whenever the support grows; FFT noise below its error bound is dropped;
4. the subsampled step pair (remove: ``((1-q)P + qP_v, P)``, add: its mirror) is garbled onto a
   lattice of the step loss, composed ``T`` times by FFT of its exponentially tilted version (tilted
   so that the entries around epsilon are the bulk of the tilted law, where the FFT is accurate to
   float precision), and ``delta(eps)`` is read off with the FFT's wrap-around mass and
   floating-point error subtracted, both scaled back from the tilted law (an allowance far below
   delta: about 1e-24 where the untilted FFT needed 3e-10 at delta 1e-12).

The lower bound is the maximum over ``k`` in ``{1, 4, 16, ...} <= min(d, MAX_K)`` and over both
relations (a maximum over fewer pairs is still a lower bound). The references printed beside it (the
Gaussian limit and, for Gaussian noise, the certified upper bound) are computed separately: a
reference that cannot be computed is reported as missing, and the lower bound stands on its own.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numba
import numpy as np
from scipy import fft as sfft

from accountant import composition
from accountant.certify import certify
from accountant.mechanism import Mechanism
from accountant.noise import Gaussian, Noise, Tabulated
from accountant.privacy_loss import TAIL_NEGLIGIBLE

#: lattice points snap onto a lattice value within this fraction of a step (a stated float tolerance)
SNAP = 1e-9
UNIT = 2.0 ** -52
#: largest k tried: at k = 4^18 the per-coordinate shift C / 2^18 leaves a loss below float64's
#: resolution on the lattice and the bound from that k collapses to 0 (measured for Gaussian and
#: Laplace noise, sigma / scale 1); larger k only add failures, never a larger bound
MAX_K = 4 ** 16
#: threads for the batched FFTs of a squaring (scipy.fft ``workers``)
FFT_WORKERS = min(2, os.cpu_count() or 1)


class AuditError(ValueError):
    """The audit cannot run (bad arguments) or failed its own self-check."""


@dataclass(frozen=True)
class AuditAccuracy:
    """Grid sizes. ``coordinate_points``: lattice points of one coordinate's loss; ``fine_factor``:
    fine bins per lattice step; ``max_points``: lattice size kept through the squarings;
    ``step_points``: lattice steps across the per-step loss's standard deviation (stage 4)."""

    coordinate_points: int = 4096
    fine_factor: int = 8
    max_points: int = 1 << 16
    step_points: int = 500
    max_step: float = 1e-4


@dataclass
class AuditResult:
    lower_bound: float
    k: int
    one_coordinate: float | None
    gaussian_limit: float | None
    sigma_eff: float | None
    fisher_information: float
    upper_bound: float | None
    delta: float
    dimension: int
    claimed_epsilon: float | None = None
    refuted: bool | None = None
    per_k: list = field(default_factory=list)
    mechanism: dict = field(default_factory=dict)
    seconds: float = 0.0
    #: why a reference (``gaussian_limit``, ``upper_bound``) or a k is missing: {name: one line}
    unavailable: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Garbling onto a lattice
# ----------------------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _garble(t, w, step, snap, leftover, sign):
    """Greedy merge of sorted atoms at lattice positions ``t`` with lower masses ``w`` into bins
    whose loss is exactly an integer position m. ``sign`` is +1 when the loss is ``t * step`` (sweep
    from the bottom up) and -1 when it is ``-t * step`` (the caller negated the positions to sweep
    from the top down). Returns (m, lower mass) per bin, the dropped lower mass, the largest moves
    to a larger and to a smaller position (in steps, in t's coordinates), and, for ``leftover == 3``
    (keep), where the unbalanced rest starts: (index, its first atom's remaining mass, target)."""
    n = t.shape[0]
    out_m = np.empty(2 * n + 1, np.int64)
    out_w = np.empty(2 * n + 1, np.float64)
    nb = 0
    dropped = 0.0
    max_up = 0.0
    max_down = 0.0
    rest, rest_w, rest_m = n, 0.0, 0
    i = 0
    rw = w[0] if n > 0 else 0.0
    while i < n:
        if rw <= 0.0:
            i += 1
            if i < n:
                rw = w[i]
            continue
        m = math.ceil(t[i] - snap)
        if t[i] >= m - snap:              # on the lattice, to the float tolerance
            max_up = max(max_up, m - t[i])
            max_down = max(max_down, t[i] - m)
            out_m[nb] = m
            out_w[nb] = rw
            nb += 1
            rw = 0.0
            continue
        # sum of w (e^(loss - loss_m) - 1) over a bin is 0 exactly when its ratio is e^(loss_m)
        balance = rw * sign * math.expm1(sign * (t[i] - m) * step)   # < 0: below its target
        mass = rw
        on_target = 0.0                   # mass of atoms that sit on the target itself
        j = i + 1
        closed = False
        while j < n:
            if abs(t[j] - m) <= snap:
                max_up = max(max_up, m - t[j])
                max_down = max(max_down, t[j] - m)
                on_target += w[j]
                mass += w[j]
                j += 1
                continue
            c = w[j] * sign * math.expm1(sign * (t[j] - m) * step)
            if c > 0.0 and balance + c >= 0.0:
                f = min(1.0, -balance / c)
                mass += f * w[j]
                out_m[nb] = m
                out_w[nb] = mass
                nb += 1
                i = j
                rw = w[j] * (1.0 - f)
                closed = True
                break
            balance += c
            mass += w[j]
            j += 1
        if not closed:                    # nothing above to balance with: keep the on-target atoms
            if on_target > 0.0:
                out_m[nb] = m
                out_w[nb] = on_target
                nb += 1
            if leftover == 3:
                rest, rest_w, rest_m = i, rw, m
            elif leftover != 0:           # each leftover atom to the lattice point below (1) / above (2)
                for r in range(i, n):
                    part = rw if r == i else w[r]
                    if abs(t[r] - m) <= snap:
                        continue
                    out_m[nb] = math.floor(t[r] + snap) if leftover == 1 else math.ceil(t[r] - snap)
                    out_w[nb] = part
                    nb += 1
            else:
                dropped += mass - on_target
            i = n
    return out_m[:nb], out_w[:nb], dropped, max_up, max_down, rest, rest_w, rest_m


LEFTOVER = {"drop": 0, "down": 1, "up": 2}


def garble_to_lattice(t, w, step: float, leftover: str = "drop", moves: bool = False):
    """Garble a discrete pair onto the integer lattice positions.

    The pair is given by sorted positions ``t`` (the loss is ``offset + t * step``, offset common to
    all atoms and irrelevant here) and lower-measure masses ``w`` (upper masses ``w * exp(loss)``).
    Contiguous runs of atoms (splitting at most one atom at each end) are merged so that each run's
    upper/lower mass ratio is ``exp`` of the loss at an integer position; merging is a
    post-processing, so every hockey-stick divergence can only decrease (docs/privacy.md, Theorem
    A). The sweep runs from the bottom up; at the top it can leave a rest that nothing above can
    balance. With ``leftover="drop"`` that rest is dropped. With ``"down"`` or ``"up"`` the rest is
    merged from the top down instead, together with the bins already formed below it (again a
    garbling: no loss moves, so the tilted measure keeps its total mass), and only what even that
    cannot balance is moved to the lattice point below (``"down"``) or above (``"up"``): moving
    losses down under the lower measure lowers delta when delta is non-decreasing in the loss (the
    remove relation, and any final step pair), moving them up lowers it when it is non-increasing
    (the add relation seen through L). Atoms within ``SNAP`` of a lattice point are assigned to it;
    the largest upward move is returned so the caller can account for it (and, with
    ``moves=True``, also the largest downward move).

    Returns ``(first, lower_masses, dropped_lower_mass, max_upward_snap_in_steps)`` (plus
    ``max_downward_snap_in_steps`` with ``moves=True``): ``lower_masses[i]`` sits at position
    ``first + i``.
    """
    t = np.ascontiguousarray(t, dtype=np.float64)
    w = np.ascontiguousarray(w, dtype=np.float64)
    keep = (w > 0) & np.isfinite(t)
    dropped_inf = float(np.sum(w[~keep]))
    t, w = t[keep], w[keep]
    mode = LEFTOVER[leftover]
    m, mass, dropped, up, down, rest, rest_w, rest_m = _garble(t, w, float(step), SNAP, 3 if mode else 0, 1.0)
    if mode and rest < len(t):
        rt, rw = t[rest:].copy(), w[rest:].copy()
        rw[0] = rest_w
        off = np.abs(rt - rest_m) > SNAP              # on-target atoms of the rest are already binned
        pos = np.concatenate([m.astype(np.float64), rt[off]])
        wts = np.concatenate([mass, rw[off]])
        order = np.argsort(-pos, kind="stable")
        # negated positions: the top-down sweep; its own rest is rounded the safe way (down in t
        # is up in -t), and its moves swap direction
        m2, mass, dropped2, up2, down2, _, _, _ = _garble(-pos[order], wts[order], float(step), SNAP,
                                                          2 if mode == 1 else 1, -1.0)
        m = -m2
        dropped += dropped2
        up, down = max(up, down2), max(down, up2)
    if len(m) == 0:
        out = (0, np.zeros(1), dropped + dropped_inf, 0.0)
        return out + (0.0,) if moves else out
    first = int(m.min())
    out = np.bincount(m - first, weights=mass)
    return (first, out, dropped + dropped_inf, up, down) if moves else (first, out, dropped + dropped_inf, up)


# ----------------------------------------------------------------------------------------------
# Stage 1-2: one coordinate
# ----------------------------------------------------------------------------------------------
@dataclass
class LatticeLaw:
    """P-masses ``p`` of a loss on the lattice ``origin + (first + stride * i) * unit`` (the
    tilted measure P_v has masses ``p * exp(loss)``). ``up`` and ``down`` bound how far float
    snapping moved any loss value upwards and downwards (loss units)."""

    origin: float
    unit: float
    first: int
    stride: int
    p: np.ndarray
    up: float = 0.0
    down: float = 0.0

    @property
    def step(self) -> float:
        return self.stride * self.unit

    def losses(self) -> np.ndarray:
        return self.origin + (self.first + self.stride * np.arange(len(self.p))) * self.unit


def _cells(noise: Noise, shift: float, resolution: float) -> np.ndarray:
    """Cut points of a partition of the line into cells on which l(x) = log p(x - s) - log p(x) is
    monotone (breaks at 0, s and, for tables, every edge and shifted edge) and varies by at most
    ``resolution`` (cells whose end values differ more are cut uniformly)."""
    reach = float(noise.isf(TAIL_NEGLIGIBLE))
    pts = [np.sinh(np.linspace(-math.asinh(reach), math.asinh(reach + shift), 8193)),
           np.linspace(-2 * shift, 3 * shift, 2049), [0.0, shift]]
    if isinstance(noise, Tabulated):
        inside = noise.edges[np.abs(noise.edges) <= reach]
        pts += [inside, inside + shift]
    x = np.unique(np.concatenate(pts))
    with np.errstate(divide="ignore", invalid="ignore"):
        ell = noise.logpdf(x - shift) - noise.logpdf(x)
    jump = np.abs(np.diff(ell))
    jump = np.where(np.isfinite(jump), jump, 0.0)
    parts = np.minimum(np.ceil(jump / resolution), 1e6).astype(np.int64)
    parts = np.maximum(parts, 1)
    start = np.repeat(x[:-1], parts)
    width = np.repeat(np.diff(x) / parts, parts)
    offset = np.arange(len(start)) - np.repeat(np.cumsum(parts) - parts, parts)
    return np.append(start + offset * width, x[-1])


def coordinate_cells(noise: Noise, shift: float, accuracy: AuditAccuracy = AuditAccuracy()):
    """Stage 1, shared by both relations: the line is cut into cells (:func:`_cells`, plus the two
    outer half-lines, which are dropped); reporting only the cell of x is a garbling whose losses are
    log(P_s(cell) / P(cell)), with both masses exact from the law's survival functions. Returns the
    cell losses (sorted) and their P-masses."""
    reach = float(noise.isf(TAIL_NEGLIGIBLE))
    # a first pass fixes the loss range, the second cuts cells at the final resolution
    scale = _loss_range(noise, shift, reach)
    resolution = 2 * scale / (accuracy.coordinate_points * accuracy.fine_factor)
    cuts = _cells(noise, shift, resolution)
    lo, hi = cuts[:-1], cuts[1:]
    # the two outer half-lines (mass <= TAIL_NEGLIGIBLE each) are dropped
    p_mass = noise.interval_mass(lo, hi)
    s_mass = noise.interval_mass(lo - shift, hi - shift)
    with np.errstate(divide="ignore", invalid="ignore"):
        ell = noise.logpdf(cuts - shift) - noise.logpdf(cuts)
    ok = (p_mass > 0) & (s_mass > 0) & np.isfinite(ell[:-1]) & np.isfinite(ell[1:])
    x = np.log(s_mass[ok]) - np.log(p_mass[ok])
    # l is monotone on a cell, so its loss lies between the end values (clip float noise)
    x = np.clip(x, np.minimum(ell[:-1], ell[1:])[ok], np.maximum(ell[:-1], ell[1:])[ok])
    w = p_mass[ok]
    order = np.argsort(x, kind="stable")
    return x[order], w[order]


#: cells within this fraction of a lattice step of the largest loss form the top cluster
TOP_CLUSTER = 1e-3


def coordinate_law(noise: Noise, shift: float, accuracy: AuditAccuracy = AuditAccuracy(),
                   leftover: str = "drop", cells=None) -> LatticeLaw:
    """The one-coordinate pair (P_s, P) garbled onto a lattice.

    Stage 1: :func:`coordinate_cells` (or ``cells``, its result). Stage 2: these atoms are garbled
    onto a lattice of ``coordinate_points`` steps from the smallest cell loss to the top, so the
    atoms of Laplace noise (l = -A on x <= 0, +A on x >= s) sit exactly on it. Cells that should
    share the smallest or the largest loss (Laplace's x <= 0 and x >= s) differ by float noise
    (~1e-14); those within ``TOP_CLUSTER`` steps of either end are first rounded to one value the
    safe way for the relation: down to the cluster's smallest loss (``leftover="down"``, remove) or
    up to its largest (``"up"``, add), and the lattice ends there. Without this a cluster sits just
    off a lattice point: at the top it cannot be balanced and a whole step of rounding on its mass
    compounds k-fold; at the bottom it is merged with a long run of the cells above it."""
    x, w = coordinate_cells(noise, shift, accuracy) if cells is None else cells
    bottom, top = float(x[0]), float(x[-1])
    tol = TOP_CLUSTER * (top - bottom) / accuracy.coordinate_points
    low, high = x <= bottom + tol, x >= top - tol
    if leftover == "down":                        # rounding down: Theorem A (ii)(c), remove
        top = float(x[high].min())
        x = np.where(low, bottom, np.minimum(x, top))
    elif leftover == "up":                        # rounding up: the add relation's safe way
        bottom = float(x[low].max())
        x = np.where(high, top, np.maximum(x, bottom))
    unit = (top - bottom) / accuracy.coordinate_points
    first, p, _, up, down = garble_to_lattice((x - bottom) / unit, w, unit, leftover, moves=True)
    return LatticeLaw(bottom, unit, first, 1, p, up * unit, down * unit)


def _loss_range(noise: Noise, shift: float, reach: float) -> float:
    """max |l| over the scanned region (sets the fine resolution only; not a soundness input)."""
    xs = np.concatenate([np.sinh(np.linspace(-math.asinh(reach), math.asinh(reach + shift), 20001)),
                         [0.0, shift]])
    with np.errstate(divide="ignore", invalid="ignore"):
        ell = np.abs(noise.logpdf(xs - shift) - noise.logpdf(xs))
    ell = ell[np.isfinite(ell)]
    if len(ell) == 0 or float(ell.max()) <= 0:
        raise AuditError(f"{noise.family}: the per-coordinate privacy loss vanishes (shift {shift:g})")
    return float(ell.max())


# ----------------------------------------------------------------------------------------------
# Stage 3: k coordinates by repeated squaring
# ----------------------------------------------------------------------------------------------
def _fft_floor(a: np.ndarray, b: np.ndarray, n: int) -> float:
    """Bound on the absolute error of one FFT convolution entry: 64 log2(n) u ||a||_2 ||b||_2
    (the forward-error bound of FFT convolution with a generous constant; docs/privacy.md,
    section "Audit" gives the measured errors)."""
    # sums of squares without BLAS (its threads contend with the FFT threads on a busy machine)
    return 64 * math.log2(max(n, 2)) * UNIT * math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))


def _tilt(p: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """p * e^losses, without overflow far out (through logarithms only where e^losses could overflow)."""
    if len(losses) == 0 or float(np.max(np.abs(losses))) < 700.0:
        return p * np.exp(losses)
    with np.errstate(over="ignore", under="ignore", divide="ignore"):
        return np.where(p > 0, np.exp(np.log(np.where(p > 0, p, 1.0)) + losses), 0.0)


def square(law: LatticeLaw) -> LatticeLaw:
    """Law of L + L' (independent copies). The P-masses and the P_v-masses are both convolved
    (each accurate in its own bulk: P_v = e^L P carries the upper tail); each result minus the FFT
    error bound is a lower estimate of the true mass, and the larger of the two is kept."""
    p = law.p
    v = _tilt(p, law.losses())
    n = 2 * len(p) - 1
    size = sfft.next_fast_len(n, real=True)
    eta_p, eta_v = _fft_floor(p, p, size), _fft_floor(v, v, size)
    both = sfft.rfft(np.stack([p, v]), size, axis=-1, workers=FFT_WORKERS)   # one batched transform
    pp, vv = sfft.irfft(both * both, size, axis=-1, workers=FFT_WORKERS)[:, :n]
    out = LatticeLaw(2 * law.origin, law.unit, 2 * law.first, law.stride, pp, 2 * law.up, 2 * law.down)
    # Outer tails (beyond the outermost entries far above the error bound): each estimate minus
    # its error bound is below the true mass; keep the larger. Inside, the computed masses are kept
    # (negative float noise clipped): their error is the FFT's, measured in docs/privacy.md, section "Audit".
    big = np.nonzero(pp > 1e3 * eta_p)[0]
    lo, hi = (int(big[0]), int(big[-1]) + 1) if len(big) else (n, n)
    res = np.maximum(pp, 0.0)
    for a, b in ((0, lo), (hi, n)):
        if b > a:
            losses = out.origin + (out.first + out.stride * np.arange(a, b)) * out.unit
            res[a:b] = np.maximum(np.maximum(pp[a:b] - eta_p, _tilt(np.maximum(vv[a:b] - eta_v, 0.0), -losses)), 0.0)
    out.p = res
    nz = np.nonzero(out.p)[0]
    if len(nz) == 0:
        raise AuditError("all mass lost in the k-fold convolution (numerical failure)")
    out.first += law.stride * int(nz[0])
    out.p = out.p[nz[0]:nz[-1] + 1]
    return out


def coarsen(law: LatticeLaw, max_points: int, leftover: str = "drop") -> LatticeLaw:
    """Garble onto every other lattice point until at most ``max_points`` remain."""
    while len(law.p) > max_points:
        # positions counted from the origin, so lattice-aligned atoms (Laplace) stay on the lattice
        t = (law.first + law.stride * np.arange(len(law.p))) / (2.0 * law.stride)
        first, p, _, up, down = garble_to_lattice(t, law.p, 2 * law.step, leftover, moves=True)
        law = LatticeLaw(law.origin, law.unit, 2 * law.stride * first, 2 * law.stride, p,
                         law.up + up * 2 * law.step, law.down + down * 2 * law.step)
    return law


def k_coordinate_law(noise: Noise, sensitivity: float, k: int, accuracy: AuditAccuracy = AuditAccuracy(),
                     direction: str = "remove", cells=None) -> LatticeLaw:
    """Law of L = sum of k per-coordinate losses (shift C/sqrt(k)) under P, garbled onto a
    lattice (k a power of 2: log2(k) squarings). Unbalanced mass is rounded down for the remove
    relation (whose delta increases with L) and up for the add relation (whose delta decreases).
    ``cells``: stage 1 (:func:`coordinate_cells` at shift C/sqrt(k)), if already computed."""
    if k < 1 or k & (k - 1):
        raise AuditError(f"k must be a power of 2, got {k}")
    leftover = "down" if direction == "remove" else "up"
    law = coordinate_law(noise, sensitivity / math.sqrt(k), accuracy, leftover, cells)
    for _ in range(k.bit_length() - 1):
        law = coarsen(square(law), accuracy.max_points, leftover)
    return law


# ----------------------------------------------------------------------------------------------
# Stage 4: subsampling and T-fold composition
# ----------------------------------------------------------------------------------------------
def epsilon_for_delta(losses: np.ndarray, upper: np.ndarray, delta: float) -> float:
    """Smallest eps >= 0 with sum_y upper_y (1 - e^(eps - y))_+ <= delta for a discrete upper
    measure at sorted ``losses`` (exact for that measure; :func:`accountant.composition.epsilon_for_delta`)."""
    return composition.epsilon_for_delta(losses, upper, 0.0, delta)


def self_convolve(masses: np.ndarray, times: int, tail_mass: float):
    """``times``-fold convolution of ``masses`` with itself by one real FFT, on the window outside
    of which the Chernoff bound puts at most ``tail_mass`` of the result
    (:func:`accountant.composition.self_convolve`, float64). Returns (index of the first entry,
    entries); the mass outside the window wraps around onto it, at most ``tail_mass``."""
    lo, entries, _ = composition.self_convolve(masses, times, tail_mass, clip=False)
    return lo, entries


def _log_mgf(upper: np.ndarray, dstep: float, lam: float) -> float:
    """log sum_i upper_i e^(lam i dstep), by a stable log-sum-exp."""
    with np.errstate(divide="ignore"):
        a = np.log(upper) + lam * dstep * np.arange(len(upper))
    top = float(np.max(a))
    return top + math.log(float(np.sum(np.exp(a - top))))


def _chernoff_tilt(upper: np.ndarray, dstep: float, steps: int, delta: float) -> float:
    """The exponential tilt lam >= 0 whose tilted T-fold law is centred where the composed upper
    measure's tail is about ``delta``: the smallest lam on a grid with Chernoff exponent
    T log M(lam) - lam T (log M)'(lam) <= log delta (the Legendre transform of the cumulant
    generating function; Dembo and Zeitouni, Large Deviations, Theorem 2.2.3). Tilted by it, the
    entries around epsilon are the bulk of the tilted law. Only the accuracy depends on this choice."""
    idx = dstep * np.arange(len(upper))
    with np.errstate(divide="ignore"):
        logu = np.log(upper)
    previous = 0.0
    for lam in np.geomspace(1e-3, 100.0, 161):
        a = logu + lam * idx
        top = float(np.max(a))
        w = np.exp(a - top)
        logm = top + math.log(float(np.sum(w)))
        mean = float(np.sum(w * idx) / np.sum(w))
        if steps * (logm - lam * mean) <= math.log(delta):
            return previous
        previous = float(lam)
    return previous


def _compose_tilted(upper: np.ndarray, dstep: float, steps: int, delta: float, lam: float) -> dict:
    """T-fold composition of the upper measure by one FFT of its exponentially tilted version
    ``u_i e^(lam i dstep) / M(lam)`` (a probability vector), untilted afterwards: entry j of the
    composition is (tilted entry) * e^(T log M(lam) - lam j dstep). The FFT's error is absolute in
    the tilted scale, so with the tilt placed at epsilon (:func:`_chernoff_tilt`) the entries that
    decide delta(eps) are computed to float precision instead of to the precision of the untilted
    bulk (exponential tilting as in the saddle-point method; Feller, vol. II, XVI.7).

    Error per tilted entry, modelled as ``eta = max(8 log2(N) u max_j entry_j, 10 x the largest
    negative entry)``: an FFT's rounding error is absolute, at the scale of the largest entry, and the
    measured term is the model docs/privacy.md, section "Audit" uses for the squarings (the normwise
    worst case, 8 log2(N) u T ||x||_2, is far above the errors measured against direct convolution
    in the tests, and at q 1e-3, T 1e4 it charged 7e-7 against delta 1e-12, voiding the bound); plus the mass wrapped around the window
    (at most ``trunc``, tilted scale). Both are charged in :func:`_certified_read`. Entries are
    capped at 1 (the composed upper measure has total mass <= 1), which only lowers them."""
    logm = _log_mgf(upper, dstep, lam)
    with np.errstate(divide="ignore", under="ignore"):
        tilted = np.exp(np.log(upper) + lam * dstep * np.arange(len(upper)) - logm)
    trunc = min(1e-15, delta * 1e-6)
    low_idx, composed = self_convolve(tilted, steps, trunc)
    composed = np.asarray(composed, dtype=np.float64)
    noise_amp = max(-float(composed.min()), 0.0) if len(composed) else 0.0
    # the error model: the measured noise (as for the squarings), and at least 8 log2(N) u times the
    # largest entry (an FFT's rounding is absolute, relative to the largest entry)
    eta = max(8 * math.log2(max(len(composed), 2)) * UNIT * float(composed.max()), 10 * noise_amp)
    j = low_idx + np.arange(len(composed))
    with np.errstate(divide="ignore", over="ignore", under="ignore"):
        logs = np.log(np.where(composed > 0, composed, 1.0)) + steps * logm - lam * dstep * j
        masses = np.where(composed > 0, np.exp(np.minimum(logs, 0.0)), 0.0)
    return {"y": j * dstep, "masses": masses, "trunc": trunc, "eta": eta, "log_scale": steps * logm,
            "lam": lam, "step": dstep}


def _certified_read(c: dict, first_loss: float, delta: float, shift: float):
    """(lower bound on epsilon at delta, allowance used) from a :func:`_compose_tilted` result.

    Above a loss e the computed delta(e) exceeds the true lattice delta(e) by at most
    G(e) = e^(T log M - lam (e - T first)) (trunc + eta / (1 - e^(-lam dstep))) (the tilted errors
    scaled back: a geometric sum over the entries above e; for lam = 0, trunc + eta times the number
    of entries). Any e with computed delta(e) > (delta + G(e)) e^shift lies below the true epsilon
    (snapping moved losses up by at most ``shift``). G decreases in e, so with
    e1 = eps_for_delta((delta + G(e0)) e^shift) >= e0 every e in [e0, e1) qualifies and e1 - shift is a
    lower bound; e0 starts just below the reading without allowance and is lowered until it holds."""
    losses = first_loss + c["y"]
    lam, step = c["lam"], c["step"]
    per_scale = c["trunc"] + (c["eta"] / -math.expm1(-lam * step) if lam > 0 else c["eta"] * len(losses))

    def allowance(e):
        return per_scale * math.exp(min(c["log_scale"] - lam * (e - first_loss), 700.0))

    e0 = epsilon_for_delta(losses, c["masses"], delta * math.exp(shift))
    for _ in range(60):
        e0 -= max(1e-3 * abs(e0), 2 * step)
        guard = allowance(e0)
        e1 = epsilon_for_delta(losses, c["masses"], (delta + guard) * math.exp(shift))
        if e1 >= e0 or e1 <= 0:
            return e1 - shift, guard
    return 0.0, math.inf


def compose_lower(law: LatticeLaw, q: float, steps: int, delta: float,
                  accuracy: AuditAccuracy = AuditAccuracy(), directions=("remove", "add")) -> dict:
    """Lower bound on epsilon at ``delta`` of ``steps`` compositions of the Poisson-subsampled
    pair whose k-coordinate loss L has the law ``law``, per relation in ``directions`` (the law
    must have been built for that relation: see :func:`k_coordinate_law`)."""
    L = law.losses()
    p = law.p
    y = np.log1p(q * np.expm1(L)) if q < 1 else L.copy()     # remove loss log(1 - q + q e^L)
    out = {}
    for direction in directions:
        if direction == "remove":
            x, w = y, p                                          # upper A, lower P
        else:
            x, w = -y[::-1], (p * np.exp(y))[::-1]               # upper P, lower A
        u = w * np.exp(x)
        mean = float(np.sum(u * x) / np.sum(u))
        sd = math.sqrt(max(float(np.sum(u * (x - mean) ** 2) / np.sum(u)), 0.0))
        dstep = min(accuracy.max_step, max(sd, 1e-12) / accuracy.step_points)
        offset = float(x[int(np.argmax(w))])                     # the heaviest atom sits on the lattice
        first, lower, dropped, up = garble_to_lattice((x - offset) / dstep, w, dstep, "down")
        g = offset + (first + np.arange(len(lower))) * dstep
        upper = lower * np.exp(g)
        # float snapping moved losses up by at most `shift` in total (docs/privacy.md, section "Audit")
        # (remove: L moved up; add: L moved down, i.e. its step loss -log(1 - q + q e^L) up)
        shift = steps * (up * dstep + (law.up if direction == "remove" else law.down))
        first_loss = float(g[0]) * steps
        lam = _chernoff_tilt(upper, dstep, steps, delta)
        tilted = _compose_tilted(upper, dstep, steps, delta, lam)
        eps, guard = _certified_read(tilted, first_loss, delta, shift)
        out[direction] = {"epsilon": max(eps, 0.0), "step": dstep, "dropped": dropped, "guard": guard,
                          "snap_shift": shift, "points": len(upper), "composed_points": len(tilted["y"]),
                          "tilt": lam}
    out["epsilon"] = max(out[d]["epsilon"] for d in directions)
    return out


# ----------------------------------------------------------------------------------------------
# References: Fisher information and the Gaussian limit
# ----------------------------------------------------------------------------------------------
def fisher_information(noise: Noise) -> float:
    """I = E[(d/dx log p(X))^2], from the law (``Noise.fisher_information``; infinite for tables)."""
    return noise.fisher_information()


def gaussian_limit(noise: Noise, sensitivity: float, q: float, steps: int, delta: float):
    """(epsilon, sigma_eff) of the k -> infinity limit: Gaussian noise with sigma_eff = 1/(C sqrt(I))
    and sensitivity 1 (docs/privacy.md, section 3); (None, None) when I is infinite."""
    info = fisher_information(noise)
    if not math.isfinite(info) or info <= 0:
        return None, None
    sigma_eff = 1 / (sensitivity * math.sqrt(info))
    return certify(Mechanism(Gaussian(sigma_eff), 1.0, "scalar", q, steps), delta).epsilon, sigma_eff


# ----------------------------------------------------------------------------------------------
# The audit
# ----------------------------------------------------------------------------------------------
def k_grid(dimension: int, max_k: int | None = None) -> list[int]:
    """k = 1, 4, 16, ... up to the dimension (and max_k, and MAX_K)."""
    top = min(dimension, max_k, MAX_K) if max_k else min(dimension, MAX_K)
    out, k = [], 1
    while k <= top:
        out.append(k)
        k *= 4
    return out


def lower_bound_at_k(mechanism: Mechanism, k: int, delta: float,
                     accuracy: AuditAccuracy = AuditAccuracy()) -> dict:
    """Certified lower bound on epsilon from the pair with v spread over k coordinates."""
    out = {}
    cells = coordinate_cells(mechanism.noise, mechanism.sensitivity / math.sqrt(k), accuracy)
    for direction in ("remove", "add"):      # each relation rounds unbalanced mass its own safe way
        law = k_coordinate_law(mechanism.noise, mechanism.sensitivity, k, accuracy, direction, cells)
        out[direction] = compose_lower(law, mechanism.sampling_rate, int(mechanism.steps), delta,
                                       accuracy, (direction,))[direction]
    out["epsilon"] = max(out["remove"]["epsilon"], out["add"]["epsilon"])
    out["k"] = k
    out["loss_step"] = law.step
    return out


def audit(mechanism: Mechanism, dimension: int, delta: float, claimed_epsilon: float | None = None,
          max_k: int | None = None, accuracy: AuditAccuracy = AuditAccuracy(),
          progress: bool = False, workers: int | None = None) -> AuditResult:
    """Certified lower bound on the epsilon of ``mechanism`` (product noise, L2 clipping with norm
    ``mechanism.sensitivity``) on vectors of ``dimension`` coordinates; see the module docstring.
    The values of k are independent: ``workers`` threads (default: up to 2, the CPU count) audit
    them concurrently (the FFTs and the compiled garbling release the GIL); results do not
    depend on it."""
    start = time.perf_counter()
    if mechanism.geometry != "l2":
        raise AuditError(f"the audit is for l2 clipping, got geometry {mechanism.geometry!r}")
    if int(dimension) != dimension or dimension < 1:
        raise AuditError(f"dimension must be a positive integer, got {dimension}")
    if not (0 < delta < 1):
        raise AuditError(f"delta must lie in (0, 1), got {delta}")
    if delta < 1e-13:
        raise AuditError(f"delta {delta:g} is below what float64 accounting can resolve (about 1e-13)")
    if claimed_epsilon is not None and not (claimed_epsilon >= 0 and math.isfinite(claimed_epsilon)):
        raise AuditError(f"claimed epsilon must be a finite non-negative number, got {claimed_epsilon}")
    grid = k_grid(int(dimension), max_k)
    workers = max(1, min(workers or FFT_WORKERS, len(grid)))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(grid), desc="audit k", unit="k")

    def one(k):
        try:
            r = lower_bound_at_k(mechanism, k, delta, accuracy)
            row = {"k": k, "lower_bound": r["epsilon"], "remove": r["remove"]["epsilon"],
                   "add": r["add"]["epsilon"], "loss_step": r["loss_step"], "step": r["remove"]["step"],
                   "guard": max(r["remove"]["guard"], r["add"]["guard"])}
        except _NUMERICAL as exc:          # this pair gives no bound; the others still do
            row = {"k": k, "lower_bound": None, "error": _one_line(exc)}
        if bar is not None:
            bar.update()
        return row
    q, steps, c = mechanism.sampling_rate, int(mechanism.steps), mechanism.sensitivity
    unavailable = {}

    def reference():
        try:
            return gaussian_limit(mechanism.noise, c, q, steps, delta)
        except _NUMERICAL as exc:          # the reference failed; the lower bound does not depend on it
            unavailable["gaussian_limit"] = _one_line(exc)
            return None, None
    try:
        if workers == 1:
            per_k = [one(k) for k in grid]
            limit, sigma_eff = reference()
        else:                                  # the reference and the largest k first: they take longest
            with ThreadPoolExecutor(workers) as pool:
                ref = pool.submit(reference)
                done = dict(zip(grid[::-1], pool.map(one, grid[::-1])))
                limit, sigma_eff = ref.result()
            per_k = [done[k] for k in grid]
    finally:
        if bar is not None:
            bar.close()
    valid = [r for r in per_k if r["lower_bound"] is not None]
    if not valid:
        raise AuditError(f"no k gave a lower bound: {per_k[0]['error']}")
    for r in per_k:
        if r["lower_bound"] is None:
            unavailable[f"k={r['k']}"] = r["error"]
    best = max(valid, key=lambda r: r["lower_bound"])
    upper = None
    if isinstance(mechanism.noise, Gaussian):
        try:
            upper = certify(mechanism, delta).epsilon
        except _NUMERICAL as exc:
            unavailable["upper_bound"] = _one_line(exc)
        if upper is not None and best["lower_bound"] > upper * (1 + 1e-6):
            raise AuditError(f"self-check failed: lower bound {best['lower_bound']:.6g} exceeds the "
                             f"certified upper bound {upper:.6g}")
    refuted = None if claimed_epsilon is None else bool(best["lower_bound"] > claimed_epsilon)
    return AuditResult(lower_bound=best["lower_bound"], k=best["k"], one_coordinate=per_k[0]["lower_bound"],
                       gaussian_limit=limit, sigma_eff=sigma_eff,
                       fisher_information=fisher_information(mechanism.noise), upper_bound=upper,
                       delta=delta, dimension=int(dimension), claimed_epsilon=claimed_epsilon,
                       refuted=refuted, per_k=per_k, mechanism=mechanism.describe(),
                       seconds=time.perf_counter() - start, unavailable=unavailable)


#: failures of a numerical computation (ours or a library's) that leave the other computations valid
_NUMERICAL = (ValueError, ArithmeticError, RuntimeError)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
