"""Search spaces as data: every shipped space loads; every kind of mistake is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from aoq.config import ConfigError
from aoq.config.tune_space import as_overrides, load_space

SPACES = sorted((Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_is_valid(path: Path) -> None:
    space = load_space(path)
    assert space.metric == "dev/rsum" and space.mode == "max" and space.params


def test_the_required_spaces_ship() -> None:
    assert {"margins.yaml", "sampling_range.yaml", "adaptive_weights.yaml",
            "aoq.yaml"} <= {p.name for p in SPACES}


def test_a_space_parses_every_distribution(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, """
metric: dev/i2t_r1
mode: max
params:
  loss.margin_online: {distribution: uniform, low: 0.1, high: 0.3}
  loss.alpha: {distribution: qloguniform, low: 0.1, high: 1.0, q: 0.05}
  negatives.sampling_range: {distribution: randint, low: 10, high: 20}
  optim.batch_size: {distribution: qrandint, low: 32, high: 128, q: 32}
  loss.variant: {distribution: choice, values: [offquin, aoq]}
  optim.lr: {distribution: grid, values: [1.0e-4, 2.0e-4]}
"""))
    by_key = {p.key: p for p in space.params}
    assert by_key["negatives.sampling_range"].probe_values() == [10, 19]
    assert by_key["loss.variant"].values == ("offquin", "aoq")
    assert as_overrides({"loss.alpha": 0.25}) == ["loss.alpha=0.25"]


@pytest.mark.parametrize("params, message", [
    ("loss.margn_online: {distribution: uniform, low: 0, high: 1}",
     "params.loss.margn_online: unknown config key; did you mean loss.margin_online?"),
    ("loss.alpha: {distribution: gaussian, low: 0, high: 1}", "unknown distribution 'gaussian'"),
    ("loss.alpha: {distribution: uniform, low: 1, high: 0.5}", "low=1 must be below high=0.5"),
    ("loss.alpha: {distribution: loguniform, low: 0, high: 1}", "loguniform needs low > 0"),
    ("loss.alpha: {distribution: uniform, low: 0.1}", "uniform takes exactly ['high', 'low']"),
    ("negatives.sampling_range: {distribution: uniform, low: 10, high: 50}",
     "integer option; use randint"),
    ("loss.variant: {distribution: uniform, low: 0, high: 1}", "needs a numeric option"),
    ("loss.variant: {distribution: choice, values: [aoq, quadruplet]}",
     "value 'quadruplet' from its choice range is invalid"),
    ("loss.margin_online: {distribution: uniform, low: -0.5, high: 0.2}",
     "value -0.5 from its uniform range is invalid"),
    # A range wider than the tables: a cross-field conflict with negatives.k_captions.
    ("negatives.sampling_range: {distribution: randint, low: 10, high: 5000}",
     "params.negatives.sampling_range: value 4999"),
    ("optim.lr: {distribution: grid, values: []}", "needs a non-empty list 'values'"),
])
def test_a_bad_space_names_the_file_and_the_key(tmp_path: Path, params: str,
                                                message: str) -> None:
    path = write(tmp_path, f"metric: dev/rsum\nmode: max\nparams:\n  {params}\n")
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)


@pytest.mark.parametrize("text, message", [
    ("metric: test/rsum\nparams: {loss.alpha: {distribution: uniform, low: 0.1, high: 1}}",
     "metric='test/rsum' is not reported every epoch"),
    ("mode: maximise\nparams: {loss.alpha: {distribution: uniform, low: 0.1, high: 1}}",
     "mode='maximise' must be max or min"),
    ("metric: dev/rsum\n", "'params' must map at least one config key"),
    ("metrics: dev/rsum\nparams: {}", "unknown top-level keys ['metrics']"),
])
def test_bad_top_level_entries_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)


def test_ranges_are_checked_against_the_study_base_config(tmp_path: Path) -> None:
    path = write(tmp_path, "params:\n  negatives.sampling_range: "
                           "{distribution: grid, values: [10, 300]}\n")
    load_space(path)  # fine with the default tables (K = 2000)
    with pytest.raises(ConfigError, match="value 300 from its grid range is invalid"):
        load_space(path, overrides=["negatives.k_captions=100", "negatives.k_images=40"])
