"""The import rules, checked by import-linter (``lint-imports``, contracts in pyproject.toml), and
the naming and size rules of one home per concern.

The planted-violation tests copy the package to a scratch folder, break one rule there and check
that ``lint-imports`` fails on exactly that contract: the rules can fail, they are not decoration.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
CONTRACTS = {
    "entry": "catvton never imports entry points",
    "offline": "Library code never imports offline fixtures",
    "layers": "Layers import only downwards",
    "cycles": "No import cycles among siblings at any depth",
}


def _lint(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(folder)}  # the scratch copy shadows the installed package
    return subprocess.run([str(LINT), "--no-cache"], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def _broken(output: str) -> set[str]:
    return {k for k, name in CONTRACTS.items() if any(line.startswith(name) and line.rstrip().endswith("BROKEN")
                                                      for line in output.splitlines())}


def test_the_import_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "4 kept, 0 broken" in r.stdout


@pytest.fixture
def scratch(tmp_path) -> Path:
    for package in ("catvton", "serve"):  # the root packages of the contracts
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _plant(scratch: Path, module: str, code: str) -> None:
    path = scratch / module
    path.write_text(path.read_text() + "\n\n" + code + "\n")


@pytest.mark.parametrize("module, code, expected", [
    ("catvton/data/pairs.py", "def _oops():\n    import serve.app  # noqa", {"entry"}),
    ("catvton/train/job.py", "def _oops():\n    from catvton.offline import resolve  # noqa", {"offline"}),
    # an upward import hidden in a function body: a cycle train <-> cache, and a layer breach
    ("catvton/cache/format.py", "def _oops():\n    from catvton.train import job  # noqa", {"layers", "cycles"}),
    # the service's modules import one way too (examples -> gallery, as issue 28 found them both ways)
    ("serve/gallery.py", "def _oops():\n    from serve.examples import write_example  # noqa", {"cycles"}),
])
def test_a_planted_violation_fails_its_contract(scratch, module, code, expected):
    _plant(scratch, module, code)
    r = _lint(scratch)
    assert r.returncode != 0
    assert expected <= _broken(r.stdout), r.stdout[-3000:]


def _public_defs() -> dict[str, list[str]]:
    names: dict[str, list[str]] = defaultdict(list)
    for path in sorted((ROOT / "catvton").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                names[node.name].append(str(path.relative_to(ROOT)))
    return names


def test_no_two_public_functions_share_a_name():
    """One meaning per name (``main`` is every module's command line, the same meaning everywhere)."""
    shared = {n: where for n, where in _public_defs().items() if len(where) > 1 and n != "main"}
    assert shared == {}


def test_modules_stay_small_or_say_why():
    """Over ~400 lines a module's docstring must say why it is long (a renderer may be)."""
    long = []
    for path in sorted([*ROOT.glob("catvton/**/*.py"), *ROOT.glob("ray_jobs/*.py"), *ROOT.glob("serve/*.py"),
                        *ROOT.glob("bench/*.py"), ROOT / "easy_train.py"]):
        text = path.read_text()
        if len(text.splitlines()) > 420 and "long because" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
    assert long == []


def test_exchanged_file_names_are_spelled_once():
    """Every file name that one stage writes and another reads is a constant of catvton/artifacts.py."""
    names = ["pytorch_lora_weights.safetensors", "training_state.pt", "training_config.json", "manifest.json",
             "text_embeds.safetensors", "samples.npz", "tiny_base.json", "alpha.json", "final_metrics.json"]
    offenders = []
    for path in sorted([*ROOT.glob("catvton/**/*.py"), *ROOT.glob("ray_jobs/*.py"), *ROOT.glob("serve/*.py"),
                        *ROOT.glob("bench/*.py"), ROOT / "easy_train.py", *ROOT.glob("cluster/*.py")]):
        if path.name == "artifacts.py":
            continue
        tree = ast.parse(path.read_text())
        # prose is allowed to name files: docstrings (of modules, functions, fields) and --help texts
        doc_nodes = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        doc_nodes |= {id(c) for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "help"
                      for c in ast.walk(k.value)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in doc_nodes:
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n in node.value]
    assert offenders == []
