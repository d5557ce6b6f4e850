"""Small building blocks shared by several models."""

from __future__ import annotations

import math

from torch import nn


def region_projection(img_dim: int, embed_dim: int) -> nn.Linear:
    """The linear map of region features into the joint space, Xavier-uniform initialised
    with zero bias, as VSE++, SCAN, BFAN, VSRN and VSE-infinity all do: it keeps the
    initial cosine scores spread out instead of collapsed near zero."""
    fc = nn.Linear(img_dim, embed_dim)
    bound = math.sqrt(6.0) / math.sqrt(img_dim + embed_dim)
    nn.init.uniform_(fc.weight, -bound, bound)
    nn.init.zeros_(fc.bias)
    return fc


__all__ = ["region_projection"]
