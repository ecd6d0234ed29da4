"""Starting or joining Ray the same way from every entry point."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a local Ray.

    Locally: no usage-stats prompt, no auth token file, and a short temp dir (Ray's socket paths
    must stay under 108 bytes). Does nothing if Ray is already initialised.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    tmp = Path(tempfile.gettempdir()) / "rayct"
    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(tmp),
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
