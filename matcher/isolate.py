"""One undecodable image fails its whole model call: find it by halving, answer the others.

The in-graph decoder refuses a batch as a whole, so a batch holding one bad image is split in
two and each half tried again, down to the bad image alone: about 2 log2(n) extra calls for one
bad image in n, rather than n calls one by one. The server's batcher and training's feature
extraction both go through here, so a bad image costs the same, and reads the same, in both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

from matcher.errors import InvalidImageError

Item = TypeVar("Item")
Answer = TypeVar("Answer")


def answer_each(
    run: Callable[[Sequence[Item]], Collection[Answer]], items: Sequence[Item]
) -> list[Answer | InvalidImageError]:
    """`run(items)` as one answer per item, in order (`run` returns a sequence, or an array
    with a row per item); where `run` refuses an image, that item's InvalidImageError stands
    in its place. Any other error is raised: it is not the image's."""
    if not items:
        return []
    try:
        answers = run(items)
    except InvalidImageError as exc:
        if len(items) == 1:
            return [exc]
        middle = len(items) // 2
        return answer_each(run, items[:middle]) + answer_each(run, items[middle:])
    if len(answers) != len(items):
        raise RuntimeError(f"{len(answers)} answers for a batch of {len(items)}")
    return list(answers)
