"""The configuration's sections: one dataclass per concern, a docstring under every field,
defaults that describe the production plan, and :func:`validate` (every problem at once).

Loading (YAML, dotted overrides, type checks) is :mod:`catvton.config.loader`; import both
from :mod:`catvton.config`.

Typed configuration: one dataclass per concern, defaults in code, YAML presets, dotted overrides.

Code defaults describe the production plan (FLUX.1-Fill-dev, 768x1024 per half, the hub dataset).
``configs/tiny.yaml`` switches everything to the offline CPU default. A YAML file only sets values;
``section.field=value`` overrides go on top; every problem is collected and raised at once::

    cfg = load_config("configs/l40s.yaml", ["train.lr=1e-4", "data.groups=[lower]"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from catvton.config.inference import InferConfig, infer_problems
from catvton.schema import GROUPS, HUB_DATASET_ID, VIEW_NAMES


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


@dataclass
class DataConfig:
    source: str = HUB_DATASET_ID
    """Where rows come from: a hub dataset id (read as hub parquet), a local folder in the hub
    layout (``data/train-*.parquet``), or ``synthetic`` (procedural rows, built offline)."""
    synthetic_pids: int = 480
    """Items (pids) in the synthetic set; each is photographed in 3-6 views."""
    synthetic_image_size: int = 256
    """Side of the square synthetic photos (the real ones are reported as 512)."""
    seed: int = 0
    """Seed of everything random in the data: synthetic rows, splits, the upper-body share."""
    val_fraction: float = 0.1
    """Share of pids held out for validation (split by pid: no pid is in two splits)."""
    test_fraction: float = 0.1
    """Share of pids held out for testing."""
    groups: list[str] = field(default_factory=lambda: ["lower", "full"])
    """Garment groups to train on, from upper / lower / full."""
    upper_share: float = 0.2
    """Share of upper-body pids kept besides ``groups``, so that tops keep working."""
    garment_views: list[str] = field(
        default_factory=lambda: ["front", "full", "flat", "side", "back", "additional", "zoom"]
    )
    """Views to take the garment from, best first; the person comes from another view."""
    min_mask_fraction: float = 0.002
    """A mask covering less of the image than this is rejected as empty."""
    max_mask_fraction: float = 0.95
    """A mask covering more of the image than this is rejected as (almost) the whole image."""
    min_pairs_per_group: int = 200
    """Fewer training pairs than this in a trained group makes the readiness verdict false."""


@dataclass
class CanvasConfig:
    half_width: int = 768
    """Width of each half (garment | person) in pixels; a multiple of 16."""
    half_height: int = 1024
    """Height of each half in pixels; a multiple of 16."""
    person_fit: str = "pad"
    """How a photo of another aspect is fitted to the half: ``pad`` (white borders, nothing
    lost) or ``crop`` (centre crop, fills the frame but may cut arms)."""
    garment_margin: float = 0.05
    """White margin around the garment cut-out, as a share of the half's height."""


@dataclass
class MaskConfig:
    dilation: float = 0.03
    """Dilation radius as a share of the image height: hides the garment's exact outline."""
    upper_rule: str = "hull"
    """General-mask rule for tops: ``dilate``, ``hull`` (convex hull) or ``box``/``box_to_bottom``."""
    lower_rule: str = "box_to_bottom"
    """Rule for pants/shorts/skirts: ``box_to_bottom`` makes shorts, skirts and pants on the
    same person the same mask (waist to the bottom of the frame), so its shape tells nothing."""
    full_rule: str = "box_to_bottom"
    """Rule for dresses and jumpsuits."""
    box_margin: float = 0.04
    """Extra width each side of a box rule, as a share of the image width."""
    box_min_width: float = 0.45
    """A box is at least this share of the image width (centred on the garment), so a flared
    skirt and straight pants on one person give the same box."""


@dataclass
class ModelConfig:
    base: str = "black-forest-labs/FLUX.1-Fill-dev"
    """The FLUX Fill base: a hub id, a local folder in the diffusers layout, or ``tiny`` (the
    offline tiny base, built once and cached)."""
    transformer_override: str | None = "xiaozaa/catvton-flux-alpha"
    """A full transformer checkpoint replacing the base's ``transformer/`` (hub id or folder)."""
    prompt: str = (
        "The pair of images highlights a clothing and its styling on a model, high resolution, "
        "4K, 8K; [IMAGE1] Detailed product shot of a clothing [IMAGE2] The same cloth is worn by "
        "a model in a lifestyle setting."
    )
    """The CatVTON-Flux prompt used in training and inference."""
    max_sequence_length: int = 512
    """T5 tokens of the prompt (FLUX: 512); shorter is faster when the prompt is short."""


@dataclass
class LoraConfig:
    rank: int = 16
    """LoRA rank: higher means more capacity and more memory."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    targets: str = "attention+ff"
    """Target preset: ``attention`` or ``attention+ff``."""


@dataclass
class TrainConfig:
    method: str = "lora"
    """``lora`` (adapter on a frozen base) or ``full`` (fine-tune the whole transformer)."""
    batch_size: int = 2
    """Samples per worker per step; 2 fits an L40S 48 GB at 768x1024 with checkpointing."""
    grad_accum: int = 4
    """Micro-batches per optimizer step: the effective batch is batch x accum x workers."""
    lr: float = 5e-5
    """Peak AdamW learning rate."""
    epochs: int = 5
    """Passes over the training pairs."""
    precision: str = "bf16"
    """``bf16`` on GPUs; ``fp32`` on CPU."""
    gradient_checkpointing: bool = True
    """Recompute each block in the backward pass: about 40 GB less activation memory at full
    size for about 50% more compute."""
    num_workers: int = 1
    """Ray Train workers (one GPU each when ``use_gpu``)."""
    use_gpu: bool = True
    """Train on GPUs; false trains on CPU workers with gloo."""
    cpus_per_worker: float = 1
    """CPUs each worker reserves (fractions allowed, e.g. 0.5 for two workers on one CPU); leave
    CPUs free for Ray Data and the driver."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 = ``epochs`` passes over the training pairs."""
    seed: int = 0
    """Seed of noise, timesteps, LoRA init and data order."""
    timesteps: str = "uniform"
    """Noise-level sampling: ``uniform`` (CatVTON-Flux) or ``logit_normal`` (more mid-range)."""
    flux_shift: bool = False
    """Apply FLUX's resolution-dependent shift to the sampled noise levels (more noise on big canvases)."""
    garment_dropout: float = 0.0
    """Share of training samples whose garment half is blanked in the conditioning (its masked-image
    latents set to 0), so the model also learns a garment-free prediction for
    ``infer.garment_guidance`` (CatVTON trains with 10% condition dropout for its guidance)."""
    loss_region: str = "canvas"
    """Where the loss counts: ``canvas`` (all, as CatVTON-Flux), ``person`` (right half) or
    ``mask`` (weighted by mask coverage)."""
    guidance: float = 1.0
    """Guidance embedding fed in training (CatVTON-Flux: 1.0)."""
    warmup_steps: int = 100
    """Linear learning-rate warmup steps."""
    schedule: str = "cosine"
    """After warmup: ``cosine`` decay to 10% or ``constant``."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables."""
    optimizer: str = "auto"
    """``adamw``, ``adamw8bit`` (bitsandbytes, GPU) or ``auto`` (8-bit when possible)."""
    val_every: int = 200
    """Validation loss every this many steps (fixed noise and timesteps: comparable across runs)."""
    val_batches: int = 8
    """Validation batches per worker at each validation."""
    checkpoint_every: int = 500
    """Write a checkpoint (LoRA, optimizer, RNG) every this many steps, and at the end."""
    keep_checkpoints: int = 3
    """Checkpoints kept by Ray (the latest ones)."""
    max_failures: int = 3
    """Worker failures survived by restarting from the last checkpoint."""


@dataclass
class RunOptions:
    name: str = "catvton-lora"
    """Run name: re-using a name resumes that run from its latest checkpoint, on to this config's
    length; a length that ends at or before the checkpoint's step (when the plan changed) is refused."""
    storage_path: str = "outputs/ray"
    """Where Ray keeps checkpoints and results (shared storage on a cluster, e.g. s3:// or NFS)."""
    output_dir: str = "outputs"
    """Where the final LoRA, curves and sample grids are exported (``<output_dir>/<name>``)."""
    wandb_project: str = ""
    """W&B project; empty keeps W&B offline (files under the run folder)."""
    wandb_mode: str = "offline"
    """``offline`` (default, no network) or ``online`` (needs WANDB_API_KEY)."""
    samples: int = 4
    """Fixed validation pairs drawn in the sample grid at each checkpoint."""


@dataclass
class TuneConfig:
    name: str = "sweep"
    """Sweep name: trials and the release folder go under ``<run.output_dir>/<name>``."""
    search: str = "random"
    """``random``: ``num_samples`` trials, lr log-uniform in [lr_min, lr_max], rank from ``ranks``;
    ``grid``: every ``lr_grid`` x ``ranks`` pair (``num_samples`` times)."""
    lr_min: float = 1e-5
    """Lower end of the log-uniform learning-rate range (random search)."""
    lr_max: float = 2e-4
    """Upper end of the log-uniform learning-rate range (random search)."""
    lr_grid: list[float] = field(default_factory=lambda: [2e-5, 5e-5, 1e-4])
    """Learning rates of a grid search, best guess first (ASHA compares later trials with earlier)."""
    ranks: list[int] = field(default_factory=lambda: [16, 32, 64])
    """LoRA ranks to try; higher: more capacity and memory."""
    alpha_ratio: float = 2.0
    """LoRA alpha = ratio x rank, so the update's scale (alpha / rank) stays the same across ranks."""
    num_samples: int = 8
    """Trials of a random search; repeats of the whole grid for a grid search."""
    metric: str = "val_loss"
    """Reported metric that ASHA and the winner's choice minimise (fixed-noise validation loss)."""
    grace_period: int = 200
    """Steps every trial runs before ASHA may stop it; a multiple of ``train.val_every``."""
    reduction_factor: int = 2
    """ASHA keeps the best 1/reduction_factor of the trials at each rung."""
    max_concurrent_trials: int = 0
    """Trials at once; 0 derives it (``catvton.train.sweep.sweep_concurrency``): spare CPUs on CPU
    workers; on GPU workers what the autoscaler declares, else every trial (trials that do not fit
    wait and ask the autoscaler for nodes)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    canvas: CanvasConfig = field(default_factory=CanvasConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    run: RunOptions = field(default_factory=RunOptions)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, *sections: str) -> str:
        """A short stable hash of the named sections (all when none): cache keys."""
        d = self.to_dict()
        picked = {k: d[k] for k in sections} if sections else d
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


def steps_per_epoch(cfg: Config, n_train: int, world: int) -> int:
    """Optimizer steps in one pass over ``n_train`` pairs with ``world`` data-parallel workers."""
    batches = -(-n_train // (cfg.train.batch_size * world))  # ceil
    return max(1, batches // cfg.train.grad_accum)


def total_steps(cfg: Config, n_train: int, world: int) -> int:
    """The run's length: ``train.max_steps`` when set, else ``train.epochs`` passes."""
    return cfg.train.max_steps or cfg.train.epochs * steps_per_epoch(cfg, n_train, world)


MASK_RULES = ("dilate", "hull", "box", "box_to_bottom")


def validate(cfg: Config) -> list[str]:
    """Every semantic problem in ``cfg`` (types are checked while loading)."""
    p: list[str] = []
    d, c, m = cfg.data, cfg.canvas, cfg.mask
    for name in ("val_fraction", "test_fraction", "upper_share"):
        v = getattr(d, name)
        if not 0.0 <= v < 1.0:
            p.append(f"data.{name}={v}: must be in [0, 1)")
    if d.val_fraction + d.test_fraction >= 0.9:
        p.append("data.val_fraction + data.test_fraction leave under 10% of pids for training")
    bad_groups = [g for g in d.groups if g not in GROUPS]
    if bad_groups:
        p.append(f"data.groups has {bad_groups}: choose from {list(GROUPS)}")
    if not d.groups:
        p.append("data.groups is empty: name at least one of upper / lower / full")
    bad_views = [v for v in d.garment_views if v not in VIEW_NAMES.values()]
    if bad_views:
        p.append(f"data.garment_views has {bad_views}: choose from {list(VIEW_NAMES.values())}")
    if not 0.0 <= d.min_mask_fraction < d.max_mask_fraction <= 1.0:
        p.append("data.min_mask_fraction < data.max_mask_fraction, both in [0, 1], is required")
    if d.synthetic_pids < 10:
        p.append(f"data.synthetic_pids={d.synthetic_pids}: at least 10 are needed for 3 splits")
    if d.synthetic_image_size < 32:
        p.append(f"data.synthetic_image_size={d.synthetic_image_size}: at least 32")
    for name in ("half_width", "half_height"):
        v = getattr(c, name)
        if v <= 0 or v % 16:
            p.append(f"canvas.{name}={v}: must be a positive multiple of 16 (VAE x8, 2x2 packing)")
    if c.person_fit not in ("pad", "crop"):
        p.append(f"canvas.person_fit={c.person_fit!r}: choose pad or crop")
    if not 0.0 <= c.garment_margin < 0.5:
        p.append(f"canvas.garment_margin={c.garment_margin}: must be in [0, 0.5)")
    for g in GROUPS:
        rule = getattr(m, f"{g}_rule")
        if rule not in MASK_RULES:
            p.append(f"mask.{g}_rule={rule!r}: choose from {list(MASK_RULES)}")
    if not 0.0 <= m.dilation < 0.5:
        p.append(f"mask.dilation={m.dilation}: must be in [0, 0.5)")
    if not 0.0 <= m.box_min_width <= 1.0:
        p.append(f"mask.box_min_width={m.box_min_width}: must be in [0, 1]")
    if not 0.0 <= m.box_margin < 0.5:
        p.append(f"mask.box_margin={m.box_margin}: must be in [0, 0.5)")
    if cfg.lora.rank <= 0:
        p.append(f"lora.rank={cfg.lora.rank}: must be positive")
    if cfg.lora.targets not in ("attention", "attention+ff"):
        p.append(f"lora.targets={cfg.lora.targets!r}: choose attention or attention+ff")
    t = cfg.train
    if t.method not in ("lora", "full"):
        p.append(f"train.method={t.method!r}: choose lora or full")
    if t.precision not in ("bf16", "fp32"):
        p.append(f"train.precision={t.precision!r}: choose bf16 or fp32")
    for name in ("batch_size", "grad_accum", "epochs", "num_workers"):
        if getattr(t, name) < 1:
            p.append(f"train.{name}={getattr(t, name)}: must be at least 1")
    if not 0.0 < t.lr < 1.0:
        p.append(f"train.lr={t.lr}: must be in (0, 1)")
    if not 0.0 <= t.garment_dropout < 1.0:
        p.append(f"train.garment_dropout={t.garment_dropout}: a share of the samples, in [0, 1)")
    choices = {"timesteps": ("uniform", "logit_normal"), "loss_region": ("canvas", "person", "mask"),
               "schedule": ("cosine", "constant"), "optimizer": ("auto", "adamw", "adamw8bit")}
    for name, allowed in choices.items():
        if getattr(t, name) not in allowed:
            p.append(f"train.{name}={getattr(t, name)!r}: choose from {list(allowed)}")
    for name in ("max_steps", "warmup_steps", "cpus_per_worker"):
        if getattr(t, name) < 0:
            p.append(f"train.{name}={getattr(t, name)}: must not be negative")
    for name in ("val_every", "checkpoint_every", "keep_checkpoints", "val_batches"):
        if getattr(t, name) < 1:
            p.append(f"train.{name}={getattr(t, name)}: must be at least 1")
    p += infer_problems(cfg.infer)
    if cfg.run.wandb_mode not in ("offline", "online", "disabled"):
        p.append(f"run.wandb_mode={cfg.run.wandb_mode!r}: choose offline, online or disabled")
    if cfg.run.wandb_mode == "online" and not cfg.run.wandb_project:
        p.append("run.wandb_mode=online needs run.wandb_project (and WANDB_API_KEY in the environment)")
    if not cfg.run.name or "/" in cfg.run.name:
        p.append(f"run.name={cfg.run.name!r}: a non-empty name without '/'")
    p += _validate_tune(cfg)
    return p


def sweep_problems(cfg: Config, n_train: int | None = None) -> list[str]:
    """What only a sweep needs of the training settings (checked where a sweep starts, so a
    training job with another ``train.val_every`` is not refused for a sweep it does not run).

    A sweep's length is every trial's: ``train.max_steps``, or with 0 ``train.epochs`` passes
    over the ``n_train`` training pairs (:func:`total_steps`; known once the latent cache is
    built, and only then checked against the grace period)."""
    p = []
    if cfg.tune.grace_period % cfg.train.val_every:
        p.append(f"tune.grace_period={cfg.tune.grace_period}: a positive multiple of train.val_every "
                 f"({cfg.train.val_every}); ASHA only sees steps with a validation loss")
    if cfg.train.max_steps or n_train is not None:
        length = total_steps(cfg, n_train or 0, cfg.train.num_workers)
        if cfg.tune.grace_period >= length:
            how = (f"train.max_steps={length}" if cfg.train.max_steps else
                   f"{cfg.train.epochs} epochs of {n_train} training pairs = {length} steps")
            p.append(f"tune.grace_period={cfg.tune.grace_period}: ASHA's first rung must come before a trial's last "
                     f"step ({how}), or it can stop no trial early; lower it or train longer")
    return p


def _validate_tune(cfg: Config) -> list[str]:
    s, p = cfg.tune, []
    if s.search not in ("random", "grid"):
        p.append(f"tune.search={s.search!r}: choose random or grid")
    if not 0.0 < s.lr_min < s.lr_max < 1.0:
        p.append(f"tune.lr_min={s.lr_min}, tune.lr_max={s.lr_max}: need 0 < lr_min < lr_max < 1")
    if s.search == "grid" and not s.lr_grid:
        p.append("tune.lr_grid is empty: a grid search needs at least one learning rate")
    if any(not 0.0 < lr < 1.0 for lr in s.lr_grid):
        p.append(f"tune.lr_grid={s.lr_grid}: every learning rate must be in (0, 1)")
    if not s.ranks or any(r < 1 for r in s.ranks):
        p.append(f"tune.ranks={s.ranks}: at least one rank, each positive")
    if s.alpha_ratio <= 0:
        p.append(f"tune.alpha_ratio={s.alpha_ratio}: must be positive")
    if s.num_samples < 1:
        p.append(f"tune.num_samples={s.num_samples}: must be at least 1")
    if s.metric not in ("val_loss", "val_loss_lower", "val_loss_full", "val_loss_upper"):
        p.append(f"tune.metric={s.metric!r}: choose val_loss or val_loss_<group>")
    if s.grace_period < 1:
        p.append(f"tune.grace_period={s.grace_period}: must be at least 1")
    if s.reduction_factor < 2:
        p.append(f"tune.reduction_factor={s.reduction_factor}: must be at least 2")
    if s.max_concurrent_trials < 0:
        p.append(f"tune.max_concurrent_trials={s.max_concurrent_trials}: must not be negative")
    if not s.name or "/" in s.name:
        p.append(f"tune.name={s.name!r}: a non-empty name without '/'")
    return p
