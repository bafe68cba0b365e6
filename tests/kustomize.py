"""The real kustomize (`kubectl kustomize`) for the tests, and small helpers over what it renders.

Each kustomization is rendered once per test session; callers get their own copy to change.
Without kubectl the calling test fails (never skips) and says how to install it.
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

Obj = dict[str, Any]

INSTALL_HINT = (
    "kubectl (with its built-in kustomize, v5.5 or newer) is not on PATH: install it, e.g. "
    "`apt-get install kubectl`, or follow https://kubernetes.io/docs/tasks/tools/ "
    "(standalone kustomize: https://kubectl.docs.kubernetes.io/installation/kustomize/)"
)


def kubectl() -> str:
    """The kubectl on PATH; fails the calling test when there is none."""
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return found


def build(directory: Path) -> list[Obj]:
    """Every object `kubectl kustomize directory` prints, in its order (a fresh copy)."""
    return copy.deepcopy(list(_build(Path(directory).resolve())))


@functools.cache
def _build(directory: Path) -> tuple[Obj, ...]:
    command = [kubectl(), "kustomize", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{result.stderr}", pytrace=False)
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


def containers(pod: Obj | None) -> list[Obj]:
    """A pod spec's containers and initContainers (none for no pod spec)."""
    return (pod or {}).get("containers", []) + (pod or {}).get("initContainers", [])


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry port is not a tag."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None
