"""The ingress's side of a request: the form's fields read and checked, and the answer made.

Each upload is decoded once (:func:`catvton.infer.request.read_photo`); the model replica gets
copies at the resolution its canvas needs, one piece per garment; its answer (a generated half
and a general mask per pass) is pasted onto the upload at its own size and encoded here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import UploadFile

from catvton.infer.outfit import SINGLE_FIELDS, Piece, check_pieces
from catvton.infer.request import InputError, Photo, encode_image, parse_size, paste_generated, read_mask, read_photo
from catvton.infer.serving import ServeConfig


@dataclass
class Decoded:
    """A request's fields, read and checked: the person photo kept here, the model's part in ``payload``."""

    person: Photo
    payload: dict[str, Any]
    started: float


@dataclass
class PieceUpload:
    """The uploads of one garment slot of the form (``prefix``: ``garment`` for the single-garment
    fields, else the region's name)."""

    prefix: str
    garment: UploadFile | None
    region: str | None
    mask: UploadFile | None
    garment_mask: UploadFile | None
    worn: bool
    single: bool = False

    def fields(self) -> dict[str, str]:
        return dict(SINGLE_FIELDS) if self.single else {}

    def given(self) -> bool:
        """Whether this slot is used; a mask without its garment, or a garment without its
        region, is an :class:`InputError`."""
        if self.garment is None:
            names = {**self.fields(), "garment_type": "garment_type"}
            stray = [names.get(n, f"{self.prefix}_{n}") for n, v in
                     (("mask", self.mask), ("garment_mask", self.garment_mask), ("worn", self.worn),
                      ("garment_type", self.single and self.region)) if v]
            if stray:
                raise InputError(self.prefix, f"{', '.join(stray)} sent without {self.prefix}: send the garment photo "
                                              f"as {self.prefix}")
            return False
        if self.region is None:
            raise InputError("garment_type", "garment_type is required with garment: upper, lower or full "
                                             "(or send the outfit fields upper, lower, full)")
        return True


def decode_request(settings: ServeConfig, canvas: dict[str, Any], person: UploadFile, uploads: list[PieceUpload],
            steps, guidance, seed, size) -> Decoded:
    """Read and check every field (in a thread: decoding large images takes time). Each image is
    decoded once; the model gets copies at the resolution its canvas needs."""
    started = time.perf_counter()
    if steps is not None and steps > settings.max_steps:
        raise InputError("steps", f"steps={steps}: at most {settings.max_steps}")
    limits = settings.limits
    half_hw = parse_size(size, settings.max_half_pixels)
    half = half_hw or (canvas["half_height"], canvas["half_width"])
    used = [u for u in uploads if u.given()]
    if not used:
        raise InputError("garment", "no garment: send `garment` with `garment_type`, or an outfit "
                                    "(`upper` and/or `lower`, or `full`)")
    p = read_photo(person.file.read(), "person", limits, half, canvas["person_fit"])
    pieces = []
    for u in used:
        names = Piece(u.region, np.empty(0), fields=u.fields()).field_name  # the form's names of this slot
        g = read_photo(u.garment.file.read(), names("garment"), limits, half, "pad")  # garment_cutout pads
        pieces.append({"region": u.region, "garment": g.work, "worn": u.worn, "fields": u.fields(),
                       "mask": read_mask(u.mask.file.read(), names("mask"), limits, p) if u.mask is not None else None,
                       "garment_mask": (read_mask(u.garment_mask.file.read(), names("garment_mask"), limits, g)
                                        if u.garment_mask is not None else None)})
    check_pieces([Piece(x["region"], x["garment"], fields=x["fields"]) for x in pieces])  # before any model work
    return Decoded(p, {"person": p.work, "pieces": pieces, "seed": seed, "steps": steps, "guidance": guidance,
                       "half_hw": half_hw}, started)


def answer(decoded: Decoded, result: dict[str, Any], fmt: str) -> tuple[bytes, dict[str, float]]:
    """The try-on pasted onto the upload at its own size, encoded; and the seconds each took."""
    t0 = time.perf_counter()
    image = decoded.person.full
    for done in result["passes"]:  # in the order the model ran them
        image = paste_generated(image, done["half"], done["general"], result["fit"])
    t1 = time.perf_counter()
    body = encode_image(image, fmt, decoded.person.icc_profile)
    return body, {"paste": t1 - t0, "encode": time.perf_counter() - t1}
