"""The auto-masker's label logic (catvton/infer/automask.py) with a parser whose answer is chosen.

``AutoMasker.load`` reads a real SegFormer folder whose ``id2label`` is permuted (so a label found
by its ATR index instead of its name would pick the wrong pixels); the segmentation model is then
replaced by a stand-in that returns one-hot logits of a label map drawn here, at a quarter of the
photo's resolution like SegFormer's. What is checked: which labels make each garment group's
mask, the upsampling to the photo's size, the general mask derived from it by the training rule,
and the errors for label names the parser does not have.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catvton.config import MaskConfig
from catvton.data.masks import dilate
from catvton.infer.automask import ATR_LABELS, DEFAULT_GROUP_LABELS, AutoMasker, ParserError, make_tiny_parser

H, W = 128, 96
"""The photo; the stand-in parser answers at (H/4, W/4), SegFormer's output stride."""

# The parser's labels in an order unlike ATR's: index i is not ATR_LABELS[i].
PERMUTED = tuple(reversed(ATR_LABELS))


class StandInParser(torch.nn.Module):
    """Answers every photo with one-hot logits of ``label_map`` (label names -> this parser's ids)."""

    def __init__(self, label_map: np.ndarray, id2label: dict[int, str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # garment_mask asks the parameters for the device
        self.label_map = torch.as_tensor(label_map)
        self.num_labels = len(id2label)
        self.seen: list[tuple] = []

    def forward(self, pixel_values):
        self.seen.append(tuple(pixel_values.shape))
        onehot = torch.nn.functional.one_hot(self.label_map.long(), self.num_labels)  # (h', w', C)
        logits = 10.0 * onehot.permute(2, 0, 1)[None].float()  # (1, C, h', w')

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def label_map_of(regions: dict[str, tuple[slice, slice]], id_of: dict[str, int]) -> np.ndarray:
    """A (H/4, W/4) map of parser ids: Background everywhere, then each named rectangle."""
    m = np.full((H // 4, W // 4), id_of["Background"], np.int64)
    for name, (ys, xs) in regions.items():
        m[ys, xs] = id_of[name]
    return m


def upsampled(cells: np.ndarray) -> np.ndarray:
    """What a (H/4, W/4) boolean map is at the photo's size (each cell 4x4 pixels)."""
    return np.repeat(np.repeat(cells, 4, axis=0), 4, axis=1)


# A person parsed into named parts, in quarter-resolution cells (rows of 32, columns of 24).
REGIONS = {
    "Hair": (slice(1, 4), slice(9, 15)),
    "Face": (slice(4, 7), slice(10, 14)),
    "Upper-clothes": (slice(7, 15), slice(7, 17)),
    "Left-arm": (slice(8, 15), slice(4, 7)),
    "Belt": (slice(15, 16), slice(8, 16)),
    "Pants": (slice(16, 26), slice(8, 16)),
    "Left-leg": (slice(26, 29), slice(8, 11)),
    "Left-shoe": (slice(29, 31), slice(8, 11)),
    "Bag": (slice(12, 18), slice(18, 22)),
}


@pytest.fixture(scope="module")
def parser_folder(tmp_path_factory):
    """A real SegFormer folder whose labels are ATR's names in reversed order."""
    from transformers import SegformerForSemanticSegmentation

    folder = make_tiny_parser(tmp_path_factory.mktemp("parser"))
    model = SegformerForSemanticSegmentation.from_pretrained(folder)
    model.config.id2label = dict(enumerate(PERMUTED))
    model.config.label2id = {n: i for i, n in enumerate(PERMUTED)}
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def masker_answering(folder, regions, group_labels=None) -> tuple[AutoMasker, StandInParser]:
    masker = AutoMasker.load(str(folder), group_labels)
    id_of = {name: i for i, name in enumerate(PERMUTED)}
    stand_in = StandInParser(label_map_of(regions, id_of), dict(enumerate(PERMUTED)))
    masker.model = stand_in
    return masker, stand_in


def photo() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)


def test_labels_are_found_by_name_not_by_index(parser_folder):
    masker = AutoMasker.load(str(parser_folder))
    for group, names in DEFAULT_GROUP_LABELS.items():
        assert masker.group_ids[group] == [PERMUTED.index(n) for n in names], group
    # ATR's index of Pants (6) is Face in this parser: reading numbers would mask the face
    assert PERMUTED[ATR_LABELS.index("Pants")] != "Pants"


def test_each_group_masks_exactly_its_labels(parser_folder):
    masker, stand_in = masker_answering(parser_folder, REGIONS)
    cells = {name: np.zeros((H // 4, W // 4), bool) for name in REGIONS}
    for name, (ys, xs) in REGIONS.items():
        cells[name][ys, xs] = True
    expected = {
        "upper": upsampled(cells["Upper-clothes"]),
        "lower": upsampled(cells["Pants"]),  # no skirt or dress on this person; not the belt, legs or shoes
        "full": upsampled(cells["Upper-clothes"] | cells["Pants"]),
    }
    for group, want in expected.items():
        got = masker.garment_mask(photo(), group)
        assert got.shape == (H, W) and got.dtype == bool
        # bilinear upsampling of one-hot logits agrees with 4x4 cells away from the corners of
        # regions; at a corner a pixel may side with the three neighbours that outvote the nearest
        wrong = got != want
        assert wrong.sum() <= 0.01 * want.sum(), (group, int(wrong.sum()))
        edges = dilate(want, 2) & dilate(~want, 2)  # within 2 px of a boundary of the mask
        assert not (wrong & ~edges).any(), f"{group}: pixels away from every boundary differ"
    assert stand_in.seen and stand_in.seen[0][:2] == (1, 3), "the processor's pixel values reach the parser"


def test_a_dress_is_repainted_for_lower_and_full_but_not_for_a_top(parser_folder):
    regions = {"Upper-clothes": (slice(7, 12), slice(7, 17)), "Dress": (slice(12, 24), slice(7, 17)),
               "Skirt": (slice(24, 27), slice(8, 16))}
    masker, _ = masker_answering(parser_folder, regions)
    dress = np.zeros((H // 4, W // 4), bool)
    dress[12:24, 7:17] = True
    skirt = np.zeros_like(dress)
    skirt[24:27, 8:16] = True
    lower = masker.garment_mask(photo(), "lower")
    upper = masker.garment_mask(photo(), "upper")
    # the interiors (2 px in from every boundary) are decided; boundaries are checked above
    inner = lambda cells: ~dilate(~upsampled(cells), 2)
    assert lower[inner(dress)].all() and lower[inner(skirt)].all()
    assert not upper[inner(dress)].any() and not upper[inner(skirt)].any()
    assert upper[inner(np.pad(np.ones((5, 10), bool), ((7, 20), (7, 7))))].all()


def test_the_general_mask_follows_the_training_rule_of_the_group(parser_folder):
    masker, _ = masker_answering(parser_folder, REGIONS)
    cfg = MaskConfig()  # lower: box to the bottom, at least 45% of the width; upper: hull of the dilation
    own, general = masker.general(photo(), "lower", cfg)
    ys, xs = np.nonzero(own)
    assert general[ys.min():, :].any(axis=1).all(), "from the waistband down to the last row"
    assert not general[: ys.min() - round(cfg.dilation * H) - 1].any(), "nothing above the dilated waistband"
    assert general[H - 1].sum() >= round(cfg.box_min_width * W), "at least box_min_width wide"
    assert general[own].all(), "the garment itself is inside"
    # a box: every masked row is the same run of columns
    rows = general[general.any(axis=1)]
    assert (rows == rows[0]).all()

    own_u, general_u = masker.general(photo(), "upper", cfg)
    assert general_u[own_u].all()
    assert not general_u[H - 8:].any(), "a top's mask does not run to the bottom"
    assert general_u.sum() < general_u.shape[0] * general_u.shape[1] / 2


def test_nothing_parsed_gives_empty_masks(parser_folder):
    masker, _ = masker_answering(parser_folder, {"Hair": (slice(1, 4), slice(9, 15)), "Left-leg": (slice(20, 30), slice(8, 11))})
    for group in ("upper", "lower", "full"):
        own, general = masker.general(photo(), group, MaskConfig())
        assert not own.any() and not general.any(), group


def test_custom_labels_match_names_case_insensitively(parser_folder):
    masker, _ = masker_answering(parser_folder, REGIONS, {"upper": ["upper-CLOTHES"], "lower": ["pants", "belt"],
                                                         "full": ["Dress"]})
    assert masker.group_ids["lower"] == [PERMUTED.index("Pants"), PERMUTED.index("Belt")]
    lower = masker.garment_mask(photo(), "lower")
    belt = np.zeros((H // 4, W // 4), bool)
    belt[15:16, 8:16] = True
    assert lower[upsampled(belt)].mean() > 0.9, "the belt is now part of the lower garment"


def test_labels_given_for_one_group_keep_the_others(parser_folder):
    """``parser_labels: {lower: [...]}`` in serve/config.yaml changes the lower garments only; a
    request for a top still finds the top (it used to fail with a KeyError, a 500)."""
    masker, _ = masker_answering(parser_folder, REGIONS, {"lower": ["Pants", "Belt"]})
    assert masker.group_ids["upper"] == [PERMUTED.index("Upper-clothes")]
    assert masker.group_ids["full"] == [PERMUTED.index(n) for n in DEFAULT_GROUP_LABELS["full"]]
    assert masker.garment_mask(photo(), "upper").any()


def test_an_unknown_label_is_an_error_naming_the_parsers_labels(parser_folder):
    with pytest.raises(ParserError) as e:
        AutoMasker.load(str(parser_folder), {"upper": ["Upper-clothes"], "lower": ["Trousers", "Pants", "Skort"],
                                             "full": ["Dress"]})
    msg = str(e.value)
    assert "lower: ['Trousers', 'Skort']" in msg, msg
    assert "upper" not in msg.split("its labels are")[0], "only the group with unknown names is named"
    for name in ATR_LABELS:
        assert repr(name) in msg.split("its labels are")[1], name
