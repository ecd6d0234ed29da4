"""The tiny offline FLUX Fill base: the real diffusers folder layout, built in code, no network.

Everything that runs offline (tests, the CPU preset, CI) loads this base through the same
``FluxFillPipeline.from_pretrained(folder)`` call that loads FLUX.1-Fill-dev, so the tiny path and
the production path share every line of loading code. The folder is what
``FluxFillPipeline(...).save_pretrained`` writes::

    model_index.json  transformer/  vae/  text_encoder/  text_encoder_2/
    tokenizer/  tokenizer_2/  scheduler/  tiny_base.json (build parameters and VAE PSNR)

The components, scaled down from FLUX.1-Fill-dev but wired the same way:

- transformer: 2 double + 2 single blocks, 4 heads x 16 = 64 wide, ``in_channels=384``
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

Build it (about 3 CPU minutes, mostly VAE training) or find the cached one::

    python -m catvton.offline.tiny_base --out /tmp/tiny-base        # build into a folder
    python -c "from catvton.offline.tiny_base import ensure_tiny_base; print(ensure_tiny_base())"
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from catvton import artifacts
from catvton.artifacts import TINY_BASE_INFO
from catvton.offline.tiny_vae import (CUTOUT_SIZE, MAX_EVAL_IMAGES, PHOTO_SIZE, SYNTHETIC_IMAGE_SIZE, latent_statistics,
                                      new_vae, reconstruction_psnr, train_vae, vae_image_sets)

TINY_BASE_VERSION = "tiny-flux-fill-v1"
"""Bump when anything below changes what is built: it is part of the cache folder's hash."""

CATVTON_PROMPT = (
    "The pair of images highlights a clothing and its styling on a model, high resolution, "
    "4K, 8K; [IMAGE1] Detailed product shot of a clothing [IMAGE2] The same cloth is worn by "
    "a model in a lifestyle setting."
)
"""The CatVTON-Flux prompt; its words are whole tokens of the tiny tokenizers. A copy of
``ModelConfig.prompt`` kept here on purpose: the built base must not change when a config does."""


# Transformer: FLUX Fill wiring at 64 wide. axes_dims_rope must sum to attention_head_dim.
TRANSFORMER_KWARGS: dict[str, Any] = dict(
    patch_size=1,
    in_channels=384,
    out_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

# VAE: 4 blocks -> scale factor 2**3 = 8; 16 latent channels; no quant convs (FLUX's VAE has none).
# Widths: the full-resolution level dominates CPU time, so it is kept narrow (16) and the
# capacity sits in the lower-resolution levels.
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

T5_MAX_LENGTH = 512
"""FluxFillPipeline pads T5 input to ``max_sequence_length`` (default 512)."""
CLIP_MAX_LENGTH = 77
T5_EXTRA_IDS = 8



# --------------------------------------------------------------------------------------------
# Tokenizers and text encoders
# --------------------------------------------------------------------------------------------


def _prompt_words(text: str = CATVTON_PROMPT) -> list[str]:
    """Distinct words of ``text`` in order of appearance (case kept)."""
    seen: dict[str, None] = {}
    for w in re.findall(r"[A-Za-z]+", text):
        seen.setdefault(w, None)
    return list(seen)


def build_clip_tokenizer():
    """A CLIP byte-level BPE tokenizer over printable ASCII plus merges that spell the prompt's words.

    CLIP lowercases and splits words off punctuation; every printable ASCII character maps to
    itself in byte-level BPE, so characters (bare and with the ``</w>`` end-of-word mark) cover
    any ASCII text, and the merges make most prompt words single tokens.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for code in range(33, 127):
        c = chr(code)
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in _prompt_words()}):
        parts = list(word)
        parts[-1] += "</w>"
        cur = parts[0]
        for nxt in parts[1:]:
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer():
    """A T5 (unigram) tokenizer: the prompt's words as ``▁word`` pieces, ASCII characters as fallback.

    T5 is case-sensitive, so words are taken as written. Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2,
    as in T5; ``model_max_length`` is 512 so that the pipeline's padding to 512 is not truncated.
    """
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for w in _prompt_words():
        add("▁" + w, -1.0)
        add(w, -1.5)  # inside brackets: "[IMAGE1]" -> "▁[", "IMAGE", "1", "]"
    for code in range(33, 127):
        add(chr(code), -5.0)
        add("▁" + chr(code), -5.0)
    for i in range(T5_EXTRA_IDS - 1, -1, -1):  # extra ids last, in reverse, as in T5
        pieces.append((f"<extra_id_{i}>", 0.0))
    return T5TokenizerFast(vocab=pieces, extra_ids=T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH)


def build_text_encoders(seed: int):
    """``(tokenizer, text_encoder, tokenizer_2, text_encoder_2)``: tiny CLIP and T5, random init."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,  # pooler_output (the eos token's state) -> pooled_projection_dim=32
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=32,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooling takes the first eos position
        pad_token_id=tokenizer.pad_token_id,
    )
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,  # -> joint_attention_dim=32
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(clip_config)
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(t5_config)
    return tokenizer, text_encoder.eval(), tokenizer_2, text_encoder_2.eval()


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
    vae_steps: int = 800,
    synthetic_pids: int = 120,
    log: Callable[[str], None] = print,
) -> dict:
    """Build the tiny FLUX Fill base into ``out_dir`` (created; must be empty) and describe it.

    Writes the diffusers layout with ``FluxFillPipeline.save_pretrained`` plus ``tiny_base.json``
    (build parameters, parameter counts, the trained and the random VAE's held-out PSNR, the latent
    shift/scale, timings), and returns that dict. Deterministic from ``seed``; the caller's global
    torch RNG state is left as it was.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: build the tiny base into a new or empty folder")
    if vae_steps < 0 or synthetic_pids < 4:
        raise ValueError(f"vae_steps={vae_steps} must be >= 0 and synthetic_pids={synthetic_pids} >= 4")
    t0 = time.time()
    info = _build(out_dir, seed, vae_steps, synthetic_pids, log)
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
        "version": TINY_BASE_VERSION,
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
    }
    return info


def tiny_base_key(seed: int = 0, vae_steps: int = 800, synthetic_pids: int = 120) -> str:
    """Cache folder name: ``tiny-base-<hash of the build parameters and the version>``."""
    params = {
        "version": TINY_BASE_VERSION,
        "seed": seed,
        "vae_steps": vae_steps,
        "synthetic_pids": synthetic_pids,
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
    """The cached tiny base folder, built on first use (about 3 CPU minutes), through
    :func:`catvton.artifacts.build_once` (temporary folder, rename, a lock for concurrent callers)."""
    root = Path(cache_root).expanduser() if cache_root is not None else artifacts.cache_root()
    final = root / tiny_base_key(seed)
    if is_tiny_base(final):
        return final

    def build(tmp: Path) -> None:
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
        default=800,
        help="VAE training steps (800: ~20 dB held-out PSNR in a few CPU minutes; with --out only)",
    )
    parser.add_argument(
        "--synthetic-pids",
        type=int,
        default=120,
        help="synthetic items for VAE training (with --out only)",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.out is None:
        if (args.vae_steps, args.synthetic_pids) != (800, 120):
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
