"""Certificates at the edges: large epsilons, tiny and huge noise, and the memory budget.

Every number is checked against a truth computed here independently of the accountant: the
analytic Gaussian mechanism (Balle & Wang 2018, Thm. 8) in float64 with log-CDFs, the Laplace
hockey-stick at q 1, T 1 in closed form, dp-accounting's own Gaussian PLD, or an event bound
(delta(eps) >= P(E) - e^eps Q(E) for any event E).
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy import special

from accountant import routes
from accountant.__main__ import main
from accountant.certify import (Accuracy, MemoryBudgetExceeded, calibrate, certify, delta_for_epsilon,
                                gaussian_epsilon)
from accountant.mechanism import Mechanism
from accountant.noise import Gaussian, Laplace, Tabulated
from accountant.table import tabulate


def analytic_gaussian_delta(mu: float, eps: float) -> float:
    """Balle & Wang 2018, Thm. 8, in log space: Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)."""
    return math.exp(special.log_ndtr(mu / 2 - eps / mu)) - math.exp(eps + special.log_ndtr(-mu / 2 - eps / mu))


def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    lo, hi = 0.0, mu * mu / 2 + 10 * mu + 10
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if analytic_gaussian_delta(mu, mid) > delta else (lo, mid)
    return hi


def laplace_epsilon_q1(shift_over_b: float, delta: float) -> float:
    """Laplace at q 1, T 1: delta(eps) = 1 - exp(-(s/b - eps)/2) for eps < s/b, so
    eps(delta) = s/b + 2 log(1 - delta); the pure bound is s/b."""
    return shift_over_b + 2 * math.log1p(-delta)


# ----------------------------------------------------------------------------------------------
# Large epsilons (Gaussian, q 1): dp-accounting's order check and prv-accountant's mean check
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma, delta", [(0.2, 1e-12), pytest.param(0.05, 0.1, marks=pytest.mark.slow),
                                          (0.25, 1e-12)])
def test_large_gaussian_epsilon_is_certified_at_the_analytic_value(sigma, delta):
    truth = analytic_gaussian_epsilon(1 / sigma, delta)
    cert = certify(Mechanism(Gaussian(sigma), 1.0, "scalar", 1.0, 1), delta)
    assert truth <= cert.epsilon <= truth * 1.01
    assert cert.routes["exact"]["upper"] == pytest.approx(truth, rel=1e-7)
    assert gaussian_epsilon(1 / sigma, delta) == pytest.approx(truth, rel=1e-7)


def test_tiny_gaussian_noise_under_subsampling_is_finite_and_above_dp_accounting():
    """sigma 0.01, q 0.01, T 100 (make_private(noise_multiplier=0.01)): a NaN inside the routes before.
    dp-accounting's optimistic Gaussian PLD is a lower bound on the truth."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    sigma, q, steps, delta = 0.01, 0.01, 100, 1e-5
    cert = certify(Mechanism(Gaussian(sigma), 1.0, "scalar", q, steps), delta)
    assert math.isfinite(cert.epsilon)
    optimistic = pld_lib.from_gaussian_mechanism(sigma, sampling_prob=q, pessimistic_estimate=False,
                                                 value_discretization_interval=1.0)
    truth_low = optimistic.self_compose(steps).get_epsilon_for_delta(delta)
    assert truth_low <= cert.epsilon
    # and below the closed form that ignores subsampling (mu^2 = T / sigma^2)
    assert cert.epsilon <= analytic_gaussian_epsilon(math.sqrt(steps) / sigma, delta) * (1 + 1e-9)


def test_enormous_gaussian_noise_certifies_zero():
    cert = certify(Mechanism(Gaussian(1e300), 1.0, "scalar", 0.01, 100), 1e-5)
    assert cert.epsilon == 0.0            # analytic delta(0) = 2 Phi(mu/2) - 1 ~ 4e-301 < delta
    assert delta_for_epsilon(Mechanism(Gaussian(1e300), 1.0, "scalar", 0.01, 100), 1.0) <= 1e-12


def test_laplace_huge_sensitivity_meets_the_pure_bound():
    """Laplace b 1, sensitivity 1e300, q 1, T 1: truth s/b + 2 log(1 - delta) = 1e300 = pure bound."""
    cert = certify(Mechanism(Laplace(1.0), 1e300, "scalar", 1.0, 1), 1e-5)
    assert laplace_epsilon_q1(1e300, 1e-5) <= cert.epsilon <= 1e300


def test_laplace_certificate_between_truth_and_pure_bound_at_large_epsilon():
    """Laplace b 0.02 (s/b 50), q 1, T 1: the grid routes, checked against the closed form."""
    cert = certify(Mechanism(Laplace(0.02), 1.0, "scalar", 1.0, 1), 1e-5)
    assert laplace_epsilon_q1(50.0, 1e-5) <= cert.epsilon <= 50.0 * (1 + 1e-9)


@pytest.mark.slow
def test_calibrate_laplace_to_a_huge_target():
    """calibrate --noise laplace --eps 1e6 --delta 1e-5, q 1, T 1: a traceback before."""
    scale, cert = calibrate(Laplace, 1e6, 1e-5, 1.0, 1)
    assert laplace_epsilon_q1(1 / scale, 1e-5) <= cert.epsilon <= 1e6
    assert scale <= 2e-6                   # not absurdly over-noised (the truth needs b ~ 1e-6)


# ----------------------------------------------------------------------------------------------
# Memory budget
# ----------------------------------------------------------------------------------------------
def steep_tail_table() -> Tabulated:
    """12 bins of 0.25, tail mass 5e-8, tail rate 5.95e5 (issue 19, section 3)."""
    half = np.array([0.2, 0.12, 0.07, 0.04, 0.025, 0.015])
    mass = np.concatenate([half[::-1], half])
    mass = mass / mass.sum() * (1 - 2 * 5e-8)
    return Tabulated.quantised(np.linspace(-1.5, 1.5, 13), mass, 5e-8, 5.95e5)


def test_steep_tail_table_is_certified_above_an_event_bound():
    """At sensitivity 1 the loss reaches 5.95e5: an internal error before.  Event E = (1.51, 2.5]:
    P_s(E) is the table's mass on (0.51, 1.5], P(E) <= tail_mass e^(-rate 0.01), so
    eps >= log(P_s(E) - delta) - log P(E) > 5900."""
    tab = steep_tail_table()
    delta = 1e-5
    p_shifted = float(tab.interval_mass(0.51, 1.5))
    log_p = math.log(tab.tail_mass) - tab.tail_rate * 0.01
    bound = math.log(p_shifted - delta) - log_p
    assert bound > 5900
    cert = certify(Mechanism(tab, 1.0, "scalar", 1.0, 1), delta, Accuracy(memory_budget=2 ** 30))
    assert cert.epsilon >= bound


def test_steep_tail_table_at_huge_sensitivity_is_inf_without_allocating():
    """Sensitivity 1e5: killed at 22 GB before; the loss reaches 6e10, beyond any grid: inf."""
    code = textwrap.dedent("""
        import resource, sys
        sys.path.insert(0, ".")
        from tests.test_accountant_budget import steep_tail_table
        from accountant.certify import certify
        from accountant.mechanism import Mechanism
        cert = certify(Mechanism(steep_tail_table(), 1e5, "scalar", 1.0, 1), 1e-5)
        print(cert.epsilon, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    epsilon, peak_kb = out.stdout.split()
    assert float(epsilon) == math.inf
    assert int(peak_kb) < 2 * 2 ** 20                     # below 2 GB


def test_budget_too_small_is_refused_before_allocating():
    """A table (no closed form) whose privacy loss spans about 75 cannot fit a budget of 20 grid
    points even at the coarsest step: refused with one error naming the option."""
    tab = tabulate(Gaussian(0.2), bins=200)
    mech = Mechanism(tab, 1.0, "scalar", 1.0, 1)
    with pytest.raises(MemoryBudgetExceeded, match="--memory-budget"):
        certify(mech, 1e-5, Accuracy(memory_budget=20 * routes.PLD_BYTES_PER_POINT))


def test_coarsened_grid_is_still_an_upper_bound():
    """A budget that forces a coarser PLD step than the accuracy model wants: still above the truth."""
    sigma, delta = 0.8, 1e-6
    truth = analytic_gaussian_epsilon(1 / sigma, delta)
    groups = [(Mechanism(Gaussian(sigma), 1.0, "scalar", 1.0, 1), 1)]
    from accountant.mechanism import step_pair
    pairs = [(step_pair(m), c) for m, c in groups]
    small = 2000 * routes.PLD_BYTES_PER_POINT
    result = routes.pld_route(pairs, delta, 1e-4, memory_budget=small, coarsen=True)
    assert result.step > 1e-4
    assert truth <= result.upper <= truth + 10 * result.step
    with pytest.raises(routes.GridBudgetExceeded):
        routes.pld_route(pairs, delta, 1e-4, memory_budget=small)


def test_cli_large_epsilon_and_budget_option(capsys):
    assert main(["epsilon", "--noise", "gaussian", "--sigma", "0.2", "--sampling-rate", "1", "--steps", "1",
                 "--delta", "1e-12"]) == 0
    assert "certified epsilon" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["epsilon", "--noise", "gaussian", "--sigma", "0.2", "--sampling-rate", "1", "--steps", "1",
              "--delta", "1e-12", "--memory-budget", "0"])
    assert stop.value.code == 2
    assert "must be positive" in capsys.readouterr().err
