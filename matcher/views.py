"""Views of one query photo: the whole photo, crops of it and, where asked, its rotations.

A field photo often shows the item small, off centre, on a cluttered background, or turned.
The backbone sees the whole frame squeezed to its input size, so a small item is a few dozen
pixels among clutter. Looking also at crops gives the item a view where it fills more of the
frame; looking at the photo turned by quarter turns meets a catalogue photographed upright.
Each view is matched against the catalogue and the answers are merged per label (its best
view wins: `merge_similarity`). Training uses the same cuts for the other side of the match:
each catalogue photo also enters the index turned by quarter turns (`TURNED`), so that a photo
taken at any angle meets a reference at most 45 degrees from it without costing the query
anything.

The whole view is the request's bytes as they are (so `whole` answers exactly as a plain
request does). Crops and rotations are cut by Pillow from one decode of the photo, shrunk so
that no view is much larger than the backbone needs, and sent to the graph as uncompressed BMP
(lossless, and the cheapest to encode and decode). Training calibrates the no-match threshold of
each mode on views made by this same module, so a mode's threshold fits its scores.

Modes, by cost (views per photo):

- `whole` (1): the photo alone.
- `crops` (1 + 9): the photo, and a 3 x 3 grid of crops 0.4 of its width and height, 0.3
  apart (they overlap by a quarter, and cover it).
- `crops_rotations` (1 + 9 + 3): the above, and the whole photo turned by 90, 180, 270 degrees.

On `bench.quality`'s field photos, crops lifted top-1 of items small on a cluttered background
from 42 % to 83 % (docs/benchmarks.md, "Quality"); 0.4 crops found them more often than half-size
ones (0.91 against 0.83 for unturned clutter) at the same cost.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from matcher.errors import InvalidRequestError
from matcher.images import decode_upright

#: The modes, cheapest first; each is a `QueryView` plan below.
ViewMode = Literal["whole", "crops", "crops_rotations"]
VIEW_MODES: tuple[ViewMode, ...] = ("whole", "crops", "crops_rotations")
#: The server's default: on `bench.quality`'s field photos crops lifted top-1 from 73 % to 92 %
#: for about 6x the latency of one view (55 -> 314 ms at p50 on 2 cores).
DEFAULT_VIEWS: ViewMode = "crops"
#: A crop's side as a share of the photo's, and where the grid's crops start.
CROP_SHARE = 0.4
_GRID = (0.0, 0.3, 0.6)
#: Input side assumed when neither the backend nor the classifier's report names one (a TF
#: Serving backend's signature takes encoded strings): Inception v3's, the largest of the
#: backbones export offers, so a view keeps more pixels, never fewer.
FALLBACK_INPUT_SIDE = 299
#: No view is kept larger than this many times the backbone's input side: more is resized
#: away in the graph anyway, and would cost memory and time to encode.
_OVERSAMPLE = 2


@dataclass(frozen=True)
class QueryView:
    """One view: a box (left, top, right, bottom, as shares of the photo) turned `turn` x 90."""

    name: str
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    turn: int = 0

    @property
    def is_whole(self) -> bool:
        return self.box == (0.0, 0.0, 1.0, 1.0) and self.turn == 0

    @property
    def is_crop(self) -> bool:
        """A part of the photo (turned or not), where geometry can look closer
        (`matcher.geometry.Focus`)."""
        return self.box != (0.0, 0.0, 1.0, 1.0)


WHOLE = QueryView("whole")
_CROPS = tuple(
    QueryView(f"crop {left:.2f},{top:.2f}", (left, top, left + CROP_SHARE, top + CROP_SHARE))
    for top in _GRID
    for left in _GRID
)
_TURNS = tuple(QueryView(f"turned {90 * turn}", turn=turn) for turn in (1, 2, 3))
PLANS: dict[str, tuple[QueryView, ...]] = {
    "whole": (WHOLE,),
    "crops": (WHOLE, *_CROPS),
    "crops_rotations": (WHOLE, *_CROPS, *_TURNS),
}
#: The catalogue side: each training photo's quarter turns, indexed beside it.
TURNED: tuple[QueryView, ...] = _TURNS


def check_mode(mode: str) -> str:
    """`mode` if it names a mode; InvalidRequestError naming the choices otherwise."""
    if mode not in PLANS:
        raise InvalidRequestError(f"unknown views {mode!r}; choose one of {', '.join(VIEW_MODES)}")
    return mode


def render_views(graph_bytes: bytes, mode: str, input_side: int) -> list[bytes]:
    """The encoded views of one photo for `mode`, in `PLANS[mode]` order (blocking).

    `graph_bytes` is what the graph would decode for the whole photo (`images.for_graph`'s
    output: upright, in a format the graph reads); it is the first view, unchanged.
    """
    return render(graph_bytes, PLANS[check_mode(mode)], input_side)


def render(graph_bytes: bytes, plan: Sequence[QueryView], input_side: int) -> list[bytes]:
    """The encoded views of `plan`, in order; the whole view is `graph_bytes` itself."""
    if all(view.is_whole for view in plan):
        return [graph_bytes for _ in plan]
    photo = _decode(graph_bytes, largest_needed(plan, input_side))
    return [
        graph_bytes if view.is_whole else _encode(_cut(photo, view, input_side)) for view in plan
    ]


def merge_similarity(per_view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[V, L] similarities of each view to each label -> each label's best similarity [L] and
    the view it came from [L]."""
    best_view = np.argmax(per_view, axis=0)
    return per_view[best_view, np.arange(per_view.shape[1])], best_view


def view_pixels(mode: str, input_side: int) -> int:
    """The most pixels the views `render_views` cuts for `mode` hold (as BMP, until the model
    has read them): each is at most `_OVERSAMPLE` times the input a side."""
    cut = [view for view in PLANS[check_mode(mode)] if not view.is_whole]
    return len(cut) * (_OVERSAMPLE * input_side) ** 2


def rewrite_side(input_side: int) -> int:
    """The shorter side a turned JPEG keeps when `images.for_graph` rewrites it upright: what
    the finest view of any mode needs, so that its views are cut from the pixels an upright
    photo's are (one rule for every mode, in training and serving alike). An unknown input side
    (0) counts as `FALLBACK_INPUT_SIDE`."""
    side = input_side or FALLBACK_INPUT_SIDE
    return max(largest_needed(plan, side) for plan in PLANS.values())


def largest_needed(plan: Sequence[QueryView], input_side: int) -> int:
    """The longest side the photo must keep so that its smallest view still has enough pixels."""
    smallest = min(min(v.box[2] - v.box[0], v.box[3] - v.box[1]) for v in plan)
    return int(np.ceil(_OVERSAMPLE * input_side / smallest))


def _decode(data: bytes, longest: int) -> Image.Image:
    photo = decode_upright(data, longest)
    if max(photo.size) > longest:
        photo.thumbnail((longest, longest), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return photo


def _cut(photo: Image.Image, view: QueryView, input_side: int) -> Image.Image:
    width, height = photo.size
    left, top, right, bottom = view.box
    box = (round(left * width), round(top * height), round(right * width), round(bottom * height))
    part = photo if view.box == WHOLE.box else photo.crop(box)
    longest = _OVERSAMPLE * input_side
    if max(part.size) > longest:
        part = part.copy() if part is photo else part
        part.thumbnail((longest, longest), Image.Resampling.BILINEAR)
    if view.turn:
        part = part.rotate(90 * view.turn, expand=True)  # quarter turns: exact, no resampling
    return part


def _encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="BMP")
    return buffer.getvalue()
