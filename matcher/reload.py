"""Hot reload: a new classifier file or SavedModel version is swapped in without a restart.

Polling, as TF Serving's own file-system poll does: every `interval_s` the watcher looks at the
classifier file (with the manifest and report beside it) and asks the feature backend which
model it should serve. A change is acted on once it has looked the same on two polls in a row,
so a file still being copied is not read half-way. The new models are loaded beside the served
ones (which keep answering), checked (manifest, sha256, feature size), and then swapped in
between two batches. A refused change is logged and counted, the old models keep serving, and
the same files are not tried again until they change.

SIGHUP asks for a poll at once (see service/server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from matcher import metrics
from matcher.backends.base import PreparedModel
from matcher.classifier import Classifier
from matcher.core import MatcherCore
from matcher.errors import BackendUnavailableError, MatcherError
from matcher.layout import COMPANION_FILES

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library is another."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_freed_memory() -> None:
    """Collect the models just dropped and hand their pages back to the system.

    glibc keeps freed memory in its arenas for reuse; the few large blocks of a swapped-out
    classifier or backbone would stay resident (measured: +30 MB over 60 reloads of the demo
    classifier, +0.8 MB with this), and a server that reloads for weeks would look like it
    leaks."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


T = TypeVar("T")


@dataclass
class _Watched:
    """What one model's files looked like at the last poll, and what was refused."""

    current: Hashable | None = None
    seen: Hashable | None = None
    #: `seen` of the poll before the last, to tell whether a key has settled.
    before: Hashable | None = None
    refused: Hashable | None = None
    #: The refused files were sound but did not fit the other model (feature size).
    misfit: bool = False

    def settled_change(self, key: Hashable | None) -> bool:
        """True when `key` differs from the served one and was the same at the last poll."""
        ready = key is not None and key != self.current and key == self.seen
        self.before, self.seen = self.seen, key
        return ready and key != self.refused

    def may_join(self, key: Hashable | None) -> bool:
        """Whether settled, unserved files should be tried beside a partner that just changed."""
        settled = key == self.before
        return settled and key not in (None, self.current) and (key != self.refused or self.misfit)

    def refuse(self, key: Hashable | None, misfit: bool) -> None:
        self.refused, self.misfit = key, misfit


@dataclass
class ReloadOutcome:
    """What one poll did: the models swapped in and the ones refused (with why)."""

    swapped: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    #: Whether new model files were read at all (swapped, refused or the same bytes).
    loaded: bool = False


class ModelWatcher:
    """Polls for new models and swaps them into `core`."""

    def __init__(self, core: MatcherCore, classifier_path: Path) -> None:
        self._core = core
        self._classifier_path = classifier_path
        self._classifier = _Watched(current=self._classifier_key())
        self._backbone = _Watched()
        self._wake = asyncio.Event()
        # One poll at a time, whether from the timer, SIGHUP or a test.
        self._lock = threading.Lock()

    def poke(self) -> None:
        """Poll now instead of at the next tick (SIGHUP)."""
        self._wake.set()

    async def run(self, interval_s: float) -> None:
        """Poll forever; a failing poll is logged and the next one tried."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval_s)
            self._wake.clear()
            try:
                await asyncio.to_thread(self.check_once)
            except Exception:
                log.exception("model watcher poll failed; trying again at the next one")

    def check_once(self) -> ReloadOutcome:
        """One poll (blocking): load what changed and settled, check it, swap it in."""
        with self._lock:
            outcome = self._check()
        if outcome.loaded:
            release_freed_memory()  # the models swapped out, or loaded and not used
        return outcome

    def _check(self) -> ReloadOutcome:
        outcome = ReloadOutcome()
        classifier_key = self._classifier_key()
        try:
            backbone_key = self._core.backend.candidate()
        except BackendUnavailableError:
            backbone_key = None  # health reports it; models are looked at again next poll
        for name, watched, key in (
            ("classifier", self._classifier, classifier_key),
            ("backbone", self._backbone, backbone_key),
        ):
            if key is not None and key not in (watched.current, watched.seen, watched.refused):
                log.info(
                    "hot reload: the %s changed; swapped in at the next poll if it stays so", name
                )
        load_classifier = self._classifier.settled_change(classifier_key)
        load_backbone = self._backbone.settled_change(backbone_key)
        # A new backbone with another feature size needs the classifier trained on it, and
        # the other way round: when one settles, a pending (even refused) other comes along.
        if load_classifier and self._backbone.may_join(backbone_key):
            load_backbone = True
        if load_backbone and self._classifier.may_join(classifier_key):
            load_classifier = True

        outcome.loaded = load_backbone or load_classifier
        backbone: PreparedModel | None = None
        classifier: Classifier | None = None
        if load_backbone:
            backbone = self._try(outcome, "backbone", self._core.backend.prepare)
            if backbone is None:
                self._backbone.refuse(backbone_key, misfit=False)
        if load_classifier:
            classifier = self._try(outcome, "classifier", self._core.read_classifier)
            if classifier is None:
                self._classifier.refuse(classifier_key, misfit=False)
            elif classifier.info.sha256 == self._core.identity().classifier_sha256:
                self._classifier.current = classifier_key  # same bytes, touched: nothing to do
                classifier = None
        if backbone is None and classifier is None:
            return outcome
        try:
            self._core.swap(backbone, classifier)
        except MatcherError as exc:
            # The new pair does not fit (another feature size): refuse what was new. It is
            # tried again when its files change or when its partner changes (above).
            if backbone is not None:
                self._backbone.refuse(backbone_key, misfit=True)
                self._refuse(outcome, "backbone", str(exc))
            if classifier is not None:
                self._classifier.refuse(classifier_key, misfit=True)
                self._refuse(outcome, "classifier", str(exc))
            return outcome
        if backbone is not None:
            self._backbone.current = backbone_key
            outcome.swapped.append("backbone")
        if classifier is not None:
            self._classifier.current = classifier_key
            outcome.swapped.append("classifier")
        model = self._core.identity()
        metrics.record_models_loaded(model.backbone, model.model_version, model.classifier_sha256)
        engine = self._core.describe().backbone
        metrics.record_engine(engine.engine, engine.precision)
        log.info(
            "hot reload: now serving %s version %d with classifier %s (swapped %s)",
            model.backbone,
            model.model_version,
            model.classifier_sha256[:12],
            ", ".join(outcome.swapped),
        )
        return outcome

    def _try(self, outcome: ReloadOutcome, name: str, load: Callable[[], T]) -> T | None:
        try:
            return load()
        except MatcherError as exc:
            self._refuse(outcome, name, str(exc))
        except Exception as exc:
            # Unforeseen (a TensorFlow or unpickling error): still a refusal, so that the
            # same files are not loaded again at every poll; the traceback goes to the log.
            log.exception("loading the new %s failed", name)
            self._refuse(outcome, name, f"{type(exc).__name__}: {exc}")
        return None

    def _refuse(self, outcome: ReloadOutcome, name: str, reason: str) -> None:
        outcome.refused[name] = reason
        metrics.record_reload_failure(name, reason)
        log.warning("hot reload refused the new %s, the old one keeps serving: %s", name, reason)

    def _classifier_key(self) -> Hashable | None:
        """Sizes, times and inodes of the classifier file and its companions, or None."""
        # The classifier file, or a run folder (knn, prototype): its companions are inside.
        path = self._classifier_path
        run_dir = path if path.is_dir() else path.parent
        paths = [path] + [run_dir / name for name in COMPANION_FILES]
        stamps: list[tuple[int, int, int] | None] = []
        for path in paths:
            try:
                st = path.stat()
            except FileNotFoundError:
                stamps.append(None)
                continue
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return None if stamps[0] is None else tuple(stamps)
