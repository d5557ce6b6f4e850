"""Count the parameters of the authors' own model classes at the paper's sizes.

    git clone https://github.com/kuanghuei/SCAN            $DIR/SCAN
    git clone https://github.com/CrossmodalGroup/BFAN      $DIR/BFAN
    git clone -b bigru https://github.com/woodfrog/vse_infty $DIR/vse_infty
    git clone https://github.com/KunpengLi1994/VSRN        $DIR/VSRN
    git clone https://github.com/fartashf/vsepp            $DIR/vsepp
    python benchmarks/authors_param_counts.py --repos $DIR

Their training scripts target Python 2 / PyTorch 0.4 and import packages we do not
ship, so only the model classes (and the helpers they call) are taken from each file,
with ``ast``, and instantiated exactly as their training code does at the paper's
sizes. Nothing of theirs is copied into this repository; the printed counts are what
``aoq.models.paper_sizes.AUTHORS`` records and ``jobs/params.py`` compares against.
"""

from __future__ import annotations

import argparse
import ast
import math
import random
import subprocess
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from aoq.models.paper_sizes import COCO_VOCAB, IMG_DIM, WORD_DIM


def load_names(path: Path, names: set[str], namespace: dict) -> dict:
    """Execute only the top-level classes/functions called ``names`` of a source file."""
    tree = ast.parse(path.read_text())
    picked = [node for node in tree.body
              if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in names]
    missing = names - {node.name for node in picked}
    if missing:
        raise SystemExit(f"{path}: no top-level {sorted(missing)}")
    exec(compile(ast.Module(body=picked, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def fresh_namespace() -> dict:
    from torch.nn.utils import weight_norm

    return dict(torch=torch, nn=nn, F=F, np=np, math=math, random=random,
                OrderedDict=OrderedDict, pack_padded_sequence=pack_padded_sequence,
                pad_packed_sequence=pad_packed_sequence, weight_norm=weight_norm)


def n_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def commit(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--repos", type=Path, required=True, help="directory of the clones")
    parser.add_argument("--vocab-size", type=int, default=COCO_VOCAB)
    args = parser.parse_args()
    vocab, repos = args.vocab_size, args.repos
    # Their PyTorch 0.4 initialisers; the values do not matter for counting.
    nn.init.constant = nn.init.constant_  # type: ignore[attr-defined]

    counts = {}
    ns = load_names(repos / "vsepp/model.py", {"EncoderImagePrecomp", "EncoderText", "l2norm"},
                    fresh_namespace())
    counts["vse"] = ("vsepp", n_params(ns["EncoderImagePrecomp"](IMG_DIM, 1024),
                                       ns["EncoderText"](vocab, WORD_DIM, 1024, 1)))
    for name, repo in (("scan", "SCAN"), ("bfan", "BFAN")):
        ns = load_names(repos / repo / "model.py",
                        {"EncoderImagePrecomp", "EncoderText", "l2norm"}, fresh_namespace())
        text_kwargs = {"use_bi_gru": True} if name == "scan" else {}  # BFAN: always BiGRU
        counts[name] = (repo, n_params(ns["EncoderImagePrecomp"](IMG_DIM, 1024),
                                       ns["EncoderText"](vocab, WORD_DIM, 1024, 1,
                                                         **text_kwargs)))
    vi = repos / "vse_infty/lib"
    ns = fresh_namespace()
    load_names(vi / "modules/mlp.py", {"MLP"}, ns)
    load_names(vi / "modules/aggr/gpo.py", {"GPO", "positional_encoding_1d"}, ns)
    load_names(vi / "encoders.py", {"EncoderImageAggr", "EncoderText", "l2norm"}, ns)
    counts["vse_gpo"] = ("vse_infty", n_params(
        ns["EncoderImageAggr"](IMG_DIM, 1024, precomp_enc_type="basic"),
        ns["EncoderText"](vocab, 1024, WORD_DIM, 1, use_bi_gru=True)))
    vs = repos / "VSRN"
    ns = fresh_namespace()
    load_names(vs / "GCN_lib/Rs_GCN.py", {"Rs_GCN"}, ns)
    load_names(vs / "model.py", {"EncoderImagePrecompAttn", "EncoderText", "l2norm"}, ns)
    for module, cls in (("Attention", "Attention"), ("EncoderRNN", "EncoderRNN"),
                        ("DecoderRNN", "DecoderRNN"), ("S2VTAttModel", "S2VTAttModel")):
        load_names(vs / f"models/{module}.py", {cls}, ns)
    # As VSRN's model.py builds them from train.py's defaults: dim_vid = embed 2048,
    # dim_hidden 512, dim_word 300, max_len 60, GRU cells, dropout 0.2 / 0.5.
    captioner = ns["S2VTAttModel"](
        ns["EncoderRNN"](2048, 512, bidirectional=0, input_dropout_p=0.2, rnn_cell="gru",
                         rnn_dropout_p=0.5),
        ns["DecoderRNN"](vocab, 60, 512, 300, input_dropout_p=0.2, rnn_cell="gru",
                         rnn_dropout_p=0.5, bidirectional=0))
    counts["vsrn"] = ("VSRN", n_params(ns["EncoderImagePrecompAttn"](IMG_DIM, 2048, "coco_precomp"),
                                       ns["EncoderText"](vocab, WORD_DIM, 2048, 1), captioner))
    print(f"vocabulary {vocab}, regions 36 x {IMG_DIM}, word dim {WORD_DIM}")
    for name, (repo, count) in counts.items():
        print(f"{name:<8} {count:>13,}  {repo}@{commit(repos / repo)}")


if __name__ == "__main__":
    main()
