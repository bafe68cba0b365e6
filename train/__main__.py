"""`python -m train DATA`: train the catalogue classifier on a labelled image folder.

DATA holds one sub-folder per label: DATA/<label>/<image>.{jpg,jpeg,png,gif,bmp}.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matcher.settings import BackendSettings

if TYPE_CHECKING:
    from matcher.backends.base import FeatureExtractor


def _default(field: str) -> Any:
    """The server's default for a backend setting: one default, written in matcher.settings."""
    return BackendSettings.model_fields[field].default


def _choices(field: str) -> tuple[str, ...]:
    """The values a backend setting takes (its Literal in matcher.settings)."""
    return typing.get_args(BackendSettings.model_fields[field].annotation)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a matcher (knn, prototype, linear or the SVM) on backbone features of "
        "DATA/<label>/<image> files.",
    )
    parser.add_argument("data", type=Path, metavar="DATA", help="folder of label folders")
    parser.add_argument(
        "--out",
        type=Path,
        help="where the classifier, report.json, manifest.json and report/ go "
        "(default: models/classifiers/<model folder name>, or models/classifiers/hog)",
    )
    parser.add_argument(
        "--backend",
        choices=_choices("backend"),
        default=_default("backend"),
        help="feature backend, as the server's --backend (%(default)s)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=_default("model_dir"),
        help="embedded: SavedModel base path (%(default)s)",
    )
    parser.add_argument("--model-version", type=int, help="SavedModel version (latest)")
    parser.add_argument(
        "--engine",
        choices=_choices("engine"),
        default=_default("engine"),
        help="embedded: what runs the network for extraction (%(default)s: openvino where the "
        "model has its OpenVINO file); the features, and so the classifier, are the same",
    )
    parser.add_argument(
        "--precision",
        choices=_choices("precision"),
        default=_default("precision"),
        help="openvino engine: fp32 (%(default)s), or bf16 on CPUs with AVX512_BF16 or AMX",
    )
    parser.add_argument(
        "--model-name",
        default=_default("model_name"),
        help="tfserving: model name (%(default)s)",
    )
    parser.add_argument(
        "--tfserving-target",
        default=_default("tfserving_target"),
        help="tfserving: TF Serving gRPC address (%(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("cache/features"),
        help="feature cache, by model and file content (%(default)s)",
    )
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (32)")
    parser.add_argument(
        "--folds",
        type=int,
        default=10,
        help="cross-validation folds (10; --search auto: at most 5 above 1,000 samples)",
    )
    parser.add_argument(
        "--search",
        choices=("auto", "full"),
        default="auto",
        help="SVM search: auto (default) searches at most 2,500 training samples, a stratified "
        "subsample above, and refits the winner on all; full searches every sample (hours at "
        "tens of thousands)",
    )
    parser.add_argument("--holdout", type=float, default=0.2, help="held-out share (0.2)")
    parser.add_argument(
        "--matcher",
        # train.pipeline.MATCHERS, spelt out to keep --help quick.
        choices=("auto", "knn", "prototype", "svm", "linear"),
        default="auto",
        help="auto (default): knn below 10,000 photos, linear from there; knn: the label of the "
        "nearest view; prototype: the nearest label mean (both rank by the index alone, and "
        "take `add` and `remove`); svm: the original's grid-searched SVM; linear: a logistic "
        "regression on every photo (large catalogues). Serve the run folder (--classifier "
        "FOLDER)",
    )
    parser.add_argument(
        "--outside",
        type=Path,
        help="photos of things outside the catalogue, to measure the no-match threshold's false "
        "accepts (default: DATA/_outside/ when there is one)",
    )
    parser.add_argument(
        "--no-turned-views",
        action="store_true",
        help="index the photos only as they are, not also turned by 90, 180 and 270 degrees "
        "(which lets rotated field photos match, at three more backbone passes per photo)",
    )
    parser.add_argument(
        "--no-verification",
        action="store_true",
        help="store no keypoints: answers are not checked by geometry (SIFT + RANSAC) and "
        '"no match" is judged on similarity alone',
    )
    parser.add_argument(
        "--ray",
        metavar="auto|ADDRESS",
        help="extract the catalogue's features on a Ray cluster, in model actors (one per node): "
        "auto joins the cluster RAY_ADDRESS names or one running here, else starts a local one; "
        "or a cluster address (host:6379, ray://host:10001). Every node must see DATA and "
        "--cache-dir at the same paths",
    )
    parser.add_argument(
        "--ray-actors", type=int, help="with --ray: at most this many model actors (one per node)"
    )
    parser.add_argument(
        "--ray-actor-cpus",
        type=float,
        help="with --ray: CPUs each model actor reserves (the smallest node's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="split and CV seed (0)")
    parser.add_argument("--jobs", type=int, default=-1, help="grid-search processes (-1: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--features",
        choices=("cnn", "hog"),
        default="cnn",
        help="cnn: the backbone through --backend (default); hog: the HoG baseline (its "
        "classifier is for comparison, the service serves CNN features only)",
    )
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip the HoG baselines on the same split (the report's comparison table)",
    )
    parser.add_argument(
        "--no-report", action="store_true", help="skip the HTML report and its pictures"
    )
    parser.add_argument(
        "--format",
        # train.pipeline.CLASSIFIER_FILES, spelt out to keep --help quick.
        choices=("skops", "joblib"),
        default="skops",
        help="classifier file format: skops (default; loads without running code) or joblib "
        "(a pickle: runs code when loaded)",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.folds < 2 or not 0 < args.holdout < 1:
        parser.error("need --batch-size >= 1, --folds >= 2 and 0 < --holdout < 1")
    if args.ray and args.features != "cnn":
        parser.error("--ray extracts backbone features; the HoG baseline runs in this process")
    if (args.ray_actors is not None and args.ray_actors < 1) or (
        args.ray_actor_cpus is not None and args.ray_actor_cpus <= 0
    ):
        parser.error("need --ray-actors >= 1 and --ray-actor-cpus > 0")
    return args


def parse_edit_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train add|remove",
        description="Add an item to, or remove one from, a knn or prototype catalogue, without "
        "retraining; a server watching the run folder picks the change up by hot reload.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add DATA/<label>/ (its photos) as item <label>")
    add.add_argument("folder", type=Path, metavar="DATA/LABEL", help="the new item's photos")
    remove = commands.add_parser("remove", help="remove every view of LABEL")
    remove.add_argument("label", metavar="LABEL")
    for command in (add, remove):
        command.add_argument(
            "--run",
            type=Path,
            default=Path("models/classifiers") / Path(_default("model_dir")).name,
            help="the run folder to change (%(default)s)",
        )
    add.add_argument(
        "--model-dir",
        type=Path,
        help="SavedModel base path (default: the one the run was trained with)",
    )
    add.add_argument("--cache-dir", type=Path, default=Path("cache/features"))
    return parser.parse_args(argv)


def edit_main(argv: list[str]) -> int:
    """`python -m train add DATA/LABEL` and `python -m train remove LABEL`."""
    args = parse_edit_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from matcher.dataset import DatasetError
    from matcher.errors import MatcherError
    from train.edit import add_item, remove_item

    try:
        if args.command == "remove":
            done = remove_item(args.run, args.label)
            print(f"removed {done.photos} photos of {done.label}; {done.total_photos} photos left")
            return 0
        from matcher.classifier import read_run_report
        from matcher.factory import make_backend

        trained = read_run_report(args.run).get("backbone", {}).get("model_dir")
        model_dir = args.model_dir or (Path(trained) if trained else _default("model_dir"))
        backend = make_backend(BackendSettings(backend="embedded", model_dir=model_dir))
        done = add_item(args.run, args.folder, backend, args.cache_dir)
    except (DatasetError, MatcherError, OSError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    for path, why in done.rejected.items():
        print(f"skipped {path}: {why}", file=sys.stderr)
    print(
        f"added {done.photos} photos of {done.label}; {done.total_photos} photos in the catalogue"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ start-up chatter is not ours to show; TF_CPP_MIN_LOG_LEVEL=0 shows it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = sys.argv[1:] if argv is None else argv
    if isinstance(sys.stdout, io.TextIOWrapper):
        # What is printed names labels, in any script: a terminal whose encoding lacks one (a
        # Windows code page, PYTHONIOENCODING=ascii) shows it as \u escapes, not a traceback
        # after the run's files are written.
        sys.stdout.reconfigure(errors="backslashreplace")
    if argv[:1] in (["add"], ["remove"]):
        return edit_main(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font-cache chatter
    from matcher.dataset import DatasetError
    from matcher.errors import MatcherError
    from matcher.factory import make_backend
    from train.pipeline import TrainConfig, train

    settings = BackendSettings(
        backend=args.backend,
        model_dir=args.model_dir,
        model_version=args.model_version,
        engine=args.engine,
        precision=args.precision,
        model_name=args.model_name,
        tfserving_target=args.tfserving_target,
    )
    default_out = Path("models/classifiers") / (
        args.model_dir.name if args.features == "cnn" else "hog"
    )
    config = TrainConfig(
        data=args.data,
        out=args.out or default_out,
        cache_dir=None if args.no_cache else args.cache_dir,
        batch_size=args.batch_size,
        folds=args.folds,
        holdout=args.holdout,
        seed=args.seed,
        jobs=args.jobs,
        progress=not args.no_progress,
        baselines=args.features == "cnn" and not args.no_baselines,
        model_dir=args.model_dir if args.features == "cnn" and args.backend == "embedded" else None,
        format=args.format,
        search=args.search,
        outside=args.outside,
        matcher=args.matcher,
        turned_views=not args.no_turned_views,
        verification=not args.no_verification,
        ray=_ray_options(args),
        backend_settings=settings,
    )
    try:
        backend = make_backend(settings) if args.features == "cnn" else _hog_backend()
        result = train(config, backend)
        if not args.no_report:
            from train.visual_report import write_visual_report

            print(f"report: {write_visual_report(result.report_path.parent)}")
    except (DatasetError, MatcherError, OSError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.classifier_path} and {result.report_path}")
    return 0


def _ray_options(args: argparse.Namespace) -> Any:
    """RayOptions from --ray (None without it); Ray itself is imported only when used."""
    if not args.ray:
        return None
    from matcher.ray_extraction import RayOptions

    return RayOptions(args.ray, args.ray_actors, args.ray_actor_cpus)


def _hog_backend() -> FeatureExtractor:
    from train.hog import HogBackend

    return HogBackend()


if __name__ == "__main__":
    sys.exit(main())
