"""The rehearsal of the production preset: ``configs/l40s.yaml`` plus the overrides in
``configs/rehearsal.yaml``, which swap only what a machine without GPUs, network or FLUX weights
cannot have (the base and alpha, the data source, the canvas, GPUs, step counts)::

    cfg = rehearsal_config(["run.storage_path=s3://bucket/ray"])
    python -m catvton.config.rehearsal     # the overrides as --set arguments for an entry point
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from catvton.config.loader import load_config
from catvton.config.sections import Config, ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRODUCTION = CONFIGS / "l40s.yaml"
REHEARSAL = CONFIGS / "rehearsal.yaml"


def rehearsal_overrides(path: Path = REHEARSAL) -> list[str]:
    """The ``section.field=value`` strings of the rehearsal file, in its order."""
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    items = loaded.get("overrides") if isinstance(loaded, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, str) and "=" in i for i in items):
        raise ConfigError([f"{path} must hold `overrides:`, a list of section.field=value strings"])
    return items


def rehearsal_config(extra: list[str] | tuple[str, ...] = ()) -> Config:
    """The production preset with the rehearsal overrides, then ``extra`` (storage, names)."""
    return load_config(PRODUCTION, rehearsal_overrides() + list(extra))


def as_set_arguments(overrides: list[str]) -> list[str]:
    """``["--set", "a.b=1", "--set", ...]``: what an entry point takes on its command line."""
    return [arg for o in overrides for arg in ("--set", o)]


if __name__ == "__main__":
    print(" ".join(as_set_arguments(rehearsal_overrides())))
    sys.exit(0)
