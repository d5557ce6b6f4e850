"""Typed configuration: dataclasses, YAML + dotted overrides, one validation pass."""

from aoq.config.errors import ConfigError
from aoq.config.loader import (
    config_from_dict,
    config_to_dict,
    dump_yaml,
    flatten,
    load_config,
    options_help,
    read_yaml,
    section_from_dict,
)
from aoq.config.schema import (
    BUILT_IN_DATASETS,
    Config,
    DataConfig,
    EmojiConfig,
    LossConfig,
    ModelConfig,
    NegativesConfig,
    OptimConfig,
    RunConfig,
    ScenesConfig,
    TrackingConfig,
)
from aoq.config.validation import parse_negative_source, validate

__all__ = [
    "BUILT_IN_DATASETS", "Config", "ConfigError", "DataConfig", "EmojiConfig", "LossConfig", "ModelConfig", "NegativesConfig",
    "OptimConfig", "RunConfig", "ScenesConfig", "TrackingConfig", "config_from_dict",
    "config_to_dict", "dump_yaml", "flatten", "load_config", "options_help",
    "parse_negative_source", "read_yaml", "section_from_dict", "validate",
]
