"""`python -m export`: write a backbone as a SavedModel in TensorFlow Serving's layout;
`python -m export tflite`: the on-device LiteRT models of a backbone and a catalogue."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFAULT_BASE_PATH = Path("models/backbones")
#: What --frozen-graph exports (matcher.backbones.inception.NAME, spelt out to keep TensorFlow
#: unimported).
FROZEN_GRAPH_BACKBONE = "inception_v3"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a backbone CNN as a TensorFlow SavedModel for serving.",
    )
    parser.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="efficientnet_lite0 (default), efficientnet_lite1, efficientnet_lite2, inception_v3",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (default), a local weights file (inception_v3), or random (tests only)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="with --weights random: seed the initialisation, so that two exports (fp32 and "
        "bf16, say) get the same weights",
    )
    parser.add_argument(
        "--layer",
        help="average-pool the features from this layer (default: the last), e.g. mixed7; several, "
        "comma-separated, concatenate their pooled outputs (multi-layer features)",
    )
    parser.add_argument(
        "--precision",
        # matcher.backbones.precision.PRECISIONS, spelt out to keep TensorFlow unimported.
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32 (default), or bf16: the convolutions compute in bfloat16, for CPUs with "
        "AVX512_BF16 or AMX (features stay float32; see matcher/backbones/precision.py)",
    )
    parser.add_argument(
        "--frozen-graph",
        type=Path,
        metavar="PATH",
        help="convert TensorFlow's 2015 Inception v3 classify_image_graph_def.pb (its pool_3 "
        "features) instead of building a backbone; see export/frozen_graph.py",
    )
    parser.add_argument(
        "--base-path",
        type=Path,
        default=DEFAULT_BASE_PATH,
        help="TF Serving base path; the model goes to BASE/NAME/VERSION (default %(default)s)",
    )
    parser.add_argument("--model-name", help="model name under the base path (default: backbone)")
    parser.add_argument("--version", type=int, help="version number (default: latest + 1)")
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when the model already has a version (used by `make run`)",
    )
    args = parser.parse_args(argv)
    if args.frozen_graph is not None:
        # The frozen graph fixes the network, its weights and its features: nothing to choose.
        chosen = args.weights != parser.get_default("weights") or args.layer
        if chosen or args.backbone not in (parser.get_default("backbone"), FROZEN_GRAPH_BACKBONE):
            parser.error("--frozen-graph takes no --weights or --layer, and no other --backbone")
        if args.precision != parser.get_default("precision"):
            # Its weights are graph constants, not Keras layers that can change dtype policy.
            parser.error("--frozen-graph exports fp32 only; --precision bf16 needs --backbone")
        args.backbone = FROZEN_GRAPH_BACKBONE
    return args


def parse_tflite_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export tflite",
        description="Write the on-device LiteRT (TFLite) models of a backbone and a catalogue: "
        "fp32 and int8, labels, metadata with the no-match threshold, a manifest.",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_BASE_PATH / "efficientnet_lite0",
        help="the SavedModel's base path (its latest version) or a version folder "
        "(default %(default)s)",
    )
    parser.add_argument("--version", type=int, help="the version under --model-dir (latest)")
    parser.add_argument(
        "--classifier",
        type=Path,
        default=Path("models/classifiers/efficientnet_lite0"),
        help="a training run trained with --matcher knn or prototype (default %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default build/tflite/<backbone>)")
    parser.add_argument(
        "--precision",
        action="append",
        choices=("fp32", "int8"),
        help="which models to write (repeatable; default both)",
    )
    return parser.parse_args(argv)


def tflite_main(argv: list[str]) -> int:
    """`python -m export tflite`: the on-device models (export/tflite_model.py)."""
    args = parse_tflite_args(argv)
    from matcher.layout import versions

    version_dir = args.model_dir
    if not (version_dir / "saved_model.pb").is_file():
        found = versions(args.model_dir)
        if not found or (args.version is not None and args.version not in found):
            wanted = f"version {args.version}" if args.version is not None else "no version"
            print(
                f"export tflite: error: {args.model_dir} has {wanted if found else 'no version'}; "
                "run `make export`",
                file=sys.stderr,
            )
            return 2
        version_dir = args.model_dir / str(args.version if args.version is not None else found[-1])
    from export.tflite_model import default_out, export_tflite
    from matcher.backbones.builder import ExportError
    from matcher.errors import ModelLoadError

    out = args.out or default_out(version_dir)
    try:
        written = export_tflite(
            version_dir, args.classifier, out, tuple(args.precision or ()) or ("fp32", "int8")
        )
    except (ExportError, ModelLoadError, OSError) as exc:
        print(f"export tflite: error: {exc}", file=sys.stderr)
        return 2
    for precision, path in written.files.items():
        print(f"{precision}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if written.float_layers is not None:
        kept, total = written.float_layers
        print(f"int8: {kept} of {total} layers kept in float (the ones int8 hurt most)")
    threshold = written.metadata["no_match_threshold"]
    print(
        f"{len(written.metadata['labels'])} labels in {out / 'labels.txt'}; no-match threshold "
        + (f"{threshold:.3f}" if threshold is not None else "none (not calibrated)")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ start-up chatter is not ours to show; TF_CPP_MIN_LOG_LEVEL=0 shows it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tflite"]:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        return tflite_main(argv[1:])
    args = parse_args(argv)
    # Our own output is printed; libraries (TensorFlow, matplotlib) only speak up on problems.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from matcher.layout import versions

    model_dir = args.base_path / (args.model_name or args.backbone)
    if args.if_missing and versions(model_dir):
        print(f"{model_dir} already has version {versions(model_dir)[-1]}; nothing to do")
        return 0
    # TensorFlow is imported only now, so that bad arguments fail fast.
    from export.savedmodel import export_backbone
    from matcher.backbones.builder import ExportError, build_backbone

    try:
        if args.frozen_graph is not None:
            from export.frozen_graph import build_frozen_graph_backbone

            backbone = build_frozen_graph_backbone(args.frozen_graph)
        else:
            backbone = build_backbone(
                args.backbone, args.weights, args.layer, args.precision, args.seed
            )
        exported = export_backbone(backbone, args.base_path, args.model_name, args.version)
    except (ExportError, FileExistsError, OSError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    info = exported.info
    print(
        f"exported {info.backbone} ({info.weights}) -> {exported.path} "
        f"[input {info.input_size}px, {info.feature_dim} features from {info.layer}]"
        + (f" computing in {info.precision}" if info.precision != "fp32" else "")
    )
    if info.precision == "bf16":
        from matcher.backbones.precision import cpu_has_bf16

        if cpu_has_bf16() is False:
            # The model still runs, but TensorFlow emulates bfloat16 on such a CPU.
            print(
                "export: note: this CPU has no AVX512_BF16 or AMX; on it the bf16 model runs "
                "slower than fp32 (export fp32 for such machines)",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
