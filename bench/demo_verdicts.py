"""The demo's queries through a running server: how many catalogue photos MATCH their own item
(and how many of them geometry verified), and how many outside photos are NO_MATCH, for each
views mode with geometric verification on (the server's default) and off (`min_inliers=0`).

    make run PORT=50071 &    # then:
    .venv/bin/python -m bench.demo_verdicts --target localhost:50071 [--queries data/demo/queries]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc

from matcher.layout import OUTSIDE_DIR
from matcher.v1 import matcher_pb2, matcher_pb2_grpc

MODES: dict[str, matcher_pb2.Views] = {
    "crops": matcher_pb2.VIEWS_CROPS,
    "whole": matcher_pb2.VIEWS_WHOLE,
}


def count(
    stub: matcher_pb2_grpc.MatcherStub, queries: Path, views: matcher_pb2.Views, geometry: bool
) -> dict[str, int]:
    own = catalogue = verified = refused = outside = 0
    for folder in sorted(p for p in queries.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            options = {} if geometry else {"min_inliers": 0}
            request = matcher_pb2.ImageRequest(
                image=path.read_bytes(), top_k=1, views=views, **options
            )
            answer = stub.Match(request, timeout=60)
            if folder.name == OUTSIDE_DIR:
                outside += 1
                refused += answer.verdict == matcher_pb2.NO_MATCH
                continue
            catalogue += 1
            own += answer.verdict == matcher_pb2.MATCH and answer.matches[0].label == folder.name
            verified += answer.HasField("inliers") and answer.inliers >= answer.min_inliers
    return {
        "own_match": own,
        "catalogue": catalogue,
        "verified": verified,
        "outside_no_match": refused,
        "outside": outside,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_verdicts", description=__doc__)
    parser.add_argument("--target", default="localhost:50051", help="(localhost:50051)")
    parser.add_argument("--queries", type=Path, default=Path("data/demo/queries"))
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args(argv)
    if not args.queries.is_dir():
        print(f"bench.demo_verdicts: no {args.queries}; run `make demo`", file=sys.stderr)
        return 2
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(args.target, options=options) as channel:
        stub = matcher_pb2_grpc.MatcherStub(channel)
        figures = {
            f"{mode} {'geometry' if geometry else 'no-geometry'}": count(
                stub, args.queries, views, geometry
            )
            for mode, views in MODES.items()
            for geometry in (True, False)
        }
    for name, row in figures.items():
        print(
            f"{name:20s} own item MATCH {row['own_match']}/{row['catalogue']} "
            f"(verified {row['verified']}), outside NO_MATCH "
            f"{row['outside_no_match']}/{row['outside']}"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
