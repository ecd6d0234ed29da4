"""The same training step in a plain single-process loop, without Ray Train.

Used to pre-train the tiny "alpha" transformer (the miniature of CatVTON-Flux's try-on
fine-tune) and by the benchmark that compares a step inside ``TorchTrainer`` with this loop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from catvton.config import Config
from catvton.train import step as S


def iter_train_batches(cache: Path, manifest: dict, batch_size: int, seed: int) -> Iterator[dict]:
    """Shuffled training batches from the cache's train split, epoch after epoch, forever."""
    import pyarrow.parquet as pq

    from catvton.data.encode import decode_batch, split_files

    table = pq.read_table(split_files(cache, "train"))
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
    the loss history (``step``, ``loss``, ``sec_per_step``)."""
    from tqdm.auto import tqdm

    from catvton.data.encode import load_manifest, load_text_embeds

    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.use_gpu else "cpu")
    if device.type == "cpu":
        # Small models on shared cores: a second OpenMP thread slows a step 10x as soon as
        # another process runs (measured 0.1 s -> 1.5 s); Ray workers get 1 thread per CPU too.
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    torch.manual_seed(cfg.train.seed)
    manifest = load_manifest(cache)
    model = S.build_transformer(cfg, device, dtype)
    params = S.trainable_parameters(model)
    optimizer, scheduler = S.make_optimizer(cfg, params, steps)
    text = S.TextContext(load_text_embeds(cache), tuple(manifest["latent_shape"][1:]), device, dtype)
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000)
    batches = iter_train_batches(cache, manifest, cfg.train.batch_size, cfg.train.seed)
    history: list[dict] = []
    bar = tqdm(range(steps), desc="train", disable=not progress, mininterval=2.0)
    for step in bar:
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(cfg.train.grad_accum):
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in next(batches).items()}
            loss = S.fill_loss(model, batch, text, cfg, generator) / cfg.train.grad_accum
            loss.backward()
            total += float(loss.detach())
        if cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not np.isfinite(total):
            raise FloatingPointError(f"loss became {total} at step {step + 1}: lower train.lr")
        history.append({"step": step + 1, "loss": total, "sec_per_step": time.perf_counter() - t0})
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean([h['loss'] for h in history[-20:]]):.4f}")
    model.eval()
    return model, history
