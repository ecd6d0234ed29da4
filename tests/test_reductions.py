"""Cross-worker reductions of the training loop run on the training device (issue 11, item 1).

With GPUs Ray Train's process group is NCCL, which reduces only CUDA tensors: a reduction on a
CPU tensor stops a multi-GPU run at its first report. CPU tests run gloo, which takes any CPU
tensor, so the device is checked here with a stand-in for ``torch.distributed.all_reduce`` that,
like NCCL, accepts one device only. No Ray, no process group.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed

from catvton.train.loop import _all_mean

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "gather",
               "gather_object", "scatter", "all_to_all", "all_to_all_single"}


class Accepted(Exception):
    """The fake group took the tensor. A meta tensor holds no value to read back, so the fake
    stops the call here instead."""


class OneDeviceGroup:
    """``all_reduce`` of a group whose backend reduces tensors on ``device`` only (as NCCL does
    with CUDA); the other workers hold ``others``."""

    def __init__(self, device: torch.device, others: list[float], stop_after: bool = False):
        self.device, self.others, self.stop_after = device, others, stop_after
        self.calls: list[tuple[torch.device, torch.dtype]] = []

    def __call__(self, tensor, op=None, group=None, async_op=False):
        self.calls.append((tensor.device, tensor.dtype))
        if tensor.device != self.device:  # NCCL's own words for a CPU tensor
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        if self.stop_after:
            raise Accepted()
        tensor += sum(self.others)


def test_the_loss_is_reduced_on_the_training_device_not_on_the_cpu(monkeypatch):
    """The training device here is ``meta``: any tensor the helper builds elsewhere (the CPU
    float64 tensor it used to build) is rejected, as NCCL rejects a CPU tensor."""
    group = OneDeviceGroup(torch.device("meta"), [0.25], stop_after=True)
    monkeypatch.setattr(torch.distributed, "all_reduce", group)
    with pytest.raises(Accepted):
        _all_mean(0.5, 2, torch.device("meta"))
    assert group.calls == [(torch.device("meta"), torch.float32)]


def test_the_reduced_loss_is_the_mean_over_workers(monkeypatch):
    group = OneDeviceGroup(torch.device("cpu"), [1.5, 2.0])
    monkeypatch.setattr(torch.distributed, "all_reduce", group)
    assert _all_mean(0.5, 3, torch.device("cpu")) == pytest.approx((0.5 + 1.5 + 2.0) / 3)
    assert group.calls == [(torch.device("cpu"), torch.float32)]
    group.calls.clear()
    assert _all_mean(0.75, 1, torch.device("meta")) == 0.75, "one worker: nothing to reduce"
    assert group.calls == []


def _collective_calls(path: Path) -> list[tuple[str, str]]:
    """(collective, enclosing function) for every call of a ``torch.distributed`` collective:
    ``dist.all_reduce(...)`` under any alias, ``torch.distributed.all_reduce(...)``, or a name
    imported from ``torch.distributed``."""
    tree = ast.parse(path.read_text())
    aliases, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            names |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
    found = []

    def is_distributed(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id in aliases) or (
            isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name)
            and node.value.id == "torch")

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            if isinstance(child, ast.Call):
                f = child.func
                if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and is_distributed(f.value):
                    found.append((f.attr, where))
                elif isinstance(f, ast.Name) and f.id in names:
                    found.append((f.id, where))
            visit(child, inner)

    visit(tree, "<module>")
    return found


def test_the_device_checked_helper_is_the_only_collective_in_the_library():
    """So the tests above cover every cross-worker reduction (DDP reduces the gradients itself,
    on the model's device). A new all_reduce or all_gather must go through ``_all_mean``'s kind
    of helper and a test like the ones above."""
    calls = {str(p.relative_to(ROOT)): _collective_calls(p) for p in sorted((ROOT / "catvton").rglob("*.py"))}
    calls = {k: v for k, v in calls.items() if v}
    assert calls == {"catvton/train/loop.py": [("all_reduce", "_all_mean")]}
