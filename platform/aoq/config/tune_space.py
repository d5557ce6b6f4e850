"""Search spaces as data: ``tune_spaces/*.yaml`` maps dotted config keys to distributions.

A space file::

    metric: dev/rsum          # what a trial reports every epoch (dev/<recall key>)
    mode: max                 # max or min
    params:
      loss.margin_online: {distribution: uniform, low: 0.05, high: 0.4}
      loss.alpha:         {distribution: loguniform, low: 0.05, high: 1.0}
      negatives.sampling_range: {distribution: qrandint, low: 10, high: 300, q: 10}
      loss.variant:       {distribution: choice, values: [offquin, aoq]}
      optim.lr:           {distribution: grid, values: [2.0e-4, 5.0e-4]}

Distributions: ``uniform``, ``loguniform`` (low > 0), ``randint`` (integers, high
exclusive, as in Ray Tune), ``quniform`` / ``qloguniform`` / ``qrandint`` (quantized to
``q``), ``choice`` and ``grid`` (``values``). A space is checked against the config
before anything runs: every key must be an option, integer options take only integer
distributions, and the extreme values of every range (and every listed value) must
each make a valid config together with the study's base config — which catches
out-of-range values and cross-field conflicts such as a sampling range wider than the
tables. Errors name the file and the key. Pure Python: Ray is only needed to sample.

A trial samples all parameters at once, so the study driver also checks every
combination of the parameters' extreme values (:func:`probe_points`) against the data
and the cluster before any trial starts; a space is limited to
:data:`MAX_PROBE_POINTS` such combinations (ten ranges) and each list to
:data:`MAX_LIST_VALUES` scalar values, so that this check stays short.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from aoq.config.errors import ConfigError
from aoq.config.loader import load_config, read_yaml
from aoq.config.schema import Config, iter_options

RANGE_DISTRIBUTIONS = ("uniform", "loguniform", "randint", "quniform", "qloguniform",
                       "qrandint")
LIST_DISTRIBUTIONS = ("choice", "grid")
INTEGER_DISTRIBUTIONS = ("randint", "qrandint")
METRICS = tuple(f"dev/{k}" for k in ("rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1",
                                     "t2i_r5", "t2i_r10"))
#: Most values a choice or grid may list.
MAX_LIST_VALUES = 1000
#: Most combinations of extreme values checked before a study (2 ** 10: ten ranges).
MAX_PROBE_POINTS = 1024


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One searched option.

    Attributes:
        key: dotted config key, e.g. ``loss.margin_online``.
        distribution: one of RANGE_DISTRIBUTIONS or LIST_DISTRIBUTIONS.
        low, high: range bounds (range distributions).
        q: quantum (q* distributions).
        values: the listed values (choice, grid).
    """

    key: str
    distribution: str
    low: float | None = None
    high: float | None = None
    q: float | None = None
    values: tuple[Any, ...] = ()

    def probe_values(self) -> list[Any]:
        """Values that bound what sampling can produce: both ends, or every value."""
        if self.distribution in LIST_DISTRIBUTIONS:
            return list(self.values)
        high = self.high
        if self.distribution == "randint":
            high = int(self.high) - 1  # Ray's randint excludes high
        return [self.low, high]


@dataclasses.dataclass(frozen=True)
class TuneSpace:
    """A validated search space: where it came from, what to optimise, what to sample."""

    path: str
    metric: str
    mode: str
    params: tuple[ParamSpec, ...]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]


def _number(where: str, name: str, value: Any, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {name}={value!r} is not a number")
    if integer and not float(value).is_integer():
        raise ConfigError(f"{where}: {name}={value!r} must be an integer")
    return value


def _param(path: str, key: str, spec: Any, option_types: dict[str, type]) -> ParamSpec:
    where = f"{path}: params.{key}"
    if key not in option_types:
        close = difflib.get_close_matches(key, list(option_types), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{where}: unknown config key{hint}")
    if not isinstance(spec, dict) or "distribution" not in spec:
        raise ConfigError(f"{where}: expected a mapping with 'distribution' (one of "
                          f"{', '.join(RANGE_DISTRIBUTIONS + LIST_DISTRIBUTIONS)})")
    dist = spec["distribution"]
    typ = option_types[key]
    if dist in LIST_DISTRIBUTIONS:
        extra = set(spec) - {"distribution", "values"}
        values = spec.get("values")
        if extra:
            raise ConfigError(f"{where}: {dist} takes only 'values', not {sorted(extra)}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {dist} needs a non-empty list 'values'")
        if len(values) > MAX_LIST_VALUES:
            raise ConfigError(f"{where}: {len(values)} values; at most {MAX_LIST_VALUES}")
        nested = [v for v in values if isinstance(v, (dict, list))]
        if nested:
            raise ConfigError(f"{where}: values must be scalars, not a "
                              f"{type(nested[0]).__name__}")
        return ParamSpec(key, dist, values=tuple(values))
    if dist not in RANGE_DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {dist!r} (allowed: "
                          f"{', '.join(RANGE_DISTRIBUTIONS + LIST_DISTRIBUTIONS)})")
    if typ not in (int, float):
        raise ConfigError(f"{where}: {dist} needs a numeric option; {key} is "
                          f"{typ.__name__} (use choice or grid)")
    if typ is int and dist not in INTEGER_DISTRIBUTIONS:
        raise ConfigError(f"{where}: {key} is an integer option; use randint, qrandint, "
                          f"choice or grid, not {dist}")
    quantized = dist.startswith("q")
    allowed = {"distribution", "low", "high"} | ({"q"} if quantized else set())
    extra = set(spec) - allowed
    if extra or not {"low", "high"} <= set(spec) or (quantized and "q" not in spec):
        raise ConfigError(f"{where}: {dist} takes exactly {sorted(allowed - {'distribution'})}")
    integer = dist in INTEGER_DISTRIBUTIONS
    low = _number(where, "low", spec["low"], integer)
    high = _number(where, "high", spec["high"], integer)
    q = _number(where, "q", spec["q"], integer) if quantized else None
    if not low < high:
        raise ConfigError(f"{where}: low={low} must be below high={high}")
    if "log" in dist and low <= 0:
        raise ConfigError(f"{where}: {dist} needs low > 0, got {low}")
    if q is not None and q <= 0:
        raise ConfigError(f"{where}: q={q} must be positive")
    return ParamSpec(key, dist, low=low, high=high, q=q)


def load_space(path: str | os.PathLike, base_config: str | os.PathLike | None = None,
               overrides: Sequence[str] = ()) -> TuneSpace:
    """Read and validate a space file against the study's base config.

    Raises:
        ConfigError: naming the file and the key of the first problem.
    """
    path = str(Path(path))
    raw = read_yaml(path)
    allowed = {"metric", "mode", "params"}
    if set(raw) - allowed:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(set(raw) - allowed)} "
                          f"(allowed: {sorted(allowed)})")
    metric = raw.get("metric", "dev/rsum")
    mode = raw.get("mode", "max")
    if metric not in METRICS:
        raise ConfigError(f"{path}: metric={metric!r} is not reported every epoch "
                          f"(allowed: {', '.join(METRICS)})")
    if mode not in ("max", "min"):
        raise ConfigError(f"{path}: mode={mode!r} must be max or min")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: 'params' must map at least one config key to a "
                          "distribution")
    option_types = {key: type(default) for key, default, _, _ in iter_options()}
    specs = tuple(_param(path, str(k), v, option_types) for k, v in params.items())
    points = math.prod(len(spec.probe_values()) for spec in specs)
    if points > MAX_PROBE_POINTS:
        raise ConfigError(f"{path}: its parameters' extreme values make {points} "
                          f"combinations; at most {MAX_PROBE_POINTS} can be checked before "
                          "a study (search fewer parameters, or list fewer values)")
    for spec in specs:
        for value in spec.probe_values():
            try:
                load_config(base_config, [*overrides, f"{spec.key}={value}"])
            except ConfigError as exc:
                raise ConfigError(f"{path}: params.{spec.key}: value {value!r} from its "
                                  f"{spec.distribution} range is invalid: {exc}") from None
    return TuneSpace(path, metric, mode, specs)


def as_overrides(sampled: dict[str, Any]) -> list[str]:
    """Sampled values as dotted ``KEY=VALUE`` overrides for :func:`load_config`."""
    return [f"{key}={value}" for key, value in sampled.items()]


def probe_points(space: TuneSpace, base_config: str | os.PathLike | None = None,
                 overrides: Sequence[str] = ()) -> Iterator[tuple[dict[str, Any], Config]]:
    """Every combination of the parameters' extreme values, as (sampled values, the
    validated config of a trial that samples them).

    Whatever a trial samples lies between these points, so what holds for all of them
    (valid together, fits the data, fits the cluster) holds for every trial.

    Raises:
        ConfigError: a combination that is invalid, naming the file and the values.
    """
    keys = space.keys
    for values in itertools.product(*(p.probe_values() for p in space.params)):
        sampled = dict(zip(keys, values))
        try:
            cfg = load_config(base_config, [*overrides, *as_overrides(sampled)])
        except ConfigError as exc:
            raise ConfigError(f"{space.path}: a trial could sample {describe_point(sampled)}, "
                              f"which is invalid: {exc}") from None
        yield sampled, cfg


def describe_point(sampled: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sampled.items())
