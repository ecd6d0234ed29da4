"""A/B experiments between the LoRA models one endpoint serves (issue 28, item 2).

Three parts, none of them needs Ray or the model, so that a test drives them directly:

- **Config**: the serve config's ``experiments:`` section, parsed by :func:`parse_experiments`
  into :class:`Experiment` values; every problem of the section is reported at once, with what
  to write instead::

      experiments:
        - name: lora-v2-vs-v1              # a new name restarts the split: users are re-drawn
          arms: {lora-v1: 0.8, lora-v2: 0.2}   # model id -> weight (any positive numbers)

- **Assignment**: :func:`assign` hashes the experiment's name and the user id, so a user sees the
  same arm on every request and every replica with no shared state, and two experiments split
  the same users independently.
- **Evidence**: :class:`EventLog` keeps requests, side-by-side choices and ratings in SQLite (a
  restart or a crash loses nothing that was recorded), and :func:`summary` turns them into
  per-arm latency, errors and ratings, and per-pair win rates with a Wilson interval and a verdict
  that says "winner" only when the interval excludes a coin flip.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import sqlite3
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Z95 = 1.959964
"""The normal quantile of a two-sided 95% interval."""

EXAMPLE = ("experiments:\n"
           "  - name: lora-v2-vs-v1\n"
           "    arms: {lora-v1: 0.8, lora-v2: 0.2}   # model id -> positive weight")
"""What a valid section looks like: quoted in every config error."""


class UnknownRequest(ValueError):
    """A choice or rating names a request id the log never recorded."""


@dataclass(frozen=True)
class Experiment:
    """One experiment: its users split among models in proportion to the weights."""

    name: str
    """Part of the assignment hash: renaming an experiment re-draws every user's arm."""
    arms: dict[str, float]
    """Model id -> weight (positive; normalised by their sum, so 80/20 and 0.8/0.2 are the same)."""


def parse_experiments(raw: list[dict] | None, known_models: set[str] | None = None) -> list[Experiment]:
    """The ``experiments:`` section as :class:`Experiment` values (none when the section is absent).

    Raises ``ValueError`` listing every problem (empty arms, a weight that is not a positive
    number, a model id not in ``known_models`` when given, a duplicate name, a malformed entry)
    and the form to write, so one deploy attempt shows everything to fix."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(_problems([f"experiments must be a list of entries, got {type(raw).__name__}"]))
    problems: list[str] = []
    out: list[Experiment] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where, before = f"experiments[{i}]", len(problems)
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping with name and arms, got {type(entry).__name__}")
            continue
        name = entry.get("name")
        if isinstance(name, str) and name.strip():
            where = f"{where} ({name!r})"
            if name in seen:
                problems.append(f"{where}: duplicate name: each experiment needs its own name "
                                "(the name seeds the assignment)")
            seen.add(name)
        else:
            problems.append(f"{where}: name must be a non-empty string, got {name!r}")
        for key in sorted(set(entry) - {"name", "arms"}, key=str):
            near = difflib.get_close_matches(str(key), ["name", "arms"], n=1)
            problems.append(f"{where}: unknown key {key!r}" + (f" (did you mean {near[0]}?)" if near else
                                                                " (an entry has only name and arms)"))
        arms = entry.get("arms")
        if not isinstance(arms, dict) or not arms:
            problems.append(f"{where}: arms must map at least one model id to a weight, got {arms!r}")
            continue
        for model, weight in arms.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 < weight < math.inf):
                problems.append(f"{where}: weight of {model!r} must be a positive number, got {weight!r}")
            if known_models is not None and model not in known_models:
                near = difflib.get_close_matches(str(model), sorted(known_models), n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"served: {', '.join(sorted(known_models))}"
                problems.append(f"{where}: unknown model id {model!r} ({hint})")
        if len(problems) == before:
            out.append(Experiment(name, {str(m): float(w) for m, w in arms.items()}))
    if problems:
        raise ValueError(_problems(problems))
    return out


def _problems(problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{len(problems)} problem(s) in the serve config's experiments section:\n{lines}\nWrite it as:\n{EXAMPLE}"


def assign(experiment: Experiment, user_id: str) -> str:
    """The model that ``user_id`` gets in ``experiment``: the same on every call and replica.

    sha256 of ``name NUL user_id`` gives 53 uniform bits, a point in [0, 1), which falls into
    one arm's share of the cumulative weights (arms in sorted order, so the config's key order
    does not matter). The name in the hash makes experiments split users independently."""
    digest = hashlib.sha256(f"{experiment.name}\x00{user_id}".encode()).digest()
    point = (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53  # exact in a float: [0, 1)
    models = sorted(experiment.arms)
    target, cumulative = point * sum(experiment.arms.values()), 0.0
    for model in models:
        cumulative += experiment.arms[model]
        if target < cumulative:
            return model
    return models[-1]  # the sum's rounding can leave the last sliver uncovered


# --------------------------------------------------------------------------------------------
# Durable events


_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, ts REAL NOT NULL, model TEXT NOT NULL, experiment TEXT,
    user_id TEXT, status INTEGER NOT NULL, latency_s REAL, error TEXT);
CREATE TABLE IF NOT EXISTS choices (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, request_id TEXT NOT NULL,
    other_request_id TEXT NOT NULL, preferred_request_id TEXT NOT NULL, user_id TEXT);
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, request_id TEXT NOT NULL,
    rating INTEGER NOT NULL);
"""


class EventLog:
    """Requests, side-by-side choices and ratings in one SQLite file.

    WAL mode, so a report can read while the service writes. Every record is its own committed
    transaction, so a crash or restart of the service loses nothing recorded; with
    ``synchronous=NORMAL`` (SQLite's advice for WAL) commits are not fsynced one by one, so only
    a power cut may drop the last moments' events (it never corrupts the file): an fsync per
    event would cost more than the few events an A/B comparison could lose. One connection,
    shared by the service's threads behind a lock: SQLite serialises writers anyway, and a Python
    lock cannot fail with "database is locked" as two connections can."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError:  # not an SQLite file: leave no open handle behind
            self._db.close()
            raise

    def record_request(self, request_id: str, model: str, experiment: str | None = None, user_id: str | None = None,
                       status: int = 200, latency_s: float | None = None, error: str | None = None,
                       ts: float | None = None) -> None:
        """One answered request (``latency_s`` None: not measured, left out of the percentiles).
        Request ids are unique: a second record of one is refused."""
        with self._lock:
            try:
                self._db.execute("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (request_id, _now(ts), model, experiment, user_id, int(status), latency_s, error))
            except sqlite3.IntegrityError:
                raise ValueError(f"request {request_id!r} is already recorded: request ids must be unique") from None

    def has_request(self, request_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM requests WHERE request_id = ?", (request_id,)).fetchone() is not None

    def record_choice(self, request_id: str, other_request_id: str, preferred_request_id: str,
                      user_id: str | None = None, ts: float | None = None) -> None:
        """A side by side: the user saw the answers of two recorded requests (normally two arms on
        the same photo) and preferred one. Unknown ids and a preferred id that is neither of the
        two are refused: a choice that cannot be attributed to an arm is no evidence."""
        if request_id == other_request_id:
            raise ValueError(f"a choice needs two different requests, got {request_id!r} twice")
        if preferred_request_id not in (request_id, other_request_id):
            raise ValueError(f"preferred request {preferred_request_id!r} is neither of the compared "
                             f"{request_id!r} and {other_request_id!r}")
        with self._lock:
            self._require(request_id, other_request_id)
            self._db.execute("INSERT INTO choices (ts, request_id, other_request_id, preferred_request_id, user_id) "
                             "VALUES (?, ?, ?, ?, ?)",
                             (_now(ts), request_id, other_request_id, preferred_request_id, user_id))

    def record_rating(self, request_id: str, rating: int, ts: float | None = None) -> None:
        """A 1..5 star rating of one recorded request's answer."""
        if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
            raise ValueError(f"rating must be an integer from 1 to 5, got {rating!r}")
        with self._lock:
            self._require(request_id)
            self._db.execute("INSERT INTO ratings (ts, request_id, rating) VALUES (?, ?, ?)",
                             (_now(ts), request_id, rating))

    def _require(self, *request_ids: str) -> None:
        for rid in request_ids:
            if self._db.execute("SELECT 1 FROM requests WHERE request_id = ?", (rid,)).fetchone() is None:
                raise UnknownRequest(f"unknown request id {rid!r}: record the request before a choice or rating on it")

    def requests(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Recorded requests, oldest first (only ``experiment``'s when given)."""
        return self._rows("SELECT * FROM requests" + (" WHERE experiment = ?" if experiment else "")
                          + " ORDER BY ts, rowid", (experiment,) if experiment else ())

    def choices(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Recorded choices with the models of both requests and of the preferred one (only those
        whose two requests both belong to ``experiment`` when given)."""
        sql = ("SELECT c.*, a.model AS model, b.model AS other_model, "
               "CASE WHEN c.preferred_request_id = c.request_id THEN a.model ELSE b.model END AS preferred_model "
               "FROM choices c JOIN requests a ON a.request_id = c.request_id "
               "JOIN requests b ON b.request_id = c.other_request_id")
        if experiment:
            return self._rows(sql + " WHERE a.experiment = ? AND b.experiment = ? ORDER BY c.id",
                              (experiment, experiment))
        return self._rows(sql + " ORDER BY c.id", ())

    def ratings(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Recorded ratings with the rated request's model (only ``experiment``'s when given)."""
        sql = "SELECT r.*, q.model AS model FROM ratings r JOIN requests q ON q.request_id = r.request_id"
        if experiment:
            return self._rows(sql + " WHERE q.experiment = ? ORDER BY r.id", (experiment,))
        return self._rows(sql + " ORDER BY r.id", ())

    def _rows(self, sql: str, args: tuple) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _now(ts: float | None) -> float:
    return time.time() if ts is None else float(ts)


# --------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(wins: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a win rate: unlike ``p ± z·se`` it stays inside [0, 1] and is
    honest at small ``n`` and at rates near 0 or 1 (no comparisons: the whole of [0, 1])."""
    if not 0 <= wins <= n:
        raise ValueError(f"wins must be between 0 and n, got {wins} of {n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = wins / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def samples_needed(rate: float, z: float = Z95) -> int | None:
    """How many comparisons the Wilson interval needs, at this observed ``rate``, to exclude 0.5.

    The Wilson interval excludes 0.5 exactly when ``|rate - 0.5| > z / (2 sqrt(n))`` (it is the
    score test's inversion), so the answer is the first integer above ``z² / (4 (rate - 0.5)²)``;
    None at exactly 0.5, which no number of comparisons separates from a coin flip."""
    d = rate - 0.5
    if d == 0:
        return None
    return math.floor(z * z / (4 * d * d)) + 1


def summary(log: EventLog, experiment: str | None = None) -> dict[str, Any]:
    """Per arm (model) and per pair of arms, everything an A/B decision needs; JSON-ready.

    ``arms[model]``: ``requests``; ``p50_latency_s`` / ``p95_latency_s`` over successful (2xx/3xx)
    requests with a latency; ``error_rate`` (status >= 500) and ``client_error_rate`` (4xx) as
    shares of all requests; ``mean_rating`` and ``ratings`` (their count).
    ``pairs``: one per two models compared side by side at least once, models sorted:
    ``comparisons``, ``wins``, ``rate`` and ``interval`` (95% Wilson) per model, ``verdict``
    ("winner: <model>" when the interval excludes 0.5, else "no difference yet") and
    ``samples_needed`` (:func:`samples_needed` at the first model's rate). ``same_model_choices``
    counts choices between two answers of one model: no evidence about arms, left out."""
    requests = log.requests(experiment)
    ratings: dict[str, list[int]] = defaultdict(list)
    for r in log.ratings(experiment):
        ratings[r["model"]].append(r["rating"])
    arms: dict[str, dict[str, Any]] = {}
    for model in sorted({r["model"] for r in requests}):
        rows = [r for r in requests if r["model"] == model]
        ok = [r["latency_s"] for r in rows if r["status"] < 400 and r["latency_s"] is not None]
        stars = ratings.get(model, [])
        arms[model] = {
            "requests": len(rows),
            "p50_latency_s": float(np.percentile(ok, 50)) if ok else None,
            "p95_latency_s": float(np.percentile(ok, 95)) if ok else None,
            "error_rate": sum(r["status"] >= 500 for r in rows) / len(rows),
            "client_error_rate": sum(400 <= r["status"] < 500 for r in rows) / len(rows),
            "mean_rating": sum(stars) / len(stars) if stars else None,
            "ratings": len(stars),
        }
    wins: dict[tuple[str, str], dict[str, int]] = {}
    same = 0
    for c in log.choices(experiment):
        if c["model"] == c["other_model"]:
            same += 1
            continue
        pair = tuple(sorted((c["model"], c["other_model"])))
        counts = wins.setdefault(pair, {pair[0]: 0, pair[1]: 0})
        counts[c["preferred_model"]] += 1
    pairs = [_pair(a, b, counts[a], counts[b]) for (a, b), counts in sorted(wins.items())]
    return {"experiment": experiment, "arms": arms, "pairs": pairs, "same_model_choices": same}


def _pair(a: str, b: str, wins_a: int, wins_b: int) -> dict[str, Any]:
    n = wins_a + wins_b
    interval = {m: list(wilson_interval(w, n)) for m, w in ((a, wins_a), (b, wins_b))}
    winner = next((m for m in (a, b) if interval[m][0] > 0.5), None)
    return {
        "models": [a, b],
        "comparisons": n,
        "wins": {a: wins_a, b: wins_b},
        "rate": {a: wins_a / n, b: wins_b / n},
        "interval": interval,
        "verdict": f"winner: {winner}" if winner else "no difference yet",
        "samples_needed": samples_needed(wins_a / n),
    }

