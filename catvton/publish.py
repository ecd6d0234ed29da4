"""Publish a LoRA to the Hugging Face Hub: the upload folder (weights, model card, metrics) and
the upload itself.

The upload folder is built from a release folder (``ray_jobs/tune.py``) or any LoRA folder
(``<run>/lora`` from ``ray_jobs/train.py``): ``pytorch_lora_weights.safetensors`` plus, when
present, ``training_config.json``, ``metrics.json``, the sweep's table and plot and the
evaluation report (``eval/report.md``, ``eval/report.json``, ``eval/grid_<group>.png``).
``--dry-run`` writes exactly that folder and uploads nothing. The token comes from ``HF_TOKEN``
(or ``HUGGING_FACE_HUB_TOKEN``) and is never printed, logged or written. A LoRA trained on the
synthetic rows (``data.source: synthetic``, the offline default) is a rehearsal, not a try-on
model: :func:`push` refuses it unless the caller allows it explicitly (``--allow-synthetic``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from catvton.artifacts import LORA_WEIGHTS, METRICS, REPORT_JSON, REPORT_MD, TRAINING_CONFIG
from catvton.config import Config, ModelConfig, config_from_dict
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


def check_data_source(source: str | None, allow_synthetic: bool = False) -> None:
    """Refuse to publish a LoRA trained on ``source`` when it is the synthetic set, unless
    ``allow_synthetic``. ``source``: the run's ``data.source`` (None: unknown, allowed)."""
    if source == "synthetic" and not allow_synthetic:
        raise PublishError(
            "this LoRA was trained on synthetic rows (data.source: synthetic, the offline default of "
            "configs/tiny.yaml): a rehearsal of the pipeline that has never seen a photo, which a Hub repo would "
            "present as a try-on model. Train on the real data first (--config configs/l40s.yaml, or --set "
            f"data.source={HUB_DATASET_ID}), or pass --allow-synthetic to publish this one anyway")


def trained_data_source(folder: str | Path) -> str | None:
    """``data.source`` of the run whose weights are in ``folder`` (its training config), or None."""
    return _read_json(Path(folder) / TRAINING_CONFIG).get("data", {}).get("source")


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
    ]
    if cfg and cfg.data.source == "synthetic":
        lines += ["**Trained on synthetic rows**: a rehearsal of the training pipeline on procedurally drawn "
                  "figures, not a try-on model for photos.", ""]
    lines += [
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
            f"{cfg.mask.lower_rule}, full: {cfg.mask.full_rule})"
            + (", so pants, shorts and skirts share one mask" if cfg.mask.lower_rule == "box_to_bottom" else
               "; the mask follows the worn garment's outline, so a garment of another shape may not fit it"),
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
    lines += ["", "## Usage", "", "```python", *usage_snippet(cfg, base, override, repo_id), "```", ""]
    return "\n".join(lines)


def usage_snippet(cfg: Config | None, base: str, override: str | None, repo_id: str) -> list[str]:
    """A self-contained Python snippet (lines) that dresses ``person.jpg`` in ``garment.jpg`` with
    this LoRA: the canvas, mask, prompt and sampler settings of the training config (FLUX's when
    there is none), the generated region pasted back onto the person."""
    w, h = (cfg.canvas.half_width, cfg.canvas.half_height) if cfg else (768, 1024)
    prompt = cfg.model.prompt if cfg else ModelConfig().prompt
    tokens = cfg.model.max_sequence_length if cfg else ModelConfig().max_sequence_length
    steps, guidance = (cfg.infer.steps, cfg.infer.guidance) if cfg else (28, 30.0)
    q = json.dumps  # a double-quoted Python string literal
    lines = [
        "import torch",
        "from diffusers import FluxFillPipeline" + (", FluxTransformer2DModel" if override else ""),
        "from PIL import Image",
        "",
        'device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)',
    ]
    if override:
        lines += [f"transformer = FluxTransformer2DModel.from_pretrained({q(override)}, dtype=dtype)",
                  f"pipe = FluxFillPipeline.from_pretrained({q(base)}, transformer=transformer, dtype=dtype)"]
    else:
        lines.append(f"pipe = FluxFillPipeline.from_pretrained({q(base)}, dtype=dtype)")
    return lines + [
        f"pipe.load_lora_weights({q(repo_id)})",
        "pipe.to(device)",
        "",
        f"W, H = {w}, {h}  # one half of the training canvas",
        f"PROMPT = {q(prompt)}",
        'garment = Image.open("garment.jpg").convert("RGB").resize((W, H))  # the garment on its own',
        'person = Image.open("person.jpg").convert("RGB").resize((W, H))  # the person to dress',
        'region = Image.open("person_mask.png").convert("L").resize((W, H))  # white where the garment goes',
        'canvas = Image.new("RGB", (2 * W, H))  # [garment | person]',
        "canvas.paste(garment, (0, 0))",
        "canvas.paste(person, (W, 0))",
        'mask = Image.new("L", (2 * W, H), 0)  # [nothing | region]',
        "mask.paste(region, (W, 0))",
        "result = pipe(prompt=PROMPT, image=canvas, mask_image=mask, height=H, width=2 * W,",
        f"              num_inference_steps={steps}, guidance_scale={guidance}, max_sequence_length={tokens},",
        '              generator=torch.Generator("cpu").manual_seed(0)).images[0]',
        "# the person's own pixels outside the region, the generated ones inside it",
        "tryon = Image.composite(result.crop((W, 0, 2 * W, H)), person, region)",
        'tryon.save("tryon.png")',
    ]


def push(folder: str | Path, repo_id: str, private: bool = False, allow_synthetic: bool = False) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing); returns its URL.
    Refuses a LoRA trained on the synthetic rows unless ``allow_synthetic``
    (:func:`check_data_source`)."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    check_data_source(trained_data_source(folder), allow_synthetic)
    api = HfApi(token=hub_token())
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="CatVTON-Flux LoRA: weights, model card, metrics")
    return f"https://huggingface.co/{repo_id}"
