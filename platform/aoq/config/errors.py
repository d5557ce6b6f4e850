"""The one error type of config loading and validation."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value, key or file is wrong; the message names the key (or file and line)."""
