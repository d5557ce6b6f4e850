"""Load a :class:`~aoq.config.schema.Config` from YAML plus dotted command-line overrides.

The order is: dataclass defaults, then the YAML file, then ``key.sub=value`` overrides,
then one validation pass that reports every problem at once. Nothing here starts Ray
or touches the data, so a bad config fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from aoq.config.errors import ConfigError
from aoq.config.schema import BUILT_IN_DATASETS, Config, iter_options
from aoq.config.validation import validate
from aoq.storage import is_uri

#: A config or search-space file is a few kilobytes; anything far larger is not one, and
#: reading it whole must not be able to exhaust memory.
MAX_YAML_BYTES = 1 << 20

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(
                f"{loader.name}, line {line}: duplicate key {key!r} (first set on line "
                f"{seen[key]})"
            )
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML mapping safely: no python tags, no duplicate keys.

    Raises:
        ConfigError: naming the file and line of the problem.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ConfigError(f"{path}: not a regular file")
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a YAML file here is at most "
                              f"{MAX_YAML_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got "
                          f"{type(data).__name__}")
    return data


# --------------------------------------------------------------------------- coercion


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    from_cli = isinstance(value, str)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_cli:
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number")
        if isinstance(value, (int, float)):
            out = float(value)
        else:
            # YAML 1.1 reads "1e-3" as a string; accept it as the number it obviously is.
            try:
                out = float(str(value).strip())
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected a number") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return out
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got a {type(value).__name__}")
        return "" if value is None else str(value)
    if typ is dict or typing.get_origin(typ) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping")
        # Only scalars: str() of a nested (possibly alias-built) structure is unbounded.
        nested = [k for k, v in value.items() if isinstance(v, (dict, list))]
        if nested:
            raise ConfigError(f"{key}.{nested[0]}: expected a string, got a "
                              f"{type(value[nested[0]]).__name__}")
        return {str(k): "" if v is None else str(v) for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported field type {typ!r}")  # pragma: no cover


def _unknown_key(prefix: str, name: str, allowed: Sequence[str]) -> ConfigError:
    key = f"{prefix}{name}"
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return ConfigError(f"unknown key {key!r}{hint} (allowed: {', '.join(sorted(allowed))})")


def _merge(obj: Any, values: Mapping[str, Any], prefix: str = "") -> None:
    """Write a nested mapping into dataclass ``obj`` in place, coercing leaf values."""
    types = _field_types(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in values.items():
        if name not in types:
            raise _unknown_key(prefix, str(name), names)
        key = f"{prefix}{name}"
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: is a section; expected a mapping of its keys")
            _merge(current, value, prefix=f"{key}.")
        else:
            setattr(obj, name, _coerce(key, value, types[name]))


def _set_dotted(cfg: Config, key: str, raw: str) -> None:
    parts = key.split(".")
    obj: Any = cfg
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        prefix = f"{prefix}." if prefix else ""
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise _unknown_key(prefix, part, names)
        value = getattr(obj, part)
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(value):
            if last:
                raise ConfigError(f"{key}: is a section; set one of its keys, e.g. "
                                  f"{key}.{dataclasses.fields(value)[0].name}=...")
            obj = value
            continue
        typ = _field_types(type(obj))[part]
        if isinstance(value, dict):
            # Mapping fields take sub-keys: tracking.tags.group=ablation
            rest = parts[depth + 1:]
            if not rest:
                raise ConfigError(f"{key}: is a mapping; set a sub-key, e.g. {key}.name=value")
            value[".".join(rest)] = raw
            return
        if not last:
            raise ConfigError(f"{key}: {'.'.join(parts[:depth + 1])} is not a section")
        if raw.strip().lower() in {"null", "none", "~"} and typ is str:
            raw = ""
        setattr(obj, part, _coerce(key, raw, typ))
        return


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """Split ``key.sub=value`` strings; a malformed one is a ConfigError."""
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value, e.g. optim.epochs=5")
        pairs.append((key.strip(), value))
    return pairs


# --------------------------------------------------------------------------- paths


def _absolute(value: str, base: Path) -> str:
    if not value or is_uri(value):
        return value
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_paths(cfg: Config, base: Path | None = None) -> None:
    """Make every local path absolute against ``base`` (default: the current directory)."""
    base = Path.cwd() if base is None else base
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            if f.metadata.get("path"):
                value = getattr(sub, f.name)
                if section.name == "data" and f.name == "dataset" and value in BUILT_IN_DATASETS:
                    continue
                setattr(sub, f.name, _absolute(value, base))
    kind, sep, rest = cfg.negatives.source.partition(":")
    if sep and kind in ("checkpoint", "tables") and rest:
        cfg.negatives.source = f"{kind}:{_absolute(rest, base)}"


# --------------------------------------------------------------------------- public API


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    base_dir: Path | None = None,
) -> Config:
    """Defaults, then the YAML file, then the overrides; validated, with absolute paths.

    Raises:
        ConfigError: naming the key (or file and line) and what is allowed.
    """
    cfg = Config()
    if path is not None:
        _merge(cfg, read_yaml(path))
    for key, raw in parse_overrides(overrides):
        _set_dotted(cfg, key, raw)
    resolve_paths(cfg, base_dir)
    validate(cfg)
    return cfg


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """Rebuild a validated Config from :func:`config_to_dict` output (e.g. on a worker)."""
    cfg = Config()
    _merge(cfg, values)
    validate(cfg)
    return cfg


def section_from_dict(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """One config section (e.g. ModelConfig) from a dict, with the same key and type
    checks as the loader; ``prefix`` (e.g. ``"model."``) makes error messages exact."""
    section = cls()
    _merge(section, values, prefix=prefix)
    return section


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of the config (safe to pickle, YAML-dump or send to Ray)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    """The config as YAML that :func:`load_config` reads back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def flatten(cfg: Config) -> dict[str, str]:
    """Dotted keys to string values, e.g. ``{"loss.alpha": "0.3"}``, for MLflow params."""
    out: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = str(value)

    walk(config_to_dict(cfg), "")
    return out


def options_help() -> str:
    """Every option with its default and constraints, for ``--help``."""
    lines = []
    section = None
    for key, default, help_text, meta in iter_options():
        head = key.rsplit(".", 1)[0]
        if head != section:
            section = head
            lines.append(f"\n  [{section}]")
        allowed = ""
        if meta.get("choices"):
            allowed = f" {{{'|'.join(map(str, meta['choices']))}}}"
        shown = repr(default) if isinstance(default, str) else default
        lines.append(f"    {key}={shown}{allowed}")
        lines.append(f"        {help_text}")
    return "\n".join(lines)
