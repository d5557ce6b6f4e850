"""The paper's model sizes, and the parameter counts of the authors' implementations.

Sizes: 36 x 2048 bottom-up regions, 300-d word embeddings, the COCO precomp vocabulary
(11,353 words, SCAN's json), and the joint-embedding size each paper used (VSRN 2048,
the others 1024). ``AUTHORS`` holds the counts of the authors' own classes built at
those sizes by ``benchmarks/authors_param_counts.py`` (which imports their code from
local clones; see docs/models.md), with the repository and commit counted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from aoq.config import ModelConfig

COCO_VOCAB = 11353
IMG_DIM = 2048
WORD_DIM = 300


@dataclass(frozen=True)
class AuthorsCount:
    parameters: int
    source: str  # repository@commit: classes counted
    note: str = ""


#: model.name -> the config fields that set the paper's size.
PAPER_SIZES: dict[str, dict] = {
    "vse": {"embed_dim": 1024, "image_mlp": False},
    "vse_gpo": {"embed_dim": 1024},
    "vsrn": {"embed_dim": 2048},
    "scan": {"embed_dim": 1024},
    "bfan": {"embed_dim": 1024},
}

AUTHORS: dict[str, AuthorsCount] = {
    "vse": AuthorsCount(
        9_577_548, "fartashf/vsepp@abe382f: EncoderImagePrecomp + EncoderText"),
    "vse_gpo": AuthorsCount(
        15_253_900, "woodfrog/vse_infty@8600f89 (branch bigru): EncoderImageAggr + EncoderText",
        "includes a BatchNorm1d(1024) on the MLP's output layer that their forward never "
        "applies (2,048 parameters)"),
    "vsrn": AuthorsCount(
        128_793_841, "KunpengLi1994/VSRN@777ae74: EncoderImagePrecompAttn + EncoderText + "
        "S2VTAttModel (captioner, 14,417,061)"),
    "scan": AuthorsCount(
        13_651_020, "kuanghuei/SCAN@8063557: EncoderImagePrecomp + EncoderText (bi_gru)"),
    "bfan": AuthorsCount(
        13_651_020, "CrossmodalGroup/BFAN@c5c2d2a: EncoderImagePrecomp + EncoderText"),
}


def paper_config(name: str) -> ModelConfig:
    """``model`` config of ``name`` at the paper's size (word dim 300)."""
    return replace(ModelConfig(name=name, word_dim=WORD_DIM), **PAPER_SIZES[name])


__all__ = ["AUTHORS", "COCO_VOCAB", "IMG_DIM", "PAPER_SIZES", "WORD_DIM", "AuthorsCount",
           "paper_config"]
