"""Search for the noise with the least E|Z| (or variance) whose CERTIFIED epsilon meets a target.

Pipeline (docs/soundness.md sections 3 and 4):

1. The calibrated Gaussian (smallest sigma whose certificate meets the target, to ~1e-4; see
   :func:`calibrate_certified`) is computed with the real accountant, in a second process while the
   search runs; it is both the yardstick for the reported ratio and the fallback answer.
2. Each candidate family (``noise_search.families``) is optimised over its shape with SciPy
   (bounded Brent for one shape parameter, Nelder-Mead with bounds for more).  For every shape the
   scale is calibrated to the target by the fast accountant (``noise_search.fast_accountant``), whose
   numbers only RANK candidates and are never reported as guarantees.
3. Under ``scalar`` geometry the best candidate is binned (bin width dividing the sensitivity),
   rounded onto the 2^-53 lattice (``Tabulated.quantised``) and that exact table is certified by both
   accountant routes at full accuracy.  If the certificate exceeds the target the noise is scaled up
   and re-certified; a table whose certificate exceeds the target is never written.  If the certified
   answer is not better than the calibrated Gaussian, the Gaussian is returned ("use Gaussian here"
   is a correct answer, docs/soundness.md section 4).
4. Under ``l2`` only the Gaussian has an exact certificate (rotation invariance); under ``l1`` only noise
   with a Lipschitz log-density (Laplace, LMO; per-step bound ``eps0 = C L``) is certifiable, and
   those laws are certified as parametric laws (docs/soundness.md rule 2).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from accountant.cli_common import DEFAULT_SAMPLING_RATE, DEFAULT_STEPS  # shared with python -m accountant
from noise_search import fast_accountant as fa
from noise_search.families import FAMILIES, L1_FAMILIES, TAIL_TARGET, Binned, spline_from_gengauss

# DEFAULT_SAMPLING_RATE, DEFAULT_STEPS: a documented, realistic DP fine-tuning setting, Poisson rate 1%
# (e.g. batch ~500 of 50k examples) and 1000 steps (~10 epochs), the setting of docs/soundness.md
# section 4; python -m accountant assumes the same run when --sampling-rate / --steps are omitted.
#: families searched under scalar geometry (``spline`` starts from the ``gengauss`` optimum)
DEFAULT_FAMILIES = ("gaussian", "laplace", "gengauss", "lmo", "staircase", "spline")
#: scales above this (in units of the sensitivity) are "no sane noise" (infeasible target)
MAX_SCALE = 1e4
#: Nelder-Mead evaluation budget per family
NM_BUDGET = {"lmo": 45, "staircase": 30, "spline": 80}


class TargetError(ValueError):
    """An infeasible or absurd target; the message is one line for the user."""


@dataclass
class Candidate:
    """The best member of one family found by the fast (ranking-only) search."""

    family: str
    shape: tuple
    scale: float
    params: dict
    ranking_objective: float          # E|Z| or variance at the fast-calibrated scale (not certified)
    evaluations: int

    def to_json(self) -> dict:
        return {"family": self.family, "params": self.params, "ranking_objective": self.ranking_objective,
                "evaluations": self.evaluations}


@dataclass
class SearchResult:
    family: str
    law: str
    params: dict
    expected_abs: float
    variance: float
    ratio_to_gaussian: float
    certified_epsilon: dict
    gaussian_sigma: float
    gaussian_expected_abs: float
    eps_target: float
    delta: float
    sampling_rate: float
    steps: int
    geometry: str
    objective: str
    candidates: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    path: str | None = None
    seconds: float = 0.0
    noise: object = None
    certificate: object = None

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in (
            "family", "law", "params", "expected_abs", "variance", "ratio_to_gaussian", "certified_epsilon",
            "gaussian_sigma", "gaussian_expected_abs", "eps_target", "delta", "sampling_rate", "steps",
            "geometry", "objective", "notes", "path", "seconds")}
        out["candidates"] = [c.to_json() for c in self.candidates]
        return out


# --------------------------------------------------------------------------------------------------
def check_target(eps: float, delta: float, sampling_rate: float, steps: int, geometry: str) -> None:
    """Refuse absurd targets with a one-line reason (CLI exit code 2)."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise TargetError(f"--eps must be a positive finite number, got {eps}")
    if eps > 50:
        raise TargetError(f"--eps {eps} is not a privacy guarantee worth certifying (use eps <= 50)")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise TargetError(f"--delta must lie in (0, 1), got {delta}")
    if delta < 1e-13:
        raise TargetError(f"--delta {delta:g} is below what the accountants resolve in float64 "
                          "(their FFT noise floor is ~1e-15; use delta >= 1e-13)")
    if not (0 < sampling_rate <= 1):
        raise TargetError(f"--sampling-rate must lie in (0, 1], got {sampling_rate}")
    if not (isinstance(steps, int) and 1 <= steps <= 10 ** 7):
        raise TargetError(f"--steps must be an integer in [1, 1e7], got {steps}")
    if geometry not in ("scalar", "l1", "l2"):
        raise TargetError(f"--geometry must be scalar, l1 or l2, got {geometry!r}")


def _bins_per_unit(gaussian_sigma: float) -> int:
    """Bins per sensitivity: about 48 bins per Gaussian sigma, between 1 and 1024."""
    return int(min(1024, max(1, math.ceil(48.0 / gaussian_sigma))))


def _tail_target(delta: float) -> float:
    """One-sided tail mass beyond the table core: negligible against delta, yet many 2^-53 lattice
    units (a tail rounded to zero would give the table compact support and an infinite privacy loss)."""
    return min(TAIL_TARGET, max(delta * 1e-2, 1e-15))


# --------------------------------------------------------------------------------------------------
# Fast (ranking) search over shapes
# --------------------------------------------------------------------------------------------------
class _FamilySearch:
    def __init__(self, name, eps, delta, q, T, n, objective, start_scale, tick, tail_target):
        self.fam = FAMILIES[name]
        self.name = name
        self.eps, self.delta, self.q, self.T, self.n = eps, delta, q, T, n
        self.objective = objective
        self.scale = start_scale
        self.tick = tick
        self.tail_target = tail_target
        self.best = None        # (value, shape, scale)
        self.evaluations = 0

    def value(self, shape) -> float:
        shape = tuple(float(v) for v in np.atleast_1d(shape)) if self.fam.dim else ()
        self.evaluations += 1
        try:
            scale, binned = fa.calibrate_scale(
                lambda s: self.fam.binned(shape, s, self.n, self.tail_target), self.eps, self.delta,
                self.q, self.T, start=self.scale, max_scale=MAX_SCALE)
        except fa.CalibrationError:
            self.tick()
            return 1e12
        self.scale = scale
        val = binned.objective(self.objective)
        if self.best is None or val < self.best[0]:
            self.best = (val, shape, scale)
        self.tick(self.name, val)
        return val

    def run(self, x0=None, budget=None, rng=None) -> Candidate:
        from scipy import optimize

        fam = self.fam
        if fam.dim == 0:
            self.value(())
        elif fam.dim == 1:
            lo, hi = fam.bounds[0]
            optimize.minimize_scalar(self.value, bounds=(lo, hi), method="bounded",
                                     options={"xatol": 5e-3, "maxiter": budget or 25})
        else:
            x0 = np.asarray(x0 if x0 is not None else fam.x0, dtype=np.float64)
            lo = np.array([b[0] for b in fam.bounds])
            hi = np.array([b[1] for b in fam.bounds])
            span = hi - lo
            simplex = [x0]
            for i in range(fam.dim):
                step = np.zeros(fam.dim)
                jitter = 1.0 + (0.2 * rng.random() if rng is not None else 0.0)
                step[i] = 0.1 * span[i] * jitter
                cand = x0 + step
                if cand[i] > hi[i]:
                    cand = x0 - step
                simplex.append(np.clip(cand, lo, hi))
            ref = self.value(x0)
            optimize.minimize(lambda x: self.value(x) / ref, x0, method="Nelder-Mead",
                              bounds=list(fam.bounds),
                              options={"initial_simplex": np.array(simplex), "maxfev": budget or 60,
                                       "xatol": 1e-3, "fatol": 2e-5})
        if self.best is None:
            raise fa.CalibrationError(f"family {self.name}: no shape reaches the target")
        val, shape, scale = self.best
        shape = fam.snap(shape, self.n)
        return Candidate(self.name, shape, scale, fam.params(shape, scale), val, self.evaluations)


def rank_families(names, eps, delta, q, T, n, objective, gaussian_scale, progress=None, seed=0):
    """Optimise every family in ``names`` with the fast accountant; candidates sorted best first."""
    rng = np.random.default_rng(seed)
    tail_target = _tail_target(delta)

    def tick(name=None, val=None):
        if progress is not None:
            progress.update(1)
            if name is not None:
                progress.set_postfix_str(f"{name} {objective}={val:.4f}", refresh=False)

    out = []
    starts = {"gaussian": gaussian_scale, "gengauss": gaussian_scale * math.sqrt(2),
              "laplace": gaussian_scale, "lmo": gaussian_scale, "staircase": gaussian_scale,
              "spline": gaussian_scale * math.sqrt(2)}
    gengauss_best = None
    for name in names:
        search = _FamilySearch(name, eps, delta, q, T, n, objective, starts.get(name, gaussian_scale), tick,
                               tail_target)
        x0 = None
        if name == "spline":
            beta = gengauss_best.shape[0] if gengauss_best is not None else 2.0
            x0 = spline_from_gengauss(beta)
            if gengauss_best is not None:
                search.scale = gengauss_best.scale
        if name == "staircase":
            x0 = (1.0 / (1.0 + math.exp(eps / 2)), 0.0)   # Geng & Viswanath's optimal step position
        try:
            cand = search.run(x0=x0, budget=NM_BUDGET.get(name), rng=rng)
        except fa.CalibrationError:
            continue
        if name == "gengauss":
            gengauss_best = cand
        out.append(cand)
    out.sort(key=lambda c: c.ranking_objective)
    return out


# --------------------------------------------------------------------------------------------------
# Certification with the real accountant
# --------------------------------------------------------------------------------------------------
def _routes(cert) -> dict:
    """Certified epsilon per route (each route's upper bound) and the final (largest) one."""
    out = {name: float(r["upper"]) for name, r in cert.routes.items()}
    out["final"] = float(cert.epsilon)
    return out


def calibrate_certified(make_noise, start: float, eps: float, delta: float, q: float, T: int, geometry: str,
                        rtol: float = 5e-5, max_certificates: int = 6, progress=None, margin: float = 1.0,
                        delta_at=None):
    """Smallest scale (to about ``rtol``) whose certificate meets ``eps``, from a good start: the one
    calibrator, ``accountant.certify.calibrate`` (PLD-guided, then usually one full certificate).
    ``delta_at(scale, eps)`` may replace the PLD in its first stage (the fast accountant is exact for
    one release of a table).  Returns ``(scale, noise, certificate)``.
    """
    from accountant.certify import CertificationError, ScaleNotFound, calibrate

    try:
        scale, cert = calibrate(make_noise, eps, delta, q, T, geometry, max_scale=MAX_SCALE, start=start,
                                rtol=rtol, margin=margin, max_certificates=max_certificates,
                                progress=progress, delta_at=delta_at)
    except ScaleNotFound:
        raise TargetError(f"no scale below {MAX_SCALE:g} certifies epsilon {eps:g} at delta {delta:g}") from None
    except CertificationError as exc:
        if "did not converge" not in str(exc):
            raise
        raise fa.CalibrationError(f"no certificate at epsilon {eps:g} after {max_certificates} attempts") from None
    return scale, make_noise(scale), cert


def _fast_gaussian_sigma(eps, delta, q, T) -> float:
    """Gaussian sigma by the fast accountant (start of every calibration; feasibility check)."""
    gauss = FAMILIES["gaussian"]
    try:
        sigma, _ = fa.calibrate_scale(lambda s: gauss.binned((), s, _bins_per_unit(s)), eps, delta, q, T,
                                      start=1.0 / eps, max_scale=MAX_SCALE)
    except fa.CalibrationError:
        raise TargetError(f"infeasible target: even Gaussian noise of {MAX_SCALE:g} times the sensitivity "
                          f"does not reach epsilon {eps:g} at delta {delta:g} (q={q:g}, T={T})") from None
    return sigma


def calibrated_gaussian(eps, delta, q, T, geometry, start):
    """The calibrated Gaussian (certified): the yardstick of the reported ratio and the fallback answer.
    Returns ``(sigma, certificate)``."""
    from accountant.noise import Gaussian

    sigma, _, cert = calibrate_certified(Gaussian, start, eps, delta, q, T, geometry)
    return float(sigma), cert


def _background_worker(conn, fn, args):  # pragma: no cover - runs in the child process
    try:
        conn.send((True, fn(*args)))
    except BaseException as exc:   # hand any failure (e.g. TargetError) back to the parent
        conn.send((False, exc))
    finally:
        conn.close()


class _Background:
    """Run ``fn(*args)`` in a separate process (the second core) while the search goes on; ``result()``
    waits for it, ``close()`` terminates it (an interrupted search does not wait for it)."""

    def __init__(self, fn, *args, parallel=True):
        self._fn, self._args, self._proc, self._conn = fn, args, None, None
        if parallel:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            self._conn, child = ctx.Pipe(duplex=False)
            self._proc = ctx.Process(target=_background_worker, args=(child, fn, args), daemon=True)
            self._proc.start()
            child.close()

    def result(self):
        if self._proc is None:
            return self._fn(*self._args)
        try:
            ok, value = self._conn.recv()
        except EOFError:
            raise RuntimeError("the background certification process died") from None
        finally:
            self.close()
        if not ok:
            raise value
        return value

    def close(self):
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.terminate()
            self._proc.join()
            self._conn.close()
            self._proc = None


def _quantised(binned: Binned):
    from accountant.noise import Tabulated

    return Tabulated.quantised(*merge_equal_bins(*binned.table_arrays()))


def merge_equal_bins(edges, mass, tail_mass, tail_rate, rtol: float = 1e-12):
    """Merge neighbouring bins of equal density: the same law with fewer cells (a staircase has two
    cells per unit of sensitivity instead of ``n``), which the accountant certifies faster."""
    dens = mass / np.diff(edges)
    keep = np.ones(len(edges), dtype=bool)
    same = np.abs(dens[1:] - dens[:-1]) <= rtol * np.maximum(dens[1:], dens[:-1])
    keep[1:-1] = ~same
    idx = np.nonzero(keep)[0]
    new_mass = np.add.reduceat(mass, idx[:-1])
    return edges[idx], new_mass, tail_mass, tail_rate


def certify_candidate(cand: Candidate, eps, delta, q, T, n, tail_target, progress=None):
    """Quantise, calibrate on the exact quantised table and certify it (both routes, full accuracy).

    Returns ``(table_noise, certificate, scale)``: a table whose certified epsilon is at most ``eps``.
    """
    fam = FAMILIES[cand.family]
    # one release: the fast accountant's hockey-stick sum over the bins is exact for the table (and the
    # PLD of a table with a wide loss range is slow); otherwise the PLD guides the calibration
    delta_at = None
    if T == 1:
        def delta_at(s, e):
            return fa.delta_for(fam.binned(cand.shape, s, n, tail_target), e, q, T)
    # margin 1.2: a second full certificate costs more than the 0.02% of noise it would save
    scale, table, cert = calibrate_certified(
        lambda s: _quantised(fam.binned(cand.shape, s, n, tail_target)), cand.scale, eps, delta, q, T,
        "scalar", progress=progress, margin=1.2, delta_at=delta_at)
    return table, cert, scale


# --------------------------------------------------------------------------------------------------
def search(eps: float, delta: float, sampling_rate: float = DEFAULT_SAMPLING_RATE,
           steps: int = DEFAULT_STEPS, geometry: str = "scalar", families=None, objective: str = "abs",
           out: str | None = None, seed: int = 0, progress: bool = False,
           parallel: bool = True, overwrite: bool = False) -> SearchResult:
    """Find the noise with the least ``objective`` (``abs``: E|Z|, ``var``: variance) certified at
    ``(eps, delta)`` for Poisson rate ``sampling_rate`` and ``steps`` compositions, and write its table to
    ``out`` (format v1, atomically) if given.  Raises :class:`TargetError` for infeasible targets and
    ``accountant.output_path.OutputPathError`` (before any work) for an ``out`` that cannot be written
    or exists (unless ``overwrite``).
    ``parallel``: certify the reference Gaussian in a second process while the families are ranked."""
    t0 = time.time()
    check_target(eps, delta, sampling_rate, steps, geometry)
    if out is not None:
        from accountant.output_path import check_output_file
        check_output_file(_npz(out), overwrite=overwrite, what="table")
    if objective not in ("abs", "var"):
        raise TargetError(f"--objective must be abs or var, got {objective!r}")
    q, T = float(sampling_rate), int(steps)
    names = list(families) if families else None
    notes = []
    if names:
        unknown = [f for f in names if f not in FAMILIES]
        if unknown:
            raise TargetError(f"unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")

    fast_sigma = _fast_gaussian_sigma(eps, delta, q, T)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc="noise search", unit="eval", leave=False)
    # the certified Gaussian runs on the second core while the families are ranked (scalar geometry)
    job = _Background(calibrated_gaussian, eps, delta, q, T, geometry, fast_sigma,
                      parallel=parallel and geometry == "scalar")
    g_holder = {}

    def gaussian_job():
        if not g_holder:
            sigma, cert = job.result()
            if bar is not None:
                bar.update(1)
            g_holder.update(family="gaussian", law="gaussian", params={"sigma": sigma},
                            expected_abs=sigma * math.sqrt(2 / math.pi), variance=sigma ** 2, cert=cert,
                            noise=None)
        return g_holder

    try:
        if geometry == "l2":
            notes.append("under l2 clipping only rotation-invariant Gaussian noise has an exact certificate "
                         "(docs/soundness.md rule 2): the answer is the calibrated Gaussian")
            chosen, candidates = gaussian_job(), []
        elif geometry == "l1":
            chosen, candidates = _search_l1(eps, delta, q, T, names, objective, gaussian_job(), notes, bar)
        else:
            chosen, candidates = _search_scalar(eps, delta, q, T, names, objective, fast_sigma, gaussian_job,
                                                notes, bar, seed)
    finally:
        job.close()
        if bar is not None:
            bar.close()
    g_sigma = g_holder["params"]["sigma"]
    g_abs = g_holder["expected_abs"]
    g_obj = g_abs if objective == "abs" else g_holder["variance"]

    if chosen["noise"] is None:
        from accountant.noise import Gaussian
        chosen["noise"] = Gaussian(g_sigma)
    obj_value = chosen["expected_abs"] if objective == "abs" else chosen["variance"]
    result = SearchResult(
        family=chosen["family"], law=chosen["law"], params=chosen["params"],
        expected_abs=float(chosen["expected_abs"]), variance=float(chosen["variance"]),
        ratio_to_gaussian=float(obj_value / g_obj), certified_epsilon=_routes(chosen["cert"]),
        gaussian_sigma=g_sigma, gaussian_expected_abs=g_abs, eps_target=eps, delta=delta,
        sampling_rate=q, steps=T, geometry=geometry, objective=objective, candidates=candidates,
        notes=notes, noise=chosen["noise"], certificate=chosen["cert"])
    if out is not None:
        write_result(result, out, seed=seed)
    result.seconds = time.time() - t0
    return result


def _search_scalar(eps, delta, q, T, names, objective, fast_sigma, gaussian_job, notes, bar, seed):
    """Rank all families with the fast accountant, certify the best table, compare with the certified
    Gaussian (computed meanwhile by ``gaussian_job``) and return the better of the two."""
    names = names or list(DEFAULT_FAMILIES)
    n = _bins_per_unit(fast_sigma)
    tail_target = _tail_target(delta)
    candidates = rank_families(names, eps, delta, q, T, n, objective, fast_sigma, progress=bar, seed=seed)
    fast_g = fast_sigma * math.sqrt(2 / math.pi) if objective == "abs" else fast_sigma ** 2
    best = None
    for cand in candidates:
        if cand.family == "gaussian":
            break   # the exact Gaussian law beats its own tabulation
        if cand.ranking_objective >= fast_g * (1 + 1e-4):
            break   # no remaining candidate is expected to beat the Gaussian
        try:
            table, cert, scale = certify_candidate(cand, eps, delta, q, T, n, tail_target, progress=bar)
        except ValueError as exc:   # a refused or failed certificate: try the next candidate
            notes.append(f"{cand.family}: certification failed ({str(exc).splitlines()[0]})")
            continue
        fam = FAMILIES[cand.family]
        params = dict(fam.params(cand.shape, scale))
        params["bin_width"] = 1.0 / max(n, fam.min_n)
        best = dict(family=cand.family, law="tabulated", params=params, expected_abs=table.expected_abs(),
                    variance=table.variance(), cert=cert, noise=table)
        break
    gaussian = gaussian_job()
    g_obj = gaussian["expected_abs"] if objective == "abs" else gaussian["variance"]
    if best is not None:
        value = best["expected_abs"] if objective == "abs" else best["variance"]
        if value < g_obj:
            notes.append("the certificate covers a one-dimensional query (|difference| <= C); for "
                         "gradient vectors clipped in L2 norm it does not hold (docs/soundness.md rule 2): "
                         "search with --geometry l2 or l1 instead")
            return best, candidates
        notes.append(f"{best['family']}: certified table ({objective} {value:.4f}) is not better than the "
                     f"calibrated Gaussian ({g_obj:.4f})")
    notes.append("the calibrated Gaussian is the best certified noise for this target")
    return gaussian, candidates


def _search_l1(eps, delta, q, T, names_given, objective, gaussian, notes, bar):
    """Under l1 clipping: Laplace and the LMO mixture (Lipschitz log-densities), certified as parametric
    laws.  The LMO shape is chosen by the l1 proxy E|Z| * L (L = E[u^2]/E[u], the log-density's
    Lipschitz constant, which fixes the per-step pure bound eps0 = C L), then calibrated for real."""
    from accountant.certify import calibrate
    from accountant.noise import LMO, Laplace

    names = [f for f in (names_given or L1_FAMILIES) if f in L1_FAMILIES]
    if not names and "gaussian" not in (names_given or ()):
        raise TargetError("under --geometry l1 only gaussian, laplace and lmo noise are certifiable "
                          "(the others have no Lipschitz log-density); drop --family or choose one of them")
    notes.append("under l1 clipping only noise with a Lipschitz log-density (Laplace, LMO) is certified "
                 "(per-step pure bound eps0 = C*L, docs/soundness.md rule 2); tabulated free-form noise is not")
    results = []
    candidates = []
    for name in names:
        if name == "laplace":
            make, shape = (lambda s: Laplace(s)), ()
        else:
            shape = _lmo_l1_shape(objective)
            from noise_search.families import lmo_params
            make = (lambda sh: (lambda s: LMO(**lmo_params(sh, s))))(shape)
        try:
            scale, cert = calibrate(make, eps, delta, q, T, geometry="l1")
        except Exception as exc:
            notes.append(f"{name}: calibration failed ({str(exc).splitlines()[0]})")
            continue
        if bar is not None:
            bar.update(1)
        noise = make(scale)
        params = dict(noise.params)
        value = noise.expected_abs() if objective == "abs" else noise.variance()
        candidates.append(Candidate(name, shape, float(scale), params, float(value), 1))
        results.append((value, dict(family=name, law=name, params=params, expected_abs=noise.expected_abs(),
                                    variance=noise.variance(), cert=cert, noise=noise)))
    # the Gaussian is certified under l1 too (||v||_2 <= ||v||_1, the l2 pair dominates): the yardstick
    g_value = gaussian["expected_abs"] if objective == "abs" else gaussian["variance"]
    candidates.append(Candidate("gaussian", (), gaussian["params"]["sigma"], gaussian["params"], g_value, 1))
    results.append((g_value, gaussian))
    results.sort(key=lambda r: r[0])
    candidates.sort(key=lambda c: c.ranking_objective)
    if results[0][1] is gaussian:
        notes.append("the calibrated Gaussian (certified through the l2 pair, ||v||_2 <= ||v||_1) beats "
                     "every Lipschitz noise for this target")
    return results[0][1], candidates


def _lmo_l1_shape(objective: str):
    """Minimise the scale-free l1 proxy objective(Z) * L(Z)^p over the LMO shape (p = 1 for E|Z|,
    2 for the variance).  By Jensen (E[1/u] >= 1/E[u], E[u^2] >= E[u]^2) the infimum is the Laplace
    limit (u constant); the optimiser approaches it from inside the family."""
    from scipy import optimize

    from accountant.noise import LMO
    from noise_search.families import lmo_params

    fam = FAMILIES["lmo"]
    power = 1 if objective == "abs" else 2

    def proxy(x):
        try:
            law = LMO(**lmo_params(x, 1.0))
            val = law.expected_abs() if objective == "abs" else law.variance()
            return float(val * law.log_lipschitz() ** power)
        except Exception:
            return 1e12

    res = optimize.minimize(proxy, np.array(fam.x0), method="Nelder-Mead", bounds=list(fam.bounds),
                            options={"maxfev": 60, "xatol": 1e-3, "fatol": 1e-6})
    return tuple(float(v) for v in res.x)


# --------------------------------------------------------------------------------------------------
def _npz(path) -> str:
    path = os.fspath(path)
    return path if path.endswith(".npz") else path + ".npz"


def write_result(result: SearchResult, path: str, seed: int = 0) -> None:
    """Write the certified table atomically: a temporary file in the target directory, renamed at the
    end, so an interrupted run leaves no partial table.  ``write_certified_table`` certifies again and
    refuses a table above the target."""
    from accountant.table import write_certified_table

    from accountant.output_path import atomic_write_with

    path = _npz(path)
    extra = {
        "objective": result.objective, "seed": seed, "ratio_to_gaussian": result.ratio_to_gaussian,
        "search_candidates": [c.to_json() for c in result.candidates],
        "search_notes": result.notes,
        "ranking_note": "search_candidates ranking_objective values come from the fast ranking accountant "
                        "and are not privacy certificates; certified_epsilon is the certificate",
    }

    def write(tmp):
        table = write_certified_table(tmp, result.noise, eps_target=result.eps_target, delta=result.delta,
                                      sampling_rate=result.sampling_rate, steps=result.steps,
                                      geometry=result.geometry, family=result.family, params=result.params,
                                      extra=extra, gaussian_sigma=result.gaussian_sigma,
                                      certificate=result.certificate)
        final = float(table.certified_epsilon["final"] if isinstance(table.certified_epsilon, dict)
                      else table.certified_epsilon)
        if not final <= result.eps_target:
            raise RuntimeError(f"certificate {final} exceeds the target {result.eps_target}; table not written")
    atomic_write_with(path, write)
    result.path = path
