"""Matching quality on field photos: top-1, top-5 and the no-match verdict, per query kind,
per matcher and per views mode, with the latency each costs.

The catalogue is `bench.quality_data`'s (16 items from real photos shipped in packages, 40
careful training views each; queries rotated, cropped, on clutter, blurred, a second real
photo; and photos of things outside the catalogue). Each matcher is trained the way a user
trains one, `python -m train DATA --matcher M` with its defaults (the outside photos of
`DATA/_outside/` calibrate the thresholds), and every query goes through the matcher core's
`match` with that mode's calibrated threshold, one at a time, so the latency is a single
request's on an idle server.

    .venv/bin/python -m bench.quality [--matchers svm,knn,prototype] \\
        [--views whole,crops,crops_rotations] [--phone-size] [--json build/bench-quality.json]

With `--phone-size` every query (the outside photos too) is sent as a phone stores a photo:
enlarged to 4032 pixels on its longer side (a 12-megapixel frame's), a JPEG of quality 90, and
every other one stored turned (its pixels a quarter turn round, EXIF orientation 6, as a phone
held upright stores them). The pixels say no more than the small photo's; what changes is the
path through the server: decodes at reduced DCT scales, the rewrite of turned photos, closer
looks at a large photo's crops. Training is unchanged.

Each mode is measured as served (answers checked by geometry, `matcher.geometry`) and, on the
same run, with the check off (`min_inliers=0`, rows marked "no-geometry": the verdict on
similarity alone, against the mode's similarity threshold). "verified" is the share of the
correct answers geometry verified. "refused" is the share of outside photos answered
NO_MATCH; "false rejects" the share of the correctly ranked catalogue queries answered
NO_MATCH (the calibration aims at 2 % on held-out training views, so on harder field photos it
is higher: the figure to read).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from bench.quality_data import KINDS, OUTSIDE, build
from matcher.settings import CoreSettings
from matcher.views import VIEW_MODES

MATCHERS = ("svm", "knn", "prototype")
#: `--phone-size`: a 12-megapixel phone frame's longer side.
PHONE_SIDE = 4032
#: The label of rows whose answers were not checked by geometry (min_inliers=0).
NO_GEOMETRY = "no-geometry"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    default = CoreSettings.model_fields["model_dir"].default
    parser.add_argument("--model-dir", type=Path, default=default, help=f"({default})")
    parser.add_argument("--work", type=Path, default=Path("build/quality"), help="(build/quality)")
    parser.add_argument("--matchers", default=",".join(MATCHERS), help="(svm,knn,prototype)")
    parser.add_argument("--views", default=",".join(VIEW_MODES), help="(all modes)")
    parser.add_argument("--train-views", type=int, default=40, help="per item (40)")
    parser.add_argument(
        "--engine-agreement",
        action="store_true",
        help="also: top-1 of every query with the tensorflow and the openvino engine (the "
        "first matcher's run, whole view): the share that agrees",
    )
    parser.add_argument(
        "--phone-size",
        action="store_true",
        help="send every query as a phone stores a photo: 4032 pixels on its longer side, "
        "JPEG q90, every other one stored turned (EXIF orientation 6)",
    )
    parser.add_argument(
        "--served-only",
        action="store_true",
        help="measure each mode as served only, without its no-geometry row (half the time)",
    )
    parser.add_argument(
        "--no-outside",
        action="store_true",
        help="train without the catalogue's outside photos (train/_outside/), as a catalogue "
        "without any is calibrated: the catalogue's own photos stand in for them",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def as_phone_photo(data: bytes, turned: bool) -> bytes:
    """`data` as a phone stores a photo (`--phone-size`): `PHONE_SIDE` pixels on its longer
    side, JPEG q90, and, `turned`, its pixels stored a quarter turn round with EXIF orientation
    6, which turns them upright again."""
    with Image.open(io.BytesIO(data)) as image:
        photo = image.convert("RGB")
    scale = PHONE_SIDE / max(photo.size)
    photo = photo.resize(
        (round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC
    )
    exif = Image.Exif()
    if turned:
        photo = photo.transpose(Image.Transpose.ROTATE_90)
        exif[0x0112] = 6
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def train_run(
    data: Path, out: Path, matcher: str, model_dir: Path, cache: Path, outside: bool = True
) -> float:
    """Train as a user does (the CLI, its defaults); the seconds it took. Without `outside`,
    the catalogue's `_outside/` photos are not used (`--outside` names an empty folder)."""
    command = [sys.executable, "-m", "train", str(data), "--out", str(out)]
    command += ["--model-dir", str(model_dir), "--matcher", matcher, "--cache-dir", str(cache)]
    command += ["--no-progress", "--no-report"]
    if not outside:
        empty = out.parent / "no-outside"
        empty.mkdir(parents=True, exist_ok=True)
        command += ["--outside", str(empty)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


async def evaluate(
    run: Path,
    model_dir: Path,
    queries: dict[str, list[tuple[Path, str]]],
    modes: list[str],
    geometry_off: bool = True,
    phone_size: bool = False,
) -> dict[str, Any]:
    """Every query through the core, for each mode: the figures of one trained run."""
    from matcher.factory import make_core

    core = make_core(CoreSettings(model_dir=model_dir, classifier=run))
    await asyncio.to_thread(core.load)
    figures: dict[str, Any] = {}
    try:
        for mode in modes:
            figures[mode] = await _evaluate_mode(core, queries, mode, None, phone_size)
            if geometry_off:  # the same run, its answers not checked by geometry
                figures[f"{mode} {NO_GEOMETRY}"] = await _evaluate_mode(
                    core, queries, mode, 0, phone_size
                )
    finally:
        await core.close()
    return figures


async def _evaluate_mode(
    core: Any,
    queries: dict[str, list[tuple[Path, str]]],
    mode: str,
    min_inliers: int | None = None,
    phone_size: bool = False,
) -> Any:
    hits: dict[str, list[tuple[bool, bool, bool]]] = defaultdict(list)  # top-1, top-5, refused
    verified: list[bool] = []
    answers: list[dict[str, Any]] = []  # every query's answer, to read which photos fail
    latency: list[float] = []
    threshold = None
    todo = [(kind, path, label) for kind, found in queries.items() for path, label in found]
    for number, (kind, path, label) in enumerate(tqdm(todo, desc=mode, unit="query", leave=False)):
        data = path.read_bytes()
        if phone_size:
            data = as_phone_photo(data, turned=number % 2 == 1)
        started = time.perf_counter()
        result = await core.match(data, top_k=5, views=mode, min_inliers=min_inliers)
        latency.append(time.perf_counter() - started)
        names = [m.label for m in result.matches]
        refused = result.verdict is not None and not result.verdict.matched
        if kind != "outside" and names[0] == label:
            verified.append(result.verdict is not None and result.verdict.verified)
        threshold = result.verdict.threshold if result.verdict else None
        hits[kind].append((names[0] == label, label in names, refused))
        answers.append(_answer(kind, path, label, result, refused))
    catalogue = [hit for kind, found in hits.items() if kind != "outside" for hit in found]
    correct = [hit for hit in catalogue if hit[0]]
    latency.sort()
    return {
        "top1": _share(h[0] for h in catalogue),
        "top5": _share(h[1] for h in catalogue),
        "by_kind": {kind: _share(h[0] for h in hits[kind]) for kind in KINDS if kind in hits},
        "outside_refused": _share(h[2] for h in hits.get("outside", [])),
        "false_rejects": _share(h[2] for h in correct),
        # Correct answers geometry verified (the rest matched on similarity, or not at all).
        "verified": _share(verified),
        "threshold": threshold,
        "latency_ms": {
            "p50": round(1000 * statistics.median(latency), 1),
            "p95": round(1000 * latency[int(0.95 * (len(latency) - 1))], 1),
        },
        "queries": len(catalogue),
        "outside": len(hits.get("outside", [])),
        "answers": answers,
    }


def _answer(kind: str, path: Path, label: str, result: Any, refused: bool) -> dict[str, Any]:
    """One query's answer as the JSON records it: its first labels with their similarity and
    inliers, and the verdict."""
    verdict = result.verdict
    return {
        "kind": kind,
        "photo": path.name,
        "label": label,
        "refused": refused,
        "score": None if verdict is None else round(verdict.score, 4),
        "verified": verdict is not None and verdict.verified,
        "ranked": [
            [m.label, None if m.similarity is None else round(m.similarity, 4), m.inliers]
            for m in result.matches
        ],
    }


async def engine_agreement(
    run: Path, model_dir: Path, queries: dict[str, list[tuple[Path, str]]]
) -> dict[str, Any]:
    """The top-1 label of every query (whole view) with each engine: how often they agree."""
    from matcher.factory import make_core

    todo = [path for found in queries.values() for path, _ in found]
    top1: dict[str, list[str]] = {}
    for engine in ("tensorflow", "openvino"):
        settings = CoreSettings(model_dir=model_dir, classifier=run, engine=engine)
        core = make_core(settings)
        await asyncio.to_thread(core.load)
        try:
            answers = []
            for path in tqdm(todo, desc=engine, unit="query", leave=False):
                result = await core.match(path.read_bytes(), top_k=1, views="whole")
                answers.append(result.matches[0].label)
            top1[engine] = answers
        finally:
            await core.close()
    same = [a == b for a, b in zip(top1["tensorflow"], top1["openvino"], strict=True)]
    return {"queries": len(same), "same_top1": _share(same)}


def _share(values: Any) -> float:
    flags = list(values)
    return round(sum(flags) / len(flags), 4) if flags else float("nan")


def print_table(results: dict[str, dict[str, Any]]) -> None:
    kinds = [kind for kind in KINDS]
    short = {"cluttered_rotated": "clut+rot", "second_photo": "2nd photo"}
    header = f"{'matcher':10s} {'views':28s} {'top-1':>6s} {'top-5':>6s} "
    header += " ".join(f"{short.get(k, k)[:9]:>9s}" for k in kinds)
    header += f" {'refused':>8s} {'false rej':>9s} {'verified':>8s} {'thresh':>7s}"
    header += f" {'p50 ms':>7s} {'p95 ms':>7s}"
    print(header)
    for matcher, modes in results.items():
        for mode, row in modes.items():
            line = f"{matcher:10s} {mode:28s} {row['top1']:6.1%} {row['top5']:6.1%} "
            line += " ".join(f"{row['by_kind'].get(k, float('nan')):9.1%}" for k in kinds)
            threshold = row["threshold"] if row["threshold"] is not None else float("nan")
            line += f" {row['outside_refused']:8.1%} {row['false_rejects']:9.1%}"
            line += f" {row['verified']:8.1%} {threshold:7.3f}"
            line += f" {row['latency_ms']['p50']:7.1f} {row['latency_ms']['p95']:7.1f}"
            print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    matchers = [m for m in args.matchers.split(",") if m]
    modes = [m for m in args.views.split(",") if m]
    unknown = sorted(set(matchers) - set(MATCHERS)) + sorted(set(modes) - set(VIEW_MODES))
    if unknown:
        print(f"bench.quality: unknown matcher or views: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if not any(args.model_dir.glob("*/saved_model.pb")):
        print(f"bench.quality: no SavedModel under {args.model_dir}; run `make export`")
        return 2
    data = build(args.work / "data", train_views=args.train_views)
    queries = dict(data.queries)
    print(
        f"{len(data.labels)} items x {args.train_views} training views; "
        + ", ".join(f"{len(v)} {k}" for k, v in queries.items())
        + f" (outside photos under {OUTSIDE})"
        + (
            f"; queries sent at {PHONE_SIDE} pixels, every other one turned"
            if args.phone_size
            else ""
        )
        + ("; trained without the outside photos" if args.no_outside else "")
    )
    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for matcher in matchers:
        run = args.work / "runs" / matcher
        seconds[matcher] = train_run(
            data.out / "train",
            run,
            matcher,
            args.model_dir,
            args.work / "cache",
            not args.no_outside,
        )
        results[matcher] = asyncio.run(
            evaluate(run, args.model_dir, queries, modes, not args.served_only, args.phone_size)
        )
        print(f"trained and evaluated {matcher} (training {seconds[matcher]:.0f} s)")
    print_table(results)
    agreement = None
    if args.engine_agreement:
        run = args.work / "runs" / matchers[0]
        agreement = asyncio.run(engine_agreement(run, args.model_dir, queries))
        print(
            f"top-1 the same with tensorflow and openvino ({matchers[0]}, whole view): "
            f"{100 * agreement['same_top1']:.1f} % of {agreement['queries']} queries"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "items": len(data.labels),
            "training_seconds": seconds,
            "phone_size": args.phone_size,
            "outside_calibration": not args.no_outside,
            "results": results,
        }
        if agreement is not None:
            payload["engine_agreement"] = agreement
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
