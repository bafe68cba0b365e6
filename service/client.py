"""`python -m service.client IMAGE... [--top-k N] [--views MODE] [--target HOST:PORT]`: print
the verdict and the ranked labels, each with its nearest reference view.

Plaintext by default; `--tls-ca` (and `--tls-cert`/`--tls-key` for mutual TLS) switch to TLS,
`--token-file` sends `authorization: Bearer <token>` with every call.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import grpc

from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from service.converters import VIEWS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service.client",
        description="Match images against the catalogue.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--top-k", type=int, default=5, help="labels to show; 0 = all (5)")
    parser.add_argument("--target", default="localhost:50051", help="server (localhost:50051)")
    parser.add_argument(
        "--views",
        choices=tuple(VIEWS),
        help="how thoroughly the server looks at each photo (its default)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per call, s (30)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's CAs")
    parser.add_argument("--tls-ca", type=Path, help="TLS: CA certificate(s) to trust (PEM)")
    parser.add_argument("--tls-cert", type=Path, help="mutual TLS: client certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="mutual TLS: client private key (PEM)")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token")
    args = parser.parse_args(argv)
    if args.top_k < 0:
        parser.error("--top-k must be 0 or more")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    return args


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """Plaintext unless a TLS option is given. Raises OSError for an unreadable file."""
    if not (args.tls or args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
        private_key=args.tls_key.read_bytes() if args.tls_key else None,
        certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
    )
    return grpc.secure_channel(args.target, credentials)


def call_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The bearer token from --token-file (its trailing newline dropped), if any."""
    if args.token_file is None:
        return ()
    token = args.token_file.read_text().rstrip("\r\n")
    return (("authorization", f"Bearer {token}"),)


_VERDICTS = {matcher_pb2.MATCH: "MATCH", matcher_pb2.NO_MATCH: "NO MATCH"}


def format_response(path: Path, response: matcher_pb2.MatchResponse) -> str:
    """The lines printed for one image: its path, models and verdict, then for each label
    `rank  score  label`, and the reference view it came closest to."""
    model = response.model
    header = f"{path}  [{model.backbone} v{model.model_version}]"
    if response.verdict in _VERDICTS:
        views = matcher_pb2.Views.Name(response.views).removeprefix("VIEWS_").lower()
        header += (
            f"  {_VERDICTS[response.verdict]}: nearest view {response.verdict_score:.3f}, "
            f"threshold {response.threshold:.3f} ({views})"
        )
    lines = [header]
    for rank, match in enumerate(response.matches, start=1):
        line = f"  {rank:>2}. {match.score:.4f}  {match.label}"
        if match.reference_id:
            line += f"  ~ {match.reference_id} {match.similarity:.3f} ({match.query_view})"
        lines.append(line)
    return "\n".join(lines)


def tolerate_narrow_stdout() -> None:
    """Print what stdout's encoding cannot hold as `\\u` escapes rather than stop.

    Labels are folder names in any script; a Windows code page, a Latin-1 locale or
    PYTHONIOENCODING=ascii would otherwise end the run at the first "拉链" with a traceback.
    """
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tolerate_narrow_stdout()
    failures = 0
    try:
        metadata = call_metadata(args)
        channel = open_channel(args)
    except OSError as exc:
        print(f"client: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    with channel:
        stub = matcher_pb2_grpc.MatcherStub(channel)  # type: ignore[no-untyped-call]
        for path in args.images:
            try:
                request = matcher_pb2.ImageRequest(
                    image=path.read_bytes(),
                    top_k=args.top_k,
                    views=VIEWS[args.views] if args.views else matcher_pb2.VIEWS_UNSPECIFIED,
                )
                response = stub.Match(request, timeout=args.timeout, metadata=metadata)
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
