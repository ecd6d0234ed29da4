"""No committed file names a folder of the machine it was made on (issue 25).

The shipped models, the presets and the Serve configs travel with every clone: a path into one
machine's home, temp or root folder (``/root/.cache/...``, ``/home/alice/...``, ``/tmp/...``)
there either points nowhere on the next machine or, worse, at something else. Paths a cluster
mounts on every node (``/mnt/shared``, docs/cluster.md) are configuration, not machine paths.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "catvton" / "offline" / "prebuilt", ROOT / "configs", *sorted((ROOT / "serve").glob("*.yaml"))]
MACHINE_PATH = re.compile(r"""(?<![\w.~-])(?:/root(?:/|\b)|/home/\w|/Users/\w|/tmp/|/var/folders/|/private/|~/|[A-Za-z]:\\\\)""")
TEXT = {".json", ".yaml", ".yml", ".txt", ".md", ".py", ".toml", ".cfg"}


def _files() -> list[Path]:
    out = []
    for p in SCANNED:
        out.extend([p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts))
    return out


def machine_paths(text: str) -> list[str]:
    return [text[max(0, m.start() - 30): m.end() + 30].strip() for m in MACHINE_PATH.finditer(text)]


@pytest.mark.parametrize("sample, found", [
    ('"_name_or_path": "/root/.cache/catvton/exp-base-w128"', True),
    ("storage_path: /home/alice/ray", True),
    ("output_dir: /tmp/catvton-out", True),
    ("base: C:\\\\Users\\\\me\\\\flux", True),
    ("storage_path: /mnt/shared/ray", False),
    ("model: black-forest-labs/FLUX.1-Fill-dev", False),
    ("path: outputs/tiny-lora/lora", False),
])
def test_the_scan_tells_machine_paths_from_others(sample, found):
    assert bool(machine_paths(sample)) is found


def test_no_committed_model_preset_or_serve_config_names_a_machine_folder():
    files = _files()
    assert any(f.suffix == ".safetensors" for f in files) and any(f.suffix == ".yaml" for f in files)
    bad = {}
    for f in files:
        data = f.read_bytes()
        if f.suffix == ".safetensors":  # its JSON header holds the metadata
            data = data[8: 8 + int.from_bytes(data[:8], "little")]
        elif f.suffix not in TEXT:
            continue
        hits = machine_paths(data.decode("utf-8", "replace"))
        if hits:
            bad[str(f.relative_to(ROOT))] = hits[:3]
    assert not bad, f"machine paths in committed files (rebuild with `python -m catvton.offline.ship --refresh`, or make the path relative): {bad}"
