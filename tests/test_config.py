from pathlib import Path

import pytest

from catvton.config import ConfigError, config_from_dict, describe, load_config

ROOT = Path(__file__).resolve().parents[1]


def yaml_leaves(mapping: dict, prefix: str = "") -> dict[str, object]:
    """``{"section.field": value}`` for every value a YAML mapping sets (nested sections flattened)."""
    out: dict[str, object] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(yaml_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def as_loaded(value: object, loaded: object) -> object:
    """The YAML ``value`` as the config holds it: PyYAML reads ``5e-5`` (no dot) as a string and
    ``2`` as an int, a float field holds a float."""
    if isinstance(loaded, float) and not isinstance(value, bool):
        return float(value)  # type: ignore[arg-type]
    if isinstance(loaded, list) and isinstance(value, list):
        return [as_loaded(v, x) for v, x in zip(value, loaded)]
    return value


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    import yaml

    from catvton.config.rehearsal import PRODUCTION, REHEARSAL, rehearsal_config

    # configs/rehearsal.yaml is an override list on top of l40s.yaml, not a preset of its own
    cfg = rehearsal_config() if path == REHEARSAL else load_config(path)
    # every value the file sets is the loaded config's (read here with PyYAML alone, not the loader)
    if path == REHEARSAL:
        expected = yaml_leaves(yaml.safe_load(PRODUCTION.read_text()))
        for item in yaml.safe_load(path.read_text())["overrides"]:
            key, raw = item.split("=", 1)
            expected[key] = yaml.safe_load(raw)
    else:
        expected = yaml_leaves(yaml.safe_load(path.read_text()))
    assert len(expected) >= 10, expected  # a preset, not an empty file
    loaded = {}
    for key in expected:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        loaded[key] = node
    assert {k: as_loaded(v, loaded[k]) for k, v in expected.items()} == loaded
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "a config file starts with what it is for"
    assert "python " in path.read_text(), "a config file names the command that runs it"


def test_l40s_is_the_production_plan():
    cfg = load_config(ROOT / "configs" / "l40s.yaml")
    assert (cfg.canvas.half_width, cfg.canvas.half_height) == (768, 1024)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr) == (2, 4, 5e-5)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.train.precision) == (16, 32.0, "bf16")
    assert 5 <= cfg.train.epochs <= 10
    assert cfg.data.source == "SaffalPoosh/deepFashion-with-masks"


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["data.groups=[lower]", "train.lr=1e-4", "data.seed=7", "model.transformer_override=null"])
    assert cfg.data.groups == ["lower"]
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.seed == 7
    assert cfg.model.transformer_override is None


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.sed=1", "train.lr=fast", "canvas.half_width=100", "data.groups=[shoes]", "noequals"])
    problems = e.value.problems
    text = "\n".join(problems)
    assert "did you mean data.seed" in text
    assert "train.lr='fast': expected float" in text
    assert "noequals" in text
    # type errors are reported before semantic ones; fix those and the semantic ones appear together
    with pytest.raises(ConfigError) as e:
        load_config(None, ["canvas.half_width=100", "data.groups=[shoes]", "mask.lower_rule=blob"])
    assert len(e.value.problems) == 3


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_a_dict():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.hash("data") == config_from_dict(cfg.to_dict()).hash("data")
    assert cfg.hash("data") != load_config(ROOT / "configs" / "tiny.yaml", ["data.seed=1"]).hash("data")


def test_every_field_is_documented():
    rows = describe()
    undocumented = [name for name, _, doc in rows if not doc]
    assert rows and not undocumented


def test_online_wandb_without_a_project_is_refused():
    with pytest.raises(ConfigError, match="wandb_project"):
        load_config(None, ["run.wandb_mode=online"])


def test_a_sweep_constraint_refuses_sweeps_not_training_jobs():
    """ASHA's grace period must fall on a validation step: a sweep's concern, so a training job with
    another val_every loads, and the sweep's own check (run_sweep, ray_jobs/tune.py) refuses it."""
    from catvton.config import sweep_problems

    job = load_config(ROOT / "configs" / "tiny.yaml", ["train.val_every=60"])  # grace_period 100
    assert job.train.val_every == 60
    assert sweep_problems(job) == ["tune.grace_period=100: a positive multiple of train.val_every (60); ASHA only "
                                   "sees steps with a validation loss"]
    assert sweep_problems(load_config(ROOT / "configs" / "tiny.yaml")) == []
    # no max_steps: the sweep's length comes from train.epochs (tests/test_sweep_plan.py)
    assert sweep_problems(load_config(ROOT / "configs" / "l40s.yaml")) == []
    with pytest.raises(ConfigError, match="tune.grace_period=0: must be at least 1"):
        load_config(ROOT / "configs" / "tiny.yaml", ["tune.grace_period=0"])
