"""The typed configuration: one dataclass per concern, nested under :class:`Config`.

Every field carries its help text and its constraints in ``metadata`` so that the
loader, the validator, ``--help`` and the MLflow params are all derived from this
single file. Functions downstream receive the section they need (``cfg.loss``,
``cfg.optim`` ...), never the whole config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


def opt(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    path: bool | str = False,
    identifier: bool | str = False,
) -> Any:
    """A dataclass field with help text and constraints.

    ``min``/``max`` are inclusive bounds, ``gt`` an exclusive lower bound.
    ``path`` marks a string that names a local path or URI; the loader makes local
    paths absolute, because a submitted Ray job runs in a temporary copy of its
    working directory and relative paths would silently land there. A string names
    what the path must be before a job starts (``aoq.config.paths``): ``"file"`` (a
    local readable file, if set), ``"writable_dir"`` (a local directory the job can
    write, or can create) or ``"storage"`` (a writable directory, or a URI that
    ``aoq.storage`` checks itself).
    ``identifier`` marks a name that becomes a directory and a tracking-store key
    (run names, split names): it must follow :data:`aoq.config.names.NAME_RULE`;
    ``"optional"`` also allows the empty string (a default is chosen at run time).
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "gt": gt, "path": path,
            "identifier": identifier}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ScenesConfig:
    """Size and difficulty of the built-in synthetic ``scenes`` dataset."""

    seed: int = opt(0, "generator seed; the same seed always gives byte-identical files",
                    min=0, max=2**32 - 1)
    n_train: int = opt(4000, "training images (5 captions each)", min=50, max=2_000_000)
    n_dev: int = opt(500, "dev images", min=10, max=200_000)
    n_test: int = opt(1000, "test images; 1000 so that the 1K protocol applies", min=10,
                      max=200_000)
    n_regions: int = opt(36, "regions per image, as in bottom-up-attention features", min=4,
                         max=1024)
    feature_dim: int = opt(128, "region feature dimension (real data: 2048)", min=8,
                           max=16384)
    family_size: int = opt(
        4,
        "scenes per near-miss family: a base composition plus variants that change one "
        "attribute, object or relation",
        min=1, max=64,
    )
    heldout_fraction: float = opt(
        0.15, "fraction of (attribute, object) pairs never seen in training; every test "
        "scene contains one", min=0.0, max=0.5,
    )
    noise: float = opt(0.6, "std of the region-feature noise, relative to the signal", min=0.0,
                       max=100.0)


@dataclass
class EmojiConfig:
    """The built-in ``emoji`` dataset: OpenMoji artwork with Unicode/CLDR and community
    text, built from installed packages (README, "The built-in emoji dataset")."""

    seed: int = opt(0, "split seed; the same seed and package versions give identical files")
    n_dev: int = opt(500, "dev images", min=1)
    n_test: int = opt(1000, "test images; 1000 so that the 1K protocol applies", min=1)
    max_images: int = opt(
        0, "use only this many emoji (whole families, drawn by the seed); 0 = all of them",
        min=0)
    image_size: int = opt(72, "rendered width and height in pixels (a multiple of 24)", min=24)


#: Dataset names that are built in (generated under data.cache_dir), not directories.
BUILT_IN_DATASETS = ("scenes", "emoji")


@dataclass
class DataConfig:
    """Where the data comes from and how captions are turned into tokens."""

    dataset: str = opt(
        "scenes",
        "'scenes' (built in, synthetic), 'emoji' (built in from the OpenMoji and Unicode "
        "packages) or a directory in the precomp layout (<split>_ims.npy, <split>_caps.txt)",
        path=True,
    )
    cache_dir: str = opt(
        "~/.cache/aoq", "where generated datasets and caption caches live (must be writable)",
        path="writable_dir"
    )
    vocab: str = opt(
        "",
        "a vocabulary json in SCAN's layout; empty builds one from the training captions",
        path="file",
    )
    min_word_count: int = opt(4, "words seen fewer times in training map to <unk>", min=1)
    train_split: str = opt("train", "split used for training and mining", identifier=True)
    dev_split: str = opt("dev", "split evaluated every epoch", identifier=True)
    test_split: str = opt("test", "split evaluated once at the end (COCO 5K: testall)",
                          identifier=True)
    max_caption_bytes: int = opt(
        4096, "longest caption line accepted, in UTF-8 bytes (COCO's longest is a few "
        "hundred); a longer line is refused naming file and line", min=64, max=1 << 20)
    max_caption_tokens: int = opt(
        256, "most tokens a caption may have (COCO's and Flickr30K's longest have under "
        "100); a longer caption is refused naming file and line", min=4, max=65536)
    dev_max_images: int = opt(
        1000, "evaluate dev on its first N images (COCO dev has 5000); 0 = all", min=0
    )
    test_folds: int = opt(
        1, "1 = all test images at once; 5 = COCO 1K protocol (folds of 1000)", min=1,
        max=1000
    )
    captions_per_image: int = opt(5, "captions per image in the precomp layout", min=1,
                                  max=100)
    loader_workers: int = opt(0, "DataLoader worker processes per training worker", min=0,
                              max=64)
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    emoji: EmojiConfig = field(default_factory=EmojiConfig)


@dataclass
class ModelConfig:
    """Which model, and its sizes."""

    name: str = opt("vse", "model name in the registry (aoq.models.available_models())")
    embed_dim: int = opt(256, "joint embedding size (paper: 1024 or 2048)", min=8, max=16384)
    word_dim: int = opt(128, "word embedding size (paper: 300)", min=8, max=4096)
    img_dim: int = opt(0, "region feature size; 0 infers it from the data", min=0, max=16384)
    text_layers: int = opt(1, "GRU layers of the text encoder", min=1, max=8)
    bidirectional: bool = opt(
        False, "bidirectional GRU, outputs averaged (vse only: scan, bfan and vse_gpo use a "
        "BiGRU and vsrn a GRU, as their authors' released configurations)")
    image_pooling: str = opt(
        "max", "how region embeddings become one image embedding", choices=("mean", "max")
    )
    image_mlp: bool = opt(
        True, "add a 2-layer MLP residual on each projected region (as VSE-infinity)"
    )
    # SCAN and BFAN (cross attention; no global embedding)
    scan_direction: str = opt(
        "t2i", "scan: words attend over regions (t2i) or regions over words (i2t)",
        choices=("t2i", "i2t"))
    aggregation: str = opt(
        "mean", "scan: pool the per-query similarities by their mean or by LogSumExp",
        choices=("mean", "lse"))
    lambda_softmax: float = opt(
        0.0, "scan/bfan: inverse attention temperature; 0 = the authors' default (scan t2i "
        "9, scan i2t 4, bfan 20)", min=0.0)
    lambda_lse: float = opt(6.0, "scan: LogSumExp sharpness (aggregation=lse)", gt=0.0)
    focal_type: str = opt(
        "equal", "bfan: focal attention with equal or probability-weighted fragment "
        "confidence", choices=("equal", "prob"))
    # VSE-infinity (vse_gpo)
    gpo_pe_dim: int = opt(32, "vse_gpo: positional-encoding size inside GPO (even)", min=2,
                          max=1024)
    gpo_hidden: int = opt(32, "vse_gpo: GPO's BiGRU hidden size", min=1, max=4096)
    region_dropout: float = opt(
        0.2, "vse_gpo: probability of dropping each region in training (size "
        "augmentation)", min=0.0, max=0.9)
    word_dropout: float = opt(
        0.2, "vse_gpo: probability that a training caption's word is masked (50%), "
        "replaced (10%) or deleted (40%), VSE-infinity's caption augmentation", min=0.0,
        max=0.9)
    # VSRN
    gcn_layers: int = opt(4, "vsrn: region-relation reasoning layers", min=1, max=32)
    caption_loss_weight: float = opt(
        1.0, "vsrn: weight of the auxiliary caption-generation loss; 0 removes the "
        "captioner", min=0.0)
    caption_hidden: int = opt(512, "vsrn: captioner GRU size", min=8, max=8192)
    caption_word_dim: int = opt(300, "vsrn: captioner word embedding size", min=8, max=4096)
    caption_max_len: int = opt(60, "vsrn: longest caption (tokens) the captioner learns", min=3,
                               max=1024)


@dataclass
class LossConfig:
    """The AOQ loss family (docs/architecture.md, "The method")."""

    variant: str = opt(
        "aoq",
        "triplet (VSE++), offtri (+offline triplets), offquin (+quintuplets), aoq (+adaptive "
        "weights)",
        choices=("triplet", "offtri", "offquin", "aoq"),
    )
    margin_online: float = opt(0.2, "margin of the online (in-batch) terms", min=0.0)
    margin_offline: float = opt(0.0, "margin of the offline and quintuplet terms", min=0.0)
    alpha: float = opt(0.3, "adaptive-weight temperature (w = beta - diff/alpha)", gt=0.0)
    beta: float = opt(1.5, "adaptive-weight offset")
    max_violation: bool = opt(True, "online terms use the hardest in-batch negative only")
    max_violation_warmup_epochs: int = opt(
        1,
        "epochs that sum the online hinge over all in-batch negatives before max-violation "
        "starts (VSE-infinity's warm-up; from scratch, max-violation alone stalls for "
        "epochs); 0 = max-violation from the first step, as VSE++ and the AOQ code",
        min=0,
    )
    mask_same_image: bool = opt(
        False,
        "do not count in-batch captions of the anchor's own image as negatives (the "
        "authors count them)",
    )
    offline_triplet_weight: float = opt(
        1.0, "weight of the two offline triplet terms in the loss (1 = the paper's loss)",
        min=0.0)
    quintuplet_weight: float = opt(
        1.0, "weight of the two quintuplet terms in the loss (1 = the paper's loss)", min=0.0)


@dataclass
class NegativesConfig:
    """Offline hard negatives: where the candidate tables come from and how they are used."""

    source: str = opt(
        "mine",
        "mine (warm up with triplet, then mine from the current model), "
        "checkpoint:<path> (mine once from a first-round model), tables:<path>",
    )
    k_captions: int = opt(2000, "i2t table width: candidate captions per image", min=1)
    k_images: int = opt(400, "t2i table width: candidate images per caption", min=1)
    sampling_range: int = opt(
        300, "h: draw n ~ U{0..h-1}; caption negative i2t[n], image negative t2i[n // 5]",
        min=1,
    )
    range_min: int = opt(
        0, "skip the top-ranked candidates: draw n ~ U{range_min..h-1} (the closest "
        "matches are the likeliest false negatives; sentence-transformers' range_min)",
        min=0)
    score_filter: bool = opt(
        False, "when mining, drop every candidate that the mining model scores at or above "
        "its positive minus negatives.score_margin (a likely false negative)")
    score_margin: float = opt(
        0.0, "the score filter's margin: a candidate is kept only if it scores below the "
        "positive by more than this (unused while score_filter is off)", min=0.0)
    warmup_epochs: int = opt(1, "epochs of plain triplet before the first mining", min=0)
    refresh_every: int = opt(1, "re-mine every N epochs; 0 = never refresh", min=0)
    block_rows: int = opt(1024, "rows per block in the exact top-K search", min=1,
                          max=1 << 20)
    pool_actors: int = opt(
        2, "Ray actors that re-mine tables in parallel shards, in the background while "
        "training goes on; 0 = mine synchronously on rank 0", min=0, max=1024)
    pool_cpus: float = opt(
        0.0, "logical CPUs reserved per mining actor; 0 shares the training workers' "
        "cores (right on one small machine)", min=0.0)
    pool_gpus: float = opt(0.0, "GPUs per mining actor (fractions allowed)", min=0.0)
    pool_threads: int = opt(1, "torch threads inside each mining actor", min=1, max=1024)
    pool_shards: int = opt(0, "image shards per refresh; 0 = 2 per actor", min=0, max=65536)


@dataclass
class OptimConfig:
    """Optimisation schedule."""

    epochs: int = opt(10, "training epochs", min=1, max=100_000)
    batch_size: int = opt(
        128, "pairs per step over all workers (the global batch): each of the "
        "run.num_workers workers takes batch_size / num_workers, which must be a whole "
        "number, and every pair's in-batch negatives are all the others, so 1 or N workers "
        "train the same loss (with batch_scope=worker: pairs per worker)", min=2
    )
    batch_scope: str = opt(
        "global", "global: batch_size is the whole step's, split over the workers, with "
        "encodings gathered across them; worker: each worker takes its own batch of "
        "batch_size and sees only it as negatives (no gather; what a run means then "
        "depends on run.num_workers)", choices=("global", "worker"))
    lr: float = opt(5e-4, "Adam learning rate", gt=0.0)
    lr_decay_epochs: int = opt(7, "multiply the lr by lr_decay_gamma every N epochs", min=1)
    lr_decay_gamma: float = opt(0.1, "step decay factor", gt=0.0, max=1.0)
    grad_clip: float = opt(2.0, "max gradient norm; 0 disables clipping", min=0.0)
    weight_decay: float = opt(0.0, "Adam weight decay", min=0.0)


@dataclass
class RunConfig:
    """How and where the job runs."""

    name: str = opt("", "run name; empty = aoq-<model>-<variant>-<timestamp>; 1-128 of "
                    "A-Z a-z 0-9 . _ -, starting with a letter or digit",
                    identifier="optional")
    storage: str = opt(
        "./outputs",
        "where checkpoints, tables and outputs go: a path (local, or shared such as NFS on "
        "a multi-node cluster) or a pyarrow URI (s3://bucket/prefix, gs://bucket/prefix, "
        "file:///dir); with a URI each node works in <data.cache_dir>/runs/ and syncs",
        path="storage",
    )
    num_workers: int = opt(2, "Ray Train workers (DDP ranks)", min=1, max=4096)
    device: str = opt(
        "auto", "auto uses one GPU per worker when GPUs exist", choices=("auto", "cpu", "cuda")
    )
    cpus_per_worker: float = opt(1.0, "CPUs reserved per training worker", gt=0.0)
    seed: int = opt(0, "seed for model init, sampling and shuffling", min=0, max=2**32 - 1)
    max_failures: int = opt(0, "worker-group restarts from the last checkpoint", min=0,
                            max=1000)
    checkpoints_to_keep: int = opt(2, "epoch checkpoints kept", min=1, max=10_000)
    start_timeout_s: float = opt(
        60.0, "seconds Ray Train waits for the worker group to be placed before it tries "
        "again (an autoscaling cluster may need minutes to add a node)", gt=0.0, max=86400.0)
    start_retries: int = opt(
        10, "tries after the first to place a worker group that did not start within "
        "run.start_timeout_s; then the job fails instead of waiting forever", min=0,
        max=1000)
    resume: bool = opt(
        True, "continue a run with the same name and storage from its latest checkpoint"
    )


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    uri: str = opt(
        "", "MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db"
    )
    experiment: str = opt("aoq", "MLflow experiment name (1-500 characters)")
    tags: dict = opt({}, "extra run tags, e.g. tracking.tags.group=ablation; keys of letters, "
                     "digits and _ . - / (up to 250), values up to 5000 characters; aoq's own "
                     "tags (aoq.*, mlflow.*, dataset, model, ...) cannot be set")


@dataclass
class Config:
    """The whole job configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def iter_options(cfg: Config | None = None) -> Iterator[tuple[str, Any, str, dict]]:
    """Yield (dotted key, default, help, metadata) for every leaf option."""

    def walk(obj: Any, prefix: str):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", value, f.metadata.get("help", ""), dict(f.metadata)

    yield from walk(cfg or Config(), "")
