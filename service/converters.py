"""All conversion between protobuf messages and the core's plain data lives here."""

from __future__ import annotations

from matcher.domain import (
    EmbedResult,
    LabelScore,
    MatchResult,
    ModelDescription,
    ModelIdentity,
    Reference,
)
from matcher.errors import InvalidRequestError
from matcher.v1 import matcher_pb2

VERDICTS = {True: matcher_pb2.MATCH, False: matcher_pb2.NO_MATCH}
#: The Views enum and the modes of `matcher.views`.
VIEWS = {
    "whole": matcher_pb2.VIEWS_WHOLE,
    "crops": matcher_pb2.VIEWS_CROPS,
    "crops_rotations": matcher_pb2.VIEWS_CROPS_ROTATIONS,
}
_MODES: dict[int, str] = {int(value): mode for mode, value in VIEWS.items()}


def views_from_proto(value: int) -> str | None:
    """The mode a request's `views` names; None for unset (the server's default)."""
    if value == matcher_pb2.VIEWS_UNSPECIFIED:
        return None
    if value not in _MODES:
        raise InvalidRequestError(
            f"unknown views value {value}; use VIEWS_WHOLE, VIEWS_CROPS or VIEWS_CROPS_ROTATIONS"
        )
    return _MODES[value]


def match_args(
    request: matcher_pb2.ImageRequest,
) -> tuple[bytes, int, float | None, str | None, int | None]:
    """`MatcherCore.match`'s arguments from an ImageRequest: image, top_k, threshold, views,
    min_inliers."""
    threshold = request.no_match_threshold if request.HasField("no_match_threshold") else None
    inliers = request.min_inliers if request.HasField("min_inliers") else None
    return request.image, request.top_k, threshold, views_from_proto(request.views), inliers


def identity_to_proto(identity: ModelIdentity) -> matcher_pb2.ModelIdentity:
    return matcher_pb2.ModelIdentity(
        backbone=identity.backbone,
        model_version=identity.model_version,
        classifier_sha256=identity.classifier_sha256,
    )


def label_score_to_proto(match: LabelScore) -> matcher_pb2.LabelScore:
    message = matcher_pb2.LabelScore(
        label=match.label,
        score=match.score,
        reference_id=match.reference_id,
        query_view=match.query_view,
    )
    if match.similarity is not None:
        message.similarity = match.similarity
    if match.inliers is not None:
        message.inliers = match.inliers
        message.verified_reference_id = match.verified_reference_id
    return message


def match_to_proto(result: MatchResult) -> matcher_pb2.MatchResponse:
    response = matcher_pb2.MatchResponse(
        matches=[label_score_to_proto(m) for m in result.matches],
        model=identity_to_proto(result.model),
        views=VIEWS[result.views],
    )
    if result.verdict is not None:
        response.verdict = VERDICTS[result.verdict.matched]
        response.verdict_score = result.verdict.score
        response.threshold = result.verdict.threshold
        if result.verdict.inliers is not None and result.verdict.min_inliers is not None:
            response.inliers = result.verdict.inliers
            response.min_inliers = result.verdict.min_inliers
    return response


def reference_to_proto(reference: Reference) -> matcher_pb2.Reference:
    return matcher_pb2.Reference(
        reference_id=reference.reference_id,
        label=reference.label,
        image=reference.image,
        media_type=reference.media_type,
    )


def embed_to_proto(result: EmbedResult) -> matcher_pb2.EmbedResponse:
    return matcher_pb2.EmbedResponse(
        features=result.features.tolist(), model=identity_to_proto(result.model)
    )


def description_to_proto(description: ModelDescription) -> matcher_pb2.ModelInfo:
    info = matcher_pb2.ModelInfo(
        labels=description.labels,
        backbone=description.backbone.name,
        input_size=description.backbone.input_size,
        feature_dim=description.backbone.feature_dim,
        classifier_type=description.classifier_type,
        classifier_params=description.classifier_params,
        model=identity_to_proto(description.model),
        feature_backend=description.feature_backend,
        feature_layer=description.backbone.layer,
        reference_views=description.reference_views,
        default_views=VIEWS[description.default_views],
        engine=description.backbone.engine,
        precision=description.backbone.precision,
    )
    if description.holdout_accuracy is not None:
        info.holdout_accuracy = description.holdout_accuracy
    if description.no_match_threshold is not None:
        info.no_match_threshold = description.no_match_threshold
    if description.min_inliers is not None:
        info.min_inliers = description.min_inliers
    return info
