"""The tiny "alpha" transformer: a miniature of CatVTON-Flux's try-on fine-tune.

The real story: FLUX.1-Fill-dev was fully fine-tuned into ``xiaozaa/catvton-flux-alpha`` on
upper-body try-on pairs, and this project teaches it bottoms with a LoRA. Offline, the tiny base
gets the same history: its transformer is fully fine-tuned (``method: full``) on **upper-body**
synthetic pairs, once, and cached in the transformer-override layout (``config.json`` and
weights at the folder's root, like the hub checkpoint). The default job then trains a LoRA on
lower-body and full pairs on top of it.

    python -m catvton.offline.alpha        # build (or find) it and print the folder
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from catvton.artifacts import ALPHA_INFO, build_once, cache_root, content_hash, source_digest
from catvton.cache.build import build_latent_cache
from catvton.cache.read import load_manifest
from catvton.config import Config, RunOptions, TrainConfig, config_from_dict
from catvton.data.source import SYNTHETIC
from catvton.model.loading import resolve_base
from catvton.offline import prebuilt
from catvton.offline.synthetic import ensure_synthetic_dataset
from catvton.train.plain import train_plain

BUILDER = "catvton.offline.alpha"
"""The alpha's builder: its source and every module it imports (training step, loss, flow, plain loop,
latent cache, masks, canvas, pairs) are part of its key (:func:`catvton.artifacts.source_digest`)."""

ALPHA_STEPS = 2000
"""Full fine-tuning steps on upper-body pairs (about 2 CPU minutes at batch 8). Transfer grows
with them: the own-vs-swapped garment margin on held-out tops was 0.8 dB after 500 steps, 1.6 dB
after 1500 and 1.8 dB after 5000 (with the colour-losing VAE of before)."""


ALPHA_DATA = {"synthetic_pids": 720, "val_fraction": 0.05, "test_fraction": 0.2, "seed": 0}
"""The synthetic set the alpha learns from, whatever a job's own ``data`` says (the preset's set). The
real alpha is a checkpoint a job starts from, not something its data decides; so is this one: a
job on 40 synthetic items (the tests') starts from the same alpha as the default job. Splits are
per-item coins (:func:`catvton.data.pairs.split_of`), so a test pid of any job with
``test_fraction`` 0.2 is a test pid here too: never trained on."""


def alpha_config(cfg: Config) -> Config:
    """The config the alpha is trained with: upper-body pairs only (of :data:`ALPHA_DATA`'s
    synthetic set when the job's data is synthetic), the whole transformer."""
    a = config_from_dict(cfg.to_dict())  # a deep copy
    a.data.groups, a.data.upper_share = ["upper"], 0.0
    if a.data.source == SYNTHETIC:
        for key, value in ALPHA_DATA.items():
            setattr(a.data, key, value)
    a.model.transformer_override = None
    # Everything about training is fixed here, so the job's own training knobs (steps, lr, run
    # name...) neither change the alpha nor its cache key.
    a.train = TrainConfig(method="full", lr=1e-3, batch_size=8, grad_accum=1, warmup_steps=50,
                          schedule="cosine", gradient_checkpointing=False, precision="fp32", use_gpu=False,
                          seed=0)  # one alpha for every LoRA seed: the model we start from
    a.run = RunOptions(name="tiny-alpha")
    return a


def alpha_key(cfg: Config) -> str:
    """Cache folder name: ``tiny-alpha-<hash of what the alpha is trained from and with>``.
    ``cfg.model.base`` must be the tiny base's folder (:func:`catvton.offline.resolve` does it)."""
    a = alpha_config(cfg)
    d = a.to_dict()
    params = {"source": source_digest(BUILDER), "base": Path(resolve_base(cfg.model.base)).name, "steps": ALPHA_STEPS,
              "data": d["data"], "canvas": d["canvas"], "mask": d["mask"],
              "train": d["train"], "prompt": a.model.prompt, "seq": a.model.max_sequence_length}
    return f"tiny-alpha-{content_hash(params)}"


def _drop_machine_path(config: Path) -> None:
    """diffusers records the folder a model was loaded from (``_name_or_path``: here the base in this
    machine's cache) in the config it saves; the alpha is shipped, so it names no machine's folder."""
    d = json.loads(config.read_text())
    d.pop("_name_or_path", None)
    config.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def is_alpha(folder: Path) -> bool:
    return (Path(folder) / ALPHA_INFO).is_file()


def ensure_tiny_alpha(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """The cached alpha transformer folder for this config's data and canvas, copied on first use
    from the repository's shipped one (:mod:`catvton.offline.prebuilt`) when its key matches, else built
    through :func:`catvton.artifacts.build_once`. Needs Ray (the latent cache is built with Ray
    Data) and a resolved base folder in ``cfg.model.base``."""
    final = cache_root() / alpha_key(cfg)
    if is_alpha(final):
        return final

    def build(tmp: Path) -> None:
        src = prebuilt.shipped(final.name)
        if src is not None:
            log(f"tiny alpha: copying the one shipped in the repository into {final} "
                f"({prebuilt.SWITCH}=0 trains it instead)")
            prebuilt.copy_into(src, tmp)
            return
        a = alpha_config(cfg)
        log(f"building the tiny alpha transformer (full fine-tune on upper-body pairs, {ALPHA_STEPS} steps) "
            f"into {final}; once, cached afterwards")
        if a.data.source == SYNTHETIC:
            ensure_synthetic_dataset(cache_root(), a.data.synthetic_pids, a.data.synthetic_image_size, a.data.seed)
        cache = build_latent_cache(a)
        model, history = train_plain(a, cache, ALPHA_STEPS, log=log)
        model.save_pretrained(tmp)
        _drop_machine_path(tmp / "config.json")
        first = sum(h["loss"] for h in history[:50]) / 50
        last = sum(h["loss"] for h in history[-50:]) / 50
        (tmp / ALPHA_INFO).write_text(json.dumps({
            "source": source_digest(BUILDER), "steps": ALPHA_STEPS, "latent_cache": cache.name,
            "pairs": load_manifest(cache)["counts"]["train"],  # what it learnt from, kept with it when shipped
            "loss_first_50": first, "loss_last_50": last}, indent=2) + "\n")
        log(f"alpha trained: loss {first:.4f} -> {last:.4f}")

    return build_once(final, build, is_alpha, log=log, what="tiny alpha")


if __name__ == "__main__":
    import argparse

    from catvton.config import load_config
    from catvton.offline import resolve
    from catvton.ray_utils import init_ray

    root = Path(__file__).resolve().parents[2]
    p = argparse.ArgumentParser(description="Build (or find) the tiny alpha transformer for a config.")
    p.add_argument("--config", default=str(root / "configs" / "tiny.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    init_ray()
    print(resolve(load_config(args.config, args.set + ["model.transformer_override=tiny-alpha"])).model.transformer_override)
