"""Config: YAML + dotted overrides, strict parsing, one validation pass, flattening."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aoq.config import (
    Config, ConfigError, config_from_dict, config_to_dict, dump_yaml, flatten, load_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate_and_paths_are_absolute(tmp_path: Path) -> None:
    cfg = load_config(None, [], base_dir=tmp_path)
    assert cfg.loss.variant == "aoq" and cfg.negatives.source == "mine"
    assert cfg.run.num_workers == 2
    assert Path(cfg.run.storage).is_absolute()
    assert cfg.run.storage == str(tmp_path / "outputs")
    assert Path(cfg.data.cache_dir).is_absolute()
    assert cfg.data.dataset == "scenes"  # the built-in name is not a path


def test_yaml_then_overrides_with_types(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  epochs: 7\n  lr: 1e-3\nloss:\n  variant: offtri\n")
    cfg = load_config(f, ["optim.epochs=9", "loss.max_violation=false",
                          "tracking.tags.group=ablation", "negatives.source=tables:rel/t"],
                      base_dir=tmp_path)
    assert cfg.optim.epochs == 9 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.loss.variant == "offtri" and cfg.loss.max_violation is False
    assert cfg.tracking.tags == {"group": "ablation"}
    assert cfg.negatives.source == f"tables:{tmp_path / 'rel/t'}"


@pytest.mark.parametrize("override, needle", [
    ("optim.epoch=3", "unknown key 'optim.epoch'; did you mean optim.epochs"),
    ("optim.epochs=three", "optim.epochs='three': expected an integer"),
    ("loss.alpha=0", "loss.alpha=0.0: must be > 0"),
    ("loss.variant=quad", "loss.variant='quad': must be one of"),
    ("negatives.sampling_range=3000", "negatives.sampling_range=3000: must be <= "
                                      "negatives.k_captions=2000"),
    ("negatives.source=elsewhere", "negatives.source='elsewhere'"),
    ("model.name=resnet", "model.name='resnet': must be one of"),
    ("optim", "expected key.sub=value"),
    ("optim=3", "is a section"),
    ("loss.max_violation=maybe", "expected true or false"),
])
def test_bad_overrides_name_key_value_and_rule(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["loss.alpha=0", "optim.lr=-1", "run.num_workers=0"])
    text = str(info.value)
    assert "loss.alpha" in text and "optim.lr" in text and "run.num_workers" in text


def test_warmup_covering_all_epochs_is_refused_for_offline_variants() -> None:
    with pytest.raises(ConfigError, match="would never see an offline negative"):
        load_config(None, ["loss.variant=aoq", "optim.epochs=2", "negatives.warmup_epochs=2"])
    load_config(None, ["loss.variant=triplet", "optim.epochs=2", "negatives.warmup_epochs=2"])


def test_yaml_duplicate_keys_and_python_tags_are_refused(tmp_path: Path) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("optim:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"dup.yaml, line 3: duplicate key 'epochs'"):
        load_config(dup)
    evil = tmp_path / "evil.yaml"
    evil.write_text("optim: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match=r"evil.yaml, line 1"):
        load_config(evil)
    nested = tmp_path / "nested.yaml"
    nested.write_text("loss:\n  nope: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'loss.nope'"):
        load_config(nested)


def test_round_trips_dict_and_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["loss.variant=aoq", "tracking.tags.a=b"], base_dir=tmp_path)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    f = tmp_path / "saved.yaml"
    f.write_text(dump_yaml(cfg))
    assert load_config(f, [], base_dir=tmp_path) == cfg


def test_flatten_gives_every_leaf_as_a_string() -> None:
    flat = flatten(Config())
    assert flat["loss.alpha"] == "0.3"
    assert flat["data.scenes.n_test"] == "1000"
    assert all(isinstance(v, str) for v in flat.values())
    assert len(flat) >= 50


def test_help_lists_every_option_with_default() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for key in flatten(Config()):
        if not key.startswith("tracking.tags"):
            assert f"{key}=" in out, key
    assert "loss.alpha=0.3" in out and "KEY=VALUE" in out


def test_cli_reports_bad_config_without_traceback() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "loss.alpha=0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "loss.alpha=0.0: must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
