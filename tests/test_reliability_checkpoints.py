"""Principle 7: a checkpoint is used only with the data it was trained for.

A weights file stores the fingerprint of its vocabulary (the words, in order) and the
shape of an image's features; evaluating, mining or training from it with other data is
refused naming both. Before, only the vocabulary size was stored, so the same words in
another order evaluated silently to other scores. Real files, real jobs (no Ray).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from aoq.cluster.job import run_training
from aoq.config import load_config
from aoq.data.prepare import prepare_data
from aoq.data.text import Vocabulary
from aoq.models import build_model
from aoq.models.files import CheckpointError, load_file, load_model, model_record, save_file
from aoq.storage import RunStorage
from aoq.training.run_files import BEST_MODEL_FILE
from aoq.training.session import TrainingSession

from test_reliability_input import write_dataset
from test_reliability_refusals import job, refusal

pytestmark = pytest.mark.usefixtures("no_ray")

SMALL_MODEL = ["model.embed_dim=16", "model.word_dim=8", "optim.batch_size=16",
               "data.dev_max_images=10", "data.min_word_count=1", "negatives.k_captions=60",
               "negatives.k_images=12", "negatives.sampling_range=50"]


@pytest.fixture
def data(tmp_path: Path):
    """A dataset, its own vocabulary file, and the same words in another order."""
    directory = write_dataset(tmp_path / "data")
    base = [f"data.dataset={directory}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL_MODEL]
    prepared = prepare_data(load_config(None, base).data, progress=False)
    words = Vocabulary.load(prepared.vocab_path).words
    shuffled = Vocabulary((*words[:4], *reversed(words[4:])))
    shuffled.save(tmp_path / "shuffled.json")
    return base, prepared, tmp_path / "shuffled.json"


def saved_model(path: Path, base: list[str], prepared, *, fingerprint: bool = True,
                vocab_path: str = "") -> Path:
    cfg = load_config(None, base)
    torch.manual_seed(0)
    model = build_model(cfg.model, prepared.vocab_size, prepared.feature_dim)
    fits = {"vocab_fingerprint": prepared.vocab_fingerprint,
            "n_regions": prepared.signature.n_regions} if fingerprint else {}
    save_file(path, model_record(cfg.model, model, vocab_size=prepared.vocab_size,
                                 img_dim=prepared.feature_dim, vocab_path=vocab_path, **fits))
    return path


def test_evaluate_refuses_the_same_words_in_another_order(
        data, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, prepared, shuffled = data
    path = saved_model(tmp_path / "m.pt", base, prepared)
    args = ["--checkpoint", str(path), "--json", str(tmp_path / "m.json")]
    assert job("evaluate").main([*base, *args]) == 0  # the data it was trained with
    assert json.loads((tmp_path / "m.json").read_text())["evaluation"] == "single model"
    capsys.readouterr()
    other = Vocabulary.load(shuffled).fingerprint()
    err = refusal(capsys, "evaluate", [*base, f"data.vocab={shuffled}", *args])
    assert f"{path}: trained with vocabulary fingerprint {prepared.vocab_fingerprint}, but " \
           f"the data has a {prepared.vocab_size}-word vocabulary (fingerprint {other})" in err


def test_a_checkpoint_of_other_data_is_refused_as_the_mining_model(data, tmp_path: Path
                                                                    ) -> None:
    """negatives.source=checkpoint: mines on the driver before Ray; refused there."""
    base, prepared, shuffled = data
    path = saved_model(tmp_path / "m.pt", base, prepared)
    cfg = load_config(None, [*base, f"data.vocab={shuffled}", "loss.variant=offtri",
                             f"negatives.source=checkpoint:{path}",
                             f"run.storage={tmp_path / 'runs'}", "run.name=miner",
                             f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(CheckpointError, match="trained with vocabulary fingerprint"):
        run_training(cfg)
    assert not (tmp_path / "mlflow.db").exists()


def test_old_weights_files_without_a_fingerprint(data, tmp_path: Path, caplog,
                                                 capsys: pytest.CaptureFixture) -> None:
    """Written before the fingerprint existed: checked against the vocabulary file they
    name while it exists; without it, loaded with a warning when the sizes match."""
    base, prepared, shuffled = data
    named = saved_model(tmp_path / "named.pt", base, prepared, fingerprint=False,
                        vocab_path=prepared.vocab_path)
    assert "vocab_fingerprint" not in load_file(named)
    err = refusal(capsys, "evaluate", [*base, f"data.vocab={shuffled}", "--checkpoint",
                                       str(named)])
    assert "trained with vocabulary fingerprint" in err
    orphan = saved_model(tmp_path / "orphan.pt", base, prepared, fingerprint=False,
                         vocab_path=str(tmp_path / "gone.json"))
    with caplog.at_level(logging.WARNING, logger="aoq.models"):
        assert job("evaluate").main([*base, f"data.vocab={shuffled}", "--checkpoint",
                                     str(orphan)]) == 0
    assert "written without a vocabulary fingerprint" in caplog.text
    smaller = Vocabulary(Vocabulary.load(shuffled).words[:-1])
    smaller.save(tmp_path / "smaller.json")
    err = refusal(capsys, "evaluate", [*base, f"data.vocab={tmp_path / 'smaller.json'}",
                                       "--checkpoint", str(orphan)])
    assert f"trained with a {prepared.vocab_size}-word vocabulary, but the data has a " \
           f"{prepared.vocab_size - 1}-word vocabulary" in err


def test_a_run_resumed_with_other_data_or_model_is_refused(data, tmp_path: Path) -> None:
    """Training writes the fingerprint and feature shape; a job that resumes the run
    with another vocabulary or model is refused before any worker loads its weights."""
    base, prepared, shuffled = data
    run = [*base, "loss.variant=triplet", f"run.storage={tmp_path / 'runs'}", "run.name=r1",
           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    cfg = load_config(None, run)
    session = TrainingSession(cfg, prepared, RunStorage(cfg.run.storage, "r1",
                                                        cfg.data.cache_dir))
    session.build()
    session.run_epoch(0)  # keeps its best weights
    best = tmp_path / "runs" / "r1" / BEST_MODEL_FILE
    record = load_file(best)
    assert record["vocab_fingerprint"] == prepared.vocab_fingerprint
    assert (record["n_regions"], record["img_dim"]) == (4, 8)
    assert load_model(best)[0].has_global_embedding
    with pytest.raises(CheckpointError, match=rf"{best}: trained with vocabulary fingerprint"):
        run_training(load_config(None, [*run, f"data.vocab={shuffled}"]))
    with pytest.raises(CheckpointError, match=r"run.name='r1' exists with another model "
                                              r"\(model.embed_dim=16 there, 32 here\)"):
        run_training(load_config(None, [*run, "model.embed_dim=32"]))
    assert not (tmp_path / "mlflow.db").exists()
