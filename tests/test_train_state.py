"""The training loop's state on the GPU cluster, checked without a GPU (issue 24).

- A checkpoint written by GPU workers is read by the driver on a GPU-less head node (the loss
  history after training) and by every rank of a node on resume: ``torch.load`` must name where
  its tensors go. A GPU worker's file is imitated by tagging every storage ``cuda:0`` as it is
  saved: loading it without ``map_location`` on this machine fails exactly as on the head node.
- Rank 0 keeps a few validation pairs: it reads the ordering columns of the split and the
  latents of those pairs only (a fake cache written in small row groups, as the build writes it).
- Each rank draws its own noise, and after a resume the noise an uninterrupted run would have
  drawn; DDP skips its start-up broadcast of identical weights. One 2-worker gloo fit through
  ``job.fit`` answers both (marker ``ray``): its last rank dies once, Ray Train restarts the ranks
  from their checkpoint, and the hooks record what each rank drew and how DDP was built.
"""

from __future__ import annotations

import ast
import os
import sys
import time
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

    c = load_config(ROOT / "configs" / "tiny.yaml", ["model.transformer_override=null", "lora.rank=4",
                                                     "lora.alpha=8.0"])
    c.model.base = str(ensure_tiny_base())
    return c


def training(cfg, total: int = 10):
    """(model, params, optimizer, scheduler) of a fresh run on the tiny base."""
    from catvton.train.engine import build_transformer, make_optimizer, trainable_parameters

    model = build_transformer(cfg, torch.device("cpu"), torch.float32)
    params = trainable_parameters(model)
    return (model, params, *make_optimizer(cfg, params, total))


def test_a_worker_resumes_a_gpu_checkpoint_onto_its_parameters_device(cfg, tmp_path, saved_on_a_gpu):
    from catvton.train.checkpoint import load_checkpoint, save_checkpoint

    model, params, optimizer, scheduler = training(cfg)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    save_checkpoint(tmp_path, model, optimizer, scheduler, 1, [{"step": 1, "loss": 0.5}], cfg,
                    torch.Generator().manual_seed(0), 10)

    model, params, optimizer, scheduler = training(cfg)
    step, history, _ = load_checkpoint(tmp_path, model, optimizer, scheduler, cfg, torch.Generator(), 10)
    assert (step, history) == (1, [{"step": 1, "loss": 0.5}])
    moments = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    assert len(moments) == len(params) and all(m.device.type == "cpu" for m in moments)


def test_each_rank_restores_its_own_noise_state_and_the_resume_line_names_those_that_cannot(cfg, tmp_path):
    """Rank r restores the state rank r saved. A rank the checkpoint holds none for (a run resumed
    on more ranks, or a checkpoint from before per-rank states: rank 0's alone, inside
    training_state.pt) keeps the generator the loop seeded, train.seed*1000+rank, and the resume
    line says so."""
    from catvton.train.checkpoint import load_checkpoint, save_checkpoint, save_rank_rng

    def seeded(rank: int, draws: int = 0) -> torch.Generator:
        g = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
        torch.rand(draws, generator=g)
        return g

    model, _, optimizer, scheduler = training(cfg)
    save_checkpoint(tmp_path, model, optimizer, scheduler, 4, [], cfg, seeded(0, draws=7), 10)  # rank 0's folder
    save_rank_rng(tmp_path, 1, seeded(1, draws=7))  # rank 1's, merged into the same checkpoint by Ray Train

    def resume(rank: int, world: int) -> tuple[torch.Tensor, str]:
        generator = seeded(rank)  # as the loop builds it
        *_, note = load_checkpoint(tmp_path, model, optimizer, scheduler, cfg, generator, 10, rank=rank, world=world)
        return generator.get_state(), note

    for rank in (0, 1):
        state, note = resume(rank, 2)
        assert torch.equal(state, seeded(rank, draws=7).get_state()) and note == "resumed from step 4"
    state, note = resume(2, 3)
    assert torch.equal(state, seeded(2).get_state())
    assert note == ("resumed from step 4 (the checkpoint holds the noise state of 2 ranks and this run has 3: rank 2 "
                    "draws noise afresh from train.seed*1000+rank)")
    assert resume(0, 1)[1] == ("resumed from step 4 (the checkpoint holds the noise states of 2 ranks and this run "
                               "has 1: the others are unused)")

    old = artifacts.load_training_state(tmp_path)  # as written before per-rank states
    old.update(generator=seeded(0, draws=7).get_state(), torch_rng=torch.get_rng_state())
    artifacts.save_training_state(tmp_path, old)
    for f in tmp_path.glob(artifacts.RANK_RNG.format(rank="*")):
        f.unlink()
    assert torch.equal(resume(0, 2)[0], seeded(0, draws=7).get_state())
    state, note = resume(1, 2)
    assert torch.equal(state, seeded(1).get_state())
    assert note == ("resumed from step 4 (the checkpoint holds the noise state of 1 rank and this run has 2: rank 1 "
                    "draws noise afresh from train.seed*1000+rank)")


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


def val_split(root: Path) -> tuple[Path, dict, int]:
    """A latent cache holding only a validation split as the cache build writes it: several files,
    each in small row groups (one per encoded block), pairs in no particular order, a canvas per row
    (bytes standing in for its PNG). Returns (folder, manifest, number of rows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from catvton.cache.format import pack_mask_bits

    rng = np.random.default_rng(0)
    rows = []
    for group, people in (("full", 5), ("lower", 7), ("upper", 3)):
        for _ in range(people):
            for pose in rng.choice(["01_1_front", "02_2_side", "03_4_full", "04_7_back"], 2, replace=False):
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
    kept = {t.half().numpy().tobytes() for b in old_val_batches(cache, manifest, cfg) for t in b["target"]}
    holding = 0  # rows of the row groups that hold a kept pair (a pair's latents are its identity here)
    for f in split_files(cache, "val"):
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            targets = pf.read_row_group(g, columns=["target"]).column("target").to_pylist()
            holding += len(targets) if kept.intersection(targets) else 0
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


# --- two gloo ranks, interrupted and resumed: their noise and the DDP wrapper ----------------
SMALL = ["data.synthetic_pids=40", "data.val_fraction=0.2", "data.test_fraction=0.2",
         "model.transformer_override=null", "train.batch_size=4", "train.warmup_steps=2", "run.wandb_mode=disabled"]


class RecordRanks:
    """The worker hooks of :func:`two_ranks_resumed`. Every worker start (an *attempt*) writes to
    ``folder``: ``noise-rank<r>.txt``, one line ``<attempt> <step> <digest>`` per optimizer step
    (the digest of the training noise and noise levels the rank drew in that step);
    ``ddp-<attempt>.txt``, a line ``init_sync=<value>`` per DDP wrapper built and ``broadcast``
    per start-up broadcast of the module's states; ``weights-rank<r>.pt`` at the end (trainable
    weights). The last rank dies once, after step ``fail_after``'s records, as soon as Ray Train has
    registered a checkpoint in ``storage`` (the run's folder there): a worker that dies right after a
    report can take the report, and so the checkpoint, with it."""

    def __init__(self, folder: Path, fail_after: int, storage: Path):
        self.folder, self.fail_after, self.storage = Path(folder), fail_after, Path(storage)

    def __setstate__(self, state: dict) -> None:  # in the worker, before the loop runs
        import hashlib
        import uuid

        from torch.nn.parallel import DistributedDataParallel, distributed

        from catvton.train import flow

        self.__dict__.update(state)
        self.attempt, self.drawn = uuid.uuid4().hex[:8], []
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / f"ddp-{self.attempt}.txt"
        add_noise = getattr(flow, "_real_add_noise", flow.add_noise)
        sync = getattr(distributed, "_real_sync_module_states", distributed._sync_module_states)
        ddp_init = DistributedDataParallel.__dict__.get("_real_init", DistributedDataParallel.__init__)

        def noisy(x0, noise, sigmas):
            if torch.is_grad_enabled():  # training; the validation loss runs without grad
                digest = hashlib.sha256(noise.detach().cpu().numpy().tobytes() + sigmas.cpu().numpy().tobytes())
                self.drawn.append(digest.hexdigest()[:16])
            return add_noise(x0, noise, sigmas)

        def broadcast(*args, **kwargs):
            with open(log, "a") as f:
                f.write("broadcast\n")
            return sync(*args, **kwargs)

        def wrap(ddp, module, *args, **kwargs):
            with open(log, "a") as f:
                f.write(f"init_sync={kwargs.get('init_sync', True)}\n")
            ddp_init(ddp, module, *args, **kwargs)

        flow._real_add_noise, flow.add_noise = add_noise, noisy
        distributed._real_sync_module_states, distributed._sync_module_states = sync, broadcast
        DistributedDataParallel._real_init, DistributedDataParallel.__init__ = ddp_init, wrap

    def after_step(self, *, step: int, rank: int, world: int, run_dir: Path) -> None:
        with open(self.folder / f"noise-rank{rank}.txt", "a") as f:
            f.writelines(f"{self.attempt} {step} {d}\n" for d in self.drawn)
        self.drawn.clear()
        marker = self.folder / "failed"
        if step == self.fail_after and rank == world - 1 and not marker.exists():
            deadline = time.monotonic() + 120
            while not (self.storage / "checkpoint_manager_snapshot.json").is_file() and time.monotonic() < deadline:
                time.sleep(0.2)
            marker.write_text(f"rank {rank} exits after step {step}\n")
            os._exit(1)

    def at_end(self, *, model: torch.nn.Module, rank: int) -> None:
        torch.save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                   self.folder / f"weights-rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks_resumed(tmp_path_factory, ray_session):
    """One fit of 2 gloo workers, 3 steps, a checkpoint at step 2; the last rank dies after step 3
    once, so Ray Train restarts both ranks from the step-2 checkpoint and they run step 3 again:
    its first attempt is the uninterrupted run, its second the resumed one. ``(outcome, records)``."""
    import ray.cloudpickle

    from catvton.cache.build import build_latent_cache
    from catvton.config import load_config
    from catvton.offline import resolve
    from catvton.train.job import fit

    tmp = tmp_path_factory.mktemp("two-ranks")
    cfg = resolve(load_config(ROOT / "configs/tiny.yaml", SMALL + [
        f"run.storage_path={tmp / 'ray'}", f"run.output_dir={tmp / 'out'}", "run.name=ranks", "train.num_workers=2",
        "train.max_steps=3", "train.checkpoint_every=2", "train.val_every=3", "train.val_batches=1",
        "train.max_failures=1"]), log=lambda _: None)
    cache = build_latent_cache(cfg, progress=False, log=lambda _: None)  # built once into the cache root
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    outcome = fit(cfg, cache, worker_hooks=RecordRanks(tmp / "records", fail_after=3, storage=tmp / "ray" / "ranks"))
    return outcome, tmp / "records"


def attempts(records: Path, rank: int) -> list[dict[int, str]]:
    """``{step: noise digest}`` of each attempt of ``rank``, in the order they ran."""
    out: dict[str, dict[int, str]] = {}
    for line in (records / f"noise-rank{rank}.txt").read_text().splitlines():
        attempt, step, digest = line.split()
        assert int(step) not in out.setdefault(attempt, {}), "one draw a step (grad_accum 1)"
        out[attempt][int(step)] = digest
    return list(out.values())


@pytest.mark.ray
@pytest.mark.slow  # one 2-worker fit with a killed rank and its restart: ~1-2 min (default tier budget)
def test_after_a_resume_each_rank_draws_its_own_noise_as_an_uninterrupted_run_would(two_ranks_resumed):
    """2 gloo workers, resume: the ranks' noise differs from each other and equals an uninterrupted
    run's. Every rank's noise generator state is saved; a checkpoint kept rank 0's alone and every
    rank restored it, so after a resume all ranks drew the same noise."""
    outcome, records = two_ranks_resumed
    assert (records / "failed").is_file() and outcome.metrics["step"] == 3
    assert (outcome.run_dir / artifacts.RESUMES).read_text().splitlines() == ["resumed from step 2"]
    (first0, again0), (first1, again1) = attempts(records, 0), attempts(records, 1)
    assert sorted(first0) == sorted(first1) == [1, 2, 3] and sorted(again0) == sorted(again1) == [3]
    assert all(first0[s] != first1[s] for s in (1, 2, 3)), "each rank its own noise"
    assert again0[3] != again1[3], "after the resume too"
    assert (again0[3], again1[3]) == (first0[3], first1[3]), "step 3 resumed draws what it drew uninterrupted"


@pytest.mark.ray
@pytest.mark.slow  # one 2-worker fit with a killed rank and its restart: ~1-2 min (default tier budget)
def test_ddp_skips_its_start_up_broadcast_and_the_ranks_stay_identical(two_ranks_resumed):
    """Every rank loads the same files and seeds the LoRA's init with train.seed: DDP's start-up
    broadcast of every parameter (~24 GB at full size, at every start and restart) copied rank 0's
    weights onto identical ones. Without it, the ranks' weights after training are still the same
    bits (a rank that started elsewhere would stay elsewhere: DDP averages the gradients only)."""
    outcome, records = two_ranks_resumed
    built = [p.read_text().split() for p in records.glob("ddp-*.txt")]
    assert len(built) == 4, f"a DDP wrapper per rank and attempt: {built}"
    assert all(lines == ["init_sync=False"] for lines in built), built
    r0, r1 = (torch.load(records / f"weights-rank{r}.pt", map_location="cpu") for r in (0, 1))
    assert r0.keys() == r1.keys() and len(r0) > 0
    assert all(torch.equal(r0[k], r1[k]) for k in r0), [k for k in r0 if not torch.equal(r0[k], r1[k])][:3]
    assert max(float(v.abs().max()) for k, v in r0.items() if "lora_B" in k) > 0, "the LoRA moved from its zero init"
    assert (outcome.weights_dir / artifacts.LORA_WEIGHTS).is_file()
    # the job chose how to read the split by itself (a small split is held) and says why
    assert outcome.read == "materialize"
    assert (outcome.run_dir / artifacts.READ_MODE).read_text().startswith("materialize: ")
