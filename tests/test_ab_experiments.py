"""A/B experiments (issue 28, item 2): config, sticky assignment, the durable event log, the
statistics and the report, checked on a simulated population whose preference is known.

The population: 400 users each see one answer of arm A and one of arm B (the same photo) in a
random order and prefer B with probability 0.6; latencies come from a seeded generator. The
summary must recover that preference (an interval that holds 0.6 and excludes 0.5, a verdict
naming B), whether read in this process, after a restart, or by ``python -m serve.ab_report``.
Planted faults (failed requests with huge latencies, another experiment's events, unknown ids,
bad config sections) check that each rule can fail. No Ray, no model: seconds.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from serve.experiments import (EventLog, Experiment, assign, parse_experiments, samples_needed, summary,
                               wilson_interval)

ROOT = Path(__file__).resolve().parents[1]
A, B = "lora-current", "lora-candidate"  # B sorts first: the verdict must not lean on the pair's order
EXP = "candidate-vs-current"
PAIRS, P_B = 400, 0.6


def simulate(path: Path, seed: int = 28) -> dict:
    """Write the population's events to ``path``; return what was drawn (the truth to recover)."""
    rng = np.random.default_rng(seed)
    latencies: dict[str, list[float]] = {A: [], B: []}
    b_wins = 0
    with EventLog(path) as log:
        for i in range(PAIRS):
            user, ra, rb = f"user-{i}", f"req-{i}-a", f"req-{i}-b"
            for rid, model, median in ((ra, A, 2.0), (rb, B, 3.0)):
                latencies[model].append(float(rng.lognormal(math.log(median), 0.3)))
                log.record_request(rid, model, EXP, user, latency_s=latencies[model][-1], ts=i)
            b_won = rng.random() < P_B
            b_wins += b_won
            shown = (ra, rb) if rng.random() < 0.5 else (rb, ra)  # left/right at random
            log.record_choice(*shown, preferred_request_id=rb if b_won else ra, user_id=user, ts=i)
        # planted: failures with latencies that would move any percentile they leaked into
        for k in range(8):
            log.record_request(f"fail-{k}", A, EXP, f"user-{k}", status=503, latency_s=100.0, error="overloaded")
        for k in range(4):
            log.record_request(f"bad-{k}", B, EXP, f"user-{k}", status=422, latency_s=100.0, error="mask size")
        for rid, stars in (("req-0-a", 3), ("req-1-a", 4), ("req-0-b", 5), ("req-1-b", 5), ("req-2-b", 4)):
            log.record_rating(rid, stars)
        # planted: another experiment on the same models, where A always wins
        for k in range(30):
            log.record_request(f"other-{k}-a", A, "other", f"u{k}", latency_s=50.0)
            log.record_request(f"other-{k}-b", B, "other", f"u{k}", latency_s=50.0)
            log.record_choice(f"other-{k}-a", f"other-{k}-b", f"other-{k}-a")
            log.record_rating(f"other-{k}-b", 1)
        for k in range(3):  # planted: choices across the two experiments belong to neither
            log.record_choice(f"req-{k}-b", f"other-{k}-a", f"other-{k}-a")
    return {"latencies": latencies, "b_wins": b_wins}


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("ab") / "not" / "yet" / "events.sqlite"  # the folder is created
    return path, simulate(path)


def test_summary_recovers_the_known_preference(population):
    path, truth = population
    with EventLog(path) as log:
        s = summary(log, EXP)
    assert s["experiment"] == EXP and s["same_model_choices"] == 0
    [pair] = s["pairs"]
    assert pair["models"] == sorted([A, B])
    assert pair["comparisons"] == PAIRS
    assert pair["wins"] == {B: truth["b_wins"], A: PAIRS - truth["b_wins"]}
    assert pair["rate"][B] == truth["b_wins"] / PAIRS
    lo, hi = pair["interval"][B]
    assert lo <= P_B <= hi, (lo, hi)
    assert lo > 0.5, "400 comparisons at 0.6 must separate B from a coin flip"
    assert pair["interval"][A] == pytest.approx([1 - hi, 1 - lo])
    assert pair["verdict"] == f"winner: {B}"
    assert pair["samples_needed"] == samples_needed(truth["b_wins"] / PAIRS) <= PAIRS

    arm_a, arm_b = s["arms"][A], s["arms"][B]
    assert (arm_a["requests"], arm_b["requests"]) == (PAIRS + 8, PAIRS + 4)
    assert arm_a["error_rate"] == 8 / (PAIRS + 8) and arm_a["client_error_rate"] == 0
    assert arm_b["error_rate"] == 0 and arm_b["client_error_rate"] == 4 / (PAIRS + 4)
    for model, arm in ((A, arm_a), (B, arm_b)):  # the failures' 100 s and the other experiment's 50 s left out
        assert arm["p50_latency_s"] == pytest.approx(np.percentile(truth["latencies"][model], 50))
        assert arm["p95_latency_s"] == pytest.approx(np.percentile(truth["latencies"][model], 95))
        assert arm["p95_latency_s"] < 20
    assert arm_a["p50_latency_s"] < arm_b["p50_latency_s"]  # drawn around 2 s and 3 s
    assert (arm_a["mean_rating"], arm_a["ratings"]) == (3.5, 2)
    assert (arm_b["mean_rating"], arm_b["ratings"]) == (pytest.approx(14 / 3), 3)


def test_without_an_experiment_every_event_counts(population):
    path, truth = population
    with EventLog(path) as log:
        s = summary(log)
        other = summary(log, "other")
    assert s["pairs"][0]["comparisons"] == PAIRS + 30 + 3
    assert s["pairs"][0]["wins"][A] == PAIRS - truth["b_wins"] + 30 + 3
    assert s["arms"][B]["ratings"] == 3 + 30
    assert other["pairs"][0]["verdict"] == f"winner: {A}"
    assert other["pairs"][0]["comparisons"] == 30
    assert other["arms"][A]["p50_latency_s"] == 50.0


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.ab_report", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_the_report_says_the_same_in_its_own_process(population):
    path, _ = population
    with EventLog(path) as log:
        expected = summary(log, EXP)
    r = _report("--events", str(path), "--experiment", EXP, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(json.dumps(expected))
    assert json.loads(r.stdout)["pairs"][0]["verdict"] == f"winner: {B}"

    r = _report("--events", str(path), "--experiment", EXP)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"experiment {EXP}"
    row_a = next(line.split() for line in lines if line.startswith(A))
    assert row_a[1:3] == [str(PAIRS + 8), f"{expected['arms'][A]['p50_latency_s']:.3f}"]
    assert row_a[4] == f"{8 / (PAIRS + 8):.1%}"
    pair_row = next(line for line in lines if line.startswith(f"{B} vs {A}"))
    assert f"winner: {B}" in pair_row and f"{B} {expected['pairs'][0]['rate'][B]:.3f}" in pair_row


def test_the_report_explains_its_columns_and_refuses_a_missing_file(tmp_path):
    r = _report("--help")
    assert r.returncode == 0
    for column in ("requests", "p50 s, p95 s", "5xx", "4xx", "rating", "n rated", "pair", "wins", "leader rate",
                   "95% CI", "verdict", "needed", "--events", "--experiment", "--json"):
        assert column in r.stdout, column
    r = _report("--events", str(tmp_path / "nope.sqlite"))
    assert r.returncode == 2
    assert "no event log at" in r.stderr and "nope.sqlite" in r.stderr
    assert not (tmp_path / "nope.sqlite").exists(), "a report must not create the log it did not find"
    (tmp_path / "junk.sqlite").write_text("not a database, just text " * 100)
    r = _report("--events", str(tmp_path / "junk.sqlite"))
    assert r.returncode == 2 and "is not an event log" in r.stderr


def test_events_survive_a_restart(tmp_path):
    path = tmp_path / "events.sqlite"
    simulate(path, seed=7)
    with EventLog(path) as log:
        before = summary(log, EXP)
        with EventLog(path) as reader:  # a report reading while the service writes (WAL)
            assert summary(reader, EXP) == before
        log.record_rating("req-3-a", 2)  # the old requests are known after the restart
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with EventLog(path) as log:
        after = summary(log, EXP)
    assert after["pairs"] == before["pairs"]
    assert after["arms"][A]["ratings"] == before["arms"][A]["ratings"] + 1
    assert after["arms"][A]["mean_rating"] == pytest.approx((3 + 4 + 2) / 3)


def test_threads_share_one_log(tmp_path):
    with EventLog(tmp_path / "events.sqlite") as log:
        def write(t: int) -> None:
            for k in range(100):
                log.record_request(f"t{t}-{k}", A if k % 2 else B, EXP, f"u{k}", latency_s=1.0)

        threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(log.requests(EXP)) == 400
        assert summary(log)["arms"][A]["requests"] == 200


def test_assignment_is_sticky_and_follows_the_weights():
    users = [f"user-{i}" for i in range(20000)]
    [parsed] = parse_experiments([{"name": "hero", "arms": {"lora-b": 0.2, "lora-a": 0.8}}])
    built = Experiment("hero", {"lora-a": 0.8, "lora-b": 0.2})  # another object, another key order
    first = [assign(parsed, u) for u in users[:1000]]
    assert first == [assign(built, u) for u in users[:1000]] == [assign(parsed, u) for u in users[:1000]]

    shares = [assign(built, u) for u in users]
    assert abs(shares.count("lora-a") / len(users) - 0.8) < 0.02
    assert Experiment("hero", {"lora-a": 80, "lora-b": 20}) != built
    assert [assign(Experiment("hero", {"lora-a": 80, "lora-b": 20}), u) for u in users] == shares  # weights are shares

    # independent across experiments: a user's arm in one says nothing about the other
    other = [assign(Experiment("sleeves", {"lora-a": 0.5, "lora-b": 0.5}), u) for u in users]
    both = sum(s == "lora-a" and o == "lora-a" for s, o in zip(shares, other)) / len(users)
    assert abs(both - 0.8 * 0.5) < 0.02


def test_assignment_is_the_same_in_another_process():
    """Replicas are processes with their own hash seed: the arm must come from the id alone."""
    exp = Experiment("hero", {"lora-a": 1.0, "lora-b": 1.0, "lora-c": 1.0})
    code = ("from serve.experiments import Experiment, assign; "
            "e = Experiment('hero', {'lora-c': 1.0, 'lora-b': 1.0, 'lora-a': 1.0}); "
            "print(''.join(assign(e, f'user-{i}')[-1] for i in range(1000)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "".join(assign(exp, f"user-{i}")[-1] for i in range(1000))
    assert set(r.stdout.strip()) == {"a", "b", "c"}


@pytest.mark.parametrize("wins, n, expected", [
    (60, 100, (0.5020, 0.6906)),
    # Newcombe (1998), Stat. Med. 17:857, table I, method 3 (score interval, no continuity correction)
    (81, 263, (0.2553, 0.3662)),
    (15, 148, (0.0624, 0.1605)),
    (0, 20, (0.0, 0.1611)),
    (1, 29, (0.0061, 0.1718)),
    (0, 0, (0.0, 1.0)),
])
def test_wilson_interval_matches_published_values(wins, n, expected):
    assert wilson_interval(wins, n) == pytest.approx(expected, abs=5e-5)


def test_wilson_interval_refuses_impossible_counts():
    for wins, n in ((11, 10), (-1, 10)):
        with pytest.raises(ValueError, match="between 0 and n"):
            wilson_interval(wins, n)


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.45, 0.52, 0.6, 0.75, 1.0])
def test_samples_needed_is_where_the_interval_first_excludes_a_coin_flip(rate):
    def excludes(n: int) -> bool:
        lo, hi = wilson_interval(rate * n, n)
        return lo > 0.5 or hi < 0.5

    needed = samples_needed(rate)
    assert excludes(needed) and not excludes(needed - 1)
    assert next(n for n in range(1, 20000) if excludes(n)) == needed  # the first, by brute force
    assert samples_needed(0.5) is None


def test_a_choice_or_rating_that_cannot_be_attributed_is_refused(tmp_path):
    with EventLog(tmp_path / "events.sqlite") as log:
        log.record_request("r1", A, EXP, "u1", latency_s=1.0)
        log.record_request("r2", B, EXP, "u1", latency_s=1.0)
        with pytest.raises(ValueError, match="unknown request id 'ghost'"):
            log.record_choice("r1", "ghost", "r1")
        with pytest.raises(ValueError, match="unknown request id 'ghost'"):
            log.record_choice("ghost", "r2", "r2")
        with pytest.raises(ValueError, match="neither of the compared"):
            log.record_choice("r1", "r2", "r3")
        with pytest.raises(ValueError, match="two different requests"):
            log.record_choice("r1", "r1", "r1")
        with pytest.raises(ValueError, match="already recorded"):
            log.record_request("r1", B, EXP, "u2", latency_s=1.0)
        for bad in (0, 6, 3.5, True):
            with pytest.raises(ValueError, match="from 1 to 5"):
                log.record_rating("r1", bad)
        with pytest.raises(ValueError, match="unknown request id 'ghost'"):
            log.record_rating("ghost", 3)
        assert log.choices() == [] and log.ratings() == []
        assert [r["model"] for r in log.requests()] == [A, B]  # the refused duplicate changed nothing
        log.record_choice("r1", "r2", "r2")
        assert summary(log)["pairs"][0]["verdict"] == "no difference yet"  # one comparison proves nothing


def test_choices_between_one_models_answers_are_left_out(tmp_path):
    with EventLog(tmp_path / "events.sqlite") as log:
        for rid in ("r1", "r2"):
            log.record_request(rid, A, EXP, "u1", latency_s=1.0)
        log.record_choice("r1", "r2", "r1")
        s = summary(log)
    assert s["pairs"] == [] and s["same_model_choices"] == 1


def test_a_valid_section_parses():
    raw = [{"name": "hero", "arms": {"lora-a": 3, "lora-b": 1}}, {"name": "solo", "arms": {"lora-a": 1}}]
    assert parse_experiments(raw, known_models={"lora-a", "lora-b"}) == [
        Experiment("hero", {"lora-a": 3.0, "lora-b": 1.0}), Experiment("solo", {"lora-a": 1.0})]
    assert parse_experiments(None) == []


def _listed(message: str) -> set[str]:
    return {line[4:] for line in message.splitlines() if line.startswith("  - experiments")}


def test_a_bad_section_lists_every_problem_and_the_fix():
    raw = [
        {"name": "hero", "arms": {}},
        {"name": "hero", "arms": {"lora-a": 0, "lora-b": -1}},
        {"name": "typo", "arms": {"lora-aa": "half", "sdxl-turbo": 1}},
        {"name": "", "arm": {"lora-a": 1}},
        "hero",
    ]
    with pytest.raises(ValueError) as e:
        parse_experiments(raw, known_models={"lora-a", "lora-b"})
    message = str(e.value)
    assert _listed(message) == {
        "experiments[0] ('hero'): arms must map at least one model id to a weight, got {}",
        "experiments[1] ('hero'): duplicate name: each experiment needs its own name (the name seeds the assignment)",
        "experiments[1] ('hero'): weight of 'lora-a' must be a positive number, got 0",
        "experiments[1] ('hero'): weight of 'lora-b' must be a positive number, got -1",
        "experiments[2] ('typo'): weight of 'lora-aa' must be a positive number, got 'half'",
        "experiments[2] ('typo'): unknown model id 'lora-aa' (did you mean 'lora-a'?)",
        "experiments[2] ('typo'): unknown model id 'sdxl-turbo' (served: lora-a, lora-b)",
        "experiments[3]: name must be a non-empty string, got ''",
        "experiments[3]: unknown key 'arm' (did you mean arms?)",
        "experiments[3]: arms must map at least one model id to a weight, got None",
        "experiments[4]: must be a mapping with name and arms, got str",
    }
    assert message.startswith("11 problem(s) in the serve config's experiments section")
    assert "Write it as:\nexperiments:\n  - name: " in message
    # without known models an id is not checked; the weights still are
    with pytest.raises(ValueError) as e:
        parse_experiments([{"name": "x", "arms": {"anything": float("nan")}}])
    assert _listed(str(e.value)) == {"experiments[0] ('x'): weight of 'anything' must be a positive number, got nan"}
    with pytest.raises(ValueError, match="must be a list"):
        parse_experiments({"name": "x", "arms": {"a": 1}})
