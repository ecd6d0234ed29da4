"""Evaluation metrics (FID/KID with an injected extractor), the VITON-HD reader, the sweep's
winner and release folder, and hub publishing (dry run, no token leaks). No Ray here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_lora
from PIL import Image

from catvton.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_TESTsecretTOKEN0123456789"


class TinyFeatures(torch.nn.Module):
    """A small fixed feature extractor standing in for Inception: colour statistics on a 4x4 grid."""

    num_features = 24

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(48, 24, generator=g) / 48, requires_grad=False)  # small features, as Inception-scale KID expects

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)  # (N, 48)
        return x @ self.proj


def test_fid_kid_through_an_injected_extractor():
    from catvton.eval.metrics import fid_kid

    rng = np.random.default_rng(0)
    real = rng.random((40, 32, 24, 3)).astype(np.float32)
    same = fid_kid(real, real.copy(), TinyFeatures())
    twin = fid_kid(real, rng.random((40, 32, 24, 3)).astype(np.float32), TinyFeatures())  # same distribution
    other = fid_kid(real, np.clip(real * 0.3 + 0.6, 0, 1), TinyFeatures())  # washed out: clearly different
    assert abs(same["fid"]) < 1e-6 and abs(same["kid"]) < 1e-4, same
    assert other["fid"] > 0.01 and other["kid"] > 1e-3, other
    assert other["fid"] > 20 * twin["fid"] and other["kid"] > 20 * twin["kid"], (other, twin)


def test_metrics_without_weights_are_reported_absent_not_faked():
    from catvton.eval.report import score_group

    rng = np.random.default_rng(1)
    canvas = rng.random((3, 32, 48, 3)).astype(np.float32)
    mask = np.zeros((3, 32, 48), np.float32)
    mask[:, 8:28, 30:44] = 1
    absent: dict[str, str] = {}
    scores = score_group(canvas, canvas, mask, None, absent)  # perfect results, no extractor
    assert scores["masked_psnr"] > 90 and scores["masked_ssim"] == pytest.approx(1.0)
    assert scores["half_psnr"] > 90 and scores["half_ssim"] == pytest.approx(1.0)
    # LPIPS needs torchvision, Inception's FID/KID torch-fidelity (and, with them, weights a download
    # may fail to bring): without the package a metric is absent with a reason naming it, never a number
    needs = {"lpips": ("torchvision", "torchvision"), "fid": ("torch_fidelity", "Inception"),
             "kid": ("torch_fidelity", "Inception")}
    for name, (package, named) in needs.items():
        assert (name in scores) != (name in absent), (name, scores, absent)
        if importlib.util.find_spec(package) is None:
            assert name in absent and name not in scores, (name, scores, absent)
        if name in absent:
            assert named in absent[name] and len(absent[name]) > 40, absent[name]
        elif name == "kid":  # scored on results that are the ground truth: a perfect result's value
            assert scores[name] < 1e-3, scores  # the unbiased estimate on two identical sets is at most 0
        else:
            assert abs(scores[name]) < {"lpips": 1e-3, "fid": 0.1}[name], (name, scores[name])  # 0, up to rounding
    with_extractor = score_group(canvas, canvas, mask, TinyFeatures(), {})
    assert abs(with_extractor["fid"]) < 1e-6 and "kid" in with_extractor


def write_viton(root: Path, names: list[str], size=(96, 128)) -> None:
    """A tiny folder in the VITON-HD layout: coloured tops on a grey person."""
    w, h = size
    for sub in ("image", "cloth", "agnostic-mask", "cloth-mask"):
        (root / "test" / sub).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        colour = (40 + 60 * i, 120, 200 - 50 * i)
        person = np.full((h, w, 3), 180, np.uint8)
        person[30:80, 20:76] = colour
        Image.fromarray(person).save(root / "test" / "image" / f"{name}.jpg")
        cloth = np.full((h, w, 3), 255, np.uint8)
        cloth[20:100, 15:80] = colour
        Image.fromarray(cloth).save(root / "test" / "cloth" / f"{name}.jpg")
        cmask = np.zeros((h, w), np.uint8)
        cmask[20:100, 15:80] = 255
        Image.fromarray(cmask).save(root / "test" / "cloth-mask" / f"{name}.jpg")
        agn = np.zeros((h, w), np.uint8)
        agn[25:85, 15:81] = 255
        Image.fromarray(agn).save(root / "test" / "agnostic-mask" / f"{name}_mask.png")
    lines = [f"{n}.jpg {names[(k + 1) % len(names)]}.jpg" for k, n in enumerate(names)]
    (root / "test_pairs.txt").write_text("\n".join(lines + ["ghost_00.jpg ghost_00.jpg"]) + "\n")


def test_viton_folder_reads_into_paired_upper_canvases(tmp_path):
    from catvton.eval.viton import VitonError, viton_samples

    cfg = load_config(ROOT / "configs/tiny.yaml")
    write_viton(tmp_path, ["000001_00", "000002_00", "000003_00"])
    s = viton_samples(tmp_path, cfg)["upper"]
    h, w = cfg.canvas.half_height, cfg.canvas.half_width
    assert s["canvas"].shape == (3, h, 2 * w, 3) and s["mask"].shape == (3, h, 2 * w)
    assert s["pid"] == ["000001_00", "000002_00", "000003_00"]
    assert s["skipped"] == {"ghost_00": "missing test/image/ghost_00.jpg, test/cloth/ghost_00.jpg, "
                                        "test/agnostic-mask/ghost_00_mask.png"}
    assert s["mask"][:, :, :w].max() == 0 and 0.1 < s["mask"][:, :, w:].mean() < 0.6
    # paired: the garment half shows the person's own colour (not the next line's cloth)
    for k in range(3):
        garment_px = s["canvas"][k, :, :w][s["canvas"][k, :, :w].sum(-1) < 2.9]
        person_px = s["canvas"][k, 50:60, w + 40:w + 56].reshape(-1, 3)
        assert np.abs(garment_px.mean(0) - person_px.mean(0)).max() < 0.08
    with pytest.raises(VitonError, match="test_pairs.txt"):
        viton_samples(tmp_path / "test", cfg)


def _row(trial, lr, rank, steps, val, status, weights=""):
    return {"trial": trial, "lr": lr, "rank": rank, "alpha": 2.0 * rank, "steps": steps, "val_loss": val,
            "best_val_loss": val, "status": status, "error": "", "weights_dir": weights, "run_dir": "",
            "curve": [(50, val + 0.1), (steps, val)]}


def test_max_concurrent_trials_follows_the_cluster():
    from catvton.train.sweep import max_concurrent_trials

    cfg = load_config(ROOT / "configs/tiny.yaml")  # 1 CPU worker per trial
    assert max_concurrent_trials(cfg, {"CPU": 2}) == 1  # one CPU stays free for Ray Data and Tune
    assert max_concurrent_trials(cfg, {"CPU": 16}) == 10
    gpu = load_config(ROOT / "configs/l40s.yaml")  # 4 L40S workers per trial
    assert max_concurrent_trials(gpu, {"CPU": 64, "GPU": 8}) == 2
    assert max_concurrent_trials(gpu, {"CPU": 64, "GPU": 2}) == 1
    gpu.tune.max_concurrent_trials = 3
    assert max_concurrent_trials(gpu, {"GPU": 8}) == 3


def test_trial_config_ties_alpha_to_rank(tmp_path):
    from catvton.train.sweep import trial_config

    cfg = load_config(ROOT / "configs/tiny.yaml")
    t = trial_config(cfg, 1e-3, 8, "trial-a", tmp_path)
    assert (t.train.lr, t.lora.rank, t.lora.alpha) == (1e-3, 8, 16.0)
    assert t.run.name == "trial-a" and Path(t.run.output_dir) == tmp_path / "trials"
    assert cfg.lora.rank == 32, "the sweep's own config is not modified"
    assert Path(t.run.storage_path) == tmp_path / "ray"  # a local sweep keeps its checkpoints in its folder
    cfg.run.storage_path = "s3://bucket/prefix/"
    remote = trial_config(cfg, 1e-3, 8, "trial-a", tmp_path / "my-sweep")
    assert remote.run.storage_path == "s3://bucket/prefix/my-sweep-trials"  # where every node can read them


def test_release_exports_the_completed_trial_with_the_lowest_val_loss(tmp_path):
    from catvton.train.sweep import RELEASE_FILES, export_release, pick_winner

    cfg = load_config(ROOT / "configs/tiny.yaml")
    weights = {}
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "pytorch_lora_weights.safetensors").write_bytes(name.encode())
        (d / "training_config.json").write_text("{}")
        weights[name] = str(d)
    rows = [_row("a", 4e-3, 32, 100, 0.50, "completed", weights["a"]),
            _row("b", 4e-3, 8, 100, 0.42, "completed", weights["b"]),
            _row("c", 2e-4, 32, 50, 0.30, "stopped early"),  # lower, but it did not finish
            _row("d", 2e-4, 8, 10, float("nan"), "error")]
    assert pick_winner(rows, "val_loss")["trial"] == "b"
    release = export_release(rows, tmp_path / "release", cfg)
    assert sorted(p.name for p in release.iterdir()) == sorted(RELEASE_FILES)
    assert (release / "pytorch_lora_weights.safetensors").read_bytes() == b"b"
    metrics = json.loads((release / "metrics.json").read_text())
    assert metrics["trial"] == "b" and metrics["val_loss"] == 0.42
    assert (metrics["trials"], metrics["completed"], metrics["stopped_early"]) == (4, 2, 1)
    table = (release / "trials.csv").read_text().splitlines()
    assert table[0].startswith("trial,lr,rank,alpha,steps,val_loss") and len(table) == 5
    assert Image.open(release / "sweep.png").size[0] > 500
    with pytest.raises(RuntimeError, match="no trial of the sweep completed"):
        pick_winner([r for r in rows if r["status"] != "completed"], "val_loss")


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    """A LoRA on the tiny base (random, non-zero B) with sweep metrics and an evaluation report."""
    from catvton.offline.tiny_base import ensure_tiny_base
    tmp = tmp_path_factory.mktemp("lora")
    cfg = load_config(ROOT / "configs/tiny.yaml", ["model.transformer_override=null", "lora.rank=4", "lora.alpha=8.0"])
    cfg.model.base = str(ensure_tiny_base())
    folder = random_lora(cfg, tmp / "release")
    (folder / "training_config.json").write_text(json.dumps(cfg.to_dict()))
    (folder / "metrics.json").write_text(json.dumps({"trial": "t1", "lr": 4e-3, "rank": 4, "val_loss": 0.4321,
                                                     "metric": "val_loss", "sweep": "s", "trials": 4,
                                                     "completed": 2, "stopped_early": 2}))
    (folder / "eval").mkdir()
    report = {"source": "synthetic test split",
              "groups": {"lower": {"pairs": 12, "pids": 6, "metrics": ["masked_psnr", "half_ssim"],
                                   "base": {"masked_psnr": 12.5, "half_ssim": 0.8}, "lora": {"masked_psnr": 15.25, "half_ssim": 0.85},
                                   "grey": {"masked_psnr": 9.0, "half_ssim": 0.7},
                                   "delta": {"masked_psnr": 2.75, "half_ssim": 0.05}}},
              "absent": {"lpips": "needs torchvision"}}
    (folder / "eval" / "report.json").write_text(json.dumps(report))
    (folder / "eval" / "report.md").write_text("# report\n")
    (folder / "eval" / "grid_lower.png").write_bytes(b"png")
    (folder / "eval" / "scratch.npy").write_bytes(b"not for upload")
    return folder, cfg


def test_dry_run_writes_the_upload_folder_and_leaks_no_token(lora_folder, tmp_path):
    folder, cfg = lora_folder
    out = tmp_path / "upload"
    env = {**__import__("os").environ, "HF_TOKEN": SECRET}
    proc = subprocess.run([sys.executable, str(ROOT / "ray_jobs/publish.py"), "--lora", str(folder),
                           "--hub-model-id", "someone/catvton-bottoms", "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    # trained on the synthetic rows: a dry run uploads nothing, so it goes on and says a push would be refused
    assert "note: a real push would be refused: this LoRA was trained on synthetic rows" in proc.stdout
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["README.md", "eval/grid_lower.png", "eval/report.json", "eval/report.md", "metrics.json",
                     "pytorch_lora_weights.safetensors", "training_config.json"]
    for p in out.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p
    card = (out / "README.md").read_text()
    assert "base_model:" in card and 'pipe.load_lora_weights("someone/catvton-bottoms")' in card
    assert "| lower (12 pairs) | masked_psnr | 12.5000 | 15.2500 | +2.7500 | 9.0000 |" in card
    assert "| lower (12 pairs) | half_ssim | 0.8000 | 0.8500 | +0.0500 | 0.7000 |" in card
    assert "`masked_*` inside the try-on mask, `half_*` over the whole half" in card
    assert "| val_loss | 0.4321 |" in card and "LoRA rank / alpha | 4 / 8" in card
    assert "`lpips` not computed" in card
    assert "**Trained on synthetic rows**" in card

    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline.from_pretrained(cfg.model.base)
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=torch.randn(1, 24, 384, generator=g), timestep=torch.tensor([0.5]),
                  guidance=torch.ones(1), pooled_projections=torch.randn(1, 32, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g), txt_ids=torch.zeros(8, 3),
                  img_ids=torch.rand(24, 3), return_dict=False)
    with torch.no_grad():
        before = pipe.transformer.eval()(**kwargs)[0]
        pipe.load_lora_weights(str(out))
        after = pipe.transformer.eval()(**kwargs)[0]
    assert pipe.get_list_adapters()["transformer"], "the uploaded LoRA loads with load_lora_weights"
    assert (after - before).abs().max() > 1e-3, "and it changes the transformer's output"


def test_push_uses_the_environment_token_and_never_logs_it(lora_folder, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from catvton.publish import PublishError, build_upload_folder, push

    folder = build_upload_folder(lora_folder[0], tmp_path / "up", "someone/catvton-bottoms")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(PublishError, match="HF_TOKEN"):
        push(folder, "someone/catvton-bottoms", allow_synthetic=True)
    with pytest.raises(PublishError, match="<user or org>/<name>"):
        push(folder, "no-slash", allow_synthetic=True)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    url = push(folder, "someone/catvton-bottoms", allow_synthetic=True)  # the fixture's LoRA: synthetic rows
    assert url == "https://huggingface.co/someone/catvton-bottoms"
    assert calls[0] == ("token", SECRET) and calls[1] == ("create", "someone/catvton-bottoms")
    assert calls[2][0] == "upload" and "pytorch_lora_weights.safetensors" in calls[2][2]
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err


def _publish_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("publish_job", ROOT / "ray_jobs" / "publish.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_lora_trained_on_synthetic_rows_is_published_only_when_allowed(lora_folder, tmp_path, monkeypatch, capsys):
    """``data.source: synthetic`` in the LoRA's training config: push and ray_jobs/publish.py refuse it,
    saying why and what to do, before any call to the hub; ``--allow-synthetic`` publishes it; a dry run
    with the flag writes the folder without the note."""
    import huggingface_hub

    from catvton.publish import PublishError, build_upload_folder, push

    folder, _ = lora_folder
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append("api")

        def create_repo(self, repo_id, **kw):
            calls.append("create")

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append("upload")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    upload = build_upload_folder(folder, tmp_path / "up", "someone/catvton-bottoms")
    with pytest.raises(PublishError) as refused:
        push(upload, "someone/catvton-bottoms")
    message = str(refused.value)
    for what in ("trained on synthetic rows", "data.source: synthetic", "--config configs/l40s.yaml",
                 "--allow-synthetic"):
        assert what in message, (what, message)
    assert calls == [], "refused before the hub is asked for anything"

    job = _publish_job()
    args = ["--lora", str(folder), "--hub-model-id", "someone/catvton-bottoms", "--out", str(tmp_path / "job")]
    assert job.main(args) == 2
    assert "trained on synthetic rows" in capsys.readouterr().err and calls == []
    assert job.main(args + ["--allow-synthetic"]) == 0
    assert calls == ["api", "create", "upload"]
    assert "published: https://huggingface.co/someone/catvton-bottoms" in capsys.readouterr().out
    assert job.main(args + ["--dry-run", "--allow-synthetic", "--out", str(tmp_path / "dry")]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing uploaded" in out and "note:" not in out
    assert (tmp_path / "dry" / "pytorch_lora_weights.safetensors").is_file() and len(calls) == 3


def test_the_model_cards_usage_snippet_runs_as_written(lora_folder, tmp_path):
    """The card's Python block, extracted from a dry-run card and run as a script, offline, on the
    tiny base the LoRA was trained on. The only edit: the card loads the LoRA by its hub id
    (someone/catvton-bottoms, not uploaded), so the test puts the dry-run folder in its place
    (load_lora_weights takes either). Run again without the LoRA line: the LoRA changes the
    try-on, and outside the mask every pixel is the person's."""
    import os
    import re

    from catvton.publish import build_upload_folder

    folder, cfg = lora_folder
    upload = build_upload_folder(folder, tmp_path / "upload", "someone/catvton-bottoms")
    blocks = re.findall(r"```python\n(.*?)```", (upload / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    lora_line = 'pipe.load_lora_weights("someone/catvton-bottoms")\n'
    assert blocks[0].count(lora_line) == 1
    snippet = blocks[0].replace(lora_line, f"pipe.load_lora_weights({str(upload)!r})\n")

    w, h = cfg.canvas.half_width, cfg.canvas.half_height
    rng = np.random.default_rng(0)
    region = np.zeros((160, 120), np.uint8)
    region[70:150, 25:95] = 255  # lower body
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs = {"lora": snippet, "base": snippet.replace(f"pipe.load_lora_weights({str(upload)!r})\n", "")}
    for name, code in runs.items():
        run = tmp_path / name
        run.mkdir()
        Image.fromarray(rng.integers(0, 255, (200, 150, 3), dtype=np.uint8)).save(run / "garment.jpg")
        Image.fromarray(np.full((160, 120, 3), (200, 150, 120), np.uint8)).save(run / "person.jpg")
        Image.fromarray(region).save(run / "person_mask.png")
        (run / "snippet.py").write_text(code)
    # each snippet run as a script (its own globals, in its own folder), both in one process: one
    # interpreter's start and imports instead of two
    (tmp_path / "run_both.py").write_text("import os, runpy, sys\nfor folder in sys.argv[1:]:\n"
                                          "    os.chdir(folder)\n    runpy.run_path('snippet.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, str(tmp_path / "run_both.py"), *(str(tmp_path / n) for n in runs)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {name: np.asarray(Image.open(tmp_path / name / "tryon.png").convert("RGB")) for name in runs}
    person = np.asarray(Image.open(tmp_path / "lora" / "person.jpg").convert("RGB").resize((w, h)))
    inside = np.asarray(Image.open(tmp_path / "lora" / "person_mask.png").convert("L").resize((w, h)))
    assert results["lora"].shape == (h, w, 3)
    outside = inside == 0
    assert outside.sum() > 0.5 * w * h
    for result in results.values():
        assert np.array_equal(result[outside], person[outside]), "outside the mask: the person's own pixels"
    full = inside == 255
    assert not np.array_equal(results["lora"][full], results["base"][full]), "the LoRA changes the try-on"


def test_full_refuses_a_push_it_could_not_do_before_training(monkeypatch):
    """Refused with exit code 2 before any Ray or data work, every problem in one report (in this
    process: the command reads the token from its environment when it runs)."""
    from typer.testing import CliRunner

    from easy_train import app

    def full(*args: str):
        result = CliRunner().invoke(app, ["full", "--epochs", "1", *args])
        assert isinstance(result.exception, SystemExit), result.output  # typer's exit, not a crash
        return result

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    no_token = full("--push-to-hub", "--hub-model-id", "a/b")
    assert no_token.exit_code == 2 and "HF_TOKEN" in no_token.stderr
    # the offline default trains on synthetic rows: refused too, in the same report (every problem at once)
    assert "trained on synthetic rows" in no_token.stderr and "--allow-synthetic" in no_token.stderr
    bad_id = full("--push-to-hub", "--hub-model-id", "nope")
    assert bad_id.exit_code == 2 and "<user or org>/<name>" in bad_id.stderr
    id_only = full("--hub-model-id", "a/b")
    assert id_only.exit_code == 2 and "--push-to-hub" in id_only.stderr
    monkeypatch.setenv("HF_TOKEN", SECRET)
    synthetic = full("--push-to-hub", "--hub-model-id", "a/b")
    assert synthetic.exit_code == 2 and "trained on synthetic rows" in synthetic.stderr
    assert "HF_TOKEN" not in synthetic.stderr and SECRET not in synthetic.output


def test_a_ray_job_with_relative_run_folders_is_warned(tmp_path):
    from catvton.train.job import ephemeral_paths_warning

    cfg = load_config(ROOT / "configs/tiny.yaml")
    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_dir.mkdir(parents=True)
    warning = ephemeral_paths_warning(cfg, cwd=job_dir)
    assert "run.output_dir=outputs" in warning and "run.storage_path=outputs/ray" in warning
    assert ephemeral_paths_warning(cfg, cwd=tmp_path) is None, "a normal checkout is not warned"
    cfg.run.output_dir, cfg.run.storage_path = "/mnt/shared/outputs", "s3://bucket/ray"
    assert ephemeral_paths_warning(cfg, cwd=job_dir) is None
