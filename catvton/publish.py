"""Publish a LoRA to the Hugging Face Hub: the upload folder (weights, model card, metrics) and
the upload itself.

The upload folder is built from a release folder (``ray_jobs/tune.py``) or any LoRA folder
(``<run>/lora`` from ``ray_jobs/train.py``): ``pytorch_lora_weights.safetensors`` plus, when
present, ``training_config.json``, ``metrics.json``, the sweep's table and plot and the
evaluation report (``eval/report.md``, ``eval/report.json``, ``eval/grid_<group>.png``).
``--dry-run`` writes exactly that folder and uploads nothing. The token comes from ``HF_TOKEN``
(or ``HUGGING_FACE_HUB_TOKEN``) and is never printed, logged or written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from catvton.artifacts import LORA_WEIGHTS, METRICS, REPORT_JSON, REPORT_MD, TRAINING_CONFIG
from catvton.config import config_from_dict
from catvton.eval.report import evaluation_table
from catvton.schema import HUB_DATASET_ID

OPTIONAL = (TRAINING_CONFIG, METRICS, "trials.csv", "trials.json", "sweep.png")
EVAL_FILES = (REPORT_MD, REPORT_JSON)
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PublishError(ValueError):
    """What is missing or wrong, and what to do."""


def hub_token() -> str:
    for name in TOKEN_ENV:
        if os.environ.get(name):
            return os.environ[name]
    raise PublishError("no Hugging Face token: set HF_TOKEN in the environment (a write token from "
                       "https://huggingface.co/settings/tokens); it is read from there and never stored")


def check_repo_id(repo_id: str | None) -> str:
    if not repo_id or not REPO_ID.match(repo_id):
        raise PublishError(f"--hub-model-id {repo_id!r}: give the repo as <user or org>/<name>, "
                           "e.g. you/catvton-flux-bottoms-lora")
    return repo_id


def build_upload_folder(lora_dir: str | Path, out: str | Path, repo_id: str) -> Path:
    """Write the folder that would be uploaded (replacing ``out``) and return it."""
    src, out = Path(lora_dir), Path(out)
    check_repo_id(repo_id)
    if not (src / LORA_WEIGHTS).is_file():
        raise PublishError(f"{src} has no {LORA_WEIGHTS}: give a release folder (ray_jobs/tune.py) or a run's "
                           "lora/ folder (ray_jobs/train.py)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(src / LORA_WEIGHTS, out / LORA_WEIGHTS)
    for name in OPTIONAL:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if (src / "eval").is_dir():
        (out / "eval").mkdir()
        for f in sorted((src / "eval").iterdir()):
            if f.name in EVAL_FILES or (f.suffix == ".png" and f.name.startswith("grid_")):
                shutil.copy2(f, out / "eval" / f.name)
    (out / "README.md").write_text(model_card(out, repo_id))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def model_card(folder: Path, repo_id: str) -> str:
    """A Hub model card: front matter, what it is, data and rules, hyperparameters, sweep and
    evaluation tables, and how to use it."""
    cfg_dict = _read_json(folder / TRAINING_CONFIG)
    cfg = config_from_dict(cfg_dict) if cfg_dict else None
    metrics = _read_json(folder / METRICS)
    report = _read_json(folder / "eval" / REPORT_JSON)
    base = cfg.model.base if cfg else "black-forest-labs/FLUX.1-Fill-dev"
    override = cfg.model.transformer_override if cfg else None
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {base}",
        "tags: [lora, virtual-try-on, flux, catvton, text-to-image, image-to-image]",
        "license: other",
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        "A LoRA that teaches the CatVTON-Flux try-on model (FLUX.1-Fill-dev with a try-on fine-tune) "
        "lower-body garments and dresses: pants, jeans, shorts, skirts and full dresses, while keeping tops.",
        "",
        f"- Base: `{base}`" + (f", transformer replaced by `{override}`" if override else ""),
    ]
    if cfg:
        d, c, lo, t = cfg.data, cfg.canvas, cfg.lora, cfg.train
        source = d.source if d.source != "synthetic" else f"synthetic rows in the schema of {HUB_DATASET_ID}"
        lines += [
            f"- Data: `{source}`; groups {d.groups} plus {d.upper_share:.0%} of the upper-body items; "
            f"split by item id (val {d.val_fraction:.0%}, test {d.test_fraction:.0%}, no item in two splits)",
            f"- Pairs: the garment from one view of an item ({', '.join(d.garment_views[:3])}, ...), the person "
            "from another view of the same item; the garment cut out by its mask",
            f"- Masks: the dataset's garment mask generalised per group (upper: {cfg.mask.upper_rule}, lower: "
            f"{cfg.mask.lower_rule}, full: {cfg.mask.full_rule}), so pants, shorts and skirts share one mask",
            f"- Canvas: [garment | person], {c.half_width}x{c.half_height} per half",
            "",
            "## Training",
            "",
            "| setting | value |",
            "|---|---|",
            f"| method | {t.method} |",
            f"| LoRA rank / alpha | {lo.rank} / {lo.alpha:g} ({lo.targets}) |",
            f"| learning rate | {t.lr:.2e} ({t.schedule}, {t.warmup_steps} warmup steps) |",
            f"| batch | {t.batch_size} x {t.grad_accum} accumulation x {t.num_workers} workers |",
            f"| steps | {t.max_steps or f'{t.epochs} epochs'} |",
            f"| precision | {t.precision}, gradient checkpointing {t.gradient_checkpointing} |",
            f"| loss region | {t.loss_region}, timesteps {t.timesteps} |",
        ]
    if metrics:
        lines += ["", "## Sweep", ""]
        if "trials" in metrics:
            lines.append(f"Winner of a Ray Tune sweep (`{metrics.get('sweep')}`): {metrics['trials']} trials, "
                         f"{metrics.get('completed')} completed, {metrics.get('stopped_early')} stopped early by "
                         f"ASHA on `{metrics.get('metric')}`. Full table: `trials.csv`; plot: `sweep.png`.")
            lines.append("")
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in shown.items()]
    if report:
        lines += ["", "## Evaluation", "",
                  f"Held-out pairs ({report.get('source') or 'test split'}): the base, the base + this LoRA and a "
                  "grey fill of the masked region (the trivial reference), one seed per pair "
                  "(`catvton.eval.report.evaluate`; `eval/report.md` has the grids).", "",
                  evaluation_table(report)]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from diffusers import FluxFillPipeline, FluxTransformer2DModel",
        "",
    ]
    if override:
        lines += [f'transformer = FluxTransformer2DModel.from_pretrained("{override}", torch_dtype=torch.bfloat16)',
                  f'pipe = FluxFillPipeline.from_pretrained("{base}", transformer=transformer, torch_dtype=torch.bfloat16)']
    else:
        lines.append(f'pipe = FluxFillPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16)')
    lines += [
        f'pipe.load_lora_weights("{repo_id}")',
        "pipe.to(\"cuda\")",
        "# image: [garment | person] side by side; mask_image: white over the garment region of the person half",
        "result = pipe(prompt=PROMPT, image=canvas, mask_image=mask, height=H, width=2 * W,",
        "              num_inference_steps=28, guidance_scale=30.0).images[0]",
        "```",
        "",
        "Paste the generated masked region back onto the person: pixels outside the mask stay the input's.",
        "",
    ]
    return "\n".join(lines)


def push(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing); returns its URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    api = HfApi(token=hub_token())
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="CatVTON-Flux LoRA: weights, model card, metrics")
    return f"https://huggingface.co/{repo_id}"
