"""Feature extraction on real Ray clusters: one started in-process (`ray.init`), two nodes
simulated on this machine (`ray.cluster_utils.Cluster`), and one started by `ray start --head`
that `python -m train --ray ADDRESS` joins. Each answer is compared with the local pipeline's
(`matcher.extraction.extract_features`) on the same photos: same features, same order, same
rejections, same cache.

The tests of this module share the machine's Ray state, so each cluster is shut down before
the next one starts (pytest runs them in file order)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray

from matcher.extraction import FeatureCache, extract_features
from matcher.ray_extraction import RayOptions, extract_features_ray
from matcher.settings import BackendSettings
from tests import samples
from tests.cli_output import cli_stderr_lines

#: Ray's object store for the test clusters: the photos are small, the machine is shared.
OBJECT_STORE = 80 * 2**20


@pytest.fixture(scope="module")
def photos(demo, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Demo photos of several labels, a copy of one (the cache answers it) and a corrupt file."""
    folder = tmp_path_factory.mktemp("ray-photos")
    chosen = [
        p for label in demo.labels[:4] for p in sorted((demo.out / "train" / label).iterdir())[:6]
    ]
    paths = []
    for n, source in enumerate(chosen):
        paths.append(folder / f"{n:02d}{source.suffix}")
        shutil.copy(source, paths[-1])
    paths.append(folder / "copy-of-00.jpg")
    shutil.copy(paths[0], paths[-1])
    paths.insert(5, folder / "corrupt.jpg")
    paths[5].write_bytes(samples.jpeg()[:40])
    return paths


@pytest.fixture(scope="module")
def settings(exported_model) -> BackendSettings:
    return BackendSettings(backend="embedded", model_dir=exported_model.path.parent)


@pytest.fixture(scope="module")
def local(photos, embedded_backend):
    """What the in-process pipeline answers, without a cache."""
    return extract_features(photos, embedded_backend, None, progress=False)


def same_answer(found, expected) -> None:
    assert found.kept == expected.kept
    assert found.rejected == expected.rejected
    np.testing.assert_allclose(np.asarray(found.features), expected.features, atol=1e-5)


@pytest.fixture
def in_process_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, object_store_memory=OBJECT_STORE, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_answers_as_the_local_pipeline_with_the_same_cache_and_file(
    in_process_cluster, photos, settings, embedded_backend, local, tmp_path: Path
) -> None:
    info = embedded_backend.info
    cache = FeatureCache(tmp_path / "cache", info.cache_key)
    out = tmp_path / "features.npy"
    first = extract_features_ray(
        photos, settings, info.cache_key, info.feature_dim, cache, RayOptions(), 4,
        progress=False, out=out,
    )  # fmt: skip
    same_answer(first, local)
    assert "corrupt.jpg" in str(next(iter(first.rejected)))
    # The corrupt file never reaches the model; the copy does unless its original's entry
    # was written by then (a batch earlier).
    assert len(photos) - 2 <= first.computed <= len(photos) - 1
    # The same file the local pipeline writes, read back as a memory map.
    assert first.out == out and np.load(out).shape == (len(local.kept), info.feature_dim)
    entries = sorted((tmp_path / "cache" / info.cache_key).rglob("*.npy"))
    assert len(entries) == len(photos) - 2  # the copy shares its original's entry
    # Written by the actors, read by the local pipeline: one cache, one key.
    again = extract_features(photos, embedded_backend, cache, progress=False)
    assert again.computed == 0
    same_answer(again, local)
    second = extract_features_ray(
        photos, settings, info.cache_key, info.feature_dim, cache, RayOptions(), 4, progress=False
    )
    assert second.computed == 0
    same_answer(second, local)


def test_an_actor_on_another_model_is_refused_by_name(
    in_process_cluster, photos, settings, embedded_backend
) -> None:
    info = embedded_backend.info
    from matcher.errors import MatcherError

    # The actor's own error, as the local pipeline would raise it (not Ray's wrapper).
    with pytest.raises(MatcherError, match="every node must see the same SavedModel"):
        extract_features_ray(
            photos[:3], settings, "some-other-model", info.feature_dim, None, RayOptions(),
            progress=False,
        )  # fmt: skip


def test_two_nodes_share_the_work_and_answer_the_same(
    photos, settings, embedded_backend, local
) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE},
    )
    try:
        cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        info = embedded_backend.info
        found = extract_features_ray(
            photos, settings, info.cache_key, info.feature_dim, None, RayOptions(), 2,
            progress=False,
        )  # fmt: skip
        same_answer(found, local)
        # One actor per node (1 CPU each), and both took batches.
        assert found.nodes is not None and len(found.nodes) == 2
        assert sum(found.nodes.values()) == len(photos)
    finally:
        ray.shutdown()
        cluster.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[str]:
    """A real Ray head started by the `ray` CLI, as on a cluster's head node."""
    port = free_port()
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [
            ray_cli(), "start", "--head", f"--port={port}", "--num-cpus=2",
            f"--object-store-memory={OBJECT_STORE}", "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True, capture_output=True, env=env, timeout=180,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_cli(), "stop", "--force"], capture_output=True, timeout=120)


def train_command(data: Path, out: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "train", str(data), "--out", str(out), "--model-dir",
        str(model_dir), "--no-turned-views", "--no-report", "--no-baselines", "--no-progress",
        "--matcher", "knn", "--no-cache", *extra,
    ]  # fmt: skip


def test_train_joins_a_cluster_started_by_ray_start(
    ray_head: str, demo, exported_model, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    for label in demo.labels[:3]:
        shutil.copytree(demo.out / "train" / label, data / label)
    model_dir = exported_model.path.parent
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    over_ray = tmp_path / "over-ray"
    subprocess.run(
        train_command(data, over_ray, model_dir, "--ray", ray_head),
        check=True, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    here = tmp_path / "here"
    subprocess.run(
        train_command(data, here, model_dir),
        check=True, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    report = json.loads((over_ray / "report.json").read_text())
    assert report["data"]["extraction"] == "ray"
    assert json.loads((here / "report.json").read_text())["data"]["extraction"] == "local"
    with np.load(over_ray / "features.npz") as a, np.load(here / "features.npz") as b:
        np.testing.assert_array_equal(a["paths"], b["paths"])
        np.testing.assert_allclose(a["features"], b["features"], atol=1e-5)
    # The classifier is trained where the features land: the same run either way.
    assert (
        report["holdout"]["accuracy"]
        == json.loads((here / "report.json").read_text())["holdout"]["accuracy"]
    )


def test_an_unreachable_cluster_is_one_readable_line(demo, exported_model, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for label in demo.labels[:2]:
        shutil.copytree(demo.out / "train" / label, data / label)
    result = subprocess.run(
        train_command(data, tmp_path / "out", exported_model.path.parent, "--ray",
                      f"127.0.0.1:{free_port()}"),
        capture_output=True, text=True, timeout=300,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert result.returncode == 2
    [line] = [x for x in cli_stderr_lines(result) if x.startswith("train: error:")]
    assert "cannot reach the Ray cluster" in line
    assert not (tmp_path / "out" / "manifest.json").exists()
