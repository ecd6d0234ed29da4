"""Publish a LoRA to the Hugging Face Hub with a model card (base, data, pairing and mask rules,
hyperparameters, sweep summary, evaluation table, usage snippet).

    python ray_jobs/publish.py --lora outputs/tiny-sweep/release --hub-model-id you/catvton-bottoms --dry-run
    HF_TOKEN=hf_... python ray_jobs/publish.py --lora outputs/tiny-sweep/release --hub-model-id you/catvton-bottoms

--dry-run writes the exact folder that would be uploaded (default: <lora>/hub-upload) and uploads
nothing. The token is read from HF_TOKEN (or HUGGING_FACE_HUB_TOKEN), never printed or stored.
Run ray_jobs/evaluate.py on the folder first to put the evaluation table in the card. A LoRA
trained on the synthetic rows (the offline default) is refused unless --allow-synthetic is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", required=True, help="release folder or a run's lora/ folder")
    p.add_argument("--hub-model-id", required=True, help="<user or org>/<name> of the model repo")
    p.add_argument("--dry-run", action="store_true", help="write the upload folder only")
    p.add_argument("--out", default=None, help="upload folder (default: <lora>/hub-upload)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--allow-synthetic", action="store_true",
                   help="publish a LoRA trained on the synthetic rows (data.source: synthetic), a rehearsal")
    args = p.parse_args(argv)

    from catvton.publish import PublishError, build_upload_folder, check_data_source, push, trained_data_source

    out = Path(args.out) if args.out else Path(args.lora) / "hub-upload"
    try:
        folder = build_upload_folder(args.lora, out, args.hub_model_id)
        print(f"upload folder: {folder} ({', '.join(sorted(f.name for f in folder.iterdir()))})")
        if args.dry_run:
            try:
                check_data_source(trained_data_source(folder), args.allow_synthetic)
            except PublishError as e:
                print(f"note: a real push would be refused: {e}")
            print("dry run: nothing uploaded")
            return 0
        url = push(folder, args.hub_model_id, private=args.private, allow_synthetic=args.allow_synthetic)
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"published: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
