"""Tables (format v1), sampling exactness, ledger, and the CLI's handling of user mistakes."""
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from accountant.certify import certify
from accountant.ledger import PrivacyLedger
from accountant.mechanism import Mechanism
from accountant.noise import LMO, Gaussian, Laplace, LaplaceMixture, Tabulated
from accountant.randomness import make_rng
from accountant.table import TableError, load_table, save_table, write_certified_table


def laplace_table(scale=2.0, reach=30.0, bins=3000):
    lap = Laplace(scale)
    edges = np.linspace(-reach, reach, bins + 1)
    return Tabulated.quantised(edges, lap.interval_mass(edges[:-1], edges[1:]), lap.sf(reach), 1 / scale)


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tables") / "lap.npz"
    write_certified_table(path, laplace_table(), eps_target=2.0, delta=1e-6, sampling_rate=0.05, steps=50,
                          geometry="scalar", family="laplace-table", params={"scale": 2.0}, gaussian_sigma=1.0)
    return path


def test_round_trip_and_certificate_recomputes(table_path):
    table = load_table(table_path)
    assert table.metadata["format_version"] == 1 and table.metadata["law"] == "tabulated"
    again = certify(table.mechanism(steps=table.steps), table.delta).epsilon
    assert again == pytest.approx(table.certified_epsilon, rel=1e-9)
    assert again <= table.metadata["eps_target"]


def test_tampering_is_detected(table_path, tmp_path):
    with np.load(table_path, allow_pickle=False) as data:
        contents = {k: data[k] for k in data.files}
    contents["mass"] = contents["mass"].copy()
    contents["mass"][10], contents["mass"][11] = contents["mass"][11], contents["mass"][10]
    bad = tmp_path / "tampered.npz"
    np.savez(bad, **contents)
    with pytest.raises(TableError, match="checksum"):
        load_table(bad)
    meta = json.loads(str(contents["metadata"]))
    meta["certified_epsilon"]["final"] = 0.01
    contents["mass"] = np.load(table_path)["mass"]
    contents["metadata"] = np.array(json.dumps(meta))
    np.savez(bad, **contents)
    with pytest.raises(TableError, match="checksum"):
        load_table(bad)


def test_malformed_and_pickled_files_are_refused(tmp_path):
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, edges=np.array([object()], dtype=object))
    with pytest.raises(TableError):
        load_table(pickled)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(TableError, match="not a readable"):
        load_table(garbage)
    with pytest.raises(TableError, match="no table file"):
        load_table(tmp_path / "missing.npz")


def test_certificate_above_target_is_never_written(tmp_path):
    out = tmp_path / "never.npz"
    with pytest.raises(TableError, match="exceeds"):
        write_certified_table(out, Laplace(0.5), eps_target=0.1, delta=1e-6, sampling_rate=1.0, steps=1,
                              geometry="scalar", gaussian_sigma=1.0)
    assert not out.exists() and not list(tmp_path.glob(".partial-*"))


def test_table_sampler_is_exact_for_the_table():
    tab = laplace_table()
    z = tab.sample(1_000_000, make_rng(4))
    assert z.dtype == np.float64
    assert stats.kstest(z[:200_000], tab.cdf).pvalue > 1e-3
    for level in (1e-2, 1e-3, 1e-4):           # tail frequencies beyond quantiles of the table
        x = float(-np.log(2 * level) * 2.0)
        expected = 2 * float(tab.sf(x))
        count = np.sum(np.abs(z) > x)
        assert abs(count - expected * len(z)) < 5 * np.sqrt(expected * len(z)) + 2
    secure = tab.sample(200_000, make_rng(secure=True))
    assert stats.kstest(secure, tab.cdf).pvalue > 1e-3
    assert np.array_equal(tab.sample(5, make_rng(9)), tab.sample(5, make_rng(9)))


def test_lattice_is_required_for_sampling():
    edges = np.array([-1.0, -1 / 3, 1 / 3, 1.0])   # exactly symmetric (np.linspace is not)
    tab = Tabulated(edges, [0.3, 0.4, 0.3], 0.0, 0.0)
    with pytest.raises(ValueError, match="lattice"):
        tab.sample(3, make_rng(0))


def test_gaussian_law_table_samples_the_gaussian(tmp_path):
    path = tmp_path / "g.npz"
    save_table(path, Gaussian(3.0), {"family": "gaussian", "params": {}, "eps_target": 1.0, "delta": 1e-5,
                                     "sampling_rate": 0.01, "steps": 10, "geometry": "l2",
                                     "certified_epsilon": {"final": 0.5}, "gaussian_sigma": 3.0,
                                     "gaussian_expected_abs": 2.4})
    table = load_table(path)
    assert isinstance(table.noise, Gaussian) and table.noise.sigma == 3.0
    z = table.sample(200_000, make_rng(1))
    assert np.std(z) == pytest.approx(3.0, rel=0.01)


def test_ledger_composes_heterogeneous_steps_and_stops_before_budget():
    a = Mechanism(Gaussian(2.0), sampling_rate=0.02)
    b = Mechanism(Gaussian(3.0), sampling_rate=0.05)
    ledger = PrivacyLedger(1e-6, epsilon_budget=1.0)
    ledger.record(a, 40)
    ledger.record(b, 20)
    assert ledger.epsilon() == pytest.approx(certify([a.with_steps(40), b.with_steps(20)], 1e-6).epsilon)
    remaining = ledger.steps_remaining(b)
    assert ledger.epsilon_after(remaining, b) <= 1.0 < ledger.epsilon_after(remaining + 1, b)
    assert ledger.can_take(remaining, b) and not ledger.can_take(remaining + 1, b)
    ledger.record(b, 1)
    assert ledger.steps_remaining(b) == remaining - 1
    clone = PrivacyLedger.from_json(ledger.to_json())
    assert clone.epsilon() == pytest.approx(ledger.epsilon()) and clone.steps == 61


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "accountant", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [
    ["epsilon", "--noise", "laplace", "--scale", "1", "--delta", "0"],
    ["epsilon", "--noise", "laplace", "--scale", "1", "--delta", "1.5"],
    ["epsilon", "--noise", "laplace", "--scale", "1", "--delta", "1e-5", "--sampling-rate", "1.2"],
    ["epsilon", "--noise", "laplace", "--scale", "1", "--delta", "1e-5", "--steps", "0"],
    ["epsilon", "--noise", "laplace", "--scale", "1", "--delta", "1e-5", "--geometry", "l3"],
    ["epsilon", "--noise", "table", "--table", "does-not-exist.npz", "--delta", "1e-5"],
    ["epsilon", "--noise", "gaussian", "--delta", "1e-5"],
    ["epsilon", "--noise", "laplace", "--scale", "1", "--delta", "1e-5", "--geometry", "l2"],
    ["calibrate", "--noise", "gaussian", "--eps", "-1", "--delta", "1e-5"],
    ["calibrate", "--noise", "laplace", "--eps", "1e-9", "--delta", "1e-10"],
])
def test_cli_user_mistakes_give_one_line_and_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")


def test_cli_epsilon_json_and_table_defaults(table_path, tmp_path):
    result = run_cli("epsilon", "--noise", "laplace", "--scale", "1", "--sampling-rate", "0.01",
                     "--steps", "1000", "--delta", "1e-5", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert abs(out["routes"]["pld"] - 1.12377) < 2e-4 and out["epsilon"] >= out["routes"]["pld"]
    result = run_cli("epsilon", "--noise", "table", "--table", str(table_path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["epsilon"] == pytest.approx(load_table(table_path).certified_epsilon)
    params = tmp_path / "lmo.json"
    params.write_text(json.dumps({"a1": 0.5, "a3": 0.3, "a4": 0.2, "G_k": 2.5, "G_theta": 1.0,
                                  "E_lambda": 2.0, "U_a": 0.1, "U_b": 1.0}))
    rate = json.loads(run_cli("epsilon", "--noise", "lmo", "--params", str(params), "--sampling-rate", "0.01",
                              "--steps", "100", "--delta", "1e-6", "--json").stdout)["epsilon"]
    scale = json.loads(run_cli("epsilon", "--noise", "lmo", "--params", str(params), "--exp-lambda-as-scale",
                               "--sampling-rate", "0.01", "--steps", "100", "--delta", "1e-6", "--json").stdout)["epsilon"]
    assert scale > rate       # the published sampler's reading adds less noise


@pytest.mark.parametrize("noise", [Gaussian(2.0), Laplace(1.5), LMO(0.5, 0.3, 0.2, 2.5, 1.0, 2.0, 0.1, 1.0),
                                   LaplaceMixture([0.5, 0.5], [0.5, 1.5])])
def test_secure_sampling_draws_the_certified_law(noise):
    z = noise.sample(100_000, make_rng(secure=True))
    assert stats.kstest(z, noise.cdf).pvalue > 1e-4
    wrong = noise.scaled(1.05).sample(100_000, make_rng(secure=True))   # the test can fail
    assert stats.kstest(wrong, noise.cdf).pvalue < 1e-4
