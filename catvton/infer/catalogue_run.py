"""Rendering a catalogue (:mod:`catvton.infer.catalogue`) with Ray Data batch inference: one entry,
:func:`render_catalogue`, and its stage, :class:`CatalogueDresser`.

An actor pool maps :class:`CatalogueDresser` over the items (the pipeline loaded once per actor by
:meth:`TryOnService.from_config <catvton.infer.serving.TryOnService.from_config>`, ``__call__``
pure); the driver writes each returned PNG atomically (a temporary file, then ``os.replace``), so
an image that exists is whole, and a rerun renders only the items whose image is missing. At the
end each look touched gets a contact sheet: the garments, then each person's photo above the
person dressed.

Exactly the same image whatever the batching: by default the actor dresses the items of its batch
one model call each. Batched pipeline calls round differently (about 3e-6 in the canvas, measured
on the tiny model: a few pixels move by one level), so with ``batched=True`` (pass ``k`` of every
item of a batch in one call: more throughput on a GPU) an image may differ by that much from the
same item rendered in another batch; the seeds are per item either way.

The output folder::

    images/<look>/<person>.png    the person photo's size, PNG (lossless: outside the masks every
                                  pixel is the photo's own)
    sheets/<look>.png             the contact sheet of a look
    summary.json                  counts, images/s, every bad input and skipped item with its reason
    settings.json                 what made the images; a rerun with other settings is refused
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from catvton.config import Config, config_from_dict
from catvton.data.validate import png_bytes
from catvton.infer.catalogue import Catalogue, Item, read_mask_file, read_photo_file
from catvton.infer.outfit import OutfitRequest, Piece
from catvton.infer.request import InputError
from catvton.infer.serving import ServeConfig, TryOnService

IMAGES = "images"
SHEETS = "sheets"
SUMMARY = "summary.json"
SETTINGS = "settings.json"
TMP_PREFIX = ".tmp-"
"""A file being written; a killed run may leave one, which the next run removes."""
MODEL_SECTIONS = ("model", "canvas", "mask", "infer")
"""The config sections that decide an image (the rest: data, training, run bookkeeping)."""


LOCK = ".lock"
"""Held (flock) by the job rendering into a folder."""


class SettingsChanged(ValueError):
    """The output folder holds images made with other settings."""


class FolderBusy(RuntimeError):
    """Another job is rendering into the output folder."""


@contextlib.contextmanager
def hold_folder(out: Path) -> Iterator[None]:
    """The output folder, for this job alone while the block runs, or :class:`FolderBusy`: two jobs
    in one folder would render the same items twice and remove each other's files in the making."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(f"another job is rendering into {out}: wait for it, or give another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def image_path(out: Path, item: Item) -> Path:
    return out / IMAGES / item.look / f"{item.person_id}.png"


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` at ``path``, never half-written: a temporary file beside it, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def settings_of(cfg: Config, lora: Path | None, steps: int, seed: int, batched: bool) -> dict[str, Any]:
    """What decides the images of a run (the LoRA by content: a retrained folder is another LoRA)."""
    d = cfg.to_dict()
    weights = sorted(lora.glob("*.safetensors")) if lora is not None else []
    digest = hashlib.sha256()
    for w in weights:
        with open(w, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return {**{k: d[k] for k in MODEL_SECTIONS}, "lora": str(lora) if lora else None,
            "lora_sha256": digest.hexdigest() if weights else None, "steps": steps, "seed": seed, "batched": batched}


def claim_folder(out: Path, settings: dict[str, Any]) -> None:
    """Write ``settings.json``, or raise :class:`SettingsChanged` if the folder's images were made
    with other settings (mixing them would make a catalogue whose images disagree)."""
    path = out / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise SettingsChanged(f"{out} holds images made with other settings ({', '.join(changed)} differ): "
                                  "give another --out, or delete the folder to render it anew")
        return
    write_atomic(path, json.dumps(settings, indent=1).encode())


class CatalogueDresser:
    """Ray Data stage: ``{"item" (N,) JSON of :class:`Item`}`` -> ``{"id" (N,) str, "png" (N,) bytes
    (empty where it failed), "error" (N,) str (empty where it worked)}``."""

    def __init__(self, cfg: dict[str, Any], lora: str | None = None, device: str = "cpu", parser: str | None = None,
                 steps: int | None = None, batched: bool = False):
        masker = None
        if parser:
            from catvton.infer.automask import AutoMasker

            masker = AutoMasker.load(parser, device=device)
        model_cfg = config_from_dict(cfg)
        self.steps = steps
        self.batched = batched
        limits = ServeConfig(max_steps=max(ServeConfig.max_steps, steps or 0))
        self.service = TryOnService.from_config(model_cfg, lora=lora, device=device, masker=masker, settings=limits)

    def request(self, item: Item) -> OutfitRequest:
        pieces = [Piece(p.region, read_photo_file(p.garment),
                        garment_mask=read_mask_file(p.garment_mask) if p.garment_mask else None,
                        mask=read_mask_file(p.person_mask) if p.person_mask else None)
                  for p in item.pieces]
        return OutfitRequest(read_photo_file(item.person), pieces, seed=item.seed, steps=self.steps)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [Item.from_dict(json.loads(s)) for s in batch["item"]]
        pngs, errors = [b""] * len(items), [""] * len(items)
        ready: list[tuple[int, OutfitRequest]] = []
        for i, item in enumerate(items):
            try:
                ready.append((i, self.request(item)))
            except Exception as e:  # noqa: BLE001  (a file changed since the scan: that item fails, not the job)
                errors[i] = f"could not read its files ({type(e).__name__}: {e})"[:300]
        for i, dressed in self._dress(ready, errors):
            pngs[i] = png_bytes(dressed.image, compress_level=1)
        return {"id": np.array([it.id for it in items]), "png": np.array(pngs, dtype=object),
                "error": np.array(errors)}

    def _dress(self, ready: list[tuple[int, OutfitRequest]], errors: list[str]):
        if self.batched and ready:
            try:
                return list(zip([i for i, _ in ready], self.service.dress_many([r for _, r in ready])))
            except InputError:
                pass  # one of them is unusable: one call each, to tell which
        out = []
        for i, req in ready:
            try:
                out.append((i, self.service.dress(req)))
            except InputError as e:
                errors[i] = str(e)
        return out


def render_catalogue(cat: Catalogue, out: Path, cfg: Config, lora: Path | None, *, steps: int | None = None,
                     actors: int = 1, batch_size: int = 4, use_gpu: bool = False, parser: str | None = None,
                     batched: bool = False, limit: int | None = None, stream: TextIO | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Render the items of ``cat`` whose image is missing under ``out`` (at most ``limit`` of them),
    write the contact sheets of the looks touched and ``summary.json``; returns the summary.
    ``cfg`` names concrete folders (entry points resolve offline names first)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / IMAGES).rglob(f"{TMP_PREFIX}*"):
        stale.unlink()  # left by a killed run
    todo = [it for it in cat.items if not image_path(out, it).is_file()]
    done_before = len(cat.items) - len(todo)
    todo = todo[:limit] if limit is not None else todo
    kwargs = {"cfg": cfg.to_dict(), "lora": str(lora) if lora else None, "device": "cuda" if use_gpu else "cpu",
              "parser": parser, "steps": steps, "batched": batched}
    by_id = {it.id: it for it in todo}
    failed: list[dict] = []
    progress = _Progress(len(todo), stream or sys.stderr)
    start = time.perf_counter()
    first = None  # when the first images arrived (the actors had loaded the pipeline)
    rendered = after_first = 0
    if todo:
        log(f"{len(todo)} image(s) to render ({done_before} already in {out / IMAGES}), {actors} actor(s), "
            f"batches of {batch_size}")
        for batch in _ray_data(todo, kwargs, actors, batch_size, use_gpu):
            for item_id, png, error in zip(batch["id"], batch["png"], batch["error"]):
                if error:
                    failed.append({"input": str(item_id), "reason": str(error)})
                else:
                    write_atomic(image_path(out, by_id[str(item_id)]), bytes(png))
                    rendered += 1
            if first is None:
                first = time.perf_counter()
            else:
                after_first += len(batch["id"])
            progress.update(rendered + len(failed))
        progress.close()
    seconds = time.perf_counter() - start
    looks = sorted({it.look for it in todo} | {it.look for it in cat.items if not (out / SHEETS / f"{it.look}.png").is_file()})
    sheets = [str(p) for look in looks if (p := write_sheet(out, cat, look)) is not None]
    steady = after_first / (time.perf_counter() - first) if first is not None and after_first else None
    summary = {
        "people": len(cat.people), "garments": {r: len(g) for r, g in cat.garments.items()},
        "looks": len({it.look for it in cat.items}), "items": len(cat.items), "rendered": rendered,
        "done_before": done_before, "missing": len(cat.items) - done_before - rendered - len(failed),
        "seconds": round(seconds, 3),
        "images_per_s": round(rendered / seconds, 4) if rendered else None,
        "steady_images_per_s": round(steady, 4) if steady else None,
        "actors": actors, "batch_size": batch_size, "batched_model": batched, "device": kwargs["device"],
        "steps": steps if steps is not None else cfg.infer.steps, "lora": kwargs["lora"],
        "bad": cat.bad + failed, "skipped": cat.skipped, "ignored": cat.ignored, "sheets": sheets,
    }
    write_atomic(out / SUMMARY, json.dumps(summary, indent=1).encode())
    return summary


def _ray_data(items: list[Item], kwargs: dict[str, Any], actors: int, batch_size: int, use_gpu: bool):
    import ray
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items([{"item": json.dumps(it.to_dict())} for it in items])
    ds.context.enable_progress_bars = False  # the driver draws one line of its own
    ds = ds.map_batches(
        CatalogueDresser,
        fn_constructor_kwargs=kwargs,
        compute=ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,  # on 2 CPUs one actor leaves a CPU to the driver and Ray Data's tasks
        batch_size=batch_size,
        batch_format="numpy",
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


SHEET_CELL_H = 256
"""Height of a contact sheet's cell in pixels (photos are scaled to fit, never up past it)."""
SHEET_COLUMNS = 8
"""People per row of a contact sheet; more wrap into further rows."""


def write_sheet(out: Path, cat: Catalogue, look: str) -> Path | None:
    """``sheets/<look>.png``: the look's garments, then each person's photo above their image; None
    when no image of the look exists yet."""
    items = [it for it in cat.items if it.look == look and image_path(out, it).is_file()]
    if not items:
        return None
    first = read_photo_file(items[0].person)
    ch = min(SHEET_CELL_H, max(first.shape[0], 64))
    cw = max(1, round(ch * first.shape[1] / first.shape[0]))
    label = 14
    rows = [items[i:i + SHEET_COLUMNS] for i in range(0, len(items), SHEET_COLUMNS)]
    cols = min(len(items), SHEET_COLUMNS) + 1
    sheet = Image.new("RGB", (cols * cw, len(rows) * (2 * ch + label)), "white")
    draw = ImageDraw.Draw(sheet)
    pieces = items[0].pieces
    for k, p in enumerate(pieces):  # the garments, stacked in the first cell (a worn one cut out)
        g = read_photo_file(p.garment)
        g = Image.fromarray(np.where(read_mask_file(p.garment_mask)[..., None], g, np.uint8(255)) if p.garment_mask else g)
        sheet.paste(ImageOps.pad(g, (cw, (2 * ch) // len(pieces)), color="white"), (0, k * (2 * ch) // len(pieces)))
    draw.text((2, 2 * ch), look[: cw // 6], fill="black")
    for r, row in enumerate(rows):
        y = r * (2 * ch + label)
        for c, it in enumerate(row, start=1):
            for k, photo in enumerate((it.person, image_path(out, it))):
                cell = ImageOps.pad(Image.fromarray(read_photo_file(photo)), (cw, ch), color="white")
                sheet.paste(cell, (c * cw, y + k * ch))
            draw.text((c * cw + 2, y + 2 * ch), it.person_id[: cw // 6], fill="black")
    path = out / SHEETS / f"{look}.png"
    write_atomic(path, png_bytes(np.asarray(sheet)))
    return path


class _Progress:
    """One line: images done / total, images/s so far, ETA. Redrawn in place on a terminal; else a
    line at each tenth."""

    def __init__(self, total: int, stream: TextIO):
        self.total, self.stream = total, stream
        self.start = time.perf_counter()
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.shown_tenth = -1

    def update(self, done: int) -> None:
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        eta_text = f"{int(eta) // 60}:{int(eta) % 60:02d}" if eta == eta else "?"
        text = f"rendered {done}/{self.total} images · {rate:.2f} images/s · ETA {eta_text}"
        if self.tty:
            print(f"\r{text}\033[K", end="", file=self.stream, flush=True)
        elif done * 10 // max(self.total, 1) > self.shown_tenth:
            self.shown_tenth = done * 10 // max(self.total, 1)
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)
