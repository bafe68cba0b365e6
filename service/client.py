"""`python -m service.client IMAGE... [--top-k N] [--target HOST:PORT]`: print ranked labels."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from matcher.v1 import matcher_pb2, matcher_pb2_grpc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service.client",
        description="Match images against the catalogue.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--top-k", type=int, default=5, help="labels to show; 0 = all (5)")
    parser.add_argument("--target", default="localhost:50051", help="server (localhost:50051)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per call, s (30)")
    args = parser.parse_args(argv)
    if args.top_k < 0:
        parser.error("--top-k must be 0 or more")
    return args


def format_response(path: Path, response: matcher_pb2.MatchResponse) -> str:
    """The lines printed for one image: its path, then `rank  score  label`."""
    model = response.model
    lines = [f"{path}  [{model.backbone} v{model.model_version}]"]
    for rank, match in enumerate(response.matches, start=1):
        lines.append(f"  {rank:>2}. {match.score:.4f}  {match.label}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failures = 0
    with grpc.insecure_channel(args.target) as channel:
        stub = matcher_pb2_grpc.MatcherStub(channel)
        for path in args.images:
            try:
                request = matcher_pb2.ImageRequest(image=path.read_bytes(), top_k=args.top_k)
                response = stub.Match(request, timeout=args.timeout)
            except OSError as exc:
                print(f"client: error: {path}: {exc.strerror or exc}", file=sys.stderr)
                failures += 1
                continue
            except grpc.RpcError as exc:
                print(
                    f"client: error: {path}: {exc.code().name}: {exc.details()}",
                    file=sys.stderr,
                )
                failures += 1
                continue
            print(format_response(path, response))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
