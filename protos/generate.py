"""Generate the Python code for the Matcher contract.

Run by `make proto`; `tests/test_proto_generated.py` runs it into a temporary folder and fails
when the committed copy under `matcher/v1/` differs, so the generated code can never go stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("matcher/v1/matcher.proto",)


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto file under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    # Make the generated folders regular packages so that tools and imports agree.
    for package in {Path(p).parent for p in PROTO_FILES}:
        for parent in (package, *package.parents[:-1]):
            (out_dir / parent / "__init__.py").touch()
    # The generated packages only: matcher/ around matcher/v1/ is the hand-written library.
    packages = {Path(p).parent for p in PROTO_FILES}
    return sorted(
        f for pkg in packages for f in (out_dir / pkg).rglob("*") if f.suffix in (".py", ".pyi")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT.parent, help="output root")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
