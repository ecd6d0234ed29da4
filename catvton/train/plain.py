"""The same training step in a plain single-process loop, without Ray Train.

Used to pre-train the tiny "alpha" transformer (the miniature of CatVTON-Flux's try-on
fine-tune) and by the benchmark that compares a step inside ``TorchTrainer`` with this loop.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from catvton.cache.read import decode_batch, load_manifest, load_text_embeds, split_files
from catvton.config import Config
from catvton.train.engine import (NonFiniteLoss, TextContext, build_transformer, fill_loss, make_optimizer,
                                  non_finite_message, train_step, trainable_parameters)

PAIR_KEY = ("pid", "group", "garment_pose", "person_pose")
"""Names one pair of a cache: the order :func:`iter_train_batches` shuffles from."""


def iter_train_batches(cache: Path, manifest: dict, batch_size: int, seed: int) -> Iterator[dict]:
    """Shuffled training batches from the cache's train split, epoch after epoch, forever.

    The seeded permutation runs over the pairs sorted by :data:`PAIR_KEY`, not
    in the files' order: Ray Data writes a cache's rows in the order its tasks finish, so two builds
    of one cache hold the same rows in another order (seen: 40 rows, same values, other order), and
    batches drawn in file order made two builds of the alpha from one code differ (ship --check:
    a tensor 0.65 apart, relative L2, after 2000 steps)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(split_files(cache, "train"))
    table = table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in PAIR_KEY]))
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    n = table.num_rows
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            yield decode_batch({c: v[idx] for c, v in cols.items()}, manifest)


def train_plain(cfg: Config, cache: Path, steps: int, log: Callable[[str], None] = print,
                progress: bool = True) -> tuple[torch.nn.Module, list[dict]]:
    """Train ``steps`` optimizer steps on one process (CPU or one GPU); returns the model and
    the loss history (``step``, ``loss``, ``sec_per_step``). Raises
    :class:`~catvton.train.engine.NonFiniteLoss` when the loss becomes NaN or infinite."""
    from tqdm.auto import tqdm

    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.use_gpu else "cpu")
    if device.type == "cpu":
        # Small models on shared cores: a second OpenMP thread slows a step 10x as soon as
        # another process runs (measured 0.1 s -> 1.5 s); Ray workers get 1 thread per CPU too.
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    torch.manual_seed(cfg.train.seed)
    manifest = load_manifest(cache)
    model = build_transformer(cfg, device, dtype)
    params = trainable_parameters(model)
    optimizer, scheduler = make_optimizer(cfg, params, steps)
    text = TextContext(load_text_embeds(cache), tuple(manifest["latent_shape"][1:]), device, dtype)
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000)
    loss_fn = functools.partial(fill_loss, text=text, cfg=cfg, generator=generator,
                                garment_dropout=cfg.train.garment_dropout)
    batches = iter_train_batches(cache, manifest, cfg.train.batch_size, cfg.train.seed)
    history: list[dict] = []
    bar = tqdm(range(steps), desc="train", disable=not progress, mininterval=2.0)
    for step in bar:
        t0 = time.perf_counter()
        micro = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in next(batches).items()}
                 for _ in range(cfg.train.grad_accum)]
        result = train_step(model, micro, loss_fn, optimizer, scheduler, params, cfg.train.max_grad_norm)
        if not math.isfinite(result.loss):
            raise NonFiniteLoss(non_finite_message(result.loss, step + 1))
        history.append({"step": step + 1, "loss": result.loss, "sec_per_step": time.perf_counter() - t0})
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean([h['loss'] for h in history[-20:]]):.4f}")
    model.eval()
    return model, history
