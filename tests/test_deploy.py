"""deploy/: the kustomize overlays render, validate offline against Kubernetes 1.33, agree with
each other and with the service's settings; the Dockerfiles are pinned, non-root and copy what
exists. kubectl is needed for its kustomize; no cluster or container engine is.

The overlays are rendered by the real kustomize, `kubectl kustomize` (tests/kustomize.py: once
per session; without kubectl these tests fail and say how to install it). The consistency checks
are plain functions returning problems, so each can be shown to fail on a broken copy.
"""

from __future__ import annotations

import ast
import copy
import re
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from yamllint import linter
from yamllint.config import YamlLintConfig

from service.config import Settings
from tests import kustomize
from tests.kustomize import split_image

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.33"
TARGETS = ("base", "overlays/dev", "overlays/prod")
NAMESPACES = {"overlays/dev": "matcher-dev", "overlays/prod": "matcher"}
LOCAL_IMAGES = ("matcher", "matcher-models")

Obj = dict[str, Any]


def rendered(target: str) -> list[Obj]:
    """A fresh copy of what kustomize renders for `target` (rendered once per session)."""
    return kustomize.build(K8S / target)


def test_kubectl_with_kustomize_is_installed() -> None:
    """Everything below needs it; without it this says how to install it (and nothing skips)."""
    assert kustomize.kubectl()


# ---- helpers over rendered objects ---------------------------------------------------------


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[Obj], kind: str, name: str) -> Obj:
    [obj] = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return obj


def pod_labels(deployment: Obj) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selected_deployments(objects: list[Obj], selector: dict[str, str]) -> list[Obj]:
    return [d for d in of_kind(objects, "Deployment") if selects(selector, pod_labels(d))]


def pod(deployment: Obj) -> Obj:
    return deployment["spec"]["template"]["spec"]


def container(deployment: Obj, name: str | None = None) -> Obj:
    """The named container, or the first one."""
    containers = pod(deployment)["containers"]
    return next(c for c in containers if name is None or c["name"] == name)


def config_map_of(objects: list[Obj], deployment: Obj) -> dict[str, str]:
    """Data of the ConfigMaps the first container takes its environment from."""
    data: dict[str, str] = {}
    for source in container(deployment).get("envFrom", []):
        name = source["configMapRef"]["name"]
        data.update(named(objects, "ConfigMap", name).get("data", {}))
    return data


def tfserving(objects: list[Obj]) -> Obj:
    return named(objects, "Deployment", "tfserving")


def matcher(objects: list[Obj]) -> Obj:
    return named(objects, "Deployment", "matcher")


def flag(args: list[str], name: str) -> str | None:
    """The value of `--name=value` in a command line."""
    prefix = f"--{name}="
    return next((a[len(prefix) :] for a in args if a.startswith(prefix)), None)


def mounted_file(deployment: Obj, objects: list[Obj], path: str) -> str | None:
    """Contents of `path` when it is a key of a ConfigMap volume mounted in the first container."""
    volumes = {v["name"]: v for v in pod(deployment).get("volumes", [])}
    for mount in container(deployment).get("volumeMounts", []):
        source = volumes[mount["name"]].get("configMap")
        if source and path.startswith(mount["mountPath"].rstrip("/") + "/"):
            key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
            return named(objects, "ConfigMap", source["name"]).get("data", {}).get(key)
    return None


def delivered_paths(deployment: Obj) -> list[str]:
    """Where the main container sees what each `cp -R SRC /target/` initContainer copied."""
    mounts = {m["name"]: m["mountPath"] for m in container(deployment).get("volumeMounts", [])}
    paths = []
    for init in pod(deployment).get("initContainers", []):
        command = init.get("command", [])
        if command[:2] != ["cp", "-R"]:
            continue
        source, target = command[2], command[3]
        for mount in init.get("volumeMounts", []):
            if target.rstrip("/") == mount["mountPath"] and mount["name"] in mounts:
                paths.append(f"{mounts[mount['name']]}/{Path(source).name}")
    return paths


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (cpu or memory) as a number."""
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match, f"bad quantity {value!r}"
    return float(match[1]) * suffixes.get(match[2], 1)


def all_containers(deployment: Obj) -> list[Obj]:
    return kustomize.containers(pod(deployment))


# ---- consistency checks: each returns a list of problems ----------------------------------


def check_selectors(objects: list[Obj]) -> list[str]:
    problems = []
    for deployment in of_kind(objects, "Deployment"):
        if not selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment)):
            problems.append(f"deployment {deployment['metadata']['name']}: selector != pods")
    for service in of_kind(objects, "Service"):
        found = selected_deployments(objects, service["spec"].get("selector", {}))
        if len(found) != 1:
            problems.append(f"service {service['metadata']['name']}: selects {len(found)} pods")
    return problems


def check_ports(objects: list[Obj]) -> list[str]:
    """Service targetPorts and every probe name a declared container port."""
    problems = []
    for service in of_kind(objects, "Service"):
        for deployment in selected_deployments(objects, service["spec"].get("selector", {})):
            declared = {
                key
                for c in pod(deployment)["containers"]
                for p in c.get("ports", [])
                for key in (p["containerPort"], p.get("name"))
            }
            for port in service["spec"]["ports"]:
                if port.get("targetPort", port["port"]) not in declared:
                    problems.append(f"service {service['metadata']['name']}: {port} undeclared")
    for deployment in of_kind(objects, "Deployment"):
        for c in pod(deployment)["containers"]:
            declared = {k for p in c.get("ports", []) for k in (p["containerPort"], p.get("name"))}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind not in c:
                    problems.append(f"container {c['name']}: no {kind}")
                    continue
                # Built-in gRPC probes for startup and readiness (the health service's status).
                if kind != "livenessProbe" and "grpc" not in c[kind]:
                    problems.append(f"container {c['name']}: {kind} is not a gRPC probe")
                action = next(
                    v for k, v in c[kind].items() if k in ("grpc", "tcpSocket", "httpGet")
                )
                if action["port"] not in declared:
                    problems.append(f"container {c['name']}: {kind} port {action['port']}")
    return problems


def check_scaling(objects: list[Obj]) -> list[str]:
    """HPA and PDBs point at the matcher; the HPA, not the manifest, owns its replica count."""
    problems = []
    names = {d["metadata"]["name"] for d in of_kind(objects, "Deployment")}
    targets = [
        h["spec"]["scaleTargetRef"]["name"] for h in of_kind(objects, "HorizontalPodAutoscaler")
    ]
    if targets != ["matcher"]:
        problems.append(f"HPA targets {targets}, expected the matcher Deployment")
    for name in set(targets) & names:
        if "replicas" in named(objects, "Deployment", name)["spec"]:
            problems.append(f"deployment {name}: has replicas although an HPA scales it")
    covered = []
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        found = selected_deployments(objects, pdb["spec"]["selector"]["matchLabels"])
        if len(found) != 1:
            problems.append(f"PDB {pdb['metadata']['name']} selects {len(found)} deployments")
        covered += [d["metadata"]["name"] for d in found]
    if "matcher" not in covered:
        problems.append("no PDB selects the matcher pods")
    return problems


def check_network_policy(objects: list[Obj]) -> list[str]:
    """Exactly matcher pods reach TF Serving's gRPC port."""
    tfs, match = pod_labels(tfserving(objects)), pod_labels(matcher(objects))
    grpc_port = next(p["containerPort"] for p in container(tfserving(objects))["ports"])
    allowed = False
    for policy in of_kind(objects, "NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"]["matchLabels"], tfs):
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            peers = [p.get("podSelector", {}).get("matchLabels", {}) for p in rule["from"]]
            if grpc_port in ports:
                allowed = any(selects(peer, match) for peer in peers) and all(
                    "podSelector" in p and "namespaceSelector" not in p for p in rule["from"]
                )
    return [] if allowed else [f"no NetworkPolicy lets only matcher pods reach {grpc_port}"]


def check_matcher_settings(objects: list[Obj]) -> list[str]:
    """The matcher's ConfigMap holds real settings that agree with TF Serving and the pods."""
    deployment = matcher(objects)
    env = config_map_of(objects, deployment)
    fields = {f"MATCHER_{name.upper()}" for name in Settings.model_fields}
    problems = [f"{key} is not a setting" for key in sorted(set(env) - fields)]
    try:
        settings = Settings(**{k[len("MATCHER_") :].lower(): v for k, v in env.items()})
    except ValueError as exc:
        return [*problems, f"settings do not validate: {exc}"]
    if settings.backend != "tfserving" or settings.host != "0.0.0.0":
        problems.append("the matcher must listen on 0.0.0.0 and use the tfserving backend")
    if settings.port not in {p["containerPort"] for p in container(deployment)["ports"]}:
        problems.append(f"MATCHER_PORT {settings.port} is not a container port")
    if not any(str(settings.classifier).startswith(p + "/") for p in delivered_paths(deployment)):
        problems.append(f"MATCHER_CLASSIFIER {settings.classifier} is not copied in")
    return problems + _target_problems(objects, settings) + _model_problems(objects, settings)


def _target_problems(objects: list[Obj], settings: Settings) -> list[str]:
    """dns:///NAME[.NAMESPACE...]:PORT must name a headless Service over TF Serving pods."""
    target = re.fullmatch(
        r"(?:dns:///)?([a-z0-9-]+)(\.[a-z0-9.-]+)?:(\d+)", settings.tfserving_target
    )
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    service = services.get(target[1]) if target else None
    if service is None or target is None:
        return [f"MATCHER_TFSERVING_TARGET names no Service: {settings.tfserving_target}"]
    name, problems = target[1], []
    if selected_deployments(objects, service["spec"]["selector"]) != [tfserving(objects)]:
        problems.append(f"{name} does not select the TF Serving pods")
    if int(target[3]) not in [p["port"] for p in service["spec"]["ports"]]:
        problems.append(f"{name} has no port {target[3]}")
    if service["spec"].get("clusterIP") != "None":
        problems.append(f"{name} is not headless: no per-call balancing over pods")
    namespace = service["metadata"].get("namespace")
    if target[2] and namespace and not target[2].startswith(f".{namespace}."):
        problems.append(f"{target[0]} is not in namespace {namespace}")
    return problems


def _model_problems(objects: list[Obj], settings: Settings) -> list[str]:
    """TF Serving serves the model name and version the matcher asks for, from its copy."""
    problems = []
    models = mounted_file(tfserving(objects), objects, "/config/models.config") or ""
    if f'name: "{settings.model_name}"' not in models:
        problems.append(f"TF Serving does not serve {settings.model_name}")
    if not re.search(rf"specific\s*{{\s*versions:\s*{settings.model_version}\s*}}", models):
        problems.append(f"models.config does not pin version {settings.model_version}")
    base_path = re.search(r'base_path:\s*"([^"]+)"', models)
    if not base_path or base_path[1] not in delivered_paths(tfserving(objects)):
        problems.append("models.config base_path is not where the initContainer copies to")
    return problems


def check_tfserving_flags(objects: list[Obj]) -> list[str]:
    """Every config file TF Serving is told to read is mounted; metrics are where scraped."""
    problems = []
    deployment = tfserving(objects)
    main = container(deployment)
    args = main["args"]
    for name in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        path = flag(args, name)
        if path is None or mounted_file(deployment, objects, path) is None:
            problems.append(f"--{name}={path} is not a mounted ConfigMap key")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/port") != flag(args, "rest_api_port"):
        problems.append("prometheus.io/port is not --rest_api_port")
    monitoring = mounted_file(deployment, objects, flag(args, "monitoring_config_file") or "")
    if f'path: "{annotations.get("prometheus.io/path")}"' not in (monitoring or ""):
        problems.append("prometheus.io/path is not the path in monitoring.config")
    if flag(args, "port") != str(main["ports"][0]["containerPort"]):
        problems.append("--port is not the first container port")
    return problems


def check_images(objects: list[Obj]) -> list[str]:
    problems = []
    for deployment in of_kind(objects, "Deployment"):
        for c in all_containers(deployment):
            _, tag, digest = split_image(c["image"])
            if not (tag or digest) or tag == "latest":
                problems.append(f"container {c['name']}: image {c['image']} is not pinned")
    return problems


def check_security(objects: list[Obj]) -> list[str]:
    """Non-root, read-only root filesystem, no privilege escalation, requests <= limits."""
    problems = []
    for deployment in of_kind(objects, "Deployment"):
        context = pod(deployment).get("securityContext", {})
        if context.get("runAsNonRoot") is not True or not context.get("runAsUser"):
            problems.append(f"{deployment['metadata']['name']}: not runAsNonRoot with a uid")
        for c in all_containers(deployment):
            own = c.get("securityContext", {})
            if own.get("readOnlyRootFilesystem") is not True:
                problems.append(f"container {c['name']}: root filesystem is writable")
            if own.get("allowPrivilegeEscalation") is not False or own.get("runAsUser") == 0:
                problems.append(f"container {c['name']}: may run as or become root")
            resources = c.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                if request is None or limit is None or quantity(request) > quantity(limit):
                    problems.append(f"container {c['name']}: {resource} request/limit {resources}")
    return problems


def check_shutdown(objects: list[Obj]) -> list[str]:
    """SIGTERM comes after the preStop sleep; the matcher's drain fits in the grace period."""
    problems = []
    grace_s = float(config_map_of(objects, matcher(objects)).get("MATCHER_GRACE_S", "5"))
    for deployment in of_kind(objects, "Deployment"):
        sleep = container(deployment).get("lifecycle", {}).get("preStop", {}).get("sleep", {})
        drain = grace_s if deployment is matcher(objects) else 0
        period = pod(deployment).get("terminationGracePeriodSeconds", 30)
        if not sleep or period <= sleep["seconds"] + drain:
            problems.append(f"{deployment['metadata']['name']}: {period} s <= preStop + drain")
    if pod(matcher(objects)).get("enableServiceLinks") is not False:
        problems.append("matcher: service links would inject MATCHER_PORT=tcp://...")
    return problems


def check_labels(objects: list[Obj]) -> list[str]:
    problems = []
    required = ("app.kubernetes.io/name", "app.kubernetes.io/component")
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        if labels.get("app.kubernetes.io/part-of") != "matcher":
            problems.append(f"{obj['kind']} {obj['metadata']['name']}: no part-of label")
        if obj["kind"] != "Namespace" and not all(k in labels for k in required):
            problems.append(f"{obj['kind']} {obj['metadata']['name']}: no name/component")
    for deployment in of_kind(objects, "Deployment"):
        if pod_labels(deployment).get("app.kubernetes.io/part-of") != "matcher":
            problems.append(f"{deployment['metadata']['name']}: pods lack part-of")
    return problems


CHECKS: dict[str, Callable[[list[Obj]], list[str]]] = {
    "selectors": check_selectors,
    "ports": check_ports,
    "scaling": check_scaling,
    "network_policy": check_network_policy,
    "matcher_settings": check_matcher_settings,
    "tfserving_flags": check_tfserving_flags,
    "images": check_images,
    "security": check_security,
    "shutdown": check_shutdown,
    "labels": check_labels,
}


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("target", TARGETS)
def test_rendered_objects_are_consistent(target: str, check: str) -> None:
    assert CHECKS[check](rendered(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates_against_kubernetes_schemas(target: str) -> None:
    assert kubernetes_validate.utils.all_versions()  # the schemas ship with the package
    for obj in rendered(target):
        # strict: unknown fields are errors, not ignored; a missing schema raises too.
        assert kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True) == "1.33"


def test_schema_validation_rejects_an_unknown_field() -> None:
    broken = copy.deepcopy(matcher(rendered("overlays/prod")))
    container(broken)["readinesProbe"] = container(broken).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# ---- the checks can fail: break one thing in a rendered copy, expect that problem ---------


def _set_env(objects: list[Obj], key: str, value: str) -> None:
    for name in [s["configMapRef"]["name"] for s in container(matcher(objects))["envFrom"]]:
        named(objects, "ConfigMap", name)["data"][key] = value


MUTATIONS: dict[str, tuple[Callable[[list[Obj]], None], str, str]] = {
    "service selector": (
        lambda o: named(o, "Service", "tfserving")["spec"]["selector"].update(
            {"app.kubernetes.io/name": "tf-serving"}
        ),
        "selectors",
        "service tfserving: selects 0 pods",
    ),
    "target port": (
        lambda o: named(o, "Service", "matcher")["spec"]["ports"][0].update(targetPort="https"),
        "ports",
        "undeclared",
    ),
    "probe port": (
        lambda o: container(matcher(o))["readinessProbe"]["grpc"].update(port=50052),
        "ports",
        "readinessProbe port 50052",
    ),
    "HPA target": (
        lambda o: of_kind(o, "HorizontalPodAutoscaler")[0]["spec"]["scaleTargetRef"].update(
            name="tfserving"
        ),
        "scaling",
        "HPA targets ['tfserving']",
    ),
    "replicas beside HPA": (
        lambda o: matcher(o)["spec"].update(replicas=3),
        "scaling",
        "has replicas although an HPA scales it",
    ),
    "network policy peer": (
        lambda o: of_kind(o, "NetworkPolicy")[0]["spec"]["ingress"][0]["from"][0].update(
            namespaceSelector={}
        ),
        "network_policy",
        "no NetworkPolicy lets only matcher pods reach 8500",
    ),
    "unknown setting": (
        lambda o: _set_env(o, "MATCHER_TFSERVING_HOST", "tfserving"),
        "matcher_settings",
        "MATCHER_TFSERVING_HOST is not a setting",
    ),
    "invalid setting": (
        lambda o: _set_env(o, "MATCHER_PORT", "http"),
        "matcher_settings",
        "settings do not validate",
    ),
    "TF Serving port": (
        lambda o: _set_env(o, "MATCHER_TFSERVING_TARGET", "dns:///tfserving-headless:9000"),
        "matcher_settings",
        "tfserving-headless has no port 9000",
    ),
    "ClusterIP target": (
        lambda o: _set_env(o, "MATCHER_TFSERVING_TARGET", "dns:///tfserving:8500"),
        "matcher_settings",
        "tfserving is not headless",
    ),
    "model version": (
        lambda o: _set_env(o, "MATCHER_MODEL_VERSION", "2"),
        "matcher_settings",
        "does not pin version 2",
    ),
    "classifier path": (
        lambda o: _set_env(o, "MATCHER_CLASSIFIER", "/data/classifier.joblib"),
        "matcher_settings",
        "is not copied in",
    ),
    "config mount": (
        lambda o: container(tfserving(o)).update(
            args=[
                a.replace("/config/models", "/etc/models") for a in container(tfserving(o))["args"]
            ]
        ),
        "tfserving_flags",
        "--model_config_file=/etc/models.config is not a mounted ConfigMap key",
    ),
    "latest image": (
        lambda o: container(tfserving(o)).update(image="tensorflow/serving:latest"),
        "images",
        "is not pinned",
    ),
    "writable root": (
        lambda o: pod(matcher(o))["initContainers"][0]["securityContext"].update(
            readOnlyRootFilesystem=False
        ),
        "security",
        "container copy-classifier: root filesystem is writable",
    ),
    "no limits": (
        lambda o: container(matcher(o))["resources"].pop("limits"),
        "security",
        "container matcher: cpu request/limit",
    ),
    "root pod": (
        lambda o: pod(tfserving(o))["securityContext"].pop("runAsNonRoot"),
        "security",
        "tfserving: not runAsNonRoot",
    ),
    "short grace": (
        lambda o: pod(matcher(o)).update(terminationGracePeriodSeconds=10),
        "shutdown",
        "matcher: 10 s <= preStop + drain",
    ),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_checks_report_a_broken_copy(mutation: str) -> None:
    mutate, check, expected = MUTATIONS[mutation]
    broken = copy.deepcopy(rendered("overlays/prod"))
    mutate(broken)
    problems = CHECKS[check](broken)
    assert any(expected in p for p in problems), problems


# ---- what each overlay changes ------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(NAMESPACES))
def test_overlay_namespace_is_set_and_created(target: str) -> None:
    objects = rendered(target)
    namespace = NAMESPACES[target]
    assert [n["metadata"]["name"] for n in of_kind(objects, "Namespace")] == [namespace]
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        namespace
    }


def test_dev_runs_one_small_replica_of_each() -> None:
    objects = rendered("overlays/dev")
    hpa = of_kind(objects, "HorizontalPodAutoscaler")[0]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"], tfserving(objects)["spec"]["replicas"]) == (
        1,
        1,
        1,
    )
    prod = rendered("overlays/prod")
    for name in ("matcher", "tfserving"):
        small = container(named(objects, "Deployment", name))["resources"]["limits"]["cpu"]
        large = container(named(prod, "Deployment", name))["resources"]["limits"]["cpu"]
        assert quantity(small) < quantity(large)
    # Local image names, for `kind load docker-image` and the like.
    assert {
        split_image(c["image"])[0]
        for d in of_kind(objects, "Deployment")
        for c in all_containers(d)
    } == {*LOCAL_IMAGES, "tensorflow/serving"}


def test_prod_scales_and_pins_registry_images() -> None:
    objects = rendered("overlays/prod")
    assert of_kind(objects, "HorizontalPodAutoscaler")[0]["spec"]["minReplicas"] == 3
    assert tfserving(objects)["spec"]["replicas"] == 2
    images = {c["image"] for d in of_kind(objects, "Deployment") for c in all_containers(d)}
    assert images == {
        "registry.example.com/matcher/matcher:0.1.0",
        "registry.example.com/matcher/matcher-models:0.1.0",
        "tensorflow/serving:2.21.0",
    }
    # The classifier digest comes from the overlay: a real sha256, or the placeholder that
    # never matches a file (the matcher then refuses to start).
    digest = config_map_of(objects, matcher(objects))["MATCHER_CLASSIFIER_SHA256"]
    assert re.fullmatch(r"[0-9a-f]{64}", digest) or digest.startswith("REPLACE_WITH_")


#: kustomize's name suffix for a generated object: ten hex digits of a hash of its content, with
#: 0, 1, 3, a and e written as g, h, k, m and t.
HASH_SUFFIX = r"[2456789bcdfghkmt]{10}"


def config_map_refs(deployment: Obj) -> set[str]:
    """Names of the ConfigMaps a Deployment's pods read: volumes, envFrom and env."""
    names = {v["configMap"]["name"] for v in pod(deployment).get("volumes", []) if "configMap" in v}
    for c in all_containers(deployment):
        names |= {e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e}
        for env in c.get("env", []):
            if "configMapKeyRef" in env.get("valueFrom", {}):
                names.add(env["valueFrom"]["configMapKeyRef"]["name"])
    return names


def test_generated_config_maps_are_renamed_by_content() -> None:
    names: dict[str, dict[str, str]] = {}
    for target in TARGETS:
        objects = rendered(target)
        generated = {}
        for config_map in of_kind(objects, "ConfigMap"):
            name = config_map["metadata"]["name"]
            match = re.fullmatch(rf"(.+)-{HASH_SUFFIX}", name)
            assert match, f"{target}: ConfigMap {name} has no content-hash suffix"
            generated[match[1]] = name
        assert sorted(generated) == ["matcher-config", "tfserving-config"]
        # The pods read the suffixed names (kustomize rewrites the references), nothing else.
        assert {
            d["metadata"]["name"]: config_map_refs(d) for d in of_kind(objects, "Deployment")
        } == {
            "matcher": {generated["matcher-config"]},
            "tfserving": {generated["tfserving-config"]},
        }
        names[target] = generated
    # prod merges the classifier digest into matcher-config: new content, new name. The same
    # content keeps its name: tfserving-config everywhere, matcher-config in base and dev.
    dev, prod = names["overlays/dev"], names["overlays/prod"]
    assert dev["matcher-config"] != prod["matcher-config"]
    assert dev["tfserving-config"] == prod["tfserving-config"]
    assert names["base"] == dev


# ---- the TF Serving config files parse as TF Serving's own messages -----------------------


def test_tfserving_model_config_parses_as_model_server_config() -> None:
    model_server_config_pb2 = pytest.importorskip(
        "tensorflow_serving.config.model_server_config_pb2"
    )
    from google.protobuf import text_format

    text = (K8S / "base/tfserving/models.config").read_text()
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    [model] = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == (
        "efficientnet_lite0",
        "/models/efficientnet_lite0",
        "tensorflow",
    )
    assert list(model.model_version_policy.specific.versions) == [1]


def _batching_and_monitoring_messages() -> tuple[Any, Any]:
    """BatchingParameters and MonitoringConfig, transcribed from TF Serving's
    session_bundle_config.proto and monitoring_config.proto (the fields used here; the
    tensorflow-serving-api wheel does not ship these two files)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="matcher_test/tfserving_configs.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )

    def add(message: str, fields: list[tuple[str, int, int, int, str]]) -> None:
        msg = proto.message_type.add(name=message)
        for name, number, kind, label, type_name in fields:
            added = msg.field.add(name=name, number=number, type=kind, label=label)
            if type_name:
                added.type_name = type_name

    opt, rep = field.LABEL_OPTIONAL, field.LABEL_REPEATED
    int64 = (field.TYPE_MESSAGE, opt, ".google.protobuf.Int64Value")
    add(
        "BatchingParameters",
        [
            ("max_batch_size", 1, *int64),
            ("batch_timeout_micros", 2, *int64),
            ("max_enqueued_batches", 3, *int64),
            ("num_batch_threads", 4, *int64),
            ("thread_pool_name", 5, field.TYPE_MESSAGE, opt, ".google.protobuf.StringValue"),
            ("allowed_batch_sizes", 6, field.TYPE_INT64, rep, ""),
            ("pad_variable_length_inputs", 7, field.TYPE_BOOL, opt, ""),
        ],
    )
    add(
        "PrometheusConfig",
        [("enable", 1, field.TYPE_BOOL, opt, ""), ("path", 2, field.TYPE_STRING, opt, "")],
    )
    add(
        "MonitoringConfig",
        [("prometheus_config", 1, field.TYPE_MESSAGE, opt, ".tensorflow.serving.PrometheusConfig")],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto)
    get = message_factory.GetMessageClass
    return (
        get(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")),
        get(pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")),
    )


def test_tfserving_batching_and_monitoring_configs_parse() -> None:
    from google.protobuf import text_format

    batching_cls, monitoring_cls = _batching_and_monitoring_messages()
    batching = text_format.Parse(
        (K8S / "base/tfserving/batching.config").read_text(), batching_cls()
    )
    sizes = list(batching.allowed_batch_sizes)
    assert sizes == sorted(sizes) and sizes[-1] == batching.max_batch_size.value
    assert batching.num_batch_threads.value >= 1 and batching.max_enqueued_batches.value >= 1
    monitoring = text_format.Parse(
        (K8S / "base/tfserving/monitoring.config").read_text(), monitoring_cls()
    )
    assert monitoring.prometheus_config.enable
    assert monitoring.prometheus_config.path == "/monitoring/prometheus/metrics"


# ---- YAML style -----------------------------------------------------------------------------


def test_every_yaml_file_passes_yamllint() -> None:
    config = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    files = [DEPLOY / ".yamllint", *DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
    checked = 0
    for path in files:
        relative = str(path.relative_to(REPO))
        if config.is_file_ignored(relative):
            continue
        problems = list(linter.run(path.read_text(), config, relative))
        assert not problems, [f"{relative}:{p.line}: {p.desc}" for p in problems]
        checked += 1
    assert checked >= 15


def test_yamllint_reports_a_badly_indented_file() -> None:
    config = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = list(linter.run("a:\n   b: yes\n", config))
    assert {p.rule for p in problems} >= {"indentation", "truthy"}


# ---- helpers kept from the old renderer -----------------------------------------------------


@pytest.mark.parametrize(
    ("image", "parts"),
    [
        ("busybox", ("busybox", None, None)),
        ("tensorflow/serving:2.21.0", ("tensorflow/serving", "2.21.0", None)),
        ("localhost:5000/m:1", ("localhost:5000/m", "1", None)),
        ("r.io/m@sha256:ab", ("r.io/m", None, "sha256:ab")),
    ],
)
def test_split_image(image: str, parts: tuple[str, str | None, str | None]) -> None:
    assert split_image(image) == parts


def test_containers_include_init_containers() -> None:
    spec = {"containers": [{"name": "a"}], "initContainers": [{"name": "b"}]}
    assert [c["name"] for c in kustomize.containers(spec)] == ["a", "b"]
    assert kustomize.containers(None) == []


# ---- Dockerfiles ---------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(dockerfile):
        if instruction[0] == "FROM":
            result.append([])
        result[-1].append(instruction)
    return result


def dockerignore_excludes(ignore_file: Path, path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    for raw in ignore_file.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = "".join(
            ".*" if part == "**" else re.escape(part).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            for part in re.split(r"(\*\*)", pattern)
        )
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    names: set[str] = set()
    for stage in stages(dockerfile):
        words = stage[0][1].split()
        image = next(w for w in words if not w.startswith("--"))
        if image not in names and image != "scratch":
            _, tag, digest = split_image(image)
            assert (tag or digest) and tag != "latest", image
        if "AS" in (w.upper() for w in words):
            names.add(words[-1])
    pythons = {s[0][1].split()[0] for s in stages(dockerfile) if "python:" in s[0][1]}
    assert len(pythons) <= 1, pythons  # one Python for every stage


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_non_root(dockerfile: Path) -> None:
    users = [args for name, args in stages(dockerfile)[-1] if name == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), user


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    sources = [
        source
        for name, args in instructions(dockerfile)
        if name == "COPY" and "--from=" not in args
        for source in args.split()[:-1]
        if not source.startswith("--")
    ]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not dockerignore_excludes(ignore, source), f"{source} is in {ignore.name}"


def test_dockerignore_rule_matches_docker() -> None:
    ignore = DEPLOY / "matcher.Dockerfile.dockerignore"
    assert dockerignore_excludes(ignore, ".venv/lib/x.py")
    assert dockerignore_excludes(ignore, "export/savedmodel.py")
    assert dockerignore_excludes(ignore, "service/__pycache__/core.cpython-311.pyc")
    assert not dockerignore_excludes(ignore, "matcher/backends/tfserving.py")
    assert not dockerignore_excludes(ignore, "matcher/v1/matcher_pb2.py")


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def matcher_pins() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "requirements-matcher.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_image_pins_equal_the_lock() -> None:
    lock = lock_pins()
    assert {n: v for n, v in matcher_pins().items() if lock.get(n) != v} == {}
    for dockerfile in DOCKERFILES:
        for name, version in re.findall(
            r"([A-Za-z0-9_.-]+)==([0-9][^\s]*)", dockerfile.read_text()
        ):
            assert lock.get(canonicalize_name(name)) == version, (dockerfile.name, name)


def test_matcher_requirements_are_closed_under_dependencies() -> None:
    pins = matcher_pins()
    missing = set()
    for name in pins:
        for requirement in metadata.distribution(name).requires or []:
            parsed = Requirement(requirement)
            if parsed.marker and not parsed.marker.evaluate({"extra": ""}):
                continue
            if canonicalize_name(parsed.name) not in pins:
                missing.add(f"{name} needs {parsed.name}")
    assert not missing


FIRST_PARTY = frozenset({"service", "matcher", "export", "integrity", "train", "protos", "bench"})
#: Needs TensorFlow by design (and leads to matcher/backbones/ and matcher/preprocess.py): the
#: matcher image serves MATCHER_BACKEND=tfserving only, so the walk does not follow it, and it
#: may only be imported inside a function (matcher/factory.py does, for the embedded backend).
EMBEDDED_ONLY = frozenset({"matcher.backends.embedded"})


def module_file(root: Path, module: str) -> Path | None:
    base = root / module.replace(".", "/")
    return next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)


def imported(path: Path, module: str) -> list[tuple[str, bool]]:
    """(module, lazily) for each import in a file: relative imports resolved, `from pkg import
    name` also as pkg.name (a module when there is one), lazily when inside a function."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                anchor = package[: len(package) - child.level + 1] if child.level else []
                base = ".".join([*anchor, child.module] if child.module else anchor)
                found.append((base, lazy))
                found.extend((f"{base}.{alias.name}", lazy) for alias in child.names)
            else:
                function = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                visit(child, lazy or function)

    visit(ast.parse(path.read_text()), False)
    return found


def walk_imports(
    root: Path, entries: list[str]
) -> tuple[dict[str, Path], dict[str, str], list[str]]:
    """What running `entries` can import, module level and late imports alike: the first-party
    modules (and their files), each third-party top-level module (and one importer), and a
    problem for each module-level import of an EMBEDDED_ONLY module."""
    files: dict[str, Path] = {}
    third_party: dict[str, str] = {}
    problems = []
    todo = list(entries)
    while todo:
        module = todo.pop()
        path = module_file(root, module)
        if module in files or path is None:
            continue
        files[module] = path
        for name, lazy in imported(path, module):
            top = name.split(".")[0]
            embedded = next((m for m in EMBEDDED_ONLY if f"{name}.".startswith(f"{m}.")), None)
            if embedded:
                problem = f"{module} imports {embedded} at module level (needs TensorFlow)"
                if not lazy and problem not in problems:
                    problems.append(problem)
            elif top in FIRST_PARTY:
                parts = name.split(".")  # a module's packages run their __init__ first
                todo += [".".join(parts[: i + 1]) for i in range(len(parts))]
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.setdefault(top, module)
    return files, third_party, problems


def copied_sources(stage: list[tuple[str, str]]) -> list[str]:
    """What a stage COPYs from the build context (not from other stages)."""
    return [
        source.rstrip("/")
        for name, args in stage
        if name == "COPY" and "--from=" not in args
        for source in args.split()[:-1]
        if not source.startswith("--")
    ]


def stage_problems(
    stage: list[tuple[str, str]], entries: list[str], installed: set[str]
) -> tuple[dict[str, Path], list[str]]:
    """Walk the imports of `entries`: each first-party file must be copied into the stage and
    each third-party module must come from one of the `installed` distributions."""
    files, third_party, problems = walk_imports(REPO, entries)
    copied = copied_sources(stage)
    for module, path in sorted(files.items()):
        relative = path.relative_to(REPO).as_posix()
        if not any(relative == c or relative.startswith(f"{c}/") for c in copied):
            problems.append(f"{relative} ({module}) is imported, not copied")
    distributions = metadata.packages_distributions()
    for top, importer in sorted(third_party.items()):
        owners = {canonicalize_name(d) for d in distributions.get(top, [])}
        if not owners & installed:
            problems.append(f"{importer} imports {top}, not installed")
    return files, problems


def modules_under(*folders: str) -> list[str]:
    paths = [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]
    return [".".join(p.relative_to(REPO).with_suffix("").parts) for p in paths]


def test_matcher_image_holds_everything_the_service_imports() -> None:
    final = stages(DEPLOY / "matcher.Dockerfile")[-1]
    files, problems = stage_problems(final, modules_under("service"), set(matcher_pins()))
    assert problems == []
    # The walk reaches through the library: the backend the image runs, the manifest checks.
    assert {"matcher.core", "matcher.backends.tfserving", "integrity.manifest"} <= set(files)
    assert not {"matcher.preprocess", "matcher.backbones.builder"} & set(files)


def test_descriptor_stage_holds_what_writing_the_descriptors_imports() -> None:
    """The tfs-api stage runs `python -m matcher.backends.tfs_api` with three wheels only."""
    [stage] = [s for s in stages(DEPLOY / "matcher.Dockerfile") if s[0][1].endswith(" tfs-api")]
    command = "python -m matcher.backends.tfs_api "
    assert any(name == "RUN" and command in args for name, args in stage)
    text = " ".join(args for name, args in stage if name == "RUN")
    installed = {canonicalize_name(n) for n in re.findall(r"([A-Za-z0-9_.-]+)==", text)}
    _, problems = stage_problems(stage, ["matcher.backends.tfs_api"], installed)
    assert problems == []


def test_model_image_builder_holds_everything_export_and_train_import() -> None:
    """The exporter stage runs `python -m export`, `train.demo`, `train` and `integrity`."""
    exporter = stages(DEPLOY / "export.Dockerfile")[0]
    runs = " ".join(args for name, args in exporter if name == "RUN")
    for module in ("export", "train.demo", "train", "integrity"):
        assert f"python -m {module} " in runs
    entries = modules_under("export", "train", "integrity")
    _, problems = stage_problems(exporter, entries, set(lock_pins()))
    assert problems == []


def test_the_walk_follows_late_imports_and_refuses_an_eager_embedded_import(
    tmp_path: Path,
) -> None:
    sources = {
        "service/__init__.py": "",
        "service/eager.py": "from matcher.backends.embedded import EmbeddedBackend\n",
        "service/late.py": "def make():\n    from matcher.backends import embedded, tfserving\n",
        "matcher/__init__.py": "",
        "matcher/backends/__init__.py": "",
        "matcher/backends/embedded.py": "import tensorflow\n",
        "matcher/backends/tfserving.py": "from . import base\ndef f():\n    import grpc\n",
        "matcher/backends/base.py": "import numpy\n",
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    files, third_party, problems = walk_imports(tmp_path, ["service.eager", "service.late"])
    assert problems == [
        "service.eager imports matcher.backends.embedded at module level (needs TensorFlow)"
    ]
    assert "matcher.backends.base" in files and "matcher.backends.embedded" not in files
    assert sorted(third_party) == ["grpc", "numpy"]


def test_matcher_image_environment_and_port_agree_with_the_deployment() -> None:
    text = (DEPLOY / "matcher.Dockerfile").read_text()
    fields = {f"MATCHER_{name.upper()}" for name in Settings.model_fields}
    assert set(re.findall(r"\b(MATCHER_[A-Z0-9_]+)=", text)) <= fields
    objects = rendered("overlays/prod")
    final = dict(stages(DEPLOY / "matcher.Dockerfile")[-1])
    config = config_map_of(objects, matcher(objects))
    assert final["EXPOSE"].split() == [config["MATCHER_PORT"], config["MATCHER_HTTP_PORT"]]
    assert final["ENTRYPOINT"] == '["python", "-m", "service"]'
    uid = final["USER"].split(":")[0]
    assert str(pod(matcher(objects))["securityContext"]["runAsUser"]) == uid


def test_model_image_holds_what_the_init_containers_copy() -> None:
    final = stages(DEPLOY / "export.Dockerfile")[-1]
    destinations = {args.split()[-1].rstrip("/") for name, args in final if name == "COPY"}
    objects = rendered("overlays/prod")
    sources = {
        init["command"][2]
        for deployment in of_kind(objects, "Deployment")
        for init in pod(deployment).get("initContainers", [])
    }
    assert sources and sources <= destinations
    env = config_map_of(objects, matcher(objects))
    assert f"/models/{env['MATCHER_MODEL_NAME']}" in destinations
    version = re.search(r"ARG MODEL_VERSION=(\d+)", (DEPLOY / "export.Dockerfile").read_text())
    assert version and version[1] == env["MATCHER_MODEL_VERSION"]


@pytest.mark.parametrize("target", sorted(NAMESPACES))
def test_service_reads_the_config_map_as_its_environment(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.config import load_settings

    objects = rendered(target)
    env = config_map_of(objects, matcher(objects))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings([])
    assert (settings.backend, settings.port, settings.model_version) == ("tfserving", 50051, 1)
    assert str(settings.classifier) == env["MATCHER_CLASSIFIER"]
