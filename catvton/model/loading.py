"""The one way to load the FLUX Fill base: a hub id or a local diffusers folder.

Every stage (preprocess, train, evaluate, serve) loads through these functions, so the offline
tiny base and FLUX.1-Fill-dev run the same code::

    pipe = load_pipeline("black-forest-labs/FLUX.1-Fill-dev",
                         override="xiaozaa/catvton-flux-alpha", torch_dtype=torch.bfloat16,
                         device="cuda")
    pipe = load_pipeline("/path/to/tiny-base")       # the offline tiny base's folder
    transformer = load_transformer("/path/to/tiny-base", override="/path/to/finetuned")

The offline names ``tiny`` and ``tiny-alpha`` are not resolved here: entry points turn them into
folders with :func:`catvton.offline.resolve` (building them once) before calling the library.

A base folder has the diffusers FLUX Fill layout (see :data:`BASE_LAYOUT`). A transformer
override (a full CatVTON-Flux checkpoint such as ``xiaozaa/catvton-flux-alpha``) replaces the
base's ``transformer/``; it may keep ``config.json`` and the weights at its root (as that hub repo
does) or in a ``transformer/`` subfolder.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from pathlib import Path

import torch

OFFLINE_NAMES = ("tiny", "tiny-alpha")
"""Config values that name offline models; :func:`catvton.offline.resolve` turns them into folders."""

FILL_IN_CHANNELS = 384
"""A FLUX Fill transformer's input width: 64 packed noisy latent + 64 packed masked-image latent
+ 256 packed mask. FLUX.1-dev (text-to-image) has 64."""

BASE_LAYOUT = (
    "model_index.json",
    "transformer/",
    "vae/",
    "text_encoder/",
    "text_encoder_2/",
    "tokenizer/",
    "tokenizer_2/",
    "scheduler/",
)
"""What a base folder holds: what ``FluxFillPipeline.save_pretrained`` writes."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


_WEIGHTLESS: contextvars.ContextVar[bool] = contextvars.ContextVar("catvton_weightless", default=False)


@contextlib.contextmanager
def weightless():
    """Inside this block every loader of this module builds its models from their config files on
    the ``meta`` device and reads no weights; tokenizers and the scheduler load as usual. The dry run
    (:mod:`catvton.train.dryrun`) runs the job's own loading, training and serving code at full size
    this way, on a weightless FLUX.1-Fill-dev folder (:func:`catvton.model.skeleton.write_skeleton`)."""
    token = _WEIGHTLESS.set(True)
    try:
        yield
    finally:
        _WEIGHTLESS.reset(token)


def _pretrained(cls, path: str, subfolder: str | None, torch_dtype: torch.dtype):
    """``cls.from_pretrained(path, subfolder=..., dtype=...)``, or inside :func:`weightless` the same
    model built from its config on ``meta`` (diffusers models by ``from_config``, transformers' by
    their config class)."""
    if not _WEIGHTLESS.get():
        return cls.from_pretrained(path, subfolder=subfolder, dtype=torch_dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # built in the weights' dtype, as from_pretrained loads them
    try:
        with torch.device("meta"):
            if hasattr(cls, "load_config"):
                return cls.from_config(cls.load_config(path, subfolder=subfolder))
            return cls(cls.config_class.from_pretrained(path, subfolder=subfolder or ""))
    finally:
        torch.set_default_dtype(old)


class BaseModelError(ValueError):
    """The base or override given cannot be a FLUX Fill model; the message says what to pass."""


def _layout_hint() -> str:
    return (
        "a base is a hub id (e.g. black-forest-labs/FLUX.1-Fill-dev) or a local folder in the "
        f"diffusers FLUX Fill layout ({', '.join(BASE_LAYOUT)}); the offline tiny base is base='tiny' "
        "in a config, resolved by catvton.offline.resolve (python -m catvton.offline.tiny_base builds it)"
    )


def _local_path(ref: str) -> Path | None:
    """``ref`` as a local path when it is one (exists, or cannot be a hub id); None for a hub id."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(ref) and not ref.startswith((".", "~")):
        return None
    return path  # looks like a path (absolute, ./, ~, several slashes) but is missing


def resolve_base(base: str) -> str:
    """``base`` checked: a local folder must exist and hold ``model_index.json``; a hub id is
    passed on as is; an offline name (``tiny``) that was not resolved is an error saying how.
    """
    _refuse_offline_name(base, "base")
    local = _local_path(base)
    if local is not None:
        if not local.is_dir():
            raise BaseModelError(f"base folder {local} does not exist: {_layout_hint()}")
        if not (local / "model_index.json").is_file():
            raise BaseModelError(f"base folder {local} has no model_index.json: {_layout_hint()}")
    return base


def _refuse_offline_name(value: str, what: str) -> None:
    if value in OFFLINE_NAMES:
        raise BaseModelError(
            f"{what}={value!r} names an offline model that was not resolved to a folder: entry points call "
            "catvton.offline.resolve(cfg) first (it builds and caches the tiny models); in your own code do the same"
        )


def _override_config(override: str) -> tuple[str, str | None, dict]:
    """``(path or hub id, subfolder, config)`` of a transformer override.

    A CatVTON-Flux checkpoint keeps ``config.json`` at its root; a base folder or full pipeline
    repo keeps it in ``transformer/``. Local folders are looked at; hub repos are asked for the
    root config first, then ``transformer/`` (only the small config file is fetched).
    """
    from diffusers import FluxTransformer2DModel

    _refuse_offline_name(override, "transformer_override")
    local = _local_path(override)
    if local is not None:
        if not local.is_dir():
            raise BaseModelError(f"transformer override folder {local} does not exist")
        for subfolder in (None, "transformer"):
            if (local / (subfolder or "") / "config.json").is_file():
                config = FluxTransformer2DModel.load_config(str(local), subfolder=subfolder)
                return str(local), subfolder, config
        raise BaseModelError(
            f"transformer override {local} has no config.json at its root or in transformer/: pass a "
            "FluxTransformer2DModel folder (save_pretrained output) or a base folder in the diffusers layout"
        )
    try:
        return override, None, FluxTransformer2DModel.load_config(override)
    except OSError as root_error:
        try:
            config = FluxTransformer2DModel.load_config(override, subfolder="transformer")
            return override, "transformer", config
        except OSError:
            raise BaseModelError(
                f"transformer override {override}: no config.json at the repo root or in transformer/ "
                f"(or the hub cannot be reached): {root_error}"
            ) from root_error


def _check_fill(config: dict, where: str) -> None:
    in_channels = config.get("in_channels")
    if in_channels != FILL_IN_CHANNELS:
        raise BaseModelError(
            f"{where}: in_channels={in_channels}, but a FLUX Fill transformer has {FILL_IN_CHANNELS} "
            "(64 noisy latent + 64 masked-image latent + 256 mask). A text-to-image FLUX "
            "(e.g. black-forest-labs/FLUX.1-dev, 64 channels) cannot inpaint: use "
            "black-forest-labs/FLUX.1-Fill-dev, a CatVTON-Flux checkpoint (xiaozaa/catvton-flux-alpha) "
            "or base='tiny'"
        )


def load_transformer(base: str, override: str | None = None, torch_dtype: torch.dtype = torch.float32):
    """The FLUX Fill ``FluxTransformer2DModel``: from ``override`` when given, else the base's.

    The config is read and checked (``in_channels == 384``) before any weights are loaded, so a
    wrong model fails in seconds, not after reading 24 GB.
    """
    from diffusers import FluxTransformer2DModel

    if override:
        path, subfolder, config = _override_config(override)
        where = f"transformer override {override}" + (f" ({subfolder}/)" if subfolder else "")
    else:
        path, subfolder = resolve_base(base), "transformer"
        config = FluxTransformer2DModel.load_config(path, subfolder=subfolder)
        where = f"base {base} (transformer/)"
    _check_fill(config, where)
    return _pretrained(FluxTransformer2DModel, path, subfolder, torch_dtype).eval()


def load_pipeline(
    base: str,
    override: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """The ``FluxFillPipeline`` of ``base`` (transformer replaced by ``override`` when given).

    Moved to ``device``, every module in eval mode (a constructed T5 left in training mode makes
    identical calls differ through dropout), progress bar off.
    """
    from diffusers import FluxFillPipeline

    path = resolve_base(base)
    extra = {}
    if override:
        extra["transformer"] = load_transformer(base, override, torch_dtype)
    else:
        from diffusers import FluxTransformer2DModel

        config = FluxTransformer2DModel.load_config(path, subfolder="transformer")
        _check_fill(config, f"base {base} (transformer/)")
    if _WEIGHTLESS.get():  # every model given: from_pretrained reads only tokenizers and scheduler
        extra.setdefault("transformer", load_transformer(base, None, torch_dtype))
        extra["vae"] = load_vae(base, torch_dtype)
        _, extra["text_encoder"], _, extra["text_encoder_2"] = load_text_encoders(base, torch_dtype)
    pipe = FluxFillPipeline.from_pretrained(path, dtype=torch_dtype, **extra)
    pipe.to(device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_vae(base: str, torch_dtype: torch.dtype = torch.float32):
    """The base's ``AutoencoderKL`` (``vae/``), eval mode: for encoding latents once, up front."""
    from diffusers import AutoencoderKL

    return _pretrained(AutoencoderKL, resolve_base(base), "vae", torch_dtype).eval()


def load_text_encoders(base: str, torch_dtype: torch.dtype = torch.float32):
    """``(tokenizer, text_encoder, tokenizer_2, text_encoder_2)``: CLIP and T5 of the base, eval mode.

    For the preprocess stage that encodes each unique prompt once (T5-XXL alone is 9.5 GB).
    """
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    path = resolve_base(base)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = _pretrained(CLIPTextModel, path, "text_encoder", torch_dtype)
    tokenizer_2 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2")
    text_encoder_2 = _pretrained(T5EncoderModel, path, "text_encoder_2", torch_dtype)
    return tokenizer, text_encoder.eval(), tokenizer_2, text_encoder_2.eval()


def pipeline_around(base: str, transformer: torch.nn.Module, torch_dtype: torch.dtype, text_encoders: bool = True):
    """The base's ``FluxFillPipeline`` around an already built ``transformer`` (one being trained),
    its VAE (and, with ``text_encoders``, CLIP and T5 with their tokenizers) loaded from ``base``;
    without them the caller passes prompt embeddings. Nothing moved: the caller places it."""
    from diffusers import FluxFillPipeline

    path = resolve_base(base)
    extra: dict = {"vae": load_vae(base, torch_dtype)} if _WEIGHTLESS.get() else {}
    if not text_encoders:
        extra.update(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    elif _WEIGHTLESS.get():
        _, extra["text_encoder"], _, extra["text_encoder_2"] = load_text_encoders(base, torch_dtype)
    return FluxFillPipeline.from_pretrained(path, transformer=transformer, dtype=torch_dtype, **extra)
