"""Render a catalogue: every person in every garment (or each outfit of a CSV), with Ray Data batch
inference. The pipeline is loaded once per actor; each image's seed comes from its id, so an image
does not depend on the batching or on what else is in the catalogue. A rerun skips every image that
exists (images are written whole or not at all), so a killed job resumes where it stopped.

Offline demo (2 CPUs, the tiny model, 8 steps: 24 images in ~12 s, ~7 images/s once the actor has
loaded the pipeline):

    python ray_jobs/tryon_batch.py --make-example /tmp/catalogue
    python ray_jobs/tryon_batch.py --people /tmp/catalogue/people --garments /tmp/catalogue/garments
    python ray_jobs/tryon_batch.py --people /tmp/catalogue/people --garments /tmp/catalogue/garments \\
        --outfits /tmp/catalogue/outfits.csv --out outputs/catalogue-outfits

On a GPU cluster (train.use_gpu in the config: one GPU per actor; actors read the inputs by path, so
--people and --garments on storage every node sees; the driver writes --out):

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- python ray_jobs/tryon_batch.py \\
        --config configs/l40s.yaml --lora /mnt/shared/sweep/release --people /mnt/shared/shop/people \\
        --garments /mnt/shared/shop/garments --out /mnt/shared/shop/tryon --actors 4

Input layout (ids: letters, digits, '-' and '_'):

    people/<person>.png                    a person photo (.png, .jpg, .jpeg or .webp)
    people/<person>.<region>.png           where the person wears <region> (upper, lower, full) now:
                                           white = the garment, the photo's size. Missing: the human
                                           parser (--parser) makes it; without one the item is skipped
    garments/<region>/<garment>.png        a product shot: all of it is the garment
    garments/<region>/<garment>.mask.png   optional: the photo is someone wearing the garment, this
                                           marks it (cut out as training cuts garments)
    outfits.csv                            optional, columns person,upper,lower,full (garment ids; empty:
                                           none; full is worn alone): one image per row. Without it:
                                           every person x every garment

Output (--out, default outputs/catalogue): images/<look>/<person>.png at the person photo's size,
where <look> is upper-<id>, lower-<id>, full-<id> or, for an outfit, upper-<id>+lower-<id>;
sheets/<look>.png, one contact sheet per look (the garments, then each person above the person
dressed: per garment, and per distinct outfit of the CSV); summary.json (counts, images/s, every
bad input and skipped item with its reason). Ray's own output goes to <out>/ray_logs.

The LoRA: --lora, else the first of outputs/tiny-sweep/release and outputs/tiny-lora/lora that
exists (what serve/config.yaml serves; after `make demo`, the default run's), else the base alone
(--base-only asks for that); the console names the model used. The model config is the LoRA's
own training_config.json when it has one (as serving does), else --config; --set overrides go on
top (e.g. --set infer.steps=4).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a Ray job's working dir is the repo root, but scripts run from anywhere

DEFAULT_LORAS = ("outputs/tiny-sweep/release", "outputs/tiny-lora/lora")
"""Where a LoRA is looked for without --lora, first existing wins (relative to the repository
root): the sweep's winner, then the default training run, as ``serve/config.yaml`` serves."""
SHOWN = 20
"""Bad inputs and skipped items printed on the console (all of them are in summary.json)."""


def main(argv: list[str] | None = None) -> int:
    from catvton.cli import job_parser

    p = job_parser(__doc__, dashboard_flag=True)
    p.add_argument("--people", help="folder of person photos and their masks (see the layout above)")
    p.add_argument("--garments", help="folder with upper/, lower/, full/ garment photos")
    p.add_argument("--outfits", default=None, help="CSV person,upper,lower,full: one image per row "
                                                   "(default: every person x every garment)")
    p.add_argument("--lora", default=None, help="a release or a run's lora/ folder; default: the first of "
                   + ", ".join(DEFAULT_LORAS) + " that exists (as serve/config.yaml), else the base alone")
    p.add_argument("--base-only", action="store_true", help="dress with the base (and its transformer override) "
                   "alone, without a LoRA")
    p.add_argument("--out", default="outputs/catalogue", help="output folder (a rerun resumes in it)")
    p.add_argument("--batch-size", type=int, default=4, help="items per actor call")
    p.add_argument("--actors", type=int, default=1, help="Ray Data actors, each with the pipeline loaded "
                                                         "(one CPU each; one GPU each with train.use_gpu)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's infer.steps)")
    p.add_argument("--seed", type=int, default=0, help="base of every item's seed (a hash of it and the item's id)")
    p.add_argument("--parser", default=None, help="human-parsing model (hub id or folder) for missing person masks")
    p.add_argument("--batched-model", action="store_true",
                   help="one pipeline call per batch (2 CPUs, tiny model: 5-45%% more images/s, noisy); an "
                        "image may then differ by one "
                        "level in a few pixels from the same item in another batch. Default: one call per "
                        "item, images identical whatever --batch-size")
    p.add_argument("--limit", type=int, default=None, help="render at most this many new images, then stop "
                                                           "(a rerun goes on)")
    p.add_argument("--make-example", metavar="DIR", default=None,
                   help="write a demo catalogue from the synthetic world into DIR (people/, garments/, "
                        "outfits.csv) and exit")
    args = p.parse_args(argv)

    if args.make_example:
        return _make_example(Path(args.make_example))
    problems = [f"--{name} is required (or --make-example DIR first)" for name in ("people", "garments")
                if not getattr(args, name)]
    problems += [f"--{n.replace('_', '-')}={getattr(args, n)}: at least 1" for n in ("batch_size", "actors", "steps", "limit")
                 if getattr(args, n) is not None and getattr(args, n) < 1]
    if problems:
        p.error("; ".join(problems))

    from catvton.config import ConfigError
    from catvton.infer.catalogue import CatalogueError, scan_catalogue
    from catvton.infer.catalogue_run import (FolderBusy, SettingsChanged, claim_folder, hold_folder, render_catalogue,
                                             settings_of)
    from catvton.infer.serving import ServeConfig, model_config, pick_lora
    from catvton.offline import resolve
    from catvton.ray_utils import init_ray, run_logs

    if args.lora and not Path(args.lora).is_dir():
        print(f"error: --lora {args.lora} is not a folder (give a release or a run's lora/ folder)", file=sys.stderr)
        return 2
    if args.lora and args.base_only:
        print("error: --lora and --base-only contradict each other: choose one", file=sys.stderr)
        return 2
    loras = [] if args.base_only else [str(Path(args.lora).resolve())] if args.lora else list(DEFAULT_LORAS)
    settings = ServeConfig(config=str(Path(args.config).resolve()), overrides=list(args.set), lora=loras)
    try:
        lora = pick_lora(settings)
        cfg = model_config(settings, lora)  # the LoRA's own training config wins, as in serving
        cat = scan_catalogue(args.people, args.garments, args.outfits, auto_mask=bool(args.parser), seed=args.seed)
    except (ConfigError, CatalogueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    steps = args.steps or cfg.infer.steps
    print(f"model: {cfg.model.base}" + (f" + {cfg.model.transformer_override}" if cfg.model.transformer_override else "")
          + (f" + LoRA {lora}" if lora else " alone, no LoRA" + ("" if args.base_only else
                                                                 f" (none of {', '.join(DEFAULT_LORAS)} exists)")))
    print(f"catalogue: {len(cat.people)} people, " + ", ".join(f"{len(g)} {r}" for r, g in cat.garments.items())
          + f" garments -> {len(cat.items)} images; {len(cat.bad)} bad input(s), {len(cat.skipped)} skipped")
    try:
        with hold_folder(out):
            claim_folder(out, settings_of(cfg, lora, steps, args.seed, args.batched_model))
            init_ray(dashboard=not args.no_dashboard)  # prints the dashboard's URL and where Ray's logs go
            cfg = resolve(cfg)  # offline names (tiny, tiny-alpha) -> cached folders, built once
            with run_logs(out):
                summary = render_catalogue(cat, out, cfg, lora, steps=steps, actors=args.actors,
                                           batch_size=args.batch_size, use_gpu=cfg.train.use_gpu, parser=args.parser,
                                           batched=args.batched_model, limit=args.limit)
    except (SettingsChanged, FolderBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n== catalogue ==")
    rate = f", {summary['images_per_s']:.2f} images/s" if summary["images_per_s"] else ""
    steady = f" ({summary['steady_images_per_s']:.2f} once loaded)" if summary["steady_images_per_s"] else ""
    print(f"rendered {summary['rendered']} image(s) in {summary['seconds']:.1f} s{rate}{steady}; "
          f"{summary['done_before']} already there; {summary['missing']} still missing")
    for kind, key in (("bad", "input"), ("skipped", "item")):
        for entry in summary[kind][:SHOWN]:
            print(f"{kind}: {entry[key]}: {entry['reason']}")
        if len(summary[kind]) > SHOWN:
            print(f"{kind}: {len(summary[kind]) - SHOWN} more in {out / 'summary.json'}")
    print(f"wrote {out / 'images'}, {len(summary['sheets'])} contact sheet(s) in {out / 'sheets'}, {out / 'summary.json'}")
    return 0


def _make_example(folder: Path) -> int:
    from catvton.offline.demo_catalogue import write_demo_catalogue

    paths = write_demo_catalogue(folder)
    print(f"wrote a demo catalogue in {folder}: {paths['people']}, {paths['garments']}, {paths['outfits']}")
    print(f"render it:  python ray_jobs/tryon_batch.py --people {paths['people']} --garments {paths['garments']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
