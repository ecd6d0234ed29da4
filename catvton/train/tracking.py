"""Where training metrics go besides Ray: TensorBoard, W&B (offline unless a project is given),
a loss-curve PNG and sample grids. Only the rank-0 worker tracks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np


class Tracker:
    """TensorBoard always; W&B offline by default (``run.wandb_mode``), online with a project."""

    def __init__(self, run_dir: Path, cfg, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.run.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.run.wandb_project or "catvton-flux-tryon", name=cfg.run.name,
                                    dir=str(run_dir), mode=cfg.run.wandb_mode, config=cfg.to_dict(),
                                    reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        for k, v in numbers.items():
            self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_loss_curve(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Train loss (raw and smoothed) and every ``val_loss*`` series against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if train:
        s, v = map(np.asarray, zip(*train))
        ax.plot(s, v, color="tab:blue", alpha=0.3, lw=1, label="train loss")
        k = max(1, len(v) // 20)
        smooth = np.convolve(v, np.ones(k) / k, mode="valid")
        ax.plot(s[k - 1:], smooth, color="tab:blue", lw=2, label=f"train (mean of {k})")
    keys = sorted({k for h in history for k in h if k.startswith("val_loss")})
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h]
        s, v = map(np.asarray, zip(*pts))
        ax.plot(s, v, marker="o", lw=2 if key == "val_loss" else 1, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
