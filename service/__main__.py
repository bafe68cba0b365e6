"""`python -m service`: run the Matcher gRPC server. `--help` lists every flag."""

from __future__ import annotations

import os
import sys

from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) is not ours to show; its errors
    # still reach us as exceptions. Set TF_CPP_MIN_LOG_LEVEL=0 to see everything.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from service.config import load_settings

    try:
        settings = load_settings(argv if argv is not None else sys.argv[1:])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        print(f"service: error: {where}: {first['msg']}", file=sys.stderr)
        return 2
    from service.logs import configure_logging

    try:
        configure_logging(settings.log_level, settings.log_format)
    except ValueError as exc:
        print(f"service: error: log_level: {exc}", file=sys.stderr)
        return 2
    from service.server import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
