"""Auto-masks: a human-parsing model marks the worn garment, the training rule generalises it.

Without a mask in the request, the server asks a transformers semantic-segmentation model (a hub id
or a folder; e.g. ``mattmdjaga/segformer_b2_clothes``, a SegFormer trained on ATR human parsing)
which pixels belong to the labels of the requested garment group, then applies the same
:func:`catvton.data.masks.general_mask` as training. Labels are named, not numbered, and checked
against the model's ``id2label`` when it loads.

How well the auto-masks agree with the dataset's own masks (IoU per garment group) is measured
by ``python -m catvton.eval.automask_iou`` (evaluation sits above inference: this module reads
no dataset).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from catvton.config import MaskConfig
from catvton.data.masks import general_mask

ATR_LABELS = ("Background", "Hat", "Hair", "Sunglasses", "Upper-clothes", "Skirt", "Pants", "Dress", "Belt",
              "Left-shoe", "Right-shoe", "Face", "Left-leg", "Right-leg", "Left-arm", "Right-arm", "Bag", "Scarf")
"""The label set of ATR human parsing (``mattmdjaga/segformer_b2_clothes`` uses these names)."""

DEFAULT_GROUP_LABELS: dict[str, list[str]] = {
    "upper": ["Upper-clothes"],
    # a dress is removed to try on pants or a skirt: its region must be repainted too
    "lower": ["Pants", "Skirt", "Dress"],
    "full": ["Dress", "Upper-clothes", "Pants", "Skirt"],
}
"""Parser labels whose pixels make the worn-garment mask of each group (ATR names)."""


class ParserError(ValueError):
    """The parser cannot be used as configured; the message says why and what to pass."""


class AutoMasker:
    """A loaded segmentation model and the label ids of each garment group."""

    def __init__(self, model, processor, group_ids: dict[str, list[int]], ref: str):
        self.model = model
        self.processor = processor
        self.group_ids = group_ids
        self.ref = ref

    @classmethod
    def load(cls, ref: str, group_labels: dict[str, list[str]] | None = None,
             device: str = "cpu") -> "AutoMasker":
        """Model and processor from ``ref`` (safetensors only); label names checked against ``id2label``.
        ``group_labels`` replaces the label names of the groups it names; the others keep
        :data:`DEFAULT_GROUP_LABELS` (every group needs ids, or its requests would fail)."""
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        if Path(ref).expanduser().exists():
            ref = str(Path(ref).expanduser())
        model = AutoModelForSemanticSegmentation.from_pretrained(ref, use_safetensors=True).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(ref)
        by_name = {str(name).lower(): int(i) for i, name in model.config.id2label.items()}
        problems, group_ids = [], {}
        for group, names in {**DEFAULT_GROUP_LABELS, **(group_labels or {})}.items():
            missing = [n for n in names if n.lower() not in by_name]
            if missing:
                problems.append(f"{group}: {missing}")
            group_ids[group] = [by_name[n.lower()] for n in names if n.lower() in by_name]
        if problems:
            raise ParserError(f"parser {ref} has no label(s) {'; '.join(problems)}; its labels are "
                              f"{sorted(model.config.id2label.values())}")
        return cls(model, processor, group_ids, ref)

    @torch.no_grad()
    def garment_mask(self, photo: np.ndarray, group: str) -> np.ndarray:
        """``(h, w)`` bool: pixels of ``photo`` ``(h, w, 3)`` uint8 parsed as a label of ``group``."""
        h, w = photo.shape[:2]
        inputs = self.processor(images=photo, return_tensors="pt")
        device = next(self.model.parameters()).device
        logits = self.model(pixel_values=inputs["pixel_values"].to(device)).logits  # (1, C, h', w')
        logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        labels = logits.argmax(dim=1)[0].cpu().numpy()
        return np.isin(labels, self.group_ids[group])

    def general(self, photo: np.ndarray, group: str, mask_cfg: MaskConfig) -> tuple[np.ndarray, np.ndarray]:
        """``(garment mask, general mask)`` for ``group``; both empty when the parser finds nothing."""
        own = self.garment_mask(photo, group)
        return own, general_mask(own, group, mask_cfg)


def make_tiny_parser(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random SegFormer with the ATR labels, in the layout of a real parser (for tests and
    the offline demo: same class, same loading code, meaningless masks)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    folder = Path(folder)
    torch.manual_seed(seed)
    config = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2], decoder_hidden_size=16,
        num_labels=len(ATR_LABELS), id2label=dict(enumerate(ATR_LABELS)),
        label2id={n: i for i, n in enumerate(ATR_LABELS)},
    )
    SegformerForSemanticSegmentation(config).eval().save_pretrained(folder, safe_serialization=True)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder

