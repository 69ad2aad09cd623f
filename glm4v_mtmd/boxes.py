"""Grounding output: ``<|begin_of_box|>…<|end_of_box|>`` spans, and their boxes in the user's pixels.

GLM-4.xV answers "where is X?" with coordinates normalised to 0–1000 of the image it saw. That image
is the original stretched (never letterboxed, see :mod:`glm4v_mtmd.images`), so a normalised
coordinate is the same fraction of the original image: mapping back needs only the original size
(``ImageEmbedding.original_size``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from .images import ImageInput, load_rgb

#: Coordinates of a box are 0 .. NORM in each direction.
NORM = 1000

_SPAN = re.compile(r"<\|begin_of_box\|>(.*?)<\|end_of_box\|>", re.DOTALL)
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
# One bracket group: a point [x, y] or a box [x1, y1, x2, y2].
_GROUP = re.compile(r"\[" + _NUM + "," + _NUM + "(?:," + _NUM + "," + _NUM + r")?\]")
_GROUPS = re.compile(r"\s*" + _GROUP.pattern + r"(?:\s*,?\s*" + _GROUP.pattern + r")*\s*")


@dataclass(frozen=True)
class Box:
    """A box (or a point) in the model's 0–1000 coordinates.

    Attributes:
        x1, y1, x2, y2: corners as emitted; a point has ``x2 == x1`` and ``y2 == y1``.
        point: whether the model emitted a point ``[x, y]`` rather than a box.
        span: index of the ``<|begin_of_box|>`` span (in the text) the box came from.
    """

    x1: float
    y1: float
    x2: float
    y2: float
    point: bool = False
    span: int = 0

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` in pixels of a ``width`` x ``height`` image (the original one).

        Each coordinate maps to ``c * size / 1000`` rounded half up (``floor(v + 0.5)``), then is
        clamped: box edges to ``0 .. size`` (so ``[0, 0, 1000, 1000]`` is the whole image and the
        result is a ``PIL.Image.crop`` box), points to ``0 .. size - 1`` (a pixel index). Box
        corners are ordered so that left <= right and top <= bottom.
        """
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive integer")

        def px(c: float, size: int) -> int:
            return min(max(math.floor(c * size / NORM + 0.5), 0), size - 1 if self.point else size)

        left, right = sorted((px(self.x1, width), px(self.x2, width)))
        top, bottom = sorted((px(self.y1, height), px(self.y2, height)))
        return left, top, right, bottom


def parse_boxes(text: str) -> list[Box]:
    """Every box and point inside ``<|begin_of_box|>…<|end_of_box|>`` spans of ``text``.

    A span holds bracket groups of two (point) or four (box) numbers: ``[x1,y1,x2,y2]``,
    ``[[x1,y1,x2,y2]]``, several boxes ``[[…],[…]]`` (or ``[…],[…]``), points ``[x,y]`` /
    ``[[x,y]]``, with any spacing. A span that is anything else (a boxed answer such as
    ``true``, unbalanced brackets, three numbers, deeper nesting) is ignored; nothing raises.
    """
    boxes: list[Box] = []
    for index, match in enumerate(_SPAN.finditer(text)):
        body = match.group(1).strip()
        if body.startswith("[") and body[1:].lstrip().startswith("["):  # [[...], ...]: drop the outer pair
            if not body.endswith("]"):
                continue
            body = body[1:-1]
        if not _GROUPS.fullmatch(body):
            continue
        for group in _GROUP.finditer(body):
            values = [float(v) for v in group.groups() if v is not None]
            if len(values) == 2:
                boxes.append(Box(values[0], values[1], values[0], values[1], point=True, span=index))
            else:
                boxes.append(Box(*values, span=index))
    return boxes


def draw_boxes(
    image: ImageInput,
    boxes: Iterable[Box],
    *,
    color: Union[str, Sequence[int]] = "red",
    width: int = 0,
) -> Any:
    """A PIL RGB copy of ``image`` with ``boxes`` drawn on it, for quick inspection.

    ``image`` is anything :func:`glm4v_mtmd.preprocess` accepts and is loaded the same way (EXIF
    orientation for files), so boxes land where the model saw the objects. ``width`` is the line
    width in pixels (0: about 1/200 of the shorter side). Points are drawn as small circles.
    """
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(load_rgb(image))
    line = width or max(2, round(min(canvas.size) / 200))
    fill = tuple(color) if not isinstance(color, str) else color
    draw = ImageDraw.Draw(canvas)
    for box in boxes:
        left, top, right, bottom = box.to_pixels(*canvas.size)
        if box.point:
            r = 2 * line
            draw.ellipse((left - r, top - r, left + r, top + r), outline=fill, width=line)
        else:
            draw.rectangle((left, top, right, bottom), outline=fill, width=line)
    return canvas
