"""The ``imagegen`` command.

User mistakes (:class:`~pipeline.errors.ImagegenError`) print one message and exit 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pipeline.errors import ImagegenError


def _spec_arguments(command: argparse.ArgumentParser, example: str, override: str) -> None:
    command.add_argument("spec", help=f"path of the YAML job spec, e.g. {example}")
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help=f"override a spec field, e.g. --set {override} (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegen", description="Batch image generation on Ray with diffusers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run a job spec: prompt table in, image dataset out")
    _spec_arguments(run, "jobs/demo.yaml", "runtime.num_actors=4")
    serve = commands.add_parser("serve", help="serve a job spec's model over HTTP (OpenAI images API) until Ctrl-C")
    _spec_arguments(serve, "jobs/serve.yaml (its serve section sets host, port, batching)", "serve.port=8080")
    verify = commands.add_parser("verify", help="check an output against the dataset contract; exit 1 on any violation")
    verify.add_argument("output", help="the output URL (a folder, s3://bucket/prefix, ...)")
    verify.add_argument("--input", metavar="SPEC", help="the job spec: also check every input row is accounted for")
    verify.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a field of --input")
    return parser


def _run(args: argparse.Namespace) -> int:
    from pipeline.batch import run
    from pipeline.config import load_spec
    from pipeline.summary import format_summary

    spec = load_spec(args.spec, args.overrides)
    summary = run(spec)
    print(format_summary(summary))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pipeline.config import load_spec
    from pipeline.serve import serve_until_interrupted

    spec = load_spec(args.spec, args.overrides)
    serve_until_interrupted(spec, announce=lambda line: print(f"imagegen: {line}", file=sys.stderr, flush=True))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pipeline.config import load_spec
    from pipeline.storage import absolute_if_local
    from pipeline.verify import verify

    spec = load_spec(args.input, args.overrides) if args.input else None
    url = absolute_if_local(args.output)
    options = spec.output.storage_options if spec and spec.output.url == url else {}
    report = verify(url, options, spec)
    print(report.format())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": _run, "serve": _serve, "verify": _verify}[args.command](args)
    except ImagegenError as exc:
        print(f"imagegen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imagegen: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
