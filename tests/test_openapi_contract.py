"""The published OpenAPI schema is a contract a generated client can rely on (issue 28, item 6):
``st run <url>/openapi.json --checks all``, schemathesis' own command line with every check, against
the ingress as a shop configures it (customer keys, an experiment, an event log), finds no failure.
The same ingress serves the page's side-by-side comparison of an experiment's two arms.

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
    experiment and an event log; yields its URL, the key and the event log's file."""
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
    yield f"http://127.0.0.1:{port}", key, tmp / "events.sqlite"
    server.should_exit = True
    thread.join(timeout=30)


def st_run(url: str, key: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ST), "run", f"{url}/openapi.json", "--checks", "all", "-H", f"Authorization: Bearer {key}",
                           "--max-examples", "30", "--seed", "1", "--no-color"],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_st_run_with_every_check_finds_no_failure(shop):
    url, key, _ = shop
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
    url, key, _ = shop
    done = st_run(url, key, tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    summary = out.split("SUMMARY")[-1]
    failures = [line.strip() for line in summary.splitlines() if line.strip().startswith("❌ ST")]
    assert failures and all("ST202 Schema-valid request rejected" in f for f in failures), summary
    assert "[422]" in out and "[400]" not in out.split("FAILURES")[-1].split("SUMMARY")[0], out[-4000:]


def test_the_page_compares_two_arms_unnamed_and_records_the_choice(shop):
    """The page's side-by-side (issue 28, item 2): with an experiment running, `Compare two models`
    sends the page's request once per arm (named by header, in the experiment, as this browser's
    user), shows both answers unnamed, and the pick is recorded as a choice between those two
    request ids, the picked one preferred."""
    from playwright.sync_api import sync_playwright

    from serve.experiments import EventLog
    from test_serve_api import _browser

    url, key, events = shop
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/")
            assert page.is_hidden("#ab"), "without the key the experiments are unknown: nothing offered"
            page.fill("#apikey", key)
            page.wait_for_selector("#ab", state="visible")
            assert "bottoms-v2" in page.text_content("#ab-what")
            page.wait_for_selector("#persons button")
            page.click("#persons button >> nth=0")
            page.wait_for_function("state.painted.lower")
            page.click("#garments button.lower >> nth=0")
            page.wait_for_function("state.garments.lower")
            page.click("#ab-run")
            page.wait_for_function("!document.getElementById('ab-pick-right').disabled", timeout=60_000)
            ids = page.evaluate("state.abIds")
            assert page.evaluate("document.getElementById('ab-left').naturalWidth > 0 && "
                                 "document.getElementById('ab-right').naturalWidth > 0")
            assert "m-a" not in page.text_content("#ab") and "m-b" not in page.text_content("#ab"), "arms unnamed"
            page.click("#ab-pick-right")
            page.wait_for_function("document.getElementById('status').textContent.includes('recorded')")
            user = page.evaluate("localStorage.getItem('tryon-user')")
        finally:
            browser.close()
    with EventLog(events) as log:
        asked = {r["request_id"]: r for r in log.requests("bottoms-v2")}
        (choice,) = log.choices("bottoms-v2")
    assert {asked[ids["left"]]["model"], asked[ids["right"]]["model"]} == {"m-a", "m-b"}
    assert asked[ids["left"]]["user_id"] == asked[ids["right"]]["user_id"] == user and user.startswith("page-")
    assert (choice["request_id"], choice["other_request_id"], choice["preferred_request_id"]) == \
        (ids["left"], ids["right"], ids["right"])
    assert choice["preferred_model"] == asked[ids["right"]]["model"]
