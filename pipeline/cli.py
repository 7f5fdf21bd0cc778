"""The ``imagegen`` command.

User mistakes (:class:`~pipeline.errors.ImagegenError`) print one message and exit 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
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
    serve = commands.add_parser("serve", help="serve a job spec's model over HTTP (OpenAI images API) until Ctrl-C or SIGTERM")
    _spec_arguments(serve, "jobs/serve.yaml (its serve section sets host, port, batching)", "serve.port=8080")
    # The server itself, started by `imagegen serve` in a session of its own (pipeline.serve.process).
    serve.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--verbose", action="store_true", help="also print imagegen's info-level log lines (model loads, compiles, superseded error rows)")
    verify = commands.add_parser("verify", help="check an output against the dataset contract; exit 1 on any violation")
    verify.add_argument("output", help="the output URL (a folder, s3://bucket/prefix, ...)")
    verify.add_argument("--input", metavar="SPEC", help="the job spec: also check every input row is accounted for")
    verify.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a field of --input")
    prune = commands.add_parser("prune", help="remove the images of an output that no row of the current input owns (edited or removed rows)")
    prune.add_argument("output", help="the output URL (a folder, s3://bucket/prefix, ...)")
    prune.add_argument("--input", metavar="SPEC", required=True, help="the job spec whose input rows own images")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    prune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a field of --input")
    _cluster_commands(commands)
    _output_commands(commands)
    return parser


def _output_commands(commands: argparse._SubParsersAction) -> None:
    validate = commands.add_parser(
        "validate", help="plan a job without generating: rows valid and rejected, buckets, images to make, GPU-hours and cost"
    )
    _spec_arguments(validate, "jobs/demo.yaml", "plan.price_per_gpu_hour=2.5")
    report = commands.add_parser("report", help="write one self-contained HTML page about an output: images, runs, throughput, errors, spec")
    report.add_argument("output", help="the output URL (a folder, s3://bucket/prefix, ...)")
    report.add_argument("--html", metavar="FILE", default="report.html", help="where to write the page (default: report.html)")
    report.add_argument("--sample", metavar="N", type=int, default=48, help="images on the contact sheet (default: 48)")
    report.add_argument(
        "--sort", choices=("spread", "score"), default="spread",
        help="contact sheet order: spread evenly over the runs (default), or score: the lowest clip_score first, where failures are",
    )  # fmt: skip
    inspect = commands.add_parser(
        "inspect",
        help="show what an output holds: runs (running, interrupted, adopted), counts, schema, size, a few rows; "
        "with --spec, what that spec has left to make and the running run's ETA",
    )
    inspect.add_argument("output", help="the output URL (a folder, s3://bucket/prefix, ...)")
    inspect.add_argument(
        # 6: pipeline.output.duplicates.DEFAULT_DISTANCE, spelled here to keep the command's start-up light
        "--near-distance", metavar="BITS", type=int, default=6, choices=range(0, 65),
        help="perceptual hashes (phash) at most this many bits apart count as near duplicates (default: 6)",
    )  # fmt: skip
    vacuum = commands.add_parser(
        "vacuum", help="delete now what runs set aside in OUTPUT/_trash/ (else deleted after output.retention_hours)"
    )
    vacuum.add_argument("output", help="the output URL (a folder, s3://bucket/prefix, ...)")
    vacuum.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    for command in (report, inspect, vacuum):
        command.add_argument(
            "--spec", metavar="SPEC", help="a job spec whose output.storage_options reach OUTPUT (for s3:// outputs); inspect also counts what it has left to make"
        )
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a field of --spec")


def _cluster_commands(commands: argparse._SubParsersAction) -> None:
    dashboard = "the Ray dashboard URL of the cluster, e.g. http://HEAD:8265"
    submit = commands.add_parser(
        "submit",
        help="run a job spec on a Ray cluster as a Ray job; print its id, stream its log; exit 1 if it fails",
    )
    _spec_arguments(submit, "jobs/demo.yaml (a file under this repository: it travels with the job)", "output.url=s3://bucket/run1")
    submit.add_argument("--address", metavar="URL", help=f"{dashboard} (default: the spec's runtime.address if it is one)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return without following the job")
    status = commands.add_parser("status", help="show a Ray job's status; exit 1 if it failed or was stopped")
    status.add_argument("job", help="the job id that `imagegen submit` printed")
    status.add_argument("--address", metavar="URL", required=True, help=dashboard)
    logs = commands.add_parser("logs", help="print a Ray job's log")
    logs.add_argument("job", help="the job id that `imagegen submit` printed")
    logs.add_argument("--address", metavar="URL", required=True, help=dashboard)
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")


def _run(args: argparse.Namespace) -> int:
    from pipeline.batch.run import run
    from pipeline.batch.summary import format_summary
    from pipeline.spec.load import load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.verbose:
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("pipeline").setLevel(logging.INFO)
    summary = run(spec)
    print(format_summary(summary))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pipeline.serve.process import child_argv, serve_until_interrupted, supervise
    from pipeline.spec.load import load_spec

    spec = load_spec(args.spec, args.overrides)  # a bad spec fails here, before any process starts
    if not args.in_process:
        return supervise(child_argv(args.spec, args.overrides))
    serve_until_interrupted(spec, announce=_announce)
    return 0


def _output_location(output: str, spec_path: str | None, overrides: list[str]):
    """``(url, storage options, spec or None)`` for a command reading an output: the
    options are the spec's when its output.url is that output."""
    from pipeline.spec.load import load_spec
    from pipeline.spec.section import absolute_if_local

    spec = load_spec(spec_path, overrides) if spec_path else None
    url = absolute_if_local(output)
    return url, (spec.output.storage_options if spec and spec.output.url == url else {}), spec


def _verify(args: argparse.Namespace) -> int:
    from pipeline.output.verify import verify

    url, options, spec = _output_location(args.output, args.input, args.overrides)
    report = verify(url, options, spec)
    print(report.format())
    return 0 if report.ok else 1


def _prune(args: argparse.Namespace) -> int:
    from pipeline.output.ownership import prune

    url, options, spec = _output_location(args.output, args.input, args.overrides)
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"url": url, "storage_options": options})})
    found = prune(spec, dry_run=args.dry_run)
    if not found.images:
        print(f"{url}: every image belongs to a row of the current input; nothing to remove")
    else:
        sources = ", ".join(f"{source} ({n})" for source, n in found.by_source.most_common())
        print(f"{url}: {'would remove' if args.dry_run else 'removed'} {found.images} image(s) no current input row owns (made from {sources})")
    return 0


def _announce(line: str) -> None:
    print(f"imagegen: {line}", file=sys.stderr, flush=True)


def _submit(args: argparse.Namespace) -> int:
    from pipeline.remote.submit import submit

    return submit(args.spec, args.overrides, args.address, wait=not args.no_wait, announce=_announce)


def _status(args: argparse.Namespace) -> int:
    from pipeline.remote.submit import status

    return status(args.job, args.address)


def _logs(args: argparse.Namespace) -> int:
    from pipeline.remote.submit import logs

    return logs(args.job, args.address, follow=args.follow, announce=_announce)


def _validate(args: argparse.Namespace) -> int:
    from pipeline.batch.plan import format_plan, make_plan
    from pipeline.spec.load import load_spec

    spec = load_spec(args.spec, args.overrides)
    print(format_plan(make_plan(spec), args.spec))
    return 0


def _report(args: argparse.Namespace) -> int:
    from pipeline.output.report import write_report

    url, options, _ = _output_location(args.output, args.spec, args.overrides)
    data = write_report(url, args.html, options, sample=args.sample, order=args.sort)
    print(f"wrote {args.html}: {len(data.samples)} of {len(data.images)} images, {len(data.manifests)} run(s), {len(data.errors)} error rows")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.output.inspect import format_inspection, inspect_output

    url, options, spec = _output_location(args.output, args.spec, args.overrides)
    print(format_inspection(inspect_output(url, options, spec=spec, near_distance=args.near_distance)))
    return 0


def _vacuum(args: argparse.Namespace) -> int:
    from pipeline.storage import filesystem, trash

    url, options, _ = _output_location(args.output, args.spec, args.overrides)
    fs, root = filesystem.open_url(url, options)
    gone = trash.purge(fs, root, dry_run=args.dry_run)
    for relative in gone:
        print(relative)
    print(f"{'would delete' if args.dry_run else 'deleted'} {len(gone)} file(s) set aside in {url}/{trash.TRASH_DIR}/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        handlers = {"run": _run, "serve": _serve, "verify": _verify, "submit": _submit, "status": _status, "logs": _logs}
        handlers.update({"validate": _validate, "report": _report, "inspect": _inspect, "prune": _prune, "vacuum": _vacuum})
        return handlers[args.command](args)
    except ImagegenError as exc:
        print(f"imagegen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imagegen: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
