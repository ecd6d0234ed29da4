"""An outfit in one request: one garment per region, filled by the passes the model was trained for.

The model learned one thing: replace *one* worn garment, given the general mask of its region and
the rest of the person as context (a top in the alpha's pairs, a bottom or a dress in the LoRA's).
An outfit is therefore a sequence of such passes, each on the previous pass's result:

- ``ORDER``: the top first, then the bottom. The bottom's pass then sees the new top as
  context, the way every training pair of a bottom shows the person's top; and a request that
  changes only the bottom changes only the bottom's general mask (the top's pass does not see
  the bottom). ``full`` (a dress, a jumpsuit) is worn alone: with ``upper`` or ``lower`` it is
  an error.
- Every mask is the person's own, on the photo as uploaded (a request's or the auto-masker's on
  the original photo, not on a pass's result), generalised by the training rule of its region.
- Pass ``k`` draws its noise from ``seed + k``: a single-garment request is the outfit of one
  pass, with the same picture as before outfits existed.
- Outside the union of the general masks every pixel is the person's own (each pass pastes back
  only inside its own mask).

A garment is a product shot (all of it is the garment) or, the in-distribution case, a photo of
someone wearing it with the garment's mask: then it is cut out exactly as training cuts it
(:func:`catvton.data.canvas.garment_cutout`). Without the mask, the server's parser finds it.

Arrays: photos ``(h, w, 3)`` uint8, masks ``(h, w)`` bool, canvases as in :mod:`catvton.data.canvas`.
:class:`~catvton.infer.serving.TryOnService` runs requests (``dress`` / ``dress_many``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from PIL import Image

from catvton.infer.request import InputError, paste_generated
from catvton.schema import GROUPS

ORDER = ("upper", "lower")
"""The passes of a two-garment outfit, in order; ``full`` is one pass alone."""


@dataclass
class Piece:
    """One garment of an outfit, for one region of the person."""

    region: str
    """``upper``, ``lower`` or ``full``."""
    garment: np.ndarray
    """``(h, w, 3)`` uint8: a product shot, or a photo of someone wearing the garment."""
    garment_mask: np.ndarray | None = None
    """``(h, w)`` bool on :attr:`garment`: it is a worn photo, and this marks the garment on it."""
    mask: np.ndarray | None = None
    """``(H, W)`` bool on the person photo: where the region's current garment is; None: the
    service's auto-masker finds it."""
    worn: bool = False
    """The garment photo shows someone wearing it and :attr:`garment_mask` is left to the parser."""
    fields: dict[str, str] = field(default_factory=dict)
    """The request's field names of this piece, to name in errors: keys ``garment``, ``mask``,
    ``garment_mask``, ``worn``; a key left out is named after the region (``lower``,
    ``lower_mask``, ``lower_garment_mask``, ``lower_worn``)."""

    def field_name(self, part: str) -> str:
        """The request field of ``part`` (``garment``, ``mask``, ``garment_mask`` or ``worn``)."""
        if part in self.fields:
            return self.fields[part]
        return self.region if part == "garment" else f"{self.region}_{part}"


SINGLE_FIELDS = {"garment": "garment", "mask": "mask", "garment_mask": "garment_mask", "worn": "garment_worn"}
"""A single-garment request's field names (``garment`` + ``garment_type``), the API before outfits."""


@dataclass
class OutfitRequest:
    """A person and the garments to dress them in (one per region); ``None``: the model config's
    default (``infer.seed``, ``infer.steps``, ``infer.guidance``, the canvas's half size)."""

    person: np.ndarray
    """``(H, W, 3)`` uint8."""
    pieces: list[Piece]
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    half_hw: tuple[int, int] | None = None


@dataclass
class PassResult:
    """One pass of the model: one garment put on."""

    region: str
    half: np.ndarray
    """``(Hc, Wc, 3)`` uint8: the generated person half of the canvas."""
    general: np.ndarray
    """``(H, W)`` bool: the general mask on the person photo: where this pass was pasted."""
    garment_mask: np.ndarray
    """``(H, W)`` bool: the worn-garment mask it was generalised from."""
    mask_source: str
    """``request`` or ``auto``."""
    canvas: np.ndarray
    """``(Hc, 2Wc, 3)`` float32: the pass's input canvas [garment | person so far]."""
    result: np.ndarray
    """``(Hc, 2Wc, 3)`` float32: the generated canvas, pasted back inside the mask."""
    seed: int


@dataclass
class Dressed:
    """A dressed person: the picture and how each pass made it."""

    image: np.ndarray
    """``(H, W, 3)`` uint8, the person photo's size: every pass pasted on, in order."""
    passes: list[PassResult]
    seed: int
    steps: int
    guidance: float

    @property
    def regions(self) -> list[str]:
        return [p.region for p in self.passes]

    def union(self) -> np.ndarray:
        """``(H, W)`` bool: every pixel a pass may have changed."""
        return np.logical_or.reduce([p.general for p in self.passes])


def check_pieces(pieces: list[Piece]) -> list[Piece]:
    """``pieces`` in the order of their passes, or :class:`InputError` naming the field to fix."""
    if not pieces:
        raise InputError("garment", "no garment: send one per region (upper, lower, or full), or `garment` "
                                    "with `garment_type`")
    seen: dict[str, Piece] = {}
    for piece in pieces:
        if piece.region not in GROUPS:
            raise InputError(piece.fields.get("region", "garment_type"),
                             f"{piece.region!r} is not a region: choose from {list(GROUPS)}")
        if piece.region in seen:
            raise InputError(piece.field_name("garment"), f"two garments for the {piece.region} region: send one")
        seen[piece.region] = piece
    if "full" in seen and len(seen) > 1:
        others = [r for r in ORDER if r in seen]
        raise InputError(seen["full"].field_name("garment"),
                         f"a full-body garment is worn alone: leave out {' and '.join(others)}, or send "
                         "upper and lower instead of full")
    return [seen["full"]] if "full" in seen else [seen[r] for r in ORDER if r in seen]


class Dressing:
    """One outfit request on its way through its passes: :meth:`next_job`, generate it,
    :meth:`done`, until :meth:`next_job` is None; then :meth:`dressed` (or, for the server's
    ingress, :meth:`reply`)."""

    def __init__(self, service, request: OutfitRequest):
        """``service``: a :class:`catvton.infer.serving.TryOnService` (it makes the jobs)."""
        self.service = service
        self.request = request
        self.pieces = check_pieces(request.pieces)
        steps = request.steps
        if steps is not None and not 1 <= steps <= service.settings.max_steps:
            raise InputError("steps", f"steps={steps}: choose 1 to {service.settings.max_steps}")
        self.seed = service.cfg.infer.seed if request.seed is None else int(request.seed)
        # every mask on the photo as uploaded, before any pass: errors before any model call
        self.masks: list[tuple[np.ndarray, str]] = []
        self.worn: list[np.ndarray | None] = []
        for piece in self.pieces:
            with _fields_of(piece):
                if piece.mask is None:
                    self.masks.append((service.person_mask(request.person, piece.region), "auto"))
                else:
                    if piece.mask.shape != request.person.shape[:2]:
                        raise InputError("mask", f"mask is {piece.mask.shape[1]}x{piece.mask.shape[0]} but the person "
                                                 f"photo is {request.person.shape[1]}x{request.person.shape[0]}: send "
                                                 "a mask of the person photo's size")
                    if not piece.mask.any():
                        raise InputError("mask", "mask is empty: mark the garment's region in white")
                    self.masks.append((piece.mask, "request"))
                self.worn.append(service.worn_garment_mask(piece.garment, piece.garment_mask, piece.region, piece.worn))
        self.current = request.person
        self.passes: list[PassResult] = []
        self._job = None

    def next_job(self):
        """The next pass's job (on the result so far), or None when every pass is done."""
        k = len(self.passes)
        if k == len(self.pieces):
            return None
        if self._job is None:
            piece, (mask, source), r = self.pieces[k], self.masks[k], self.request
            with _fields_of(piece):
                self._job = self.service.prepare(self.current, piece.garment, mask, piece.region, self.seed + k,
                                                 r.steps, r.guidance, r.half_hw, garment_mask=self.worn[k],
                                                 mask_source=source)
        return self._job

    def done(self, job, result: np.ndarray) -> None:
        """Pass ``job`` (from :meth:`next_job`) generated ``result``, its canvas: pasted onto the
        person so far."""
        if job is not self._job:
            raise ValueError("done() takes the job next_job() returned")
        reply = self.service.reply(job, result)
        self.current = np.asarray(paste_generated(Image.fromarray(self.current), reply["half"], job.general,
                                                  reply["fit"]))
        self.passes.append(PassResult(job.group, reply["half"], job.general, job.garment_mask, job.mask_source,
                                      job.canvas, result, job.seed))
        self._job = None

    def dressed(self) -> Dressed:
        if len(self.passes) < len(self.pieces):
            raise RuntimeError(f"{len(self.pieces) - len(self.passes)} pass(es) not run yet")
        job_steps = self.request.steps or self.service.cfg.infer.steps
        guidance = self.service.cfg.infer.guidance if self.request.guidance is None else float(self.request.guidance)
        return Dressed(self.current, list(self.passes), self.seed, int(job_steps), guidance)

    def reply(self) -> dict[str, Any]:
        """What the model side hands the ingress: small plain values whatever the upload's size.
        ``passes``: per pass, in order, its ``region``, ``half`` (the generated person half,
        uint8), ``general`` (its general mask at the working size) and ``mask_source``; ``fit``:
        how halves were fitted; the parameters used."""
        d = self.dressed()
        return {"passes": [{"region": p.region, "half": p.half, "general": p.general, "mask_source": p.mask_source}
                           for p in d.passes],
                "fit": self.service.cfg.canvas.person_fit, "seed": d.seed, "steps": d.steps, "guidance": d.guidance,
                "regions": d.regions, "mask_source": ",".join(p.mask_source for p in d.passes)}


@contextlib.contextmanager
def _fields_of(piece: Piece):
    """Re-raise an :class:`InputError` of the single-garment API's field names under ``piece``'s."""
    try:
        yield
    except InputError as e:
        part = {"garment": "garment", "mask": "mask", "garment_mask": "garment_mask", "garment_worn": "worn"}.get(e.field)
        if part is None:
            raise
        name = piece.field_name(part)
        if name == e.field:
            raise
        raise InputError(name, e.message.replace(e.field, name, 1) if e.message.startswith(e.field) else e.message,
                         e.status) from e
