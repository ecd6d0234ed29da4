"""FLUX.1-Fill-dev without its weights: the diffusers folder layout with every component's config,
for the dry run that checks the GPU job on a CPU (:mod:`catvton.train.dryrun`).

The folder holds what ``FluxFillPipeline.save_pretrained`` writes minus the weight files:
``model_index.json``, ``transformer/config.json``, ``vae/config.json``, ``text_encoder/`` and
``text_encoder_2/`` ``config.json``, ``scheduler/scheduler_config.json`` and two small tokenizers.
Inside :func:`catvton.model.loading.weightless` the project's loaders build each model from its
config on the ``meta`` device, so the job's own loading code runs at full size and allocates nothing::

    folder = write_skeleton(tmp / "flux-fill")                     # 19 + 38 blocks, as FLUX.1-Fill-dev
    folder = write_skeleton(tmp / "flux-fill", blocks=(1, 1))      # full width, 1 + 1 blocks (tests)
    with weightless():
        pipe = load_pipeline(str(folder), torch_dtype=torch.bfloat16, device="meta")

The configs are the hub repository's (``black-forest-labs/FLUX.1-Fill-dev``, diffusers 0.42 / transformers 5
names); ``xiaozaa/catvton-flux-alpha`` has the transformer's. The tokenizers are not the real ones:
they spell words letter by letter, but pad to the real lengths (77 CLIP, 512 T5 tokens), which is
all that shapes depend on.
"""

from __future__ import annotations

import json
from pathlib import Path

FLUX_FILL_TRANSFORMER = dict(in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
"""FLUX.1-Fill-dev's ``transformer/config.json`` (11,902,391,360 parameters)."""

FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
"""FLUX.1's ``vae/config.json``."""

CLIP_L = dict(architectures=["CLIPTextModel"], model_type="clip_text_model", hidden_size=768, intermediate_size=3072,
              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
              projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
"""CLIP ViT-L/14's text model (``text_encoder/config.json``)."""

T5_XXL = dict(architectures=["T5EncoderModel"], model_type="t5", d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
              num_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6, is_encoder_decoder=False,
              use_cache=False, tie_word_embeddings=False)
"""T5 v1.1 XXL's encoder (``text_encoder_2/config.json``; 4.76B parameters)."""

SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                 use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096)

MODEL_INDEX = {
    "_class_name": "FluxFillPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _tokenizers():
    """A CLIP and a T5 tokenizer over printable ASCII (no merges, no pieces beyond letters), padding
    to CLIP's 77 and T5's 512 tokens as the pipeline asks."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    t5 = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
                         + [(c, -3.0) for c in chars], extra_ids=0, model_max_length=512)
    return clip, t5


def write_skeleton(folder: str | Path, blocks: tuple[int, int] | None = None) -> Path:
    """FLUX.1-Fill-dev's folder without weights in ``folder``; ``blocks`` = (double, single) blocks
    of the transformer (default FLUX's 19 and 38: full width always)."""
    folder = Path(folder)
    transformer = dict(FLUX_FILL_TRANSFORMER)
    if blocks is not None:
        transformer.update(num_layers=int(blocks[0]), num_single_layers=int(blocks[1]))
    _json(folder / "model_index.json", MODEL_INDEX)
    _json(folder / "transformer" / "config.json", {"_class_name": "FluxTransformer2DModel", **transformer})
    _json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL", **FLUX_VAE})
    _json(folder / "text_encoder" / "config.json", CLIP_L)
    _json(folder / "text_encoder_2" / "config.json", T5_XXL)
    _json(folder / "scheduler" / "scheduler_config.json", SCHEDULER)
    clip, t5 = _tokenizers()
    clip.save_pretrained(folder / "tokenizer")
    t5.save_pretrained(folder / "tokenizer_2")
    return folder
