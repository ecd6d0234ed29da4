"""What a try-on server replica does, without the server: settings, loading, one request end to end.

``serve/app.py`` wires this into Ray Serve; everything that decides an output lives here, in the
library, so that a test (or a batch job) gets the same picture as the HTTP API::

    settings = serve_config_from_dict({"lora": ["outputs/tiny-sweep/release", "outputs/tiny-lora/lora"]})
    service = TryOnService.load(settings)
    job = service.prepare(person, garment, mask, "lower", seed=0, steps=None, guidance=None, half_hw=None)
    image = service.finish(job, service.generate([job])[0])   # (h, w, 3) uint8, the person's size

The server splits this: its ingress decodes a photo once and sends only the copy the model needs
(:func:`catvton.infer.request.read_photo`); the model replica answers :meth:`TryOnService.reply`
(the generated person half and the general mask, small arrays), and the ingress pastes that onto
the upload at its own size (:func:`catvton.infer.request.paste_generated`).

The model config (base, transformer override, prompt, canvas, mask rules, inference defaults) is the
LoRA folder's ``training_config.json`` when it has one, so a LoRA is served exactly as it was
trained; otherwise ``config``. Paths come from these settings only, never from a request.

Where the model runs (:func:`serve_device`), one rule for the Serve app and its replicas: Ray 2.60
no longer hides a node's GPUs from an actor that reserved none (ray#54868), so "CUDA is visible"
does not mean "this replica may use it". A model runs on CUDA when ``device`` is ``cuda``, or
``auto`` and either a GPU is Ray's reservation for this replica or (outside Ray) CUDA is visible.
Settings whose model needs a GPU wherever it is placed (:func:`wants_gpu`: ``device: cuda``, or
``auto`` with a GPU preset, ``train.use_gpu`` in the model config, such as ``configs/l40s.yaml``)
make the Serve app reserve ``num_gpus: 1`` for the model deployment; and a replica that would put
its model on CUDA without a GPU of its own refuses to load, naming the fix.

The module is long because it is the whole replica without the server, in the order a replica
meets it: its settings and their checks, where the model may run (a GPU only when Ray reserved
one), loading, one request's passes, and outfits; the Serve app, the evaluation and the catalogue
job share every line of it.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from catvton.artifacts import LORA_WEIGHTS, METRICS, TRAINING_CONFIG
from catvton.config import Config, ConfigError, apply_mapping, apply_overrides, config_from_dict, load_config
from catvton.infer.automask import AutoMasker
from catvton.data.canvas import to_uint8
from catvton.data.masks import general_mask
from catvton.infer.outfit import ORDER, Dressed, Dressing, OutfitRequest
from catvton.infer.registry import AdapterSet, Registry, Release, scan_registry
from catvton.infer.request import ImageLimits, InputError, paste_generated, request_sample
from catvton.infer.tryon import TryOn
from catvton.schema import GROUPS

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
API_KEY_ENV = "TRYON_API_KEY"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServeConfig:
    config: str = "configs/tiny.yaml"
    """catvton config file used when the LoRA folder has no ``training_config.json`` (relative
    paths are taken from the repository root)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides on top of the model config, e.g. ``model.base=/models/flux-fill``."""
    lora: list[str] = field(default_factory=list)
    """LoRA folders, first existing one wins (the sweep's release folder, then a single run's
    LoRA); each needs ``pytorch_lora_weights.safetensors``. Empty: the base alone."""
    registry: str = ""
    """A folder of release folders, one model each (its name is the model id a request names):
    many LoRAs on one base (:mod:`catvton.infer.registry`). Set instead of ``lora``; the model
    config is ``config`` (every release must be trained on its base and transformer)."""
    max_adapters: int = 3
    """With a registry: LoRAs kept loaded on a replica's base at once, least recently used out."""
    default_model: str = ""
    """With a registry: the model of a request that names none (empty: such requests get a 422)."""
    experiments: list = field(default_factory=list)
    """A/B experiments: ``[{name, arms: {model id: weight}}]``; a request that names no model gets
    its user's arm (``x-tryon-user``, sticky) of the first (``serve/experiments.py``)."""
    events: str = ""
    """SQLite file of every answer and the users' feedback (``POST /v1/feedback``), read by
    ``python -m serve.ab_report``; empty: nothing is recorded."""
    keys_file: str = ""
    """Customer keys (``python -m serve.keys add``): each with its models and rate; instead of
    ``api_key``. Keys are stored hashed."""
    parser: str = ""
    """Human-parsing model (transformers segmentation, hub id or folder) for requests without a
    mask, e.g. ``mattmdjaga/segformer_b2_clothes``; empty: such requests get a 422."""
    parser_labels: dict[str, list[str]] = field(default_factory=dict)
    """Parser label names per garment group; a group left out keeps the ATR names (see
    catvton.infer.automask), so ``{lower: [...]}`` changes the lower-body labels only."""
    api_key: str = ""
    """Bearer token required on every route but /healthz; the TRYON_API_KEY environment variable,
    when set, wins. Empty: no authentication (only behind a trusted gateway)."""
    device: str = "auto"
    """``cpu``, ``cuda`` or ``auto``; bf16 on CUDA, fp32 on the CPU. ``auto``: in a Ray actor, CUDA
    when Ray reserved a GPU for it (else the CPU, or a refusal for a GPU preset); outside Ray, CUDA
    when visible. ``cuda`` (or ``auto`` with a GPU preset) makes the Serve app reserve ``num_gpus: 1``
    for the model deployment (:func:`serve_device`, :func:`wants_gpu`)."""
    vae_slicing: str = "auto"
    """``auto``, ``on`` or ``off``: the VAE encodes and decodes a batch one image at a time (the
    same pixels; the peak of a batch's decode is one image's). ``auto``: on where the model runs on
    CUDA, where a batch's decode at a 1536x1024 canvas is a replica's memory peak."""
    torch_threads: int = 0
    """torch intra-op threads per replica; 0 leaves torch's default."""
    max_body_mb: float = 25.0
    """Largest request body accepted (413 beyond it)."""
    max_image_side: int = 8192
    """Longest side of an uploaded image."""
    max_image_pixels: int = 40_000_000
    """Width x height of an uploaded image (checked on the header, before decoding)."""
    min_image_side: int = 16
    """Shortest side of an uploaded image."""
    max_half_pixels: int = 1024 * 1024
    """Largest canvas half a request's ``size`` may ask for (FLUX memory grows with it)."""
    max_steps: int = 50
    """Most denoising steps a request may ask for."""
    max_batch_size: int = 4
    """Most requests generated together: those that arrived while the previous batch ran
    (:class:`catvton.infer.batching.Batcher`); higher: more throughput under load, more latency."""
    batch_wait_timeout_s: float = 0.0
    """How long a batch that starts on an idle model waits for more requests; 0: none (batches
    fill by themselves while the model is busy). Only worth it when requests arrive faster than a
    batch runs."""
    retry_after_s: int = 2
    """``Retry-After`` of a 503 when the model's queue is full."""

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(self.min_image_side, self.max_image_side, self.max_image_pixels)

    def resolved_api_key(self) -> str:
        return os.environ.get(API_KEY_ENV) or self.api_key

    @property
    def slicing(self) -> bool | None:
        """``vae_slicing`` as :meth:`catvton.infer.tryon.TryOn.load` takes it (None: by device)."""
        return {"auto": None, "on": True, "off": False}[self.vae_slicing]


def repo_path(p: str) -> Path:
    """``p`` as a path: a relative one is taken from the repository root (as the serve configs write them)."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def serve_config_from_dict(d: dict[str, Any] | None) -> ServeConfig:
    """Settings from a mapping (``serve/config.yaml``'s ``args``); every problem at once."""
    s = ServeConfig()
    problems: list[str] = []
    d = dict(d or {})
    if isinstance(d.get("lora"), str):  # one folder is a list of one
        d["lora"] = [d["lora"]] if d["lora"] else []
    if "parser_labels" in d:
        labels = d.pop("parser_labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, list) for v in labels.values()):
            problems.append("parser_labels: a mapping group -> list of label names")
        else:
            bad = [g for g in labels if g not in GROUPS]
            if bad:
                problems.append(f"parser_labels has {bad}: groups are {list(GROUPS)}")
            s.parser_labels = {g: [str(n) for n in v] for g, v in labels.items()}
    if "experiments" in d:  # checked in full by the serve app (serve/experiments.py), which runs them
        raw = d.pop("experiments") or []
        if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
            problems.append("experiments: a list of {name, arms: {model id: weight}}")
        else:
            s.experiments = raw
    apply_mapping(s, d, "", problems)
    if not problems:
        problems = validate_serve(s)
    if problems:
        raise ConfigError(problems)
    return s


def validate_serve(s: ServeConfig) -> list[str]:
    p = []
    for name in ("max_image_side", "max_image_pixels", "min_image_side", "max_half_pixels", "max_steps",
                 "max_batch_size"):
        if getattr(s, name) < 1:
            p.append(f"{name}={getattr(s, name)}: must be at least 1")
    if s.max_body_mb <= 0:
        p.append(f"max_body_mb={s.max_body_mb}: must be positive")
    if s.batch_wait_timeout_s < 0 or s.retry_after_s < 0:
        p.append("batch_wait_timeout_s and retry_after_s must not be negative")
    if s.registry and s.lora:
        p.append("lora and registry are both set: lora serves one LoRA, registry a folder of them; keep one")
    if s.registry and not repo_path(s.registry).is_dir():
        p.append(f"registry {s.registry}: no such folder (a folder of release folders, one per model)")
    if s.keys_file and s.api_key:
        p.append("api_key and keys_file are both set: one key for everyone, or a key per customer; keep one")
    if s.keys_file and not repo_path(s.keys_file).is_file():
        p.append(f"keys_file {s.keys_file}: no such file (python -m serve.keys add --file {s.keys_file} ...)")
    if s.max_adapters < 1:
        p.append(f"max_adapters={s.max_adapters}: must be at least 1")
    if s.device not in ("auto", "cpu", "cuda"):
        p.append(f"device={s.device!r}: choose auto, cpu or cuda")
    if s.vae_slicing not in ("auto", "on", "off"):
        p.append(f"vae_slicing={s.vae_slicing!r}: choose auto, on or off")
    if s.lora and not any(repo_path(f).is_dir() for f in s.lora):
        p.append(f"lora: none of {s.lora} exists; train one (python ray_jobs/train.py) or run the sweep "
                 "(python ray_jobs/tune.py), or set lora: [] to serve the base alone")
    return p


def pick_lora(s: ServeConfig) -> Path | None:
    """The first existing LoRA folder; refuses one without safetensors weights. Other files in it
    (a checkpoint's ``training_state.pt``) are never read: diffusers takes the safetensors file first."""
    for f in s.lora:
        path = repo_path(f)
        if path.is_dir():
            if not (path / LORA_WEIGHTS).is_file():
                raise ConfigError([f"lora folder {path} has no {LORA_WEIGHTS} (only safetensors are loaded)"])
            return path
    return None


def refuse_pickles(folder: Path, what: str) -> None:
    """Pickled weights can run code when loaded, and ``from_pretrained`` falls back to them where a
    safetensors file is missing: a local model folder holding any is refused."""
    found = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if found:
        raise ConfigError([f"{what} folder {folder} holds pickled weights {found[:3]}: only safetensors are "
                           "loaded; convert them (safetensors.torch.save_file) and remove the pickles"])


def model_config(s: ServeConfig, lora: Path | None) -> Config:
    """The LoRA's own training config when it has one, else ``s.config``; overrides on top."""
    if lora is not None and (lora / TRAINING_CONFIG).is_file():
        cfg = config_from_dict(json.loads((lora / TRAINING_CONFIG).read_text()))
        return apply_overrides(cfg, list(s.overrides)) if s.overrides else cfg
    return load_config(repo_path(s.config), s.overrides)


GPU_FIX = ("reserve one for the model deployment: ray_actor_options: {num_gpus: 1} under TryOnModel in the "
           "serve config's deployments (serve/config.l40s.yaml), or set device: cpu")
"""How to give a CUDA replica its GPU: every refusal about it ends with this."""


def wants_gpu(s: ServeConfig, cfg: Config) -> bool:
    """Whether the model of these settings runs on CUDA wherever its replica is placed: ``device:
    cuda``, or ``auto`` with a GPU preset (``cfg.train.use_gpu``: a model trained on GPUs, such as
    ``configs/l40s.yaml``'s FLUX.1-Fill-dev, is never served from a CPU). The Serve app reserves
    ``num_gpus: 1`` for such a model deployment."""
    return s.device == "cuda" or (s.device == "auto" and cfg.train.use_gpu)


def ray_gpu_ids() -> list | None:
    """The GPUs Ray assigned to this process when it is a Ray worker (a Serve replica, an actor, a
    task); None outside Ray and in a Ray driver, which reserve nothing. Ray is not imported for this:
    a Ray worker has imported it already."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return list(ray.get_gpu_ids())


def serve_device(s: ServeConfig, cfg: Config, cuda_available: bool, gpu_ids: list | None) -> str:
    """``cpu`` or ``cuda`` for the model of ``s`` (model config ``cfg``), given whether torch sees CUDA
    and the GPUs Ray assigned to this process (:func:`ray_gpu_ids`; None outside Ray). CUDA asked
    (``device: cuda``, or ``auto`` with a GPU preset) in a Ray worker without a GPU of its own is
    refused: the visible GPU would be shared unreserved (Ray 2.60 hides none, ray#54868)."""
    if s.device == "cpu":
        return "cpu"
    if gpu_ids is not None:  # a Ray worker: its reservation decides, not what it can see
        if gpu_ids:
            return "cuda"
        if wants_gpu(s, cfg):
            why = "device=cuda" if s.device == "cuda" else f"device=auto with a GPU preset ({cfg.model.base})"
            raise ConfigError([f"{why}, but Ray reserved no GPU for this replica: it would share a GPU it sees "
                               f"(Ray 2.60 hides none) without a reservation; {GPU_FIX}"])
        return "cpu"
    if s.device == "cuda" and not cuda_available:
        raise ConfigError(["device=cuda but torch finds no CUDA device here (a CPU-only torch, or no GPU "
                           "visible): run on a GPU machine, or set device: cpu"])
    return "cuda" if cuda_available else "cpu"


def refuse_unreserved_cuda(device: str) -> None:
    """A model about to go to CUDA inside a Ray worker that Ray gave no GPU: refused with the fix."""
    if str(device).startswith("cuda") and ray_gpu_ids() == []:
        raise ConfigError([f"the model would load on {device}, but Ray reserved no GPU for this actor "
                           f"(Ray 2.60 hides none): reserve num_gpus=1 for it; for a Serve replica {GPU_FIX}"])


@dataclass
class Job:
    """One request, ready for the generator."""

    canvas: np.ndarray
    """(H, 2W, 3) float32 in [0, 1]: [garment | person]."""
    mask_canvas: np.ndarray
    """(H, 2W) float32: [0 | general mask]."""
    person: np.ndarray
    """(h, w, 3) uint8: the photo the canvas was cut from (the upload's working copy)."""
    garment_mask: np.ndarray
    """(h, w) bool: the worn garment (request or auto-masker), before generalising."""
    general: np.ndarray
    """(h, w) bool: the general mask of ``garment_mask``: where the try-on is pasted."""
    group: str
    seed: int
    steps: int
    guidance: float
    mask_source: str
    """``request`` or ``auto``."""
    model: str | None = None
    """The registry's model id (None: the server's one LoRA, or the base)."""

    @property
    def batch_key(self) -> tuple:
        """Requests with the same key can share one pipeline call."""
        return self.canvas.shape, self.steps, self.guidance, self.model


class TryOnService:
    """Base + LoRA (+ parser), loaded once; stateless per request."""

    def __init__(self, settings: ServeConfig, cfg: Config, tryon, lora: Path | None, masker=None):
        self.settings = settings
        self.cfg = cfg
        self.tryon = tryon
        self.lora = lora
        self.masker = masker
        self.registry: Registry | None = None
        """With ``settings.registry``: the releases this server offers, and those it refused."""
        self.adapters: AdapterSet | None = None

    def use_registry(self, registry: Registry) -> "TryOnService":
        """Serve ``registry``'s releases as named adapters on this service's base."""
        self.registry = registry
        self.adapters = AdapterSet(self.tryon.pipe, self.settings.max_adapters)
        return self

    def release(self, model_id: str | None) -> Release:
        """The release a request's model id names; an unknown id is a 404 naming the models."""
        if self.registry is None:
            raise InputError("model", "this server serves one model: leave the model out", status=404)
        model_id = model_id or self.settings.default_model
        if model_id in self.registry.refused:
            raise InputError("model", f"model {model_id!r} is not served: {self.registry.refused[model_id]}", status=404)
        if not model_id:
            raise InputError("model", f"name a model (x-tryon-model): {sorted(self.registry.releases)}")
        if model_id not in self.registry.releases:
            raise InputError("model", f"unknown model {model_id!r}: this server has {sorted(self.registry.releases)}",
                             status=404)
        return self.registry.releases[model_id]

    @classmethod
    def load(cls, settings: ServeConfig, prepare: Callable[[Config], Config] | None = None,
             device: str | None = None) -> "TryOnService":
        """Load the models of ``settings``. ``prepare`` turns the model config into one that names
        concrete folders or hub ids (the Serve app passes :func:`catvton.offline.resolve`, so the
        offline names ``tiny`` / ``tiny-alpha`` work; this library never builds them itself).
        ``device``: where to load instead of the settings' choice; ``meta`` is the dry run's
        stand-in for the replica's GPU (bf16, the VAE sliced as on CUDA; :mod:`catvton.train.dryrun`)."""
        import torch

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        lora = pick_lora(settings)  # None with a registry (validate_serve: lora and registry exclude each other)
        cfg = model_config(settings, lora)
        if prepare is not None:
            cfg = prepare(cfg)
        for ref in (cfg.model.base, cfg.model.transformer_override, settings.parser):
            if ref and Path(ref).expanduser().is_dir():
                refuse_pickles(Path(ref).expanduser(), "model")
        if device is None:
            device = serve_device(settings, cfg, torch.cuda.is_available(), ray_gpu_ids())
        else:
            refuse_unreserved_cuda(device)  # a device given by the caller: still no unreserved GPU
        gpu = str(device).startswith("cuda") or device == "meta"
        dtype = torch.bfloat16 if gpu else torch.float32
        tryon = TryOn.load(cfg, lora=lora, device=device, dtype=dtype, vae_slicing=settings.slicing)
        masker = None
        if settings.parser:
            parser = str(repo_path(settings.parser)) if repo_path(settings.parser).exists() else settings.parser
            masker = AutoMasker.load(parser, settings.parser_labels or None, device=device)
        service = cls(settings, cfg, tryon, lora, masker)
        if settings.registry:
            service.use_registry(scan_registry(repo_path(settings.registry), cfg))
            if settings.default_model and settings.default_model not in service.registry.releases:
                raise ConfigError([f"default_model {settings.default_model!r} is not a servable release of "
                                   f"{settings.registry}: {service.registry.refused.get(settings.default_model, 'no such folder')}"])
        return service

    def info(self) -> dict[str, Any]:
        """What is loaded: base, override, LoRA and its metrics, canvas, limits."""
        metrics = None
        if self.lora is not None and (self.lora / METRICS).is_file():
            metrics = json.loads((self.lora / METRICS).read_text())
        c = self.cfg
        return {
            "base": c.model.base, "transformer_override": c.model.transformer_override,
            "lora": str(self.lora) if self.lora else None, "metrics": metrics,
            "canvas": {"half_width": c.canvas.half_width, "half_height": c.canvas.half_height,
                       "person_fit": c.canvas.person_fit},
            "mask_rules": {g: getattr(c.mask, f"{g}_rule") for g in GROUPS},
            "defaults": {"steps": c.infer.steps, "guidance": c.infer.guidance, "seed": c.infer.seed},
            "max_steps": self.settings.max_steps, "auto_mask": self.masker is not None,
            "parser": self.settings.parser or None, "garment_types": list(GROUPS),
            "regions": list(GROUPS), "outfit_order": list(ORDER), "worn_garments": True,
            "device": self.tryon.prompt_embeds.device.type, "memory": dict(self.tryon.memory),
            **({} if self.registry is None else {"models": self.models()}),
        }

    def models(self) -> dict[str, Any]:
        """The registry as ``GET /v1/models`` shows it: each model with its figures, the refused
        folders with their reasons, and what this replica holds."""
        assert self.registry is not None and self.adapters is not None
        return {"models": [r.describe() for r in self.registry.releases.values()],
                "default": self.settings.default_model or None, "refused": dict(self.registry.refused),
                "loaded": list(self.adapters.loaded), "capacity": self.adapters.capacity,
                "loads": self.adapters.loads, "evictions": self.adapters.evictions}

    def prepare(self, person: np.ndarray, garment: np.ndarray, mask: np.ndarray | None, group: str,
                seed: int | None, steps: int | None, guidance: float | None,
                half_hw: tuple[int, int] | None, garment_mask: np.ndarray | None = None,
                worn: bool = False, mask_source: str | None = None) -> Job:
        """Mask (request or auto), canvas and parameters of one pass; :class:`InputError` if unusable.

        ``garment_mask``: the garment photo is a worn photo and this marks the garment on it (cut
        out as training does); ``worn`` without it: the parser finds it. Error fields are the
        single-garment API's (``garment``, ``mask``, ``garment_mask``, ``garment_worn``);
        :meth:`dress_many` renames them after the outfit's fields. ``mask_source``: where a
        given ``mask`` came from (default ``request``)."""
        if group not in GROUPS:
            raise InputError("garment_type", f"{group!r} is not a garment type: choose from {list(GROUPS)}")
        if steps is not None and not 1 <= steps <= self.settings.max_steps:
            raise InputError("steps", f"steps={steps}: choose 1 to {self.settings.max_steps}")
        source = mask_source or "request"
        if mask is None:
            mask = self.person_mask(person, group)
            source = "auto"
        elif mask.shape != person.shape[:2]:
            raise InputError("mask", f"mask is {mask.shape[1]}x{mask.shape[0]} but the person photo is "
                                     f"{person.shape[1]}x{person.shape[0]}: send a mask of the person photo's size")
        general = general_mask(mask, group, self.cfg.mask)
        garment_mask = self.worn_garment_mask(garment, garment_mask, group, worn)
        half_hw = half_hw or (self.cfg.canvas.half_height, self.cfg.canvas.half_width)
        sample = request_sample(person, garment, mask, group, self.cfg, half_hw, worn_mask=garment_mask)
        if not sample.mask_canvas.any():
            raise InputError("mask", "the mask vanishes at the canvas size: mark a larger region")
        return Job(sample.canvas, sample.mask_canvas, person, mask, general, group,
                   self.cfg.infer.seed if seed is None else int(seed),
                   self.cfg.infer.steps if steps is None else int(steps),
                   self.cfg.infer.guidance if guidance is None else float(guidance), source)

    def person_mask(self, person: np.ndarray, group: str) -> np.ndarray:
        """The auto-masker's mask of the ``group`` garment worn in ``person``; :class:`InputError`
        when there is no parser or it finds nothing."""
        if self.masker is None:
            raise InputError("mask", "this server has no human parser configured: send a mask "
                                     "(white = the worn garment, the person photo's size)")
        mask, general = self.masker.general(person, group, self.cfg.mask)
        if not general.any():
            raise InputError("mask", f"the parser found no {group} garment on the person: send a mask")
        return mask

    def worn_garment_mask(self, garment: np.ndarray, garment_mask: np.ndarray | None, group: str,
                          worn: bool) -> np.ndarray | None:
        """The garment's mask on a worn garment photo (the request's, checked, or the parser's);
        None for a product shot."""
        if garment_mask is not None:
            if garment_mask.shape != garment.shape[:2]:
                raise InputError("garment_mask", f"garment mask is {garment_mask.shape[1]}x{garment_mask.shape[0]} "
                                                 f"but the garment photo is {garment.shape[1]}x{garment.shape[0]}: "
                                                 "send a mask of the garment photo's size")
            if not garment_mask.any():
                raise InputError("garment_mask", "garment mask is empty: mark the garment on the garment photo in white")
            return garment_mask
        if not worn:
            return None
        if self.masker is None:
            raise InputError("garment_worn", "this server has no human parser configured to find the garment on a "
                                             "worn photo: send garment_mask (white = the garment), or a product shot")
        found = self.masker.garment_mask(garment, group)
        if not found.any():
            raise InputError("garment_worn", f"the parser found no {group} garment on the garment photo: send "
                                             "garment_mask")
        return found

    def generate(self, jobs: list[Job]) -> list[np.ndarray]:
        """Generated canvases, one pipeline call per batch key; each job's noise comes from its own
        seed, so a result does not depend on what it was batched with."""
        out: list[np.ndarray | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.batch_key].append(i)
        for idx in groups.values():
            first = jobs[idx[0]]
            # a registry's model: its adapter the only active one for this call (loaded if evicted)
            adapter = self.adapters.use(self.release(first.model)) if self.adapters is not None else nullcontext()
            with adapter:
                results = self.tryon.fill_canvases(np.stack([jobs[i].canvas for i in idx]),
                                                   np.stack([jobs[i].mask_canvas for i in idx]),
                                                   seed=[jobs[i].seed for i in idx], steps=first.steps,
                                                   guidance=first.guidance)
            for k, i in enumerate(idx):
                out[i] = results[k]
        return out  # type: ignore[return-value]

    def reply(self, job: Job, result: np.ndarray) -> dict[str, Any]:
        """What the model side hands back for ``result`` (a generated canvas of ``job``): small
        plain values, whatever the upload's size. ``half``: ``(H, W, 3)`` uint8, the generated
        person half; ``general``: ``(h, w)`` bool at the working size; ``fit``: how the half was
        fitted; and the parameters used."""
        return {"half": to_uint8(result[:, result.shape[1] // 2:]), "general": job.general,
                "fit": self.cfg.canvas.person_fit, "seed": job.seed, "steps": job.steps,
                "guidance": job.guidance, "mask_source": job.mask_source}

    def finish(self, job: Job, result: np.ndarray) -> np.ndarray:
        """The try-on at the person photo's size, ``(h, w, 3)`` uint8 (what the ingress makes of
        :meth:`reply`, on ``job.person``)."""
        r = self.reply(job, result)
        return np.asarray(paste_generated(Image.fromarray(job.person), r["half"], r["general"], r["fit"]))

    # ----------------------------------------------------------------------------------------
    # Outfits: one garment per region, a pass each (catvton.infer.outfit)

    @classmethod
    def from_config(cls, cfg: Config, lora: str | Path | None = None, device: str = "cpu", masker=None,
                    settings: ServeConfig | None = None) -> "TryOnService":
        """A service for evaluation and batch jobs: ``cfg`` names concrete folders or hub ids
        (entry points resolve offline names first), ``lora`` a LoRA folder or None; float32 on
        the CPU, bf16 on a GPU. ``settings``: request limits (default :class:`ServeConfig`'s)."""
        import torch

        refuse_unreserved_cuda(device)
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        tryon = TryOn.load(cfg, lora=lora, device=device, dtype=dtype)
        return cls(settings or ServeConfig(), cfg, tryon, Path(lora) if lora is not None else None, masker)

    def start(self, request: OutfitRequest) -> Dressing:
        """``request`` checked (regions, masks, worn garments: every :class:`InputError` before
        any model call) and ready for its first pass."""
        return Dressing(self, request)

    def dress(self, request: OutfitRequest) -> Dressed:
        """The person of ``request`` wearing its garments (:mod:`catvton.infer.outfit`)."""
        return self.dress_many([request])[0]

    def dress_many(self, requests: list[OutfitRequest]) -> list[Dressed]:
        """Every request dressed: pass ``k`` of all requests that have one runs as one batch
        (:meth:`generate`: one pipeline call per canvas size and step count), each with its own
        seed, so a picture does not depend on what it was batched with."""
        dressings = [self.start(r) for r in requests]
        while True:
            pending = [(d, job) for d in dressings if (job := d.next_job()) is not None]
            if not pending:
                return [d.dressed() for d in dressings]
            for (d, job), result in zip(pending, self.generate([job for _, job in pending])):
                d.done(job, result)
