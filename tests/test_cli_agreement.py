"""The command lines agree (issue 11, section 3): both epsilon spellings, one default run (q, T)
printed where it is used, options that do not apply to the chosen noise refused, LMO parameter files
checked key by key, and numbers rounded for people without rounding towards the unsafe side."""
import importlib
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import accountant.__main__ as accountant_cli
import accountant.audit_cli as audit_cli
import noise_search.__main__ as search_cli
from accountant.audit import AuditResult
from accountant.certify import certify
from accountant.cli_common import (DEFAULT_SAMPLING_RATE, DEFAULT_STEPS, round_down, round_down_above,
                                   round_up)
from accountant.mechanism import Mechanism
from accountant.noise import Gaussian
from noise_search.search import SearchResult

search_module = importlib.import_module("noise_search.search")   # the package re-exports search()
REPO = Path(__file__).resolve().parents[1]
PUBLISHED = {"a1": 1, "a3": 0.5, "a4": 0.1, "G_k": 1.5, "G_theta": 0.1, "E_lambda": 0.5, "U_a": 0, "U_b": 1}
AWKWARD = 0.30000049   # printed "%.6f" it reads 0.300000, below the certificate


@pytest.fixture(autouse=True)
def _keep_signal_handlers(monkeypatch):
    """The CLIs' main() installs SIGINT/SIGTERM handlers; keep the test process's own."""
    monkeypatch.setattr(accountant_cli.signal, "signal", lambda *a: None)
    monkeypatch.setattr(search_cli.signal, "signal", lambda *a: None)


class Recorder:
    """Stands in for certify/calibrate/audit/search: records what it was asked, returns a fixed answer."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.answer(*args, **kwargs) if callable(self.answer) else self.answer


def fake_certificate(epsilon=AWKWARD, lower=0.2999995):
    routes = {"pld": {"lower": lower, "upper": epsilon}, "prv": {"lower": lower, "upper": epsilon}}
    return SimpleNamespace(epsilon=epsilon, delta=1e-10, routes=routes, checks={})


@pytest.fixture
def fake_certify(monkeypatch):
    rec = Recorder(fake_certificate())
    monkeypatch.setattr(accountant_cli, "certify", rec)
    return rec


@pytest.fixture
def lmo_file(tmp_path):
    def write(cfg, name="lmo.json"):
        path = tmp_path / name
        path.write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
        return str(path)
    return write


def run(argv, capsys):
    code = accountant_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------- spellings
SPELLINGS = [   # (argv, dest, value): each command with each spelling
    (["delta", "--noise", "laplace", "--scale", "1", "--eps", "1"], "epsilon", 1.0),
    (["delta", "--noise", "laplace", "--scale", "1", "--epsilon", "1"], "epsilon", 1.0),
    (["calibrate", "--noise", "gaussian", "--epsilon", "0.5", "--delta", "1e-5"], "eps", 0.5),
    (["calibrate", "--noise", "gaussian", "--eps", "0.5", "--delta", "1e-5"], "eps", 0.5),
    (["audit", "--noise", "laplace", "--scale", "1", "--dimension", "4", "--claimed-eps", "0.3"],
     "claimed_epsilon", 0.3),
    (["audit", "--noise", "laplace", "--scale", "1", "--dimension", "4", "--claimed-epsilon", "0.3"],
     "claimed_epsilon", 0.3),
    (["epsilon", "--noise", "gaussian", "--sigma", "1", "--max-grad-norm", "0.5"], "sensitivity", 0.5),
    (["epsilon", "--noise", "gaussian", "--sigma", "1", "--sensitivity", "0.5"], "sensitivity", 0.5),
    (["audit", "--noise", "laplace", "--scale", "1", "--dimension", "4", "--max-grad-norm", "0.5"],
     "sensitivity", 0.5),
]


def test_accountant_takes_both_spellings():
    for argv, dest, value in SPELLINGS:
        assert getattr(accountant_cli.build_parser().parse_args(argv), dest) == value, argv


def test_noise_search_takes_both_spellings():
    for flag in ("--eps", "--epsilon"):
        assert search_cli._parser().parse_args([flag, "0.3", "--delta", "1e-10"]).eps == 0.3


# ----------------------------------------------------------------------------------------- defaults
def test_accountant_and_noise_search_assume_the_same_run(fake_certify, capsys, monkeypatch, tmp_path):
    code, out, _ = run(["epsilon", "--noise", "gaussian", "--sigma", "6.05", "--delta", "1e-10", "--json"], capsys)
    assert code == 0
    mech = fake_certify.calls[0][0][0]
    searched = Recorder(lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(search_module, "search", searched)
    assert search_cli.main(["--eps", "0.3", "--delta", "1e-10", "--quiet", "--out", str(tmp_path / "t.npz")]) == 130
    (_, kwargs), = searched.calls
    assert (mech.sampling_rate, mech.steps) == (kwargs["sampling_rate"], kwargs["steps"])
    assert (mech.sampling_rate, mech.steps) == (DEFAULT_SAMPLING_RATE, DEFAULT_STEPS) == (0.01, 1000)
    assert json.loads(out)["defaults_used"] == {"sampling_rate": 0.01, "steps": 1000, "geometry": "scalar"}


def test_default_run_is_certified_as_if_given():
    """Unpatched: the omitted q and T give the certificate of q 0.01, T 1000 (about 0.3, not the
    single release's 0.97)."""
    implicit = accountant_cli.cmd_epsilon(accountant_cli.build_parser().parse_args(
        ["epsilon", "--noise", "gaussian", "--sigma", "6.05", "--delta", "1e-10", "--json"]))
    explicit = certify(Mechanism(Gaussian(6.05), 1.0, "scalar", 0.01, 1000), 1e-10).epsilon
    assert implicit["epsilon"] == pytest.approx(explicit, rel=1e-9)
    assert 0.29 < implicit["epsilon"] < 0.31


def test_every_accountant_output_says_which_defaults_it_used(fake_certify, capsys, monkeypatch):
    code, out, _ = run(["epsilon", "--noise", "gaussian", "--sigma", "6.05", "--delta", "1e-10"], capsys)
    assert code == 0 and "q = 0.01 (default)" in out and "T = 1000 (default)" in out
    code, out, _ = run(["epsilon", "--noise", "gaussian", "--sigma", "6.05", "--delta", "1e-10",
                        "--sampling-rate", "0.02", "--steps", "10", "--geometry", "l2"], capsys)
    assert code == 0 and "(default)" not in out and "q = 0.02" in out and "T = 10" in out

    monkeypatch.setattr(accountant_cli, "delta_for_epsilon", Recorder(1.234567e-7))
    code, out, _ = run(["delta", "--noise", "laplace", "--scale", "1", "--epsilon", "1"], capsys)
    assert code == 0 and "q = 0.01 (default)" in out and "T = 1000 (default)" in out
    assert "1.235e-07" in out                                        # delta rounded up
    code, out, _ = run(["delta", "--noise", "laplace", "--scale", "1", "--epsilon", "1", "--json"], capsys)
    assert json.loads(out)["defaults_used"]["steps"] == 1000 and json.loads(out)["delta"] == 1.234567e-7

    calibrated = Recorder(lambda *a, **k: (6.0516123, fake_certificate(0.29999)))
    monkeypatch.setattr(accountant_cli, "calibrate", calibrated)
    code, out, _ = run(["calibrate", "--noise", "gaussian", "--eps", "0.3", "--delta", "1e-10"], capsys)
    assert code == 0 and "q = 0.01 (default)" in out and "T = 1000 (default)" in out
    assert calibrated.calls[0][0][3:5] == (0.01, 1000)
    assert "sigma=6.05162" in out                                    # the noise scale rounded up
    code, out, _ = run(["calibrate", "--noise", "gaussian", "--eps", "0.3", "--delta", "1e-10", "--json"], capsys)
    printed = json.loads(out)
    assert printed["scale"] == 6.0516123 and (printed["sampling_rate"], printed["steps"]) == (0.01, 1000)


def fake_audit_result(lower=AWKWARD):
    return AuditResult(
        lower_bound=lower, k=4, one_coordinate=0.2500009, gaussian_limit=0.31, sigma_eff=5.0,
        fisher_information=0.04, upper_bound=None, delta=1e-10, dimension=4, claimed_epsilon=0.3,
        refuted=lower > 0.3, per_k=[{"k": 1, "lower_bound": 0.2500009}, {"k": 4, "lower_bound": lower}])


def test_audit_uses_the_shared_defaults_and_rounds_lower_bounds_down(capsys, monkeypatch, lmo_file):
    asked = Recorder(lambda mech, *a, **k: fake_audit_result())
    monkeypatch.setattr(audit_cli, "audit", asked)
    argv = ["audit", "--noise", "lmo", "--params", lmo_file(PUBLISHED), "--dimension", "4", "--delta", "1e-10",
            "--claimed-epsilon", "0.3"]
    code, out, _ = run(argv, capsys)
    mech = asked.calls[0][0][0]
    assert code == 0 and (mech.sampling_rate, mech.steps) == (0.01, 1000)
    assert "q = 0.01 (default)" in out and "T = 1000 (default)" in out
    assert "epsilon >= 0.30000 " in out and "epsilon >= 0.25000\n" in out   # rounded down, not to 0.25001
    assert "claim refuted: true epsilon >= 0.3000004 > claimed 0.3" in out
    code, out, _ = run(argv + ["--json"], capsys)
    printed = json.loads(out)
    assert printed["lower_bound"] == AWKWARD and printed["defaults_used"] == {"sampling_rate": 0.01, "steps": 1000}


def fake_search_result(**overrides):
    fields = dict(family="gaussian", law="gaussian", params={"sigma": 0.8140012}, expected_abs=0.6495,
                  variance=0.6626, ratio_to_gaussian=1.0, certified_epsilon={"pld": 2.99, "prv": AWKWARD,
                                                                              "final": AWKWARD},
                  gaussian_sigma=0.8140012, gaussian_expected_abs=0.6495, eps_target=3.0, delta=1e-5,
                  sampling_rate=0.01, steps=1000, geometry="l2", objective="abs", path="t.npz")
    fields.update(overrides)
    return SearchResult(**fields)


def test_noise_search_says_which_defaults_it_used(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(search_module, "search", Recorder(lambda *a, **k: fake_search_result(**{
        key: k[key] for key in ("sampling_rate", "steps", "geometry")})))
    out = str(tmp_path / "t.npz")
    assert search_cli.main(["--eps", "3", "--delta", "1e-5", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "q=0.01 (default)" in text and "T=1000 (default)" in text and "geometry scalar (default)" in text
    assert "prv 0.30001" in text and "final 0.30001" in text      # certified epsilon rounded up
    assert "sigma 0.81401" in text and "sigma=0.81401" in text     # rounded up (0.8140012 -> 0.81401)
    assert search_cli.main(["--eps", "3", "--delta", "1e-5", "--out", out, "--overwrite", "--steps", "50",
                            "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["defaults_used"] == {"sampling_rate": 0.01, "geometry": "scalar"} and printed["steps"] == 50
    assert printed["certified_epsilon"]["final"] == AWKWARD        # full precision in --json


@pytest.mark.parametrize("argv", [["--eps", "0.3", "--delta", "1e-10", "--steps", "1.5"],
                                  ["--eps", "0.3", "--delta", "1e-10", "--geometry", "l3"],
                                  ["--delta", "1e-10"]])
def test_noise_search_usage_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        search_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error:")


# ------------------------------------------------------------------------------ irrelevant options
@pytest.mark.parametrize("argv,named", [
    (["epsilon", "--noise", "gaussian", "--sigma", "1", "--scale", "5"], "--scale"),
    (["epsilon", "--noise", "laplace", "--scale", "1", "--sigma", "1"], "--sigma"),
    (["epsilon", "--noise", "laplace", "--scale", "1", "--beta", "2"], "--beta"),
    (["epsilon", "--noise", "gengauss", "--scale", "1", "--beta", "1.5", "--sigma", "1"], "--sigma"),
    (["epsilon", "--noise", "gaussian", "--sigma", "1", "--params", "x.json"], "--params"),
    (["epsilon", "--noise", "laplace", "--scale", "1", "--exp-lambda-as-scale"], "--exp-lambda-as-scale"),
    (["epsilon", "--noise", "lmo", "--params", "x.json", "--sigma", "1"], "--sigma"),
    (["epsilon", "--noise", "gaussian", "--sigma", "1", "--table", "t.npz"], "--table"),
    (["epsilon", "--noise", "table", "--table", "t.npz", "--scale", "2"], "--scale"),
    (["delta", "--noise", "gaussian", "--sigma", "1", "--scale", "5", "--eps", "1"], "--scale"),
    (["calibrate", "--noise", "gaussian", "--beta", "2", "--eps", "1", "--delta", "1e-5"], "--beta"),
    (["calibrate", "--noise", "laplace", "--params", "x.json", "--eps", "1", "--delta", "1e-5"], "--params"),
    (["audit", "--noise", "gaussian", "--sigma", "1", "--scale", "5", "--dimension", "4"], "--scale"),
])
def test_options_that_do_not_apply_are_refused_in_one_line(argv, named, fake_certify, capsys, monkeypatch):
    monkeypatch.setattr(accountant_cli, "calibrate", Recorder(lambda *a, **k: (1.0, fake_certificate())))
    monkeypatch.setattr(accountant_cli, "delta_for_epsilon", Recorder(1e-6))
    monkeypatch.setattr(audit_cli, "audit", Recorder(lambda *a, **k: fake_audit_result()))
    code, out, err = run(argv + ["--delta", "1e-10"] if argv[0] in ("epsilon", "audit") else argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert named in lines[0] and "does not apply" in lines[0] and out == ""
    assert not fake_certify.calls


# ------------------------------------------------------------------------------ LMO parameter files
@pytest.mark.parametrize("change,message", [
    ({"G_kk": 1.5}, "unknown key 'G_kk'"),
    ({"lambda": 2, "theta": 1}, "unknown keys 'lambda', 'theta'"),
    ({"G_k": "1.5"}, 'G_k must be a finite number, got "1.5"'),
    ({"a1": True}, "a1 must be a finite number, got true"),
    ({"U_b": None}, "U_b must be a finite number, got null"),
    ({"E_lambda": [0.5]}, "E_lambda must be a finite number, got [0.5]"),
    ({"G_theta": float("nan")}, "G_theta must be a finite number, got NaN"),
])
def test_lmo_file_with_unknown_keys_or_wrong_types_is_refused(change, message, lmo_file, fake_certify, capsys):
    path = lmo_file({**PUBLISHED, **change})
    code, out, err = run(["epsilon", "--noise", "lmo", "--params", path, "--delta", "1e-10"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0] and path in lines[0]
    assert not fake_certify.calls


def test_lmo_file_missing_a_key_names_it_and_the_file(lmo_file, fake_certify, capsys):
    cfg = dict(PUBLISHED)
    del cfg["U_a"]
    path = lmo_file(cfg)
    code, _, err = run(["epsilon", "--noise", "lmo", "--params", path, "--delta", "1e-10"], capsys)
    assert code == 2 and f"{path}: missing key U_a" in err
    code, _, err = run(["epsilon", "--noise", "lmo", "--params", lmo_file(PUBLISHED), "--delta", "1e-10"], capsys)
    assert code == 0 and len(fake_certify.calls) == 1


# --------------------------------------------------------------------------------------- rounding
@pytest.mark.parametrize("x", [AWKWARD, 1.1237712345, 6.0516, 1.234567e-7, 0.000123456789, 123456.789, 2.0,
                               0.29999999999999999, 9.999996])
def test_rounding_is_outward_and_short(x):
    up, down = round_up(x), round_down(x)
    assert float(down) <= x <= float(up)
    assert len(re.sub(r"e[-+]\d+$", "", up).replace("-", "").replace(".", "").lstrip("0")) <= 6
    assert float(up) - float(down) <= 1.01e-4 * abs(x)


def test_rounding_examples():
    assert round_up(AWKWARD) == "0.30001" and f"{AWKWARD:.6f}" == "0.300000"
    assert round_down(AWKWARD) == "0.30000"
    assert round_up(1.125021) == "1.1251" and round_down(1.125021) == "1.1250"
    assert round_up(1.234567e-7, 4) == "1.235e-07"
    assert round_up(0.3) == "0.30000"    # exact in decimal: no spurious extra digit
    assert round_down_above(0.3000004, 0.3) == "0.3000004"
    assert round_up(math.inf) == "inf"


def test_printed_certificate_is_rounded_up_and_json_is_exact(fake_certify, capsys):
    code, out, _ = run(["epsilon", "--noise", "gaussian", "--sigma", "6", "--delta", "1e-10"], capsys)
    assert code == 0
    assert "certified epsilon: 0.30001 " in out and "0.300000" not in out
    assert "epsilon in [0.29999, 0.30001]" in out          # lower bound down, upper bound up
    code, out, _ = run(["epsilon", "--noise", "gaussian", "--sigma", "6", "--delta", "1e-10", "--json"], capsys)
    assert json.loads(out)["epsilon"] == AWKWARD


# ------------------------------------------------------------------------------------------ README
def _section(text, title):
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_sections_tell_about_overwrite_and_exit_code_3():
    readme = (REPO / "README.md").read_text()
    accountant_text, search_text = _section(readme, "Accountant"), _section(readme, "Noise search")
    for section in (accountant_text, search_text):
        assert "--overwrite" in section and "exit code 3" in section
        assert "--eps" in section and "--epsilon" in section
    assert "q 0.01, T 1000" in accountant_text
