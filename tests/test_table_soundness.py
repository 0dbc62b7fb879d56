"""Tables cannot under-report (issue 9, items 1-3) and output paths are checked before work.

* Item 1: hand-made tables (combs, alternating bins, one-sided tails, bumps, tilted edges, a tail
  above the last bin) that are not exactly symmetric unimodal are refused with a one-line reason;
  the tables the loader accepts are certified at or above an exact hockey-stick computation over a
  fine grid of shifts in [-C, C] (docs/privacy.md, "Tables").
* Item 2: ``calibrate --sensitivity C --out`` writes the law in units of C, and its stored
  certificate is the re-certification of that law.
* Item 3: a table whose metadata claims less than its law costs (valid checksum recomputed: sha256
  is not a signature) is reported, exit code 3.
* Output paths and Ctrl-C (issue 10 item 7).
"""
import hashlib
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from accountant import __main__ as accountant_cli
from accountant.certify import certify
from accountant.mechanism import Mechanism
from accountant.noise import Gaussian, Laplace, NoiseParameterError, Tabulated
from accountant.table import TableError, load_table, verify_claim, write_certified_table

SEARCH_MODULE = importlib.import_module("noise_search.search")   # the package re-exports search()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATTICE = 2 ** 53


@pytest.fixture(autouse=True)
def _keep_sigterm_handler():
    """The CLIs' main() installs a SIGTERM handler; keep the test process's own."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def run_module(*args, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------------
# Hand-made tables on the 2^-53 lattice, written with a valid checksum
# ------------------------------------------------------------------------------------------------
def lattice_arrays(right, n, left=None, tail_units=0, tail_rate=0.0):
    """Arrays of a table with bin width 1/n and edges k/n (exactly symmetric), from relative
    densities of the bins right of 0 (``left``: of the bins left of 0, outward; default mirror).
    Masses are rounded down onto the lattice; the remainder goes to the two central bins."""
    right = np.asarray(right, dtype=np.float64)
    left = right if left is None else np.asarray(left, dtype=np.float64)
    k = len(right)
    edges = np.arange(-k, k + 1, dtype=np.float64) / n
    weights = np.concatenate([left[::-1], right])
    ints = np.floor(weights / weights.sum() * (LATTICE - 2 * tail_units)).astype(np.int64)
    rest = LATTICE - int(ints.sum()) - 2 * tail_units
    ints[k - 1] += rest // 2
    ints[k] += rest - rest // 2
    return edges, ints / LATTICE, tail_units / LATTICE, tail_rate


def laplace_core(n, reach):
    x = (np.arange(reach * n) + 0.5) / n
    return np.exp(-x)


def sha256_of(arrays, meta):
    """The documented checksum (docs/table-format.md), computed independently of the library."""
    h = hashlib.sha256()
    for key in ("edges", "mass", "tail_mass", "tail_rate"):
        h.update(np.ascontiguousarray(arrays[key], dtype="<f8").tobytes())
    body = {k: v for k, v in meta.items() if k != "sha256"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def forge(path, arrays, meta):
    """Write arrays and metadata with a valid checksum, as anyone can."""
    arrays = {"edges": np.asarray(arrays[0], np.float64), "mass": np.asarray(arrays[1], np.float64),
              "tail_mass": np.float64(arrays[2]), "tail_rate": np.float64(arrays[3])}
    meta = dict(meta)
    meta["sha256"] = sha256_of(arrays, meta)
    np.savez(path, metadata=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    return path


def table_meta(**over):
    meta = {"format_version": 1, "law": "tabulated", "family": "hand-made", "params": {}, "eps_target": 1.0,
            "delta": 1e-10, "sampling_rate": 1.0, "steps": 1, "geometry": "scalar",
            "certified_epsilon": {"final": 1.0}, "expected_abs": 1.0, "gaussian_sigma": 1.0,
            "gaussian_expected_abs": 0.8, "library_versions": {}, "created": "2026-01-01T00:00:00+00:00"}
    meta.update(over)
    return meta


N = 4            # bins per unit of sensitivity
CORE = 30        # Laplace(1) core out to 30: its density there is e^-30 ~ 1e-13 of the peak


def comb(rho=2e-13, units=4000):
    """Tail bins of density rho (relative to the peak) alternating with empty bins: a shift of one
    bin moves every tail bin onto an empty one (infinite loss) while the shift C = N bins does not."""
    teeth = np.zeros(units * N)
    teeth[::2] = rho
    return laplace_core(N, CORE), teeth


def adversarial_tables():
    """(name, arrays): each violates exact symmetric unimodality in a way the former tolerances
    (1e-12 of the peak for monotonicity, 1e-9 for symmetry, 1e-12 for the edges) let pass."""
    core = laplace_core(N, CORE)
    cases = []
    for rho, units in ((2e-13, 400), (5e-14, 2000)):
        cases.append((f"comb rho {rho:g}, {units} units", lattice_arrays(np.concatenate(comb(rho, units)), N)))
    alt = np.tile([4e-13, 2e-13], 200 * N)
    cases.append(("alternating bins", lattice_arrays(np.concatenate([core, alt]), N)))
    short = laplace_core(N, 15)
    shelf = np.full(10 * N, 1e-10)                 # right side only, within the former 1e-9 symmetry slack
    cases.append(("one-sided tail", lattice_arrays(np.concatenate([short, shelf]), N,
                                                   left=np.concatenate([short, np.zeros_like(shelf)]))))
    for rho in (5e-13, 1e-15):
        for width in (1, 5, 2 * N):
            bump = np.concatenate([np.zeros(3 * N), np.full(width, rho), np.zeros(3 * N)])
            cases.append((f"bump rho {rho:g}, {width} bins", lattice_arrays(np.concatenate([core, bump]), N)))
    edges, mass, tail_mass, tail_rate = lattice_arrays(laplace_core(N, 12), N)
    tilted = edges.copy()
    tilted[-3] += 1e-14                            # within the former 1e-12 edge tolerance
    cases.append(("edges off symmetry by 1e-14", (tilted, mass, tail_mass, tail_rate)))
    right = laplace_core(N, 12)
    edges, mass, _, _ = lattice_arrays(right, N, tail_units=2 ** 20)
    last = mass[-1] / (1 / N)
    rate = last * (1 + 1e-13) / (2 ** 20 / LATTICE)   # the tail starts 1e-13 above the last bin
    cases.append(("tail above the last bin", (edges, mass, 2 ** 20 / LATTICE, rate)))
    return cases


ADVERSARIAL = adversarial_tables()


@pytest.mark.parametrize("name,arrays", ADVERSARIAL, ids=[c[0] for c in ADVERSARIAL])
def test_not_exactly_symmetric_unimodal_tables_are_refused(name, arrays, tmp_path):
    with pytest.raises(NoiseParameterError) as info:
        Tabulated(*arrays, check_lattice=True)
    assert "\n" not in str(info.value)
    path = forge(tmp_path / "t.npz", arrays, table_meta())
    with pytest.raises(TableError) as info:
        load_table(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "symmetric" in message


def test_comb_table_is_refused_by_the_cli(tmp_path):
    """Before: ``epsilon --noise table`` printed 1.00 for this table (q 1, T 1, delta 1e-10) and 1.81
    at q 0.01, T 1000, while its true epsilon is infinite (one-bin shift: 4e-10 of mass at +inf)."""
    path = forge(tmp_path / "comb.npz", lattice_arrays(np.concatenate(comb()), N), table_meta())
    proc = run_module("accountant", "epsilon", "--noise", "table", "--table", str(path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "unimodal" in lines[0]


def test_comb_table_has_infinite_epsilon_by_exact_computation():
    """The refused comb really is unbounded: the exact hockey-stick over shifts finds delta > 1e-10
    at every epsilon (so no finite certificate was ever correct)."""
    edges, mass, _, _ = lattice_arrays(np.concatenate(comb()), N)
    worst = max(exact_epsilon(edges, mass, s, 1.0, rel, 1e-10) for s in (0.25, 0.5, 1.0) for rel in ("remove", "add"))
    assert worst == math.inf


# ------------------------------------------------------------------------------------------------
# Exact hockey-stick divergence of a piecewise-constant table without tails, any shift
# ------------------------------------------------------------------------------------------------
def _densities_on_cells(edges, mass, s):
    cuts = np.unique(np.concatenate([edges, edges + s]))
    lo, hi = cuts[:-1], cuts[1:]
    mid = 0.5 * (lo + hi)
    dens = mass / np.diff(edges)

    def density(x):
        j = np.searchsorted(edges, x, side="right") - 1
        inside = (j >= 0) & (j < len(mass))
        return np.where(inside, dens[np.clip(j, 0, len(mass) - 1)], 0.0)

    return hi - lo, density(mid), density(mid - s)


def exact_epsilon(edges, mass, s, q, relation, delta):
    """Exact epsilon at ``delta`` of one Poisson-subsampled release with the difference ``s``:
    remove: ((1-q) P + q P_s, P); add: (P, (1-q) P + q P_s).  Bisection on the exact hockey stick."""
    width, p, p_s = _densities_on_cells(edges, mass, s)
    mix = (1 - q) * p + q * p_s
    upper, lower = (mix, p) if relation == "remove" else (p, mix)

    def hockey(eps):
        return float(np.sum(width * np.maximum(upper - math.exp(eps) * lower, 0.0)))

    if float(np.sum(width * np.where(lower == 0, upper, 0.0))) > delta:
        return math.inf
    lo, hi = 0.0, 60.0
    if hockey(0.0) <= delta:
        return 0.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if hockey(mid) > delta else (lo, mid)
    return hi


def accepted_tables():
    """Exactly symmetric unimodal tables with awkward features the loader must accept."""
    n = 8                                  # a power of two: every width 1/8 is exact
    far = np.full(2 * n, 1e-9)             # bounded support: the mass moved off it stays below delta
    plateau = np.concatenate([np.repeat([1.0, 0.5, 0.5, 0.25], n), np.zeros(n // 2) + 1e-9, far])
    staircase = np.concatenate([np.repeat(np.exp(-np.arange(6)), n // 2), far])   # a step every half unit
    cliff = np.concatenate([np.ones(n // 2), np.full(3 * n, 1e-8)])   # a drop of 1e8, then a long shelf
    return [("plateaus and empty outer bins", plateau, n), ("staircase", staircase, n), ("cliff and shelf", cliff, n)]


ACCEPTED = accepted_tables()


@pytest.mark.parametrize("name,right,n", ACCEPTED, ids=[c[0] for c in ACCEPTED])
@pytest.mark.parametrize("q", [1.0, 0.3])
def test_accepted_tables_are_certified_above_every_shift(name, right, n, q):
    """Lemma 1 in action: the certificate (shift C = 1) dominates the exact epsilon of every shift
    in a grid over [-C, C], in both relations."""
    edges, mass, tail_mass, tail_rate = lattice_arrays(right, n)
    tab = Tabulated(edges, mass, tail_mass, tail_rate, check_lattice=True)
    delta = 1e-6
    cert = certify(Mechanism(tab, 1.0, "scalar", q, 1), delta).epsilon
    shifts = [s for s in np.linspace(-1, 1, 81) if s != 0]
    exact = max(exact_epsilon(edges, mass, s, q, rel, delta) for s in shifts for rel in ("remove", "add"))
    assert exact <= cert + 1e-9, (exact, cert)
    assert exact > 0.9 * cert or exact == math.inf or cert == math.inf   # the comparison is not vacuous


def test_quantised_tables_from_every_writer_load(tmp_path):
    """The shapes the writers produce are exactly symmetric unimodal after quantisation:
    ``tabulate`` (np.linspace edges, not exactly symmetric), noise_search's binned families, and a
    stretched table (``scaled``)."""
    from accountant.table import tabulate
    from noise_search.families import FAMILIES
    from noise_search.search import _quantised

    for law in (Gaussian(6.05), Laplace(2.0)):
        tab = tabulate(law)
        assert np.array_equal(tab.edges, -tab.edges[::-1])
        Tabulated(tab.edges, tab.mass, tab.tail_mass, tab.tail_rate, check_lattice=True)
        tab.scaled(1.37)
    for name, fam in FAMILIES.items():
        tab = _quantised(fam.binned(tuple(fam.x0), 3.0, 40, 1e-16))
        Tabulated(tab.edges, tab.mass, tab.tail_mass, tab.tail_rate, check_lattice=True)


# ------------------------------------------------------------------------------------------------
# Item 2: calibrate --sensitivity C --out
# ------------------------------------------------------------------------------------------------
def _calibrate_to_table(tmp_path, capsys, sensitivity):
    out = tmp_path / f"c{sensitivity}.npz"
    argv = ["calibrate", "--noise", "laplace", "--eps", "1", "--delta", "1e-5", "--sampling-rate", "1",
            "--steps", "1", "--sensitivity", str(sensitivity), "--out", str(out), "--json"]
    assert accountant_cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    table = load_table(out)
    check = verify_claim(table)
    assert check.certified <= 1.0
    assert table.certified_epsilon == pytest.approx(check.certified, rel=1e-12)
    assert check.matches
    # the law is in units of C: the printed scale divided by C, and its exact epsilon (Laplace, one
    # release: s / b) meets the target; before the fix the table held the scale for C, not 1
    assert table.noise.scale == pytest.approx(printed["scale"] / sensitivity, rel=1e-12)
    assert 1.0 / table.noise.scale <= 1.0 + 1e-12


def test_calibrated_table_is_in_units_of_the_sensitivity(tmp_path, capsys):
    _calibrate_to_table(tmp_path, capsys, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("sensitivity", [0.25, 2, 10])
def test_calibrated_table_is_in_units_of_the_sensitivity_for_every_c(tmp_path, capsys, sensitivity):
    _calibrate_to_table(tmp_path, capsys, sensitivity)


@pytest.mark.slow
def test_gaussian_table_for_c_half_matches_dp_accounting(tmp_path, capsys):
    """The issue's case with an independent accountant: the written sigma (units of C) meets the
    target by dp-accounting's built-in Gaussian PLD (before: 4.46 instead of <= 1)."""
    out = tmp_path / "g.npz"
    argv = ["calibrate", "--noise", "gaussian", "--eps", "1", "--delta", "1e-5", "--sampling-rate", "0.2",
            "--steps", "5", "--sensitivity", "0.5", "--out", str(out), "--json"]
    assert accountant_cli.main(argv) == 0
    capsys.readouterr()
    table = load_table(out)
    sigma = table.metadata["params"]["sigma"]
    pld = pld_lib.from_gaussian_mechanism(sigma, sensitivity=1.0, value_discretization_interval=1e-4,
                                          sampling_prob=0.2).self_compose(5)
    assert pld.get_epsilon_for_delta(1e-5) <= 1.0 + 1e-3
    assert table.certified_epsilon <= 1.0


def test_writer_refuses_a_certificate_of_another_mechanism(tmp_path):
    cert = certify(Mechanism(Laplace(0.5), 0.5, "scalar", 1.0, 1), 1e-5)     # the law for C = 0.5
    with pytest.raises(TableError, match="another mechanism"):
        write_certified_table(tmp_path / "t.npz", Laplace(0.5), eps_target=1.0, delta=1e-5, sampling_rate=1.0,
                              steps=1, geometry="scalar", certificate=cert, gaussian_sigma=1.0)
    assert not (tmp_path / "t.npz").exists()


# ------------------------------------------------------------------------------------------------
# Item 3: the claim is compared
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def honest_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("claim") / "lap.npz"
    write_certified_table(path, Laplace(2.0), eps_target=1.0, delta=1e-6, sampling_rate=1.0, steps=1,
                          geometry="scalar", gaussian_sigma=1.0)
    return path


def _forged_copy(src, dst, **changes):
    with np.load(src, allow_pickle=False) as data:
        arrays = (data["edges"], data["mass"], data["tail_mass"], data["tail_rate"])
        meta = json.loads(str(data["metadata"]))
    meta.update(changes)
    return forge(dst, arrays, meta)


def test_honest_table_matches_its_claim(honest_table, capsys):
    assert accountant_cli.main(["epsilon", "--noise", "table", "--table", str(honest_table), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["matches_claim"] is True
    assert out["claimed"]["epsilon"] == pytest.approx(out["epsilon"], rel=1e-12)
    assert out["claimed"]["eps_target"] == 1.0
    assert accountant_cli.main(["epsilon", "--noise", "table", "--table", str(honest_table)]) == 0
    text = capsys.readouterr().out
    assert "table claims" in text and "target 1" in text


def test_forged_claim_exits_3_with_one_line(honest_table, tmp_path, capsys):
    true_eps = verify_claim(load_table(honest_table)).certified            # 0.5: Laplace(2), one release
    forged = _forged_copy(honest_table, tmp_path / "forged.npz",
                          certified_epsilon={"pld": 0.1, "prv": 0.1, "final": 0.1}, eps_target=0.1)
    table = load_table(forged)                                             # the checksum is valid
    check = verify_claim(table)
    assert not check.matches and check.claimed == 0.1
    assert check.certified == pytest.approx(true_eps, rel=1e-9)
    proc = run_module("accountant", "epsilon", "--noise", "table", "--table", str(forged))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"this table does not deliver its claimed epsilon: claims 0.1, certified {true_eps:.6g}"]
    assert accountant_cli.main(["epsilon", "--noise", "table", "--table", str(forged), "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["matches_claim"] is False and out["claimed"]["epsilon"] == 0.1


def test_forged_parametric_law_exits_3(honest_table, tmp_path, capsys):
    """A table whose law is far noisier in claim than in fact: law Laplace(0.1) costs epsilon 10."""
    forged = _forged_copy(honest_table, tmp_path / "law.npz", law="laplace", params={"scale": 0.1})
    assert accountant_cli.main(["epsilon", "--noise", "table", "--table", str(forged), "--json"]) == 3
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["epsilon"] == pytest.approx(10.0, rel=2e-3) and out["matches_claim"] is False
    assert captured.err.startswith("this table does not deliver its claimed epsilon: claims 0.5")


def test_claim_is_not_compared_for_another_mechanism(honest_table, tmp_path, capsys):
    forged = _forged_copy(honest_table, tmp_path / "forged.npz",
                          certified_epsilon={"final": 0.1}, eps_target=0.1)
    argv = ["epsilon", "--noise", "table", "--table", str(forged), "--sensitivity", "0.1", "--json"]
    assert accountant_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["matches_claim"] is None


@pytest.mark.parametrize("field,value", [("steps", "ten"), ("sampling_rate", 2.0), ("delta", None),
                                         ("certified_epsilon", {"pld": 0.5}), ("eps_target", "1")])
def test_malformed_metadata_names_file_and_field(honest_table, tmp_path, field, value):
    forged = _forged_copy(honest_table, tmp_path / "bad.npz", **{field: value})
    with pytest.raises(TableError) as info:
        load_table(forged)
    assert str(forged) in str(info.value) and repr(field) in str(info.value)


# ------------------------------------------------------------------------------------------------
# Output paths (both CLIs) and Ctrl-C during calibrate
# ------------------------------------------------------------------------------------------------
def _no_work(*args, **kwargs):
    raise AssertionError("work started before the output path was checked")


@pytest.mark.parametrize("kind", ["under a file", "in /proc", "existing"])
def test_bad_output_paths_fail_before_any_work(kind, tmp_path, monkeypatch, capsys):
    import noise_search.__main__ as search_cli

    blocker = tmp_path / "t.npz"
    blocker.write_text("x")
    out = {"under a file": str(blocker / "t.npz"), "in /proc": "/proc/t.npz", "existing": str(blocker)}[kind]
    monkeypatch.setattr(SEARCH_MODULE, "search", _no_work)
    monkeypatch.setattr(accountant_cli, "calibrate", _no_work)
    assert search_cli.main(["--eps", "1", "--delta", "1e-10", "--out", out, "--quiet"]) == 2
    assert accountant_cli.main(["calibrate", "--noise", "gaussian", "--eps", "1", "--delta", "1e-5",
                                "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("--out" in line for line in err), err
    assert blocker.read_text() == "x"


def test_overwrite_flag_allows_replacing(tmp_path, monkeypatch, capsys):
    import noise_search.__main__ as search_cli

    existing = tmp_path / "t.npz"
    existing.write_text("old")
    calls = []
    monkeypatch.setattr(SEARCH_MODULE, "search", lambda *a, **k: calls.append(k) or _no_work())
    with pytest.raises(AssertionError):
        search_cli.main(["--eps", "1", "--delta", "1e-10", "--out", str(existing), "--quiet", "--overwrite"])
    assert calls and calls[0]["overwrite"] is True
    def quick_calibrate(make, eps, delta, q, steps, geometry, sensitivity, accuracy=None):   # real: ~15 s
        return 2.0, certify(Mechanism(make(2.0), sensitivity, geometry, q, steps), delta)

    monkeypatch.setattr(accountant_cli, "calibrate", quick_calibrate)
    out = tmp_path / "c.npz"
    out.write_text("old")
    argv = ["calibrate", "--noise", "laplace", "--eps", "1", "--delta", "1e-5", "--out", str(out)]
    assert accountant_cli.main(argv) == 2
    assert accountant_cli.main(argv + ["--overwrite"]) == 0
    assert load_table(out).certified_epsilon <= 1.0


def test_noise_search_default_output_name_works_in_an_empty_folder(tmp_path, monkeypatch):
    import noise_search.__main__ as search_cli

    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(SEARCH_MODULE, "search", lambda *a, **k: seen.append(k["out"]) or _no_work())
    with pytest.raises(AssertionError):
        search_cli.main(["--eps", "0.3", "--delta", "1e-10", "--quiet"])
    assert seen == ["noise_eps0.3_delta1e-10_q0.01_T1000_scalar.npz"]


def _interrupt_calibrate(tmp_path, code, wait_for_ready):
    out = tmp_path / "t.npz"
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # Laplace over 1e5 steps: about 15 s on 2 idle cores (Gaussian over 1e3 steps now calibrates in
    # under 2 s, before the interrupt would arrive)
    argv = ["calibrate", "--noise", "laplace", "--eps", "0.3", "--delta", "1e-10", "--sampling-rate", "0.01",
            "--steps", "100000", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if wait_for_ready:
        assert proc.stdout.readline() == "ready\n"   # the libraries are loaded and main() starts
        time.sleep(2)                                  # well into the calibration (tens of seconds)
    else:
        time.sleep(1)                                  # typically while the libraries load
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["python -m accountant: interrupted; nothing written"]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_calibrate_is_one_line_and_exit_130(tmp_path):
    code = ("import sys, accountant.__main__ as cli; print('ready', flush=True); "
            "sys.exit(cli.main(sys.argv[1:]))")
    _interrupt_calibrate(tmp_path, code, wait_for_ready=True)


def test_ctrl_c_while_the_cli_starts_is_one_line_and_exit_130(tmp_path):
    code = "import runpy, sys; sys.argv[0] = 'accountant'; runpy.run_module('accountant', run_name='__main__')"
    _interrupt_calibrate(tmp_path, code, wait_for_ready=False)
