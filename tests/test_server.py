"""The real server on a free port, called by a real gRPC client."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from matcher.v1 import matcher_pb2
from tests import samples
from tests.conftest import query_images

SERVING = health_pb2.HealthCheckResponse.SERVING


async def match(stub, image: bytes, top_k: int = 0) -> matcher_pb2.MatchResponse:
    return await stub.Match(matcher_pb2.ImageRequest(image=image, top_k=top_k), timeout=60)


async def test_every_held_out_query_comes_back_with_its_own_label_first(stub, demo) -> None:
    queries = query_images(demo)
    assert len(queries) == len(demo.labels) * demo.query_views
    wrong = []
    for label, path in queries:
        response = await match(stub, path.read_bytes(), top_k=1)
        if response.matches[0].label != label:
            wrong.append((path.name, response.matches[0].label))
    assert not wrong, wrong


async def test_scores_are_probabilities_sorted_highest_first(stub, demo) -> None:
    _, path = query_images(demo)[0]
    response = await match(stub, path.read_bytes())
    scores = [m.score for m in response.matches]
    assert len(scores) == len(demo.labels)
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert sum(scores) == pytest.approx(1.0, abs=1e-3)
    assert sorted(m.label for m in response.matches) == sorted(demo.labels)


@pytest.mark.parametrize("top_k", [1, 3, 12, 500])
async def test_top_k_is_honoured(stub, demo, top_k: int) -> None:
    response = await match(stub, samples.jpeg(), top_k=top_k)
    assert len(response.matches) == min(top_k, len(demo.labels))


async def test_response_names_the_models_that_answered(stub, trained) -> None:
    response = await match(stub, samples.jpeg(), top_k=1)
    assert response.model.backbone == "efficientnet_lite0"
    assert response.model.model_version == 1
    assert response.model.classifier_sha256 == trained.report["classifier"]["sha256"]


@pytest.mark.parametrize("name", sorted(samples.good_images()))
async def test_every_accepted_format_is_matched(stub, name: str) -> None:
    response = await match(stub, samples.good_images()[name], top_k=2)
    assert len(response.matches) == 2


@pytest.mark.parametrize("name", sorted(samples.bad_images()))
async def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(
    stub, health_stub, name: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await match(stub, samples.bad_images()[name])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details()
    health = await health_stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == SERVING
    response = await match(stub, samples.jpeg(), top_k=1)
    assert response.matches


async def test_truncated_jpeg_names_the_decoder_problem(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await match(stub, samples.bad_images()["truncated_jpeg"])
    assert "could not be decoded" in caught.value.details()
    assert "Graph execution" not in caught.value.details()


async def test_embed_returns_the_backbone_features(stub, embedded_backend) -> None:
    image = samples.jpeg()
    response = await stub.Embed(matcher_pb2.ImageRequest(image=image), timeout=60)
    expected = embedded_backend.features([image])[0]
    assert len(response.features) == 1280
    assert response.features == pytest.approx(expected.tolist(), abs=1e-5)


async def test_embed_refuses_bad_images_too(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(matcher_pb2.ImageRequest(image=b"not an image"), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_model_info_describes_both_models(stub, demo, trained) -> None:
    info = await stub.GetModelInfo(matcher_pb2.GetModelInfoRequest(), timeout=60)
    assert list(info.labels) == sorted(demo.labels)
    assert (info.backbone, info.input_size, info.feature_dim) == ("efficientnet_lite0", 224, 1280)
    assert (info.engine, info.precision) == ("openvino", "fp32")  # the default, where exported
    assert info.classifier_type == "CalibratedClassifierCV(SVC)"
    best = trained.report["search"]["best_params"]
    assert info.classifier_params["kernel"] == best["kernel"]
    assert info.classifier_params["C"] == str(best["C"])
    assert info.HasField("holdout_accuracy")
    assert info.holdout_accuracy == pytest.approx(trained.report["holdout"]["accuracy"])
    assert info.feature_backend == "embedded"
    assert info.feature_layer == "head_activation"


async def test_message_above_the_receive_limit_is_resource_exhausted(stub, settings) -> None:
    too_big = b"\xff" * (settings.max_receive_bytes + 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await match(stub, too_big)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
