"""Released LoRAs served side by side on one base: the registry folder and the named adapters.

A registry is a folder of release folders (``docs/release.md``: the sweep's ``release/``, a training
run's ``lora/``, a customer's catalogue LoRA), one per model; the folder's name is the model id a
request names. Each replica loads the base once and keeps up to N of these LoRAs on it as diffusers
named adapters (``load_lora_weights(adapter_name=...)``, ``set_adapters``, ``delete_adapters``):
a second model is a few MB of LoRA, not a second 24 GB base.

A release is checked before it is offered (:func:`check_release`): its weights are safetensors
holding LoRA tensors, nothing pickled sits beside them, and its training config names the base and
transformer the server runs (a LoRA trained on another transformer is refused, not served wrong).
A broken release is listed with its reason and the others serve.

With one adapter active, PEFT's layer computes ``base(x) + B(A(x)) * scale`` for that adapter alone,
the same operations as a pipeline that loaded only that LoRA: a model's answer is the same picture
whichever other models share its replica (tests/test_multi_lora.py checks it bit for bit).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from catvton.artifacts import LORA_WEIGHTS, METRICS, TRAINING_CONFIG
from catvton.config import Config

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A model id: the release folder's name, usable as a header value and a diffusers adapter name."""
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class Release:
    """One servable LoRA: its id (the folder's name), folder and evaluation figures."""

    model_id: str
    folder: Path
    metrics: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    """``eval/report.json``'s per-group figures when ``ray_jobs/evaluate.py`` wrote them."""

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says about it."""
        return {"id": self.model_id, "metrics": self.metrics, "evaluation": self.evaluation}


@dataclass
class Registry:
    releases: dict[str, Release] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    """Folder name -> why it is not served."""


def _same_model(a: str | None, b: str | None) -> bool:
    """Two references to one base or transformer: equal hub ids, or folders of the same name (a
    release records the folder of the machine that trained it; the key-named folder is the model)."""
    if not a or not b:
        return not a and not b
    return a == b or Path(a).name == Path(b).name


def check_release(folder: Path, cfg: Config) -> tuple[Release | None, str | None]:
    """The release in ``folder`` if the server (``cfg``: its resolved model config) can serve it,
    else the reason it cannot."""
    model_id = folder.name
    if not MODEL_ID.match(model_id):
        return None, f"folder name {model_id!r} is not a model id (letters, digits, . _ -; at most 64)"
    weights = folder / LORA_WEIGHTS
    if not weights.is_file():
        return None, f"no {LORA_WEIGHTS}"
    pickled = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLED)
    if pickled:
        return None, f"pickled files {pickled[:3]} beside the weights: only safetensors are served"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # a truncated or foreign file: safetensors says why
        return None, f"{LORA_WEIGHTS} is not readable safetensors ({type(e).__name__}: {e})"
    if not any("lora_A" in k or "lora_B" in k for k in keys):
        return None, f"{LORA_WEIGHTS} holds no LoRA tensors ({len(keys)} tensors, none lora_A/lora_B)"
    if (folder / TRAINING_CONFIG).is_file():
        try:
            trained = json.loads((folder / TRAINING_CONFIG).read_text())["model"]
        except (ValueError, KeyError) as e:
            return None, f"{TRAINING_CONFIG} is unreadable ({type(e).__name__}: {e})"
        for name in ("base", "transformer_override"):
            if not _same_model(trained.get(name), getattr(cfg.model, name)):
                return None, (f"trained on {name} {trained.get(name)!r}, this server runs "
                              f"{getattr(cfg.model, name)!r}: serve it where that model runs")
    metrics = _json(folder / METRICS)
    report = _json(folder / "eval" / "report.json")
    evaluation = report.get("groups", report) if isinstance(report, dict) else None
    return Release(model_id, folder, metrics, evaluation), None


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def scan_registry(root: Path, cfg: Config) -> Registry:
    """Every release folder under ``root``, checked; hidden and temporary folders (a release being
    written, ``.release.tmp``) are skipped."""
    registry = Registry()
    if not root.is_dir():
        return registry
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        release, why = check_release(folder, cfg)
        if release is None:
            registry.refused[folder.name] = why or "refused"
        else:
            registry.releases[release.model_id] = release
    return registry


class AdapterSet:
    """Named LoRA adapters on one pipeline, at most ``capacity`` at once, least recently used out
    first. One lock guards the pipeline: no adapter is loaded, removed or switched while a batch
    runs (:meth:`use` holds it for the batch)."""

    def __init__(self, pipe, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity {capacity}: at least one adapter must fit")
        self.pipe, self.capacity = pipe, capacity
        self.lock = threading.Lock()
        self.loaded: OrderedDict[str, Path] = OrderedDict()
        self.loads = self.evictions = 0

    def load(self, release: Release) -> list[str]:
        """Load ``release`` if it is not loaded, as the most recently used; the ids evicted for it."""
        with self.lock:
            return self._ensure(release)

    def unload(self, model_id: str) -> bool:
        """Remove ``model_id``'s adapter; False when it was not loaded (unloading twice is harmless)."""
        with self.lock:
            if model_id not in self.loaded:
                return False
            del self.loaded[model_id]
            self.pipe.delete_adapters(model_id)
            self.evictions += 1
            return True

    @contextmanager
    def use(self, release: Release) -> Iterator[None]:
        """``release`` as the one active adapter for the duration (loaded first if it was evicted)."""
        with self.lock:
            self._ensure(release)
            self.pipe.set_adapters([release.model_id], [1.0])
            yield

    def _ensure(self, release: Release) -> list[str]:
        evicted: list[str] = []
        if release.model_id in self.loaded:
            self.loaded.move_to_end(release.model_id)
            return evicted
        while len(self.loaded) >= self.capacity:
            old, _ = self.loaded.popitem(last=False)
            self.pipe.delete_adapters(old)
            self.evictions += 1
            evicted.append(old)
        self.pipe.load_lora_weights(str(release.folder), adapter_name=release.model_id)
        self.loaded[release.model_id] = release.folder
        self.loads += 1
        return evicted
