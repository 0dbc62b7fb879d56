"""Inputs at the edge of the supported range: each ends in a number (exit 0) or in ONE line on stderr
with exit code 2 that says what is wrong, never a traceback, a float warning or a bare internal
message such as "cannot convert float NaN to integer"."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from accountant import table as table_module
from accountant.output_path import OutputPathError, check_output_file

ROOT = Path(__file__).resolve().parents[1]
LMO_PUBLISHED = {"a1": 1, "a3": 0.5, "a4": 0.1, "G_k": 1.5, "G_theta": 0.1, "E_lambda": 0.5, "U_a": 0, "U_b": 1}
#: what Python or a library says when it fails inside a computation: never shown bare to a user
INTERNAL = ("cannot convert float NaN to integer", "Numerical result out of range",
            "deltas are not in non-increasing order", "Discrete mean differs")


def run_cli(*args, module="accountant", timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def assert_number_or_one_line(proc, number_pattern=r"(certified epsilon|certified lower bound: epsilon >=|"
                                                   r"certified epsilon [0-9.e+-]+ <= target)"):
    """Exit 0 with the result line, or exit 2 with exactly one stderr line that is not a bare internal
    message; in both cases no traceback and no warning."""
    err = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("audit k:")]
    assert "Traceback" not in proc.stderr
    assert not any("Warning" in line for line in err), proc.stderr
    if proc.returncode == 0:
        assert re.search(number_pattern, proc.stdout), proc.stdout
        assert err == [], proc.stderr
        return None
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(err) == 1, proc.stderr
    line = err[0]
    assert line.startswith("error: ")
    for bare in INTERNAL:   # an internal failure is named as such and says what to change
        assert bare not in line or "outside the range this accountant supports" in line, line
    return line


@pytest.fixture
def lmo_file(tmp_path):
    def make(text):
        path = tmp_path / "lmo.json"
        path.write_text(text)
        return path
    return make


MECH = ("--sampling-rate", 0.01, "--steps", 10, "--delta", 1e-5)

CASES = {
    "sigma 1e300": ("epsilon", "--noise", "gaussian", "--sigma", 1e300, *MECH),
    "laplace sensitivity 1e300": ("epsilon", "--noise", "laplace", "--scale", 1, "--sensitivity", 1e300, *MECH),
    "calibrate laplace eps 1e6": ("calibrate", "--noise", "laplace", "--eps", 1e6, "--delta", 1e-5,
                                  "--sampling-rate", 1, "--steps", 1),
    "steps 1e12": ("epsilon", "--noise", "gaussian", "--sigma", 1, "--sampling-rate", 0.001,
                   "--steps", 1000000000000, "--delta", 1e-5),
    "sigma 1e-3": ("epsilon", "--noise", "gaussian", "--sigma", 1e-3, "--sampling-rate", 0.01,
                   "--steps", 100, "--delta", 1e-5),
}


#: these run the accountant on the whole case (> 20 s each on a busy machine)
SLOW_CASES = ("laplace sensitivity 1e300", "calibrate laplace eps 1e6", "steps 1e12", "sigma 1e-3")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n
                                  for n in CASES])
def test_edge_input_gives_number_or_one_line(name):
    assert_number_or_one_line(run_cli(*CASES[name]))


def test_steps_written_as_float_is_a_count():
    proc = run_cli("epsilon", "--noise", "gaussian", "--sigma", 1, "--sampling-rate", 1, "--steps", "1e1",
                   "--delta", 1e-5)
    assert proc.returncode == 0, proc.stderr
    assert "T = 10" in proc.stdout


def test_lmo_parameter_overflowing_float64(lmo_file):
    path = lmo_file(json.dumps({**LMO_PUBLISHED, "a1": 1e308}))
    line = assert_number_or_one_line(run_cli("epsilon", "--noise", "lmo", "--params", path, *MECH))
    if line is not None:
        assert "a1" in line or "supported" in line, line


def test_lmo_duplicate_key_refused(lmo_file):
    text = json.dumps(LMO_PUBLISHED)[:-1] + ', "a1": 2}'
    path = lmo_file(text)
    proc = run_cli("epsilon", "--noise", "lmo", "--params", path, *MECH)
    line = assert_number_or_one_line(proc)
    assert proc.returncode == 2 and "'a1'" in line and "more than once" in line, proc.stderr


@pytest.mark.slow
def test_audit_dimension_1e30_gives_a_bound():
    proc = run_cli("audit", "--noise", "gaussian", "--sigma", 1, "--dimension", "1e30",
                   "--sampling-rate", 1, "--steps", 1, "--delta", 1e-5)
    assert_number_or_one_line(proc)
    assert proc.returncode == 0, proc.stderr
    bound = float(re.search(r"certified lower bound: epsilon >= ([0-9.e+-]+)", proc.stdout).group(1))
    # Gaussian, sensitivity 1, sigma 1, one step: the exact epsilon (Balle and Wang 2018) is 4.41 at
    # delta 1e-5; the bound must stay below it (and be a real bound, not 0)
    assert 0.9 * 4.4 < bound <= 4.42


def _table_with_steps(tmp_path, steps):
    out = tmp_path / "g.npz"
    proc = run_cli("calibrate", "--noise", "gaussian", "--eps", 2, "--delta", 1e-5, "--sampling-rate", 1,
                   "--steps", 1, "--out", out)
    assert proc.returncode == 0, proc.stderr
    with np.load(out, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("metadata")))
    meta["steps"] = steps
    meta["sha256"] = table_module._checksum(arrays, meta)   # a valid checksum: the loader accepts it
    with open(out, "wb") as handle:
        np.savez(handle, metadata=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    return out


@pytest.mark.slow
def test_table_claiming_1e300_steps(tmp_path):
    """A forged table (epsilon 2 claimed for 1e300 steps, valid checksum): re-certified, it costs far
    more than it claims, which is exit code 3 and one line, never a traceback."""
    path = _table_with_steps(tmp_path, 1e300)
    proc = run_cli("epsilon", "--noise", "table", "--table", path)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1, (proc.returncode, proc.stderr)
    claimed, certified = re.search(r"claims ([0-9.e+]+), certified ([0-9.e+]+|inf)", proc.stderr).groups()
    assert float(claimed) == 2 and float(certified) > 1e290


def _special_files(tmp_path):
    """A named pipe and, where this process may create device nodes, a character device like
    /dev/full (a copy in the test folder: a regression must not replace the system's device)."""
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    paths = [fifo]
    device = tmp_path / "full"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 7))
        paths.append(device)
    except (PermissionError, OSError):
        pass
    return paths


def test_calibrate_refuses_existing_non_regular_out(tmp_path):
    for path in _special_files(tmp_path):
        kind = stat.S_IFMT(os.stat(path).st_mode)
        proc = run_cli("calibrate", "--noise", "gaussian", "--eps", 2, "--delta", 1e-5, "--sampling-rate", 1,
                       "--steps", 1, "--out", path, "--overwrite")
        line = assert_number_or_one_line(proc)
        assert proc.returncode == 2 and "not a regular file" in line, proc.stderr
        assert stat.S_IFMT(os.stat(path).st_mode) == kind   # still the pipe / device it was


def test_output_check_refuses_non_regular_file_for_every_cli(tmp_path):
    """``check_output_file`` is the check both writing CLIs (accountant, noise_search) run first."""
    for path in _special_files(tmp_path):
        with pytest.raises(OutputPathError, match="not a regular file"):
            check_output_file(path, overwrite=True, what="--out")
    regular = tmp_path / "t.npz"
    regular.write_bytes(b"")
    assert check_output_file(regular, overwrite=True) == regular


def test_noise_search_refuses_fifo_out(tmp_path):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    proc = run_cli("--eps", 2, "--delta", 1e-5, "--sampling-rate", 1, "--steps", 1, "--family", "gaussian",
                   "--out", fifo, "--overwrite", "--quiet", module="noise_search", timeout=120)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr, proc.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
