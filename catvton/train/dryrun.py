"""The GPU job, checked on a CPU: FLUX.1-Fill-dev's full-size step on the ``meta`` device, and its
memory and FLOPs measured under ``FakeTensorMode``. No GPU, no weights, no download::

    python -m catvton.train.dryrun --config configs/l40s.yaml               # ~6 CPU minutes
    python -m catvton.train.dryrun --config configs/l40s.yaml --rows all    # + the 8-row table, ~25 CPU minutes
    python -m catvton.train.dryrun --config configs/l40s.yaml --blocks 1 1  # full width, 1+1 blocks (~1 min)
    python -m catvton.train.dryrun --config configs/l40s.yaml --placement-only   # the meta run only

**Placement** (``meta``). The job's own functions, in the order a worker and a Serve replica call
them, on a weightless FLUX.1-Fill-dev folder (:mod:`catvton.model.skeleton`) loaded by the
project's loaders inside :func:`catvton.model.loading.weightless`: the LoRA build
(:func:`~catvton.train.engine.build_transformer`), one optimizer step at the preset's batch, canvas and
accumulation (:func:`~catvton.train.engine.train_step`: forward, backward, clipping, AdamW, schedule),
the fixed validation loss, a checkpoint save and resume load, rank 0's sample grid, and one try-on
of a Serve replica at the production serve config (``serve/config.l40s.yaml``), batch 1 and its
``max_batch_size``. Every model lives on ``meta`` as it would on ``cuda``; a tensor made on the CPU
without ``device=`` next to them fails as it would on a GPU ("Tensor on device meta is not on the
expected device cpu"), and the run stops naming the project's file and line. What ``meta`` cannot
answer (a loss as a float, a checkpoint's bytes, a picture) goes through :mod:`catvton.model.host`.
Meta's blind spot: a CPU ``generator`` passed to ``torch.randn(..., device="meta")`` passes while
CUDA refuses it; the code draws on the generator's own device and moves the result (read
``flow.sample_sigmas``).

**Memory and FLOPs** (``FakeTensorMode``). The same step with fake CPU tensors, which allocate
nothing: ``MemTracker`` records the peak of live tensor storage by category (parameters, buffers,
gradients, optimizer state, activations, temporaries, inputs) and ``FlopCounterMode`` the FLOPs.
The optimizer state is created first (one AdamW step on zero gradients) so the measured step is a
steady-state one. Attention runs as torch's CPU flash kernel, which, like the GPU's, keeps no
``seq x seq`` matrix (its output and log-sum-exp only); its FLOPs are counted with torch's SDPA
formulas. A GPU adds what no tensor shows: :data:`CONTEXT_BYTES` (CUDA context, cuBLAS/cuDNN
workspaces) and :data:`SLACK` (the caching allocator's fragmentation, a share of the tensor peak).
Rows: the preset's own step, batch 1 and 2 x rank 16 and 64 x checkpointing on and off, rank 0's
checkpoint-time sample grid, and a Serve replica at batch 1 and at its ``max_batch_size``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from catvton.config import Config, ConfigError, load_config
from catvton.model.loading import weightless
from catvton.model.skeleton import write_skeleton
from catvton.train import engine
from catvton.train.checkpoint import load_checkpoint, save_checkpoint

GB = 1e9
GIB = 2**30
CONTEXT_BYTES = 1.0e9
"""CUDA context and library workspaces a GPU process holds beside its tensors (~0.5 GB context on
an L40S/H100 with CUDA 12, cuBLAS ~0.1 GB and cuDNN/flash workspaces; rounded up)."""
SLACK = 0.10
"""The caching allocator's reserve above the live tensor peak (fragmentation: reserved minus
allocated is typically 5-10% in a LoRA step), as a share of the measured tensor peak."""
REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = "serve/config.l40s.yaml"
"""The production serve config (the Serve replica's settings), relative to the repository."""
TRACE_ROOTS = ("catvton", "serve", "ray_jobs")
"""Where a failure's frame is looked for: the project's code, not torch's."""

INFER_STEPS = 2
"""Denoising steps of the dry run's sample grid and try-ons: every step runs the same code and holds
the same memory, and the second checks the step-to-step path (28 would only take 14x longer)."""

CATEGORIES = ("parameters", "buffers", "gradients", "optimizer", "activations", "temporaries", "inputs", "other")


class DryRunFailed(RuntimeError):
    """A stage of the dry run failed; ``where`` is the project's innermost frame (``file:line``)."""

    def __init__(self, stage: str, error: BaseException, frames: list[tuple[str, str]]):
        self.stage, self.error = stage, error
        self.where, self.code = frames[-1] if frames else ("(no frame in the project's code)", "")
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        via = "".join(f"\n  called from {w}" for w, _ in reversed(frames[:-1][-3:]))
        super().__init__(f"{stage}: {type(error).__name__}: {first}\n  at {self.where}\n    {self.code}{via}")


def _project_frames(tb) -> list[tuple[str, str]]:
    """The traceback's frames in the project's own code, outermost first: ``(file:line in function,
    source line)``."""
    found = []
    for frame in traceback.extract_tb(tb):
        try:
            rel = Path(frame.filename).resolve().relative_to(REPO)
        except ValueError:
            continue
        if rel.parts and rel.parts[0] in TRACE_ROOTS and rel.name != "dryrun.py":
            found.append((f"{rel}:{frame.lineno} in {frame.name}", (frame.line or "").strip()))
    return found


STAGE_SECONDS: dict[str, float] = {}
"""Seconds each stage of the last placement check took (printed with ``--verbose``)."""


def stage(name: str, fn: Callable[[], Any]) -> Any:
    """Run one stage; any error becomes :class:`DryRunFailed` naming the project's file and line."""
    t0 = time.perf_counter()
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every failure of the job's code is the finding
        raise DryRunFailed(name, e, _project_frames(e.__traceback__)) from e
    finally:
        STAGE_SECONDS[name] = time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Inputs in the cache's layout


def latent_hw(cfg: Config) -> tuple[int, int]:
    """Latent rows and columns of the [garment | person] canvas."""
    return cfg.canvas.half_height // 8, 2 * cfg.canvas.half_width // 8


def cache_batch(cfg: Config, batch: int, generator: torch.Generator) -> dict[str, Any]:
    """A micro-batch as :func:`catvton.cache.read.decode_batch` returns it (CPU float32; the loop
    moves it to the device): latents, a person-half lower-body mask, groups."""
    h, w = latent_hw(cfg)
    H, W2 = 8 * h, 8 * w
    mask = torch.zeros(batch, 1, H, W2)
    mask[:, :, H // 3:, W2 // 2 + W2 // 8: W2 - W2 // 8] = 1
    return {"target": torch.randn(batch, 16, h, w, generator=generator),
            "masked": torch.randn(batch, 16, h, w, generator=generator), "mask": mask,
            "group": ["lower"] * batch, "pid": [f"dry{i}" for i in range(batch)]}


def text_embeds(cfg: Config, generator: torch.Generator, text_dim: int, pooled_dim: int) -> dict[str, torch.Tensor]:
    """The prompt's embeddings as :func:`catvton.cache.read.load_text_embeds` returns them (CPU)."""
    return {"prompt_embeds": torch.randn(1, cfg.model.max_sequence_length, text_dim, generator=generator),
            "pooled_prompt_embeds": torch.randn(1, pooled_dim, generator=generator)}


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def sample_rows(cfg: Config, n: int) -> dict[str, np.ndarray]:
    """``samples.npz``'s fixed validation pairs (canvas uint8, mask), as the grid reads them."""
    H, W2 = cfg.canvas.half_height, 2 * cfg.canvas.half_width
    rng = np.random.default_rng(0)
    mask = np.zeros((n, H, W2), np.uint8)
    mask[:, H // 3:, W2 // 2 + W2 // 8: W2 - W2 // 8] = 1
    return {"canvas": rng.integers(0, 256, (n, H, W2, 3), dtype=np.uint8), "mask": mask}


def dry_config(cfg: Config, base: Path, out: Path) -> Config:
    """``cfg`` on the weightless base (the override has FLUX.1-Fill-dev's architecture, so the
    base's own transformer stands for it), writing under ``out``."""
    from catvton.config import config_from_dict

    d = config_from_dict(cfg.to_dict())
    d.model.base, d.model.transformer_override = str(base), None
    d.run.output_dir, d.run.storage_path = str(out / "outputs"), str(out / "ray")
    d.infer.steps = INFER_STEPS
    return d


def _dims(folder: Path) -> tuple[int, int]:
    c = json.loads((folder / "transformer" / "config.json").read_text())
    return int(c["joint_attention_dim"]), int(c["pooled_projection_dim"])


# ---------------------------------------------------------------------------------------------
# Serving


def serve_settings(path: Path, lora: Path | None, base: Path):
    """The Serve replica's settings from a serve config file (its first application's ``args``),
    with the dry run's LoRA and the weightless base."""
    import yaml

    from catvton.infer.serving import serve_config_from_dict

    doc = yaml.safe_load(path.read_text())
    args = dict(doc["applications"][0]["args"])
    args["lora"] = [str(lora)] if lora is not None else []
    args["overrides"] = [*args.get("overrides", []), f"model.base={base}", "model.transformer_override=null"]
    args["parser"] = ""  # requests come with their masks here
    return serve_config_from_dict(args)


def serve_request(service, batch: int) -> list[np.ndarray]:
    """One Serve replica's batch: ``batch`` requests (a person photo with its mask, a garment),
    prepared and generated as the replica does (:meth:`TryOnService.prepare` / ``generate``)."""
    rng = np.random.default_rng(1)
    person = rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)
    garment = rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)
    mask = np.zeros((1024, 768), bool)
    mask[450:980, 180:600] = True
    jobs = [service.prepare(person, garment, mask, "lower", seed=i, steps=2, guidance=None, half_hw=None)
            for i in range(batch)]
    return service.generate(jobs)


def load_service(settings, device: str):
    from catvton.infer.serving import TryOnService

    return TryOnService.load(settings, device=device)


# ---------------------------------------------------------------------------------------------
# Placement on meta


def check_placement(cfg: Config, base: Path, out: Path, serve_config: Path | None, log=print) -> dict[str, Any]:
    """Every stage of the worker and the replica on ``meta``; raises :class:`DryRunFailed`."""
    from catvton.train.loop import _sample_grid

    device = torch.device("meta")
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    text_dim, pooled_dim = _dims(base)
    done: dict[str, Any] = {}
    t0 = time.perf_counter()
    with weightless():
        model = stage("build (load + LoRA)", lambda: engine.build_transformer(cfg, device, dtype))
        params = engine.trainable_parameters(model)
        total = 10
        optimizer, scheduler = engine.make_optimizer(cfg, params, total)
        generator = torch.Generator().manual_seed(cfg.train.seed * 1000)
        embeds = text_embeds(cfg, g, text_dim, pooled_dim)
        text = stage("text context", lambda: engine.TextContext(embeds, latent_hw(cfg), device, dtype))
        micro = [to_device(cache_batch(cfg, cfg.train.batch_size, g), device) for _ in range(cfg.train.grad_accum)]
        loss_fn = functools.partial(engine.fill_loss, text=text, cfg=cfg, generator=generator,
                                    garment_dropout=cfg.train.garment_dropout)
        stage("validation loss (step 0)", lambda: engine.fixed_val_loss(model, micro[:1], text, cfg))
        stage("training step", lambda: engine.train_step(model, micro, loss_fn, optimizer, scheduler, params,
                                                         cfg.train.max_grad_norm))
        done["trainable_params"] = sum(p.numel() for p in params)
        done["params"] = sum(p.numel() for p in model.parameters())
        ckpt = out / "checkpoint"
        stage("checkpoint save", lambda: save_checkpoint(ckpt, model, optimizer, scheduler, 1, [{"step": 1}], cfg,
                                                         generator, total))
        stage("checkpoint resume", lambda: load_checkpoint(ckpt, model, optimizer, scheduler, cfg, generator, total))
        samples = sample_rows(cfg, cfg.run.samples)
        stage("rank 0 sample grid", lambda: _sample_grid(model, samples, embeds, cfg, out / "grid.png"))
        del model, optimizer, params, micro
        if serve_config is not None:
            settings = serve_settings(serve_config, ckpt, base)
            service = stage("Serve replica load", lambda: load_service(settings, "meta"))
            for n in sorted({1, settings.max_batch_size}):
                stage(f"Serve try-on, batch {n}", lambda n=n: serve_request(service, n))
            done["serve_max_batch"] = settings.max_batch_size
    done["seconds"] = time.perf_counter() - t0
    log(f"placement: every stage ran on meta ({done['seconds']:.0f} s): build, validation loss, training step "
        f"(batch {cfg.train.batch_size} x {cfg.train.grad_accum}), checkpoint save + resume, sample grid"
        + (f", Serve try-on at batch 1 and {done['serve_max_batch']}" if "serve_max_batch" in done else ""))
    return done


# ---------------------------------------------------------------------------------------------
# Memory and FLOPs under FakeTensorMode


def _tracker():
    """``MemTracker`` for a frozen base at full depth. Three changes: only trainable parameters get
    gradient hooks (it hooks every parameter, which one that needs no gradient refuses); only the
    global peak is kept (its per-module peaks walk every module at every op: quadratic in depth,
    hours at 57 blocks); a model called again (accumulation, denoising steps) is allowed."""
    from copy import deepcopy

    from torch._subclasses.fake_tensor import is_fake
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class FrozenBaseTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for p in module.parameters():
                    if p.requires_grad and self._param_to_grad_hook_handles.get(p, None) is None:
                        def grad(g: torch.Tensor) -> None:
                            self._update_and_maybe_create_winfos(g, _MemRefType.GRAD)
                        self._param_to_grad_hook_handles[p] = (
                            p.register_hook(grad), p.register_post_accumulate_grad_hook(lambda q: grad(q.grad)))
            return out

        def _pre_fw_hook(self, module, inputs) -> None:
            # a root module called again in a forward (the next micro-batch of an accumulation, the
            # next denoising step) starts new per-module stats; MemTracker refuses it otherwise
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                if set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)} == {"Global"}:
                    self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)

        def _track(self, reftype, t: torch.Tensor) -> None:
            if is_fake(t):  # device tensors only: a real one is the CPU side (an input photo's tensor)
                super()._track(reftype, t)

        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = deepcopy(snap)

    return FrozenBaseTracker()


class FlopCount:
    """FLOPs of the matrix products, convolutions and attention run inside it, by torch's own
    formulas (``torch.utils.flop_counter``), torch's CPU flash attention counted as the GPU kernels
    are. A plain dispatch mode: ``FlopCounterMode`` also decomposes every op it has no formula for
    and attributes FLOPs to modules, minutes at full depth for the same total."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

        aten = torch.ops.aten
        registry = dict(flop_registry)
        registry[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *a, out_val=None, **kw: sdpa_flop_count(q.shape, k.shape, v.shape))
        registry[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda go, q, k, v, *a, out_val=None, **kw: sdpa_backward_flop_count(go.shape, q.shape, k.shape, v.shape))
        counter = self
        self.total = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = registry.get(func._overloadpacket)
                if formula is not None:
                    counter.total += int(formula(*args, **kwargs, out_val=out))
                return out

        self._mode = Mode()

    def __enter__(self) -> "FlopCount":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def _categories(snapshot: dict) -> dict[str, int]:
    """``{category: bytes}`` of a MemTracker snapshot, summed over devices (one here)."""
    names = {"Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients", "Optstate": "optimizer",
             "Activation": "activations", "Temp": "temporaries", "Input": "inputs", "Other": "other"}
    out = dict.fromkeys(CATEGORIES, 0)
    for dev_snap in snapshot.values():
        for key, value in dev_snap.items():
            name = names.get(str(getattr(key, "value", key)))
            if name is not None:
                out[name] += int(value)
    return out


def gpu_total(tensor_peak: float) -> float:
    """What a GPU needs for a measured live-tensor peak: the peak, allocator slack and context."""
    return tensor_peak * (1 + SLACK) + CONTEXT_BYTES


@dataclasses.dataclass
class Measured:
    """One measured row."""

    name: str
    categories: dict[str, int]
    tensor_peak: int
    flops: int
    seconds: float
    batch: int = 0
    rank: int = 0
    checkpointing: bool = True
    planned_tensors: float | None = None
    """The planner's peak for the same step, CUDA context left out (:mod:`catvton.train.planner`)."""
    planned_flops: float | None = None

    @property
    def total(self) -> float:
        return gpu_total(self.tensor_peak)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "gpu_total_bytes": self.total}


def _fake_modules(*modules: torch.nn.Module) -> None:
    """Give meta-built modules fake CPU storage (per-parameter dtypes kept) inside a FakeTensorMode."""
    for m in modules:
        if m is not None:
            m.to_empty(device="cpu")


def measure_step(cfg: Config, batch: int, rank: int, checkpointing: bool, accum: int, name: str = "") -> Measured:
    """Peak memory and FLOPs of one steady-state optimizer step of ``cfg`` at ``batch``, ``rank``
    (alpha = 2 x rank as the presets), ``checkpointing`` and ``accum`` micro-batches."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from catvton.config import config_from_dict

    c = config_from_dict(cfg.to_dict())
    c.train.batch_size, c.train.grad_accum, c.train.gradient_checkpointing = batch, accum, checkpointing
    c.lora.rank, c.lora.alpha = rank, float(cfg.lora.alpha / cfg.lora.rank * rank)
    dtype = torch.bfloat16 if c.train.precision == "bf16" else torch.float32
    t0 = time.perf_counter()
    with weightless():
        model = engine.build_transformer(c, torch.device("meta"), dtype)
    text_dim, pooled_dim = model.config.joint_attention_dim, model.config.pooled_projection_dim
    with FakeTensorMode(allow_non_fake_inputs=True):
        _fake_modules(model)
        cpu = torch.device("cpu")
        params = engine.trainable_parameters(model)
        optimizer, scheduler = engine.make_optimizer(c, params, 10)
        for p in params:  # steady state: AdamW's moments exist before the measured step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(0)
        text = engine.TextContext(text_embeds(c, g, text_dim, pooled_dim), latent_hw(c), cpu, dtype)
        micro = [cache_batch(c, batch, g) for _ in range(accum)]
        loss_fn = functools.partial(engine.fill_loss, text=text, cfg=c, generator=g,
                                    garment_dropout=c.train.garment_dropout)
        tracker = _tracker()
        tracker.track_external(model, optimizer, text.prompt, text.pooled, text.img_ids, text.txt_ids, *(
            v for m in micro for v in m.values() if torch.is_tensor(v)))
        with FlopCount() as flops, tracker:
            engine.train_step(model, micro, loss_fn, optimizer, scheduler, params, c.train.max_grad_norm)
        cats = _categories(tracker.get_tracker_snapshot("peak"))
    return Measured(name or f"train b{batch} r{rank} ckpt {'on' if checkpointing else 'off'}", cats,
                    sum(cats.values()), flops.total, time.perf_counter() - t0, batch, rank,
                    checkpointing)


def measure_config(cfg: Config) -> Measured:
    """The measured peak of ``cfg``'s own steady-state step (its batch, rank and checkpointing; two
    micro-batches when it accumulates): a hub base as FLUX.1-Fill-dev (the weightless folder, full
    depth), a local folder (the tiny model, once resolved) from its own configs. What
    ``easy_train.py test`` prints beside the planner's prediction."""
    from catvton.model.loading import _local_path

    t = cfg.train
    with tempfile.TemporaryDirectory(prefix="catvton-dryrun-") as tmp:
        hub = _local_path(cfg.model.base) is None or (cfg.model.transformer_override is not None
                                                       and _local_path(cfg.model.transformer_override) is None)
        c = dry_config(cfg, write_skeleton(Path(tmp) / "flux-fill"), Path(tmp)) if hub else cfg
        return measure_step(c, t.batch_size, cfg.lora.rank, t.gradient_checkpointing, accum=min(2, t.grad_accum),
                            name="this config's step")


def _measure_call(name: str, modules: list, call: Callable[[], Any], batch: int) -> Measured:
    """Peak and FLOPs of ``call()`` (no gradients) with ``modules`` (and optimizers) resident, their
    tensors fake. Run outside the fake mode: the pipeline's CPU side (an input photo's tensor, its
    ``min() < 0`` check) runs for real and is not counted; what meets a fake weight turns fake."""
    tracker = _tracker()
    tracker.track_external(*[m for m in modules if m is not None])  # modules and optimizers
    t0 = time.perf_counter()
    with torch.no_grad(), FlopCount() as flops, tracker:
        call()
    cats = _categories(tracker.get_tracker_snapshot("peak"))
    return Measured(name, cats, sum(cats.values()), flops.total, time.perf_counter() - t0, batch)


def measure_grid(cfg: Config) -> Measured:
    """Rank 0's checkpoint-time sample grid (``run.samples`` pairs through the pipeline at the
    training canvas, :func:`catvton.train.loop._sample_grid`'s ``TryOn.from_parts`` + ``fill_canvases``)
    beside the training state: the trained model and its optimizer state. The pipeline's VAE joins
    the worker's memory at that moment. The pipeline is assembled before the fake mode (its
    scheduler reads numbers), then its models get fake storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from catvton.infer.tryon import TryOn

    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    with weightless():
        model = engine.build_transformer(cfg, torch.device("meta"), dtype)
        text_dim, pooled_dim = model.config.joint_attention_dim, model.config.pooled_projection_dim
        tryon = TryOn.from_parts(cfg, transformer=model, text_embeds=text_embeds(cfg, g, text_dim, pooled_dim))
    samples = sample_rows(cfg, cfg.run.samples)
    canvases, masks = samples["canvas"].astype(np.float32) / 255.0, samples["mask"].astype(np.float32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _fake_modules(model, tryon.pipe.vae)
        _fake_embeds(tryon)
        params = engine.trainable_parameters(model)
        optimizer, _ = engine.make_optimizer(cfg, params, 10)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return _measure_call(f"sample grid ({cfg.run.samples} pairs)", [model, tryon.pipe.vae, optimizer],
                         lambda: tryon.fill_canvases(canvases, masks), cfg.run.samples)


def _fake_embeds(tryon) -> None:
    """The try-on's prompt embeddings as fake tensors of the same shape and dtype (inside the mode)."""
    tryon.prompt_embeds = torch.empty(tryon.prompt_embeds.shape, dtype=tryon.prompt_embeds.dtype)
    tryon.pooled = torch.empty(tryon.pooled.shape, dtype=tryon.pooled.dtype)


def measure_serving(settings, batches: list[int]) -> list[Measured]:
    """A Serve replica (loaded as :meth:`TryOnService.load` loads it: whatever it keeps resident)
    answering one batch of each size in ``batches`` (2 denoising steps: each step's peak repeats)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with weightless():
        service = load_service(settings, "meta")
    pipe = service.tryon.pipe
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    with FakeTensorMode(allow_non_fake_inputs=True):
        _fake_modules(*modules)
        _fake_embeds(service.tryon)
    return [_measure_call(f"serve batch {n}", modules, lambda n=n: serve_request(service, n), n) for n in batches]


# ---------------------------------------------------------------------------------------------
# The command


def _gb(n: float) -> str:
    return f"{n / GB:6.2f}"


def quiet_libraries() -> None:
    """Library chatter off the console: the dry run loads models without weights on purpose."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore", message=".*(meta parameter|copying from a non-meta).*")
    warnings.filterwarnings("ignore", message="invalid value encountered in cast")  # NaN pictures from meta
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


TABLE_HEAD = (f"{'row':34s} {'params':>7s} {'grads':>6s} {'optim':>6s} {'activ':>6s} {'temps':>6s} {'other':>6s} "
              f"{'tensors':>8s} {'GPU':>7s} {'TFLOP':>7s}")


def table_line(r: Measured) -> str:
    c = r.categories
    other = c["buffers"] + c["inputs"] + c["other"]
    line = (f"{r.name:34s} {_gb(c['parameters']):>7s} {_gb(c['gradients']):>6s} {_gb(c['optimizer']):>6s} "
            f"{_gb(c['activations']):>6s} {_gb(c['temporaries']):>6s} {_gb(other):>6s} "
            f"{_gb(r.tensor_peak):>8s} {_gb(r.total):>7s} {r.flops / 1e12:7.1f}")
    if r.planned_tensors:
        line += (f"   planner {r.planned_tensors / GB:.2f} GB ({100 * (r.planned_tensors / r.tensor_peak - 1):+.0f}%), "
                 f"{r.planned_flops / 1e12:.1f} TFLOP ({100 * (r.planned_flops / r.flops - 1):+.0f}%)")
    return line


def with_plan(row: Measured, cfg: Config, base: Path, accum: int) -> Measured:
    """``row`` with the planner's figures for the same step (its transformer's config, canvas, batch,
    rank, checkpointing; plain AdamW as measured; ``accum`` micro-batches of FLOPs)."""
    from catvton.train.planner import plan, trained_transformer

    p = plan(cfg.canvas.half_width, cfg.canvas.half_height, row.batch, rank=row.rank, targets=cfg.lora.targets,
             gradient_checkpointing=row.checkpointing, gpu="L40S", optimizer="adamw",
             text_tokens=cfg.model.max_sequence_length, model=trained_transformer(str(base)),
             precision=cfg.train.precision)
    row.planned_tensors = p.peak_bytes - p.context_bytes
    row.planned_flops = accum * (p.flops_forward + p.flops_backward + (p.flops_recompute if row.checkpointing else 0))
    return row


TABLE_FOOT = (f"GB = 1e9 bytes; 'GPU' = tensors x {1 + SLACK:.2f} (allocator slack) + {CONTEXT_BYTES / GB:.1f} GB "
              "(CUDA context, workspaces); TFLOP per optimizer step (per call for the grid and Serve rows)")


def table(rows: list[Measured]) -> str:
    return "\n".join([TABLE_HEAD, "-" * len(TABLE_HEAD), *(table_line(r) for r in rows), TABLE_FOOT])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m catvton.train.dryrun", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "l40s.yaml"), help="the job's config (default: configs/l40s.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override on top of the config (repeatable)")
    p.add_argument("--blocks", nargs=2, type=int, metavar=("D", "S"),
                   help="double and single blocks (default FLUX's 19 and 38); full width and canvas always")
    p.add_argument("--serve-config", default=SERVE_CONFIG, help="serve config whose replica is checked ('' skips it)")
    p.add_argument("--placement-only", action="store_true", help="only the meta run (seconds), no memory rows")
    p.add_argument("--rows", choices=["preset", "all"], default="preset",
                   help="preset: the config's own step, rank 0's sample grid and the Serve replica (~5 CPU minutes at "
                        "full depth); all: + batch 1/2 x rank 16/64 x checkpointing on/off (~2.5 CPU minutes a row)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    quiet_libraries()
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        print(f"config: {e}", file=sys.stderr)
        return 2
    serve_path = (REPO / a.serve_config) if a.serve_config else None
    if serve_path is not None and not serve_path.is_file():
        print(f"--serve-config {serve_path} does not exist ('' skips the Serve stages)", file=sys.stderr)
        return 2
    blocks = tuple(a.blocks) if a.blocks else None
    result: dict[str, Any] = {"config": a.config, "overrides": a.overrides, "blocks": blocks,
                              "canvas": [cfg.canvas.half_width, cfg.canvas.half_height],
                              "context_bytes": CONTEXT_BYTES, "slack": SLACK}
    with tempfile.TemporaryDirectory(prefix="catvton-dryrun-") as tmp:
        base = write_skeleton(Path(tmp) / "flux-fill", blocks)
        dcfg = dry_config(cfg, base, Path(tmp))
        h, w = latent_hw(dcfg)
        print(f"dry run of {a.config}: FLUX.1-Fill-dev at full width, "
              f"{'19 + 38' if blocks is None else f'{blocks[0]} + {blocks[1]}'} blocks, canvas 2 x "
              f"{cfg.canvas.half_width}x{cfg.canvas.half_height} ({h * w // 4} image + {cfg.model.max_sequence_length} "
              f"text tokens), batch {cfg.train.batch_size} x {cfg.train.grad_accum}, LoRA r{cfg.lora.rank}")
        try:
            result["placement"] = check_placement(dcfg, base, Path(tmp), serve_path)
        except DryRunFailed as e:
            print(f"dry run FAILED in {e}", file=sys.stderr)
            result["failed"] = {"stage": e.stage, "where": e.where, "error": str(e.error).splitlines()[0]}
            _write(a.json, result)
            return 1
        result["params"] = result["placement"]["params"]
        if a.placement_only:
            _write(a.json, result)
            return 0
        t = dcfg.train
        specs = [(t.batch_size, dcfg.lora.rank, t.gradient_checkpointing, "preset step")]
        if a.rows == "all":
            specs += [(b, r, ck, "") for ck in (True, False) for r in (16, 64) for b in (1, 2)]
        rows: list[Measured] = []

        def add(row: Measured) -> None:  # printed and saved as measured: a long run keeps what it did
            rows.append(row)
            print(f"{table_line(row)}   ({row.seconds:.0f} s)", flush=True)
            result["rows"] = [r.to_dict() for r in rows]
            _write(a.json, result, quiet=True)

        print(TABLE_HEAD + "\n" + "-" * len(TABLE_HEAD), flush=True)
        accum = min(2, t.grad_accum)
        for batch, rank, ck, name in specs:
            add(with_plan(measure_step(dcfg, batch, rank, ck, accum=accum, name=name), dcfg, base, accum))
        grid = measure_grid(dcfg)
        add(grid)
        if serve_path is not None:
            settings = serve_settings(serve_path, None, base)
            for row in measure_serving(settings, sorted({1, settings.max_batch_size})):
                add(row)
        print(TABLE_FOOT)
        preset = rows[0]
        result["training_peak_bytes"] = max(preset.total, grid.total)
        result["serving_peak_bytes"] = max((r.total for r in rows if r.name.startswith("serve")), default=None)
        print(f"training peak of this config (its step, and rank 0's sample grid beside the training state; "
              f"context and slack included): {result['training_peak_bytes'] / GB:.1f} GB a GPU")
        if result["serving_peak_bytes"] is not None:
            print(f"serving peak at max_batch_size {settings.max_batch_size}: {result['serving_peak_bytes'] / GB:.1f} GB "
                  "a replica")
    _write(a.json, result)
    return 0


def _write(path: str | None, result: dict, quiet: bool = False) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
        if not quiet:
            print(f"written to {path}")


if __name__ == "__main__":
    sys.exit(main())
