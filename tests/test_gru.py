"""The packed GRU recurrence that encodes captions on CPU (aoq.models.gru) computes what
torch's own GRU computes: the same states and the same gradients, for any mix of
lengths, with nothing depending on the padding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from aoq.models.gru import PackedGRURecurrence, gru_last_states
from aoq.models.vse import GRUTextEncoder


def padded_tokens(lengths: list[int], vocab: int, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, longest) ids, 0 after each caption's end, and the (B,) lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)
    tokens = torch.randint(1, vocab, (len(lengths), max(lengths)), generator=g)
    tokens[torch.arange(tokens.shape[1])[None] >= lengths_t[:, None]] = 0
    return tokens, lengths_t


def torch_reference(rnn: nn.GRU, embed: nn.Embedding, tokens: torch.Tensor,
                    lengths: torch.Tensor) -> torch.Tensor:
    """torch's packed GRU: each caption's last-layer state at its own end."""
    packed = pack_padded_sequence(embed(tokens), lengths, batch_first=True,
                                  enforce_sorted=False)
    return rnn(packed)[1][-1]


@pytest.mark.parametrize(("layers", "bias"), [(1, True), (2, True), (1, False)])
def test_states_and_gradients_match_torch_gru(layers: int, bias: bool) -> None:
    torch.manual_seed(0)
    rnn = nn.GRU(6, 5, num_layers=layers, bias=bias, batch_first=True).double()
    embed = nn.Embedding(30, 6, padding_idx=0).double()
    # Unsorted, with ties, with one-token captions, the longest not first.
    tokens, lengths = padded_tokens([3, 1, 7, 7, 2, 5, 1, 4, 6], vocab=30)
    weights = torch.randn(len(lengths), 5, dtype=torch.float64)

    def grads(encode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rnn.zero_grad()
        embed.zero_grad()
        states = encode(rnn, embed, tokens, lengths)
        (states * weights).sum().backward()
        named = [*rnn.named_parameters(), ("embedding", embed.weight)]
        return states.detach(), {name: p.grad.clone() for name, p in named}

    ours, our_grads = grads(gru_last_states)
    ref, ref_grads = grads(torch_reference)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    assert our_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], rtol=0, atol=1e-12,
                                   msg=name)
    with torch.no_grad():  # evaluation keeps nothing for a backward, same states
        assert torch.equal(gru_last_states(rnn, embed, tokens, lengths), ours)


def test_recurrence_passes_gradcheck_with_shrinking_batches() -> None:
    torch.manual_seed(1)
    hidden, batch_sizes = 3, [4, 4, 3, 1, 1]
    gi = torch.randn(sum(batch_sizes), 3 * hidden, dtype=torch.float64, requires_grad=True)
    w_hh = torch.randn(3 * hidden, hidden, dtype=torch.float64, requires_grad=True)
    b_hh = torch.randn(3 * hidden, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *args: PackedGRURecurrence.apply(*args, batch_sizes), (gi, w_hh, b_hh))


def test_text_encoder_ignores_padding_and_matches_torch_in_float32() -> None:
    torch.manual_seed(2)
    encoder = GRUTextEncoder(50, 16, 32, layers=1, bidirectional=False)
    tokens, lengths = padded_tokens([9, 4, 12, 1, 12, 7, 3], vocab=50, seed=3)
    # The same captions, five columns longer, with words where the padding was.
    longer = torch.randint(1, 50, (len(lengths), tokens.shape[1] + 5))
    real = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    longer[:, :tokens.shape[1]][real] = tokens[real]
    states = encoder(tokens, lengths)
    assert torch.equal(encoder(longer, lengths), states)
    ref = torch_reference(encoder.rnn, encoder.embed, tokens, lengths)
    torch.testing.assert_close(states, ref / ref.norm(dim=-1, keepdim=True),
                               rtol=1e-5, atol=1e-6)


def test_layer_dropout_is_refused() -> None:
    rnn = nn.GRU(4, 4, num_layers=2, dropout=0.1)
    with pytest.raises(ValueError, match="dropout"):
        gru_last_states(rnn, nn.Embedding(5, 4), *padded_tokens([2, 1], vocab=5))
