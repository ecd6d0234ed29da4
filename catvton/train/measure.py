"""Memory and FLOPs of the GPU job's own functions at full size, measured on a CPU under
``FakeTensorMode`` (fake CPU tensors allocate nothing): one training step of a config, rank 0's sample
grid beside the training state, a Serve replica's batch. The command is :mod:`catvton.train.dryrun`.

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

import dataclasses
import functools
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from catvton.config import Config
from catvton.model.loading import weightless
from catvton.model.skeleton import write_skeleton
from catvton.train import engine
from catvton.train.full_size import (
    cache_batch,
    dry_config,
    latent_hw,
    load_service,
    sample_rows,
    serve_request,
    text_embeds,
)

GB = 1e9


CONTEXT_BYTES = 1.0e9
"""CUDA context and library workspaces a GPU process holds beside its tensors (~0.5 GB context on
an L40S/H100 with CUDA 12, cuBLAS ~0.1 GB and cuDNN/flash workspaces; rounded up)."""


SLACK = 0.10
"""The caching allocator's reserve above the live tensor peak (fragmentation: reserved minus
allocated is typically 5-10% in a LoRA step), as a share of the measured tensor peak."""


CATEGORIES = ("parameters", "buffers", "gradients", "optimizer", "activations", "temporaries", "inputs", "other")


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
        from torch.utils.flop_counter import (
            flop_registry,
            sdpa_backward_flop_count,
            sdpa_flop_count,
        )

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


def _gb(n: float) -> str:
    return f"{n / GB:6.2f}"


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
