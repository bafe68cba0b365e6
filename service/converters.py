"""All conversion between protobuf messages and the core's plain data lives here."""

from __future__ import annotations

from matcher.domain import EmbedResult, MatchResult, ModelDescription, ModelIdentity
from matcher.v1 import matcher_pb2


def identity_to_proto(identity: ModelIdentity) -> matcher_pb2.ModelIdentity:
    return matcher_pb2.ModelIdentity(
        backbone=identity.backbone,
        model_version=identity.model_version,
        classifier_sha256=identity.classifier_sha256,
    )


def match_to_proto(result: MatchResult) -> matcher_pb2.MatchResponse:
    return matcher_pb2.MatchResponse(
        matches=[matcher_pb2.LabelScore(label=m.label, score=m.score) for m in result.matches],
        model=identity_to_proto(result.model),
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
    )
    if description.holdout_accuracy is not None:
        info.holdout_accuracy = description.holdout_accuracy
    return info
