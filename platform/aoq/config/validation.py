"""One validation pass over a whole Config, reporting every problem at once."""

from __future__ import annotations

import math

from aoq.config.errors import ConfigError
from aoq.config.model_catalog import known_models, model_traits
from aoq.config.names import experiment_problem, name_problem, tag_problem
from aoq.config.schema import Config, ModelConfig, iter_options
from aoq.storage import is_uri

NEGATIVE_SOURCES = ("mine", "checkpoint:<path>", "tables:<path>")


def _field_problems(cfg: Config) -> list[str]:
    problems = []
    for key, value, _help, meta in iter_options(cfg):
        identifier = meta.get("identifier")
        if identifier:
            problem = None if identifier == "optional" and not value else \
                name_problem(key, value)
            if problem:
                problems.append(problem)
            continue
        choices = meta.get("choices")
        if choices and value not in choices:
            problems.append(f"{key}={value!r}: must be one of {', '.join(map(repr, choices))}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        lo, hi, gt = meta.get("min"), meta.get("max"), meta.get("gt")
        if lo is not None and value < lo:
            problems.append(f"{key}={value!r}: must be >= {lo}")
        if hi is not None and value > hi:
            problems.append(f"{key}={value!r}: must be <= {hi}")
        if gt is not None and not value > gt:
            problems.append(f"{key}={value!r}: must be > {gt}")
    return problems


def parse_negative_source(source: str) -> tuple[str, str]:
    """Split ``negatives.source`` into (kind, path); kind is mine, checkpoint or tables."""
    kind, sep, path = source.partition(":")
    if kind == "mine" and not sep:
        return "mine", ""
    if kind in ("checkpoint", "tables") and sep and path:
        return kind, path
    raise ConfigError(
        f"negatives.source={source!r}: must be one of {', '.join(NEGATIVE_SOURCES)}"
    )


def _cross_problems(cfg: Config) -> list[str]:
    problems = []
    neg, loss, data = cfg.negatives, cfg.loss, cfg.data
    try:
        kind, _ = parse_negative_source(neg.source)
    except ConfigError as exc:
        problems.append(str(exc))
        kind = "?"
    if kind in ("checkpoint", "tables") and is_uri(neg.source.partition(":")[2]):
        problems.append(f"negatives.source={neg.source!r}: must be a local or shared path "
                        "(tables are memory-mapped); copy it from the object store first")
    if neg.sampling_range > neg.k_captions:
        problems.append(
            f"negatives.sampling_range={neg.sampling_range}: must be <= negatives.k_captions="
            f"{neg.k_captions} (h draws from the top-h rows of the i2t table)"
        )
    # The image negative is t2i[n // captions_per_image] with n < h.
    need_images = math.ceil(neg.sampling_range / data.captions_per_image)
    if neg.k_images < need_images:
        problems.append(
            f"negatives.k_images={neg.k_images}: must be >= ceil(sampling_range / "
            f"captions_per_image) = {need_images}"
        )
    if loss.variant != "triplet" and kind == "mine" and neg.warmup_epochs >= cfg.optim.epochs:
        problems.append(
            f"negatives.warmup_epochs={neg.warmup_epochs}: must be < optim.epochs="
            f"{cfg.optim.epochs}, or loss.variant={loss.variant!r} would never see an offline "
            "negative"
        )
    optim, workers = cfg.optim, cfg.run.num_workers
    if optim.batch_scope == "global" and workers >= 1 and optim.batch_size % workers:
        problems.append(
            f"optim.batch_size={optim.batch_size}: must be divisible by run.num_workers="
            f"{workers} (it is the global batch; each worker takes batch_size / num_workers)")
    if data.dataset == "scenes" and data.scenes.n_test % data.test_folds:
        problems.append(
            f"data.test_folds={data.test_folds}: must divide data.scenes.n_test="
            f"{data.scenes.n_test}"
        )
    if data.dataset == "scenes" and data.scenes.n_train * data.captions_per_image <= (
        neg.k_captions + data.captions_per_image
    ) and loss.variant != "triplet":
        problems.append(
            f"negatives.k_captions={neg.k_captions}: the scenes train split has only "
            f"{data.scenes.n_train * data.captions_per_image} captions"
        )
    problems += _model_cross_problems(cfg.model)
    traits = model_traits(cfg.model.name)
    if traits is not None and loss.variant != "triplet" and kind == "mine" and \
            not traits.global_embedding:
        problems.append(
            f"negatives.source='mine': model.name={cfg.model.name!r} scores pairs by cross "
            "attention and has no global embedding to mine the whole training set with; "
            "train a vse, vse_gpo or vsrn model first and set negatives.source="
            "checkpoint:<its best_model.pt> (the authors mined BFAN's negatives with VSRN), "
            "or negatives.source=tables:<dir>")
    return problems


def _model_cross_problems(model: ModelConfig) -> list[str]:
    problems = []
    if model.gpo_pe_dim % 2:
        problems.append(f"model.gpo_pe_dim={model.gpo_pe_dim}: must be even (sin/cos pairs)")
    names = known_models()
    if not names:
        raise RuntimeError("no models are registered: import aoq.models before validating a "
                           "config (it registers every model's name and kind)")
    if model_traits(model.name) is None:
        problems.append(f"model.name={model.name!r}: must be one of "
                        f"{', '.join(map(repr, names))}")
    return problems


def model_problems(model: ModelConfig) -> list[str]:
    """Every problem of a ``model`` section on its own (as a weights file stores it)."""
    fields = [p for p in _field_problems(Config(model=model)) if p.startswith("model.")]
    return fields + _model_cross_problems(model)


def _tracking_problems(cfg: Config) -> list[str]:
    problems = [tag_problem(k, v) for k, v in cfg.tracking.tags.items()]
    problems.append(experiment_problem(cfg.tracking.experiment))
    return [p for p in problems if p]


def _negative_option_problems(cfg: Config) -> list[str]:
    """range_min against the sampling range. (score_margin is simply unused while
    score_filter is off, so that a Tune space can search the two independently.)"""
    neg = cfg.negatives
    problems = []
    if neg.range_min >= neg.sampling_range:
        problems.append(f"negatives.range_min={neg.range_min}: must be < "
                        f"negatives.sampling_range={neg.sampling_range} (draws come from "
                        "ranks range_min..sampling_range-1)")
    return problems


def validate(cfg: Config) -> None:
    """Raise one ConfigError listing every problem, or return None if the config is sound."""
    problems = (_field_problems(cfg) + _cross_problems(cfg) + _negative_option_problems(cfg)
                + _tracking_problems(cfg))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
