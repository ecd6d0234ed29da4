"""The inference section of the configuration: denoising settings and the speed levers (step caching,
a fused LoRA, torch.compile), with :func:`infer_problems`, its share of the validation.

A section of its own module (re-exported by :mod:`catvton.config.sections`) so that the sections file
stays under the project's size rule. The levers are applied in one place, where every try-on path
loads its pipeline (:meth:`catvton.infer.tryon.TryOn.load`, through :mod:`catvton.infer.levers`);
``bench/tryon_speed.py`` measures what each costs in quality and saves in transformer passes::

    python ray_jobs/evaluate.py --set infer.cache=first_block --set infer.first_block_threshold=0.1
"""

from __future__ import annotations

from dataclasses import dataclass, field

CACHE_KINDS = ("none", "first_block", "taylorseer", "mag")
"""The step caches of ``infer.cache`` (diffusers 0.42 hooks)."""


@dataclass
class InferConfig:
    steps: int = 28
    """Denoising steps at inference (30-50 in CatVTON-Flux's demo)."""
    guidance: float = 30.0
    """Guidance at inference; a model trained from scratch needs the training value."""
    seed: int = 0
    """Seed of the initial noise."""
    garment_guidance: float = 1.0
    """Classifier-free guidance on the garment: above 1, every step also runs with the garment half
    blanked and the result is pushed away from that garment-free prediction, so the person follows
    the garment given more closely (CatVTON's guidance). Needs a model trained with
    ``train.garment_dropout`` > 0; twice the transformer passes; 1 = off."""
    cache: str = "none"
    """Step caching, which reuses transformer work across denoising steps: ``none`` (every step a full
    pass; bit-identical to no lever), ``first_block`` (skip the other blocks while the first block's
    output changes little), ``taylorseer`` (a full pass every few steps, extrapolated in between) or
    ``mag`` (skip while the model's calibrated residual magnitudes say the step changes little).
    Faster, slightly different images; ``first_block`` decides per batch, so a result may depend on
    what it was batched with (the others decide per step)."""
    first_block_threshold: float = 0.1
    """first_block: the first block's relative output change under which the rest is reused; higher
    skips more and loses more (third-party FLUX.1-dev settings: 0.3-0.35)."""
    taylorseer_interval: int = 3
    """taylorseer: a full pass every this many steps after the warm-up; higher skips more."""
    taylorseer_warmup: int = 2
    """taylorseer: full passes at the start, before any extrapolation (at least 1)."""
    taylorseer_order: int = 1
    """taylorseer: order of the Taylor extrapolation between full passes (1: linear)."""
    mag_threshold: float = 0.06
    """mag: accumulated magnitude error allowed before a full pass is forced; higher skips more."""
    mag_max_skip: int = 3
    """mag: most consecutive steps skipped."""
    mag_retention: float = 0.2
    """mag: share of the first steps never skipped (the image's layout is decided there)."""
    mag_ratios: list[float] = field(default_factory=list)
    """mag: the model's residual magnitude ratio per step (``bench/tryon_speed.py`` prints them);
    empty: calibrated when the pipeline loads, with one uncached try-on of a seeded noise canvas."""
    fuse_lora: bool = False
    """Fold the LoRA into the base weights once at load (then unload the adapter layers): a LoRA
    try-on costs what the base costs; the LoRA can no longer be switched off in that process."""
    compile: bool = False
    """torch.compile the transformer's repeated blocks at load (GPU only: refused on CPU). The first
    try-on of each new canvas size pays the compilation."""


def infer_problems(infer: InferConfig) -> list[str]:
    """Every problem of the ``infer`` section (types are checked while loading)."""
    p: list[str] = []
    if infer.steps < 1:
        p.append(f"infer.steps={infer.steps}: must be at least 1")
    if infer.garment_guidance < 0:
        p.append(f"infer.garment_guidance={infer.garment_guidance}: must not be negative (1 = off)")
    if infer.garment_guidance != 1.0 and infer.cache != "none":
        p.append(f"infer.cache={infer.cache!r} with infer.garment_guidance={infer.garment_guidance}: a step cache "
                 "compares consecutive transformer calls, and guidance makes two calls a step; use one of them")
    if infer.cache not in CACHE_KINDS:
        p.append(f"infer.cache={infer.cache!r}: choose from {list(CACHE_KINDS)}")
    for name in ("first_block_threshold", "mag_threshold"):
        if not getattr(infer, name) > 0:
            p.append(f"infer.{name}={getattr(infer, name)}: must be positive (0 would never skip; "
                     "use infer.cache=none for no caching)")
    for name in ("taylorseer_interval", "taylorseer_warmup", "taylorseer_order", "mag_max_skip"):
        if getattr(infer, name) < 1:
            p.append(f"infer.{name}={getattr(infer, name)}: must be at least 1")
    if not 0.0 <= infer.mag_retention < 1.0:
        p.append(f"infer.mag_retention={infer.mag_retention}: a share of the steps, in [0, 1)")
    if any(not r > 0 for r in infer.mag_ratios):
        p.append(f"infer.mag_ratios={infer.mag_ratios}: magnitude ratios are positive (or leave it empty "
                 "to calibrate at load)")
    return p
