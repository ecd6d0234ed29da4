"""LoRA target presets: exact counts on the full-size model (meta device) and wrapping on a tiny one."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from catvton.model.lora import TARGET_PRESETS, count_lora_params, lora_config, lora_target_names
from catvton.train.flow import latent_image_ids, text_ids


@pytest.fixture(scope="module")
def full():
    from catvton.train.planner import full_size_transformer_meta

    return full_size_transformer_meta()


def tiny_transformer() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), in_channels=384, out_channels=64, guidance_embeds=True,
    ).eval()


def tiny_inputs(model) -> dict:
    g = torch.Generator().manual_seed(1)
    h, w, t = 4, 8, 5  # latent 4x8 -> 8 tokens
    s = (h // 2) * (w // 2)
    return dict(
        hidden_states=torch.randn(1, s, 384, generator=g), encoder_hidden_states=torch.randn(1, t, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.6]),
        img_ids=latent_image_ids(h, w), txt_ids=text_ids(t), guidance=torch.tensor([1.0]), return_dict=False,
    )


def test_full_size_parameter_count(full):
    assert full.proj_out.weight.device.type == "meta"
    assert sum(p.numel() for p in full.parameters()) == 11_902_391_360


@pytest.mark.parametrize("targets, expected, n_modules", [
    ("attention+ff", 65_372_160, 19 * 12 + 38 * 5),
    ("attention", 26_148_864, 19 * 8 + 38 * 3),
])
def test_full_size_lora_counts(full, targets, expected, n_modules):
    assert count_lora_params(full, 16, targets) == expected
    names = lora_target_names(full, targets)
    assert len(names) == n_modules
    assert "proj_out" not in names  # the final output layer
    assert ("single_transformer_blocks.37.proj_out" in names) == (targets == "attention+ff")


@pytest.mark.parametrize("name, attention, attention_ff", [
    ("transformer_blocks.0.attn.to_q", True, True),
    ("transformer_blocks.18.attn.to_out.0", True, True),
    ("transformer_blocks.3.attn.to_add_out", True, True),
    ("transformer_blocks.3.ff_context.net.2", False, True),
    ("transformer_blocks.3.ff.net.0.proj", False, True),
    ("single_transformer_blocks.37.attn.to_v", True, True),
    ("single_transformer_blocks.5.proj_mlp", False, True),
    ("single_transformer_blocks.5.proj_out", False, True),
    ("transformer.single_transformer_blocks.5.proj_out", False, True),  # inside a wrapper module
    ("proj_out", False, False),
    ("x_embedder", False, False),
    ("norm_out.linear", False, False),
    ("transformer_blocks.0.norm1.linear", False, False),
    ("single_transformer_blocks.0.norm.linear", False, False),
    ("transformer_blocks.0.attn.to_out", False, False),  # the ModuleList, not the Linear
    ("transformer_blocks.0.attn.to_q.lora_A.default", False, False),
    ("single_transformer_blocks.0.attn.add_q_proj", False, False),
])
def test_regexes(name, attention, attention_ff):
    assert bool(re.fullmatch(TARGET_PRESETS["attention"], name)) == attention
    assert bool(re.fullmatch(TARGET_PRESETS["attention+ff"], name)) == attention_ff


@pytest.mark.parametrize("targets", list(TARGET_PRESETS))
def test_add_adapter_wraps_exactly_the_preset_and_starts_as_identity(targets):
    model = tiny_transformer()
    expected = set(lora_target_names(model, targets))
    n_lora = count_lora_params(model, 4, targets)  # before wrapping: it walks nn.Linear modules
    with torch.no_grad():
        before = model(**tiny_inputs(model))[0]
    model.add_adapter(lora_config(rank=4, alpha=8.0, targets=targets))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == expected
    assert type(model.proj_out) is torch.nn.Linear
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == n_lora
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny_inputs(model))[0], before, rtol=0, atol=0)
        # the adapter is live: a non-zero B changes the output
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.lora_B["default"].weight.fill_(0.01)
        assert not torch.allclose(model(**tiny_inputs(model))[0], before)


def test_get_peft_model_and_extra_trainable():
    model = tiny_transformer()
    n_lora = count_lora_params(model, 4, "attention+ff")
    n_embed = sum(p.numel() for p in model.x_embedder.parameters())
    peft_model = get_peft_model(model, lora_config(4, 4.0, "attention+ff", extra_trainable=("x_embedder",)))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == n_lora + n_embed
    inner = peft_model.base_model.model
    assert type(inner.proj_out) is torch.nn.Linear
    assert isinstance(inner.single_transformer_blocks[1].proj_out, LoraLayer)


def test_lora_config_fields_and_errors():
    cfg = lora_config(16, 32.0, "attention")
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.init_lora_weights) == (16, 32.0, 0.0, True)
    assert cfg.target_modules == TARGET_PRESETS["attention"] and not cfg.modules_to_save
    with pytest.raises(ValueError, match="single block"):
        lora_config(16, 32.0, "attention+ff", extra_trainable=("proj_out",))
    with pytest.raises(ValueError, match="choose from"):
        lora_config(16, 32.0, "everything")
    with pytest.raises(ValueError, match="rank"):
        lora_config(0, 32.0, "attention")
