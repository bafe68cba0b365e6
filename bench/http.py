"""The HTTP/JSON API against gRPC on the same server, side by side in one run.

One matcher process serves both transports; the same closed-loop driver (each of `c` workers
sends the next request when its answer arrives) calls `Match` over gRPC (grpc.aio) and
`POST /v1/match` as a multipart upload (aiohttp), interleaved round by round, at each
concurrency. Prints p50/p95 latency and requests/s per transport and the HTTP/gRPC ratios;
`--json FILE` writes the same figures.

    .venv/bin/python -m bench.http [--model-dir models/backbones/efficientnet_lite0]
        [--classifier models/classifiers/efficientnet_lite0] [--image deploy/ghz/chelsea.jpg]
        [--views whole] [--concurrency 1,16] [--total 200] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from bench.startup import DEFAULT_CLASSIFIER, DEFAULT_MODEL_DIR, free_port, matcher_process
from matcher.v1 import matcher_pb2, matcher_pb2_grpc

Call = Callable[[], Awaitable[None]]


async def closed_loop(call: Call, concurrency: int, total: int) -> dict[str, float]:
    """`total` calls by `concurrency` workers; latency percentiles and requests/s."""
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
        "rps": len(latencies) / elapsed,
    }


async def compare(
    target: str,
    http_port: int,
    image: bytes,
    views: str,
    levels: list[int],
    total: int,
    rounds: int,
) -> list[dict[str, Any]]:
    request = matcher_pb2.ImageRequest(image=image, top_k=5, views=f"VIEWS_{views.upper()}")
    url = f"http://localhost:{http_port}/v1/match"
    connector = aiohttp.TCPConnector(limit=max(levels))
    async with (
        grpc.aio.insecure_channel(target) as channel,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        stub = matcher_pb2_grpc.MatcherStub(channel)

        async def by_grpc() -> None:
            await stub.Match(request, timeout=60)

        async def by_http() -> None:
            form = aiohttp.FormData()
            form.add_field("image", image, filename="photo.jpg", content_type="image/jpeg")
            form.add_field("top_k", "5")
            form.add_field("views", views)
            async with session.post(url, data=form) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
                await response.read()

        calls = {"grpc": by_grpc, "http": by_http}
        rows = []
        for concurrency in levels:
            for call in calls.values():  # warm-up at this concurrency, not reported
                await closed_loop(call, concurrency, 2 * concurrency)
            measured: dict[str, list[dict[str, float]]] = {name: [] for name in calls}
            for _ in range(rounds):
                for name, call in calls.items():
                    measured[name].append(await closed_loop(call, concurrency, total))
            row: dict[str, Any] = {"concurrency": concurrency}
            for name, runs in measured.items():
                for key in ("p50_ms", "p95_ms", "rps"):
                    row[f"{name}_{key}"] = statistics.median(run[key] for run in runs)
            row["http_vs_grpc_p50"] = row["http_p50_ms"] / row["grpc_p50_ms"]
            row["http_vs_grpc_rps"] = row["http_rps"] / row["grpc_rps"]
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER)
    parser.add_argument("--image", type=Path, default=Path("deploy/ghz/chelsea.jpg"))
    parser.add_argument("--views", choices=("whole", "crops", "crops_rotations"), default="whole")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--total", type=int, default=200, help="requests per pass (200)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved passes (3)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    image = args.image.read_bytes()
    levels = [int(c) for c in args.concurrency.split(",")]
    flags = ["--model-dir", str(args.model_dir), "--classifier", str(args.classifier)]
    http_port = free_port()
    with matcher_process(flags, http_port=http_port) as (_, target, _):
        rows = asyncio.run(
            compare(target, http_port, image, args.views, levels, args.total, args.rounds)
        )
    print(f"Match on {args.image.name}, views {args.views}, medians of {args.rounds} rounds")
    print(
        f"{'conc':>4} {'grpc p50':>9} {'http p50':>9} {'ratio':>6} {'grpc p95':>9} "
        f"{'http p95':>9} {'grpc rps':>9} {'http rps':>9} {'ratio':>6}"
    )
    for row in rows:
        print(
            f"{row['concurrency']:>4} {row['grpc_p50_ms']:>9.1f} {row['http_p50_ms']:>9.1f} "
            f"{row['http_vs_grpc_p50']:>6.2f} {row['grpc_p95_ms']:>9.1f} "
            f"{row['http_p95_ms']:>9.1f} {row['grpc_rps']:>9.1f} {row['http_rps']:>9.1f} "
            f"{row['http_vs_grpc_rps']:>6.2f}"
        )
    if args.json:
        result = {"image": str(args.image), "views": args.views, "levels": rows}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
