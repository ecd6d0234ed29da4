"""Refresh or check the tiny models shipped in the repository (:mod:`catvton.offline.prebuilt`).

    python -m catvton.offline.ship --status    # which shipped folders the preset uses now (instant)
    python -m catvton.offline.ship --refresh   # build both from scratch (~10 CPU minutes), replace them
    python -m catvton.offline.ship --check     # build both from scratch and compare with the shipped ones

Both builds are deterministic on one machine (fixed seeds, fixed torch thread counts, batches in
a seeded order), so ``--check`` expects identical tensors. Another CPU or torch build may round
differently, and thousands of training steps amplify that: then it accepts a rebuild whose
*behaviour* matches within :data:`TOLERANCE` (the VAE's held-out PSNR, the alpha's final training
loss) and prints the largest weight difference beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from catvton.artifacts import ALPHA_INFO, TINY_BASE_INFO
from catvton.config import Config, config_from_dict, load_config
from catvton.offline import prebuilt
from catvton.offline.alpha import alpha_key
from catvton.offline.tiny_base import tiny_base_key

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "tiny.yaml"
TOLERANCE = {"vae_psnr_db": 0.3, "loss_last_50": 0.05}
"""A rebuild that is not bit-identical passes when its VAE's held-out PSNR is within 0.3 dB and the
alpha's mean loss over its last 50 steps within 5% (relative) of the shipped one's."""


def wanted(cfg: Config) -> tuple[str, str | None]:
    """``(base key, alpha key)`` the config resolves to now, computed without building anything;
    the alpha key is None when no base folder of that key is shipped (it names the base folder)."""
    base = tiny_base_key()
    shipped_base = prebuilt.HERE / base
    if not (shipped_base / "model_index.json").is_file():
        return base, None
    c = config_from_dict(cfg.to_dict())
    c.model.base = str(shipped_base)
    return base, alpha_key(c)


@contextmanager
def _fresh_cache(folder: Path):
    """Build into ``folder`` with shipping off (restores the environment afterwards)."""
    saved = {k: os.environ.get(k) for k in ("CATVTON_CACHE", prebuilt.SWITCH)}
    os.environ["CATVTON_CACHE"], os.environ[prebuilt.SWITCH] = str(folder), "0"
    try:
        yield folder
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_from_scratch(cache: Path, config: Path = PRESET, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Build the tiny base and the alpha of ``config`` into the empty cache ``cache``; their folders."""
    from catvton.offline import resolve

    with _fresh_cache(cache):
        cfg = resolve(load_config(config), log=log)
    return Path(cfg.model.base), Path(cfg.model.transformer_override)


def _tensors(folder: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for name, t in load_file(f).items():
            out[f"{f.relative_to(folder)}:{name}"] = t
    return out


def compare(shipped: Path, rebuilt: Path) -> dict:
    """How far ``rebuilt`` is from ``shipped``: identical tensors, the largest absolute and relative
    weight difference, and the behavioural figures of :data:`TOLERANCE` with their verdict."""
    a, b = _tensors(shipped), _tensors(rebuilt)
    b = {k: v for k, v in b.items() if (shipped / k.split(":")[0]).parent.is_dir()}  # what is shipped of it
    if a.keys() != b.keys():
        return {"identical": False, "ok": False, "reason": f"other tensors: {sorted(a.keys() ^ b.keys())[:5]}"}
    max_abs = max_rel = 0.0
    for k in a:
        d = (a[k].float() - b[k].float()).abs()
        max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
        max_rel = max(max_rel, float(d.norm() / (a[k].float().norm() + 1e-12)))
    out = {"identical": max_abs == 0.0, "max_abs_diff": max_abs, "max_rel_l2_diff": max_rel, "figures": {}}
    for info in (TINY_BASE_INFO, ALPHA_INFO):
        if (shipped / info).is_file() and (rebuilt / info).is_file():
            si, ri = json.loads((shipped / info).read_text()), json.loads((rebuilt / info).read_text())
            for key, tol in TOLERANCE.items():
                if key in si:
                    diff = abs(ri[key] - si[key]) if key == "vae_psnr_db" else abs(ri[key] / si[key] - 1)
                    out["figures"][key] = {"shipped": si[key], "rebuilt": ri[key], "diff": diff, "ok": diff <= tol}
    out["ok"] = out["identical"] or (bool(out["figures"]) and all(f["ok"] for f in out["figures"].values()))
    return out


def refresh(log: Callable[[str], None] = print) -> list[Path]:
    """Build both from scratch and make them the shipped folders (the old ones are removed)."""
    with tempfile.TemporaryDirectory(prefix="catvton-ship-") as tmp:
        base, alpha = build_from_scratch(Path(tmp), log=log)
        for old in prebuilt.folders():
            shutil.rmtree(old)
        out = []
        for folder in (base, alpha):
            dst = prebuilt.HERE / folder.name
            # the base's transformer is its seeded random init: the copy re-makes it (ensure_tiny_base)
            shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("transformer") if folder == base else None)
            out.append(dst)
    return out


def check(log: Callable[[str], None] = print) -> dict:
    """Build both from scratch and compare each with the shipped folder of the same key."""
    with tempfile.TemporaryDirectory(prefix="catvton-ship-") as tmp:
        base, alpha = build_from_scratch(Path(tmp), log=log)
        result = {}
        for folder in (base, alpha):
            shipped = prebuilt.HERE / folder.name
            result[folder.name] = (compare(shipped, folder) if shipped.is_dir() else
                                   {"ok": False, "reason": "not shipped: the shipped folders are stale (--refresh)"})
    return result


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="The tiny base and tiny alpha shipped in catvton/offline/prebuilt (so a fresh clone "
                    "does not spend ~10 CPU minutes training them). A shipped folder is used only when "
                    "its name equals the cache key the code computes now; CATVTON_PREBUILT=0 ignores them.",
        epilog="After changing the tiny base's builder, the alpha or configs/tiny.yaml's data/canvas/mask, "
               "run --refresh and commit catvton/offline/prebuilt (tests/test_shipped_models.py says so).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--status", action="store_true", help="print the keys the preset wants and what is shipped")
    g.add_argument("--refresh", action="store_true", help="rebuild from scratch and replace the shipped folders")
    g.add_argument("--check", action="store_true", help="rebuild from scratch and compare (exit 1 if out of tolerance)")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.status:
        base, alpha = wanted(load_config(PRESET))
        shipped = [f.name for f in prebuilt.folders()]
        print(json.dumps({"wanted": [base, alpha], "shipped": shipped,
                          "up_to_date": base in shipped and alpha in shipped}, indent=2))
        return 0
    def log(message: str) -> None:  # stdout holds only the result
        print(message, file=sys.stderr)

    if args.refresh:
        for folder in refresh(log=log):
            print(f"shipped: {folder}")
        return 0
    result = check(log=log)
    print(json.dumps(result, indent=2))
    return 0 if all(r["ok"] for r in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
