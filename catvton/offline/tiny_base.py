"""The tiny offline FLUX Fill base: the real diffusers folder layout, built in code, no network.

Everything that runs offline (tests, the CPU preset, CI) loads this base through the same
``FluxFillPipeline.from_pretrained(folder)`` call that loads FLUX.1-Fill-dev, so the tiny path and
the production path share every line of loading code. The folder is what
``FluxFillPipeline(...).save_pretrained`` writes::

    model_index.json  transformer/  vae/  text_encoder/  text_encoder_2/
    tokenizer/  tokenizer_2/  scheduler/  tiny_base.json (build parameters and VAE PSNR)

The components, scaled down from FLUX.1-Fill-dev but wired the same way:

- transformer: 2 double + 2 single blocks, 8 heads x 16 = 128 wide, ``in_channels=384``
  (64 noisy latent + 64 masked-image latent + 256 mask), ``out_channels=64``, guidance embedding.
  Random init: the project's own fine-tuning pre-trains it.
- VAE: 4-block ``AutoencoderKL`` (scale factor 8, 16 latent channels, no quant convs, as FLUX's),
  about 0.6M parameters, *pre-trained* here on synthetic people and garment cut-outs, because a
  random VAE decodes noise and nothing downstream could be judged. ``shift_factor`` and
  ``scaling_factor`` are set from its latent statistics, as FLUX's are.
- text encoders: a 32-wide CLIP text model (its pooled output feeds ``pooled_projection_dim=32``)
  and a 32-wide T5 encoder (``joint_attention_dim=32``), random init; tokenizers built in code from
  characters plus the words of the CatVTON-Flux prompt.
- scheduler: ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-Fill-dev's config.

Build it (about 6 CPU minutes, mostly VAE training) or find the cached one::

    python -m catvton.offline.tiny_base --out /tmp/tiny-base        # build into a folder
    python -c "from catvton.offline.tiny_base import ensure_tiny_base; print(ensure_tiny_base())"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from catvton import artifacts
from catvton.artifacts import TINY_BASE_INFO
from catvton.offline import prebuilt
from catvton.offline.tiny_text import build_text_encoders
from catvton.offline.tiny_vae import (CUTOUT_SIZE, MAX_EVAL_IMAGES, PHOTO_SIZE, SYNTHETIC_IMAGE_SIZE, VAE_STEPS,
                                      latent_statistics, new_vae, reconstruction_psnr, train_vae, vae_image_sets)

BUILDER = "catvton.offline.tiny_base"
"""The base's builder, named (not ``__name__``: ``python -m`` runs it as ``__main__``)."""

BUILD_THREADS = 2
"""Torch threads of every build, whatever the caller uses: the weights depend on the thread count
(measured: 1 and 2 threads give other VAE weights), so it is fixed, not inherited. 2 keeps the
build at ~6 minutes on the 2-core machines this project targets."""

# Transformer: FLUX Fill wiring at 128 wide. axes_dims_rope must sum to attention_head_dim. 64 wide
# (4 heads) trained 2x faster but copied garments weakly: own-vs-swapped margin 2.95 / 3.39 dB on
# full / lower against 3.25 / 4.31 at 128 (docs/PERFORMANCE.md, issue 12).
TRANSFORMER_KWARGS: dict[str, Any] = dict(
    patch_size=1,
    in_channels=384,
    out_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=8,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

# FLUX.1-Fill-dev's scheduler config (scheduler/scheduler_config.json on the hub).
SCHEDULER_KWARGS: dict[str, Any] = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def new_transformer(seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed + 3)
    return FluxTransformer2DModel(**TRANSFORMER_KWARGS).eval()


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_KWARGS)


# --------------------------------------------------------------------------------------------
# Build and cache
# --------------------------------------------------------------------------------------------


def _param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_tiny_base(
    out_dir: Path,
    seed: int = 0,
    vae_steps: int = VAE_STEPS,
    synthetic_pids: int = 120,
    log: Callable[[str], None] = print,
) -> dict:
    """Build the tiny FLUX Fill base into ``out_dir`` (created; must be empty) and describe it.

    Writes the diffusers layout with ``FluxFillPipeline.save_pretrained`` plus ``tiny_base.json``
    (build parameters, parameter counts, the trained and the random VAE's held-out PSNR, the latent
    shift/scale, timings), and returns that dict. Deterministic from ``seed`` whatever process
    calls it: the build runs on :data:`BUILD_THREADS` torch threads (a float sum over another
    thread count rounds differently, and thousands of VAE steps amplify that into other weights); the
    caller's thread count and global torch RNG state are left as they were.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: build the tiny base into a new or empty folder")
    if vae_steps < 0 or synthetic_pids < 4:
        raise ValueError(f"vae_steps={vae_steps} must be >= 0 and synthetic_pids={synthetic_pids} >= 4")
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        info = _build(out_dir, seed, vae_steps, synthetic_pids, log)
    finally:
        torch.set_num_threads(threads)
    info["build_seconds"] = round(time.time() - t0, 1)
    (out_dir / TINY_BASE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log(f"tiny base written to {out_dir} in {info['build_seconds']:.0f} s")
    return info


def _build(out_dir: Path, seed: int, vae_steps: int, synthetic_pids: int, log: Callable[[str], None]) -> dict:
    from diffusers import FluxFillPipeline

    with torch.random.fork_rng(devices=[]):
        transformer = new_transformer(seed)
        tokenizer, text_encoder, tokenizer_2, text_encoder_2 = build_text_encoders(seed)
        vae = new_vae(seed)

        train_images, heldout = vae_image_sets(synthetic_pids, seed)
        eval_images = heldout[:MAX_EVAL_IMAGES]
        log(
            f"tiny VAE: {_param_count(vae):,} params; {len(train_images)} training images, "
            f"{len(eval_images)} held out (photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, "
            f"cut-outs {CUTOUT_SIZE[0]}x{CUTOUT_SIZE[1]})"
        )
        random_psnr = reconstruction_psnr(vae, eval_images)
        t_vae = time.time()
        train_vae(vae, train_images, vae_steps, seed, log=log)
        vae_seconds = time.time() - t_vae
        psnr = reconstruction_psnr(vae, eval_images)
        log(f"tiny VAE: held-out PSNR {psnr:.2f} dB (random init {random_psnr:.2f} dB), {vae_seconds:.0f} s")
        shift, scale = latent_statistics(vae, train_images[:: max(1, len(train_images) // 256)], seed)
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)

    pipe = FluxFillPipeline(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    for module in (vae, text_encoder, text_encoder_2, transformer):
        module.eval()
        assert all(p.dtype == torch.float32 for p in module.parameters())
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir)

    info = {
        "source": builder_source_hash(),
        "seed": seed,
        "vae_steps": vae_steps,
        "synthetic_pids": synthetic_pids,
        "synthetic_image_size": SYNTHETIC_IMAGE_SIZE,
        "vae_psnr_db": round(psnr, 3),
        "random_vae_psnr_db": round(random_psnr, 3),
        "vae_train_images": len(train_images),
        "vae_heldout_images": len(eval_images),
        "vae_shift_factor": shift,
        "vae_scaling_factor": scale,
        "params": {
            "transformer": _param_count(transformer),
            "vae": _param_count(vae),
            "text_encoder": _param_count(text_encoder),
            "text_encoder_2": _param_count(text_encoder_2),
        },
        "vae_train_seconds": round(vae_seconds, 1),
        "build_threads": torch.get_num_threads(),
    }
    return info


def builder_source_hash() -> str:
    """The digest of the builder's source and of everything it imports (the VAE trains on synthetic
    rows, so the renderer is in it): any change to how the base is built names a new folder, so a
    stale build is never reused (no version to forget to bump)."""
    return artifacts.source_digest(BUILDER)


def tiny_base_key(seed: int = 0, vae_steps: int = VAE_STEPS, synthetic_pids: int = 120) -> str:
    """Cache folder name: ``tiny-base-<hash>`` of everything that decides the weights: the build
    parameters, :data:`BUILD_THREADS`, the builder's source (:func:`builder_source_hash`). Not the caller's
    thread count: the build does not depend on it."""
    params = {
        "seed": seed,
        "vae_steps": vae_steps,
        "synthetic_pids": synthetic_pids,
        "build_threads": BUILD_THREADS,
        "source": builder_source_hash(),
    }
    return f"tiny-base-{artifacts.content_hash(params)}"


def is_tiny_base(folder: Path) -> bool:
    """A finished tiny base: the diffusers layout and ``tiny_base.json``."""
    return (Path(folder) / "model_index.json").is_file() and (Path(folder) / TINY_BASE_INFO).is_file()


def ensure_tiny_base(
    cache_root: str | Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """The cached tiny base folder, copied on first use from the repository's shipped one
    (:mod:`catvton.offline.prebuilt`) when its key matches, else built (about 6 CPU minutes), through
    :func:`catvton.artifacts.build_once` (temporary folder, rename, a lock for concurrent callers)."""
    root = Path(cache_root).expanduser() if cache_root is not None else artifacts.cache_root()
    final = root / tiny_base_key(seed)
    if is_tiny_base(final):
        return final

    def build(tmp: Path) -> None:
        src = prebuilt.shipped(final.name)
        if src is not None:
            log(f"tiny base: copying the one shipped in the repository into {final} "
                f"({prebuilt.SWITCH}=0 builds it instead)")
            prebuilt.copy_into(src, tmp)
            if not (tmp / "transformer").is_dir():  # shipped without its random init (7 MB): re-made from the seed
                with torch.random.fork_rng(devices=[]):
                    new_transformer(seed).save_pretrained(tmp / "transformer")
            return
        log(f"building the tiny FLUX Fill base into {final} (once; cached afterwards)")
        build_tiny_base(tmp, seed=seed, log=log)

    artifacts.build_once(final, build, is_tiny_base, log=log, what="tiny base")
    log(f"tiny base ready: {final}")
    return final


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m catvton.offline.tiny_base",
        description=(
            "Build the tiny offline FLUX Fill base (diffusers layout, loadable with "
            "FluxFillPipeline.from_pretrained). Without --out it goes to the cache that "
            "base='tiny' loads ($CATVTON_CACHE or ~/.cache/catvton) and is reused if there."
        ),
        epilog="Example: python -m catvton.offline.tiny_base --out /tmp/tiny-base --vae-steps 200",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder to write (new or empty); default: the cache"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of every random init and of the VAE training"
    )
    parser.add_argument(
        "--vae-steps",
        type=int,
        default=VAE_STEPS,
        help=f"VAE training steps ({VAE_STEPS}: ~24 dB held-out PSNR in ~5 CPU minutes; with --out only)",
    )
    parser.add_argument(
        "--synthetic-pids",
        type=int,
        default=120,
        help="synthetic items for VAE training (with --out only)",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.out is None:
        if (args.vae_steps, args.synthetic_pids) != (VAE_STEPS, 120):
            parser.error(
                "--vae-steps / --synthetic-pids other than the defaults need --out "
                "(the cache holds the defaults)"
            )
        folder = ensure_tiny_base(seed=args.seed)
        info = json.loads((folder / TINY_BASE_INFO).read_text())
    else:
        folder = args.out
        info = build_tiny_base(
            folder, seed=args.seed, vae_steps=args.vae_steps, synthetic_pids=args.synthetic_pids
        )
    print(f"tiny base: {folder.resolve()}")
    print(
        f"VAE held-out PSNR: {info['vae_psnr_db']:.2f} dB "
        f"(random init: {info['random_vae_psnr_db']:.2f} dB); build {info['build_seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
