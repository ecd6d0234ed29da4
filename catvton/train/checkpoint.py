"""Checkpoints of a training run: the trained weights in a diffusers-loadable form, and the
optimizer, scheduler, step, RNG states and loss history to resume from.

The folder's layout and file names are :mod:`catvton.artifacts`' (its module docstring shows it);
this module only writes and reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from catvton import artifacts
from catvton.config import Config
from catvton.model.host import host_tensor


def lora_metadata(model: torch.nn.Module) -> dict[str, Any]:
    """The LoRA's peft config (rank, alpha, targets), stored in the safetensors metadata so that
    diffusers loads it with the right scale."""
    return model.peft_config["default"].to_dict()


def save_weights(model: torch.nn.Module, folder: Path, cfg: Config) -> None:
    """The trained weights: ``method=lora`` the LoRA in diffusers format
    (:data:`~catvton.artifacts.LORA_WEIGHTS`), ``method=full`` the whole transformer
    (:data:`~catvton.artifacts.FULL_WEIGHTS`, ``save_pretrained``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.train.method == "lora":
        from diffusers import FluxFillPipeline
        from peft.utils import get_peft_model_state_dict

        state = {k: host_tensor(v.detach().float()) for k, v in get_peft_model_state_dict(model).items()}
        FluxFillPipeline.save_lora_weights(folder, transformer_lora_layers=state, weight_name=artifacts.LORA_WEIGHTS,
                                           transformer_lora_adapter_metadata=lora_metadata(model))
    else:
        model.save_pretrained(folder / artifacts.FULL_WEIGHTS)


def load_weights(model: torch.nn.Module, folder: Path, cfg: Config) -> None:
    """Load what :func:`save_weights` wrote into a model built by
    :func:`catvton.train.engine.build_transformer`."""
    if cfg.train.method == "lora":
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(folder / artifacts.LORA_WEIGHTS))
        # diffusers prefixes the keys with "transformer."; peft's own names do not have it
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"checkpoint {folder} has LoRA keys the model lacks: {unexpected[:3]}...")
    else:
        from diffusers import FluxTransformer2DModel

        src = FluxTransformer2DModel.from_pretrained(folder / artifacts.FULL_WEIGHTS)
        model.load_state_dict(src.state_dict())


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer, scheduler, step: int, history: list[dict],
                    cfg: Config, generator: torch.Generator, total: int) -> None:
    """A whole checkpoint folder, as rank 0 writes it: weights, training state (optimizer,
    scheduler, ``step`` of the run's ``total`` steps, the loss ``history``), the config, and rank
    0's RNG states (:func:`save_rank_rng`; the other ranks write theirs)."""
    save_weights(model, folder, cfg)
    artifacts.save_training_state(folder, {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
        "total_steps": total, "history": history})
    (folder / artifacts.CHECKPOINT_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    save_rank_rng(folder, 0, generator)


def save_rank_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    """Rank ``rank``'s RNG states, its noise ``generator``'s and torch's global one, as
    :data:`~catvton.artifacts.RANK_RNG` in a checkpoint folder. Each rank draws its own noise (the
    loop seeds rank r's generator with ``train.seed * 1000 + r``), so each rank writes its own file
    (into the folder it reports: Ray Train puts every rank's files of one report into one
    checkpoint) and restores its own on resume (:func:`load_checkpoint`)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": generator.get_state(), "torch": torch.get_rng_state()},
               folder / artifacts.RANK_RNG.format(rank=rank))


class ResumeRefused(RuntimeError):
    """A run name's checkpoint that this config must not resume; the message says what to do."""


class ScheduleChanged(ResumeRefused):
    """A rerun of a run name whose checkpoint is already at (or past) the end of the new, different
    schedule: resuming would train nothing and present the old run as this one."""


class ModelChanged(ResumeRefused):
    """A rerun of a run name whose checkpoint trained another model (another base, transformer,
    LoRA rank or targets, or training method): its weights cannot continue this run."""


REFUSALS = {c.__name__: c for c in (ScheduleChanged, ModelChanged)}


def _model_identity(model: str | None) -> str | None:
    """A base or transformer as a run names it: a local folder by its name (the tiny models'
    names carry the hash of what built them; a cache may sit elsewhere on another machine), a hub
    id as is."""
    if not model:
        return model
    hub_id = model.count("/") == 1 and not model.startswith(("/", ".", "~")) and not Path(model).exists()
    return model if hub_id else Path(model).name


def model_change(saved: dict, cfg: Config) -> list[str]:
    """What differs between the model a checkpoint's config (``saved``, its ``config.json``)
    trained and the one ``cfg`` trains; empty when the checkpoint can continue."""
    now = cfg.to_dict()
    out = []
    for section, key in (("model", "base"), ("model", "transformer_override")):
        a, b = saved.get(section, {}).get(key), now[section][key]
        if _model_identity(a) != _model_identity(b):
            out.append(f"{section}.{key}: {_model_identity(a)} then, {_model_identity(b)} now")
    for section, key in (("train", "method"), ("lora", "rank"), ("lora", "targets")):
        a, b = saved.get(section, {}).get(key, now[section][key]), now[section][key]
        if a != b:
            out.append(f"{section}.{key}: {a} then, {b} now")
    return out


def resume_note(saved_step: int, saved_total: int | None, total: int, cfg: Config) -> str:
    """What resuming a checkpoint at ``saved_step`` of a run that planned ``saved_total`` steps
    means for this config's ``total``: the line for the run's log (``resumed from step N``, and
    the change when the plan changed: the run continues to ``total`` with this config's schedule).
    Raises :class:`ScheduleChanged` when the plan changed and the checkpoint is already at or past
    ``total`` (``saved_total`` None: a checkpoint that did not record it; refused past ``total``)."""
    changed = saved_total is not None and saved_total != total
    if saved_step > total or (changed and saved_step >= total):
        planned = f" of {saved_total} planned" if saved_total is not None else ""
        raise ScheduleChanged(
            f"run.name={cfg.run.name} has a checkpoint at step {saved_step}{planned} (under "
            f"{cfg.run.storage_path}/{cfg.run.name}), and this config plans {total} steps: resuming would train "
            f"nothing and present that run as this one. Give this run a new name (--set run.name={cfg.run.name}-"
            f"{total}), or, to train this name again from step 0, delete {cfg.run.storage_path}/{cfg.run.name}")
    line = f"resumed from step {saved_step}"
    if changed:
        line += f" (the saved run planned {saved_total} steps; it continues on this config's schedule)"
    return line


def rng_note(saved: int, world: int) -> str:
    """What restoring the RNG states of ``saved`` ranks on ``world`` ranks means, for the resume
    line ('' when the counts match): rank r restores the state rank r saved; a rank the
    checkpoint holds none for keeps the generator the loop seeded (``train.seed * 1000 + rank``);
    surplus states are left unused. A checkpoint from before per-rank states holds rank 0's alone."""
    if saved < world:
        ranks = f"rank {saved}" if world - saved == 1 else f"ranks {saved}-{world - 1}"
        return (f" (the checkpoint holds the noise state of {saved} rank{'s' if saved > 1 else ''} and this run has "
                f"{world}: {ranks} draw{'s' if world - saved == 1 else ''} noise afresh from train.seed*1000+rank)")
    if saved > world:
        return (f" (the checkpoint holds the noise states of {saved} ranks and this run has {world}: "
                f"the others are unused)")
    return ""


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer, scheduler, cfg: Config,
                    generator: torch.Generator, total: int, rank: int = 0,
                    world: int = 1) -> tuple[int, list[dict], str]:
    """Restore what :func:`save_checkpoint` and :func:`save_rank_rng` wrote into rank ``rank`` of
    ``world`` of a run of ``total`` steps; returns (step, loss history, the resume line:
    :func:`resume_note`, then :func:`rng_note`). Raises :class:`ModelChanged` (another model) or
    :class:`ScheduleChanged` (another schedule it cannot continue on) before restoring anything."""
    saved_cfg = folder / artifacts.CHECKPOINT_CONFIG
    changed = model_change(json.loads(saved_cfg.read_text()), cfg) if saved_cfg.is_file() else []
    if changed:
        raise ModelChanged(
            f"run.name={cfg.run.name} has a checkpoint of another model (under {cfg.run.storage_path}/"
            f"{cfg.run.name}; {'; '.join(changed)}): its weights cannot continue this run. Give this run a new "
            f"name (--set run.name={cfg.run.name}-2), or, to train this name again from step 0, delete "
            f"{cfg.run.storage_path}/{cfg.run.name}")
    # onto the CPU, not this rank's GPU: the RNG states must be CPU tensors (set_rng_state), and
    # the optimizers move their state onto each parameter's device themselves (torch's in
    # load_state_dict, bitsandbytes' 8-bit AdamW at its first step)
    state = artifacts.load_training_state(folder, map_location="cpu")
    note = resume_note(int(state["step"]), state.get("total_steps"), total, cfg)
    load_weights(model, folder, cfg)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    mine = folder / artifacts.RANK_RNG.format(rank=rank)
    saved = len(list(folder.glob(artifacts.RANK_RNG.format(rank="*"))))
    rng = torch.load(mine, map_location="cpu", weights_only=True) if mine.is_file() else None
    if saved == 0 and "generator" in state:  # written before per-rank states: rank 0's alone, in the training state
        saved, rng = 1, ({"generator": state["generator"], "torch": state["torch_rng"]} if rank == 0 else None)
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["generator"])
    return int(state["step"]), list(state["history"]), note + rng_note(saved, world)
