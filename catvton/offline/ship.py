"""Refresh or check the tiny models shipped in the repository (:mod:`catvton.offline.prebuilt`).

    python -m catvton.offline.ship --status    # which shipped folders the preset uses now (instant)
    python -m catvton.offline.ship --refresh   # build both from scratch (~10 CPU minutes), replace them
    python -m catvton.offline.ship --check     # build both from scratch and compare with the shipped ones
    python -m catvton.offline.ship --refresh --keep-base   # the alpha alone, on the shipped base

Both builds are deterministic on one machine (fixed seeds, fixed torch thread counts, batches in
a seeded order), so ``--check`` expects identical tensors. Another CPU or torch build may round
differently, and thousands of training steps amplify that: then it judges the rebuilt weights
themselves against stated tolerances: every tensor within :data:`TENSOR_TOLERANCE` (relative L2)
of the shipped one, the models' outputs on fixed seeded inputs within :data:`OUTPUT_TOLERANCE`
(the VAE's decode for the base, the transformer's prediction for the alpha), and the build's own
figures within :data:`TOLERANCE` (the VAE's held-out PSNR, the alpha's final training loss).
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
TENSOR_TOLERANCE = 0.25
"""Largest relative L2 difference ``|rebuilt - shipped| / |shipped|`` of any one weight tensor."""
OUTPUT_TOLERANCE = 0.10
"""Largest relative L2 difference of the models' outputs on :func:`fixed_outputs`' inputs."""


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


def build_from_scratch(cache: Path, config: Path = PRESET, log: Callable[[str], None] = print,
                       keep_base: bool = False) -> tuple[Path, Path]:
    """Build the tiny base and the alpha of ``config`` into the empty cache ``cache``; their folders.
    ``keep_base``: the base is the shipped folder of its current key (its digests verified), and
    only the alpha is built, on it."""
    from catvton.offline import resolve
    from catvton.offline.tiny_base import ensure_tiny_base, tiny_base_key

    with _fresh_cache(cache):
        if keep_base:
            if not (prebuilt.HERE / tiny_base_key()).is_dir():
                raise SystemExit(f"--keep-base: no shipped base of the current key {tiny_base_key()}; the base's "
                                 "code changed since the last refresh: run without --keep-base")
            os.environ[prebuilt.SWITCH] = "1"
            ensure_tiny_base(log=log)  # the shipped copy (verified), so resolve builds the alpha alone
            os.environ[prebuilt.SWITCH] = "0"
        cfg = resolve(load_config(config), log=log)
    return Path(cfg.model.base), Path(cfg.model.transformer_override)


def _tensors(folder: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for name, t in load_file(f).items():
            out[f"{f.relative_to(folder)}:{name}"] = t
    return out


def fixed_outputs(folder: Path) -> dict[str, object]:
    """What a model folder computes on fixed seeded inputs: a tiny base's VAE decode of a seeded
    latent (``vae``), an alpha's transformer prediction for a seeded noisy input (``transformer``)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    g = torch.Generator().manual_seed(0)
    out = {}
    if (folder / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        z = torch.randn(1, vae.config.latent_channels, 4, 4, generator=g)
        with torch.no_grad():
            out["vae"] = vae.decode(z).sample
    config = folder / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("_class_name") == "FluxTransformer2DModel":
        t = FluxTransformer2DModel.from_pretrained(folder).eval()
        c, seq, text = t.config, 16, 8
        with torch.no_grad():
            out["transformer"] = t(
                hidden_states=torch.randn(1, seq, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([30.0]),
                img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                   indexing="ij"), -1).reshape(seq, 3),
                txt_ids=torch.zeros(text, 3), return_dict=False)[0]
    return out


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / (a.norm() + 1e-12))


def compare(shipped: Path, rebuilt: Path) -> dict:
    """How far ``rebuilt`` is from ``shipped``: identical tensors, the largest absolute and relative
    weight difference, the outputs' difference on fixed inputs and the build's figures of
    :data:`TOLERANCE`, each with its verdict; ``ok`` when identical or every verdict holds."""
    a, b = _tensors(shipped), _tensors(rebuilt)
    b = {k: v for k, v in b.items() if (shipped / k.split(":")[0]).parent.is_dir()}  # what is shipped of it
    if a.keys() != b.keys():
        return {"identical": False, "ok": False, "reason": f"other tensors: {sorted(a.keys() ^ b.keys())[:5]}"}
    max_abs = max_rel = 0.0
    for k in a:
        d = (a[k].float() - b[k].float()).abs()
        max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
        max_rel = max(max_rel, _rel(a[k], b[k]))
    out = {"identical": max_abs == 0.0, "max_abs_diff": max_abs, "max_rel_l2_diff": max_rel,
           "weights_ok": max_rel <= TENSOR_TOLERANCE, "outputs": {}, "figures": {}}
    if not out["identical"]:
        sa, sb = fixed_outputs(shipped), fixed_outputs(rebuilt)
        for key in sa:
            diff = _rel(sa[key], sb[key])
            out["outputs"][key] = {"rel_l2_diff": diff, "ok": diff <= OUTPUT_TOLERANCE}
    for info in (TINY_BASE_INFO, ALPHA_INFO):
        if (shipped / info).is_file() and (rebuilt / info).is_file():
            si, ri = json.loads((shipped / info).read_text()), json.loads((rebuilt / info).read_text())
            for key, tol in TOLERANCE.items():
                if key in si:
                    diff = abs(ri[key] - si[key]) if key == "vae_psnr_db" else abs(ri[key] / si[key] - 1)
                    out["figures"][key] = {"shipped": si[key], "rebuilt": ri[key], "diff": diff, "ok": diff <= tol}
    verdicts = [out["weights_ok"], *(o["ok"] for o in out["outputs"].values()),
                *(f["ok"] for f in out["figures"].values())]
    out["ok"] = out["identical"] or (bool(out["figures"]) and all(verdicts))
    return out


def refresh(log: Callable[[str], None] = print, keep_base: bool = False) -> list[Path]:
    """Build both from scratch (the alpha alone with ``keep_base``) and make them the shipped
    folders (the old ones are removed)."""
    with tempfile.TemporaryDirectory(prefix="catvton-ship-") as tmp:
        base, alpha = build_from_scratch(Path(tmp), log=log, keep_base=keep_base)
        for old in prebuilt.folders():
            if not (keep_base and old.name == base.name):
                shutil.rmtree(old)
        out = []
        for folder in (alpha,) if keep_base else (base, alpha):
            dst = prebuilt.HERE / folder.name
            # the base's transformer is its seeded random init: the copy re-makes it (ensure_tiny_base)
            shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("transformer") if folder == base else None)
            prebuilt.record_digests(dst)  # a shipped folder is used only while its files match these
            out.append(dst)
    return out


def check(log: Callable[[str], None] = print, keep_base: bool = False) -> dict:
    """Build both from scratch (the alpha alone with ``keep_base``) and compare each with the
    shipped folder of the same key."""
    with tempfile.TemporaryDirectory(prefix="catvton-ship-") as tmp:
        base, alpha = build_from_scratch(Path(tmp), log=log, keep_base=keep_base)
        result = {}
        for folder in (alpha,) if keep_base else (base, alpha):
            shipped = prebuilt.HERE / folder.name
            if not shipped.is_dir():
                result[folder.name] = {"ok": False, "reason": "not shipped: the shipped folders are stale (--refresh)"}
                continue
            try:
                prebuilt.verify(shipped)
            except prebuilt.DamagedShippedModel as e:
                result[folder.name] = {"ok": False, "reason": str(e)}
                continue
            result[folder.name] = compare(shipped, folder)
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
    p.add_argument("--keep-base", action="store_true",
                   help="with --refresh or --check: take the shipped base of the current key as it is (a "
                        "--check of it passed: it is what its code makes) and build only the alpha (~1/3 "
                        "of the time); refused when the base's key changed")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.keep_base and args.status:
        p.error("--keep-base goes with --refresh or --check")
    if args.status:
        base, alpha = wanted(load_config(PRESET))
        shipped = [f.name for f in prebuilt.folders()]
        print(json.dumps({"wanted": [base, alpha], "shipped": shipped,
                          "up_to_date": base in shipped and alpha in shipped}, indent=2))
        return 0
    def log(message: str) -> None:  # stdout holds only the result
        print(message, file=sys.stderr)

    if args.refresh:
        for folder in refresh(log=log, keep_base=args.keep_base):
            print(f"shipped: {folder}")
        return 0
    result = check(log=log, keep_base=args.keep_base)
    print(json.dumps(result, indent=2))
    return 0 if all(r["ok"] for r in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
