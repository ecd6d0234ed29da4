"""The tiny base and alpha shipped in the repository (catvton/offline/prebuilt): the preset finds
them under the keys the code computes now, the cache copies them instead of training, turning
shipping off builds, and the rebuild comparison accepts what it should and nothing else.

The rebuild itself (~10 CPU minutes) is ``python -m catvton.offline.ship --check``, marker slow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from catvton.config import load_config
from catvton.offline import prebuilt, ship
from catvton.offline import tiny_base as tiny

ROOT = Path(__file__).resolve().parents[1]


def test_the_preset_uses_the_shipped_base_and_alpha():
    base, alpha = ship.wanted(load_config(ROOT / "configs/tiny.yaml"))
    shipped = {f.name for f in prebuilt.folders()}
    hint = "the shipped tiny models are stale: run `python -m catvton.offline.ship --refresh` and commit"
    assert base in shipped, hint
    assert alpha in shipped, hint
    assert shipped == {base, alpha}, f"shipped folders nobody uses: {shipped - {base, alpha}}"
    assert (prebuilt.HERE / base / "model_index.json").is_file()
    assert (prebuilt.HERE / base / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (prebuilt.HERE / base / "transformer").exists(), "a seeded random init: re-made, not shipped"
    assert (prebuilt.HERE / alpha / "diffusion_pytorch_model.safetensors").is_file()
    size = sum(f.stat().st_size for d in prebuilt.folders() for f in d.rglob("*") if f.is_file())
    assert size < 11e6, f"shipped models take {size / 1e6:.1f} MB: the issue allows a few MB"


def test_the_copied_base_is_the_built_one(tmp_path, monkeypatch):
    """The shipped base copied into an empty cache: its transformer re-made from the seed equals the
    builder's random init tensor for tensor, and every file has the digest ``ship --refresh``
    recorded when it shipped the build (not merely the digest of the folder it was copied from)."""
    from catvton.model.loading import load_transformer

    monkeypatch.delenv("CATVTON_PREBUILT", raising=False)
    got = tiny.ensure_tiny_base(tmp_path, log=lambda _: None)
    recorded = json.loads((prebuilt.HERE / got.name / prebuilt.DIGESTS).read_text())
    copied = prebuilt.file_digests(got)
    assert {k: copied[k] for k in recorded} == recorded
    assert set(copied) - set(recorded) == {f.relative_to(got).as_posix() for f in (got / "transformer").rglob("*")
                                           if f.is_file()}, "only the re-made transformer is not shipped"
    made = load_transformer(str(got), None).state_dict()
    built = tiny.new_transformer(0).state_dict()
    assert made.keys() == built.keys() and all(torch.equal(made[k], built[k]) for k in built)


@pytest.mark.parametrize("damage", ["flip a byte of a tensor file", "edit a json", "delete a file", "add a file"])
def test_a_damaged_shipped_folder_is_refused(tmp_path, monkeypatch, damage):
    """The content check: a shipped folder is used only while every file has its recorded digest."""
    alpha = next(f for f in prebuilt.folders() if f.name.startswith("tiny-alpha-"))
    here = tmp_path / "prebuilt"
    folder = here / alpha.name
    shutil.copytree(alpha, folder)
    monkeypatch.setattr(prebuilt, "HERE", here)
    monkeypatch.delenv("CATVTON_PREBUILT", raising=False)
    assert prebuilt.shipped(alpha.name) == folder  # the undamaged copy passes
    weights = folder / "diffusion_pytorch_model.safetensors"
    if damage == "flip a byte of a tensor file":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit of one weight, deep inside the tensor data
        weights.write_bytes(bytes(data))
    elif damage == "edit a json":
        (folder / "alpha.json").write_text((folder / "alpha.json").read_text().replace("2000", "2001"))
    elif damage == "delete a file":
        (folder / "config.json").unlink()
    else:
        (folder / "extra.safetensors").write_bytes(b"")
    with pytest.raises(prebuilt.DamagedShippedModel, match="is not what was shipped") as err:
        prebuilt.shipped(alpha.name)
    assert "ship --refresh" in str(err.value)


def test_every_shipped_folder_records_its_digests():
    for folder in prebuilt.folders():
        prebuilt.verify(folder)  # raises with the file names if not
        assert any(k.endswith(".safetensors") for k in json.loads((folder / prebuilt.DIGESTS).read_text()))


def _fake_shipped(here: Path, key: str) -> Path:
    folder = here / key
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "tiny_base.json").write_text(json.dumps({"shipped": True}))
    prebuilt.record_digests(folder)
    return folder


def test_the_cache_copies_a_shipped_base_and_builds_when_shipping_is_off(tmp_path, monkeypatch):
    calls: list[Path] = []

    def fake_build(out_dir, seed=0, log=print, **_):
        calls.append(Path(out_dir))
        (Path(out_dir) / "model_index.json").write_text("{}")
        (Path(out_dir) / "tiny_base.json").write_text(json.dumps({"shipped": False}))

    monkeypatch.setattr(tiny, "build_tiny_base", fake_build)
    monkeypatch.setattr(prebuilt, "HERE", tmp_path / "prebuilt")
    _fake_shipped(tmp_path / "prebuilt", tiny.tiny_base_key(0))
    monkeypatch.delenv("CATVTON_PREBUILT", raising=False)

    got = tiny.ensure_tiny_base(tmp_path / "cache", log=lambda _: None)
    assert calls == [] and json.loads((got / "tiny_base.json").read_text()) == {"shipped": True}
    assert got.parent == tmp_path / "cache"  # copied into the cache, the shipped folder untouched

    monkeypatch.setenv("CATVTON_PREBUILT", "0")
    got = tiny.ensure_tiny_base(tmp_path / "cache2", log=lambda _: None)
    assert len(calls) == 1 and json.loads((got / "tiny_base.json").read_text()) == {"shipped": False}


def test_a_shipped_folder_under_another_key_is_never_used(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(tiny, "build_tiny_base", lambda out_dir, **_: (
        calls.append(out_dir), (Path(out_dir) / "model_index.json").write_text("{}"),
        (Path(out_dir) / "tiny_base.json").write_text("{}")))
    monkeypatch.setattr(prebuilt, "HERE", tmp_path / "prebuilt")
    _fake_shipped(tmp_path / "prebuilt", tiny.tiny_base_key(1))  # another seed's base
    tiny.ensure_tiny_base(tmp_path / "cache", seed=0, log=lambda _: None)
    assert len(calls) == 1


def _model(folder: Path, weight: torch.Tensor, info: dict) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": weight}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "alpha.json").write_text(json.dumps(info))
    return folder


@pytest.mark.parametrize("change, loss, identical, ok", [
    (0.0, 0.200, True, True),      # bit for bit
    (1e-3, 0.206, False, True),    # other rounding, the same behaviour (3% < 5%)
    (1e-3, 0.220, False, False),   # a rebuild that trains to another loss
    (0.5, 0.200, False, False),    # the same loss from other weights (rel. L2 0.85 > TENSOR_TOLERANCE)
])
def test_the_rebuild_comparison(tmp_path, change, loss, identical, ok):
    w = torch.linspace(-1, 1, 64).reshape(8, 8)
    shipped = _model(tmp_path / "a", w, {"loss_last_50": 0.200})
    rebuilt = _model(tmp_path / "b", w + change, {"loss_last_50": loss})
    result = ship.compare(shipped, rebuilt)
    assert result["identical"] is identical and result["ok"] is ok
    assert result["max_abs_diff"] == pytest.approx(change, abs=1e-6)
    assert result["max_rel_l2_diff"] == pytest.approx(change * 8 / float(w.norm()), rel=1e-4)
    assert result["figures"]["loss_last_50"]["rebuilt"] == loss


@pytest.mark.parametrize("scale, ok", [(1.0 + 1e-4, True), (1.5, False)])
def test_the_rebuild_comparison_judges_the_alpha_outputs(tmp_path, scale, ok):
    """The shipped alpha against a copy whose output projection is scaled: its weights stay within
    the tensor tolerance, but what it predicts on the fixed inputs is judged, and a 50% larger
    output fails however close the training loss."""
    from safetensors.torch import load_file

    alpha = next(f for f in prebuilt.folders() if f.name.startswith("tiny-alpha-"))
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(alpha, rebuilt)
    weights = load_file(str(alpha / "diffusion_pytorch_model.safetensors"))
    weights = {k: v * scale if k.startswith("proj_out.") else v for k, v in weights.items()}
    save_file(weights, str(rebuilt / "diffusion_pytorch_model.safetensors"))
    result = ship.compare(alpha, rebuilt)
    out = result["outputs"]["transformer"]
    assert out["rel_l2_diff"] == pytest.approx(scale - 1, rel=0.05)
    assert out["ok"] is ok and result["ok"] is ok
    assert result["figures"]["loss_last_50"]["ok"], "the same alpha.json: only the outputs differ"


@pytest.mark.slow
def test_a_rebuild_from_scratch_matches_the_shipped_models(tmp_path):
    """The documented command, in its own process (it starts its own Ray): ~10 CPU minutes."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("CATVTON_CACHE", None)
    run = subprocess.run([sys.executable, "-m", "catvton.offline.ship", "--check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    result = json.loads(run.stdout[run.stdout.index("{\n"):])
    assert set(result) == {f.name for f in prebuilt.folders()}, result
    assert all(r["ok"] for r in result.values()) and run.returncode == 0, result
