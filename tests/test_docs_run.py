"""The documentation runs as written.

- every ```python block of README.md and docs/*.md, each in a fresh interpreter whose working
  directory is an empty temporary directory (a block creates the small data it needs);
- every shell command of README.md, in order, in one empty temporary directory holding a copy of
  examples/ (slow: it pre-trains a base model, fine-tunes it without DP, with record-level DP and
  with person-level DP, and evaluates the three at the person level), and the report it ends in
  shows what the README promises: the record-level run's person-level epsilon is larger than its
  record-level one, the person-level run's certificate is its person-level epsilon and its
  person-level membership inference stays inside the limits, and the one-run audit prints a number.

Blocks that train with MindSpore or compose a certificate over 1000 steps take over a minute on a
loaded 2-core machine; they are marked slow, the others run by default.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def fenced_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block in ``path`` opened with ```language."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(2))
            for m in FENCE.finditer(text) if m.group(1) == language]


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comment lines dropped."""
    out, cur = [], ""
    for line in block.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.strip()[:-1].strip() + " "
            continue
        out.append(cur + line.strip())
        cur = ""
    if cur:
        out.append(cur.strip())
    return out


# measured on 2 loaded cores: MindSpore training blocks 45-130 s, a certificate composed over 1000
# steps at delta 1e-10 (the README's accountant block) 75 s; every other block 8-16 s
SLOW_MARKERS = ("ms.set_context", "mindspore.train import Model", "steps=1000")


def _slow(code: str) -> bool:
    return any(m in code for m in SLOW_MARKERS)


PY_BLOCKS = [pytest.param(code, id=f"{p.name}:{line}",
                          marks=[pytest.mark.slow] if _slow(code) else [])
             for p in DOCS for line, code in fenced_blocks(p, "python")]


def test_blocks_are_found():
    """The parser sees the README's blocks (a test that silently ran nothing would pass)."""
    readme = ROOT / "README.md"
    assert len(fenced_blocks(readme, "python")) >= 3
    cmds = [c for _, b in fenced_blocks(readme, "bash") for c in shell_commands(b)]
    assert any(c.startswith("python -m finetune.evaluate") for c in cmds)
    assert shell_commands("# c\npython -m a --x 1 \\\n    --y 2\n\npython -m b\n") == [
        "python -m a --x 1 --y 2", "python -m b"]


@pytest.mark.parametrize("code", PY_BLOCKS)
def test_python_block_runs_in_an_empty_directory(code, tmp_path):
    # a script file, not ``-c``: MindSpore's graph mode reads a Cell's source code
    (tmp_path / "block.py").write_text(code, encoding="utf-8")
    p = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]


# --------------------------------------------------------------------- the README's commands
SKIPPED = {
    "python3 -m venv": "set-up: creates a virtualenv and installs the package (the test runs in one)",
    ".venv/bin/pip install": "installs optional extras into the virtualenv (the test uses the "
                             "interpreter it runs in)",
    "msrun ": "data-parallel launch (a scheduler and two workers); tests/test_finetune_distributed.py "
              "runs msrun itself",
}


def _skip_reason(cmd: str):
    return next((why for start, why in SKIPPED.items() if cmd.startswith(start)), None)


@pytest.mark.slow
def test_readme_shell_commands_run_in_order(tmp_path):
    """Every README command, then the report's promises (12.5 minutes on 2 idle cores; 87 minutes
    measured at load average 15)."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    log = []
    cmds = [c for _, b in fenced_blocks(ROOT / "README.md", "bash") for c in shell_commands(b)]
    for cmd in cmds:
        why = _skip_reason(cmd)
        if why:
            log.append(f"skipped  {cmd[:60]}: {why}")
            continue
        t0 = time.time()
        p = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=3 * 3600)
        log.append(f"{time.time() - t0:7.1f} s {cmd[:100]}")
        assert p.returncode == 0, f"{cmd}\n{p.stderr[-3000:]}"
        if cmd.startswith("python -m finetune.evaluate"):
            evaluate_stdout = p.stdout
    print("\n".join(log))
    print(evaluate_stdout)

    s = json.loads((tmp_path / "report" / "summary.json").read_text())
    nodp, dp = s["baselines"]["nodp"], s["baselines"]["dp"]
    # person split: every evaluated person is a member or never seen
    assert s["n_member_persons"] > 100 and s["n_never_seen_persons"] > 100
    # the record-level DP run: epsilon <= 1 per record, a larger person-level epsilon at k >= 2 records
    assert 0 < dp["epsilon"] <= 1.0 and dp["person_k"] >= 2 and dp["person_epsilon"] > dp["epsilon"]
    assert dp["person_method"] == "tight mixture"
    # the person-level DP run: its certificate is the person-level epsilon, and its person-level
    # membership inference is inside the limits at that epsilon
    assert 0 < s["epsilon"] <= 1.0 and s["person_epsilon"] == s["epsilon"]
    assert s["person_method"] == "unit-level" and s["person_mia_inside_dp_bound"] is True
    # ... one record changed inside a person who stays costs more than the per-person epsilon, and
    # the record-level membership bound is held to that
    assert s["record_epsilon"] > s["epsilon"] and s["mia_inside_dp_bound"] is True
    assert "record-level epsilon" in evaluate_stdout.splitlines()[0]
    assert s["person_pii_precision"] == 0 and s["person_pii_recall"] == 0
    # the non-private run visibly leaks: membership inference well above chance, training PII
    # reproduced in free generation, a positive one-run audit bound
    assert nodp["epsilon"] is None and nodp["person_epsilon"] is None
    assert nodp["mia_auc"] >= 0.6 and nodp["mia_auc_ci"][0] > 0.5
    assert nodp["pii_precision"] > 0 and nodp["pii_recall"] > 0
    assert nodp["audit_epsilon_lower_bound"] is not None
    # the one-run audit of the record-level DP run is a number below its certificate; the
    # person-level run dropped the canaries (they name nobody) and says so instead of auditing them
    assert dp["audit_epsilon_lower_bound"] is not None and dp["audit_epsilon_lower_bound"] <= dp["epsilon"]
    assert s["audit_epsilon_lower_bound"] is None and "--multi-owner drop" in s["canary_note"]
    assert "audit     n/a: the run trained only the records naming exactly one person" in evaluate_stdout
    assert "inside the DP bound at 95%: yes" in evaluate_stdout and "terms (one line each):" in evaluate_stdout
