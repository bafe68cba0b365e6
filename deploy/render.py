"""Render a kustomization without kubectl: the small subset of kustomize that deploy/k8s uses.

`python deploy/render.py deploy/k8s/overlays/prod` prints the objects `kubectl kustomize` would
print for these overlays (up to document order). Supported, and nothing else:

- `resources`: YAML files and directories holding a kustomization.yaml;
- `configMapGenerator` with `literals`, `files`, `envs` and `options.labels`; `behavior`
  create | merge | replace; the content-hash name suffix (kustomize's algorithm) and the
  rewriting of references to a generated ConfigMap in pod specs (volumes, envFrom, env);
- `patches` with `path:` to a strategic-merge patch whose kind and name pick the target;
  lists merge by the API's patch merge key for containers, initContainers, env, volumes and
  volumeMounts, and are replaced otherwise (as kustomize does for lists without one);
- `namespace`, `labels` (pairs with includeTemplates; includeSelectors is refused), `images`.

Anything else in a kustomization, or a patch directive (`$patch`), raises RenderError instead of
being silently ignored, so a manifest cannot depend on a feature this renderer fakes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

SUPPORTED_KEYS = frozenset(
    {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "namespace"}
    | {"labels", "images"}
)
#: Kinds that live outside namespaces (only those these manifests could contain).
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"})
#: patchMergeKey of the list fields a patch here may touch; every other list is replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}
#: Kinds whose pod template gets `labels` with includeTemplates (only Deployments are used).
WORKLOADS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"})
#: kustomize's "legacy" output order, first part; other kinds follow, by kind and name.
KIND_ORDER = (
    "Namespace",
    "ResourceQuota",
    "LimitRange",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Role",
    "RoleBinding",
    "Service",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
)


class RenderError(ValueError):
    """The kustomization uses something this renderer does not implement, or is wrong."""


@dataclass
class Rendered:
    """Objects of one kustomization, and which ConfigMaps are generated (need a hash suffix)."""

    objects: list[Obj] = field(default_factory=list)
    generated: set[int] = field(default_factory=set)  # id() of generated ConfigMaps


def build(directory: Path) -> list[Obj]:
    """Render the kustomization in `directory`, as `kubectl kustomize directory` would."""
    rendered = _build(Path(directory))
    _apply_name_hashes(rendered)
    order = {kind: i for i, kind in enumerate(KIND_ORDER)}
    return sorted(
        rendered.objects,
        key=lambda o: (order.get(o["kind"], len(order)), o["kind"], o["metadata"]["name"]),
    )


def _build(directory: Path) -> Rendered:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    unsupported = set(spec) - SUPPORTED_KEYS
    if unsupported:
        raise RenderError(f"{path}: unsupported fields {sorted(unsupported)}")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{path}: kind must be Kustomization")
    rendered = Rendered()
    for entry in spec.get("resources", []):
        _add_resource(rendered, directory / entry)
    for generator in spec.get("configMapGenerator", []):
        _generate_config_map(rendered, directory, generator)
    for patch in spec.get("patches", []):
        _apply_patch(rendered, directory, patch)
    if "namespace" in spec:
        for obj in rendered.objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for labels in spec.get("labels", []):
        _apply_labels(rendered, labels)
    for image in spec.get("images", []):
        _apply_image(rendered, image)
    return rendered


def _add_resource(rendered: Rendered, path: Path) -> None:
    if path.is_dir():
        child = _build(path)
        rendered.objects.extend(child.objects)
        rendered.generated |= child.generated
        return
    if not path.is_file():
        raise RenderError(f"resource {path} does not exist")
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None:
            continue
        if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= set(doc):
            raise RenderError(f"{path}: every document needs apiVersion, kind and metadata")
        rendered.objects.append(doc)


# ---- configMapGenerator -----------------------------------------------------------------


def _generate_config_map(rendered: Rendered, directory: Path, generator: Obj) -> None:
    known = {"name", "behavior", "literals", "files", "envs", "options"}
    if set(generator) - known or set(generator.get("options", {})) - {"labels"}:
        raise RenderError(f"configMapGenerator: unsupported fields in {generator}")
    name = generator["name"]
    labels = generator.get("options", {}).get("labels", {})
    data: dict[str, str] = {}
    for literal in generator.get("literals", []):
        key, sep, value = literal.partition("=")
        if not sep:
            raise RenderError(f"configMapGenerator {name}: literal {literal!r} has no '='")
        data[key] = value
    for entry in generator.get("files", []):
        key, sep, rel = entry.partition("=")
        rel = rel if sep else key
        file = directory / rel
        data[key if sep else file.name] = file.read_text()
    for env_file in generator.get("envs", []):
        data.update(_read_env_file(directory / env_file))
    behavior = generator.get("behavior", "create")
    existing = [o for o in rendered.objects if o["kind"] == "ConfigMap" and _name(o) == name]
    if behavior == "create":
        if existing:
            raise RenderError(f"configMapGenerator {name}: already exists; use behavior merge")
        metadata: Obj = {"name": name, **({"labels": dict(labels)} if labels else {})}
        config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
        rendered.objects.append(config_map)
        rendered.generated.add(id(config_map))
    elif behavior in ("merge", "replace"):
        if len(existing) != 1:
            raise RenderError(f"configMapGenerator {name}: {behavior} needs exactly one base")
        target = existing[0]
        target["data"] = {**target.get("data", {}), **data} if behavior == "merge" else data
        if labels:
            target["metadata"].setdefault("labels", {}).update(labels)
    else:
        raise RenderError(f"configMapGenerator {name}: unknown behavior {behavior!r}")


def _read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and `#` comments skipped. Quotes are kept, as kustomize does,
    so they are refused here rather than passed on by surprise."""
    data = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or value[:1] in ("'", '"'):
            raise RenderError(f"{path}:{number}: expected KEY=VALUE without quotes")
        data[key] = value
    return data


def config_map_hash(name: str, data: dict[str, str]) -> str:
    """kustomize's name suffix: sha256 of Go's json.Marshal of {data, kind, name}, first ten
    hex digits with 0, 1, 3, a, e mapped to g, h, k, m, t."""
    encoded = json.dumps(
        {"data": data, "kind": "ConfigMap", "name": name},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    # Go's encoder escapes these where Python's does not.
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        encoded = encoded.replace(char, escape)
    encoded = encoded.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _apply_name_hashes(rendered: Rendered) -> None:
    renamed: dict[tuple[str | None, str], str] = {}
    for obj in rendered.objects:
        if id(obj) in rendered.generated:
            old = _name(obj)
            new = f"{old}-{config_map_hash(old, obj.get('data', {}))}"
            obj["metadata"]["name"] = new
            renamed[(obj["metadata"].get("namespace"), old)] = new
    for obj in rendered.objects:
        pod = _pod_spec(obj)
        if pod is None:
            continue
        namespace = obj["metadata"].get("namespace")
        for ref in _config_map_refs(pod):
            ref["name"] = renamed.get((namespace, ref["name"]), ref["name"])


def _config_map_refs(pod: Obj) -> list[Obj]:
    """Every {name: ...} in a pod spec that names a ConfigMap."""
    refs = [v["configMap"] for v in pod.get("volumes", []) if "configMap" in v]
    for container in containers(pod):
        refs += [e["configMapRef"] for e in container.get("envFrom", []) if "configMapRef" in e]
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("configMapKeyRef")
            if ref is not None:
                refs.append(ref)
    return refs


# ---- patches, labels, images --------------------------------------------------------------


def _apply_patch(rendered: Rendered, directory: Path, entry: Obj) -> None:
    if set(entry) != {"path"}:
        raise RenderError(f"patches: only `path:` entries are supported, got {sorted(entry)}")
    patch_file = directory / entry["path"]
    patch = yaml.safe_load(patch_file.read_text())
    if "$patch" in json.dumps(patch):
        raise RenderError(f"{patch_file}: $patch directives are not supported")
    targets = [
        o
        for o in rendered.objects
        if o["kind"] == patch["kind"] and _name(o) == patch["metadata"]["name"]
    ]
    if len(targets) != 1:
        raise RenderError(f"{patch_file}: matches {len(targets)} objects, expected one")
    merged = strategic_merge(targets[0], patch)
    targets[0].clear()
    targets[0].update(merged)


def strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """A strategic merge patch of plain data: maps merge (null deletes), lists with a merge key
    merge element by element, other lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = strategic_merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    merge_key = MERGE_KEYS.get(key or "")
    if isinstance(base, list) and isinstance(patch, list) and merge_key:
        out = copy.deepcopy(base)
        for item in patch:
            match = [i for i, b in enumerate(out) if b.get(merge_key) == item.get(merge_key)]
            if match:
                out[match[0]] = strategic_merge(out[match[0]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _apply_labels(rendered: Rendered, entry: Obj) -> None:
    if entry.get("includeSelectors"):
        raise RenderError("labels: includeSelectors is not supported (selectors are immutable)")
    if set(entry) - {"pairs", "includeSelectors", "includeTemplates"}:
        raise RenderError(f"labels: unsupported fields in {sorted(entry)}")
    pairs = entry["pairs"]
    for obj in rendered.objects:
        obj["metadata"].setdefault("labels", {}).update(pairs)
        if entry.get("includeTemplates") and obj["kind"] in WORKLOADS:
            template = obj["spec"]["template"].setdefault("metadata", {})
            template.setdefault("labels", {}).update(pairs)


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry port is not a tag."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def _apply_image(rendered: Rendered, entry: Obj) -> None:
    if set(entry) - {"name", "newName", "newTag", "digest"}:
        raise RenderError(f"images: unsupported fields in {sorted(entry)}")
    for obj in rendered.objects:
        for container in containers(_pod_spec(obj)):
            name, tag, digest = split_image(container["image"])
            if name != entry["name"]:
                continue
            name = entry.get("newName", name)
            if "digest" in entry:
                container["image"] = f"{name}@{entry['digest']}"
            else:
                tag = entry.get("newTag", tag)
                container["image"] = (
                    name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
                )


def containers(pod: Obj | None) -> list[Obj]:
    """A pod spec's containers and initContainers (none for no pod spec)."""
    return (pod or {}).get("containers", []) + (pod or {}).get("initContainers", [])


def _pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] in WORKLOADS:
        return obj["spec"]["template"]["spec"]
    return obj["spec"] if obj["kind"] == "Pod" else None


def _name(obj: Obj) -> str:
    return obj["metadata"]["name"]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python deploy/render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    try:
        objects = build(Path(argv[0]))
    except (RenderError, OSError) as exc:
        print(f"render: error: {exc}", file=sys.stderr)
        return 1
    print(yaml.dump_all(objects, Dumper=_BlockDumper, sort_keys=False), end="")
    return 0


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the TF Serving config files) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
