"""Imports flow one way (docs/architecture.md): read every module's import statements with ``ast``
(nothing is imported, so the check is fast and sees imports inside functions too)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("accountant", "noise_search", "finetune")
CLIS = ("finetune.__main__", "finetune.evaluate", "finetune.export", "finetune.federated",
        "finetune.evaluation")

#: importer (module or package prefix) -> what it must never import (prefixes)
RULES = {
    "accountant": ("finetune", "noise_search"),
    "noise_search": ("finetune",),
    "finetune.dp": ("finetune.engine", "finetune.train", "finetune.models", "finetune.data",
                    "finetune.cli", "finetune.run_dir", "finetune.checkpointing") + CLIS,
    "finetune.models": ("finetune.engine", "finetune.train") + CLIS,
    "finetune.cli": ("finetune.engine", "finetune.train", "finetune.dp", "finetune.models") + CLIS,
    "finetune.run_dir": ("finetune.engine", "finetune.train", "finetune.dp", "finetune.models") + CLIS,
    "finetune.checkpointing": ("finetune.engine", "finetune.train", "finetune.dp", "finetune.models") + CLIS,
    "finetune.engine": CLIS,
    "finetune.train": CLIS,
}


def _module(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if package else parts), package


def imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, relative imports resolved (``from . import x`` counts
    as ``pkg.x``)."""
    name, package = _module(path)
    here = name.split(".") if package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = here[:len(here) - (node.level - 1)]
                base = ".".join(stem + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" for a in node.names)   # a name or a submodule
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(rules=RULES) -> list[str]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name, _ = _module(path)
            for importer, banned in rules.items():
                if not _under(name, importer):
                    continue
                out += [f"{name} imports {m}" for m in sorted(imports(path))
                        if any(_under(m, b) for b in banned)]
    return out


def test_imports_flow_one_way():
    assert violations() == []


def test_the_check_sees_a_wrong_way_import(tmp_path, monkeypatch):
    """The check can fail: a relative import from finetune.dp up into the engine, and an absolute
    one from accountant into finetune, inside a function, are both reported."""
    fake = tmp_path / "finetune" / "dp"
    fake.mkdir(parents=True)
    (tmp_path / "finetune" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from ..engine import make_private\n")
    (tmp_path / "accountant").mkdir()
    (tmp_path / "accountant" / "bad.py").write_text("import finetune.train\n")
    (tmp_path / "noise_search").mkdir()
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert violations() == ["accountant.bad imports finetune.train",
                            "finetune.dp.bad imports finetune.engine.make_private"]


@pytest.mark.parametrize("pkg", ["accountant", "noise_search", "finetune", "finetune.dp",
                                 "finetune.models", "finetune.federated", "finetune.evaluation"])
def test_every_package_docstring_points_to_the_architecture(pkg):
    init = ROOT.joinpath(*pkg.split("."), "__init__.py")
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    assert "docs/architecture.md" in doc, f"{pkg}/__init__.py does not cite docs/architecture.md"
