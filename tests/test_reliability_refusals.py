"""Principle 1: every refusal is one ``error:`` line and exit code 2, before Ray starts.

Each case runs a real job entry (``jobs/*.py`` through ``aoq.cli.run_cli``, in this
process, or as a subprocess where a read-only mount is needed) on real files, and checks
the exit code, that stderr is one ``error:`` message naming the key or file, that no
traceback was printed, and that nothing started: no Ray, no MLflow store.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from aoq.cli import run_cli
from aoq.config import load_config
from aoq.data.prepare import prepare_data
from aoq.models import build_model
from aoq.models.files import model_record, save_file

from conftest import SMALL_SCENES, driver_env, small_overrides

# These jobs must stop before Ray starts, so none may be running beforehand.
pytestmark = pytest.mark.usefixtures("no_ray")

ROOT = Path(__file__).resolve().parents[1]


def job(name: str):
    """The module of ``jobs/<name>.py`` (its ``main`` is what the command line runs)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refusal(capsys: pytest.CaptureFixture, name: str, argv: list[str]) -> str:
    """Run a job's command line; it must refuse with exit code 2 and one ``error:``
    message (continuation lines of one message allowed), before any Ray starts."""
    import ray

    with pytest.raises(SystemExit) as info:
        run_cli(job(name).main, argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err, err
    # Progress bars (data preparation) may come first, on their own \r-separated lines.
    message = err[err.index("error: "):] if "error: " in err else err
    assert err.count("error:") == 1 and err[:err.index("error: ")][-1:] in ("", "\r", "\n"), err
    assert all(line.startswith("  - ") for line in message.strip().splitlines()[1:]), err
    assert not ray.is_initialized()
    return message


def model_file(path: Path, cfg, vocab_size: int, img_dim: int, **changes) -> Path:
    """A real weights file; ``changes`` overwrite fields of its record."""
    torch.manual_seed(0)
    record = model_record(cfg.model, build_model(cfg.model, vocab_size, img_dim),
                          vocab_size=vocab_size, img_dim=img_dim)
    for key, value in changes.items():
        if key == "name":
            record["model_config"]["name"] = value
        else:
            record[key] = value
    save_file(path, record)
    return path


def storage_is_a_file(tmp: Path) -> tuple[list[str], str]:
    (tmp / "afile").write_text("x")
    return [f"run.storage={tmp / 'afile'}"], "is not a directory"


def storage_is_dev_null(tmp: Path) -> tuple[list[str], str]:
    return ["run.storage=/dev/null"], "run.storage='/dev/null': /dev/null is not a directory"


def vocab_is_a_directory(tmp: Path) -> tuple[list[str], str]:
    (tmp / "vocab").mkdir()
    return [f"data.vocab={tmp / 'vocab'}"], f"data.vocab='{tmp / 'vocab'}': {tmp / 'vocab'} " \
                                            "is not a regular file"


def split_is_a_path(tmp: Path) -> tuple[list[str], str]:
    return ["data.train_split=../x/train"], "data.train_split='../x/train': must be 1-128 " \
                                            "characters"


def unknown_model_checkpoint(tmp: Path) -> tuple[list[str], str]:
    cfg = load_config(None, small_overrides(tmp, tmp / "cache"))
    path = model_file(tmp / "m.pt", cfg, 50, 32, name="resnet9000")
    return [f"negatives.source=checkpoint:{path}", "loss.variant=offtri"], \
        f"{path}: stored model config is invalid: model.name='resnet9000': must be one of"


def cache_dir_is_a_file(tmp: Path) -> tuple[list[str], str]:
    (tmp / "cachefile").write_text("x")
    return [f"data.cache_dir={tmp / 'cachefile'}"], \
        f"data.cache_dir='{tmp / 'cachefile'}': {tmp / 'cachefile'} is not a directory"


def tracking_tag_of_aoq(tmp: Path) -> tuple[list[str], str]:
    return ["tracking.tags.aoq.run_name=victim"], "tracking.tags.aoq.run_name: reserved"


TRAIN_CASES: dict[str, Callable[[Path], tuple[list[str], str]]] = {
    "run.storage is a file": storage_is_a_file,
    "run.storage is /dev/null": storage_is_dev_null,
    "data.vocab is a directory": vocab_is_a_directory,
    "data.train_split=../x/train": split_is_a_path,
    "checkpoint of an unknown model": unknown_model_checkpoint,
    "data.cache_dir is a file": cache_dir_is_a_file,
    "a tag that is aoq's own": tracking_tag_of_aoq,
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses_in_one_line_before_ray(case: str, tmp_path: Path, scenes_cache: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    extra, needle = TRAIN_CASES[case](tmp_path)
    argv = [*small_overrides(tmp_path, scenes_cache, "run.name=bad"), *extra]
    err = refusal(capsys, "train", argv)
    assert needle in err, err
    assert not (tmp_path / "mlflow.db").exists()
    assert not list((tmp_path / "runs").glob("*/checkpoint_*"))


def test_evaluate_refuses_a_checkpoint_of_another_feature_size(
        tmp_path: Path, scenes_cache: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: 47 lines ending in 'mat1 and mat2 shapes cannot be multiplied'."""
    cfg = load_config(None, [*SMALL_SCENES, f"data.cache_dir={scenes_cache}"])
    data = prepare_data(cfg.data, progress=False)
    path = model_file(tmp_path / "wide.pt", cfg, data.vocab_size, 48)
    err = refusal(capsys, "evaluate", [*SMALL_SCENES, f"data.cache_dir={scenes_cache}",
                                       "--checkpoint", str(path)])
    assert f"{path}: trained on 48-d features per image, but the data has a " \
           f"{data.vocab_size}-word vocabulary" in err and "12 x 32 features" in err, err


def test_evaluate_refuses_bad_arguments_and_unwritable_outputs(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = refusal(capsys, "evaluate", ["--checkpoint", "x.pt", "--shard-images", "0"])
    assert "argument --shard-images: 0 is not in 1..1048576" in err
    err = refusal(capsys, "evaluate", ["--checkpoint", "x.pt", "--json", "/dev/null/m.json"])
    assert "--json /dev/null/m.json: /dev/null is not a directory" in err


def test_a_truncated_study_file_is_refused_on_resume(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    study = tmp_path / "runs" / "studies" / "s1"
    study.mkdir(parents=True)
    whole = json.dumps({"name": "s1", "space": "x.yaml", "config": None, "overrides": [],
                        "samples": 2, "scheduler": "asha", "max_concurrent": 0,
                        "trial_cpus": 0.0, "seed": 0}, indent=2)
    (study / "study.json").write_text(whole[: len(whole) // 2])
    err = refusal(capsys, "tune", ["--resume", "s1", f"run.storage={tmp_path / 'runs'}"])
    assert f"{study / 'study.json'}: not a complete study file" in err, err
    (study / "study.json").write_text(whole.replace('"samples": 2', '"samples": -3'))
    err = refusal(capsys, "tune", ["--resume", "s1", f"run.storage={tmp_path / 'runs'}"])
    assert "samples=-3: must be in 1..100000" in err, err
    err = refusal(capsys, "tune", ["--resume", "..", f"run.storage={tmp_path / 'runs'}"])
    assert "study name='..': must be 1-128 characters" in err, err


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs a private mount namespace "
                                                 "(unshare -m, as root)")
def test_read_only_mounts_for_storage_and_cache_are_refused(tmp_path: Path,
                                                            scenes_cache: Path) -> None:
    """A real read-only mount (tmpfs, ro), visible only inside the jobs' namespace."""
    mount = tmp_path / "ro"
    mount.mkdir()
    base = [sys.executable, str(ROOT / "jobs" / "train.py"),
            *small_overrides(tmp_path, scenes_cache, "run.name=ro")]
    commands = {"storage": [*base, f"run.storage={mount}"],
                "cache": [*base, f"data.cache_dir={mount / 'cache'}"]}
    script = f"mount -t tmpfs -o ro,size=1m tmpfs {mount} || exit 99\n"
    for key, command in commands.items():
        script += (f"{shlex.join(command)} 2> {tmp_path / key}.err; "
                   f"echo $? > {tmp_path / key}.rc\n")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], env=driver_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for key, where in (("storage", f"run.storage='{mount}': {mount} is not writable"),
                       ("cache", f"data.cache_dir='{mount / 'cache'}': {mount / 'cache'} is "
                                 "not writable")):
        err = (tmp_path / f"{key}.err").read_text()
        assert (tmp_path / f"{key}.rc").read_text().strip() == "2", err
        assert err.startswith("error: ") and where in err and "Read-only file system" in err
        assert "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists()
