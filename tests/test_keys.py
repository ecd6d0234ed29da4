"""Per-key access and quotas (serve/keys.py, issue 28 item 3): the file holds no key, the
middleware's 401/429/404 answers and what it hands the routes, exact usage counts, every problem
of a bad keys file at once, and the operator's command line run as an operator runs it.

The middleware is driven through a small FastAPI app with starlette's TestClient and a fake
clock, so the rate limit is tested in simulated seconds, never with sleeps. No Ray.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from serve.keys import KeyEntry, KeyQuota, KeyRing, TokenBucket, Usage, hash_key, new_key

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "serve.keys", *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def add(file: Path, name: str, models: str, rate="2", burst="4") -> str:
    r = cli("add", "--file", str(file), "--name", name, "--models", models, "--rate", rate, "--burst", burst)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


# --------------------------------------------------------------------------------------------
# The command line and the file


def test_add_prints_the_key_once_and_the_file_holds_only_its_hash(tmp_path):
    file = tmp_path / "keys.yaml"
    r = cli("add", "--file", str(file), "--name", "shop-1", "--models", "tiny-a,tiny-b", "--rate", "2", "--burst", "4")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("tk_") and len(key) >= 40 and "\n" not in key
    assert "not stored" in r.stderr
    text = file.read_text()
    assert key not in text and key[3:] not in text  # no plain key, with or without its prefix
    assert "sha256:" + hashlib.sha256(key.encode()).hexdigest() in text
    assert text.startswith("# ") and "python -m serve.keys" in text.splitlines()[1]  # says how it is edited
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file

    ring = KeyRing.load(file)
    entry = ring.identify(key)
    assert entry == KeyEntry("shop-1", hash_key(key), ("tiny-a", "tiny-b"), 2.0, 4)
    assert ring.identify(key + "x") is None and ring.identify(new_key()) is None
    assert ring.identify("") is None and ring.identify(None) is None
    assert ring.identify(hash_key(key)) is None  # the stored hash is not itself a key


def test_add_refuses_a_duplicate_name_and_leaves_the_file_as_it_was(tmp_path):
    file = tmp_path / "keys.yaml"
    add(file, "shop-1", "tiny-a")
    before = file.read_bytes()
    r = cli("add", "--file", str(file), "--name", "shop-1", "--models", "tiny-b", "--rate", "1", "--burst", "1")
    assert r.returncode != 0 and "already has a key named 'shop-1'" in r.stderr and r.stdout == ""
    assert file.read_bytes() == before


def test_add_refuses_bad_values_before_writing(tmp_path):
    file = tmp_path / "keys.yaml"
    r = cli("add", "--file", str(file), "--name", "shop-1", "--models", "tiny-a", "--rate", "0", "--burst", "0")
    assert r.returncode != 0 and "rate_per_s" in r.stderr and "burst" in r.stderr and r.stdout == ""
    assert not file.exists()


def test_list_shows_names_models_and_rates_never_hashes_and_revoke_removes_a_key(tmp_path):
    file = tmp_path / "keys.yaml"
    k1 = add(file, "shop-1", "tiny-a,tiny-b", rate="2", burst="4")
    k2 = add(file, "shop-2", "*", rate="0.5", burst="1")
    r = cli("list", "--file", str(file))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines == ["shop-1\tmodels=tiny-a,tiny-b\trate_per_s=2\tburst=4", "shop-2\tmodels=*\trate_per_s=0.5\tburst=1"]
    assert "sha256" not in r.stdout and hash_key(k1)[7:] not in r.stdout

    r = cli("revoke", "--file", str(file), "--name", "shop-1")
    assert r.returncode == 0, r.stderr
    ring = KeyRing.load(file)
    assert ring.identify(k1) is None and ring.identify(k2).name == "shop-2"
    assert cli("list", "--file", str(file)).stdout.splitlines() == [lines[1]]

    r = cli("revoke", "--file", str(file), "--name", "shop-9")
    assert r.returncode != 0 and "no key named 'shop-9'" in r.stderr and "shop-2" in r.stderr


def test_help_names_the_commands_and_flags():
    r = cli("--help")
    assert r.returncode == 0 and all(w in r.stdout for w in ("add", "list", "revoke", "sha256"))
    r = cli("add", "--help")
    assert r.returncode == 0 and all(f in r.stdout for f in ("--file", "--name", "--models", "--rate", "--burst"))


def test_a_bad_keys_file_lists_every_problem_without_echoing_a_pasted_key(tmp_path):
    pasted = new_key()
    good = hash_key(new_key())
    file = tmp_path / "keys.yaml"
    file.write_text(f"""keys:
  - {{name: no-hash, models: [a], rate_per_s: 1, burst: 1}}
  - {{name: plain, hash: {pasted}, models: [a], rate_per_s: 1, burst: 1}}
  - {{name: still, hash: {hash_key(new_key())}, models: [a], rate_per_s: 0, burst: 2}}
  - {{name: dup, hash: {good}, models: [a], rate_per_s: 1, burst: 1}}
  - {{name: dup, hash: {hash_key(new_key())}, models: [b], rate_per_s: 1, burst: 1}}
  - {{name: typo, key: {pasted}, hash: {hash_key(new_key())}, models: [], rate_per_s: 1, burst: 1}}
  - just a string
""")
    with pytest.raises(ValueError) as e:
        KeyRing.load(file)
    msg = str(e.value)
    for expected in ("keys[0] (no-hash): missing 'hash'",
                     "keys[1] (plain): 'hash' looks like a plain key",
                     "keys[2] (still): 'rate_per_s' must be a number > 0",
                     "duplicate name 'dup'",
                     "keys[5] (typo): unknown field 'key': the file holds only the key's 'hash'",
                     "keys[6]: expected a mapping"):
        assert expected in msg, msg
    assert "keys[5] (typo): 'models' must be a non-empty list" in msg  # an unknown field hides no other problem
    assert "7 problem(s)" in msg
    assert pasted not in msg


@pytest.mark.parametrize("text", ["- {name: a}\n", "keys: {name: a}\n", "keys: []\nextra: 1\n", "keys: [\n"])
def test_a_keys_file_of_the_wrong_shape_is_refused(tmp_path, text):
    file = tmp_path / "keys.yaml"
    file.write_text(text)
    with pytest.raises(ValueError, match="keys"):
        KeyRing.load(file)


def test_an_empty_keys_file_is_a_ring_that_knows_no_key(tmp_path):
    file = tmp_path / "keys.yaml"
    file.write_text("keys: []\n")
    assert KeyRing.load(file).identify(new_key()) is None


def test_a_ring_built_in_code_refuses_duplicates_and_bad_entries():
    a = KeyEntry("a", hash_key("tk_1"), ("m",), 1, 1)
    with pytest.raises(ValueError, match="duplicate name 'a'"):
        KeyRing([a, KeyEntry("a", hash_key("tk_2"), ("m",), 1, 1)])
    with pytest.raises(ValueError, match="same hash"):
        KeyRing([a, KeyEntry("b", hash_key("tk_1"), ("m",), 1, 1)])
    with pytest.raises(ValueError, match="plain key"):
        KeyEntry("c", "tk_1", ("m",), 1, 1)


# --------------------------------------------------------------------------------------------
# Bucket and usage, alone


def test_token_bucket_is_exact_under_an_injected_clock():
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=2, burst=3, clock=clock)
    assert [bucket.take()[0] for _ in range(4)] == [True, True, True, False]
    assert bucket.take() == (False, pytest.approx(0.5))
    clock.now += 0.25
    assert bucket.take() == (False, pytest.approx(0.25))
    clock.now += 0.25
    assert bucket.take() == (True, 0.0)
    clock.now += 100  # a long pause refills to the burst, no more
    assert [bucket.take()[0] for _ in range(4)] == [True, True, True, False]
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_usage_counts_exactly_from_many_threads():
    usage = Usage()

    def work():
        for _ in range(2000):
            usage.record("k", "allowed", "m")

    threads = [threading.Thread(target=work) for _ in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so an unlocked counter would lose counts
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert usage.snapshot() == {"k": {"requests": 16000, "allowed": 16000, "limited": 0, "forbidden": 0,
                                      "by_model": {"m": 16000}}}


# --------------------------------------------------------------------------------------------
# The middleware in front of an app

KEY_A, KEY_B, KEY_ALL = new_key(), new_key(), new_key()


def wrapped(clock: FakeClock, usage: Usage | None = None) -> TestClient:
    ring = KeyRing([KeyEntry("shop-a", hash_key(KEY_A), ("tiny-a",), 0.4, 2),
                    KeyEntry("shop-b", hash_key(KEY_B), ("tiny-b", "secret-c"), 10, 10),
                    KeyEntry("all", hash_key(KEY_ALL), ("*",), 10, 10)])
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        return {"key": request.state.api_key, "asked": request.headers.get("x-tryon-model")}

    return TestClient(KeyQuota(app, ring, usage, open_paths=("/healthz",), clock=clock))


def bearer(key: str, model: str | None = None) -> dict:
    return {"Authorization": f"Bearer {key}", **({"x-tryon-model": model} if model else {})}


def test_an_open_path_needs_no_key_and_a_missing_or_wrong_key_is_401():
    client = wrapped(FakeClock())
    assert client.get("/healthz").json() == {"status": "ok"}
    for headers in ({}, bearer(new_key()), {"Authorization": f"Basic {KEY_A}"}, {"Authorization": "Bearer"},
                    bearer(hash_key(KEY_A))):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert set(r.json()) == {"error", "field"} and r.json()["field"] == "authorization"
    assert client.get("/v1/models", headers=bearer(KEY_A)).status_code == 200


def test_the_routes_see_which_key_called_and_its_models():
    client = wrapped(FakeClock())
    assert client.get("/v1/models", headers=bearer(KEY_A)).json() == {
        "key": {"name": "shop-a", "models": ["tiny-a"]}, "asked": None}
    assert client.get("/v1/models", headers=bearer(KEY_ALL, "anything")).json() == {
        "key": {"name": "all", "models": ["*"]}, "asked": "anything"}


def test_a_key_over_its_rate_gets_429_with_retry_after_until_its_bucket_refills():
    clock = FakeClock()
    client = wrapped(clock)  # shop-a: 0.4/s, burst 2
    assert [client.get("/v1/models", headers=bearer(KEY_A)).status_code for _ in range(2)] == [200, 200]
    r = client.get("/v1/models", headers=bearer(KEY_A))
    assert r.status_code == 429 and r.headers["retry-after"] == "3"  # 2.5 s, rounded up
    assert r.json()["error"].startswith("this key is over its rate of 0.4 requests/s (burst 2)")
    assert r.json()["field"] == "authorization" and r.json()["rate_per_s"] == 0.4
    assert client.get("/v1/models", headers=bearer(KEY_B)).status_code == 200  # another key has its own bucket
    clock.now += 2.45
    r = client.get("/v1/models", headers=bearer(KEY_A))
    assert r.status_code == 429 and r.headers["retry-after"] == "1"  # 0.05 s left: at least 1
    clock.now += 0.05
    assert client.get("/v1/models", headers=bearer(KEY_A)).status_code == 200


def test_a_key_cannot_reach_a_model_it_may_not_use_nor_learn_that_it_exists():
    clock = FakeClock()
    client = wrapped(clock)

    def get(headers):
        clock.now += 100  # shop-a's bucket full again: only the model decides
        return client.get("/v1/models", headers=headers)

    assert get(bearer(KEY_A, "tiny-a")).status_code == 200
    other = get(bearer(KEY_A, "secret-c"))  # shop-b's model
    nowhere = get(bearer(KEY_A, "no-such-model"))
    assert other.status_code == nowhere.status_code == 404
    assert other.json() == nowhere.json()  # the same answer: nothing tells the two apart
    body = other.json()
    assert body["field"] == "x-tryon-model" and body["models"] == ["tiny-a"] and "tiny-a" in body["error"]
    assert "secret-c" not in other.text and "tiny-b" not in other.text
    # two model headers: every one must be allowed, whichever the route reads
    r = get([("Authorization", f"Bearer {KEY_A}"), ("x-tryon-model", "tiny-a"), ("x-tryon-model", "secret-c")])
    assert r.status_code == 404
    assert get(bearer(KEY_B, "secret-c")).status_code == 200
    assert get(bearer(KEY_ALL, "secret-c")).status_code == 200  # '*' allows all


def test_usage_after_a_known_sequence_is_exact():
    clock, usage = FakeClock(), Usage()
    client = wrapped(clock, usage)
    statuses = [client.get("/v1/models", headers=h).status_code for h in (
        bearer(KEY_A, "tiny-a"),      # allowed
        bearer(KEY_A, "secret-c"),    # forbidden (and costs a token)
        bearer(KEY_A, "tiny-a"),      # limited: burst 2 spent
        bearer(KEY_B, "tiny-b"),      # allowed
        bearer(KEY_B, "secret-c"),    # allowed
        bearer(KEY_B, "secret-c"),    # allowed
        bearer(KEY_B),                # allowed, no model named
        bearer(new_key(), "tiny-a"),  # 401: no key, no counts
    )]
    assert client.get("/healthz").status_code == 200  # open: not counted
    assert statuses == [200, 404, 429, 200, 200, 200, 200, 401]
    assert usage.snapshot() == {
        "shop-a": {"requests": 3, "allowed": 1, "limited": 1, "forbidden": 1, "by_model": {"tiny-a": 1}},
        "shop-b": {"requests": 4, "allowed": 4, "limited": 0, "forbidden": 0,
                   "by_model": {"tiny-b": 1, "secret-c": 2}},
    }
