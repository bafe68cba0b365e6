"""The committed generated code under matcher/v1/ is exactly what `make proto` writes now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Where protoc's output goes; the rest of matcher/ is the hand-written library.
GENERATED = Path("matcher/v1")


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in (tmp_path / GENERATED).rglob("*")
        if p.is_file()
    }
    committed = {
        p.relative_to(ROOT): p.read_bytes()
        for p in (ROOT / GENERATED).rglob("*")
        if p.suffix in (".py", ".pyi")
    }
    # The package above the generated one exists (protoc's output imports matcher.v1).
    assert (ROOT / GENERATED.parent / "__init__.py").is_file()
    assert sorted(fresh) == sorted(committed), "run `make proto`"
    stale = [str(path) for path, data in fresh.items() if committed[path] != data]
    assert not stale, f"stale generated code {stale}: run `make proto` and commit"


def test_every_field_and_rpc_is_documented() -> None:
    lines = (ROOT / "protos/matcher/v1/matcher.proto").read_text().splitlines()
    declarations = [
        i
        for i, line in enumerate(lines)
        if line.strip().startswith(("rpc ", "message ", "service "))
        or ("= " in line and line.strip().endswith(";") and not line.strip().startswith("//"))
    ]
    undocumented = [
        lines[i].strip() for i in declarations if not lines[i - 1].strip().startswith("//")
    ]
    assert not undocumented, undocumented
