from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Views(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VIEWS_UNSPECIFIED: _ClassVar[Views]
    VIEWS_WHOLE: _ClassVar[Views]
    VIEWS_CROPS: _ClassVar[Views]
    VIEWS_CROPS_ROTATIONS: _ClassVar[Views]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    MATCH: _ClassVar[Verdict]
    NO_MATCH: _ClassVar[Verdict]
VIEWS_UNSPECIFIED: Views
VIEWS_WHOLE: Views
VIEWS_CROPS: Views
VIEWS_CROPS_ROTATIONS: Views
VERDICT_UNSPECIFIED: Verdict
MATCH: Verdict
NO_MATCH: Verdict

class ImageRequest(_message.Message):
    __slots__ = ("image", "top_k", "no_match_threshold", "views", "min_inliers")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    NO_MATCH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    MIN_INLIERS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_k: int
    no_match_threshold: float
    views: Views
    min_inliers: int
    def __init__(self, image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., no_match_threshold: _Optional[float] = ..., views: _Optional[_Union[Views, str]] = ..., min_inliers: _Optional[int] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "score", "reference_id", "similarity", "query_view", "inliers", "verified_reference_id")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    QUERY_VIEW_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_REFERENCE_ID_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    reference_id: str
    similarity: float
    query_view: str
    inliers: int
    verified_reference_id: str
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., reference_id: _Optional[str] = ..., similarity: _Optional[float] = ..., query_view: _Optional[str] = ..., inliers: _Optional[int] = ..., verified_reference_id: _Optional[str] = ...) -> None: ...

class ModelIdentity(_message.Message):
    __slots__ = ("backbone", "model_version", "classifier_sha256")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_SHA256_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    model_version: int
    classifier_sha256: str
    def __init__(self, backbone: _Optional[str] = ..., model_version: _Optional[int] = ..., classifier_sha256: _Optional[str] = ...) -> None: ...

class MatchResponse(_message.Message):
    __slots__ = ("matches", "model", "verdict", "verdict_score", "threshold", "views", "inliers", "min_inliers")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    VERDICT_SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    MIN_INLIERS_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[LabelScore]
    model: ModelIdentity
    verdict: Verdict
    verdict_score: float
    threshold: float
    views: Views
    inliers: int
    min_inliers: int
    def __init__(self, matches: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., model: _Optional[_Union[ModelIdentity, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., verdict_score: _Optional[float] = ..., threshold: _Optional[float] = ..., views: _Optional[_Union[Views, str]] = ..., inliers: _Optional[int] = ..., min_inliers: _Optional[int] = ...) -> None: ...

class GetReferenceRequest(_message.Message):
    __slots__ = ("reference_id",)
    REFERENCE_ID_FIELD_NUMBER: _ClassVar[int]
    reference_id: str
    def __init__(self, reference_id: _Optional[str] = ...) -> None: ...

class Reference(_message.Message):
    __slots__ = ("reference_id", "label", "image", "media_type")
    REFERENCE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    reference_id: str
    label: str
    image: bytes
    media_type: str
    def __init__(self, reference_id: _Optional[str] = ..., label: _Optional[str] = ..., image: _Optional[bytes] = ..., media_type: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("features", "model")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedScalarFieldContainer[float]
    model: ModelIdentity
    def __init__(self, features: _Optional[_Iterable[float]] = ..., model: _Optional[_Union[ModelIdentity, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("labels", "backbone", "input_size", "feature_dim", "classifier_type", "classifier_params", "holdout_accuracy", "model", "feature_backend", "feature_layer", "reference_views", "no_match_threshold", "default_views", "engine", "precision", "min_inliers")
    class ClassifierParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_TYPE_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_PARAMS_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FEATURE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LAYER_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    NO_MATCH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VIEWS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MIN_INLIERS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    backbone: str
    input_size: int
    feature_dim: int
    classifier_type: str
    classifier_params: _containers.ScalarMap[str, str]
    holdout_accuracy: float
    model: ModelIdentity
    feature_backend: str
    feature_layer: str
    reference_views: int
    no_match_threshold: float
    default_views: Views
    engine: str
    precision: str
    min_inliers: int
    def __init__(self, labels: _Optional[_Iterable[str]] = ..., backbone: _Optional[str] = ..., input_size: _Optional[int] = ..., feature_dim: _Optional[int] = ..., classifier_type: _Optional[str] = ..., classifier_params: _Optional[_Mapping[str, str]] = ..., holdout_accuracy: _Optional[float] = ..., model: _Optional[_Union[ModelIdentity, _Mapping]] = ..., feature_backend: _Optional[str] = ..., feature_layer: _Optional[str] = ..., reference_views: _Optional[int] = ..., no_match_threshold: _Optional[float] = ..., default_views: _Optional[_Union[Views, str]] = ..., engine: _Optional[str] = ..., precision: _Optional[str] = ..., min_inliers: _Optional[int] = ...) -> None: ...
