"""Draw a ``scenes`` image from its record: the background, then each object.

A record (``aoq.data.scenes.scene_record``) names what an image shows: a background and
objects, each with a colour, a size and a position in [0, 1]^2 (y grows downwards). The
region features a model sees are a function of exactly these, so the drawing is what
the image "looks like". Each object is a simple silhouette of its category in its
colour, large or small, with a label naming it, since a cat and a dog drawn in a few
shapes look alike.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

#: Picture size in pixels (width, height).
PICTURE_SIZE = (192, 144)

COLOUR_RGB = {
    "red": (220, 40, 40), "blue": (40, 90, 220), "green": (40, 165, 60),
    "yellow": (245, 215, 40), "black": (25, 25, 25), "white": (250, 250, 250),
    "brown": (130, 80, 40), "orange": (245, 140, 30), "purple": (140, 60, 180),
    "pink": (245, 150, 190),
}
#: Background: (sky or wall colour, ground colour, where the ground starts, 0..1).
BACKGROUND_RGB = {
    "grass": ((170, 210, 240), (95, 170, 70), 0.35),
    "street": ((185, 200, 215), (105, 105, 110), 0.35),
    "beach": ((165, 210, 245), (235, 215, 160), 0.45),
    "room": ((235, 225, 200), (165, 120, 80), 0.6),
    "snow": ((215, 225, 235), (248, 250, 252), 0.35),
    "field": ((175, 210, 240), (200, 200, 90), 0.35),
}
UNKNOWN_RGB = (150, 150, 150)
#: Object radius as a share of the picture height.
RADIUS = {"small": 0.11, "large": 0.16}

# Silhouettes in units of the object radius, centred on the object's position:
# ("ellipse" | "rect", (x0, y0, x1, y1)), ("polygon", points), ("line", points).
# "body" parts take the object's colour, "dark" parts a dark grey.
_QUADRUPED = [("body", "ellipse", (-1.0, -0.45, 0.6, 0.35)),
              ("body", "ellipse", (0.35, -0.85, 1.0, -0.2)),
              ("dark", "line", (-0.75, 0.2, -0.75, 0.9)),
              ("dark", "line", (-0.35, 0.3, -0.35, 0.9)),
              ("dark", "line", (0.1, 0.3, 0.1, 0.9)), ("dark", "line", (0.45, 0.2, 0.45, 0.9))]
_VEHICLE = [("body", "rect", (-1.0, -0.5, 1.0, 0.4)),
            ("dark", "ellipse", (-0.8, 0.2, -0.3, 0.7)), ("dark", "ellipse", (0.3, 0.2, 0.8, 0.7))]
SHAPES: dict[str, list[tuple[str, str, tuple[float, ...]]]] = {
    "dog": _QUADRUPED, "horse": _QUADRUPED, "sheep": _QUADRUPED,
    "cat": _QUADRUPED + [("body", "polygon", (0.4, -0.75, 0.5, -1.05, 0.65, -0.8)),
                         ("body", "polygon", (0.7, -0.8, 0.85, -1.05, 0.95, -0.7))],
    "bird": [("body", "ellipse", (-0.8, -0.4, 0.5, 0.4)),
             ("body", "ellipse", (0.3, -0.7, 0.9, -0.1)),
             ("dark", "polygon", (0.9, -0.45, 1.2, -0.35, 0.9, -0.25)),
             ("dark", "polygon", (-0.4, -0.2, 0.1, -0.9, 0.2, -0.1))],
    "car": _VEHICLE + [("dark", "rect", (-0.5, -0.9, 0.5, -0.5))],
    "bus": [("body", "rect", (-1.1, -0.8, 1.1, 0.45)), ("dark", "rect", (-0.9, -0.6, 0.9, -0.2)),
            ("dark", "ellipse", (-0.9, 0.25, -0.4, 0.75)),
            ("dark", "ellipse", (0.4, 0.25, 0.9, 0.75))],
    "truck": _VEHICLE + [("body", "rect", (0.3, -0.95, 1.0, -0.5))],
    "bicycle": [("dark", "ellipse", (-1.0, -0.1, -0.2, 0.7)),
                ("dark", "ellipse", (0.2, -0.1, 1.0, 0.7)),
                ("body", "polygon", (-0.6, 0.3, -0.1, -0.5, 0.6, 0.3, 0.0, 0.35))],
    "boat": [("body", "polygon", (-1.1, 0.0, 1.1, 0.0, 0.7, 0.6, -0.7, 0.6)),
             ("body", "polygon", (-0.05, -1.0, -0.05, -0.1, 0.7, -0.1))],
    "chair": [("body", "rect", (-0.6, -1.0, -0.35, 0.9)),
              ("body", "rect", (-0.6, 0.0, 0.6, 0.25)),
              ("dark", "line", (0.5, 0.25, 0.5, 0.9))],
    "table": [("body", "rect", (-1.0, -0.3, 1.0, -0.05)),
              ("body", "rect", (-0.85, -0.05, -0.65, 0.8)),
              ("body", "rect", (0.65, -0.05, 0.85, 0.8))],
    "bench": [("body", "rect", (-1.1, -0.2, 1.1, 0.05)),
              ("body", "rect", (-1.1, -0.75, 1.1, -0.5)),
              ("dark", "line", (-0.9, 0.05, -0.9, 0.7)), ("dark", "line", (0.9, 0.05, 0.9, 0.7))],
    "lamp": [("body", "polygon", (-0.4, -1.0, 0.4, -1.0, 0.7, -0.3, -0.7, -0.3)),
             ("dark", "line", (0.0, -0.3, 0.0, 0.7)), ("dark", "rect", (-0.4, 0.7, 0.4, 0.85))],
    "clock": [("body", "ellipse", (-0.85, -0.85, 0.85, 0.85)),
              ("dark", "line", (0.0, 0.0, 0.0, -0.6)), ("dark", "line", (0.0, 0.0, 0.4, 0.0))],
    "ball": [("body", "ellipse", (-0.7, -0.7, 0.7, 0.7)), ("dark", "line", (-0.7, 0.0, 0.7, 0.0))],
    "cup": [("body", "rect", (-0.5, -0.6, 0.4, 0.6)),
            ("body", "ellipse", (0.25, -0.35, 0.8, 0.25)),
            ("dark", "ellipse", (0.4, -0.2, 0.65, 0.1))],
    "umbrella": [("body", "polygon", (-1.0, -0.2, -0.7, -0.7, 0.0, -0.95, 0.7, -0.7, 1.0, -0.2)),
                 ("dark", "line", (0.0, -0.2, 0.0, 0.8)), ("dark", "line", (0.0, 0.8, -0.25, 0.8))],
    "tree": [("dark", "rect", (-0.15, 0.2, 0.15, 0.9)),
             ("body", "polygon", (0.0, -1.1, 0.85, 0.3, -0.85, 0.3))],
    "kite": [("body", "polygon", (0.0, -1.0, 0.6, -0.2, 0.0, 0.5, -0.6, -0.2)),
             ("dark", "line", (0.0, 0.5, -0.2, 0.8, 0.1, 1.0))],
}
_FALLBACK_SHAPE = [("body", "rect", (-0.7, -0.7, 0.7, 0.7))]
DARK = (45, 45, 45)


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _scaled(coords: Sequence[float], cx: float, cy: float, r: float) -> list[float]:
    return [cx + r * v if i % 2 == 0 else cy + r * v for i, v in enumerate(coords)]


def _draw_background(draw: ImageDraw.ImageDraw, name: str, width: int, height: int) -> None:
    sky, ground, horizon = BACKGROUND_RGB.get(name, (UNKNOWN_RGB, UNKNOWN_RGB, 0.5))
    top = int(horizon * height)
    draw.rectangle((0, 0, width, top), fill=sky)
    draw.rectangle((0, top, width, height), fill=ground)
    if name == "street":  # lane markings
        for x in range(4, width, 28):
            draw.rectangle((x, height - 10, x + 14, height - 7), fill=(240, 240, 240))
    elif name == "beach":  # the sea between sky and sand
        draw.rectangle((0, top - int(0.12 * height), width, top), fill=(60, 130, 200))


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict[str, Any], width: int, height: int
                 ) -> None:
    cx, cy = float(obj["x"]) * width, float(obj["y"]) * height
    r = RADIUS.get(obj.get("size", ""), 0.13) * height
    fill = COLOUR_RGB.get(obj.get("colour", ""), UNKNOWN_RGB)
    # A black object on dark parts (or a white one on snow) still needs an edge.
    edge = (200, 200, 200) if sum(fill) < 150 else DARK
    for part, kind, coords in SHAPES.get(obj.get("object", ""), _FALLBACK_SHAPE):
        colour = fill if part == "body" else DARK
        xy = _scaled(coords, cx, cy, r)
        if kind == "ellipse":
            draw.ellipse(xy, fill=colour, outline=edge)
        elif kind == "rect":
            draw.rectangle(xy, fill=colour, outline=edge)
        elif kind == "polygon":
            draw.polygon(xy, fill=colour, outline=edge)
        else:
            draw.line(xy, fill=colour, width=max(1, int(r / 8)))
    label = f"{obj.get('colour', '?')} {obj.get('object', '?')}"
    font = _font(max(9, height // 14))
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    x = min(max(1.0, cx - (right - left) / 2), width - (right - left) - 1)
    y = min(cy + 1.1 * r, height - (bottom - top) - 3)
    draw.rectangle((x - 2, y + top - 1, x + right - left + 2, y + bottom + 1),
                   fill=(255, 255, 255))
    draw.text((x - left, y), label, fill=(0, 0, 0), font=font)


def draw_scene(record: dict[str, Any], size: tuple[int, int] = PICTURE_SIZE) -> Image.Image:
    """An RGB picture of a scene record (unknown names are drawn grey, not refused)."""
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    _draw_background(draw, str(record.get("background", "")), width, height)
    for obj in record.get("objects", []):
        _draw_object(draw, obj, width, height)
    return image


def scene_png(record: dict[str, Any], size: tuple[int, int] = PICTURE_SIZE) -> bytes:
    """:func:`draw_scene` encoded as PNG bytes."""
    buffer = io.BytesIO()
    draw_scene(record, size).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
