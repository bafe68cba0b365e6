"""Integrity manifests: written over real folders, refused on every kind of difference, and the
`python -m integrity` command's exit codes and one-line messages."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from integrity.manifest import (
    MANIFEST_FILE,
    IntegrityError,
    ManifestMissingError,
    kind_of,
    matcher_version,
    read_manifest,
    verify,
    write_manifest,
)
from tests.cli_output import run_module

ROOT = Path(__file__).resolve().parent.parent


def savedmodel_like(root: Path) -> Path:
    """A folder laid out as a SavedModel version (the manifest never parses the files)."""
    (root / "variables").mkdir(parents=True)
    (root / "assets.extra").mkdir()
    (root / "saved_model.pb").write_bytes(b"graph" * 100)
    (root / "variables" / "variables.index").write_bytes(b"index")
    (root / "variables" / "variables.data-00000-of-00001").write_bytes(bytes(range(256)) * 40)
    (root / "assets.extra" / "matcher_model.json").write_text('{"backbone": "tiny"}')
    return root


def classifier_like(root: Path) -> Path:
    """A folder laid out as `train` leaves it, report pictures included."""
    (root / "report").mkdir(parents=True)
    (root / "classifier.skops").write_bytes(b"PK" + bytes(300))
    (root / "report.json").write_text('{"classifier": {"file": "classifier.skops"}}')
    (root / "features.npz").write_bytes(b"npz" * 50)
    (root / "report" / "index.html").write_text("<html></html>")
    (root / "report" / "tsne.png").write_bytes(b"\x89PNG")
    return root


def flip_byte(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("integrity", *args, timeout_s=60)


# --- writing -------------------------------------------------------------------------------------


def test_a_savedmodel_manifest_lists_every_other_file_with_digest_and_size(tmp_path: Path) -> None:
    folder = savedmodel_like(tmp_path / "1")
    manifest = write_manifest(folder, tool="export")
    data = json.loads((folder / MANIFEST_FILE).read_text())
    assert data["kind"] == "savedmodel" and data["excluded"] == []
    assert (data["tool"], data["tool_version"]) == ("export", matcher_version())
    assert sorted(data["files"]) == [
        "assets.extra/matcher_model.json",
        "saved_model.pb",
        "variables/variables.data-00000-of-00001",
        "variables/variables.index",
    ]
    shard = folder / "variables" / "variables.data-00000-of-00001"
    entry = data["files"]["variables/variables.data-00000-of-00001"]
    assert entry == {"sha256": hashlib.sha256(shard.read_bytes()).hexdigest(), "size": 10240}
    assert read_manifest(folder) == manifest
    assert verify(folder) == manifest


def test_the_recorded_version_is_the_projects() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert matcher_version() == pyproject["project"]["version"]


def test_a_classifier_manifest_leaves_out_the_redrawable_report(tmp_path: Path) -> None:
    folder = classifier_like(tmp_path / "run")
    assert kind_of(folder) == "classifier"
    manifest = write_manifest(folder, tool="train")
    assert sorted(manifest.files) == ["classifier.skops", "features.npz", "report.json"]
    assert manifest.excluded == ("report",)
    # `make report` redraws the pictures; the manifest still holds.
    (folder / "report" / "tsne.png").write_bytes(b"\x89PNG redrawn")
    (folder / "report" / "grid.png").write_bytes(b"\x89PNG new")
    assert verify(folder) == manifest


def test_writing_again_replaces_the_manifest(tmp_path: Path) -> None:
    folder = savedmodel_like(tmp_path / "1")
    write_manifest(folder)
    (folder / "assets.extra" / "extra.txt").write_text("checked by the operator")
    write_manifest(folder)
    assert "assets.extra/extra.txt" in verify(folder).files
    assert sorted(p.name for p in folder.iterdir()) == [
        "assets.extra",
        MANIFEST_FILE,
        "saved_model.pb",
        "variables",
    ]


# --- verification refuses ------------------------------------------------------------------------


def test_a_flipped_byte_is_refused_naming_the_file_and_both_digests(tmp_path: Path) -> None:
    folder = savedmodel_like(tmp_path / "1")
    write_manifest(folder)
    shard = folder / "variables" / "variables.data-00000-of-00001"
    recorded = hashlib.sha256(shard.read_bytes()).hexdigest()
    flip_byte(shard, at=5000)
    actual = hashlib.sha256(shard.read_bytes()).hexdigest()
    with pytest.raises(IntegrityError) as caught:
        verify(folder)
    message = str(caught.value)
    assert str(shard) in message and recorded in message and actual in message
    assert "(10240 bytes)" in message  # same size: only the digest tells


def test_a_changed_size_is_refused(tmp_path: Path) -> None:
    folder = classifier_like(tmp_path / "run")
    write_manifest(folder)
    with (folder / "features.npz").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match=r"features.npz has sha256 [0-9a-f]{64} \(151 bytes\)"):
        verify(folder)


def test_a_missing_listed_file_is_refused(tmp_path: Path) -> None:
    folder = classifier_like(tmp_path / "run")
    write_manifest(folder)
    (folder / "report.json").unlink()
    with pytest.raises(
        IntegrityError, match=r"report\.json is listed in manifest\.json but missing"
    ):
        verify(folder)


def test_an_unlisted_file_in_a_savedmodel_is_refused(tmp_path: Path) -> None:
    folder = savedmodel_like(tmp_path / "1")
    write_manifest(folder)
    (folder / "variables" / "variables.data-00001-of-00002").write_bytes(b"another shard")
    with pytest.raises(IntegrityError, match=r"variables\.data-00001-of-00002 is not listed"):
        verify(folder)
    # The loader's kind wins over what the folder looks like.
    (folder / "saved_model.pb").rename(folder / "graph.bak")
    assert kind_of(folder) == "classifier"
    with pytest.raises(IntegrityError) as caught:
        verify(folder, "savedmodel")
    assert any("graph.bak is not listed" in p for p in caught.value.problems)


def test_an_unlisted_file_in_a_classifier_folder_is_ignored(tmp_path: Path) -> None:
    folder = classifier_like(tmp_path / "run")
    manifest = write_manifest(folder)
    (folder / "notes.txt").write_text("not opened by anything")
    assert verify(folder) == manifest


def test_every_problem_is_counted_and_the_first_named(tmp_path: Path) -> None:
    folder = savedmodel_like(tmp_path / "1")
    write_manifest(folder)
    flip_byte(folder / "saved_model.pb")
    (folder / "variables" / "variables.index").unlink()
    (folder / "unexpected.bin").write_bytes(b"x")
    with pytest.raises(
        IntegrityError, match=r"saved_model.pb has sha256 .*\(and 2 more problems\)"
    ):
        verify(folder)


def test_no_manifest_says_how_to_write_one(tmp_path: Path) -> None:
    folder = savedmodel_like(tmp_path / "1")
    with pytest.raises(
        ManifestMissingError, match=re.escape(f"python -m integrity write {folder}`")
    ):
        verify(folder)


@pytest.mark.parametrize(
    ("files", "why"),
    [
        ({"../outside": {"sha256": "0" * 64, "size": 1}}, "not a path inside"),
        ({"/etc/passwd": {"sha256": "0" * 64, "size": 1}}, "not a path inside"),
        ({"a": {"sha256": "XYZ", "size": 1}}, "not a lowercase hex sha256"),
        ({"a": {"sha256": "0" * 64, "size": -1}}, "not a byte count"),
        ({"a": {"sha256": "0" * 64}}, "size"),
        (["a"], "not a valid manifest"),
    ],
)
def test_a_malformed_manifest_is_refused(tmp_path: Path, files: object, why: str) -> None:
    folder = classifier_like(tmp_path / "run")
    write_manifest(folder)
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["files"] = files
    (folder / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match=why):
        verify(folder)


def test_a_manifest_that_is_not_json_is_refused(tmp_path: Path) -> None:
    folder = classifier_like(tmp_path / "run")
    (folder / MANIFEST_FILE).write_text("{ not json")
    with pytest.raises(IntegrityError, match="is not a valid manifest"):
        verify(folder)


# --- the command line ----------------------------------------------------------------------------


def test_cli_write_then_verify_exits_0(tmp_path: Path) -> None:
    folder = savedmodel_like(tmp_path / "1")
    written = run_cli("write", str(folder))
    assert written.returncode == 0, written.stderr
    assert written.stdout.strip() == f"wrote {folder / MANIFEST_FILE}: 4 files (savedmodel)"
    checked = run_cli("verify", str(folder))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"{folder}: OK, 4 files match manifest.json (savedmodel, ")
    assert read_manifest(folder).tool == "integrity"


def test_cli_verify_exits_1_with_one_line_per_bad_folder(tmp_path: Path) -> None:
    good = classifier_like(tmp_path / "good")
    bad = savedmodel_like(tmp_path / "bad")
    write_manifest(good)
    write_manifest(bad)
    flip_byte(bad / "saved_model.pb")
    result = run_cli("verify", str(good), str(bad), str(tmp_path / "none"))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{good}: OK")
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"integrity: error: {bad / 'saved_model.pb'} has sha256 ")
    assert lines[1] == f"integrity: error: {tmp_path / 'none'} is not a directory"
    assert "Traceback" not in result.stderr


def test_cli_verify_without_manifest_exits_1_saying_how_to_write_one(tmp_path: Path) -> None:
    folder = classifier_like(tmp_path / "run")
    result = run_cli("verify", str(folder))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"integrity: error: {folder} has no manifest.json; check its files, then run "
        f"`python -m integrity write {folder}`"
    ]


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    result = run_cli("sign", str(tmp_path))
    assert result.returncode == 2
    assert "invalid choice: 'sign'" in result.stderr
    assert run_cli("write", str(tmp_path), str(tmp_path)).returncode == 2
