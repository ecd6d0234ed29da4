"""Worker hooks the training tests hand :func:`catvton.train.job.fit` (``worker_hooks=``): fault
injection and weight dumps live here, in the tests, not in the training configuration.

Ray workers unpickle these objects but cannot import this module (``tests/`` is not on their
path): call :func:`by_value` first, which makes Ray's cloudpickle ship the classes' code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

FAULT_MARKER = ".fault_injected"
"""Written to the run folder by :class:`FailOnce` just before the worker dies."""


def by_value() -> None:
    """Pickle this module's classes by value, so that Ray workers can load them."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FailOnce:
    """The last worker dies (its process exits) after optimizer step ``step``, once per run: a
    marker in the run folder keeps the restarted workers alive."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, *, step: int, rank: int, world: int, run_dir: Path) -> None:
        marker = Path(run_dir) / FAULT_MARKER
        if step != self.step or rank != world - 1 or marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"worker {rank} killed at step {step}\n")
        print(f"[test] fault injection: worker {rank} exits at step {step}", flush=True)
        os._exit(1)

    def at_end(self, *, model: torch.nn.Module, rank: int) -> None:
        pass


class DumpWeights:
    """Each rank saves its trainable weights to ``<folder>/rank<r>.pt`` at the end, to compare ranks."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def after_step(self, *, step: int, rank: int, world: int, run_dir: Path) -> None:
        pass

    def at_end(self, *, model: torch.nn.Module, rank: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                   self.folder / f"rank{rank}.pt")


TEXT_ENCODERS = ("CLIPTextModel", "T5EncoderModel")


def watch_text_encoders(folder: Path) -> None:
    """From now on, every CLIP or T5 text encoder built in this process appends its class name to
    ``<folder>/<pid>.txt`` (the models are still built)."""
    import transformers

    folder = Path(folder)
    for name in TEXT_ENCODERS:
        cls = getattr(transformers, name)
        if getattr(cls, "_catvton_watched", None) == folder:
            continue
        init = cls.__dict__.get("_catvton_init", cls.__init__)

        def watched(self, *args, _init=init, _name=name, **kwargs):
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{os.getpid()}.txt", "a") as f:
                f.write(_name + "\n")
            _init(self, *args, **kwargs)

        cls._catvton_init, cls.__init__, cls._catvton_watched = init, watched, folder


class WatchTextEncoders:
    """Installs :func:`watch_text_encoders` in every worker as the worker unpickles it, before the
    training loop runs: a text encoder built anywhere in the loop leaves a file in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        watch_text_encoders(self.folder)

    def after_step(self, *, step: int, rank: int, world: int, run_dir: Path) -> None:
        """Each worker says it was watched (``<folder>-armed/rank<rank>``): an empty ``folder``
        then means no encoder was built, not that the watch never reached the worker."""
        armed = self.folder.with_name(self.folder.name + "-armed")
        armed.mkdir(parents=True, exist_ok=True)
        (armed / f"rank{rank}").write_text(f"{os.getpid()}\n")

    def at_end(self, *, model: torch.nn.Module, rank: int) -> None:
        pass
