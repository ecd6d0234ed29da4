"""What stages hand each other on disk, and the one way each kind of folder is written.

Every file name that one stage writes and another reads is defined here once; every builder
that makes a cached folder (the latent cache, the tiny base, the tiny alpha, the synthetic
set) goes through :func:`build_once`; every exported folder (a run's weights, a sweep's release)
through :func:`export_atomic`. Nothing is created at import.

A checkpoint folder (one per save, in Ray's ``storage_path``)::

    pytorch_lora_weights.safetensors   method=lora: diffusers LoRA format, alpha in the metadata
    transformer/                       method=full: the whole transformer (save_pretrained)
    training_state.pt                  optimizer, scheduler, step, loss history
    rng_state_rank<r>.pt               rank r's RNG states (each rank writes its own)
    config.json                        the run's full configuration

An exported weights folder (``<run>/lora``, a sweep's ``release/``) holds the weights and the
configuration as ``training_config.json``; see ``docs/release.md``.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

# --- checkpoints and exported weights --------------------------------------------------------
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""A LoRA in diffusers format (``FluxFillPipeline.load_lora_weights`` reads it)."""
FULL_WEIGHTS = "transformer"
"""Folder of a fully fine-tuned transformer (``save_pretrained``) in a checkpoint."""
TRAINING_STATE = "training_state.pt"
"""Optimizer, scheduler, step and the loss history of a checkpoint (and, written before issue 24,
rank 0's RNG states)."""
RANK_RNG = "rng_state_rank{rank}.pt"
"""One rank's RNG states in a checkpoint (its noise generator's and torch's): every rank draws its
own noise, and writes and restores its own states."""
CHECKPOINT_CONFIG = "config.json"
"""The run's configuration inside a checkpoint."""
TRAINING_CONFIG = "training_config.json"
"""The run's configuration beside exported weights (serving and evaluation read it)."""
METRICS = "metrics.json"
"""A release's winning metrics (the sweep writes it)."""

# --- a run folder (``<run.output_dir>/<run.name>``) -------------------------------------------
FINAL_METRICS = "final_metrics.json"
LOSS_HISTORY = "loss_history.json"
"""Every reported step's metrics of the finished run, copied from its last checkpoint."""
READ_MODE = "read_mode.txt"
"""How the run read its training split and why (:func:`catvton.train.job.read_mode`)."""
STOPPED = "STOPPED.txt"
"""Written to the run folder when the workers stop on a non-finite loss."""
REFUSED = "REFUSED.txt"
"""Written to the run folder when the workers refuse to resume a checkpoint that is already past a
changed schedule's end: the reason and what to do."""
RESUMES = "resumes.log"
"""One line per restart from a checkpoint (a worker failure or a rerun with the same name)."""
CHECKPOINTS_LOG = "checkpoints.log"
"""The run's own record of its starts and reported checkpoints, written by rank 0
(:func:`catvton.train.loop.record_start`, :func:`catvton.train.loop.record_checkpoint`)."""
PLACEMENT_GROUP = ".placement_group"
"""The workers' placement group id, written by rank 0 for the driver."""

# --- a latent cache ---------------------------------------------------------------------------
MANIFEST = "manifest.json"
TEXT_EMBEDS = "text_embeds.safetensors"
SAMPLES = "samples.npz"

# --- offline models ---------------------------------------------------------------------------
TINY_BASE_INFO = "tiny_base.json"
"""Marks a finished tiny base folder (its build parameters and VAE quality)."""
ALPHA_INFO = "alpha.json"
"""Marks a finished tiny alpha transformer folder."""

# --- the synthetic dataset -------------------------------------------------------------------
SYNTHETIC_RENDERER = "catvton.offline.synthetic"
"""The module that renders the synthetic set: its source (and what it imports) names the folder."""


def synthetic_dir(root: str | Path, num_pids: int, image_size: int, seed: int) -> Path:
    """``<root>/synthetic-<pids>-<size>-<seed>-<source digest of the renderer>``: the folder (hub
    layout, ``data/*.parquet``) the offline writer builds and the data source reads for
    ``data.source: synthetic``. A changed renderer names a new folder, so a set of an older look
    is never read."""
    return Path(root) / f"synthetic-{num_pids}-{image_size}-{seed}-{source_digest(SYNTHETIC_RENDERER)}"


# --- evaluation -------------------------------------------------------------------------------
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def cache_root() -> Path:
    """Where built-once folders live: ``$CATVTON_CACHE``, else ``~/.cache/catvton`` (not created)."""
    env = os.environ.get("CATVTON_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "catvton"


def content_hash(params: dict[str, Any]) -> str:
    """12 hex digits of the sha256 of ``params`` as sorted JSON: the cache key of a built folder."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


# --- what the code that builds a folder is ----------------------------------------------------
PACKAGE_ROOT = Path(__file__).resolve().parent
"""The ``catvton`` package folder whose sources :func:`source_digest` reads."""


def source_digest(*modules: str, root: str | Path | None = None) -> str:
    """12 hex digits naming the source of ``modules`` (dotted ``catvton`` names) and of every
    ``catvton`` module they import, directly or through others (imports in function bodies too).

    Every cache key of a built folder includes the digest of its builder, so a change to any line
    of code the builder runs (a comment too: the test that guards this edits one) names a new
    folder and a stale one is never reused; no version string to forget to bump. The ``__init__``
    of a package on the way is read too (import runs it), but what it imports is followed only
    when a module imports a name from the package itself. ``root``: the package folder to read
    (default :data:`PACKAGE_ROOT`; the key test points it at a scratch copy).
    """
    root = Path(root) if root is not None else PACKAGE_ROOT
    return _source_digest(tuple(sorted(modules)), root.resolve())


def source_files(*modules: str, root: str | Path | None = None) -> list[Path]:
    """The files :func:`source_digest` reads for ``modules``, relative to the package folder."""
    root = (Path(root) if root is not None else PACKAGE_ROOT).resolve()
    return sorted(_import_closure(tuple(sorted(modules)), root))


@functools.lru_cache(maxsize=None)
def _source_digest(modules: tuple[str, ...], root: Path) -> str:
    files = _import_closure(modules, root)
    return content_hash({f.as_posix(): hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files})


def _import_closure(modules: tuple[str, ...], root: Path) -> set[Path]:
    """Relative paths of the files of ``modules``, of the package modules they reach and of the
    ``__init__`` files on the way."""
    package = root.name
    read: set[Path] = set()
    followed: set[Path] = set()
    todo = list(modules)
    while todo:
        parts = todo.pop().split(".")
        if parts[0] != package:
            continue
        for depth in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__
            parent = _module_file(root, parts[1:depth])
            if parent is not None:
                read.add(parent)
        file = _module_file(root, parts[1:])
        if file is None:
            raise FileNotFoundError(f"{'.'.join(parts)}: no such module under {root}")
        if file not in followed:
            read.add(file)
            followed.add(file)
            todo.extend(_imports(root, file))
    return read


def _module_file(root: Path, parts: list[str]) -> Path | None:
    rel = Path(*parts) if parts else Path()
    if (root / rel / "__init__.py").is_file():
        return rel / "__init__.py"
    if parts and (root / rel).with_suffix(".py").is_file():
        return rel.with_suffix(".py")
    return None


def _imports(root: Path, file: Path) -> list[str]:
    """Dotted names of the modules ``file`` imports: for ``from a import b``, ``a.b`` when it is a
    module, else ``a`` (whose ``__init__`` defines ``b``). Relative imports are resolved."""
    import ast

    here = [root.name, *file.parent.parts]  # the package that holds the file
    out = []
    for node in ast.walk(ast.parse((root / file).read_bytes(), filename=str(file))):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            prefix = here[: len(here) - node.level + 1] if node.level else []
            base = ".".join(prefix + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append(sub if _module_file(root, sub.split(".")[1:]) is not None else base)
    return out


def build_once(final: str | Path, build: Callable[[Path], Any], is_complete: Callable[[Path], bool],
               log: Callable[[str], None] = print, what: str = "folder") -> Path:
    """Return ``final``, building it first if it is not complete.

    ``build(tmp)`` fills a new temporary folder beside ``final``, which is then renamed into
    place: a crash never leaves half a folder under the final name. An exclusive file lock
    (``<final>.lock``) makes concurrent callers (test workers, Ray workers on one node, two jobs)
    wait for one build instead of racing; a caller that waited finds the folder complete. A
    temporary folder that a killed build left is deleted by the next build.
    """
    final = Path(final)
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_complete(final):  # built by another process while we waited
                return final
            if final.exists():
                raise RuntimeError(f"{final} exists but is not a complete {what}; delete it and retry")
            for stale in final.parent.glob(f"{final.name}.tmp-*"):  # a killed build's: we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
            try:
                build(tmp)
                if not is_complete(tmp):
                    raise RuntimeError(f"building the {what} into {tmp} left it incomplete")
                os.rename(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def export_atomic(final: str | Path, fill: Callable[[Path], Any]) -> Path:
    """Write an exported folder: ``fill(tmp)`` writes a hidden sibling, which then replaces
    ``final`` (an older export of the same name is removed only once the new one is complete)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        fill(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_training_state(folder: Path, state: dict[str, Any]) -> None:
    """``training_state.pt`` of a checkpoint folder."""
    import torch

    torch.save(state, Path(folder) / TRAINING_STATE)


def load_training_state(folder: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """What :func:`save_training_state` wrote (``step``, ``history``, optimizer, scheduler...),
    its tensors on ``map_location`` (``torch.load``'s).

    The CPU by default: GPU workers write the file, and without a map every tensor comes back on
    the device it was saved from: the driver on a GPU-less head node (which reads the loss
    history after training) fails, and every rank of a node would unpickle its optimizer state
    onto cuda:0."""
    import torch

    path = Path(folder) / TRAINING_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a training checkpoint")
    return torch.load(path, map_location=map_location, weights_only=False)


def loss_history(checkpoint: str | Path) -> list[dict[str, Any]]:
    """The loss history stored in a checkpoint folder (one dict per reported step)."""
    return list(load_training_state(checkpoint)["history"])
