"""What every Ray job entry point shares: ``--config`` / ``--set`` and loading them, so that a
bad value is reported the same way (all problems at once, exit code 2) everywhere, and a data
source that cannot be read (:func:`source_errors_exit`) as a short message with exit code 2."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from catvton.config import Config, ConfigError, load_config
from catvton.data.source import SourceError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def job_parser(doc: str | None, default_config: Path | None = DEFAULT_CONFIG, *,
               dashboard_flag: bool = False) -> argparse.ArgumentParser:
    """A parser with the entry point's docstring as help, ``--config`` and repeatable ``--set``;
    with ``dashboard_flag``, ``--no-dashboard`` too (``args.no_dashboard``, for
    ``init_ray(dashboard=not args.no_dashboard)``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(default_config) if default_config else None,
                   help=f"YAML preset (default: {default_config.name if default_config else 'see below'})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set train.lr=1e-4 --set run.name=my-run")
    if dashboard_flag:
        p.add_argument("--no-dashboard", action="store_true",
                       help="start a local Ray without its dashboard (a few seconds and ~1 CPU-second "
                            "less at start-up); ignored when joining a cluster (RAY_ADDRESS)")
    return p


def config_or_exit(path: str | Path | None, overrides: list[str]) -> Config:
    """The loaded config, or every problem on stderr and exit code 2."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def source_errors_exit() -> Iterator[None]:
    """Run the block; a :class:`~catvton.data.source.SourceError` (the hub unreachable, a shard
    missing or unreadable) prints its message, which says what to do, and exits with code 2
    instead of a few hundred lines of HTTP-client traceback."""
    try:
        yield
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
