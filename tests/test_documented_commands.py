"""Every shell command the docs show a user is run here at tiny size, or listed in
``docs/commands.md`` with the reason it cannot run on this machine (issue 14), so that a doc that
drifts from the code fails a test.

Where commands come from (:func:`documented_commands`): README.md and docs/*.md (fenced code
blocks, and the first column of any table headed ``command``, e.g. the README's command table)
and the header comments of configs/*.yaml and serve/config.yaml (the indented ``#   python ...``
lines). Line continuations (``\\``), trailing ``# comments``, ``&&`` / ``;`` chains and a
``for v in ...; do ...; done`` loop (run once, with the first value) are unfolded.
``docs/commands.md`` is the list, not a source.

Default tier (seconds): every command is classified (run by a :data:`WAYS` entry, or listed);
the list names only commands some doc still shows; no command holds a path of this machine; the
``--help`` of every documented entry point names every flag the docs pass to it; every documented
``--config`` / ``--set`` combination loads (with the overrides a bench adds itself, so a bench
that cannot start fails here); and the fast commands run.

``slow``: the jobs, sweeps, evaluations and benchmarks, each with the smallest overrides that keep
its code path (:data:`WAYS`), in one sandbox per session so that a command finds what an earlier
one wrote (``evaluate --lora outputs/tiny-sweep/release`` after ``tune.py``), as a user would.

Every run happens in the sandbox: a temporary folder that mirrors the repository's top level with
symbolic links (relative paths resolve as from the repository root, where the docs run them) and
has its own ``outputs/``; ``/tmp/`` in a command becomes the sandbox's ``tmp/``. Nothing is
written into the checkout. A run asserts on what it leaves (files, printed lines), not only on
its exit code.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "docs" / "commands.md"
MARKDOWN = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").glob("*.md")) if p != LIST)]
CONFIGS = [*sorted((ROOT / "configs").glob("*.yaml")), ROOT / "serve" / "config.yaml"]

pytestmark = pytest.mark.docs

# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

SHELL_FENCES = {"bash", "sh", "shell", "console", "zsh"}
"""Fences whose every line is a command (unlabelled fences also hold output and diagrams)."""
PROGRAMS = {"python", "python3", "pytest", "ray", "serve", "curl", "file", "kubectl", "helm", "pip",
            "aws", "make", "export", "for", "tensorboard", "bash", "git", "docker", "uv", "cd"}
"""First words that make a line of an unlabelled fence a command."""


@dataclass(frozen=True)
class Documented:
    text: str
    """The command as one line: continuations joined, comment removed, whitespace collapsed."""
    where: tuple[str, ...]
    """``file:line`` of every place that shows it."""

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` that starts a word outside quotes)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _split_chain(text: str) -> list[str]:
    """``a && b; c || d`` -> ``[a, b, c, d]`` (outside quotes)."""
    parts, cur, quote, i = [], "", "", 0
    while i < len(text):
        ch = text[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif text.startswith(("&&", "||"), i) or ch == ";":
            parts.append(cur)
            cur, i = "", i + (1 if ch == ";" else 2)
            continue
        cur += ch
        i += 1
    return [p.strip() for p in parts + [cur] if p.strip()]


_FOR = re.compile(r"for\s+(\w+)\s+in\s+([^;]+);\s*do\s+(.*?);?\s*done\b")


def _unfold(text: str) -> list[str]:
    """One joined shell line -> the commands it runs (a ``for`` loop: its body, first value)."""
    loop = _FOR.match(text.strip())
    if loop:
        var, values, body = loop.groups()
        body = re.sub(rf"\$(\{{{var}\}}|{var}\b)", values.split()[0], body)
        rest = re.sub(r"^\s*(&&|\|\||;)", "", text.strip()[loop.end():])
        return _unfold(body) + (_unfold(rest) if rest.strip() else [])
    return [" ".join(c.split()) for c in _split_chain(text)]


def _program(text: str) -> str:
    """The first word that is not an environment assignment (``HF_TOKEN=x python ...``)."""
    for word in text.split():
        if not re.fullmatch(r"[A-Za-z_]\w*=\S*", word):
            return word
    return ""


def _shell_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join ``\\`` continuations; ``(line number of the first line, joined text)``."""
    out, cur, start = [], "", 0
    for n, line in lines:
        if not cur:
            start = n
        stripped = line.strip()
        if stripped.endswith("\\"):
            cur += stripped[:-1] + " "
            continue
        out.append((start, cur + stripped))
        cur = ""
    if cur:
        out.append((start, cur))
    return out


def _fence_commands(lang: str, block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    prompted = any(line.lstrip().startswith("$ ") for _, line in block)
    found = []
    for n, text in _shell_lines(block):
        text = text.strip()
        if prompted:  # a transcript: only the prompted lines are commands, the rest is output
            if not text.startswith("$ "):
                continue
            text = text[2:]
        text = _strip_comment(text)
        if not text:
            continue
        if lang in SHELL_FENCES or prompted or _program(text) in PROGRAMS:
            found.append((n, text))
    return found


def _table_cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def markdown_commands(path: Path) -> list[tuple[int, str]]:
    """``(line, shell text)`` of the fenced blocks and of ``command`` tables in ``path``."""
    found: list[tuple[int, str]] = []
    lines = path.read_text().splitlines()
    lang, block, in_table = None, [], False
    for n, line in enumerate(lines, 1):
        fence = re.match(r"\s*```(\S*)\s*$", line)
        if fence and lang is None:
            lang, block = fence.group(1).lower(), []
            continue
        if fence and lang is not None:
            found += _fence_commands(lang, block)
            lang = None
            continue
        if lang is not None:
            block.append((n, line))
            continue
        if line.lstrip().startswith("|"):
            cells = _table_cells(line)
            if cells and cells[0].lower() == "command":
                in_table = True
            elif in_table and not re.fullmatch(r"[-:| ]+", line.strip()):
                found += [(n, c) for c in re.findall(r"`([^`]+)`", cells[0])]
        else:
            in_table = False
    return found


def config_header_commands(path: Path) -> list[tuple[int, str]]:
    """``(line, shell text)`` of the indented lines (``#   python ...``) of the comment header."""
    block = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.startswith("#"):
            break
        if re.match(r"#\s{3,}\S", line):
            block.append((n, line[1:]))
    return [(n, _strip_comment(t)) for n, t in _shell_lines(block) if _strip_comment(t)]


def documented_commands() -> list[Documented]:
    """Every command the docs show, once, with every place that shows it."""
    seen: dict[str, list[str]] = {}
    sources = [(p, markdown_commands(p)) for p in MARKDOWN] + [(p, config_header_commands(p)) for p in CONFIGS]
    for path, found in sources:
        for n, text in found:
            for cmd in _unfold(text):
                seen.setdefault(cmd, []).append(f"{path.relative_to(ROOT)}:{n}")
    return [Documented(t, tuple(w)) for t, w in seen.items()]


def not_run_here() -> dict[str, str]:
    """docs/commands.md's table: command -> why this machine cannot run it."""
    listed: dict[str, str] = {}
    in_table = False
    for line in (LIST.read_text() if LIST.is_file() else "").splitlines():
        if not line.lstrip().startswith("|"):
            in_table = False
            continue
        cells = _table_cells(line)
        if cells[0].lower() == "command":
            in_table = True
        elif in_table and not re.fullmatch(r"[-:| ]+", line.strip()):
            for cmd in re.findall(r"`([^`]+)`", cells[0]):
                listed[" ".join(cmd.split())] = cells[1] if len(cells) > 1 else ""
    return listed


# --------------------------------------------------------------------------------------------
# How each runnable command is run
# --------------------------------------------------------------------------------------------


def _sets(*overrides: str) -> tuple[str, ...]:
    return tuple(a for o in overrides for a in ("--set", o))


TRAIN_TINY = ("train.max_steps=4", "train.val_every=2", "train.checkpoint_every=4", "train.val_batches=1",
              "infer.steps=1")
"""A training job at its smallest: 4 steps, validation at 2 and 4 (still dividing the tiny preset's
tune.grace_period), one checkpoint at the end, so a run still exports its LoRA, curve and sample
grids (one denoising step each; the evaluations then score with one step too)."""


@dataclass(frozen=True)
class Way:
    """How the tier runs the documented commands that ``match`` (a regex on the whole text)."""
    name: str
    match: str
    slow: bool = False
    swap: tuple[tuple[str, str], ...] = ()
    """(regex, replacement) on the text: a documented size that is too big for a test."""
    add: tuple[str, ...] = ()
    """Arguments appended: the smallest sizes on the same code path."""
    needs: tuple[str, ...] = ()
    """Ways whose output this command reads; they run first, in the same sandbox."""
    makes: tuple[str, ...] = ()
    """Globs under the sandbox that must match a file the run wrote."""
    says: tuple[str, ...] = ()
    """Regexes its output (stdout + stderr) must match."""


WAYS = [
    # the default tier: seconds each
    Way("validate", r"python cluster/validate\.py", says=(r"OK\s+cluster/aws-l40s\.yaml",)),
    Way("cluster-tests", r"pytest tests/test_cluster_configs\.py", says=(r"\d+ passed",)),
    Way("planner", r"python -m catvton\.train\.planner .*", says=(r"peak .* GB .*: (fits|does not fit)",)),
    Way("show-config", r"python easy_train\.py config( .*)?", says=(r"# fields", r"# train\.lr ")),
    Way("gpu-check", r"bash bench/gpu_check\.sh", says=(r"not run: no GPU available",),
        makes=("outputs/gpu_check/gpu_check.txt",)),
    Way("examples", r"python -m serve\.examples --out /tmp/tryon",
        makes=("tmp/tryon/person.png", "tmp/tryon/garment.png", "tmp/tryon/mask.png")),
    Way("examples-outfit", r"python -m serve\.examples --outfit --out /tmp/outfit",
        makes=tuple(f"tmp/outfit/{n}.png" for n in ("person", "upper_mask", "lower_mask", "top", "bottom"))),
    # slow: jobs, sweeps, evaluations and benchmarks at tiny size
    Way("setup", r"python easy_train\.py setup", slow=True,
        makes=("outputs/setup/dataset_report.json", "outputs/setup/samples_lower.png"), says=(r"ready: True",)),
    Way("synthetic", r"python -m catvton\.offline\.synthetic --out DIR --pids \d+", slow=True,
        swap=((r"--pids \d+", "--pids 120"),), makes=("DIR/data/train-*.parquet",)),
    Way("setup-folder", r"python easy_train\.py setup --data /path/to/folder", slow=True,
        swap=((r"/path/to/folder", "DIR"),), needs=("synthetic",),
        add=_sets("data.min_pairs_per_group=1", "data.val_fraction=0.25"),
        makes=("outputs/setup/dataset_report.json",), says=(r"ready: True",)),
    Way("train", r"python ray_jobs/train\.py( --set \S+)*", slow=True, add=_sets(*TRAIN_TINY),
        makes=("outputs/*/lora/pytorch_lora_weights.safetensors", "outputs/*/loss_curve.png",
               "outputs/*/samples_step*.png"), says=(r"steps: 4\b",)),
    Way("preprocess", r"python ray_jobs/preprocess\.py", slow=True, says=(r"latents-\w+",)),
    Way("proof-run", r"python easy_train\.py test", slow=True, add=("--steps", "12", *_sets("train.warmup_steps=1")),
        makes=("outputs/*-test/test_report.json",), says=(r"problems found: none",)),
    Way("full-dry-run", r"python easy_train\.py full --epochs \d+ --push-to-hub --hub-model-id \S+", slow=True,
        swap=((r"--epochs \d+", "--epochs 1"),), add=("--hub-dry-run", "--eval-pairs", "2"),
        makes=("outputs/*/hub-upload/README.md", "outputs/*/lora/eval/report.json"), says=(r"nothing uploaded",)),
    Way("tune", r"python ray_jobs/tune\.py", slow=True,
        add=_sets(*TRAIN_TINY, "tune.grace_period=2", "tune.lr_grid=[4.0e-3]", "tune.ranks=[8]"),
        makes=("outputs/tiny-sweep/release/pytorch_lora_weights.safetensors", "outputs/tiny-sweep/release/metrics.json",
               "outputs/tiny-sweep/release/trials.csv", "outputs/tiny-sweep/release/sweep.png")),
    Way("evaluate", r"python ray_jobs/evaluate\.py --lora outputs/tiny-sweep/release", slow=True, needs=("tune",),
        add=("--max-per-group", "2"), makes=("outputs/tiny-sweep/release/eval/report.json",
                                             "outputs/tiny-sweep/release/eval/grid_lower.png")),
    Way("catalogue-example", r"python ray_jobs/tryon_batch\.py --make-example /tmp/catalogue",
        makes=("tmp/catalogue/outfits.csv", "tmp/catalogue/people/*.png", "tmp/catalogue/garments/upper/*.png")),
    Way("catalogue", r"python ray_jobs/tryon_batch\.py --people /tmp/catalogue/people --garments /tmp/catalogue/garments",
        slow=True, needs=("catalogue-example",), add=("--steps", "1"),
        makes=("outputs/catalogue/summary.json", "outputs/catalogue/sheets/*.png"), says=(r"images/s",)),
    Way("evaluate-outfits", r"python ray_jobs/evaluate\.py --lora outputs/\S+/lora --in-process --max-per-group \d+ --outfits \d+",
        slow=True, needs=("train",), swap=((r"--lora outputs/\S+/lora", "--lora outputs/tiny-lora/lora"),
                                           (r"--max-per-group \d+", "--max-per-group 1"), (r"--outfits \d+", "--outfits 2")),
        makes=("outputs/tiny-lora/lora/eval/report.json", "outputs/tiny-lora/lora/eval/grid_outfits.png"),
        says=(r"outfits \(\d+ triples",)),
    Way("publish-dry-run", r"python ray_jobs/publish\.py --lora outputs/tiny-sweep/release --hub-model-id \S+ --dry-run",
        slow=True, needs=("tune",), makes=("outputs/tiny-sweep/release/hub-upload/README.md",),
        says=(r"nothing uploaded",)),
    Way("tiny-base", r"python -m catvton\.offline\.tiny_base --out DIR", slow=True,
        swap=((r"--out DIR", "--out tiny-base"),), add=("--vae-steps", "2", "--synthetic-pids", "8"),
        makes=("tiny-base/model_index.json", "tiny-base/transformer/*.safetensors")),
    Way("make-parser", r"python -m catvton\.eval\.automask_iou --make-tiny /tmp/parser", slow=True,
        makes=("tmp/parser/config.json",)),
    Way("automask-iou", r"python -m catvton\.eval\.automask_iou --parser /tmp/parser", slow=True,
        needs=("make-parser",), add=("--max-per-group", "2"), says=(r"iou_median",)),
    Way("bench-overhead", r"python bench/train_step_overhead\.py( --steps \d+)?", slow=True,
        swap=((r"--steps \d+", "--steps 12"),), add=("--warmup", "2"), says=(r"ratio\s+\d+\.\d+x",)),
    Way("bench-learning", r"python bench/learning_margins\.py --seeds( \d+)+( --set \S+)*", slow=True,
        swap=((r"--seeds( \d+)+", "--seeds 0"),),
        add=(*_sets(*TRAIN_TINY), "--out", "outputs/learning_margins.json"),
        makes=("outputs/learning_margins.json", "outputs/tiny-lora-seed0/eval/report.json")),
    Way("bench-serve", r"python bench/serve_overhead\.py --lora outputs/tiny-lora/lora( --requests \d+)?", slow=True,
        needs=("train",), swap=((r"--requests \d+", "--requests 2"), (r"--lora outputs/", "--lora {sandbox}/outputs/")),
        add=("--steps", "1"), says=(r"batching",)),
    Way("bench-serve-base", r"python bench/serve_overhead\.py --requests \d+", slow=True,
        swap=((r"--requests \d+", "--requests 2"),), add=("--steps", "1"), says=(r"batching",)),
    Way("bench-serve-models", r"python bench/serve_models\.py( --requests \d+)?( --load \d+)?", slow=True,
        swap=((r"--requests \d+", "--requests 1"), (r"--load \d+", "--load 6")),
        add=("--requests", "1", "--load", "6", "--steps", "1"), says=(r"adapter swap cost", r"5xx: 0")),
    Way("bench-big-photo", r"python bench/big_photo\.py --requests \d+", slow=True,
        swap=((r"--requests \d+", "--requests 1"),), add=("--size", "600x800", "--formats", "default", "--steps", "1"),
        says=(r"load average",)),
    Way("dry-run", r"python -m catvton\.train\.dryrun --config configs/l40s\.yaml( --rows all| --placement-only)?",
        slow=True, add=("--blocks", "1", "1", "--json", "outputs/dryrun.json"), makes=("outputs/dryrun.json",),
        says=(r"placement: every stage ran on meta",)),
    Way("bench-full-size-tiny", r"python bench/full_size_step\.py --tiny .*", slow=True,
        says=(r"try-on none +\d+ steps", r"try-on fused +\d+ steps: .* passes")),
    Way("bench-tryon-speed", r"python bench/tryon_speed\.py --lora outputs/\S+/lora( --plot \S+)?", slow=True,
        needs=("train",), swap=((r"--lora outputs/\S+/lora", "--lora outputs/tiny-lora/lora"),
                                (r"--plot \S+", "--plot outputs/tryon_speed.png")),
        add=("--steps", "2", "--per-group", "1", "--rounds", "2", "--out", "outputs/bench/tryon_speed.json"),
        makes=("outputs/bench/tryon_speed.json",), says=(r"meets \(", r"fused vs LoRA max pixel difference")),
    Way("bench-transfer", r"python bench/transfer_diagnosis\.py --lora outputs/\S+/lora( --every \d+)?( --set \S+)*", slow=True,
        needs=("train",), swap=((r"--lora outputs/\S+/lora", "--lora outputs/tiny-lora/lora"), (r"--every \d+", "")),
        add=("--every", "50", "--groups", "lower"), says=(r"\| lower \| \d+ \| [+-]\d+\.\d\d \|",)),
    Way("bench-encode", r"python bench/encode_throughput\.py", slow=True, add=("--pids", "16"), says=(r"ratio 2 vs 1 actors: \d",)),
    Way("bench-setup-scale", r"python bench/setup_scale\.py( --read-pass)?", slow=True, add=("--rows", "150", "--size", "96"),
        says=(r"rows/s: \d+ whole command", r"driver peak RSS: \d+ MiB", r"rows_valid \d+ of 150")),
]
"""Each runnable kind of documented command. A kind not here and not in docs/commands.md fails
``test_every_documented_command_is_run_or_listed``: classify it."""


def way_of(cmd: str) -> Way | None:
    hits = [w for w in WAYS if re.fullmatch(w.match, cmd)]
    assert len(hits) <= 1, f"{cmd!r} matches several ways: {[w.name for w in hits]}"
    return hits[0] if hits else None


def machine_paths(text: str) -> list[str]:
    """Paths of this checkout or this user found in ``text`` (a doc must not hold them)."""
    mine = [p for p in (str(ROOT), str(Path.home())) if len(p) > 1 and re.search(rf"{re.escape(p)}(?![\w.-])", text)]
    return sorted(set(mine + re.findall(r"(?<![\w.])/(?:home|Users|work)/[\w.-]+", text)))


COMMANDS = documented_commands()
LISTED = not_run_here()


# --------------------------------------------------------------------------------------------
# Default tier: classification and the list
# --------------------------------------------------------------------------------------------


def test_extraction_sees_every_kind_of_source():
    """The parser must keep finding commands where the docs put them (a parser that finds
    nothing would make every other test here pass)."""
    places = {w.split(":")[0] for c in COMMANDS for w in c.where}
    assert {"README.md", "docs/cluster.md", "docs/PERFORMANCE.md", "configs/tiny.yaml", "configs/l40s.yaml"} <= places
    texts = {c.text for c in COMMANDS}
    # a table cell, a `\` continuation from a config header, a `# comment` removed, an `&&` chain split
    assert "python easy_train.py config --config configs/l40s.yaml" in texts
    assert ("ray job submit --working-dir . --runtime-env runtime_env.yaml -- python ray_jobs/train.py "
            "--config configs/l40s.yaml") in texts
    assert "python cluster/validate.py" in texts
    assert {"python -m catvton.eval.automask_iou --make-tiny /tmp/parser",
            "python -m catvton.eval.automask_iou --parser /tmp/parser"} <= texts


def test_the_parser_unfolds_shell_syntax():
    block = [(1, "ray job submit --address http://x -- \\"), (2, "    python a.py --set a.b='c # d'   # why"),
             (3, "for s in 0 1; do python b.py --set x=$s; done && echo ok")]
    found = [c for n, t in _fence_commands("bash", block) for c in _unfold(t)]
    assert found == ["ray job submit --address http://x -- python a.py --set a.b='c # d'",
                     "python b.py --set x=0", "echo ok"]
    transcript = [(1, "$ python c.py --tiny"), (2, "device: cpu"), (3, "batch 1 0.06 s")]
    assert _fence_commands("", transcript) == [(1, "python c.py --tiny")]
    diagram = [(1, "DeepFashion rows: hub parquet"), (2, "easy_train.py setup ──► report"), (3, "python x.py")]
    assert _fence_commands("", diagram) == [(3, "python x.py")]


def test_every_documented_command_is_run_or_listed():
    orphans = [f"{c.text}   ({', '.join(c.where)})" for c in COMMANDS if c.text not in LISTED and way_of(c.text) is None]
    assert not orphans, ("documented commands neither run by this tier (WAYS in tests/test_documented_commands.py) "
                         "nor listed in docs/commands.md with the reason they cannot run here:\n  "
                         + "\n  ".join(orphans))


def test_the_list_names_only_documented_commands_each_with_a_reason():
    assert LISTED, "docs/commands.md has no table of commands"
    texts = {c.text for c in COMMANDS}
    stale = [c for c in LISTED if c not in texts]
    assert not stale, f"docs/commands.md lists commands no doc shows any more (remove them): {stale}"
    assert not [c for c, why in LISTED.items() if len(why.split()) < 3], "each listed command needs its reason"


def test_no_documented_command_names_a_path_of_this_machine():
    assert machine_paths(f"python x.py --set run.output_dir={ROOT}/outputs") and machine_paths("--out /home/ann/x")
    assert not machine_paths("python x.py --set run.output_dir=/mnt/shared/outputs --out outputs/x")
    bad = {c.text: (c.where, machine_paths(c.text)) for c in COMMANDS if machine_paths(c.text)}
    assert not bad, ("documented commands hold paths of one machine (write them relative to the repository "
                     f"root, or drop the --set that needs them): {bad}")


# --------------------------------------------------------------------------------------------
# Default tier: flags and configs of every documented entry point (also those the tier cannot run)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A project entry point as a command names it: ``python X.py [sub]`` or ``python -m mod``."""
    target: tuple[str, ...]
    """``("ray_jobs/train.py",)``, ``("easy_train.py", "setup")``, ``("-m", "catvton.train.planner")``."""
    args: tuple[str, ...]


def python_entry(argv: list[str]) -> Entry | None:
    """The project entry point ``argv`` runs, also inside ``ray job submit ... -- python ...``."""
    for i, word in enumerate(argv):
        if Path(word).name in ("python", "python3") and i + 1 < len(argv):
            rest = argv[i + 1:]
            if rest[0] == "-m" and len(rest) > 1:
                target, args = ("-m", rest[1]), rest[2:]
            elif rest[0].endswith(".py"):
                target, args = (rest[0],), rest[1:]
            else:
                return None
            if target == ("easy_train.py",) and args and not args[0].startswith("-"):
                target, args = (*target, args[0]), args[1:]
            return Entry(target, tuple(args))
    return None


ENTRIES = sorted({e.target for c in COMMANDS if (e := python_entry(c.argv))})


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TRYON_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["COLUMNS"] = "200"  # help text unwrapped
    return env


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """``--help`` of every documented entry point, each in a fresh interpreter (two at a time)."""
    def run(target):
        return subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, env=_env(), capture_output=True,
                              text=True, timeout=300)
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(ENTRIES, pool.map(run, ENTRIES)))


def defined_flags(help_text: str) -> set[str]:
    """The long options a ``--help`` (argparse or click) defines: those in the invocation column of
    its option lines, not every ``--word`` of its prose (the docstrings quote example commands)."""
    flags = set()
    for line in help_text.splitlines():
        if re.match(r"\s{1,6}-", line):
            flags |= set(re.findall(r"--[\w-]+", re.split(r"\s{2,}", line.strip())[0]))
    return flags


def test_defined_flags_reads_argparse_and_click_help():
    argparse_help = ("usage: x.py [-h] --lora LORA\n\nRun it: python x.py --gone\n\noptions:\n"
                     "  -h, --help            show this help\n  --hub-model-id HUB_MODEL_ID\n"
                     "                        <user>/<name>, not --private\n  --dry-run             write only\n")
    click_help = "Options:\n  --epochs <int>  Passes.  [default: 10]\n  -s, --set <list[str]>  Dotted: --set a=1\n"
    assert defined_flags(argparse_help) == {"--help", "--hub-model-id", "--dry-run"}
    assert defined_flags(click_help) == {"--epochs", "--set"}


@pytest.mark.parametrize("target", ENTRIES, ids=" ".join)
def test_help_names_every_flag_the_docs_pass(target, helps):
    done = helps[target]
    assert done.returncode == 0, f"python {' '.join(target)} --help failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    known = defined_flags(done.stdout)
    unknown = {}
    for c in COMMANDS:
        entry = python_entry(c.argv)
        if entry is not None and entry.target == target:
            missing = sorted({a.split("=", 1)[0] for a in entry.args if a.startswith("--")} - known)
            if missing:
                unknown[c.text] = (missing, c.where)
    assert not unknown, f"flags the docs pass that `python {' '.join(target)} --help` does not define: {unknown}"


def _options(args: tuple[str, ...], *names: str) -> list[str]:
    """Values of option ``names`` (``--set x`` or ``--set=x``) in ``args``."""
    out = []
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                out.append(args[i + 1])
            elif a.startswith(n + "="):
                out.append(a.split("=", 1)[1])
    return out


def _import_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"documented_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _source(target: tuple[str, ...]) -> str:
    path = ROOT / target[0]
    return path.read_text() if target[0].endswith(".py") and path.is_file() else ""


CONFIGURED = [c for c in COMMANDS if (e := python_entry(c.argv))
              and (_options(e.args, "--config", "-c", "--set", "-s") or "def bench_overrides" in _source(e.target))]


@pytest.mark.parametrize("cmd", CONFIGURED, ids=lambda c: c.text)
def test_documented_config_and_overrides_load(cmd, tmp_path):
    """``--config`` + every ``--set`` as the command gives them, validated as the entry point
    would (a bench that adds overrides of its own exposes ``parse_args`` + ``bench_overrides``:
    they are applied too, so a bench whose own settings contradict the preset fails here)."""
    from catvton.config import ConfigError, load_config

    entry = python_entry(cmd.argv)
    configs = _options(entry.args, "--config", "-c")
    config = ROOT / (configs[-1] if configs else "configs/tiny.yaml")
    overrides = _options(entry.args, "--set", "-s")
    if "def bench_overrides" in _source(entry.target):
        bench = _import_script(ROOT / entry.target[0])
        overrides = bench.bench_overrides(bench.parse_args(list(entry.args)), tmp_path)
    try:
        load_config(config, overrides)
    except ConfigError as e:
        pytest.fail(f"{cmd.text} ({', '.join(cmd.where)}) does not load:\n{e}")


def test_the_overhead_bench_is_checked_with_its_own_settings(tmp_path):
    """``python bench/train_step_overhead.py --steps 60`` once stopped at start-up: the bench sets
    ``train.val_every`` to ``--steps`` and the preset's ``tune.grace_period`` (100) is no multiple
    of it -- a sweep's constraint, checked on every job. The check above loads the bench's own
    overrides (it caught that); the constraint is now checked where a sweep starts
    (``sweep_problems``), so a training job loads and a sweep with those settings is refused."""
    from catvton.config import load_config, sweep_problems

    bench = _import_script(ROOT / "bench" / "train_step_overhead.py")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", bench.bench_overrides(bench.parse_args(["--steps", "60"]), tmp_path))
    assert cfg.train.val_every == 60 and cfg.tune.grace_period == 100
    assert sweep_problems(cfg) == ["tune.grace_period=100: a positive multiple of train.val_every (60); ASHA only "
                                   "sees steps with a validation loss",
                                   "tune.grace_period=100: ASHA's first rung must come before a trial's last step "
                                   "(train.max_steps=60), or it can stop no trial early; lower it or train longer"]


# --------------------------------------------------------------------------------------------
# Running the commands
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory) -> Path:
    """A folder that looks like the repository root (links to its top-level entries) with its own
    ``outputs/`` and ``tmp/``: the docs' relative paths work, every output stays here."""
    box = tmp_path_factory.mktemp("documented")
    for p in ROOT.iterdir():
        if p.name not in ("outputs", ".git", ".pytest_cache", "tmp") and not p.name.endswith(".egg-info"):
            (box / p.name).symlink_to(p)
    (box / "outputs").mkdir()
    (box / "tmp").mkdir()
    return box


_RESULTS: dict[str, str] = {}
"""Command -> "" once it ran well in this session's sandbox, else why it failed."""


def _concrete(cmd: str, way: Way, box: Path) -> list[str]:
    """The argv that runs ``cmd`` in ``box``: /tmp/ paths moved into it, sizes swapped and added."""
    text = re.sub(r"(?<![\w/.-])/tmp/", f"{box}/tmp/", cmd)
    for pattern, repl in way.swap:
        text = re.sub(pattern, repl.replace("{sandbox}", str(box)), text)
    argv = shlex.split(text) + list(way.add)
    program = {"python": [sys.executable], "python3": [sys.executable], "pytest": [sys.executable, "-m", "pytest"]}
    return program.get(argv[0], [argv[0]]) + argv[1:]


def run_documented(cmd: str, box: Path) -> None:
    """Run ``cmd`` the way its :class:`Way` says (its needs first), and check what it left."""
    way = way_of(cmd)
    assert way is not None and cmd not in LISTED
    assert not machine_paths(cmd), f"not run: {cmd!r} names paths of one machine"
    for need in way.needs:
        first = next((c.text for c in COMMANDS if c.text not in LISTED and getattr(way_of(c.text), "name", "") == need),
                     None)
        assert first, f"{cmd!r} needs a documented command of kind {need!r}, and no doc shows one any more"
        if first not in _RESULTS:
            try:
                run_documented(first, box)
            except AssertionError:
                pass  # its failure is in _RESULTS, and reported below
        assert not _RESULTS[first], f"{cmd!r} needs {first!r}, which failed: {_RESULTS[first][:3000]}"
    argv = _concrete(cmd, way, box)
    started = time.time() - 1
    try:
        done = subprocess.run(argv, cwd=box, env=_env(), capture_output=True, text=True,
                              timeout=2400 if way.slow else 300)
        out, problems = done.stdout + done.stderr, [] if done.returncode == 0 else [f"exit code {done.returncode}"]
    except subprocess.TimeoutExpired as e:
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
        problems = [f"still running after {e.timeout:.0f} s"]
    problems += [f"its output lacks {p!r}" for p in way.says if not re.search(p, out)]
    problems += [f"it wrote no {p} under the sandbox" for p in way.makes
                 if not any(f.is_file() and f.stat().st_mtime >= started for f in box.glob(p))]
    _RESULTS[cmd] = "; ".join(problems) + (f"\n{out[-3000:]}" if problems else "")
    assert not problems, (f"{cmd}\n  ran as: {shlex.join(argv)}\n  in {box}\n  " + "; ".join(problems)
                          + f"\n--- output (tail) ---\n{out[-6000:]}")


RUNNABLE = [c for c in COMMANDS if c.text not in LISTED and way_of(c.text) is not None]


@pytest.mark.parametrize("cmd", [pytest.param(c, marks=[pytest.mark.slow] if way_of(c.text).slow else [])
                                 for c in RUNNABLE], ids=lambda c: c.text)
@pytest.mark.timeout(3600)
def test_documented_command_runs(cmd, sandbox):
    if cmd.text in _RESULTS:  # already run as another command's need
        assert not _RESULTS[cmd.text], _RESULTS[cmd.text]
        return
    run_documented(cmd.text, sandbox)
