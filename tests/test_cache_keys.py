"""Every built-once folder is keyed on the code that builds it (issue 25).

The tiny base, the tiny alpha, the synthetic set and the latent cache are reused from the cache
(and the first two from the repository) whenever their key matches. A key that missed a module
of its builder would hand out a folder that code no longer makes, silently. So, in a scratch copy
of the package, one comment is added to each builder module in turn, and the keys that must move
move while the others stay; a change to code no builder runs (serving, reports) moves none.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from catvton import artifacts
from catvton.config import load_config

ROOT = Path(__file__).resolve().parents[1]

BUILDERS = {
    # module edited                the keys that must change
    "offline/tiny_base.py": {"base", "alpha", "latents"},  # the cache is encoded by the base's VAE
    "offline/tiny_vae.py": {"base", "alpha", "latents"},
    "offline/tiny_text.py": {"base", "alpha", "latents"},
    "offline/synthetic.py": {"synthetic", "base", "alpha", "latents"},  # every other one learns from its rows
    "offline/alpha.py": {"alpha"},
    "train/plain.py": {"alpha"},
    "train/engine.py": {"alpha"},  # the step and the loss
    "train/flow.py": {"alpha"},
    "cache/build.py": {"latents", "alpha"},
    "cache/stages.py": {"latents", "alpha"},  # pairing and the VAE encode stage
    "data/pairs.py": {"latents", "alpha"},
    "data/canvas.py": {"latents", "alpha"},
    "data/masks.py": {"latents", "alpha"},
    "data/placement.py": {"latents", "alpha"},
    "data/validate.py": {"latents", "alpha"},
}
UNRELATED = ["infer/serving.py", "eval/report.py", "../serve/app.py"]
"""Code no builder runs: editing it must leave every key as it is."""


def _keys(package: Path) -> dict[str, str]:
    """Every key, computed from the sources under ``package`` (a copy of ``catvton/``)."""
    from catvton.cache.build import cache_key
    from catvton.offline.alpha import alpha_key
    from catvton.offline.tiny_base import tiny_base_key

    artifacts._source_digest.cache_clear()
    base = package.parent / "bases" / tiny_base_key()  # the alpha and the cache name the base by its key
    base.mkdir(parents=True, exist_ok=True)
    (base / "model_index.json").write_text("{}")
    (base / artifacts.TINY_BASE_INFO).write_text("{}")
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    cfg.model.base = str(base)
    return {"base": base.name, "alpha": alpha_key(cfg), "latents": cache_key(cfg),
            "synthetic": artifacts.synthetic_dir("/", 40, 256, 0).name}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A copy of ``catvton/`` and ``serve/`` that the digests read instead of the real package."""
    ignore = shutil.ignore_patterns("__pycache__", "prebuilt")
    shutil.copytree(ROOT / "catvton", tmp_path / "catvton", ignore=ignore)
    shutil.copytree(ROOT / "serve", tmp_path / "serve", ignore=ignore)
    (tmp_path / "catvton" / "offline" / "prebuilt").mkdir()
    shutil.copy(ROOT / "catvton" / "offline" / "prebuilt" / "__init__.py", tmp_path / "catvton" / "offline" / "prebuilt")
    monkeypatch.setattr(artifacts, "PACKAGE_ROOT", tmp_path / "catvton")
    yield tmp_path / "catvton"
    artifacts._source_digest.cache_clear()


def _touched(package: Path, module: str) -> dict[str, str]:
    """The keys with one comment line added at the end of ``module``."""
    path = package / module
    before = path.read_bytes()
    path.write_bytes(before + b"\n# a comment the key test added\n")
    try:
        return _keys(package)
    finally:
        path.write_bytes(before)


def test_a_comment_in_any_builder_changes_exactly_its_keys(scratch):
    clean = _keys(scratch)
    assert clean == _keys(scratch), "keys must be stable"
    moved = {}
    for module in BUILDERS:
        keys = _touched(scratch, module)
        moved[module] = {k for k in clean if keys[k] != clean[k]}
    missed = {m: sorted(BUILDERS[m] - moved[m]) for m in BUILDERS if BUILDERS[m] - moved[m]}
    assert not missed, f"builder modules left out of a key (a stale folder would be reused): {missed}"
    extra = {m: sorted(moved[m] - BUILDERS[m]) for m in BUILDERS if moved[m] - BUILDERS[m]}
    assert not extra, f"keys that moved for code their builder does not run: {extra}"


def test_code_no_builder_runs_leaves_every_key(scratch):
    clean = _keys(scratch)
    for module in UNRELATED:
        assert (scratch / module).is_file(), module
        assert _touched(scratch, module) == clean, f"{module} is not built into anything"


def test_the_keys_of_the_real_package_are_what_the_builders_use():
    """The keys above are the ones the cache uses: the digest of the installed package, no version
    string beside it."""
    from catvton.offline import alpha, tiny_base
    from catvton.cache import build

    assert tiny_base.builder_source_hash() == artifacts.source_digest("catvton.offline.tiny_base")
    for module in (alpha, tiny_base, build):
        assert not [n for n in vars(module) if n.endswith("_VERSION")], f"{module.__name__} keeps a version string"
    files = {f.as_posix() for f in artifacts.source_files("catvton.offline.alpha")}
    assert {"train/flow.py", "data/masks.py", "cache/stages.py", "offline/synthetic.py"} <= files
    assert not {f for f in files if f.startswith(("infer/serving", "eval/"))}, files
