"""The roadmap's commands, on top of the same library as the Ray jobs.

    python easy_train.py setup                                  # offline: synthetic rows, tiny canvas
    python easy_train.py setup --data SaffalPoosh/deepFashion-with-masks --config configs/l40s.yaml
    python easy_train.py setup --data /path/to/folder --out outputs/setup   # local hub-layout parquet

``setup`` validates every row in parallel with Ray Data and writes a readiness report:
``dataset_report.json``, ``dataset_report.md`` and ``samples_<group>.png`` grids.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "tiny.yaml"

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Teach CatVTON-Flux new garments (pants, skirts, dresses) with LoRA on Ray. Start with `setup`.")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML preset (configs/tiny.yaml: offline CPU; configs/l40s.yaml: production).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Dotted override, repeatable: --set data.seed=3 --set canvas.half_width=576.")]


def _load(config: Path, overrides: list[str]):
    from catvton.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)


@app.command()
def setup(
    data: Annotated[Optional[str], typer.Option(help="Rows to check: 'synthetic', a hub dataset id (SaffalPoosh/deepFashion-with-masks) or a folder with data/train-*.parquet. Default: the config's data.source.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for dataset_report.json / .md and samples_<group>.png.")] = Path("outputs/setup"),
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    num_actors: Annotated[int, typer.Option(help="Validation actors (each takes one CPU).")] = max(1, (os.cpu_count() or 2) - 0),
) -> None:
    """Validate the dataset and write a readiness report (exit code 1 when it is not ready)."""
    from catvton.data.report import write_report
    from catvton.data.scan import scan
    from catvton.data.source import check_columns, resolve_source
    from catvton.ray_utils import init_ray

    overrides = list(set_ or [])
    if data is not None:
        overrides.append(f"data.source={data}")
    cfg = _load(config, overrides)
    typer.echo(f"data source: {cfg.data.source}")
    source = resolve_source(cfg.data)
    missing = check_columns(source)
    if missing:
        typer.echo(f"error: {source.files[0]} lacks the columns {missing} of the DeepFashion-with-masks schema", err=True)
        raise typer.Exit(2)
    typer.echo(f"{len(source.files)} parquet file(s); validating every row with Ray Data ...")
    init_ray()
    rows = scan(source, cfg, num_actors=num_actors)
    report = write_report(out, rows, cfg, source.name)
    typer.echo("")
    typer.echo(f"rows: {report['rows_valid']} valid of {report['rows_total']}; bad: {json.dumps(report['bad_rows'])}")
    typer.echo(f"pairs (train/val/test x upper/lower/full): {json.dumps(report['pairs'])}")
    typer.echo(f"ready: {report['ready']}")
    for r in report["reasons"]:
        typer.echo(f"  - {r}")
    typer.echo(f"wrote {out / 'dataset_report.json'}, {out / 'dataset_report.md'}, "
               + ", ".join(str(out / g) for g in report["sample_grids"]))
    if not report["ready"]:
        raise typer.Exit(1)


@app.command("config")
def show_config(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None) -> None:
    """Print the resolved configuration, and every field with its meaning."""
    import dataclasses

    import yaml

    from catvton.config import describe

    cfg = _load(config, list(set_ or []))
    typer.echo(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    typer.echo("# fields")
    for name, default, doc in describe():
        typer.echo(f"# {name} (default {default}): {doc}")


if __name__ == "__main__":
    sys.exit(app())
