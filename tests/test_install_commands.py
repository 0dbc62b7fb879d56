"""The README's two set-up commands, `.ci/run` and `constraints.txt` agree with each other.

CI runs `.ci/run` on a fresh clone; a README command that differs from it, or an install that does not
use the pinned versions, is the gap through which a fresh machine turned red before.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_setup_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def _pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt line {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_setup_commands()
    assert len(commands) == 2, commands
    run_search, run_tests = commands
    assert run_search.endswith("python -m noise_search --eps 0.3 --delta 1e-10")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("python3 -m venv")]
    assert ci == [run_tests]
    assert "--durations=25" in run_tests


def test_every_install_uses_the_constraints_file():
    commands = _readme_setup_commands()
    text = (ROOT / "README.md").read_text()
    installs = re.findall(r"pip install [^&\n]*", text)
    assert len(installs) >= 4
    for cmd in installs:
        assert "-c constraints.txt" in cmd, cmd
    assert all("-c constraints.txt" in c for c in commands)


def test_constraints_pin_the_core_stack_inside_the_declared_ranges():
    pins = _pins()
    major = lambda v: int(v.split(".")[0])  # noqa: E731
    assert major(pins["numpy"]) < 2                      # MindSpore 2.10 is built against NumPy 1.x
    assert pins["mindspore"].startswith("2.10.")
    assert pins["flwr"].startswith("1.42.")
    for name in ("scipy", "numba", "prv-accountant", "dp-accounting", "pytest", "protobuf"):
        assert name in pins, name
