"""The published OpenAPI schema is a contract a generated client can rely on (issue 28, item 6):
``st run <url>/openapi.json --checks all``, schemathesis' own command line with every check, against
the ingress as a shop configures it (customer keys, an experiment, an event log), finds no failure.

The ingress is ``create_api`` served by uvicorn on a loopback port, with the stand-in model side of
tests/test_shop_traffic.py: what the checks judge (routes, statuses, bodies, auth, the schema) is the
ingress's; the model side only makes the picture. Bounded: 30 examples an operation, a fixed seed.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from test_shop_traffic import EXPERIMENT, StandIn

from catvton.infer.serving import serve_config_from_dict
from serve.app import create_api
from serve.keys import KeyEntry, hash_key, new_key, write_entries

ROOT = Path(__file__).resolve().parents[1]
ST = Path(sys.executable).parent / "st"


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """The ingress on 127.0.0.1 with a customer key (every model, a rate the run stays under), an
    experiment and an event log; yields its URL and the key."""
    tmp = tmp_path_factory.mktemp("contract")
    key = new_key()
    write_entries(tmp / "keys.yaml", [KeyEntry("shop", hash_key(key), ("*",), 1000.0, 1000)])
    settings = {"experiments": [EXPERIMENT], "events": str(tmp / "events.sqlite"), "keys_file": str(tmp / "keys.yaml")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_api(serve_config_from_dict(settings), StandIn()), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60  # a guard against a hang, not a timing check
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", key
    server.should_exit = True
    thread.join(timeout=30)


def st_run(url: str, key: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ST), "run", f"{url}/openapi.json", "--checks", "all", "-H", f"Authorization: Bearer {key}",
                           "--max-examples", "30", "--seed", "1", "--no-color"],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_st_run_with_every_check_finds_no_failure(shop):
    url, key = shop
    done = st_run(url, key, ROOT)  # the repository's schemathesis.toml: 422 is a refusal of content
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "Selected: 6/6" in out and "Tested: 6" in out, out[-3000:]
    # every operation was exercised, with the key, and none failed a check
    passed = [line for line in out.splitlines() if " generated, " in line and " passed" in line]
    assert passed and "failures" not in out.split("SUMMARY")[-1].lower(), out[-3000:]


def test_without_the_projects_config_the_semantic_refusals_are_what_st_flags(shop, tmp_path):
    """The negative control: run where no schemathesis.toml is found, the positive-data check
    fails on the 422s the server gives requests a schema cannot rule out (bytes that are no image,
    output=png with format=jpeg), and on nothing else."""
    url, key = shop
    done = st_run(url, key, tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    summary = out.split("SUMMARY")[-1]
    failures = [line.strip() for line in summary.splitlines() if line.strip().startswith("❌ ST")]
    assert failures and all("ST202 Schema-valid request rejected" in f for f in failures), summary
    assert "[422]" in out and "[400]" not in out.split("FAILURES")[-1].split("SUMMARY")[0], out[-4000:]
