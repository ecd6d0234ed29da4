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
