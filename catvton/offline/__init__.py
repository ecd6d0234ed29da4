"""The offline world: synthetic DeepFashion rows, the tiny FLUX Fill base and the tiny alpha.

Library code never imports this package (an import-linter contract checks it): entry points call
:func:`resolve` to turn the offline names of a config into folders, building each once into the
cache (``$CATVTON_CACHE``, else ``~/.cache/catvton``), and pass the result to the library. The
resolved config names the same things the production preset names: a data source, a base
folder, a transformer override folder.
"""

from __future__ import annotations

from typing import Callable

from catvton.artifacts import cache_root
from catvton.config import Config, config_from_dict
from catvton.data.source import SYNTHETIC
from catvton.offline.alpha import ensure_tiny_alpha
from catvton.offline.synthetic import ensure_synthetic_dataset
from catvton.offline.tiny_base import ensure_tiny_base

TINY_BASE = "tiny"
"""``model.base`` value that means the offline tiny base."""
TINY_ALPHA = "tiny-alpha"
"""``model.transformer_override`` value that means the tiny alpha (the tiny base fully fine-tuned
on upper-body pairs, a miniature of CatVTON-Flux's alpha)."""


def resolve(cfg: Config, log: Callable[[str], None] = print, models: bool = True) -> Config:
    """A copy of ``cfg`` in which nothing offline is left to build: the synthetic set exists
    (``data.source: synthetic`` stays, its folder is found by name), ``model.base: tiny`` is the
    tiny base's folder and ``model.transformer_override: tiny-alpha`` the alpha's folder. The alpha
    is trained on first use (its builder starts Ray then, through
    :func:`catvton.ray_utils.init_ray`; a cached alpha needs no Ray). Hub ids and folders pass
    through unchanged, so the production preset resolves to itself. ``models=False``: the data
    only (what ``easy_train.py setup`` needs)."""
    out = config_from_dict(cfg.to_dict())
    if out.data.source == SYNTHETIC:
        ensure_synthetic_dataset(cache_root(), out.data.synthetic_pids, out.data.synthetic_image_size, out.data.seed)
    if not models:
        return out
    if out.model.base == TINY_BASE:
        out.model.base = str(ensure_tiny_base(log=log))
    if out.model.transformer_override == TINY_ALPHA:
        out.model.transformer_override = str(ensure_tiny_alpha(out, log=log))
    return out
