"""Which linear layers of the FLUX transformer get a LoRA: two presets, as peft regexes.

peft full-matches a *string* ``target_modules`` against every module name (``re.fullmatch``),
so a regex can say exactly which ``proj_out`` is meant. A plain list ``["proj_out"]`` would
suffix-match and also wrap the transformer's final output layer (measured; see FACTS).

Module names in diffusers' ``FluxTransformer2DModel`` (0.42), with their sizes at full size
(width 3072, MLP 12288):

- double blocks ``transformer_blocks.N`` (19): ``attn.to_q/to_k/to_v/to_out.0`` (image stream),
  ``attn.add_q_proj/add_k_proj/add_v_proj/to_add_out`` (text stream), ``ff.net.0.proj``
  (3072->12288), ``ff.net.2`` (12288->3072), and the same in ``ff_context``;
- single blocks ``single_transformer_blocks.N`` (38): ``attn.to_q/to_k/to_v`` (no output
  projection of their own), ``proj_mlp`` (3072->12288) and ``proj_out`` (15360->3072), which
  takes ``cat(attention output 3072, MLP activation 12288)``;
- top level: ``x_embedder``, ``context_embedder``, ``time_text_embed.*``, ``norm_out.linear``
  and the final ``proj_out`` (3072->64) — never LoRA targets.

Where the single block's ``proj_out`` belongs: it is the attention's output projection and the
MLP's down projection fused into one matrix, and 12,288 of its 15,360 inputs are MLP. It goes
with the feed-forward preset. The FACTS counts confirm this split: r=16 on ``attention`` without
it is 26,148,864 parameters; ``attention+ff`` with it is 65,372,160 (with it, ``attention``
would be 37,355,520; without it, ``attention+ff`` would be 54,165,504).

Presets (r=16, full size):

- ``attention``: the 8 attention linears of each of the 19 double blocks and q/k/v of each of
  the 38 single blocks: 266 modules, 26,148,864 parameters;
- ``attention+ff``: the above plus ``ff``/``ff_context`` (4 linears x 19) and ``proj_mlp``,
  ``proj_out`` (2 x 38): 418 modules, 65,372,160 parameters.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peft import LoraConfig

_DOUBLE_ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_DOUBLE_FF = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
_SINGLE_ATTN = ("to_q", "to_k", "to_v")
_SINGLE_FF = ("proj_mlp", "proj_out")


def _alt(names: tuple[str, ...]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _preset(double: tuple[str, ...], single: tuple[str, ...]) -> str:
    # An optional "anything." prefix lets the pattern work when the transformer sits inside
    # another module. "single_transformer_blocks" cannot match the double-block branch: that
    # branch needs a dot (or the start) right before "transformer_blocks".
    return rf"(?:.*\.)?(?:transformer_blocks\.\d+\.{_alt(double)}|single_transformer_blocks\.\d+\.{_alt(single)})"


TARGET_PRESETS: dict[str, str] = {
    "attention": _preset(
        tuple(f"attn.{n}" for n in _DOUBLE_ATTN),
        tuple(f"attn.{n}" for n in _SINGLE_ATTN),
    ),
    "attention+ff": _preset(
        tuple(f"attn.{n}" for n in _DOUBLE_ATTN) + _DOUBLE_FF,
        tuple(f"attn.{n}" for n in _SINGLE_ATTN) + _SINGLE_FF,
    ),
}
"""Preset name -> regex for ``LoraConfig(target_modules=...)`` (full-matched by peft)."""

EXTRA_TRAINABLE = ("x_embedder", "context_embedder", "norm_out")
"""Top-level modules that may be trained in full beside the LoRA (peft ``modules_to_save``)."""


def target_regex(targets: str) -> str:
    """The regex of a preset name; raises with the choices for anything else."""
    try:
        return TARGET_PRESETS[targets]
    except KeyError:
        raise ValueError(f"LoRA targets {targets!r}: choose from {list(TARGET_PRESETS)}") from None


def lora_config(rank: int, alpha: float, targets: str, extra_trainable: tuple[str, ...] = ()) -> LoraConfig:
    """A peft ``LoraConfig`` for the FLUX transformer.

    ``init_lora_weights=True``: A is Kaiming-uniform and B zero, so the adapted model starts
    exactly equal to the base. No dropout. The update is scaled by ``alpha / rank``.

    ``extra_trainable`` names top-level modules trained in full (peft ``modules_to_save``), e.g.
    ``("x_embedder",)`` so the adapter can re-learn how the 384 input channels are read. Only
    names from :data:`EXTRA_TRAINABLE` are accepted: peft matches ``modules_to_save`` by name
    suffix, so the final ``proj_out`` cannot be named there without also catching the 38 single
    blocks' ``proj_out`` (which would then lose their LoRA and be copied in full, 1.8B params).
    Train the final ``proj_out`` by setting ``requires_grad`` on ``model.proj_out`` yourself.
    """
    from peft import LoraConfig  # here, not at import: peft pulls in transformers (seconds)

    if rank < 1:
        raise ValueError(f"LoRA rank={rank}: must be at least 1")
    bad = [n for n in extra_trainable if n not in EXTRA_TRAINABLE]
    if bad:
        raise ValueError(
            f"extra_trainable {bad}: choose from {list(EXTRA_TRAINABLE)}"
            + (" ('proj_out' would also match every single block's proj_out in peft's modules_to_save; set "
               "transformer.proj_out.requires_grad_(True) after adding the adapter instead)"
               if "proj_out" in bad else "")
        )
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        init_lora_weights=True,
        target_modules=target_regex(targets),
        modules_to_save=list(extra_trainable) or None,
    )


def lora_target_names(model: torch.nn.Module, targets: str) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that the preset wraps (before wrapping)."""
    rx = re.compile(target_regex(targets))
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rx.fullmatch(n)]


def count_lora_params(model: torch.nn.Module, rank: int, targets: str) -> int:
    """LoRA parameters ``rank * (in + out)`` summed over the matched linears (no bias in LoRA).

    Reads only ``in_features``/``out_features``: works on a meta-device model, allocates nothing.
    """
    mods = dict(model.named_modules())
    return sum(rank * (mods[n].in_features + mods[n].out_features) for n in lora_target_names(model, targets))
