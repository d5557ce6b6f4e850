"""VSRN's captioner matches the authors' loss: it counts the <pad> after <end>, and its
output layer starts xavier-normal."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from aoq.models.vsrn import CaptionGenerator


def reference_nll(gen: CaptionGenerator, regions: torch.Tensor, caption: list[int]) -> float:
    """Teacher-forced NLL of one caption, step by step: every word after <start>, then
    <end>, then one <pad> (id 0), as the authors' loss counts it."""
    memory, state = gen.encoder(gen.project(regions[None]))
    hidden = gen.attn_hidden.weight.shape[0]
    targets = caption[1:] + [0]
    total = 0.0
    for t, target in enumerate(targets):
        scores = gen.attn_score(torch.tanh(gen.attn_hidden(torch.cat(
            [memory, state[0][:, None].expand_as(memory)], dim=-1))))
        context = (torch.softmax(scores, dim=1) * memory).sum(dim=1)
        step = torch.cat([gen.embed(torch.tensor([caption[t] if t < len(caption) else 0])),
                          context], dim=-1)[:, None]
        out, state = gen.decoder(step, state)
        total -= float(F.log_softmax(gen.out(out[:, 0]), dim=-1)[0, target])
    assert hidden == memory.shape[-1]
    return total


def test_caption_loss_counts_one_padding_position_after_end() -> None:
    torch.manual_seed(0)
    gen = CaptionGenerator(vocab_size=12, region_dim=8, hidden=6, word_dim=5, max_len=20).eval()
    regions = torch.randn(2, 4, 8)
    captions = [[1, 5, 7, 9, 2], [1, 4, 2]]  # <start> ... <end>
    tokens = torch.zeros(2, 5, dtype=torch.long)
    for i, c in enumerate(captions):
        tokens[i, :len(c)] = torch.tensor(c)
    lengths = torch.tensor([len(c) for c in captions])
    with torch.no_grad():
        loss = float(gen(regions, tokens, lengths))
        want = sum(reference_nll(gen, regions[i], c) for i, c in enumerate(captions)) / 2
    assert math.isclose(loss, want, rel_tol=1e-5)


def test_output_layer_starts_xavier_normal() -> None:
    torch.manual_seed(0)
    gen = CaptionGenerator(vocab_size=4000, region_dim=8, hidden=512, word_dim=5, max_len=20)
    weight = gen.out.weight.detach()
    std = math.sqrt(2.0 / (512 + 4000))  # xavier-normal; nn.Linear's default is uniform
    assert abs(float(weight.std()) - std) / std < 0.02
    kurtosis = float(((weight / weight.std()) ** 4).mean())
    assert abs(kurtosis - 3.0) < 0.1  # normal (3), not uniform (1.8)
