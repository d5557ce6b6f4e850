"""The paper's models: shapes, gradients, and the cross-attention scores checked against
straightforward per-caption implementations of the authors' algorithms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aoq.config import ConfigError, ModelConfig, load_config
from aoq.training.batches import Batch
from aoq.losses import AOQLoss
from aoq.models import available_models, build_model, count_parameters
from aoq.models.cross_attention import focal_reattend, pack_words, pad_cat
from aoq.models.gpo import GPO
from aoq.models.vse_gpo import drop_regions
from aoq.training.steps import batch_scores

MODELS = ("vse", "vse_gpo", "vsrn", "scan", "bfan")
VOCAB, IMG_DIM, REGIONS = 40, 24, 7


def tiny(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, embed_dim=16, word_dim=12, caption_hidden=16,
                      caption_word_dim=8, **overrides)
    return build_model(cfg, VOCAB, IMG_DIM)


def captions(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, L) 0-padded token ids framed like real captions, and (n,) lengths >= 3."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 10, (n,), generator=g)
    tokens = torch.randint(4, VOCAB, (n, int(lengths.max())), generator=g)
    tokens[:, 0] = 1
    tokens[torch.arange(tokens.shape[1])[None] >= lengths[:, None]] = 0
    tokens[torch.arange(n), lengths - 1] = 2
    return tokens, lengths


def regions(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, REGIONS, IMG_DIM, generator=torch.Generator().manual_seed(seed))


def test_every_paper_model_is_registered() -> None:
    assert set(MODELS) <= set(available_models())


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_score_consistency(name: str) -> None:
    model = tiny(name).eval()
    tokens, lengths = captions(10)
    with torch.no_grad():
        images, caps = model(regions(6), tokens, lengths)
        scores = model.similarity(images, caps)
        paired = model.paired_similarity(images, caps[:6])
    assert images.shape[0] == 6 and caps.shape[0] == 10
    if model.has_global_embedding:
        assert images.shape == (6, 16) and caps.shape == (10, 16)
        torch.testing.assert_close(images.norm(dim=-1), torch.ones(6))
    else:  # per-region and per-word encodings, the words with a mask channel
        assert images.shape == (6, REGIONS, 16) and caps.shape == (10, int(lengths.max()), 17)
        assert torch.equal(caps[..., -1].sum(-1), lengths.float())
    assert scores.shape == (6, 10)
    torch.testing.assert_close(paired, scores.diagonal(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_aoq_loss_gradients_reach_every_parameter(name: str) -> None:
    """One AOQ step with the three blocks of a real batch: every trainable parameter gets
    a finite gradient, and all but a few get a non-zero one."""
    model = tiny(name).train()
    if name == "vsrn":
        # Each GCN layer starts as the identity (its BatchNorm scale is 0, as the authors
        # initialise it), which gates its other weights' gradients at step 0 only.
        for layer in model.gcn:
            torch.nn.init.constant_(layer.bn.weight, 0.5)
    b = 6
    tokens, lengths = captions(3 * b, seed=1)
    batch = Batch(regions=regions(3 * b, seed=1), tokens=tokens, lengths=lengths,
                  caption_ids=torch.arange(b), image_ids=torch.arange(b), n_blocks=3)
    scores, offline = batch_scores(model, batch)
    loss = AOQLoss("aoq", max_violation=False)(scores, offline)
    aux = model.auxiliary_loss()
    assert (aux is not None) == (name == "vsrn")
    (loss + (aux if aux is not None else 0)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [
        n for n, g in grads.items() if g is None]
    zero = [n for n, g in grads.items() if not g.abs().sum() > 0]
    # The padding row of an embedding never gets a gradient; nothing else may be dead.
    assert not zero, zero


def reference_attention(query: torch.Tensor, context: torch.Tensor, smooth: float
                        ) -> torch.Tensor:
    """The authors' attention for (n, Lq, d) queries over (n, Ls, d) contexts, real
    lengths only: (n, Lq, Ls) weights."""
    attn = F.leaky_relu(context @ query.transpose(1, 2), 0.1)  # (n, Ls, Lq)
    attn = attn / (attn.pow(2).sum(2, keepdim=True).sqrt() + 1e-8)
    return torch.softmax(attn.transpose(1, 2) * smooth, dim=2)


def reference_focal(attn: torch.Tensor, kind: str) -> torch.Tensor:
    n_source = attn.shape[-1]
    if kind == "equal":
        f = attn * n_source - attn.sum(-1, keepdim=True)
    else:
        f = (attn[..., :, None] * attn[..., None, :].sqrt()
             - (attn * attn.sqrt())[..., None, :]).sum(-1)
    keep = (f > 0).float()
    return attn * keep / (attn * keep).sum(-1, keepdim=True)


def reference_scores(images: torch.Tensor, caps: torch.Tensor, lengths: torch.Tensor,
                     how: str, smooth: float, aggregation: str = "mean",
                     lambda_lse: float = 6.0, focal: str = "") -> torch.Tensor:
    """Per caption, as the authors loop: SCAN t2i / i2t, or BFAN (both, focal)."""
    cols = []
    for c in range(caps.shape[0]):
        words = caps[c, :int(lengths[c]), :-1][None].expand(images.shape[0], -1, -1)
        parts = []
        for direction in ("t2i", "i2t") if how == "bfan" else (how,):
            query, context = (words, images) if direction == "t2i" else (images, words)
            attn = reference_attention(query, context, smooth)
            if focal:
                attn = reference_focal(attn, focal)
            cos = F.cosine_similarity(query, attn @ context, dim=2)
            if aggregation == "lse":
                parts.append(torch.log(torch.exp(cos * lambda_lse).sum(1)) / lambda_lse)
            else:
                parts.append(cos.mean(1))
        cols.append(sum(parts))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("direction,aggregation", [("t2i", "mean"), ("t2i", "lse"),
                                                   ("i2t", "mean"), ("i2t", "lse")])
def test_scan_matches_the_per_caption_algorithm(direction: str, aggregation: str) -> None:
    model = tiny("scan", scan_direction=direction, aggregation=aggregation).eval()
    tokens, lengths = captions(9, seed=2)
    with torch.no_grad():
        images, caps = model(regions(5, seed=2), tokens, lengths)
        ours = model.similarity(images, caps)
    smooth = 9.0 if direction == "t2i" else 4.0
    expected = reference_scores(images, caps, lengths, direction, smooth, aggregation)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("focal", ["equal", "prob"])
def test_bfan_matches_the_per_caption_algorithm(focal: str) -> None:
    model = tiny("bfan", focal_type=focal).eval()
    tokens, lengths = captions(9, seed=3)
    with torch.no_grad():
        images, caps = model(regions(5, seed=3), tokens, lengths)
        ours = model.similarity(images, caps)
    expected = reference_scores(images, caps, lengths, "bfan", 20.0, focal=focal)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_scores_ignore_padding_and_chunking(monkeypatch) -> None:
    """A caption scores the same padded to any width, and chunked scoring equals one block."""
    from aoq.models import cross_attention

    model = tiny("bfan", focal_type="prob").eval()
    tokens, lengths = captions(7, seed=4)
    with torch.no_grad():
        images, caps = model(regions(4, seed=4), tokens, lengths)
        whole = model.similarity(images, caps)
        wide = pad_cat([caps, torch.zeros(1, caps.shape[1] + 5, caps.shape[2])])[:7]
        torch.testing.assert_close(model.similarity(images, wide), whole, rtol=1e-6, atol=1e-6)
        monkeypatch.setattr(cross_attention, "CHUNK_ELEMENTS", 1)  # one caption per chunk
        torch.testing.assert_close(model.similarity(images, caps), whole, rtol=1e-6, atol=1e-6)


def test_focal_keeps_above_average_fragments_and_never_divides_by_zero() -> None:
    attn = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    out = focal_reattend(attn, None, "equal")
    torch.testing.assert_close(out[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(out[1], attn[1])  # nothing beats the rest: keep as is
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    masked = focal_reattend(torch.tensor([[0.6, 0.4, 0.0, 0.0]]), mask, "prob")
    torch.testing.assert_close(masked, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_pack_words_zeroes_padding() -> None:
    feats = torch.ones(2, 4, 3)
    packed = pack_words(feats, torch.tensor([4, 2]))
    assert packed.shape == (2, 4, 4)
    assert packed[1, 2:].abs().sum() == 0 and packed[1, :2, -1].tolist() == [1.0, 1.0]


def test_gpo_ignores_padding_and_can_pool_sets_of_any_size() -> None:
    torch.manual_seed(0)
    gpo = GPO(8, 8)
    x = torch.randn(3, 6, 5)
    lengths = torch.tensor([6, 4, 1])
    out = gpo(x, lengths)
    y = x.clone()
    y[1, 4:] = 100.0  # beyond sample 1's size
    y[2, 1:] = -100.0
    torch.testing.assert_close(gpo(y, lengths), out)
    # A set of one is that element, whatever the weights.
    torch.testing.assert_close(out[2], x[2, 0])
    weights, mask = gpo.weights(lengths, 6)
    torch.testing.assert_close(weights.sum(1).squeeze(-1), torch.ones(3))


def test_region_dropout_keeps_survivors_in_front() -> None:
    torch.manual_seed(1)
    x = torch.arange(2 * 10, dtype=torch.float32).view(2, 10, 1)
    moved, counts = drop_regions(x, 0.5)
    for i in range(2):
        kept = moved[i, :counts[i], 0]
        assert torch.all(kept[1:] > kept[:-1])  # order kept, survivors first
        assert set(kept.tolist()) <= set(x[i, :, 0].tolist())
    assert (counts >= 1).all()


def test_vsrn_captioner_learns_from_anchor_pairs_only_and_only_in_training() -> None:
    model = tiny("vsrn")
    tokens, lengths = captions(8, seed=5)
    feats = regions(8, seed=5)
    model.train()
    model(feats, tokens, lengths, pairs=3)
    anchors = model.auxiliary_loss()
    model(feats[:3], tokens[:3], lengths[:3])
    # Same pairs, same dropout draws would be needed for equality; compare without dropout.
    model.captioner.dropout.p = 0.0
    model(feats, tokens, lengths, pairs=3)
    a = model.auxiliary_loss()
    model(feats[:3], tokens[:3], lengths[:3])
    torch.testing.assert_close(a, model.auxiliary_loss())
    assert anchors is not None and anchors > 0
    model.eval()
    model(feats, tokens, lengths)
    assert model.auxiliary_loss() is None
    assert tiny("vsrn", caption_loss_weight=0.0).captioner is None


def test_cross_attention_models_cannot_mine_their_own_negatives(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="negatives.source=checkpoint"):
        load_config(None, ["model.name=scan", "loss.variant=aoq", "negatives.source=mine"])
    # Triplet needs no tables; a first-round checkpoint is the documented route.
    load_config(None, ["model.name=bfan", "loss.variant=triplet"])
    load_config(None, ["model.name=bfan", "loss.variant=aoq",
                       f"negatives.source=checkpoint:{tmp_path / 'vsrn.pt'}"])


def test_old_model_records_load_with_new_fields_defaulted(tmp_path: Path) -> None:
    """A best_model.pt written before the new model options existed still loads."""
    from aoq.models.files import load_model, model_record, save_file

    cfg = ModelConfig(name="vse", embed_dim=16, word_dim=12)
    model = build_model(cfg, VOCAB, IMG_DIM)
    record = model_record(cfg, model, vocab_size=VOCAB, img_dim=IMG_DIM, vocab_path="",
                          epoch=0, dev_rsum=0.0)
    for key in ("scan_direction", "focal_type", "gcn_layers", "region_dropout"):
        record["model_config"].pop(key)
    save_file(tmp_path / "old.pt", record)
    loaded, _ = load_model(tmp_path / "old.pt")
    assert count_parameters(loaded) == count_parameters(model)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_paper_size_parameter_counts_match_the_authors_code(capsys) -> None:
    """At 36 x 2048 regions, word dim 300 and the COCO vocabulary, each model has the
    parameter count of the authors' classes (benchmarks/authors_param_counts.py), except
    VSE-infinity's unused output BatchNorm, which we do not create."""
    import importlib.util

    from aoq.models.paper_sizes import AUTHORS, COCO_VOCAB, IMG_DIM, paper_config

    for name, ref in AUTHORS.items():
        model = build_model(paper_config(name), COCO_VOCAB, IMG_DIM)
        expected = ref.parameters - (2 * 1024 if name == "vse_gpo" else 0)
        assert count_parameters(model) == expected, name
        del model
    spec = importlib.util.spec_from_file_location(
        "params_job", Path(__file__).resolve().parents[1] / "jobs" / "params.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main([]) == 0
    out = capsys.readouterr().out
    assert "128,793,841" in out and "-2,048" in out and out.count("+0") == 4


def test_caption_augmentation_masks_swaps_and_deletes_words_only() -> None:
    from aoq.models.vse_gpo import augment_captions

    tokens, lengths = captions(400, seed=6)
    torch.manual_seed(0)
    out, new_lengths = augment_captions(tokens, lengths, 0.2, VOCAB)
    assert (new_lengths <= lengths).all() and (new_lengths >= 2).all()
    rows = torch.arange(400)
    assert (out[:, 0] == 1).all() and (out[rows, new_lengths - 1] == 2).all()
    assert (out[torch.arange(out.shape[1])[None] >= new_lengths[:, None]] == 0).all()
    n_words = int((lengths - 2).sum())
    deleted = int((lengths - new_lengths).sum())
    masked = int((out == 3).sum())
    # 20% of words hit: 8% deleted and 10% masked in expectation.
    assert 0.05 < deleted / n_words < 0.11 and 0.07 < masked / n_words < 0.13
    same, _ = augment_captions(tokens, lengths, 0.0, VOCAB)
    assert torch.equal(same, tokens)
