"""The training loop's state on the GPU cluster, checked without a GPU (issue 24).

- A checkpoint written by GPU workers is read by the driver on a GPU-less head node (the loss
  history after training) and by every rank of a node on resume: ``torch.load`` must name where
  its tensors go. A GPU worker's file is imitated by tagging every storage ``cuda:0`` as it is
  saved: loading it without ``map_location`` on this machine fails exactly as on the head node.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from catvton import artifacts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved_on_a_gpu(monkeypatch):
    """In this test ``torch.save`` tags every storage ``cuda:0``, as a GPU worker's save does."""
    import torch.serialization

    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")


def test_the_driver_reads_the_loss_history_of_a_gpu_checkpoint_on_a_cpu(tmp_path, saved_on_a_gpu):
    adam = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}}, "param_groups": []}
    artifacts.save_training_state(tmp_path, {"step": 3, "history": [{"step": 3, "loss": 0.25}],
                                             "optimizer": adam, "torch_rng": torch.get_rng_state()})
    assert artifacts.loss_history(tmp_path) == [{"step": 3, "loss": 0.25}]
    state = artifacts.load_training_state(tmp_path)
    assert state["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    assert state["torch_rng"].device.type == "cpu"


@pytest.fixture(scope="module")
def cfg():
    from catvton.config import load_config
    from catvton.offline.tiny_base import ensure_tiny_base

    c = load_config(ROOT / "configs" / "tiny.yaml", ["model.transformer_override=null", "lora.rank=4", "lora.alpha=8.0"])
    c.model.base = str(ensure_tiny_base())
    return c


def test_a_worker_resumes_a_gpu_checkpoint_onto_its_own_parameters(cfg, tmp_path, saved_on_a_gpu):
    from catvton.train.checkpoint import load_checkpoint, save_checkpoint
    from catvton.train.engine import build_transformer, make_optimizer, trainable_parameters

    def training():
        model = build_transformer(cfg, torch.device("cpu"), torch.float32)
        params = trainable_parameters(model)
        return (model, params, *make_optimizer(cfg, params, 10), torch.Generator().manual_seed(0))

    model, params, optimizer, scheduler, generator = training()
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    save_checkpoint(tmp_path, model, optimizer, scheduler, 1, [{"step": 1, "loss": 0.5}], cfg, generator, 10)

    model, params, optimizer, scheduler, generator = training()
    step, history, _ = load_checkpoint(tmp_path, model, optimizer, scheduler, cfg, generator, 10)
    assert (step, history) == (1, [{"step": 1, "loss": 0.5}])
    moments = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    assert len(moments) == len(params) and all(m.device.type == "cpu" for m in moments)


def torch_loads_without_map_location(root: Path) -> list[str]:
    """``file:line`` of every ``torch.load(...)`` call under ``root`` that does not name ``map_location``."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "map_location" for k in node.keywords)):
                out.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return out


def test_every_torch_load_in_the_library_names_map_location():
    """Without it a tensor comes back on the device it was saved from: a CUDA checkpoint fails on a
    GPU-less driver, and every rank of a node unpickles onto cuda:0."""
    assert torch_loads_without_map_location(ROOT / "catvton") == []


# --- the validation rows rank 0 keeps --------------------------------------------------------
LATENT = (16, 2, 2)  # (C, h, w) of the fake cache's latents
MASK = (8, 16)  # (H, 2W) of its masks


def val_split(root: Path, rows_per_group: int = 2) -> tuple[Path, dict, int]:
    """A latent cache holding only a validation split as the cache build writes it: several files,
    each in small row groups (one per encoded block), pairs in no particular order, a canvas PNG
    per row. Returns (folder, manifest, number of rows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from catvton.cache.format import pack_mask_bits

    rng = np.random.default_rng(0)
    rows = []
    for group, people in (("full", 5), ("lower", 7), ("upper", 3)):
        for p in range(people):
            for pose in rng.choice(["01_1_front", "02_2_side", "03_4_full", "04_7_back"], rows_per_group, replace=False):
                rows.append({"pid": f"id_{rng.integers(10**8):08d}", "group": group, "cloth_type": group,
                             "garment_pose": "01_1_front", "person_pose": str(pose),
                             "mask": pack_mask_bits(rng.random(MASK) > 0.5), "stats": "",
                             "target": rng.standard_normal(LATENT).astype(np.float16).tobytes(),
                             "masked": rng.standard_normal(LATENT).astype(np.float16).tobytes(),
                             "canvas": rng.bytes(64)})
    rows.append(dict(rows[3], target=rng.standard_normal(LATENT).astype(np.float16).tobytes()))  # a tied key
    order = rng.permutation(len(rows))
    folder = root / "split=val"
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(order, 3)):
        pq.write_table(pa.Table.from_pylist([rows[j] for j in part]), folder / f"part-{i}.parquet", row_group_size=2)
    return root, {"latent_shape": list(LATENT), "mask_shape": list(MASK)}, len(rows)


def old_val_batches(cache: Path, manifest: dict, cfg) -> list[dict]:
    """The selection as loop.load_val_batches made it before issue 24 (it read the whole split)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from catvton.cache.read import decode_batch, split_files

    table = pq.read_table(split_files(cache, "val")).to_pandas()
    table = table.sort_values(["group", "pid", "person_pose"]).reset_index(drop=True)
    n = cfg.train.val_batches * cfg.train.batch_size
    groups = sorted(table["group"].unique())
    per_group = max(1, n // max(1, len(groups)))
    table = pd.concat([table[table["group"] == g].head(per_group) for g in groups]).reset_index(drop=True)
    return [decode_batch({c: table[c].to_numpy()[i:i + cfg.train.batch_size] for c in table.columns}, manifest)
            for i in range(0, len(table), cfg.train.batch_size)]


def val_cfg(val_batches: int, batch_size: int):
    from catvton.config import Config

    cfg = Config()
    cfg.train.val_batches, cfg.train.batch_size = val_batches, batch_size
    return cfg


@pytest.mark.parametrize("val_batches, batch_size", [(2, 3), (1, 4), (4, 4), (30, 2)])
def test_the_validation_batches_are_the_same_pairs_in_the_same_order_as_before(tmp_path, val_batches, batch_size):
    from catvton.train.loop import load_val_batches

    cache, manifest, _ = val_split(tmp_path)
    cfg = val_cfg(val_batches, batch_size)
    new, old = load_val_batches(cache, manifest, cfg, torch.device("cpu")), old_val_batches(cache, manifest, cfg)
    assert [b["pid"] for b in new] == [b["pid"] for b in old] and [b["group"] for b in new] == [b["group"] for b in old]
    for a, b in zip(new, old):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in ("target", "masked", "mask"))


def test_rank_0_reads_the_latents_of_the_kept_validation_pairs_only(tmp_path, monkeypatch):
    """At full size a row's latents are ~1.6 MB and its canvas PNG more: reading the whole split to
    keep 16 rows held all of it in rank 0's memory. The ordering columns are read for every row;
    latents only from the row groups (the unit parquet reads) that hold a kept pair; canvases never."""
    import pyarrow.parquet as pq

    from catvton.cache.read import split_files
    from catvton.train.loop import load_val_batches

    cache, manifest, total = val_split(tmp_path)
    cfg = val_cfg(2, 3)
    kept = {(p, g) for b in old_val_batches(cache, manifest, cfg) for p, g in zip(b["pid"], b["group"])}
    holding = 0  # rows of the row groups that hold a kept pair
    for f in split_files(cache, "val"):
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            keys = pf.read_row_group(g, columns=["pid", "group"]).to_pylist()
            holding += len(keys) if any((k["pid"], k["group"]) in kept for k in keys) else 0
    assert len(kept) == 6 and holding < total

    read: list[tuple[set[str], int]] = []  # (columns, rows) of every table parquet materialised

    def spy(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            read.append((set(out.schema.names), out.num_rows))
            return out
        return wrapped

    monkeypatch.setattr(pq, "read_table", spy(pq.read_table))
    for name in ("read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, spy(getattr(pq.ParquetFile, name)))
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda *a, **k: pytest.fail("iter_batches: not counted"))
    batches = load_val_batches(cache, manifest, cfg, torch.device("cpu"))

    assert sum(len(b["pid"]) for b in batches) == 6
    latent_rows = sum(n for columns, n in read if columns & {"target", "masked"})
    assert 6 <= latent_rows <= holding, (latent_rows, holding, total, read)
    assert not any("canvas" in columns for columns, _ in read), read
