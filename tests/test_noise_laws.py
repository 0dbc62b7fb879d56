"""Noise laws are one class per file with a registry: a law defined here, in a test file, registers,
round-trips through JSON and runs through the command line with no other file touched."""
import json
import math

import numpy as np
import pytest
from scipy import integrate, special

from accountant import laws
from accountant.__main__ import main
from accountant.certify import certify
from accountant.ledger import PrivacyLedger
from accountant.mechanism import Mechanism
from accountant.noise import Gaussian, GeneralizedGaussian, Laplace, LaplaceMixture, Noise, Tabulated


class Logistic(Noise):
    """The logistic law, density e^(-x/w) / (w (1 + e^(-x/w))^2): symmetric and log-concave."""

    family = "test_logistic"
    log_concave = True
    cli_params = {"width": "test_logistic: width w"}
    scale_param = "width"

    def __init__(self, width: float):
        self.width = float(width)       # params (the JSON round trip) default to cli_params' names

    def logpdf(self, x):
        z = -np.abs(np.asarray(x, dtype=np.float64)) / self.width
        return z - 2 * np.log1p(np.exp(z)) - math.log(self.width)

    def sf(self, x):
        return special.expit(-np.asarray(x, dtype=np.float64) / self.width)

    def isf(self, p):
        p = np.asarray(p, dtype=np.float64)
        return self.width * (np.log1p(-p) - np.log(p))

    def expected_abs(self):
        return 2 * math.log(2) * self.width

    def variance(self):
        return (math.pi * self.width) ** 2 / 3

    def log_lipschitz(self):
        return 1 / self.width

    def scaled(self, factor):
        return Logistic(self.width * factor)

    def _sample_numpy(self, n, rng):
        return rng.logistic(0.0, self.width, n)


def test_a_law_defined_elsewhere_registers_and_round_trips():
    assert laws.REGISTRY["test_logistic"] is Logistic
    law = Logistic(0.7)
    back = laws.from_json(json.loads(json.dumps(laws.to_json(law))))
    assert isinstance(back, Logistic) and back.params == law.params
    assert laws.from_name("test_logistic", width=0.7).params == law.params
    # the default Fisher information (numerical) against the closed form 1 / (3 w^2)
    assert law.fisher_information() == pytest.approx(1 / (3 * 0.7 ** 2), rel=1e-5)
    # and the certificate: a ledger holding it survives its JSON round trip
    ledger = PrivacyLedger(1e-6)
    ledger.record(Mechanism(law, 1.0, "scalar", 0.01, 1), 10)
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again.epsilon() == ledger.epsilon()


def test_a_law_defined_elsewhere_runs_through_the_command_line(capsys):
    argv = ["epsilon", "--noise", "test_logistic", "--width", "2", "--sampling-rate", "0.01", "--steps", "100",
            "--delta", "1e-6", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    direct = certify(Mechanism(Logistic(2.0), 1.0, "scalar", 0.01, 100), 1e-6).epsilon
    assert out["epsilon"] == direct and out["mechanism"]["noise"] == "test_logistic"
    assert main(["epsilon", "--noise", "test_logistic", "--sampling-rate", "0.01", "--delta", "1e-6"]) == 2
    assert "needs --width" in capsys.readouterr().err
    assert main(["epsilon", "--noise", "gaussian", "--sigma", "1", "--width", "2", "--delta", "1e-6"]) == 2
    assert "--width does not apply to --noise gaussian" in capsys.readouterr().err
    assert main(["calibrate", "--noise", "test_logistic", "--eps", "1", "--delta", "1e-6",
                 "--sampling-rate", "0.01", "--steps", "10", "--json"]) == 0
    width = json.loads(capsys.readouterr().out)["scale"]
    assert certify(Mechanism(Logistic(width), 1.0, "scalar", 0.01, 10), 1e-6).epsilon <= 1


def test_builtin_laws_round_trip_and_keep_their_fisher_information():
    table = Tabulated.quantised(np.array([-2.0, -1.0, 0.0, 1.0, 2.0]), np.array([0.1, 0.4, 0.4, 0.1]), 0.0, 0.0)
    for law in (Gaussian(1.5), Laplace(0.5), GeneralizedGaussian(1.2, 1.5),
                LaplaceMixture([0.25, 0.75], [1.0, 2.0]), table):
        back = laws.from_json(json.loads(json.dumps(laws.to_json(law))))
        assert type(back) is type(law) and laws.to_json(back) == laws.to_json(law)
    assert Gaussian(2.0).fisher_information() == 0.25
    assert Laplace(0.5).fisher_information() == 4.0
    assert table.fisher_information() == math.inf
    g = GeneralizedGaussian(1.2, 1.5)     # closed form against the numerical default of the base class
    assert g.fisher_information() == pytest.approx(Noise.fisher_information(g), rel=1e-4)
    # a second class may not take a registered name
    with pytest.raises(ValueError, match="already registered"):
        type("Impostor", (Noise,), {"family": "gaussian"})


def test_compiled_log_density_matches_the_law():
    x = np.linspace(-5, 5, 101)
    for law in (Gaussian(1.3), Laplace(0.8), GeneralizedGaussian(1.1, 1.7)):
        f, args = law.compiled_logpdf()
        diff = f(x, *args) - law.logpdf(x)
        np.testing.assert_allclose(diff, diff[0], atol=1e-12)      # equal up to the normalising constant
    assert Logistic(1.0).compiled_logpdf() is None
    assert integrate.quad(lambda v: float(Logistic(1.0).pdf(v)), -50, 50)[0] == pytest.approx(1, abs=1e-9)
