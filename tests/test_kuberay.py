"""deploy/kuberay/: the RayCluster for `matcher-train --ray`, rendered by the real kustomize.

The RayCluster is checked against KubeRay's own CRD schema (ray.io_rayclusters.yaml of KubeRay
1.7.0, vendored gzipped under tests/data/kuberay/): types and required fields by JSON Schema,
and, as `kubectl apply --validate=strict` would, every field must be one the schema declares.
Its pod templates validate as core PodTemplates with the Kubernetes schemas the other deploy
tests use, and the trainer image holds everything `train --ray` imports.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests import kustomize
from tests.test_deploy import (
    DEPLOY,
    KUBERNETES_VERSION,
    lock_pins,
    modules_under,
    stage_problems,
    stages,
)

KUBERAY = DEPLOY / "kuberay"
CRD = Path(__file__).parent / "data" / "kuberay" / "ray.io_rayclusters-v1.7.0.yaml.gz"

Obj = dict[str, Any]


def crd_schema() -> Obj:
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: Obj = version["schema"]["openAPIV3Schema"]
    return schema


def unknown_fields(value: Any, schema: Obj, where: str = "") -> list[str]:
    """Fields of `value` its structural schema does not declare (what strict validation
    refuses, and what the API server would silently drop)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += unknown_fields(item, properties[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{where}.{key}")
            elif properties is not None or extra is False:
                found.append(f"{where}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for n, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{where}[{n}]")
    return found


def validate_ray_cluster(obj: Obj) -> None:
    """JSON Schema validation plus the strict unknown-field check (raises on a problem)."""
    schema = crd_schema()
    jsonschema.validate(obj, schema)
    extra = unknown_fields(obj, schema)
    if extra:
        raise jsonschema.ValidationError(f"fields the RayCluster CRD does not declare: {extra}")


@pytest.fixture
def objects() -> list[Obj]:
    """A fresh copy for each test (kustomize renders once per session)."""
    return kustomize.build(KUBERAY)


def ray_cluster(objects: list[Obj]) -> Obj:
    [cluster] = [o for o in objects if o["kind"] == "RayCluster"]
    return cluster


def groups(cluster: Obj) -> list[Obj]:
    return [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]


def test_the_ray_cluster_validates_against_kuberays_crd(objects: list[Obj]) -> None:
    cluster = ray_cluster(objects)
    assert cluster["apiVersion"] == "ray.io/v1"
    validate_ray_cluster(cluster)


@pytest.mark.parametrize(
    "mutation",
    ["unknown field", "wrong type", "missing container image"],
)
def test_the_crd_check_refuses_a_broken_cluster(objects: list[Obj], mutation: str) -> None:
    cluster = ray_cluster(objects)
    worker = cluster["spec"]["workerGroupSpecs"][0]
    if mutation == "unknown field":
        worker["replica"] = 3  # a typo of `replicas`: the API server would drop it
    elif mutation == "wrong type":
        worker["replicas"] = "two"
    else:
        worker["template"]["spec"]["containers"] = [{"image": "x"}]  # no name
    with pytest.raises(jsonschema.ValidationError):
        validate_ray_cluster(cluster)


def test_pod_templates_and_the_other_objects_validate_against_kubernetes(
    objects: list[Obj],
) -> None:
    cluster = ray_cluster(objects)
    for group in groups(cluster):
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "check", "namespace": cluster["metadata"]["namespace"]},
            "template": group["template"],
        }
        kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)
    for obj in objects:
        if obj["kind"] != "RayCluster":
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_ray_version_is_the_locked_ray(objects: list[Obj]) -> None:
    assert ray_cluster(objects)["spec"]["rayVersion"] == lock_pins()["ray"]


def test_every_node_sees_the_shared_volume_at_the_same_path(objects: list[Obj]) -> None:
    cluster = ray_cluster(objects)
    [claim] = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for group in groups(cluster):
        spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        [container] = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = volumes[mounts["/work"]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_workers_reserve_the_cpus_their_pods_may_use(objects: list[Obj]) -> None:
    """One model actor per worker takes the node's CPUs (`matcher.ray_extraction`); the head
    takes none, so no actor competes with the matcher's training there."""
    cluster = ray_cluster(objects)
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for worker in cluster["spec"]["workerGroupSpecs"]:
        [container] = worker["template"]["spec"]["containers"]
        limit = container["resources"]["limits"]["cpu"]
        assert worker["rayStartParams"]["num-cpus"] == str(limit)
        assert container["resources"]["requests"] == container["resources"]["limits"]
        assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]


def test_images_are_the_trainer_image_at_a_pinned_tag(objects: list[Obj]) -> None:
    for group in groups(ray_cluster(objects)):
        for container in kustomize.containers(group["template"]["spec"]):
            name, tag, digest = kustomize.split_image(container["image"])
            assert name.endswith("/matcher-trainer") and (tag or digest), container["image"]
            assert tag != "latest"


def test_pods_run_as_non_root_without_privileges(objects: list[Obj]) -> None:
    for group in groups(ray_cluster(objects)):
        spec = group["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_trainer_image_holds_everything_train_imports() -> None:
    """`matcher-train --ray` on the head, and the actors (matcher.ray_extraction) on workers."""
    [stage] = stages(DEPLOY / "trainer.Dockerfile")
    user = [args for name, args in stage if name == "USER"]
    assert user and user[-1].split(":")[0] == "10001"
    entries = [*modules_under("export", "train", "integrity"), "matcher.ray_extraction"]
    _, problems = stage_problems(stage, entries, set(lock_pins()))
    assert problems == []


def test_the_documented_command_uses_flags_train_has() -> None:
    from train.__main__ import parse_args

    lines = (KUBERAY / "raycluster.yaml").read_text().splitlines()
    [start] = [n for n, line in enumerate(lines) if line.startswith("#   matcher-train ")]
    words: list[str] = []
    for line in lines[start:]:
        words += line.lstrip("#").replace("\\", " ").split()
        if not line.rstrip().endswith("\\"):
            break
    args = parse_args(words[1:])
    assert args.ray == "auto" and args.no_turned_views
