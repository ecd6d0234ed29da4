"""Per-key access and quotas for the try-on endpoint's B2B customers (issue 28, item 3).

    python -m serve.keys add --file keys.yaml --name shop-1 --models tiny-a,tiny-b --rate 2 --burst 4
    python -m serve.keys list --file keys.yaml
    python -m serve.keys revoke --file keys.yaml --name shop-1

One endpoint serves several LoRA models, each named by a model id; a request names its model in
the ``x-tryon-model`` header. Each customer gets a key that may use some of those models (or
``*``: all) at a rate of its own. What this module guarantees:

- The keys file holds ``sha256:<hex>`` of each key, never the key: ``add`` prints the key once
  and forgets it. Keys are 256-bit random tokens, so a plain hash is enough (GitHub and Stripe
  store tokens so); a slow password hash would only cost time on every request. Look-up is by
  hash, then ``hmac.compare_digest``.
- A bad file fails at load with every problem listed at once, and no message echoes a value
  that may be a key pasted where its hash belongs.
- :class:`KeyQuota` (a pure ASGI middleware, like ``serve.app.BearerAuth``) answers before
  FastAPI reads the body: 401 for no known key, 429 with ``Retry-After`` over the key's rate,
  404 for a model the key may not use, whose message lists only that key's models: a key never
  learns that another key's model exists.

No import from ``serve.app``: the app imports this module and wires the middleware in.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import math
import os
import re
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from starlette.responses import JSONResponse

MODEL_HEADER = b"x-tryon-model"
"""The request header that names the model (a LoRA's id) a request wants."""
ALL = "*"
"""In ``models``: every model the service has, now and later."""
PREFIX = "tk_"
"""Start of every key: a secret scanner (or a person) can tell a try-on key from other tokens."""
FIELDS = ("name", "hash", "models", "rate_per_s", "burst")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
HEADER = ("# API keys of the try-on service (serve/keys.py): sha256 of each key, never the key itself.\n"
          "# Edit with: python -m serve.keys add|list|revoke --file THIS_FILE (python -m serve.keys --help)\n")


def hash_key(token: str) -> str:
    """What the keys file stores for ``token``: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_key() -> str:
    """A fresh key: ``tk_`` + 32 random bytes, URL-safe (fits a header and a shell unquoted)."""
    return PREFIX + secrets.token_urlsafe(32)


def _problems(name, hash_, models, rate_per_s, burst) -> list[str]:
    """Every problem of one entry's values; never quotes ``hash_``, which may be a pasted key."""
    out = []
    if not isinstance(name, str) or not name.strip():
        out.append("'name' must be a non-empty string")
    if not isinstance(hash_, str) or not _HASH.fullmatch(hash_):
        out.append("'hash' looks like a plain key, not its hash: store 'sha256:<64 hex>' of the key "
                   "(python -m serve.keys add makes one), and treat that key as leaked"
                   if isinstance(hash_, str) and hash_.startswith(PREFIX)
                   else "'hash' must be 'sha256:' and 64 lower-case hex digits, the hash of a key and never "
                        "the key itself (python -m serve.keys add writes it)")
    if (not isinstance(models, (list, tuple)) or not models
            or not all(isinstance(m, str) and m for m in models)):
        out.append(f"'models' must be a non-empty list of model ids, or ['{ALL}'] for all")
    if isinstance(rate_per_s, bool) or not isinstance(rate_per_s, (int, float)) or not rate_per_s > 0:
        out.append(f"'rate_per_s' must be a number > 0 (requests per second), not {rate_per_s!r}")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        out.append(f"'burst' must be a whole number >= 1 (requests at once), not {burst!r}")
    return out


@dataclass(frozen=True)
class KeyEntry:
    """One customer key as the file holds it: who, which models, how fast."""

    name: str
    """The customer's label (unique): what logs, usage and errors name, never the key."""
    hash: str
    """``sha256:<hex>`` of the key (:func:`hash_key`)."""
    models: tuple[str, ...]
    """Model ids this key may use; ``("*",)`` for all."""
    rate_per_s: float
    """Sustained requests per second (the token bucket's refill)."""
    burst: int
    """Requests it may send at once after a pause (the bucket's size)."""

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models) if isinstance(self.models, list) else self.models)
        problems = _problems(self.name, self.hash, self.models, self.rate_per_s, self.burst)
        if problems:
            raise ValueError(f"key {self.name!r}: " + "; ".join(problems))

    def allows(self, model_id: str) -> bool:
        return ALL in self.models or model_id in self.models

    def to_dict(self) -> dict:
        return {"name": self.name, "hash": self.hash, "models": list(self.models),
                "rate_per_s": self.rate_per_s, "burst": self.burst}


def _duplicates(entries: Iterable[KeyEntry]) -> list[str]:
    seen_names, seen_hashes, out = set(), set(), []
    for e in entries:
        if e.name in seen_names:
            out.append(f"duplicate name {e.name!r}: names must be unique")
        if e.hash in seen_hashes:
            out.append(f"key {e.name!r} has the same hash as an earlier key: one key, one customer")
        seen_names.add(e.name)
        seen_hashes.add(e.hash)
    return out


class KeyRing:
    """The known keys, found by the hash of what a request presents."""

    def __init__(self, entries: Iterable[KeyEntry]):
        self.entries = tuple(entries)
        problems = _duplicates(self.entries)
        if problems:
            raise ValueError("bad keys:\n" + "\n".join(f"  - {p}" for p in problems))
        self._by_hash = {e.hash: e for e in self.entries}

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        """The ring of a keys file; ``ValueError`` listing every problem of the file at once."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not YAML: {e}") from None
        problems: list[str] = []
        raw = data.get("keys") if isinstance(data, dict) else None
        if data is not None and not (isinstance(data, dict) and set(data) <= {"keys"}
                                     and isinstance(raw, (list, type(None)))):
            problems.append("expected a mapping 'keys:' holding a list of entries, and nothing else")
            raw = raw if isinstance(raw, list) else None
        entries = []
        for i, item in enumerate(raw or []):
            where = f"keys[{i}]"
            if not isinstance(item, dict):
                problems.append(f"{where}: expected a mapping with {', '.join(FIELDS)}")
                continue
            if isinstance(item.get("name"), str):
                where += f" ({item['name']})"
            missing = [f"missing '{f}'" for f in FIELDS if f not in item]
            mine = missing + [f"unknown field {f!r}" + (": the file holds only the key's 'hash', never the key"
                                                        if f in ("key", "token", "secret") else "")
                              for f in item if f not in FIELDS]
            mine += [] if missing else _problems(*(item[f] for f in FIELDS))
            problems += [f"{where}: {p}" for p in mine]
            if not mine:
                entries.append(KeyEntry(**{f: item[f] for f in FIELDS}))
        problems += _duplicates(entries)
        if problems:
            raise ValueError(f"{path}: {len(problems)} problem(s) in the keys file:\n"
                             + "\n".join(f"  - {p}" for p in problems))
        return cls(entries)

    def identify(self, token: str | None) -> KeyEntry | None:
        """The entry whose hash is ``token``'s, else None."""
        if not token:
            return None
        given = hash_key(token)
        entry = self._by_hash.get(given)
        # the dict look-up compares hashes of random keys, which tells a caller nothing; the
        # constant-time compare keeps the final check one a timing cannot read, whatever the dict does
        return entry if entry is not None and hmac.compare_digest(entry.hash, given) else None


class TokenBucket:
    """``burst`` requests at once, then ``rate_per_s`` a second: the bucket refills continuously.

    ``clock`` is injected so that a test drives time; the lock makes ``take`` safe from threads."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if not rate_per_s > 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate_per_s > 0 and burst >= 1, not {rate_per_s}, {burst}")
        self.rate_per_s, self.burst, self.clock = float(rate_per_s), int(burst), clock
        self.tokens, self.last = float(burst), clock()
        self._lock = threading.Lock()

    def take(self) -> tuple[bool, float]:
        """(allowed, seconds until one token is back: 0.0 when allowed)."""
        with self._lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate_per_s)
            self.last = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True, 0.0
            return False, (1 - self.tokens) / self.rate_per_s


OUTCOMES = ("allowed", "limited", "forbidden")
"""What became of a request that presented a known key: served, 429 over its rate, 404 for a model
it may not use. ``requests`` is their sum."""


class Usage:
    """Counts per key name (thread-safe): what a customer sent, and what became of it.

    ``by_model`` counts the allowed requests that named a model in ``x-tryon-model``; an allowed
    request that named none (the service's default model) is in ``allowed`` only."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, dict] = {}

    def record(self, name: str, outcome: str, model: str | None = None) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        with self._lock:
            c = self._counts.setdefault(name, {"requests": 0, **dict.fromkeys(OUTCOMES, 0), "by_model": {}})
            c["requests"] += 1
            c[outcome] += 1
            if outcome == "allowed" and model is not None:
                c["by_model"][model] = c["by_model"].get(model, 0) + 1

    def snapshot(self) -> dict[str, dict]:
        """A copy: ``{name: {requests, allowed, limited, forbidden, by_model: {model: n}}}``."""
        with self._lock:
            return {n: {**c, "by_model": dict(c["by_model"])} for n, c in self._counts.items()}


def _error(status: int, field: str | None, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    """The body shape of ``serve.app.error`` (``{"error", "field"}``), without importing the app."""
    return JSONResponse({"error": message, "field": field, **extra}, status_code=status, headers=headers)


def route_path(scope) -> str:
    """The request's path as the app's routes see it: mounted under a route prefix, /prefix/healthz
    is /healthz (the key middlewares here and in serve/app.py open paths by this)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


class KeyQuota:
    """Pure ASGI: identify the key, hold it to its rate, then to its models; put who it is in
    ``scope["state"]["api_key"]`` (``{"name", "models"}``, ``["*"]`` for all) for the routes.

    Paths in ``open_paths`` (exact) or under ``open_prefixes`` pass without a key. The rate is
    checked before the model, so that every request a key sends costs a token: a client cannot
    flood 404s for free."""

    def __init__(self, app, ring: KeyRing, usage: Usage | None = None, open_paths: Iterable[str] = (),
                 open_prefixes: Iterable[str] = (), clock: Callable[[], float] = time.monotonic):
        self.app, self.ring = app, ring
        self.usage = usage if usage is not None else Usage()
        self.open_paths, self.open_prefixes = frozenset(open_paths), tuple(open_prefixes)
        self.buckets = {e.name: TokenBucket(e.rate_per_s, e.burst, clock) for e in ring.entries}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        if path in self.open_paths or path.startswith(self.open_prefixes):
            return await self.app(scope, receive, send)
        auth, models = b"", []
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v
            elif k == MODEL_HEADER:  # every copy: a route may read another than the one checked
                models.append(v.decode("latin-1"))
        scheme, _, token = auth.partition(b" ")
        entry = self.ring.identify(token.strip().decode("latin-1")) if scheme.lower() == b"bearer" else None
        if entry is None:
            resp = _error(401, "authorization", "missing or unknown API key: send 'Authorization: Bearer <key>'",
                          headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        allowed, wait_s = self.buckets[entry.name].take()
        if not allowed:
            self.usage.record(entry.name, "limited")
            retry = max(1, math.ceil(round(wait_s, 6)))  # whole seconds (RFC 9110), never 0: a 0 invites a spin
            resp = _error(429, "authorization", f"this key is over its rate of {entry.rate_per_s:g} requests/s "
                          f"(burst {entry.burst}): retry after {retry} s", headers={"Retry-After": str(retry)},
                          rate_per_s=entry.rate_per_s, burst=entry.burst, retry_after_s=retry)
            return await resp(scope, receive, send)
        if not all(entry.allows(m) for m in models):
            self.usage.record(entry.name, "forbidden")
            # the same answer for a model that does not exist and one another key may use
            resp = _error(404, "x-tryon-model", "unknown model for this key: it may use "
                          + ", ".join(entry.models), models=list(entry.models))
            return await resp(scope, receive, send)
        self.usage.record(entry.name, "allowed", models[0] if models else None)
        scope.setdefault("state", {})["api_key"] = {"name": entry.name, "models": list(entry.models)}
        return await self.app(scope, receive, send)


# --------------------------------------------------------------------------------------------
# The operator's command line: add, list, revoke.


def read_entries(path: Path) -> list[KeyEntry]:
    """The file's entries, checked; none when it does not exist yet (the first ``add``)."""
    return list(KeyRing.load(path).entries) if path.exists() else []


def write_entries(path: Path, entries: Iterable[KeyEntry]) -> None:
    """Write atomically (temp file in the same folder, then ``os.replace``): a server that loads
    the file meanwhile reads the old one or the new one, never half of one."""
    text = HEADER + yaml.safe_dump({"keys": [e.to_dict() for e in entries]}, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _add(args) -> int:
    entries = read_entries(args.file)
    if any(e.name == args.name for e in entries):
        raise SystemExit(f"error: {args.file} already has a key named {args.name!r}: pick another name, "
                         f"or revoke it first (python -m serve.keys revoke --file {args.file} --name {args.name})")
    key = new_key()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    models = [ALL if m == "all" else m for m in models]  # "all" on a command line means every model, as '*'
    try:
        entry = KeyEntry(args.name, hash_key(key), tuple(models), args.rate, args.burst)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    write_entries(args.file, [*entries, entry])
    print(key)
    print(f"The key of {args.name!r} is shown once and is not stored ({args.file} holds only its sha256): "
          f"give it to the customer now; a lost key is revoked and added again.", file=sys.stderr)
    return 0


def _list(args) -> int:
    for e in read_entries(args.file):
        print(f"{e.name}\tmodels={','.join(e.models)}\trate_per_s={e.rate_per_s:g}\tburst={e.burst}")
    return 0


def _revoke(args) -> int:
    entries = read_entries(args.file)
    kept = [e for e in entries if e.name != args.name]
    if len(kept) == len(entries):
        names = ", ".join(e.name for e in entries) or "none"
        raise SystemExit(f"error: no key named {args.name!r} in {args.file} (its keys: {names})")
    write_entries(args.file, kept)
    print(f"revoked {args.name!r}: a server refuses it once it loads {args.file} again", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve.keys", description=__doc__.split("\n\n")[0] + " The file stores sha256 "
        "of each key, never the key; 'add' prints the new key once.",
        epilog="example: python -m serve.keys add --file keys.yaml --name shop-1 --models tiny-a,tiny-b "
               "--rate 2 --burst 4")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="create a key for a customer and print it once")
    add.add_argument("--name", required=True, help="the customer's label, unique in the file")
    add.add_argument("--models", required=True, help=f"comma-separated model ids it may use, or '{ALL}' (or 'all') for all")
    add.add_argument("--rate", type=float, required=True, help="sustained requests per second (> 0)")
    add.add_argument("--burst", type=int, required=True, help="requests at once after a pause (>= 1)")
    add.set_defaults(run=_add)
    sub.add_parser("list", help="names, models and rates (never hashes)").set_defaults(run=_list)
    revoke = sub.add_parser("revoke", help="remove a customer's key")
    revoke.add_argument("--name", required=True, help="the name given at 'add'")
    revoke.set_defaults(run=_revoke)
    for p in (add, sub.choices["list"], revoke):
        p.add_argument("--file", type=Path, required=True, help="the keys file (YAML); 'add' creates it")
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
