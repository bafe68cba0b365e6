"""The matcher core: image bytes -> views -> features -> scores -> ranked labels + verdict.

It knows nothing of gRPC. Blocking TensorFlow and scikit-learn calls run in worker threads
(through the dynamic batcher: one thread call per batch, for both models), so the event loop
keeps serving while a model works.

Hot reload swaps the backbone and the classifier between batches, never during one: every answer
is computed by one pair of models and names that pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from matcher import metrics
from matcher.admission import PixelBudget
from matcher.backends.base import FeatureBackend, PreparedModel
from matcher.batcher import BatchingOptions, DynamicBatcher
from matcher.classifier import Classifier
from matcher.domain import (
    BackboneInfo,
    EmbedResult,
    LabelScore,
    MatchResult,
    ModelDescription,
    ModelIdentity,
    Reference,
    Verdict,
)
from matcher.errors import InvalidImageError, InvalidRequestError, ModelLoadError, NotReadyError
from matcher.geometry import (
    CANDIDATE_LABELS,
    KEYPOINT_WORKERS,
    LOCAL_SIDE,
    Box,
    Focus,
    LocalFeatures,
    answering,
    focus_decode_pixels,
    focus_held_pixels,
    focused_features,
    leading,
    local_features,
    verify_labels,
)
from matcher.images import (
    ImageHeader,
    ImageLimits,
    for_graph,
    inspect_image,
    load_image_readers,
)
from matcher.views import (
    DEFAULT_VIEWS,
    FALLBACK_INPUT_SIDE,
    PLANS,
    QueryView,
    check_mode,
    largest_needed,
    merge_similarity,
    render_views,
    rewrite_side,
    view_pixels,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Answer:
    """One image's answer and the models that computed it."""

    features: np.ndarray
    #: Each label's score (`Classifier.scores`); a photo's views merge by `merge_views`.
    scores: np.ndarray
    classifier: Classifier
    model: ModelIdentity
    #: Each label's most similar reference view: similarity and index row (None without one).
    nearest: tuple[np.ndarray, np.ndarray] | None


@dataclass(frozen=True)
class _Merged:
    """The answers for every view of one photo, merged per label."""

    whole: _Answer
    probabilities: np.ndarray
    #: Each label's best similarity, its reference id and the view it came from (or None).
    nearest: tuple[np.ndarray, list[str], list[str]] | None


@dataclass(frozen=True)
class _Checked:
    """Geometric verification of a photo's first labels (`matcher.geometry`)."""

    #: Inliers and the reference id they are on, by label column, for the labels checked.
    found: dict[int, tuple[int, str]]
    min_inliers: int
    #: The verified label columns that may answer, most inliers first (`answering`).
    answering: list[int]
    #: The label column geometry ranks first, verified or not (`leading`); None: none.
    leading: int | None


class MatcherCore:
    """Matches images against the catalogue once `load` has succeeded."""

    def __init__(
        self,
        backend: FeatureBackend,
        load_classifier: Callable[[], Classifier],
        limits: ImageLimits,
        batching: BatchingOptions | None = None,
        no_match_threshold: float | None = None,
        default_views: str = DEFAULT_VIEWS,
        pixel_budget: PixelBudget | None = None,
        min_inliers: int | None = None,
    ) -> None:
        self._backend = backend
        #: The server's threshold, over the calibrated one (None: use the calibrated one).
        self._no_match_threshold = no_match_threshold
        #: The server's inliers that verify a label, over the run's (0: no verification).
        self._min_inliers = min_inliers
        #: The views a request that names none is looked at with (`matcher.views`).
        self.default_views = check_mode(default_views)
        self._load_classifier = load_classifier
        self._limits = limits
        #: Bounds the pixels being decoded at once (`matcher.admission`); None: unbounded.
        self.pixel_budget = pixel_budget
        # Held for each batch and for each swap, so a swap waits for the batch in flight.
        self._swap_lock = threading.Lock()
        # The served pair as one reference, replaced whole, so that readers outside a batch
        # (GetModelInfo) never see half a swap.
        self._pair: tuple[BackboneInfo, Classifier] | None = None
        # Finding keypoints holds ~80 MB (SIFT's doubled pyramid of a 640-pixel photo): at most
        # KEYPOINT_WORKERS at once, however many requests are in flight.
        self._keypoint_slots = asyncio.Semaphore(KEYPOINT_WORKERS)
        # One worker-thread call per batch does both models: features and probabilities.
        self.batcher = DynamicBatcher(self._answer_batch, batching or BatchingOptions())

    def load(self) -> None:
        """Load both models and check that they fit together (blocking)."""
        load_image_readers()
        self._backend.load()
        classifier = self._load_classifier()
        check_fit(self._backend.info, classifier)
        self._pair = (self._backend.info, classifier)

    @property
    def backend(self) -> FeatureBackend:
        return self._backend

    def read_classifier(self) -> Classifier:
        """Load the configured classifier file afresh, verified (blocking; not served yet)."""
        return self._load_classifier()

    def swap(self, backbone: PreparedModel | None, classifier: Classifier | None) -> None:
        """Serve a new backbone and/or classifier from the next batch on (blocking).

        The pair that would result is checked first; on ModelLoadError nothing changes.
        """
        _, current = self._served_pair()
        new_classifier = classifier or current
        check_fit(backbone.info if backbone else self._backend.info, new_classifier)
        with self._swap_lock:
            if backbone is not None:
                self._backend.activate(backbone)
            self._pair = (self._backend.info, new_classifier)

    async def close(self) -> None:
        """Stop the batcher, then release the backend's connections (at server stop)."""
        await self.batcher.close()
        await asyncio.to_thread(self._backend.close)

    def check_backend(self) -> None:
        """Raise BackendUnavailableError when the feature backend cannot be reached (blocking)."""
        self._backend.check()

    async def match(
        self,
        image: bytes,
        top_k: int,
        no_match_threshold: float | None = None,
        views: str | None = None,
        min_inliers: int | None = None,
    ) -> MatchResult:
        """Rank the labels for one image; top_k == 0 means all labels.

        `views` (a mode of `matcher.views`; None: the server's default) says how thoroughly to
        look: each view is matched and each label keeps its best view. With an index, each
        label comes with its nearest reference view, and the verdict says whether the nearest
        view of all reaches the threshold: `no_match_threshold`, else the server's, else the
        one calibrated at training for these views.

        Where the run has keypoints (`matcher.geometry`), the first labels are checked by
        geometry too: a verified label ranks first, and the photo matches when a label is
        verified (`min_inliers`: the request's, else the server's, else the run's; 0 turns it
        off) or, failing that, when its similarity reaches the rescue threshold.
        """
        if no_match_threshold is not None and not -1.0 <= no_match_threshold <= 1.0:
            raise InvalidRequestError(
                f"no_match_threshold {no_match_threshold} is not a similarity in [-1, 1]"
            )
        if min_inliers is not None and min_inliers < 0:
            raise InvalidRequestError(f"min_inliers {min_inliers} is negative")
        mode = check_mode(views or self.default_views)
        # Not loaded yet: `_input_side` says so before any work.
        side = self._input_side()
        required = self._required_inliers(min_inliers)
        received = image  # a closer look decodes these, as training does its photos' files
        answers, local, image = await self._answers(image, mode, side, keypoints=bool(required))
        merged = _merge(answers, PLANS[mode])
        checked = None
        if local is not None and required:
            cache: dict[str, int] = {}  # inliers by catalogue photo, kept for a closer look
            checked = await asyncio.to_thread(_verify, merged, answers, local, required, cache)
            focus: dict[int, Focus] = {}
            if checked is not None and not checked.answering:  # look closer (`Focus`)
                focus = await self._focus(received, merged, mode)
            if focus:
                checked = await asyncio.to_thread(
                    _verify, merged, answers, local, required, cache, focus
                )
        ranked = _ranked(merged, top_k, checked)
        verdict = self._verdict(merged, mode, no_match_threshold, checked)
        return MatchResult(ranked, merged.whole.model, verdict, mode)

    def _required_inliers(self, requested: int | None) -> int:
        """The inliers that verify a label for this request; 0 when nothing is checked (the
        served run has no keypoints, or the request or the server turned it off)."""
        _, classifier = self._served_pair()
        catalogue = classifier.catalogue
        if catalogue is None or catalogue.verification is None:
            return 0
        found = _first_set(requested, self._min_inliers, catalogue.verification.min_inliers)
        return int(found or 0)

    def _verdict(
        self, merged: _Merged, mode: str, requested: float | None, checked: _Checked | None
    ) -> Verdict | None:
        """The verdict on the merged views, against the first threshold that is set.

        A run calibrated before multi-view queries has only the whole photo's threshold: the
        verdict is then judged on the whole view, which that threshold fits."""
        catalogue = merged.whole.classifier.catalogue
        whole = merged.whole.nearest
        if merged.nearest is None or whole is None or catalogue is None:
            return None
        if checked is not None and catalogue.verification is not None:
            threshold = _first_set(
                requested,
                self._no_match_threshold,
                catalogue.verification.thresholds.get(mode),
                catalogue.thresholds.get(mode),
            )
            if threshold is None:
                return None
            score = float(merged.nearest[0].max())
            verified = checked.answering
            count = checked.found[verified[0]][0] if verified else _most_inliers(checked)
            matched = bool(verified) or score >= threshold
            return Verdict(matched, score, threshold, count, checked.min_inliers)
        if (
            requested is None
            and self._no_match_threshold is None
            and mode not in catalogue.thresholds
        ):
            threshold, similarity = catalogue.threshold, whole[0]
        else:
            threshold = _first_set(
                requested, self._no_match_threshold, catalogue.thresholds.get(mode)
            )
            similarity = merged.nearest[0]
        if threshold is None:
            return None
        score = float(similarity.max())
        return Verdict(score >= threshold, score, threshold)

    async def reference(self, reference_id: str) -> Reference:
        """A reference view's thumbnail (blocking file read, done in a worker thread)."""
        _, classifier = self._served_pair()
        if classifier.catalogue is None:
            raise NotReadyError(
                "the classifier came without an index, so there are no reference views; train "
                "again to write one (or load it through its manifest, not --classifier-sha256)"
            )
        return await asyncio.to_thread(classifier.catalogue.reference, reference_id)

    async def embed(self, image: bytes) -> EmbedResult:
        """The bottleneck feature vector of one image (the whole photo)."""
        (answer,), _, _ = await self._answers(image, "whole", self._input_side())
        return EmbedResult(answer.features, answer.model)

    def identity(self) -> ModelIdentity:
        """The served backbone and classifier (one pair, even while a swap happens)."""
        backbone, classifier = self._served_pair()
        return ModelIdentity(backbone.name, backbone.version, classifier.info.sha256)

    def describe(self) -> ModelDescription:
        backbone, classifier = self._served_pair()
        info = classifier.info
        catalogue = classifier.catalogue
        return ModelDescription(
            labels=list(info.labels),
            backbone=backbone,
            classifier_type=info.type_name,
            classifier_params=dict(info.params),
            holdout_accuracy=info.holdout_accuracy,
            model=ModelIdentity(backbone.name, backbone.version, info.sha256),
            feature_backend=self._backend.kind,
            reference_views=catalogue.index.size if catalogue else 0,
            no_match_threshold=self._default_threshold(classifier),
            default_views=self.default_views,
            min_inliers=self._required_inliers(None) or None,
        )

    def _default_threshold(self, classifier: Classifier) -> float | None:
        """The similarity threshold a request that sets none is judged against (as
        `_verdict` picks it for the default views)."""
        catalogue = classifier.catalogue
        if catalogue is None:
            return self._no_match_threshold
        mode = self.default_views
        rescue = None
        if self._required_inliers(None) and catalogue.verification is not None:
            rescue = catalogue.verification.thresholds.get(mode)
        return _first_set(
            self._no_match_threshold, rescue, catalogue.thresholds.get(mode, catalogue.threshold)
        )

    def _input_side(self) -> int:
        """The network's input side: the views are cut and the decode budget counted for it.

        The TF Serving backend cannot read it from the model (its signature takes encoded
        strings): the classifier's report says what it was trained with; failing both, the
        largest side of the backbones export offers (a view keeps more pixels, never fewer).
        """
        backbone, classifier = self._served_pair()
        return backbone.input_size or classifier.info.input_size or FALLBACK_INPUT_SIDE

    def _served_pair(self) -> tuple[BackboneInfo, Classifier]:
        pair = self._pair
        if pair is None or not self._backend.ready:
            raise NotReadyError("models are not loaded yet; retry shortly")
        return pair

    def inspect(self, image: bytes) -> ImageHeader:
        """The image's header, checked against the server's limits (InvalidImageError), as
        Match checks it: for callers that keep a photo without matching it."""
        return inspect_image(image, self._limits)

    async def _answers(
        self, image: bytes, mode: str, input_side: int, keypoints: bool = False
    ) -> tuple[list[_Answer], LocalFeatures | None, bytes]:
        """The answers for each view of one image, computed in one batch (with concurrent
        requests' views), with `keypoints` the photo's local features, found while the model
        works, and the bytes the graph decoded (`for_graph`'s)."""
        header = inspect_image(image, self._limits)
        budget = self.pixel_budget
        # Held through every decode the request causes, until its answer.
        pixels = request_pixels(header, mode, input_side, keypoints)
        held = budget.hold(pixels) if budget else contextlib.nullcontext()
        async with held:
            if header.needs_rewrite:  # HEIC, WebP or turned: upright PNG, off the event loop
                keep = rewrite_side(input_side)
                image = await asyncio.to_thread(for_graph, image, header, keep)
            views = [image]
            if mode != "whole":  # a decode, crops and encodes: off the event loop too
                views = await asyncio.to_thread(render_views, image, mode, input_side)
            if not keypoints:
                return await self.batcher.features_of_views(views), None, image
            answers, local = await asyncio.gather(
                self.batcher.features_of_views(views), self._keypoints(image)
            )
        return answers, local, image

    async def _keypoints(self, image: bytes) -> LocalFeatures | None:
        async with self._keypoint_slots:
            return await asyncio.to_thread(_keypoints_of, image)

    async def _focus(self, image: bytes, merged: _Merged, mode: str) -> dict[int, Focus]:
        """The closer looks (`Focus`) for the label columns `_verify` checks: each at the crop
        view that label was found in, none for a label found in the whole photo (or a turn of
        it), or where the photo decodes for them beyond FOCUS_MAX_PIXELS. `image` is the
        request's bytes: a turned phone JPEG decodes at a reduced scale for it, as training
        decodes the photo's file, where the graph's upright PNG would decode whole."""
        if merged.nearest is None:
            return {}
        plan = {view.name: view for view in PLANS[mode]}
        crops = {
            column: view
            for column in _candidates(merged)
            if (view := plan[merged.nearest[2][column]]).is_crop
        }
        if not crops:
            return {}
        header = inspect_image(image, self._limits)
        decodes = {box: focus_decode_pixels(header, box) for box in {v.box for v in crops.values()}}
        found_in = {c: view for c, view in crops.items() if decodes[view.box] is not None}
        boxes = list(dict.fromkeys(view.box for view in found_in.values()))
        if not boxes:
            return {}
        decoded = max(decodes[box] or 0 for box in boxes)  # each is set: `found_in` has them
        # One decode and one keypoint slot for all of the photo's crops, in turn: shared
        # between the workers, two decodes a photo raised tests/test_memory.py's embedded peak
        # from 2.5 to 3.0 GB (3.7 on a busy machine; the bound is 3) for ~0.1 s less at p95.
        budget = self.pixel_budget
        held = (
            budget.hold(focus_held_pixels(decoded, boxes)) if budget else contextlib.nullcontext()
        )
        async with held, self._keypoint_slots:
            found = await asyncio.to_thread(_focused_of, image, boxes)
        if found is None:
            return {}
        by_box = dict(zip(boxes, found, strict=True))
        return {column: Focus(view.name, by_box[view.box]) for column, view in found_in.items()}

    def _answer_batch(self, images: Sequence[bytes]) -> list[_Answer]:
        """Blocking: features of a batch, then the classifier's scores for all of it."""
        with self._swap_lock:
            with metrics.BACKEND_DURATION.labels(self._backend.kind).time():
                features = self._backend.features(images)
            backbone, classifier = self._served_pair()
            if features.shape[1] != classifier.info.feature_dim:
                # TF Serving swapped in a model of another size under a label or policy.
                raise ModelLoadError(
                    f"the backend answered {features.shape[1]} features; the classifier "
                    f"expects {classifier.info.feature_dim}"
                )
            scores, found = classifier.scores(features)
        model = ModelIdentity(backbone.name, backbone.version, classifier.info.sha256)
        if classifier.catalogue is None or found is None:
            return [
                _Answer(row, score, classifier, model, None)
                for row, score in zip(features, scores, strict=True)
            ]
        # Index labels equal the classifier's (checked at load), so columns line up.
        return [
            _Answer(row, score, classifier, model, (similar, rows))
            for row, score, similar, rows in zip(
                features, scores, found.similarity, found.row, strict=True
            )
        ]


def _merge(answers: Sequence[_Answer], plan: Sequence[QueryView]) -> _Merged:
    """One photo's answer from its views' answers: each label's best score and nearest view.

    A hot reload between batches cannot split a photo's views: they are in one batch."""
    whole = answers[0]
    classifier = whole.classifier
    scores = np.stack([answer.scores for answer in answers])  # [V, L]
    if whole.nearest is None or classifier.catalogue is None:
        return _Merged(whole, classifier.merge_views(scores, None), None)
    per_view = np.stack([a.nearest[0] for a in answers if a.nearest])
    probabilities = classifier.merge_views(scores, per_view)
    similarity, view = merge_similarity(per_view)
    rows = np.stack([a.nearest[1] for a in answers if a.nearest])[view, np.arange(len(view))]
    ids = classifier.catalogue.index.ids
    return _Merged(
        whole,
        probabilities,
        (similarity, [ids[row] for row in rows], [plan[v].name for v in view]),
    )


def request_pixels(header: ImageHeader, mode: str, input_side: int, keypoints: bool) -> int:
    """The most pixels one request's decodes hold at once (`_answers`), by its header: what
    the decode budget admits it by.

    In turn: `for_graph`'s rewrite (HEIC, WebP, turned: its decode and the reduced PNG), whose
    PNG is held to the end and which every later decode then reads whole; the decode the views
    are cut from (`render_views`); and, while the views wait for the model, the graph's decode
    beside the keypoints' (a decode at most `LOCAL_SIDE` a side, a JPEG at a reduced scale, and
    its grey copy, a quarter of it) and the graph's of the views. A request above the whole
    budget (a 50-megapixel PNG: its decode beside its keypoints') runs alone."""
    keep = rewrite_side(input_side)
    rewritten = header.rewritten_pixels(keep)
    rewrite = header.upright_pixels(keep) + rewritten if rewritten else 0
    views = view_pixels(mode, input_side)
    graph = (rewritten or header.decode_pixels(input_side)) + views
    local = 0
    if keypoints:
        decoded = rewritten or header.upright_pixels(LOCAL_SIDE)
        local = decoded + -(-decoded // 4)
    cut = 0
    if mode != "whole":
        cut = rewritten or header.upright_pixels(largest_needed(PLANS[mode], input_side))
    return max(rewrite, rewritten + views + max(cut, graph + local))


def check_fit(backbone: BackboneInfo, classifier: Classifier) -> None:
    """Raise ModelLoadError unless the classifier was trained on this backbone's features."""
    if classifier.info.feature_dim != backbone.feature_dim:
        raise ModelLoadError(
            f"classifier expects {classifier.info.feature_dim} features but backbone "
            f"{backbone.name} gives {backbone.feature_dim}; retrain on this backbone"
        )
    if classifier.info.backbone not in (None, backbone.name):
        raise ModelLoadError(
            f"classifier was trained on {classifier.info.backbone} features but the "
            f"backend serves {backbone.name}"
        )


def _ranked(merged: _Merged, top_k: int, checked: _Checked | None = None) -> list[LabelScore]:
    # Stable sort so that equal scores keep the classifier's label order.
    order = np.argsort(-merged.probabilities, kind="stable").tolist()
    if checked is not None:  # verified labels first, most inliers first
        first = checked.answering or ([] if checked.leading is None else [checked.leading])
        order = first + [i for i in order if i not in first]
    if top_k:
        order = order[:top_k]
    labels = merged.whole.classifier.labels
    if merged.nearest is None:
        return [LabelScore(labels[i], float(merged.probabilities[i])) for i in order]
    similarity, ids, views = merged.nearest
    found = checked.found if checked is not None else {}
    return [
        LabelScore(
            labels[i],
            float(merged.probabilities[i]),
            ids[i],
            float(similarity[i]),
            views[i],
            found[i][0] if i in found else None,
            found[i][1] if i in found else "",
        )
        for i in order
    ]


def _verify(
    merged: _Merged,
    answers: Sequence[_Answer],
    local: LocalFeatures,
    min_inliers: int,
    cache: dict[str, int],
    focus: Mapping[int, Focus] | None = None,
) -> _Checked | None:
    """Blocking: the inliers of the first `CANDIDATE_LABELS` labels (`verify_labels`)."""
    catalogue = merged.whole.classifier.catalogue
    if catalogue is None or catalogue.verification is None:  # swapped for a run without
        return None
    first = _candidates(merged)
    features = np.stack([answer.features for answer in answers])
    store = catalogue.verification.keypoints
    found = verify_labels(local, features, first, catalogue.index, store, cache, focus)
    similarity = merged.nearest[0] if merged.nearest is not None else merged.probabilities
    return _Checked(
        found,
        min_inliers,
        answering(found, similarity, min_inliers),
        leading(found, similarity, min_inliers),
    )


def _candidates(merged: _Merged) -> list[int]:
    """The label columns geometry checks: the first `CANDIDATE_LABELS` by the pooled scores."""
    columns: list[int] = np.argsort(-merged.probabilities, kind="stable")[
        :CANDIDATE_LABELS
    ].tolist()
    return columns


def _keypoints_of(image: bytes) -> LocalFeatures | None:
    """The photo's keypoints, or None when Pillow cannot decode it: the model's decode, which
    runs beside this one, then answers for the request (one error, whichever came first)."""
    try:
        return local_features(image)
    except InvalidImageError:
        return None


def _focused_of(image: bytes, boxes: Sequence[Box]) -> list[LocalFeatures] | None:
    """Regions' keypoints (`focused_features`), or None when Pillow cannot decode the photo."""
    try:
        return focused_features(image, boxes)
    except InvalidImageError:
        return None


def _most_inliers(checked: _Checked) -> int:
    return max((count for count, _ in checked.found.values()), default=0)


def _first_set(*values: float | None) -> float | None:
    return next((value for value in values if value is not None), None)
