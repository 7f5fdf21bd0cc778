"""The ``imagegen`` command.

User mistakes (:class:`~pipeline.errors.ImagegenError`) print one message and exit 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pipeline.errors import ImagegenError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegen", description="Batch image generation on Ray with diffusers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run a job spec: prompt table in, image dataset out")
    run.add_argument("spec", help="path of the YAML job spec, e.g. jobs/demo.yaml")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec field, e.g. --set runtime.num_actors=4 (repeatable)",
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    from pipeline.batch import run
    from pipeline.config import load_spec
    from pipeline.summary import format_summary

    spec = load_spec(args.spec, args.overrides)
    summary = run(spec)
    print(format_summary(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": _run}[args.command](args)
    except ImagegenError as exc:
        print(f"imagegen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imagegen: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
