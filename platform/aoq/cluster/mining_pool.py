"""A pool of Ray actors that recomputes the offline candidate tables in parallel shards.

Phase 1: every actor embeds shards of the training split with a weights snapshot that
is put in the object store once. Phase 2: every actor computes the exact top-K rows of
shards against all embeddings (also shared through the object store, read zero-copy).
The coordinator assembles the rows and publishes a new table version atomically.

Faults: actors are created with ``max_restarts`` and their calls with
``max_task_retries`` (application errors included), so a killed actor is restarted by
Ray and its in-flight shard is retried on it: the pool never shrinks (unlike
``ray.util.ActorPool``, which drops a dead actor). The same pool also scores evaluation
splits in row shards (:meth:`MiningPool.score_split`). A shard that still fails after
the retries fails the whole refresh; the caller keeps training on the tables it has.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from aoq.config import ModelConfig, section_from_dict
from aoq.data.prepare import PreparedData, open_split
from aoq.evaluation.scoring import allocate_scores, plan_score_shards, score_rows
from aoq.models import build_model
from aoq.models.encode import encode_range
from aoq.negatives.shards import mine_shard
from aoq.search import Shard, plan_shards

log = logging.getLogger("aoq.mining")

PROGRESS_SECONDS = 5.0  # at most one progress line per phase this often (plus the last)


@dataclass(frozen=True)
class PoolSpec:
    """Size and resources of the pool.

    Attributes:
        actors: number of actors M.
        cpus: logical CPUs reserved per actor (fractional allowed; 0 shares the cores of
            the training workers, which is right on a single small machine).
        gpus: GPUs per actor (fractional allowed).
        threads: torch threads inside each actor.
        shards: image shards per refresh (0 = 2 per actor, so a slow actor is caught up).
        embed_batch: images per forward pass in phase 1; shard boundaries are multiples
            of it, so the tables equal single-process mining with the same batch.
        max_restarts: restarts of a dead actor; max_task_retries: retries of its call.
    """

    actors: int = 2
    cpus: float = 0.0
    gpus: float = 0.0
    threads: int = 1
    shards: int = 0
    embed_batch: int = 256
    max_restarts: int = 3
    max_task_retries: int = 3


@functools.cache
def _libc_malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def give_back_memory() -> None:
    """Return the heap pages freed by a finished call to the OS.

    glibc keeps freed memory for reuse, so after a shard an actor would hold its peak
    (the embeddings, the search's tiles and candidates, the table rows: ~200 MiB at the
    default size) through the rest of the epoch, while it waits for the next refresh.
    """
    gc.collect()
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


class MiningWorker:
    """The actor body: holds the training split (memory-mapped) and a model skeleton.

    Every call gives its freed memory back before it returns (:func:`give_back_memory`):
    the actors are idle most of an epoch.
    """

    def __init__(self, prepared: PreparedData, split: str, model_cfg: dict[str, Any],
                 threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.prepared = prepared
        self.split = open_split(prepared, split)
        self.splits = {split: self.split}
        cfg = section_from_dict(ModelConfig, model_cfg, prefix="model.")
        self.model = build_model(cfg, prepared.vocab_size, prepared.feature_dim)
        self.model.eval()
        self.version = -1
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The Ray node id this actor runs on (where a shard's work actually happens)."""
        return ray.get_runtime_context().get_node_id()

    def _load(self, version: int, weights: dict[str, Any]) -> None:
        if version != self.version:  # a restarted actor reloads from the object store
            self.model.load_state_dict(weights)
            self.version = version

    def embed(self, version: int, weights: dict[str, Any], shard: Shard, batch_size: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """(images, cpi*images) float32 embeddings of one shard, in batches of
        ``batch_size`` images on the split's grid (see :func:`encode_range`): only one
        batch of a COCO shard's region features is ever resident."""
        self._load(version, weights)
        images, captions = encode_range(self.model, self.split, shard.start, shard.stop,
                                        batch_size=batch_size)
        out = images.float().cpu().numpy(), captions.float().cpu().numpy()
        del images, captions
        give_back_memory()
        return out

    def score_rows(self, version: Any, weights: dict[str, Any], split: str, shard: Shard,
                   n_images: int, batch_size: int) -> np.ndarray:
        """(shard images, cpi * n_images) scores of one row shard of ``split`` (see
        :func:`aoq.evaluation.scoring.score_rows`)."""
        self._load(version, weights)
        if split not in self.splits:
            self.splits[split] = open_split(self.prepared, split)
        rows = score_rows(self.model, self.splits[split], shard.start, shard.stop,
                          n_images=n_images, batch_size=batch_size)
        give_back_memory()
        return rows

    def topk(self, shard: Shard, image_emb: np.ndarray, caption_emb: np.ndarray,
             k_captions: int, k_images: int, score_margin: float | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        tables = mine_shard(shard, image_emb, caption_emb, k_captions, k_images,
                            self.split.captions_per_image, device=self.device,
                            score_margin=score_margin)
        give_back_memory()
        return tables


class MiningPool:
    """M restartable actors plus a coordinator that runs one refresh at a time."""

    def __init__(self, spec: PoolSpec, prepared: PreparedData, split: str,
                 model_cfg: dict[str, Any], name: str = "",
                 worker: type[MiningWorker] | None = None) -> None:
        """Start ``spec.actors`` actors of ``worker`` (default :class:`MiningWorker`);
        with ``name``, actor i is named ``f"{name}-{i}"`` (visible in the Ray dashboard,
        and reachable with ``ray.get_actor``)."""
        self.spec = spec
        self.n_images = prepared.splits[split].n_images
        self.captions_per_image = prepared.captions_per_image
        self._scorings = 0
        options: dict[str, Any] = dict(num_cpus=spec.cpus, num_gpus=spec.gpus,
                                       max_restarts=spec.max_restarts,
                                       max_task_retries=spec.max_task_retries)
        remote = ray.remote(worker or MiningWorker)
        self.actors = [
            remote.options(**options, **({"name": f"{name}-{i}"} if name else {})).remote(
                prepared, split, model_cfg, spec.threads)
            for i in range(spec.actors)
        ]

    def _retrying(self, method: Any) -> Any:
        """The actor method with retries of application errors too (a transient CUDA or
        memory error inside a shard), not only of the actor's death."""
        return method.options(retry_exceptions=True,
                              max_task_retries=self.spec.max_task_retries)

    def __len__(self) -> int:
        return len(self.actors)

    def _run_phase(self, name: str, shards: Sequence[Shard],
                   call: Callable[[Any, Shard], Any],
                   sink: Callable[[Shard, Any], None] | None = None) -> dict[int, Any]:
        """Run ``call(actor, shard)`` for every shard, each actor taking the next shard
        as soon as it is free; log progress. A failure after Ray's retries raises.

        Results are returned by shard index, or handed to ``sink(shard, result)`` as
        they arrive (and not kept) when a sink is given."""
        pending = list(shards)
        running: dict[Any, tuple[int, Shard]] = {}
        results: dict[int, Any] = {}
        start = time.perf_counter()
        last_log = 0.0
        free = list(range(len(self.actors)))
        while pending or running:
            while pending and free:
                slot = free.pop()
                shard = pending.pop(0)
                running[call(self.actors[slot], shard)] = (slot, shard)
            done, _ = ray.wait(list(running), num_returns=1)
            slot, shard = running.pop(done[0])
            value = ray.get(done[0])
            if sink is None:
                results[shard.index] = value
            else:
                sink(shard, value)
                results[shard.index] = None
            free.append(slot)
            elapsed = time.perf_counter() - start
            if len(results) == len(shards) or elapsed - last_log >= PROGRESS_SECONDS:
                last_log = elapsed
                log.info(f"pool {name}: shard {len(results)}/{len(shards)} "
                         f"({len(results) / elapsed:.2f} shards/s, {elapsed:.1f}s)")
        return results

    def mine(self, weights: dict[str, Any], version: int, k_captions: int, k_images: int,
             score_margin: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact (i2t, t2i) for the training split under ``weights`` (score-filtered
        when ``score_margin`` is given: :mod:`aoq.negatives.filters`)."""
        shards = plan_shards(self.n_images, self.spec.shards or 2 * len(self.actors),
                             align=self.spec.embed_batch)
        weights_ref = ray.put({k: v.detach().cpu() for k, v in weights.items()})
        embedded = self._run_phase(
            "mining embed", shards, lambda actor, shard: self._retrying(actor.embed).remote(
                version, weights_ref, shard, self.spec.embed_batch))
        image_emb = np.concatenate([embedded[s.index][0] for s in shards])
        caption_emb = np.concatenate([embedded[s.index][1] for s in shards])
        images_ref, captions_ref = ray.put(image_emb), ray.put(caption_emb)
        rows = self._run_phase(
            "mining top-K", shards, lambda actor, shard: self._retrying(actor.topk).remote(
                shard, images_ref, captions_ref, k_captions, k_images, score_margin))
        i2t = np.concatenate([rows[s.index][0] for s in shards])
        t2i = np.concatenate([rows[s.index][1] for s in shards])
        return i2t, t2i

    def score_split(self, weights: dict[str, Any], split: str, n_images: int, *,
                    shard_images: int, out_path: str | None = None) -> np.ndarray:
        """The (n_images, cpi * n_images) score matrix of ``split``'s first ``n_images``
        images under ``weights``, one row shard per actor call, rows streamed into RAM or
        into the memory-mapped ``out_path`` as shards finish."""
        self._scorings += 1
        version = f"scoring-{self._scorings}"  # never equal to a mining version
        shards = plan_score_shards(n_images, shard_images, self.spec.embed_batch)
        out = allocate_scores((n_images, self.captions_per_image * n_images), out_path)
        weights_ref = ray.put({k: v.detach().cpu() for k, v in weights.items()})

        def sink(shard: Shard, rows: np.ndarray) -> None:
            out[shard.start:shard.stop] = rows

        self._run_phase(f"scoring {split}", shards,
                        lambda actor, shard: self._retrying(actor.score_rows).remote(
                            version, weights_ref, split, shard, n_images,
                            self.spec.embed_batch), sink=sink)
        if isinstance(out, np.memmap):
            out.flush()
        return out

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
