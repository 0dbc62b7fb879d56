"""Accountant speed and accuracy, measured side by side in one run (the machine is shared).

    python benchmarks/accountant_bench.py

1. Gaussian sigma 1, q 0.01, T 10000, delta 1e-5: our PLD route and full two-route certificate vs
   dp-accounting's built-in Gaussian PLD and prv-accountant's built-in subsampled Gaussian. The
   reference value is dp-accounting at a 10x finer grid. Target: our PLD route no slower than the
   built-in PLD at equal accuracy (abs error <= 1e-4).
2. Laplace scale mixture 0.5 Lap(0.5) + 0.5 Lap(1.5), q 0.01, T 1000, delta 1e-10: full certificate
   (both routes). Target: <= 2 s.
"""
import time
import warnings

warnings.simplefilter("ignore")

from dp_accounting.pld import privacy_loss_distribution as dp_pld  # noqa: E402
from prv_accountant import PRVAccountant  # noqa: E402
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism  # noqa: E402

from accountant.certify import certify, pld_epsilon  # noqa: E402
from accountant.mechanism import Mechanism  # noqa: E402
from accountant.noise import Gaussian, LaplaceMixture  # noqa: E402


def timed(fn, repeats=3):
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return value, best


def main():
    q, T, delta = 0.01, 10_000, 1e-5
    mech = Mechanism(Gaussian(1.0), sampling_rate=q, steps=T)
    reference = dp_pld.from_gaussian_mechanism(1.0, sampling_prob=q, value_discretization_interval=1e-5) \
        .self_compose(T).get_epsilon_for_delta(delta)
    rows = []
    value, secs = timed(lambda: dp_pld.from_gaussian_mechanism(
        1.0, sampling_prob=q, value_discretization_interval=1e-4).self_compose(T).get_epsilon_for_delta(delta))
    rows.append(("dp-accounting built-in PLD (step 1e-4)", value, secs))
    builtin_secs = secs

    def prv_builtin():
        acc = PRVAccountant(PoissonSubsampledGaussianMechanism(q, 1.0), eps_error=1e-2, delta_error=delta * 1e-3,
                            max_self_compositions=T)
        return acc.compute_epsilon(delta, T)[2]
    value, secs = timed(prv_builtin, 1)
    rows.append(("prv-accountant built-in (eps_error 1e-2, upper)", value, secs))
    value, secs = timed(lambda: pld_epsilon(mech, delta))
    rows.append(("ours: PLD route (exact tails + connect-dots)", value, secs))
    ours_secs = secs
    cert, secs = timed(lambda: certify(mech, delta), 1)
    rows.append(("ours: full certificate (PLD + PRV, max upper)", cert.epsilon, secs))
    print(f"Gaussian sigma 1, q {q}, T {T}, delta {delta:g}; reference (dp-accounting, step 1e-5): {reference:.6f}")
    print(f"  {'method':52s} {'epsilon':>10s} {'abs err':>9s} {'seconds':>8s}")
    for name, value, secs in rows:
        print(f"  {name:52s} {value:10.6f} {abs(value - reference):9.2e} {secs:8.2f}")
    print(f"  ratio ours PLD route / built-in PLD time: {ours_secs / builtin_secs:.2f} (target <= 1.0)")

    mix = Mechanism(LaplaceMixture([0.5, 0.5], [0.5, 1.5]), sampling_rate=0.01, steps=1000)
    cert, secs = timed(lambda: certify(mix, 1e-10), 2)
    print("Laplace scale mixture 0.5 Lap(0.5) + 0.5 Lap(1.5), q 0.01, T 1000, delta 1e-10")
    for name, r in cert.routes.items():
        print(f"  {name:5s} epsilon in [{r['lower']:.6f}, {r['upper']:.6f}]")
    print(f"  certificate {cert.epsilon:.6f} in {secs:.2f} s (target <= 2 s)")


if __name__ == "__main__":
    main()
