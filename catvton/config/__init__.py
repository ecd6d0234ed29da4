"""Typed configuration: one dataclass per concern, defaults in code, YAML presets, dotted overrides.

Code defaults describe the production plan (FLUX.1-Fill-dev, 768x1024 per half, the hub dataset).
``configs/tiny.yaml`` switches everything to the offline CPU default. A YAML file only sets values;
``section.field=value`` overrides go on top; every problem is collected and raised at once::

    cfg = load_config("configs/l40s.yaml", ["train.lr=1e-4", "data.groups=[lower]"])

The sections live in :mod:`catvton.config.sections`, loading in :mod:`catvton.config.loader`.
"""

from catvton.config.loader import apply_mapping, apply_overrides, config_from_dict, describe, dotted_to_nested, load_config
from catvton.config.sections import (CanvasConfig, Config, ConfigError, DataConfig, InferConfig, LoraConfig,
                                     MaskConfig, ModelConfig, RunOptions, TrainConfig, TuneConfig, steps_per_epoch, sweep_problems,
                                     total_steps,
                                     validate)

__all__ = ["CanvasConfig", "Config", "ConfigError", "DataConfig", "InferConfig", "LoraConfig", "MaskConfig",
           "ModelConfig", "RunOptions", "TrainConfig", "TuneConfig", "apply_mapping", "apply_overrides", "config_from_dict",
           "describe", "dotted_to_nested", "load_config", "steps_per_epoch", "sweep_problems", "total_steps", "validate"]
