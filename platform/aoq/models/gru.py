"""A unidirectional GRU over packed captions, for CPU training.

On CPU, torch's GRU is slow in both of the ways a caption encoder can call it:

- **packed** (``pack_padded_sequence``): ATen slices the precomputed input projections
  step by step, and the backward of each slice writes into a zero-filled copy of the
  whole (tokens, 3H) tensor: T full-size fills and adds per batch of captions;
- **padded** (all captions run to the longest): every padding position costs the
  products of a real token. Even in length-sorted buckets of 64 captions, each cut to
  its longest, one token position in five was padding in a 128-caption batch of
  ``scenes``.

Here the recurrence runs over the packed layout itself (time-major, the captions sorted
longest first, so the ones still running at step t are a prefix of the rows), with a
hand-written backward. Nothing is padded and nothing is filled per step, and the
products that do not carry state from step to step run once for all tokens: the input
projections forward, and the input and weight gradients backward. Each step is left
with one (b_t, H) x (H, 3H) product and a few elementwise operations, forward and
backward.

Same equations, gate order and parameters as :class:`torch.nn.GRU` (r, z, n)::

    r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)
    z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
    n = tanh(x W_in + b_in + r * (h W_hn + b_hn))
    h' = (1 - z) * n + z * h
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


def recur(gi: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor, batch_sizes: list[int],
          keep: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The forward recurrence (arguments as :class:`PackedGRURecurrence`).

    Returns:
        (T_total, H) states and, if ``keep``, what the backward needs per token: the
        hidden projections (T_total, 3H), the r and z gates (T_total, 2H), the
        candidate n (T_total, H) and the state each step started from (T_total, H).
    """
    hidden = w_hh.shape[1]
    tokens = gi.shape[0]
    out = gi.new_empty(tokens, hidden)
    saved = tuple(gi.new_empty(tokens, width * hidden) for width in (3, 2, 1, 1)) if keep else ()
    w_t = w_hh.t()
    start = 0
    h = gi.new_zeros(batch_sizes[0], hidden)
    for size in batch_sizes:
        rows = slice(start, start + size)
        hp = h[:size]
        if keep:
            gh, rz, cand, h_prev = (buffer[rows] for buffer in saved)
            h_prev.copy_(hp)
            torch.addmm(b_hh, hp, w_t, out=gh)
        else:
            gh = torch.addmm(b_hh, hp, w_t)
            rz = cand = None
        g = gi[rows]
        rz = torch.sigmoid(g[:, :2 * hidden] + gh[:, :2 * hidden], out=rz)
        r, z = rz[:, :hidden], rz[:, hidden:]
        n = torch.tanh(torch.addcmul(g[:, 2 * hidden:], r, gh[:, 2 * hidden:]), out=cand)
        h = torch.addcmul(n, z, hp - n, out=out[rows])
        start += size
    return out, saved


class PackedGRURecurrence(torch.autograd.Function):
    """The recurrence of one GRU layer over packed input projections.

    Args (of :meth:`apply`):
        gi: (T_total, 3H) input projections ``x W_ih^T + b_ih``, time-major packed: the
            rows of step t are the ``batch_sizes[t]`` sequences still running, longest
            first.
        w_hh: (3H, H) hidden-to-hidden weights, gates r, z, n.
        b_hh: (3H,) hidden-to-hidden bias.
        batch_sizes: sequences running at each step, non-increasing.

    Returns:
        (T_total, H) hidden states in the same packed layout. The initial state is zero.
    """

    @staticmethod
    def forward(ctx, gi: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
                batch_sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        out, saved = recur(gi, w_hh, b_hh, batch_sizes, keep=True)
        ctx.save_for_backward(w_hh, *saved)
        ctx.batch_sizes = batch_sizes
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):  # type: ignore[override]
        w_hh, gh, rz, cand, h_prev = ctx.saved_tensors
        batch_sizes: list[int] = ctx.batch_sizes
        hidden = w_hh.shape[1]
        tokens = d_out.shape[0]
        # The pre-activations' gradients: r's and z's are the same for their input and
        # hidden parts; n's hidden part is its input part times r, so it is kept apart.
        d_gi = d_out.new_empty(tokens, 3 * hidden)
        d_gh_n = d_out.new_empty(tokens, hidden)
        w_rz, w_n = w_hh[:2 * hidden], w_hh[2 * hidden:]
        ends = [0]
        for size in batch_sizes:
            ends.append(ends[-1] + size)
        carried: torch.Tensor | None = None  # dL/dh from the step after, (b_{t+1}, H)
        for t in range(len(batch_sizes) - 1, -1, -1):
            rows = slice(ends[t], ends[t + 1])
            dh = d_out[rows]
            if carried is not None:
                dh = dh.clone()
                dh[:carried.shape[0]] += carried
            r, z = rz[rows, :hidden], rz[rows, hidden:]
            n, hp = cand[rows], h_prev[rows]
            d_rz, d_n = d_gi[rows, :2 * hidden], d_gi[rows, 2 * hidden:]
            # n = tanh(a_n), weighted by (1 - z) in h'.
            torch.ops.aten.tanh_backward.grad_input(dh - dh * z, n, grad_input=d_n)
            torch.mul(d_n, r, out=d_gh_n[rows])
            torch.mul(d_n, gh[rows, 2 * hidden:], out=d_rz[:, :hidden])
            torch.mul(dh, hp - n, out=d_rz[:, hidden:])
            torch.ops.aten.sigmoid_backward.grad_input(d_rz, rz[rows], grad_input=d_rz)
            carried = torch.addmm(torch.addmm(dh * z, d_rz, w_rz), d_gh_n[rows], w_n)
        d_w_hh = torch.cat((d_gi[:, :2 * hidden].t() @ h_prev, d_gh_n.t() @ h_prev))
        d_b_hh = torch.cat((d_gi[:, :2 * hidden].sum(0), d_gh_n.sum(0)))
        return d_gi, d_w_hh, d_b_hh, None


def packed_gru(rnn: nn.GRU, x: torch.Tensor, batch_sizes: list[int]) -> torch.Tensor:
    """Run a unidirectional ``rnn``'s layers over packed inputs.

    Args:
        x: (T_total, W) inputs, time-major packed (see :class:`PackedGRURecurrence`).
        batch_sizes: sequences running at each step, non-increasing.

    Returns:
        (T_total, H) the last layer's states, same layout.
    """
    if rnn.bidirectional or rnn.proj_size or (rnn.dropout and rnn.num_layers > 1):
        raise ValueError("packed_gru runs unidirectional GRUs without projections or "
                         "dropout between layers")
    for layer in range(rnn.num_layers):
        w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
        if rnn.bias:
            b_ih, b_hh = getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")
            gi = torch.addmm(b_ih, x, w_ih.t())
        else:
            gi, b_hh = x @ w_ih.t(), w_hh.new_zeros(w_hh.shape[0])
        if torch.is_grad_enabled() and (gi.requires_grad or w_hh.requires_grad):
            x = PackedGRURecurrence.apply(gi, w_hh, b_hh, batch_sizes)
        else:  # evaluation: nothing to keep for a backward
            x = recur(gi, w_hh, b_hh, batch_sizes, keep=False)[0]
    return x


def gru_last_states(rnn: nn.GRU, embed: nn.Embedding, tokens: torch.Tensor,
                    lengths: torch.Tensor) -> torch.Tensor:
    """Each caption's last-layer state at its last real token.

    Args:
        tokens: (B, L) token ids, padded after each caption's end.
        lengths: (B,) real lengths, at least 1.

    Returns:
        (B, H) states, in the captions' order.
    """
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order].cpu()  # packing wants them on the CPU
    # Pack the ids, not the embeddings: the embedding then reads exactly the real tokens
    # and its backward has nothing to unpack.
    packed = pack_padded_sequence(tokens[order], sorted_lengths, batch_first=True)
    states = packed_gru(rnn, embed(packed.data), packed.batch_sizes.tolist())
    starts = torch.cumsum(packed.batch_sizes, 0) - packed.batch_sizes
    # The sorted caption i's last step is t = length - 1, at row starts[t] + i.
    last = starts[sorted_lengths - 1].to(tokens.device) + torch.arange(
        len(order), device=tokens.device)
    return states[last][torch.argsort(order)]


__all__ = ["PackedGRURecurrence", "gru_last_states", "packed_gru"]
