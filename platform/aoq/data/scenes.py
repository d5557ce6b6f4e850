"""The built-in ``scenes`` dataset: compositional scenes rendered as region features.

Why it exists: the real loaders and the method must run on any machine without a 33 GB
download, and the data must make AOQ's point. A scene is 2-3 objects, each an
(object, colour, size) at a position, on a background. Its five captions name the
objects with their attributes and the spatial relation between two of them, in varied
templates and synonyms.

How it makes the point:

* **Near misses exist across the training set, rarely in one batch.** Scenes come in
  families: a base scene and variants that change exactly one thing (one object's
  colour, the two colours swapped, the positions swapped so the relation flips, one
  object replaced, the background). A variant's captions differ from the base's by a
  word or two: a hard negative. With families of 4 among thousands of images, a random
  batch of 128 holds a family member of a given anchor only a few percent of the time,
  but the whole set always does: that is what offline mining finds and online mining
  misses.
* **Binding matters.** A region's feature is a fixed random *nonlinear* function of its
  object, colour and size, plus a position code and noise; a bag of words or a bag of
  regions cannot tell "a red dog and a blue car" from "a blue dog and a red car".
* **Regions look like a detector's.** Most of the 36 regions are boxes on the objects
  (overlapping boxes, parts, context), a few are background, in confidence order
  (:class:`_Renderer`), as bottom-up-attention features are: a model that reads regions
  in sequence (VSRN's GRU) sees the objects, not 28 shuffled background boxes.
* **The test split holds unseen combinations.** A fixed fraction of (colour, object)
  pairs never occurs in train; every dev and test scene contains at least one of them,
  so a model must compose what it learned rather than memorise pairs.

Every draw comes from one ``numpy.random.Generator`` seeded by ``ScenesConfig.seed``,
so the same config always writes byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aoq.atomic import atomic_write_text
from aoq.data.pictures import scene_records_path
from aoq.data.precomp import images_path, write_captions

#: Bump when the generator's output changes, so old caches are not reused.
GENERATOR_VERSION = 5

OBJECTS = {
    "dog": ("dog", "puppy"), "cat": ("cat", "kitten"), "horse": ("horse", "pony"),
    "bird": ("bird", "bird"), "car": ("car", "automobile"), "bus": ("bus", "bus"),
    "bicycle": ("bicycle", "bike"), "boat": ("boat", "boat"), "chair": ("chair", "seat"),
    "table": ("table", "table"), "lamp": ("lamp", "lamp"), "clock": ("clock", "clock"),
    "ball": ("ball", "ball"), "cup": ("cup", "mug"), "umbrella": ("umbrella", "umbrella"),
    "tree": ("tree", "tree"), "sheep": ("sheep", "lamb"), "truck": ("truck", "lorry"),
    "kite": ("kite", "kite"), "bench": ("bench", "bench"),
}
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple",
           "pink")
SIZES = ("small", "large")
BACKGROUNDS = {
    "grass": "on the grass", "street": "on a street", "beach": "on a beach",
    "room": "in a room", "snow": "in the snow", "field": "in a field",
}
# (phrase for A relative to B, phrase for B relative to A)
RELATIONS = {
    "left": (("to the left of", "left of"), ("to the right of", "right of")),
    "right": (("to the right of", "right of"), ("to the left of", "left of")),
    "above": (("above", "over"), ("below", "under")),
    "below": (("below", "under"), ("above", "over")),
}
OBJECT_NAMES = tuple(OBJECTS)
# Two objects, so that every caption can state everything a near-miss variant changes
# (both objects with their colours, their relation, the background): a caption that
# leaves out what a variant changed would be true of both, an unlearnable "negative".
OBJECTS_PER_SCENE = 2
BACKGROUND_NAMES = tuple(BACKGROUNDS)


@dataclass(frozen=True)
class SceneObject:
    """One object: indices into OBJECT_NAMES / COLOURS / SIZES and a position in [0, 1]^2."""

    obj: int
    colour: int
    size: int
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: int


def scene_record(scene: Scene) -> dict:
    """A scene by name: its background and objects (``aoq.data.scene_pictures`` draws it)."""
    return {"background": BACKGROUND_NAMES[scene.background],
            "objects": [{"object": OBJECT_NAMES[o.obj], "colour": COLOURS[o.colour],
                         "size": SIZES[o.size], "x": o.x, "y": o.y} for o in scene.objects]}


# ----------------------------------------------------------------------- sampling scenes


class _SceneSampler:
    """Draws scenes and near-miss variants from an allowed set of (colour, object) pairs."""

    def __init__(self, rng: np.random.Generator, allowed: np.ndarray, required: np.ndarray | None):
        self.rng = rng
        self.allowed = allowed      # (n_colours, n_objects) bool: pairs this split may use
        self.required = required    # pairs one object of each scene must use, or None

    def _object(self, pair: tuple[int, int] | None, taken: set[int]) -> SceneObject:
        rng = self.rng
        if pair is None:
            while True:
                colour, obj = (int(v) for v in np.argwhere(self.allowed)[
                    rng.integers(int(self.allowed.sum()))])
                if obj not in taken:
                    break
        else:
            colour, obj = pair
        return SceneObject(obj, colour, int(rng.integers(len(SIZES))), 0.0, 0.0)

    def _place(self, objects: list[SceneObject]) -> tuple[SceneObject, ...]:
        # The two objects stand side by side or one above the other, each in its half of
        # the frame with some jitter: the relation is then a property of where each
        # object is (as a detector's box coordinates would show), not a comparison of
        # two arbitrary coordinates that no region sees both of.
        rng = self.rng
        horizontal = bool(rng.integers(2))
        placed: list[SceneObject] = []
        for slot, o in enumerate(objects):
            along = (0.25 if slot == 0 else 0.75) + float(rng.uniform(-0.1, 0.1))
            across = float(rng.uniform(0.4, 0.6))  # |d across| < |d along|: one relation
            x, y = (along, across) if horizontal else (across, along)
            placed.append(dataclasses.replace(o, x=round(x, 3), y=round(y, 3)))
        return tuple(placed)

    def scene(self) -> Scene:
        rng = self.rng
        n = OBJECTS_PER_SCENE
        objects: list[SceneObject] = []
        if self.required is not None:
            pairs = np.argwhere(self.required)
            colour, obj = (int(v) for v in pairs[rng.integers(len(pairs))])
            objects.append(self._object((colour, obj), set()))
        while len(objects) < n:
            objects.append(self._object(None, {o.obj for o in objects}))
        order = rng.permutation(len(objects))
        return Scene(self._place([objects[i] for i in order]),
                     int(rng.integers(len(BACKGROUND_NAMES))))

    def variant(self, base: Scene) -> Scene:
        """``base`` with exactly one change, keeping every pair allowed (and required)."""
        rng = self.rng
        for _ in range(100):
            kind = int(rng.integers(5))
            objs = list(base.objects)
            i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
            if kind == 0:  # recolour one object
                objs[i] = dataclasses.replace(objs[i], colour=int(rng.integers(len(COLOURS))))
            elif kind == 1:  # swap the colours of two objects
                ci, cj = objs[i].colour, objs[j].colour
                objs[i] = dataclasses.replace(objs[i], colour=cj)
                objs[j] = dataclasses.replace(objs[j], colour=ci)
            elif kind == 2:  # swap two positions: every relation between them flips
                pi, pj = (objs[i].x, objs[i].y), (objs[j].x, objs[j].y)
                objs[i] = dataclasses.replace(objs[i], x=pj[0], y=pj[1])
                objs[j] = dataclasses.replace(objs[j], x=pi[0], y=pi[1])
            elif kind == 3:  # replace one object by another category
                taken = {o.obj for o in objs}
                free = [k for k in range(len(OBJECT_NAMES)) if k not in taken]
                objs[i] = dataclasses.replace(objs[i], obj=int(rng.choice(free)))
            else:  # change the background
                bg = int(rng.integers(len(BACKGROUND_NAMES) - 1))
                bg = bg + (bg >= base.background)
                candidate = Scene(tuple(objs), bg)
                return candidate
            candidate = Scene(tuple(objs), base.background)
            if candidate != base and self._valid(candidate):
                return candidate
        return base  # pragma: no cover - 100 failed draws is vanishingly unlikely

    def _valid(self, scene: Scene) -> bool:
        pairs = [(o.colour, o.obj) for o in scene.objects]
        if len({o.obj for o in scene.objects}) != len(scene.objects):
            return False
        if not all(self.allowed[c, o] for c, o in pairs):
            return False
        return self.required is None or any(self.required[c, o] for c, o in pairs)


# ----------------------------------------------------------------------- captions


def _relation(a: SceneObject, b: SceneObject) -> str:
    """The dominant spatial relation of ``a`` relative to ``b`` (y grows downwards)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _noun(o: SceneObject, rng: np.random.Generator, *, size: bool) -> str:
    name = OBJECTS[OBJECT_NAMES[o.obj]][int(rng.integers(2))]
    words = ([SIZES[o.size]] if size else []) + [COLOURS[o.colour], name]
    return " ".join(words)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five true, varied captions of ``scene``.

    Every caption names both objects with their colours, the spatial relation and the
    background: everything a family variant may change. Templates, word order, synonyms
    and optional size adjectives vary.
    """
    a, b = scene.objects
    if rng.integers(2):  # which object the caption starts from
        a, b = b, a
    bg = BACKGROUNDS[BACKGROUND_NAMES[scene.background]]
    relation = _relation(a, b)
    out = []
    for k in range(5):
        rel = RELATIONS[relation][0][int(rng.integers(2))]
        back = RELATIONS[relation][1][int(rng.integers(2))]
        na = _noun(a, rng, size=bool(rng.integers(2)))
        nb = _noun(b, rng, size=bool(rng.integers(2)))
        if k == 0:
            text = f"{_article(na)} {rel} {_article(nb)} {bg}"
        elif k == 1:
            text = f"there is {_article(na)} {rel} {_article(nb)} {bg}"
        elif k == 2:
            text = f"{_article(nb)} {back} {_article(na)} {bg}"
        elif k == 3:
            text = (f"a photo of {_article(na)} and {_article(nb)} {bg}, the "
                    f"{na.split()[-1]} is {rel} the {nb.split()[-1]}")
        else:
            text = f"{bg}, {_article(nb)} is {back} {_article(na)}"
        out.append(text)
    return out


# ----------------------------------------------------------------------- region features


class _Renderer:
    """Maps scenes to (n_regions, dim) float32 region features shaped like a detector's.

    Real bottom-up-attention features are 36 object proposals kept by confidence: most
    boxes sit on the objects (several overlapping boxes per object, parts, boxes with
    some context), a few on "stuff" (grass, street), all in the detector's fixed order,
    most confident first. The regions here follow that, per object (``PER_OBJECT``):

    * a whole-object box: a random two-layer tanh network of (object, colour, size)
      embeddings, so the colour is *bound* to its object nonlinearly; and
      ``JITTERED`` shifted, rescaled copies of it (the overlapping boxes NMS keeps);
    * a tighter box (the same code, weaker), two shape-only parts (object only), two
      colour-only patches (colour only), two context boxes (object mixed with the
      background);

    then one box around both objects (both codes at their midpoint) and background
    boxes for the rest. Every region carries a code of its position and noise. Each
    region gets a noisy confidence from its kind (whole objects highest, background as
    low as the weaker object boxes) and the regions are sorted by it: the whole objects
    first, then parts, context and background interleaved, the order varying as a
    detector's does, never a random shuffle of the whole set.
    """

    JITTERED = 4
    #: (kind, confidence range) of the regions of one object, in the order built.
    KINDS = (("whole", (0.85, 0.99)),) + (("jittered", (0.7, 0.9)),) * JITTERED + (
        ("tight", (0.6, 0.8)), ("shape", (0.45, 0.65)), ("shape", (0.45, 0.65)),
        ("colour", (0.4, 0.6)), ("colour", (0.4, 0.6)), ("context", (0.3, 0.5)),
        ("context", (0.3, 0.5)))
    PAIR_CONFIDENCE = (0.3, 0.45)
    # Detectors trained on Visual Genome find "stuff" (grass, street, wall) with the
    # confidence of object parts, so background boxes interleave with the weaker object
    # boxes rather than all coming last.
    BACKGROUND_CONFIDENCE = (0.1, 0.6)

    def __init__(self, rng: np.random.Generator, dim: int, n_regions: int, noise: float):
        hidden = 2 * dim
        self.dim, self.n_regions, self.noise = dim, n_regions, noise
        self.e_obj = rng.normal(size=(len(OBJECT_NAMES), hidden)).astype(np.float32)
        self.e_col = rng.normal(size=(len(COLOURS), hidden)).astype(np.float32)
        self.e_size = rng.normal(size=(len(SIZES), hidden)).astype(np.float32) * 0.5
        self.w_out = (rng.normal(size=(hidden, dim)) / np.sqrt(hidden)).astype(np.float32)
        self.part_obj = rng.normal(size=(len(OBJECT_NAMES), dim)).astype(np.float32) * 0.7
        self.part_col = rng.normal(size=(len(COLOURS), dim)).astype(np.float32) * 0.7
        self.bg = rng.normal(size=(len(BACKGROUND_NAMES), dim)).astype(np.float32) * 0.7
        self.pos = (rng.normal(size=(4, dim)) / 2).astype(np.float32)

    def _position(self, x: float, y: float) -> np.ndarray:
        # A smooth code of (x, y): nearby positions get similar codes.
        basis = np.array([np.sin(np.pi * x), np.cos(np.pi * x),
                          np.sin(np.pi * y), np.cos(np.pi * y)], dtype=np.float32)
        return basis @ self.pos

    def _object_regions(self, o: SceneObject, background: np.ndarray,
                        rng: np.random.Generator) -> list[tuple[float, np.ndarray]]:
        code = np.tanh(self.e_obj[o.obj] + self.e_col[o.colour] + self.e_size[o.size]) @ self.w_out
        out = []
        for kind, (lo, hi) in self.KINDS:
            dx, dy = (rng.uniform(-0.05, 0.05, size=2) if kind != "whole" else (0.0, 0.0))
            pos = self._position(o.x + float(dx), o.y + float(dy))
            if kind in ("whole", "jittered"):
                feat = code * (1.0 if kind == "whole" else float(rng.uniform(0.7, 1.0)))
            elif kind == "tight":
                feat = 0.6 * code
            elif kind == "shape":
                feat = self.part_obj[o.obj]
            elif kind == "colour":
                feat = self.part_col[o.colour]
            else:  # context: the object with some of what surrounds it
                feat = 0.6 * code + 0.4 * background
            out.append((float(rng.uniform(lo, hi)), feat + pos))
        return out

    def render(self, scene: Scene, rng: np.random.Generator) -> np.ndarray:
        background = self.bg[scene.background]
        regions = [r for o in scene.objects for r in self._object_regions(o, background, rng)]
        a, b = scene.objects
        both = 0.5 * (np.tanh(self.e_obj[a.obj] + self.e_col[a.colour] + self.e_size[a.size])
                      + np.tanh(self.e_obj[b.obj] + self.e_col[b.colour] + self.e_size[b.size])
                      ) @ self.w_out
        regions.append((float(rng.uniform(*self.PAIR_CONFIDENCE)),
                        both + self._position((a.x + b.x) / 2, (a.y + b.y) / 2)))
        while len(regions) < self.n_regions:
            regions.append((float(rng.uniform(*self.BACKGROUND_CONFIDENCE)),
                            background * float(rng.uniform(0.5, 1.0))))
        # The detector's order: most confident first; a smaller n_regions keeps the top.
        order = sorted(range(len(regions)), key=lambda i: -regions[i][0])[: self.n_regions]
        feats = np.stack([regions[i][1] for i in order]).astype(np.float32)
        feats += rng.normal(scale=self.noise, size=feats.shape).astype(np.float32)
        return feats


# ----------------------------------------------------------------------- splits on disk


def _family_scenes(sampler: _SceneSampler, n: int, family: int) -> Iterator[Scene]:
    made = 0
    while made < n:
        base = sampler.scene()
        for k in range(min(family, n - made)):
            yield base if k == 0 else sampler.variant(base)
            made += 1


def scenes_key(cfg) -> str:
    """Cache key of a ScenesConfig: its values plus the generator version."""
    payload = json.dumps({"version": GENERATOR_VERSION, **dataclasses.asdict(cfg)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def generate_scenes(cfg, directory: str | os.PathLike, *, progress: bool = False) -> Path:
    """Write train/dev/test splits of ``scenes`` in the precomp layout into ``directory``.

    Args:
        cfg: an ``aoq.config.ScenesConfig``.
        directory: created; must not already hold a finished dataset.

    Returns:
        ``directory``. Each split also gets ``<split>_scenes.jsonl``, what every image
        shows (:func:`scene_record`). A ``scenes.json`` manifest is written last, so its
        presence marks a complete dataset.
    """
    from tqdm.auto import tqdm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    renderer = _Renderer(rng, cfg.feature_dim, cfg.n_regions, cfg.noise)
    pairs = len(COLOURS) * len(OBJECT_NAMES)
    held = np.zeros(pairs, dtype=bool)
    held[rng.choice(pairs, size=int(round(cfg.heldout_fraction * pairs)), replace=False)] = True
    held = held.reshape(len(COLOURS), len(OBJECT_NAMES))
    seen = ~held
    # Every object keeps at least one seen colour, so train can place it at all.
    for obj in range(len(OBJECT_NAMES)):
        if not seen[:, obj].any():
            seen[0, obj], held[0, obj] = True, False
    splits = {
        "train": (cfg.n_train, _SceneSampler(rng, seen, None)),
        "dev": (cfg.n_dev, _SceneSampler(rng, np.ones_like(held), held if held.any() else None)),
        "test": (cfg.n_test, _SceneSampler(rng, np.ones_like(held), held if held.any() else None)),
    }
    total = sum(n for n, _ in splits.values())
    bar = tqdm(total=total, desc="generating scenes", unit="img", disable=not progress)
    for split, (n, sampler) in splits.items():
        scenes = list(_family_scenes(sampler, n, cfg.family_size))
        # Families are generated together; shuffle so file order says nothing about them.
        scenes = [scenes[i] for i in rng.permutation(n)]
        # Features stream into a memory-mapped .npy, so a split of COCO's size (113k
        # images x 36 x 2048 float32 = 33 GB) never has to fit in memory. Its
        # completeness is marked by the manifest written last, as for every file here.
        feats = np.lib.format.open_memmap(images_path(directory, split), mode="w+",
                                          dtype=np.float32,
                                          shape=(n, cfg.n_regions, cfg.feature_dim))
        captions: list[str] = []
        for i, scene in enumerate(scenes):
            feats[i] = renderer.render(scene, rng)
            captions.extend(captions_for(scene, rng))
            bar.update(1)
        feats.flush()
        del feats
        write_captions(directory, split, captions, n)
        # What each image shows, one JSON line per image, so it can be drawn.
        atomic_write_text(scene_records_path(directory, split),
                          "".join(json.dumps(scene_record(s)) + "\n" for s in scenes))
    bar.close()
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "config": dataclasses.asdict(cfg),
        "heldout_pairs": [f"{COLOURS[c]} {OBJECT_NAMES[o]}" for c, o in np.argwhere(held)],
    }
    atomic_write_text(directory / "scenes.json", json.dumps(manifest, indent=2))
    return directory


def ensure_scenes(cfg, cache_dir: str | os.PathLike, *, progress: bool = False) -> Path:
    """The directory of the ``scenes`` dataset for ``cfg``, generating it on first use.

    Generation goes to a temporary sibling directory that is renamed into place, so a
    killed generation never leaves a half-written dataset where a reader would use it.
    """
    final = Path(cache_dir) / "scenes" / scenes_key(cfg)
    if (final / "scenes.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    generate_scenes(cfg, tmp, progress=progress)
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process finished first; its copy is identical (same seed and config).
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "scenes.json").exists():
            raise
    return final
